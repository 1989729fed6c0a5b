"""Trusting results across stages: per-fold target scaling, the encoder a run was trained
on, the folds a run lists, damaged and tissue-less stores, outputs that cannot be written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from typer.testing import CliRunner

from nic.cli import app
from nic.errors import DataError, OutputError, StoreError
from nic.learn import CVConfig, FitConfig, LabelSpec, load_cohort, load_run, predict_run, train_cv
from nic.learn.data import open_sources
from nic.store import StoreAttrs, create_store, mark_complete, open_store, store_path, verify_store
from nic.synth import PlantedCohort, make_planted_cohort

FAST = {"epochs": 2, "width": 8, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    """30 patients, one slide each, 12 x 12 grids, 8 channels; read-only."""
    return make_planted_cohort(tmp_path_factory.mktemp("prov"), 30, grid=(12, 12), n_pairs=2, seed=3)


@pytest.fixture(scope="module")
def run(cohort: PlantedCohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-fold meanpool regression run on ``cohort``; read-only."""
    out = tmp_path_factory.mktemp("runs") / "run"
    spec = LabelSpec(cohort.labels, "regression", target="proliferation")
    train_cv(CVConfig(cohort.stores, spec, FitConfig(model="meanpool", **FAST), folds=3, out=out))
    return out


def _copy_stores(cohort: PlantedCohort, dest: Path) -> Path:
    shutil.copytree(cohort.stores, dest)
    return dest


def _set_attrs(store: Path, **attrs: object) -> None:
    zarr.open_group(str(store), mode="r+").attrs.update(attrs)


def _cli(args: list[str]):  # -> click Result
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(res) -> str:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# -- wrong numbers ------------------------------------------------------------------------


def test_pooled_regression_converts_each_fold_with_its_own_scaling(cohort: PlantedCohort) -> None:
    spec = LabelSpec(cohort.labels, "regression", target="proliferation")
    res = train_cv(CVConfig(cohort.stores, spec, FitConfig(model="meanpool", **FAST), folds=3))
    co = load_cohort(cohort.stores, spec)
    src = open_sources(co.store_paths)
    scalings = {(m.target.mean, m.target.std) for m in res.models}
    assert len(scalings) == 3  # each fold standardised its targets with its own fit set
    frame = res.predictions.set_index("patient")
    for model, (_, test_p) in zip(res.models, res.folds):
        slides = co.slides_of(test_p)
        raw = model.predict_raw([src[i] for i in slides], 10, True, 0)
        expected = model.to_prediction(raw)  # one slide per patient
        got = frame.loc[[co.patients[i] for i in test_p], "prediction"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    mae = np.mean(np.abs(res.predictions["prediction"] - res.predictions["target"]))
    assert res.metrics["mae"]["value"] == pytest.approx(mae)


def test_predict_averages_each_fold_models_converted_predictions(cohort: PlantedCohort, run: Path) -> None:
    r = load_run(run)
    src = open_sources(sorted(cohort.stores.glob("*.zarr")))
    fit = r.config["fit"]
    expected = np.mean([m.to_prediction(m.predict_raw(src, fit["tta_crops"], fit["tta_variants"], fit["seed"]))
                        for m in r.models], axis=0)  # fmt: skip
    got = predict_run(run, cohort.stores)
    np.testing.assert_allclose(got["prediction"].to_numpy(), expected, rtol=1e-6)
    # per patient with a labels table: the same numbers here (one slide per patient)
    per_patient = predict_run(run, cohort.stores, cohort.labels)
    np.testing.assert_allclose(np.sort(per_patient["prediction"].to_numpy()), np.sort(expected), rtol=1e-6)


# -- provenance ---------------------------------------------------------------------------


def test_run_records_the_encoder_of_its_stores(cohort: PlantedCohort, run: Path) -> None:
    enc = json.loads((run / "config.json").read_text())["encoder"]
    assert enc == load_run(run).encoder.to_json()  # type: ignore[union-attr]
    assert enc["code_size"] == 8 and enc["variants"] == 1


def test_train_refuses_a_folder_of_mixed_encoders(cohort: PlantedCohort, tmp_path: Path) -> None:
    stores = _copy_stores(cohort, tmp_path / "mixed")
    odd = sorted(stores.glob("*.zarr"))[:2]
    for s in odd:
        _set_attrs(s, encoder_name="nic-cnn", encoder_checksum="ab" * 32)
    args = ["train", "--compressed", stores, "--labels", cohort.labels, "--task", "regression",
            "--target", "proliferation", "--folds", "2", "--epochs", "1", "--out", tmp_path / "r"]  # fmt: skip
    msg = _one_line(_cli(args))
    assert "2 of 30 stores" in msg and odd[0].name[:-5] in msg and "weights sha256 'abababababab'" in msg
    assert not (tmp_path / "r").exists()


def test_predict_refuses_stores_of_another_encoder(cohort: PlantedCohort, run: Path, tmp_path: Path) -> None:
    stores = _copy_stores(cohort, tmp_path / "other")
    for s in stores.glob("*.zarr"):
        _set_attrs(s, encoder_name="nic-cnn", encoder_checksum="", random_init=True, random_seed=0)
    out = tmp_path / "p.csv"
    msg = _one_line(_cli(["predict", "--model", run, "--compressed", stores, "--out", out]))
    assert "the run" in msg and "random init True (not False)" in msg and "encoder 'nic-cnn'" in msg
    assert not out.exists()
    # other um/px or dihedral variants are other codes too
    other = StoreAttrs(mpp=1.0).encoder
    assert "um/px 1.0 (not None)" in other.diff(load_run(run).encoder)  # type: ignore[arg-type]


def test_predict_refuses_a_run_with_a_missing_fold(run: Path, cohort: PlantedCohort, tmp_path: Path) -> None:
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "fold_1")
    msg = _one_line(_cli(["predict", "--model", broken, "--compressed", cohort.stores, "--out", tmp_path / "p.csv"]))
    assert "3 folds" in msg and "fold_1" in msg
    (broken / "fold_2" / "model.json").unlink()
    with pytest.raises(DataError, match="fold_1, fold_2"):
        load_run(broken)


# -- damaged and empty stores -------------------------------------------------------------


def _chunk(store: Path) -> Path:
    return next(p for p in sorted((store / "features").rglob("*")) if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["empty", "deleted"])
def test_damaged_stores_are_refused_with_one_line(
    cohort: PlantedCohort, run: Path, tmp_path: Path, damage: str
) -> None:
    stores = _copy_stores(cohort, tmp_path / "d")
    bad = sorted(stores.glob("*.zarr"))[4]
    chunk = _chunk(bad)
    if damage == "empty":
        chunk.write_bytes(b"")
    else:
        chunk.unlink()
    assert verify_store(bad)
    with pytest.raises(StoreError, match="damaged"):
        open_store(bad)
    train = ["train", "--compressed", stores, "--labels", cohort.labels, "--task", "regression",
             "--target", "proliferation", "--folds", "2", "--epochs", "1", "--out", tmp_path / "r"]  # fmt: skip
    for args in (train, ["predict", "--model", run, "--compressed", stores, "--out", tmp_path / "p.csv"],
                 ["show", bad, "--out", tmp_path / "s.png"]):  # fmt: skip
        msg = _one_line(_cli(args))
        assert bad.name in msg and "damaged" in msg and "nic compress" in msg
    assert not (tmp_path / "r").exists() and not (tmp_path / "p.csv").exists()


def test_deep_verification_sees_changed_bytes(tmp_path: Path) -> None:
    p = store_path(tmp_path, "s")
    f = create_store(p, 2, (3, 3), np.ones((3, 3), bool), {})
    f[...] = 1
    mark_complete(p)
    assert verify_store(p, deep=True) == []
    chunk = _chunk(p)
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert verify_store(p) == [] and "changed" in verify_store(p, deep=True)[0]


def _empty_store(stores: Path, sid: str) -> None:
    path = store_path(stores, sid)
    shutil.rmtree(path)
    create_store(path, 8, (12, 12), np.zeros((12, 12), bool), {"encoder": "planted"})
    mark_complete(path)


def test_tissueless_stores_are_left_out_with_a_warning(cohort: PlantedCohort, run: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    stores = _copy_stores(cohort, tmp_path / "e")
    _empty_store(stores, "s0003_0")
    spec = LabelSpec(cohort.labels, "regression", target="proliferation")
    with caplog.at_level(logging.WARNING, logger="nic"):
        co = load_cohort(stores, spec)
    assert "s0003_0" not in co.slide_ids and "p0003" not in co.patients and len(co.patients) == 29
    assert any("no tissue" in r.getMessage() and "s0003_0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nic"):
        pred = predict_run(run, stores)
    assert "s0003_0" not in set(pred["slide"]) and len(pred) == 29
    assert any("no tissue" in r.getMessage() for r in caplog.records)


# -- outputs that cannot be written -------------------------------------------------------


def test_predict_checks_the_output_before_the_work(cohort: PlantedCohort, run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import nic.learn

    def never(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("predicted before checking the output")

    monkeypatch.setattr(nic.learn, "predict_run", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = _one_line(_cli(["predict", "--model", run, "--compressed", cohort.stores, "--out", blocker / "p.csv"]))
    assert "is a file, not a folder" in msg

    def read_only(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    msg = _one_line(
        _cli(["predict", "--model", run, "--compressed", cohort.stores, "--out", tmp_path / "ro" / "p.csv"])
    )
    assert "Permission denied" in msg and "--out" in msg


def test_predict_csv_is_replaced_whole(cohort: PlantedCohort, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text("old\n")
    assert "exists" in _one_line(_cli(["predict", "--model", run, "--compressed", cohort.stores, "--out", out]))
    assert out.read_text() == "old\n"
    res = _cli(["predict", "--model", run, "--compressed", cohort.stores, "--out", out, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == 30 and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_compress_rebuilds_a_damaged_complete_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import nic
    from nic.compress import CompressOptions, compress_slides
    from tests.test_compress import write_slide

    slide = write_slide(tmp_path / "b.tif", (1024, 768), 0.5, seed=2)
    torch.manual_seed(0)
    nic.save_encoder(nic.create_encoder("nic-cnn"), tmp_path / "enc")
    enc = nic.load_encoder(tmp_path / "enc")
    opts = CompressOptions(workers=0)
    [r] = compress_slides([slide], enc, tmp_path / "out", opts)
    assert r.status == "done"
    clean = open_store(r.store).load()
    [r] = compress_slides([slide], enc, tmp_path / "out", opts)
    assert r.status == "skipped"
    _chunk(r.store).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="nic"):
        [r] = compress_slides([slide], enc, tmp_path / "out", opts)
    assert r.status == "done" and any("damaged" in rec.getMessage() for rec in caplog.records)
    np.testing.assert_array_equal(open_store(r.store, verify="deep").load(), clean)


def test_compress_checks_the_output_folder_before_any_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nic
    from nic.compress import compress_slides

    torch.manual_seed(0)
    nic.save_encoder(nic.create_encoder("nic-cnn"), tmp_path / "enc")

    def read_only(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(OutputError, match=r"cannot write in .*Permission denied.*`out`"):
        compress_slides([tmp_path / "missing.tif"], tmp_path / "enc", tmp_path / "ro" / "out")
    assert not (tmp_path / "ro").exists()


def test_predictions_carry_the_spread_over_views_and_folds(cohort: PlantedCohort, run: Path) -> None:
    oof = pd.read_csv(run / "predictions.csv")
    assert (oof["spread"] >= 0).all() and oof["spread"].gt(0).any()
    r = load_run(run)
    src = open_sources(sorted(cohort.stores.glob("*.zarr"))[:3])
    fit = r.config["fit"]
    views = [
        [m.predict_views([s], fit["tta_crops"], fit["tta_variants"], fit["seed"])[0] for m in r.models] for s in src
    ]
    by_hand = [np.concatenate([m.to_prediction(v) for m, v in zip(r.models, vs)]).std() for vs in views]
    shown = predict_run(run, cohort.stores).set_index("slide").loc[[s.slide_id for s in src], "spread"]
    np.testing.assert_allclose(shown.to_numpy(), by_hand, rtol=1e-6)
