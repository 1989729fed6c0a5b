"""Labels + stores, crop sampling, dihedral augmentation, folds and batch sampling of nic.learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nic.errors import DataError, OptionError
from nic.learn import (
    LabelSpec,
    SlideSource,
    crop_weights,
    dihedral,
    event_batches,
    inner_split,
    load_cohort,
    patient_folds,
    sample_crop_origin,
    training_view,
)
from nic.store import create_store, mark_complete


def _store(path: Path, feats: np.ndarray, tissue: np.ndarray | None = None) -> Path:
    """Write a finished store holding ``feats`` (C, H, W) or (8, C, H, W)."""
    v = feats.shape[0] if feats.ndim == 4 else 1
    c, h, w = feats.shape[-3:]
    t = np.ones((h, w), bool) if tissue is None else tissue
    arr = create_store(path, c, (h, w), t, {"encoder": "test"}, variants=v)
    arr[...] = feats
    mark_complete(path)
    return path


# ----------------------------------------------------------------------------- crops


def test_crop_weights_follow_the_distance_transform() -> None:
    t = np.zeros((7, 9), bool)
    t[1:6, 2:7] = True  # a 5 x 5 tissue square
    w = crop_weights(t)
    assert w.sum() == pytest.approx(1.0)
    assert (w[~t] == 0).all()
    assert w[3, 4] / w[1, 2] == pytest.approx(3.0)  # centre is 3 cells from background, corner 1
    full = crop_weights(np.ones((5, 5), bool))  # the grid border counts as background
    assert full[2, 2] / full[0, 0] == pytest.approx(3.0)
    assert np.allclose(crop_weights(np.zeros((3, 4), bool)), 1 / 12)


def test_sampled_centres_follow_the_weights() -> None:
    t = np.zeros((6, 6), bool)
    t[0:5, 0:4] = True
    w = crop_weights(t)
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.zeros_like(w)
    for _ in range(n):
        y, x = sample_crop_origin(w, 1, rng)  # a 1-cell crop starts at its centre
        counts[y, x] += 1
    assert (counts[w == 0] == 0).all()
    assert np.abs(counts / n - w).max() < 0.015


def test_crops_stay_inside_large_grids_and_pad_small_ones() -> None:
    rng = np.random.default_rng(1)
    w = crop_weights(np.ones((20, 30), bool))
    for _ in range(200):
        y0, x0 = sample_crop_origin(w, 8, rng)
        assert 0 <= y0 <= 12 and 0 <= x0 <= 22
    # a 5 x 7 grid in a 10-cell crop: zero padding, centred without rng, random with it
    w_small = crop_weights(np.ones((5, 7), bool))
    assert sample_crop_origin(w_small, 10, None, center=(2, 3)) == (-2, -1)
    origins = {sample_crop_origin(w_small, 10, rng) for _ in range(300)}
    assert {o[0] for o in origins} == set(range(-5, 1)) and {o[1] for o in origins} == set(range(-3, 1))


def test_slide_source_crop_pads_with_zeros(tmp_path: Path) -> None:
    f = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7) + 1
    t = np.ones((5, 7), bool)
    t[0, 0] = False
    src = SlideSource.open(_store(tmp_path / "a.zarr", f, t))
    feats, mask = src.crop(-2, -1, 10)
    assert feats.shape == (2, 10, 10) and mask.shape == (10, 10)
    assert np.array_equal(feats[:, 2:7, 1:8], f)
    assert feats.sum() == f.sum() and mask.sum() == t.sum() and not mask[2, 1]
    inner, _ = src.crop(1, 2, 3)  # a crop inside the grid is a plain slice
    assert np.array_equal(inner, f[:, 1:4, 2:5])


# ----------------------------------------------------------------------------- dihedral


def test_dihedral_is_the_group_of_eight() -> None:
    a = np.arange(12).reshape(3, 4)
    outs = [dihedral(a, k) for k in range(8)]
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8
    assert np.array_equal(dihedral(a, 1), np.rot90(a))
    assert np.array_equal(dihedral(a, 4), a[:, ::-1])
    with pytest.raises(ValueError):
        dihedral(a, 8)


def _compress(img: np.ndarray, p: int) -> np.ndarray:
    """A toy compressor: the code of a p x p patch is its pixels, flattened -> (p*p, H/p, W/p)."""
    h, w = img.shape[0] // p, img.shape[1] // p
    return img.reshape(h, p, w, p).transpose(1, 3, 0, 2).reshape(p * p, h, w)


def test_training_view_of_a_dihedral_store_is_the_transformed_slide(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    p, h, w = 2, 4, 4
    img = rng.normal(size=(h * p, w * p)).astype(np.float32)
    # variant k: the code of dihedral(patch, k) at each patch's own cell (the store contract)
    variants = np.stack(
        [
            np.stack(
                [
                    np.stack([dihedral(img[y * p : (y + 1) * p, x * p : (x + 1) * p], k).ravel() for x in range(w)], -1)
                    for y in range(h)
                ],
                -2,
            )
            for k in range(8)
        ]
    )  # (8, p*p, h, w)
    assert np.allclose(variants[0], _compress(img, p))
    src = SlideSource.open(_store(tmp_path / "d.zarr", variants))
    seen = set()
    for _ in range(40):
        f, m, k = training_view(src, h, rng)
        seen.add(k)
        want = _compress(np.ascontiguousarray(dihedral(img, k)), p)
        assert np.allclose(f, want.astype(np.float16).astype(np.float32), atol=1e-6), k
        assert m.all()
    assert seen == set(range(8))
    # a 1-variant store: only the grid moves, the codes inside stay as they are (the weaker choice)
    one = SlideSource.open(_store(tmp_path / "o.zarr", variants[0]))
    f, _, k = training_view(one, h, np.random.default_rng(5))
    assert np.allclose(f, dihedral(variants[0].astype(np.float16).astype(np.float32), k))
    f0, _, k0 = training_view(one, h, np.random.default_rng(5), augment=False)
    assert k0 == 0 and np.allclose(f0, variants[0].astype(np.float16))


# ----------------------------------------------------------------------------- labels + stores


def _cohort_dir(tmp_path: Path, ids: list[str]) -> Path:
    d = tmp_path / "stores"
    d.mkdir()
    for i, s in enumerate(ids):
        _store(d / f"{s}.zarr", np.full((2, 4, 4), i, np.float32))
    return d


def test_load_cohort_groups_slides_by_patient_and_accepts_paths(tmp_path: Path) -> None:
    d = _cohort_dir(tmp_path, ["a1", "a2", "b1", "c1"])
    csv = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "slide": ["/data/wsi/a1.svs", "a2", "b1.ome.tiff", "stores/c1.zarr"],
            "patient": ["A", "A", "B", "C"],
            "score": [1.5, 1.5, 2.0, 3.0],
        }
    ).to_csv(csv, index=False)
    co = load_cohort(d, LabelSpec(csv, "regression", target="score"))
    assert co.patients == ["A", "B", "C"]
    assert co.slide_ids == ["a1", "a2", "b1", "c1"]
    assert list(co.slide_patient) == [0, 0, 1, 2]
    assert np.allclose(co.y, [1.5, 2.0, 3.0])
    assert list(co.slides_of([0, 2])) == [0, 1, 3]


def test_missing_labels_are_dropped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = _cohort_dir(tmp_path, ["a", "b", "c", "d"])
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide": list("abcd"), "patient": list("PQRS"), "y": ["0", "1", None, "1"]}).to_csv(csv, index=False)
    with caplog.at_level("WARNING", logger="nic.learn.data"):
        co = load_cohort(d, LabelSpec(csv, "binary", target="y"))
    assert "1 of 4 rows have a missing label" in caplog.text
    assert co.patients == ["P", "Q", "S"] and co.classes == ["0", "1"]
    assert list(co.y) == [0, 1, 1]


@pytest.mark.parametrize(
    ("rows", "spec_kw", "match"),
    [
        ({"slide": ["a", "b", "zz"], "patient": ["P", "Q", "R"], "y": [1, 2, 3]}, {}, "zz"),  # no store for zz
        ({"slide": ["a"], "patient": ["P"], "y": [1]}, {}, r"store\(s\) in .* have no row.*b"),  # b has no row
        ({"slide": ["a", "b"], "patient": ["P", "Q"], "other": [1, 2]}, {}, "missing column.*'y'"),
        ({"slide": ["a", "b"], "patient": ["P", "P"], "y": [1, 2]}, {}, "different labels.*P"),
        ({"slide": ["a", "b"], "patient": ["P", "Q"], "y": [1, "x"]}, {}, "must be numeric"),
    ],
)
def test_bad_labels_are_data_errors(tmp_path: Path, rows: dict, spec_kw: dict, match: str) -> None:
    d = _cohort_dir(tmp_path, ["a", "b"])
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    kw = {"task": "regression", "target": "y", **spec_kw}
    with pytest.raises(DataError, match=match):
        load_cohort(d, LabelSpec(csv, **kw))


@pytest.mark.parametrize("second", ["/data/wsi/a.svs", "a ", "stores/a.zarr"])
def test_one_slide_written_two_ways_is_a_duplicate(tmp_path: Path, second: str) -> None:
    # a path and an id (or a trailing space) name one store: on two rows it would sit in train and test
    d = _cohort_dir(tmp_path, ["a", "b"])
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide": ["a", "b", second], "patient": ["P", "Q", "R"], "y": [1, 2, 3]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"slide 'a' is listed more than once \(row 2 'a', row 4 .*\)"):
        load_cohort(d, LabelSpec(csv, "regression", target="y"))


def test_patients_and_classes_are_stripped_as_slide_ids_are(tmp_path: Path) -> None:
    # "P " is patient P: as a second patient its slide could land in another fold than P's
    d = _cohort_dir(tmp_path, ["a", "b", "c"])
    csv = tmp_path / "labels.csv"
    rows = {"slide": ["a", "b", "c "], "patient": ["P", "P ", " Q"], "y": ["x", "x ", " z"]}
    pd.DataFrame(rows).to_csv(csv, index=False)
    co = load_cohort(d, LabelSpec(csv, "binary", target="y"))
    assert co.patients == ["P", "Q"] and list(co.slide_patient) == [0, 0, 1] and co.classes == ["x", "z"]


def test_missing_class_labels_and_a_class_named_none(tmp_path: Path) -> None:
    d = _cohort_dir(tmp_path, ["a", "b", "c", "d", "e", "f"])
    csv = tmp_path / "labels.csv"
    # R writes NA for a missing string: left out with the warning; "None" names a class
    grades = ["None", "NA", "null", "N/A", "Mild", ""]
    pd.DataFrame({"slide": list("abcdef"), "patient": list("PQRSTU"), "grade": grades}).to_csv(csv, index=False)
    co = load_cohort(d, LabelSpec(csv, "binary", target="grade"), require_all_stores=False)
    assert co.patients == ["P", "T"] and co.classes == ["Mild", "None"]
    # an event column as pandas or R write a boolean
    events = ["True", "FALSE", "true", "False", "TRUE", "0"]
    pd.DataFrame({"slide": list("abcdef"), "patient": list("PQRSTU"), "t": [5, 4, 3, 2, 1, 6], "e": events}).to_csv(
        csv, index=False
    )
    co = load_cohort(d, LabelSpec(csv, "survival", time="t", event="e"))
    assert co.y.tolist() == [1, 0, 1, 0, 1, 0]
    # numbers: "NA" (as R writes it) and an empty cell are missing labels, left out with the warning
    ys = ["1", "NA", "", "2", " 3 ", "4"]
    pd.DataFrame({"slide": list("abcdef"), "patient": list("PQRSTU"), "y": ys}).to_csv(csv, index=False)
    co = load_cohort(d, LabelSpec(csv, "regression", target="y"), require_all_stores=False)
    assert co.patients == ["P", "S", "T", "U"] and np.allclose(co.y, [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("task", "cols", "bad"),
    [("regression", {"target": "y"}, "y"), ("survival", {"time": "t", "event": "e"}, "t"),
     ("survival", {"time": "t", "event": "e"}, "e")],
)  # fmt: skip
def test_non_finite_numeric_labels_are_data_errors(tmp_path: Path, task: str, cols: dict, bad: str) -> None:
    d = _cohort_dir(tmp_path, ["a", "b", "c"])
    csv = tmp_path / "labels.csv"
    rows = {"slide": list("abc"), "patient": list("PQR"), "y": ["1", "2", "3"], "t": ["1", "2", "3"], "e": ["1"] * 3}
    rows[bad] = ["1", "-inf" if bad == "e" else "inf", "1"]
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(DataError, match=rf"column '{bad}' must be finite; found '-?inf' in row 3"):
        load_cohort(d, LabelSpec(csv, task, **cols))  # type: ignore[arg-type]


def test_the_slide_column_can_be_the_patient_column(tmp_path: Path) -> None:
    d = _cohort_dir(tmp_path, ["a", "b", "c"])
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide": ["a", "/data/b.svs", "c"], "y": [1.0, 2.0, 3.0]}).to_csv(csv, index=False)
    co = load_cohort(d, LabelSpec(csv, "regression", target="y", patient_column="slide"))
    assert co.patients == ["a", "b", "c"] and list(co.slide_patient) == [0, 1, 2]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task": "survival", "target": "y"}, "task 'survival' needs `time` and `event`"),
        ({"task": "regression"}, "task 'regression' needs `target`"),
        ({"task": "ordinal", "target": "y"}, "`task` 'ordinal' is not a task"),
    ],
)
def test_a_label_spec_that_does_not_fit_its_task_is_refused_when_made(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        LabelSpec(tmp_path / "labels.csv", **kw)


# ----------------------------------------------------------------------------- folds and batches


def _fold_cohort(tmp_path: Path, task: str) -> object:
    rng = np.random.default_rng(3)
    ids, patients = [], []
    for p in range(30):
        for j in range(1 + p % 3):  # 1-3 slides per patient
            ids.append(f"s{p:02d}_{j}")
            patients.append(f"p{p:02d}")
    d = _cohort_dir(tmp_path, ids)
    y = {f"p{p:02d}": int(v) for p, v in enumerate(rng.permutation(np.arange(30) % 3 == 0))}
    t = {f"p{p:02d}": float(v) for p, v in enumerate(rng.exponential(size=30))}
    csv = tmp_path / "labels.csv"
    pd.DataFrame(
        {"slide": ids, "patient": patients, "y": [y[p] for p in patients], "t": [t[p] for p in patients]}
    ).to_csv(csv, index=False)
    spec = LabelSpec(csv, task, target="y") if task != "survival" else LabelSpec(csv, "survival", time="t", event="y")  # type: ignore[arg-type]
    return load_cohort(d, spec)


@pytest.mark.parametrize("task", ["binary", "survival"])
def test_folds_are_by_patient_and_stratified(tmp_path: Path, task: str) -> None:
    co = _fold_cohort(tmp_path, task)
    folds = patient_folds(co, 5, seed=0)  # type: ignore[arg-type]
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested) == list(range(30))  # every patient tested exactly once
    for tr, te in folds:
        assert not set(tr) & set(te)
        tr_s, te_s = co.slides_of(tr), co.slides_of(te)  # type: ignore[attr-defined]
        assert not set(co.slide_patient[tr_s]) & set(co.slide_patient[te_s])  # type: ignore[attr-defined]
        assert co.y[te].sum() >= 1  # type: ignore[attr-defined]  # 10 positives (events) over 5 folds
        fit, val = inner_split(co, tr, 0.2, seed=1)  # type: ignore[arg-type]
        assert not set(fit) & set(val) and set(fit) | set(val) == set(tr) and len(val) > 0
        # a fraction smaller than one patient of 9 still gives a split (one validation patient)
        fit, val = inner_split(co, tr[:9], 0.05, seed=1)  # type: ignore[arg-type]
        assert len(val) == 1 and set(fit) | set(val) == set(tr[:9])
    assert [list(te) for _, te in folds] == [list(te) for _, te in patient_folds(co, 5, seed=0)]  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="`folds` must be at least 2"):
        patient_folds(co, 1)  # type: ignore[arg-type]


def test_event_batches_hold_an_event_each() -> None:
    rng = np.random.default_rng(4)
    for n, n_ev, bs in [(50, 5, 8), (33, 20, 16), (7, 1, 4), (40, 3, 4)]:
        ev = np.zeros(n, int)
        ev[rng.choice(n, n_ev, replace=False)] = 1
        batches = event_batches(ev, bs, rng)
        assert sorted(np.concatenate(batches)) == list(range(n))
        assert all(ev[b].sum() >= 1 and len(b) >= 2 for b in batches)
        assert max(len(b) for b in batches) - min(len(b) for b in batches) <= 1
    with pytest.raises(DataError):
        event_batches(np.zeros(5), 2, rng)


def test_crops_read_from_disk_equal_cached_crops(tmp_path: Path) -> None:
    from nic.learn.data import open_sources

    rng = np.random.default_rng(6)
    f = rng.normal(size=(8, 3, 9, 11)).astype(np.float16)
    p = _store(tmp_path / "v.zarr", f)
    (cached,) = open_sources([p])
    (disk,) = open_sources([p], cache_bytes=0)
    assert cached.cache and not disk.cache
    for y0, x0, k in [(-2, -3, 0), (3, 4, 5), (0, 0, 7)]:
        a, ma = cached.crop(y0, x0, 6, k)
        b, mb = disk.crop(y0, x0, 6, k)
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert disk._array is None


def test_dihedral_matches_the_compressor_variant_order() -> None:
    from nic.compress import dihedral_patch  # variant k of a store is the code of dihedral_patch(patch, k)

    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)  # (H, W, RGB)
    for k in range(8):
        chw = dihedral(img.transpose(2, 0, 1), k)
        assert np.array_equal(dihedral_patch(img, k), chw.transpose(1, 2, 0)), k


def test_inner_split_puts_an_event_in_survival_validation() -> None:
    from nic.learn.data import Cohort

    n = 20
    for seed in range(10):
        for n_ev in (1, 2, 3):
            ev = np.zeros(n, np.int64)
            ev[np.random.default_rng(seed).choice(n, n_ev, replace=False)] = 1
            co = Cohort(
                "survival",
                [f"p{i}" for i in range(n)],
                ev,
                [f"s{i}" for i in range(n)],
                [],
                np.arange(n),
                time=np.linspace(1, 2, n),
            )
            fit, val = inner_split(co, np.arange(n), 0.2, seed=seed)
            assert sorted(np.concatenate([fit, val])) == list(range(n)) and len(val) == 4
            assert ev[fit].sum() >= 1  # the fit part keeps an event
            if n_ev >= 2:
                assert ev[val].sum() >= 1, (seed, n_ev)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 0}, "`batch_size`.*at least 2"),
        ({"batch_size": 1}, "`batch_size`.*at least 2"),
        ({"epochs": 0}, "`epochs`.*at least 1"),
        ({"lr": -1.0}, "`lr`.*greater than 0"),
        ({"lr": 0.0}, "`lr`.*greater than 0"),
        ({"lr": float("nan")}, "`lr`.*greater than 0"),
        ({"ties": "exact"}, "`ties` must be one of efron, breslow"),
        ({"pool": "sum"}, "`pool` must be one of"),
    ],
)
def test_fit_config_checks_its_numbers(kw: dict, match: str) -> None:
    from nic.learn import FitConfig

    with pytest.raises(OptionError, match=match):
        FitConfig(**kw)


def test_fit_config_is_pure_the_device_is_checked_where_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructing a config probes no device; training and the CLI refuse a missing one."""
    import torch

    from nic._device import torch_device as resolve_device
    from nic.learn import FitConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = FitConfig(device="cuda")  # no error: nothing is probed here
    with pytest.raises(OptionError, match="`device` 'cuda' asked for, but torch sees no CUDA device"):
        resolve_device(cfg.device)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"folds": 1}, "`folds`.*at least 2"),
        ({"threads": -1}, "`threads`.*at least 1"),
        ({"threads": 0}, "`threads`.*at least 1"),
    ],
)
def test_cv_config_checks_its_numbers(tmp_path: Path, kw: dict, match: str) -> None:
    from nic.learn import CVConfig

    with pytest.raises(OptionError, match=match):
        CVConfig(tmp_path, LabelSpec(tmp_path / "l.csv", "regression", target="y"), **kw)


@pytest.mark.parametrize("n,batch", [(17, 16), (33, 16), (16, 16), (3, 2), (2, 16)])
def test_plain_batches_cover_every_slide_once_with_no_single_slide_batch(n, batch):
    from nic.learn.train import _plain_batches

    out = _plain_batches(n, batch, np.random.default_rng(0))
    assert sorted(np.concatenate(out).tolist()) == list(range(n))
    assert all(len(b) >= 2 for b in out)
