"""End to end: nic-cnn learns planted signals; the CLI trains, predicts and reports bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nic.errors import DataError
from nic.learn import FitConfig, LabelSpec, fit_model, load_cohort, patient_mean
from nic.learn.data import open_sources
from nic.metrics import auc, c_index, spearman
from nic.synth import PlantedCohort, make_planted_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    """64 patients (every third with 2 slides), 16 x 16 grids, 8 channels; read-only."""
    return make_planted_cohort(
        tmp_path_factory.mktemp("planted"), 64, slides_per_patient=(1, 1, 2), n_pairs=8, noise=0.3, seed=1
    )


_TASKS = {
    "regression": {"target": "proliferation"},
    "binary": {"target": "growth_pattern"},
    "survival": {"time": "survival_time", "event": "survival_event"},
}


def _fit_and_score(planted: PlantedCohort, task: str, model: str = "nic-cnn", target: str | None = None) -> float:
    """Train on patients 0-31, score the patient-level predictions of patients 32-63."""
    cols = {"target": target} if target else _TASKS[task]
    co = load_cohort(planted.stores, LabelSpec(planted.labels, task, **cols))  # type: ignore[arg-type]
    src = open_sources(co.store_paths)
    train_p, test_p = np.arange(32), np.arange(32, 64)
    m, hist = fit_model(co, src, train_p, test_p[:0], FitConfig(model=model, epochs=30, width=32, batch_size=8), seed=1)
    assert np.isfinite(hist.train_loss).all()
    test_s = co.slides_of(test_p)
    raw = m.predict_raw([src[i] for i in test_s], n_crops=1, variants=True)
    pred = m.to_prediction(patient_mean(raw, co.slide_patient[test_s], test_p))
    if task == "regression":
        return spearman(co.y[test_p], pred)
    if task == "binary":
        return auc(co.y[test_p], pred)
    return c_index(co.time[test_p], co.y[test_p], pred)  # type: ignore[index]


def test_nic_cnn_learns_a_level_signal(planted: PlantedCohort) -> None:
    assert _fit_and_score(planted, "regression") > 0.8


def test_nic_cnn_learns_a_ratio_of_sparse_counts(planted: PlantedCohort) -> None:
    # "mitoses" (channel 5) per "tumour" cell (channel 4): the cell-ratio branch's job;
    # the reference network alone (ratio_heads=0) gave 0.85 here, with the branch 0.92
    assert _fit_and_score(planted, "regression", target="mitotic_index") > 0.88


def test_nic_cnn_learns_a_spatial_label(planted: PlantedCohort) -> None:
    # the A and B cells have equal counts in both classes: only their layout differs
    assert _fit_and_score(planted, "binary") > 0.85


def test_nic_cnn_learns_survival_with_the_right_sign(planted: PlantedCohort) -> None:
    assert _fit_and_score(planted, "survival") > 0.7


@pytest.mark.slow
def test_meanpool_cannot_see_the_spatial_label(planted: PlantedCohort) -> None:
    assert _fit_and_score(planted, "binary", "meanpool") < 0.75


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    """12 patients, 8 x 8 grids, 4 channels: enough for the plumbing; read-only."""
    return make_planted_cohort(
        tmp_path_factory.mktemp("small"), 12, grid=(8, 8), code_size=4, slides_per_patient=(1, 2), n_pairs=2, seed=3
    )


def _run(args: list[str]):  # -> click.testing.Result
    from nic.cli import app

    return CliRunner().invoke(app, args)


def _one_error_line(res) -> str:  # type: ignore[no-untyped-def]
    text = (res.stderr if hasattr(res, "stderr") and res.stderr else res.output).strip()
    assert res.exit_code == 2, res.output
    assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    return text


def test_cli_train_and_predict(small: PlantedCohort, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = _train_args(small, run, "--epochs", "2")  # the last --epochs counts
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "spearman:" in res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"spearman", "pearson", "mae"}
    for m in metrics.values():
        assert len(m["folds"]) == 2 and len(m["ci95"]) == 2
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1] or not np.isfinite(m["value"])
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == 12 and preds["patient"].is_unique and set(preds["fold"]) == {0, 1}
    assert preds["n_slides"].sum() == 18
    labels = pd.read_csv(small.labels).groupby("patient")["proliferation"].first()
    assert np.allclose(preds.set_index("patient")["target"], labels.loc[preds["patient"]])
    assert (run / "fold_1" / "model.safetensors").is_file() and json.loads((run / "config.json").read_text())[
        "folds"
    ] == 2
    # the run folder is never overwritten silently
    assert "--overwrite" in _one_error_line(_run(args))
    # predict: one row per slide, or per patient with --labels
    out = tmp_path / "p.csv"
    res = _run(["predict", "--model", str(run), "--compressed", str(small.stores), "--out", str(out)])
    assert res.exit_code == 0, res.output
    per_slide = pd.read_csv(out)
    assert len(per_slide) == 18 and np.isfinite(per_slide["prediction"]).all()
    res = _run(
        [
            "predict",
            "--model",
            str(run),
            "--compressed",
            str(small.stores),
            "--labels",
            str(small.labels),
            "--out",
            str(out),
            "--overwrite",
        ]
    )
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == 12


def test_cli_survival_and_binary_outputs(small: PlantedCohort, tmp_path: Path) -> None:
    base = [
        "train",
        "--compressed",
        str(small.stores),
        "--labels",
        str(small.labels),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--width",
        "8",
    ]
    res = _run(
        [
            *base,
            "--task",
            "survival",
            "--time",
            "survival_time",
            "--event",
            "survival_event",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "s" / "metrics.json").read_text())) == {"c_index"}
    surv = pd.read_csv(tmp_path / "s" / "predictions.csv")
    assert {"time", "event", "risk"} <= set(surv.columns)
    # out-of-fold risks are z-scored within each fold, so the per-fold c-index is unchanged
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    for k, fold in surv.groupby("fold"):
        assert fold["risk"].mean() == pytest.approx(0.0, abs=1e-6) and fold["risk"].std(ddof=0) == pytest.approx(
            1.0, abs=1e-3
        )
        got = c_index(fold["time"].to_numpy(), fold["event"].to_numpy(), fold["risk"].to_numpy())
        assert got == pytest.approx(metrics["c_index"]["folds"][int(k)], abs=1e-9)
    res = _run(
        [*base, "--task", "binary", "--target", "growth_pattern", "--model", "abmil", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "b" / "metrics.json").read_text())) == {"auc", "balanced_accuracy"}
    p = pd.read_csv(tmp_path / "b" / "predictions.csv")
    assert p["probability"].between(0, 1).all() and set(p["target"]) == {0, 1}


def test_cli_bad_input_is_one_line_exit_2(small: PlantedCohort, tmp_path: Path) -> None:
    base = ["train", "--compressed", str(small.stores), "--task", "regression", "--folds", "2", "--epochs", "1"]
    msg = _one_error_line(
        _run([*base, "--labels", str(small.labels), "--target", "ki67", "--out", str(tmp_path / "a")])
    )
    assert "'ki67'" in msg
    bad = tmp_path / "labels.csv"
    df = pd.read_csv(small.labels)
    pd.concat([df, pd.DataFrame([{**df.iloc[0].to_dict(), "slide": "ghost", "patient": "px"}])]).to_csv(
        bad, index=False
    )
    msg = _one_error_line(
        _run([*base, "--labels", str(bad), "--target", "proliferation", "--out", str(tmp_path / "b")])
    )
    assert "ghost" in msg and "no store" in msg
    msg = _one_error_line(
        _run(
            [
                *base,
                "--labels",
                str(small.labels),
                "--target",
                "proliferation",
                "--model",
                "vit",
                "--out",
                str(tmp_path / "c"),
            ]
        )
    )
    assert "nic-cnn" in msg
    msg = _one_error_line(
        _run(["predict", "--model", str(tmp_path), "--compressed", str(small.stores), "--out", str(tmp_path / "x.csv")])
    )
    assert "not a nic run folder" in msg


def test_cli_multiclass_outputs(small: PlantedCohort, tmp_path: Path) -> None:
    df = pd.read_csv(small.labels)
    df["grade"] = pd.cut(df["proliferation"], 3, labels=["low", "mid", "high"]).astype(str)
    csv = tmp_path / "labels.csv"
    df.to_csv(csv, index=False)
    res = _run(
        [
            "train",
            "--compressed",
            str(small.stores),
            "--labels",
            str(csv),
            "--task",
            "multiclass",
            "--target",
            "grade",
            "--model",
            "meanpool",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--width",
            "8",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert res.exit_code == 0, res.output
    p = pd.read_csv(tmp_path / "m" / "predictions.csv")
    probs = p[["prob_high", "prob_low", "prob_mid"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-6) and set(p["prediction"]) <= {"low", "mid", "high"}
    assert set(json.loads((tmp_path / "m" / "metrics.json").read_text())) == {"auc", "balanced_accuracy"}


def test_survival_validation_without_events_keeps_the_last_epoch(
    small: PlantedCohort, caplog: pytest.LogCaptureFixture
) -> None:
    co = load_cohort(small.stores, LabelSpec(small.labels, "survival", time="survival_time", event="survival_event"))
    src = open_sources(co.store_paths)
    censored = np.flatnonzero(co.y == 0)
    fit_p = np.setdiff1d(np.arange(len(co.patients)), censored[:3])
    with caplog.at_level("WARNING", logger="nic.learn.train"):
        cfg = FitConfig(epochs=3, width=8, batch_size=4, ratio_average=False)
        _, hist = fit_model(co, src, fit_p, censored[:3], cfg, seed=0)
    # not the epoch-0 weights of a constant loss 0: the last epoch of each stage, one start
    # (no validation to choose among starts by)
    assert hist.stage == ["ratio"] * 3 + ["conv"] * 3 and hist.best_epoch == 5
    assert "no events" in caplog.text
    # averaged starts need no choosing: every start runs, each keeps its last epoch
    model, hist = fit_model(co, src, fit_p, censored[:3], FitConfig(epochs=3, width=8, batch_size=4), seed=0)
    assert hist.stage == ["ratio"] * 3 + ["ratio.2"] * 3 + ["ratio.3"] * 3 + ["conv"] * 3 and hist.best_epoch == 11
    assert model.net.ratio_weights.tolist() == pytest.approx([1 / 3] * 3)


def _train_args(small: PlantedCohort, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--compressed",
        str(small.stores),
        "--labels",
        str(small.labels),
        "--task",
        "regression",
        "--target",
        "proliferation",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--width",
        "8",
        "--batch-size",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_cli_overwrite_checks_inputs_first_and_keeps_the_old_run_until_the_new_is_whole(
        small: PlantedCohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import nic.learn.folds as run_mod
    from nic.learn import CVConfig, train_cv

    run = tmp_path / "run"
    assert _run(_train_args(small, run)).exit_code == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # a typo in --target with --overwrite fails before the good run is touched
    args = _train_args(small, run, "--overwrite")
    args[args.index("proliferation")] = "ki67"
    assert "'ki67'" in _one_error_line(_run(args))
    assert (run / "metrics.json").is_file() and (run / "fold_1" / "model.json").is_file()
    # --overwrite of a good run that crashes after its first fold: the old run is intact,
    # nothing half-written is left beside it
    real_fit, calls = run_mod.fit_model, []

    def crash_on_second_fold(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_fit(*a, **kw)

    monkeypatch.setattr(run_mod, "fit_model", crash_on_second_fold)
    spec = LabelSpec(small.labels, "regression", target="proliferation")
    for out in (run, tmp_path / "crashed"):
        calls.clear()
        with pytest.raises(RuntimeError, match="killed"):
            train_cv(
                CVConfig(
                    small.stores,
                    spec,
                    FitConfig(epochs=1, width=8, batch_size=4, seed=5),
                    folds=2,
                    out=out,
                    overwrite=True,
                )
            )
    monkeypatch.undo()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "crashed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # a new run with --overwrite replaces the old one whole
    res = _run(_train_args(small, run, "--overwrite", "--seed", "3"))
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["fit"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # --out naming a file is a one-line error
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "not a folder" in _one_error_line(_run(_train_args(small, f, "--overwrite")))
    assert f.read_text() == "x"


def test_a_killed_run_leaves_no_result_and_its_leftovers_are_cleaned(small: PlantedCohort, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    code = "from nic.cli import main; import sys; sys.argv = ['nic'] + sys.argv[1:]; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *_train_args(small, run, "--epochs", "200")])
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".run.partial-*/fold_0")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not run.exists() and len(list(tmp_path.glob(".run.partial-*"))) == 1
    assert _run(_train_args(small, run)).exit_code == 0
    assert (run / "metrics.json").is_file() and not list(tmp_path.glob(".run.partial-*"))


@pytest.mark.parametrize(
    ("opt", "value"),
    [
        ("--batch-size", "0"),
        ("--batch-size", "1"),
        ("--threads", "-1"),
        ("--lr", "-1"),
        ("--epochs", "0"),
        ("--folds", "1"),
        ("--dropout", "1"),
        ("--pool", "sum"),
        ("--ties", "exact"),
        ("--device", "bogus"),
    ],
)
def test_cli_numeric_options_are_checked(small: PlantedCohort, tmp_path: Path, opt: str, value: str) -> None:
    args = _train_args(small, tmp_path / "r")
    if opt in args:
        args[args.index(opt) + 1] = value
    else:
        args += [opt, value]
    assert opt in _one_error_line(_run(args))
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_fit_on_cuda_matches_its_cpu_copy(small: PlantedCohort, tmp_path: Path) -> None:
    co = load_cohort(small.stores, LabelSpec(small.labels, "regression", target="proliferation"))
    src = open_sources(co.store_paths)
    m, hist = fit_model(
        co, src, np.arange(8), np.arange(8, 10), FitConfig(epochs=5, width=8, batch_size=4, device="cuda"), seed=0
    )
    assert next(m.net.parameters()).is_cuda and np.isfinite(hist.train_loss).all()
    on_gpu = m.predict_raw(src, n_crops=1, variants=True)
    m.save(tmp_path / "m")
    on_cpu = type(m).load(tmp_path / "m").predict_raw(src, n_crops=1, variants=True)
    assert np.allclose(on_gpu, on_cpu, atol=2e-3)  # cuDNN may use TF32


def test_ratio_stage_has_its_own_minimum_epochs(small: PlantedCohort) -> None:
    co = load_cohort(small.stores, LabelSpec(small.labels, "regression", target="proliferation"))
    src = open_sources(co.store_paths)
    fit_p, val_p = np.arange(len(co.patients))[3:], np.arange(3)
    # a learning rate too small to move the validation loss: every stage stops at its first chance
    cfg = dict(epochs=8, width=8, batch_size=4, lr=1e-9, patience=1, min_epochs=0, ratio_starts=1)
    _, hist = fit_model(co, src, fit_p, val_p, FitConfig(**cfg, ratio_min_epochs=4), seed=0)
    n_ratio = hist.stage.count("ratio")
    assert 5 <= n_ratio < 8 and hist.stage.count("conv") < 8 - 1  # the conv stage keeps min_epochs = 0
    assert len(set(hist.lr[:n_ratio])) == 1  # no lr decay before the ratio stage's minimum
    _, hist = fit_model(co, src, fit_p, val_p, FitConfig(**cfg, ratio_min_epochs=0), seed=0)
    assert hist.stage.count("ratio") < 5


def test_a_later_stage_that_improves_nothing_leaves_the_earlier_weights(small: PlantedCohort) -> None:
    """A learning rate that blows the conv stage up (it trains in place): no conv epoch beats
    the ratio stage, so the returned model is the ratio stage's kept one, validation loss and all."""
    from nic.learn.train import _validation_loss

    co = load_cohort(small.stores, LabelSpec(small.labels, "regression", target="proliferation"))
    src = open_sources(co.store_paths)
    fit_p, val_p = np.arange(len(co.patients))[3:], np.arange(3)
    cfg = FitConfig(epochs=4, width=8, batch_size=4, lr=0.3, min_epochs=0, ratio_min_epochs=0, ratio_starts=1,
                    ratio_average=False, patience=100, ratio_heads=2)  # fmt: skip
    model, hist = fit_model(co, src, fit_p, val_p, cfg, seed=0)
    ratio = [v for v, st in zip(hist.val_loss, hist.stage) if st == "ratio"]
    conv = [v for v, st in zip(hist.val_loss, hist.stage) if st == "conv"]
    assert conv and not min(conv) < min(ratio) and hist.stage[hist.best_epoch] == "ratio"
    assert _validation_loss(model, co, src, val_p, cfg, 0) == pytest.approx(min(ratio), rel=1e-5)


def test_averaged_ratio_starts_are_the_starts_best_of_chooses_from(small: PlantedCohort, tmp_path: Path) -> None:
    co = load_cohort(small.stores, LabelSpec(small.labels, "regression", target="proliferation"))
    src = open_sources(co.store_paths)
    fit_p, val_p = np.arange(len(co.patients))[3:], np.arange(3)
    cfg = dict(epochs=3, width=8, batch_size=4, min_epochs=0, ratio_min_epochs=0, ratio_starts=2)
    best, _ = fit_model(co, src, fit_p, val_p, FitConfig(**cfg, ratio_average=False), seed=0)
    avg, hist = fit_model(co, src, fit_p, val_p, FitConfig(**cfg, ratio_average=True), seed=0)
    assert hist.stage.count("ratio") == hist.stage.count("ratio.2") == 3
    assert len(best.net.ratio) == 1 and len(avg.net.ratio) == 2
    assert avg.net.ratio_weights.tolist() == [0.5, 0.5]
    # the same two starts: the one best-of kept is one of the averaged copies, weight for weight
    kept = best.net.ratio[0].evidence[0].weight
    assert sum(torch.equal(kept, copy.evidence[0].weight) for copy in avg.net.ratio) == 1
    assert not torch.equal(avg.net.ratio[0].evidence[0].weight, avg.net.ratio[1].evidence[0].weight)
    avg.save(tmp_path / "m")
    again = type(avg).load(tmp_path / "m")
    assert again.spec.ratio_branches == 2
    np.testing.assert_allclose(again.predict_raw(src, 1, False), avg.predict_raw(src, 1, False), rtol=1e-5)


@pytest.fixture(scope="module")
def survival_run(small: PlantedCohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-fold meanpool survival run on ``small`` (1 epoch); read-only."""
    from nic.learn import CVConfig, train_cv

    out = tmp_path_factory.mktemp("survival") / "run"
    spec = LabelSpec(small.labels, "survival", time="survival_time", event="survival_event")
    train_cv(CVConfig(small.stores, spec, FitConfig(model="meanpool", epochs=1), folds=2, out=out, n_bootstrap=10))
    return out


@pytest.mark.parametrize("damage", ["empty patient", "slide twice"])
def test_predict_checks_its_labels_as_training_does(
    small: PlantedCohort, survival_run: Path, tmp_path: Path, damage: str
) -> None:
    from nic.learn import predict_run

    df = pd.read_csv(small.labels, dtype=str)
    if damage == "empty patient":  # two slides of two patients would be pooled as patient "nan"
        df.loc[[1, 4], "patient"] = ""
        match = "empty slide or patient cell in row"
    else:  # the same slide with another patient: the last row won
        df = pd.concat([df, df.iloc[[0]].assign(slide=f"/data/{df['slide'][0]}.svs", patient="p999")])
        match = f"slide '{df['slide'].iloc[0]}' is listed more than once"
    bad = tmp_path / "labels.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(DataError, match=match):
        predict_run(survival_run, small.stores, bad)
    # a patient written with a trailing space is the same patient
    df = pd.read_csv(small.labels, dtype=str)
    two = df["patient"][df["patient"].duplicated()].iloc[0]
    df.loc[df.index[df["patient"] == two][1], "patient"] = two + " "
    df.to_csv(bad, index=False)
    assert len(predict_run(survival_run, small.stores, bad)) == df["patient"].str.strip().nunique()


def test_predict_averages_survival_folds_on_the_scale_training_pooled_them(
    small: PlantedCohort, survival_run: Path
) -> None:
    # training z-scores each fold model's log-risks with its out-of-fold mean and deviation
    # before pooling them; predict must weigh the fold models the same way, not by the scale
    # each happens to have
    from nic.learn import load_run, predict_run

    run = load_run(survival_run)
    oof = pd.read_csv(survival_run / "predictions.csv").set_index("patient")
    labels = pd.read_csv(small.labels, dtype=str)
    srcs = open_sources([small.stores / f"{s}.zarr" for s in sorted(labels["slide"])])
    pat = labels.set_index("slide").loc[[s.slide_id for s in srcs], "patient"].to_numpy()
    patients = np.array(sorted(set(pat)))
    fit = run.config["fit"]
    expected = np.zeros(len(patients))
    for k, m in enumerate(run.models):
        raw = m.predict_raw(srcs, fit["tta_crops"], fit["tta_variants"], fit["seed"])[:, 0]
        raw = np.array([raw[pat == p].mean() for p in patients])
        mine = np.isin(patients, oof.index[oof["fold"] == k])
        slope, icpt = np.polyfit(raw[mine], oof.loc[patients[mine], "risk"], 1)  # this fold's z-score
        assert slope > 0
        expected += (slope * raw + icpt) / len(run.models)
    got = predict_run(survival_run, small.stores, small.labels).set_index("patient").loc[patients, "risk"]
    assert np.allclose(got, expected, atol=1e-6)
