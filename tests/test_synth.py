"""nic.synth: generated slides open at 0.5 um/px, labels come from what was drawn."""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import nic
from nic.errors import DataError, OptionError, OutputError
from nic.metrics import c_index
from nic.synth import (
    CLASSES,
    TISSUE_CLASSES,
    CohortConfig,
    MosaicConfig,
    TileLibrary,
    make_cohort,
    make_mosaic_cohort,
    make_patch_datasets,
    plan_cohort,
    write_pyramid,
)
from nic.synth._tiff import level_sizes

SMALL = CohortConfig(variants=2, transforms=4)
LABEL_COLUMNS = {
    "slide",
    "patient",
    "proliferation",
    "growth_pattern",
    "survival_time",
    "survival_event",
    "tumour_fraction",
    "tumour_burden",
    "stroma_fraction",
    "rim_contact",
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A read-only cohort of three small slides (6144 x 4096 px)."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), 3, (6144, 4096), seed=5, config=SMALL)


def _saturation(rgb: np.ndarray) -> float:
    x = rgb.reshape(-1, 3).astype(float)
    mx, mn = x.max(1), x.min(1)
    return float(np.mean((mx - mn) / np.maximum(mx, 1)))


# -- slides ---------------------------------------------------------------------------------


def test_slides_open_in_openslide_at_half_micron(cohort) -> None:  # type: ignore[no-untyped-def]
    assert [p.name for p in cohort.slides] == ["slide_0000.tiff", "slide_0001.tiff", "slide_0002.tiff"]
    for path in cohort.slides:
        osr = openslide.OpenSlide(str(path))
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        # halving until the larger side is below 1024 px
        assert osr.level_dimensions == ((6144, 4096), (3072, 2048), (1536, 1024), (768, 512))
        assert [round(d) for d in osr.level_downsamples] == [1, 2, 4, 8]
        osr.close()
        with nic.open_slide(path) as s:
            assert s.mpp == (0.5, 0.5)
            assert s.dimensions == (6144, 4096)
            assert len(s.levels) == 4


def test_size_rounds_up_to_whole_tiles(tmp_path: Path) -> None:
    plans = plan_cohort(1, (4100, 4096), seed=0)
    assert (plans[0].row["width"], plans[0].row["height"]) == (4352, 4096)
    assert level_sizes(40192, 40192) == [(40192 >> k, 40192 >> k) for k in range(7)]
    with pytest.raises(OptionError, match=r"^`size` must be between 4096 and .* \(got 1000\)$"):
        make_cohort(tmp_path, 1, 1000, seed=0)


def test_tifffile_and_openslide_pixels_agree(cohort) -> None:  # type: ignore[no-untyped-def]
    path = cohort.slides[0]
    osr = openslide.OpenSlide(str(path))
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == 4
        for level in (0, 1, 3):
            page = tf.pages[level]
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
            assert int(page.compression) == 7 and int(page.photometric) == 6  # JPEG, YCbCr
            ref = page.asarray()
            w, h = osr.level_dimensions[level]
            assert ref.shape == (h, w, 3)
            x0, y0 = min(256, w // 4), min(256, h // 4)
            box = (min(w - x0, 1024), min(h - y0, 1024))
            ds = round(osr.level_downsamples[level])
            got = np.asarray(osr.read_region((x0 * ds, y0 * ds), level, box))[..., :3]
            want = ref[y0 : y0 + box[1], x0 : x0 + box[0]]
            assert np.abs(got.astype(float) - want).mean() < 1.0
    osr.close()


def test_lower_levels_are_downsamples_of_level_0(cohort) -> None:  # type: ignore[no-untyped-def]
    with tifffile.TiffFile(cohort.slides[1]) as tf:
        l0 = tf.pages[0].asarray()[:2048, :2048].astype(np.float32)
        l1 = tf.pages[1].asarray()[:1024, :1024].astype(np.float32)

    def blocks(x: np.ndarray, b: int) -> np.ndarray:
        return x.reshape(x.shape[0] // b, b, x.shape[1] // b, b, 3).mean((1, 3))

    # the same picture at half the size, up to JPEG noise (compared on 16-px blocks of level 1)
    assert np.abs(blocks(l0, 32) - blocks(l1, 16)).mean() < 1.0


def test_class_map_truth_matches_pixels(cohort) -> None:  # type: ignore[no-untyped-def]
    path = cohort.slides[0]
    classes = np.asarray(Image.open(cohort.out / "truth" / "slide_0000.classes.png"))
    assert classes.shape == (16, 24)  # tiles of 256 px: rows, cols
    with nic.open_slide(path) as s:

        def tile(cid: int) -> np.ndarray:
            r, c = np.argwhere(classes == cid)[0]
            return s.read_region((int(c) * 256, int(r) * 256), (256, 256), mpp=0.5)

        bg, tumour = tile(CLASSES.index("background")), tile(CLASSES.index("tumour"))
        normal, stroma = tile(CLASSES.index("normal")), tile(CLASSES.index("stroma"))
    assert 235 <= bg.mean() <= 252 and _saturation(bg) < 0.05
    assert tumour.mean() < normal.mean() < bg.mean()  # dense dark nuclei
    assert _saturation(tumour) > 0.2 and _saturation(stroma) > 0.15
    b_minus_r = lambda x: float(x[..., 2].mean() - x[..., 0].mean())  # noqa: E731
    assert b_minus_r(tumour) > b_minus_r(stroma)  # haematoxylin-blue vs eosin-pink


# -- labels ---------------------------------------------------------------------------------


def test_labels_table(cohort) -> None:  # type: ignore[no-untyped-def]
    rows = _read_csv(cohort.labels)
    assert LABEL_COLUMNS <= set(rows[0])
    assert [r["slide"] for r in rows] == [p.stem for p in cohort.slides]
    for r in rows:
        assert r["growth_pattern"] in {"0", "1"} and r["survival_event"] in {"0", "1"}
        assert float(r["survival_time"]) > 0 and float(r["proliferation"]) >= 0
        assert 0 < float(r["tumour_fraction"]) < 0.6
        assert float(r["rim_contact"]) == float(r["growth_pattern"])  # truth from the class map


def test_growth_pattern_is_spatial_not_compositional() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    rows = [p.row for p in plan_cohort(60, 8192, seed=11)]
    y = np.array([r["growth_pattern"] for r in rows])
    assert 15 <= y.sum() <= 45
    fractions = np.array([[r[f"{c}_fraction"] for c in TISSUE_CLASSES] for r in rows])
    prob = cross_val_predict(LogisticRegression(max_iter=2000), fractions, y, cv=5, method="predict_proba")[:, 1]
    assert roc_auc_score(y, prob) < 0.7  # the amounts of tissue do not tell the class
    for i in range(fractions.shape[1]):
        auc = roc_auc_score(y, fractions[:, i])
        assert 0.25 < auc < 0.75, TISSUE_CLASSES[i]
    contact = np.array([r["rim_contact"] for r in rows])
    assert roc_auc_score(y, contact) == 1.0  # while the layout tells it exactly


def test_patient_labels_follow_what_was_drawn() -> None:
    from scipy.stats import spearmanr

    plans = plan_cohort(240, 4096, seed=3)
    rows = [p.row for p in plans]
    patients: dict[str, list[dict]] = {}
    for r in rows:
        patients.setdefault(r["patient"], []).append(r)
    two = sum(len(v) == 2 for v in patients.values()) / len(patients)
    assert 0.15 <= two <= 0.2
    for rs in patients.values():  # patient labels are shared by the patient's slides
        for key in ("proliferation", "growth_pattern", "survival_time", "survival_event", "tumour_burden"):
            assert len({r[key] for r in rs}) == 1
    first = [rs[0] for rs in patients.values()]
    # proliferation = drawn figures / tumour area (mm2) over the patient's slides
    for rs in patients.values():
        mit = sum(r["mitoses"] for r in rs)
        area = sum(r["tumour_tiles"] for r in rs) * (0.128**2)
        assert rs[0]["proliferation"] == pytest.approx(mit / area)
    prolif = np.array([r["proliferation"] for r in first])
    assert prolif.max() / max(prolif.min(), 1e-9) > 10  # a wide range
    assert spearmanr(prolif, [r["mitosis_rate"] for r in first])[0] > 0.85
    time_, event = np.array([r["survival_time"] for r in first]), np.array([r["survival_event"] for r in first])
    assert 0.2 <= 1 - event.mean() <= 0.42  # about 30% censored
    c = c_index(time_, event, np.array([r["tumour_burden"] for r in first]))
    assert 0.74 <= c <= 0.9


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def digest(out: Path) -> list[str]:
        files = sorted(p for p in out.rglob("*") if p.is_file())
        return [f"{p.relative_to(out)}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]

    a = make_cohort(tmp_path / "a", 2, 4096, seed=9, config=SMALL)
    b = make_cohort(tmp_path / "b", 2, 4096, seed=9, config=SMALL, workers=2)  # processes: same bytes
    c = make_cohort(tmp_path / "c", 2, 4096, seed=10, config=SMALL)
    assert digest(a.out) == digest(b.out)
    assert a.slides[0].read_bytes() != c.slides[0].read_bytes()
    with pytest.raises(OutputError, match="already holds a cohort; pass `overwrite=True`"):
        make_cohort(tmp_path / "a", 1, 4096, seed=9, config=SMALL)


def test_write_pyramid_reuses_encoded_tiles(tmp_path: Path) -> None:
    tiles = [np.full((256, 256, 3), v, np.uint8) for v in (245, 120, 60)]
    lib = TileLibrary.from_tiles(tiles, [True, False, False], quality=90)
    entries = np.array([[0, 1, 2, 0], [2, 1, 0, 0], [0, 0, 0, 0]])
    stats = write_pyramid(tmp_path / "x.tiff", entries, lib)
    assert stats.levels == [(1024, 768), (512, 384)]
    raw = (tmp_path / "x.tiff").read_bytes()
    with tifffile.TiffFile(tmp_path / "x.tiff") as tf:
        page = tf.pages[0]
        for i, e in enumerate(entries.ravel()):  # level 0 holds the library's bytes unchanged
            start = page.dataoffsets[i]
            assert raw[start : start + page.databytecounts[i]] == lib.jpeg[e]
        l1 = tf.pages[1].asarray()
    assert abs(float(l1[:128, 128:256].mean()) - 120) < 2  # entry 1 downsampled into level 1


# -- patches --------------------------------------------------------------------------------


def test_patch_datasets_layout(tmp_path: Path) -> None:
    d = make_patch_datasets(tmp_path, n=4, seed=1)
    assert sorted(p.name for p in d.tissue_type.iterdir() if p.is_dir()) == sorted(TISSUE_CLASSES)
    for cls in TISSUE_CLASSES:
        files = sorted((d.tissue_type / cls).glob("*.png"))
        assert len(files) == 4
        assert np.asarray(Image.open(files[0])).shape == (128, 128, 3)
    for csv_path in (d.nuclei_density, d.mitosis):
        rows = _read_csv(csv_path)
        assert list(rows[0]) == ["path", "label", "group"] and len(rows) == 4
        for r in rows:
            assert (csv_path.parent / r["path"]).is_file()
            float(r["label"])
    assert {r["label"] for r in _read_csv(d.mitosis)} == {"0", "1"}
    assert not (tmp_path / "mitosis.csv").read_text().count("nuclei_density/")


def test_nuclei_density_label_counts_drawn_nuclei() -> None:
    from nic.synth import draw_tile

    rng = np.random.default_rng(0)
    lymph = draw_tile("lymphocytes", rng, 128).nuclei
    stroma = draw_tile("stroma", rng, 128).nuclei
    fat = draw_tile("fat", rng, 128).nuclei
    assert lymph > 40 > stroma and fat < 10
    tumour = draw_tile("tumour", rng, 128, mitoses=1)
    assert tumour.mitoses == 1 and tumour.nuclei > 5


def _files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt(*args: object, **kwargs: object) -> None:
    raise _Interrupt


def test_interrupted_overwrite_keeps_the_old_cohort_and_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--overwrite once deleted the old slides first and wrote labels.csv last: a rerun
    stopped in between left new slides beside the old labels."""
    import nic.synth._cohort as cohort_mod
    import nic.synth._patches as patches_mod

    cohort, patches = tmp_path / "c", tmp_path / "p"
    make_cohort(cohort, 2, 4096, seed=3, config=SMALL)
    make_patch_datasets(patches, n=2, seed=1)
    before = _files(cohort), _files(patches)
    monkeypatch.setattr(cohort_mod, "write_labels", _interrupt)  # stopped after every slide was drawn
    with pytest.raises(_Interrupt):
        make_cohort(cohort, 2, 4096, seed=4, config=SMALL, overwrite=True)
    monkeypatch.setattr(patches_mod, "_write_csv", _interrupt)
    with pytest.raises(_Interrupt):
        make_patch_datasets(patches, n=2, seed=2, overwrite=True)
    assert (_files(cohort), _files(patches)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p"]  # no partial folder left
    monkeypatch.undo()
    c = make_cohort(cohort, 1, 4096, seed=4, config=SMALL, overwrite=True)  # replaced whole: one slide now
    assert c.out == cohort and c.slides == [cohort / "slides" / "slide_0000.tiff"]
    assert sorted(p.name for p in (cohort / "slides").iterdir()) == ["slide_0000.tiff"]
    assert len(_read_csv(c.labels)) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a cohort")
    with pytest.raises(OutputError, match="holds files nic did not write"):
        make_cohort(tmp_path / "mine", 1, 4096, seed=4, config=SMALL, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a cohort"
    # a cohort with a file of the user's beside it (labels.csv is also a user's file name) is not nic's to replace
    (cohort / "my_clinical.xlsx").write_text("the user's")
    with pytest.raises(OutputError, match="holds files nic did not write"):
        make_cohort(cohort, 1, 4096, seed=5, config=SMALL, overwrite=True)
    assert (cohort / "my_clinical.xlsx").exists()


def test_synth_refuses_a_negative_seed_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nic.cli import app

    for cmd in (["cohort", str(tmp_path / "c"), "--slides", "1", "--size", "4096"], ["patches", str(tmp_path / "p")]):
        res = CliRunner().invoke(app, ["synth", *cmd, "--seed", "-1"])
        assert res.exit_code == 2 and res.output == "error: --seed must be an integer of at least 0 (got -1)\n"
    assert not any(tmp_path.iterdir())


# -- mosaic ---------------------------------------------------------------------------------


def test_mosaic_on_lc25000_tiles(shared: Path, tmp_path: Path) -> None:
    tiles = shared / "data" / "patches" / "lc25000_lung_224"
    c = make_mosaic_cohort(tmp_path, tiles, n_slides=4, seed=2, size=4096, config=MosaicConfig(pool=12))
    rows = _read_csv(c.labels)
    assert {"slide", "patient", "clustered", "tumour_fraction", "survival_time", "survival_event"} <= set(rows[0])
    for r, path in zip(rows, c.slides, strict=True):
        with nic.open_slide(path) as s:
            assert s.mpp == (0.5, 0.5) and s.vendor == "generic-tiff"
        contact = float(r["tumour_contact"])
        assert contact > 0.6 if r["clustered"] == "1" else contact == 0.0
    # tiles are used as encoded once: a tumour tile's bytes recur in the slide
    with tifffile.TiffFile(c.slides[0]) as tf:
        counts = tf.pages[0].databytecounts
    assert len(set(counts)) < len(counts) / 4
    # an interrupted --overwrite leaves the cohort as it was
    import nic.synth._mosaic as mosaic_mod

    before = _files(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mosaic_mod, "write_labels", _interrupt)
        with pytest.raises(_Interrupt):
            make_mosaic_cohort(tmp_path, tiles, n_slides=2, seed=3, size=4096, config=MosaicConfig(pool=12),
                               overwrite=True)  # fmt: skip
    assert _files(tmp_path) == before


def test_mosaic_bad_input(tmp_path: Path, shared: Path) -> None:
    with pytest.raises(DataError, match="tile folder not found"):
        make_mosaic_cohort(tmp_path / "o", tmp_path / "missing")
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match="labels CSV not found"):
        make_mosaic_cohort(tmp_path / "o", tmp_path / "t")
    (tmp_path / "t" / "labels.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="needs columns 'path' and 'label'"):
        make_mosaic_cohort(tmp_path / "o", tmp_path / "t")
    tiles = shared / "data" / "patches" / "lc25000_lung_224"
    with pytest.raises(DataError, match="lung_n.*`tumour` and `normal`"):
        make_mosaic_cohort(tmp_path / "o", tiles, config=MosaicConfig(tumour=("carcinoma",)))


# -- command line ---------------------------------------------------------------------------


def test_cli_synth(tmp_path: Path, shared: Path) -> None:
    from typer.testing import CliRunner

    from nic.cli import app

    runner = CliRunner()
    for cmd in (
        ["synth", "--help"],
        ["synth", "cohort", "--help"],
        ["synth", "patches", "--help"],
        ["synth", "mosaic", "--help"],
    ):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["synth", "cohort", str(tmp_path / "c"), "--slides", "1", "--size", "4096", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "slides" / "slide_0000.tiff").is_file() and (tmp_path / "c" / "labels.csv").is_file()
    res = runner.invoke(app, ["synth", "patches", str(tmp_path / "p"), "--n", "2", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert len(_read_csv(tmp_path / "p" / "mitosis.csv")) == 2
    res = runner.invoke(app, ["synth", "mosaic", str(tmp_path / "m"), "--tiles", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "nope" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["synth", "cohort", str(tmp_path / "x"), "--size", "10"])
    assert res.exit_code == 2 and "--size" in res.output


@pytest.mark.slow
def test_40k_slide_under_a_minute(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    c = make_cohort(tmp_path, 1, 40000, seed=0)
    assert time.perf_counter() - t0 < 60
    with nic.open_slide(c.slides[0]) as s:
        assert s.dimensions == (40192, 40192) and len(s.levels) == 7
