"""Feature bags of TRIDENT, CLAM and STAMP: nic stores -> export -> import round trips on
the real CMU slide, the exported files read back by mirrors of each tool's own loader,
files laid out the way each tool writes them, refusals of ambiguous geometry, snapping,
and imported bags through ``nic train``, ``nic predict`` and ``nic heatmap``.

The peers are not installable here; each ``_*_loader`` below does what the named file of
the tool does with a file (read in mahmoodlab/TRIDENT, mahmoodlab/CLAM, KatherLab/STAMP).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nic.bags import export_stores, import_bags, place_on_grid
from nic.cli import app
from nic.errors import DataError, OutputError
from nic.store import check_same_encoder, open_store

FORMATS = ["trident", "clam", "stamp"]


@pytest.fixture(scope="module")
def cmu(wsi_dir: Path) -> Path:
    return wsi_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory, shared: Path, cmu: Path, keras_dir: Path) -> Path:
    """The CMU slide compressed with the published multitask encoder (folder of one store)."""
    from nic.compress import compress_slide

    out = tmp_path_factory.mktemp("cmu")
    compress_slide(cmu, keras_dir / "encoder_multitask-4.h5", out, workers=0)
    return out


# ----------------------------------------------------------------------------- peer loaders


def _trident_loader(path: Path) -> dict:
    """TRIDENT ``IO.read_coords`` + ``WSI.extract_slide_features``'s read, and the level-0
    patch side its ``WSIPatcher`` derives (10 / magnification um/px)."""
    with h5py.File(path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
        feats = f["features"][:]
        encoder = f["features"].attrs["encoder"]
    for key in ("patch_size", "level0_magnification", "target_magnification"):
        assert attrs.get(key) is not None, key
    src_px, dst_px = 10 / attrs["level0_magnification"], 10 / attrs["target_magnification"]
    patch_src = round(attrs["patch_size"] * dst_px / src_px)
    step = patch_src - round(attrs["overlap"] * dst_px / src_px)
    return {"coords": coords, "features": feats, "patch_level0": patch_src, "step": step, "encoder": encoder, **attrs}


def _clam_loader(root: Path, slide_id: str) -> dict:
    """CLAM ``Generic_MIL_Dataset.__getitem__`` (pt_files without h5, h5_files with) and the
    patch geometry ``Whole_Slide_Bag_FP`` reads from the patching file."""
    import torch

    pt = torch.load(root / "pt_files" / f"{slide_id}.pt")  # CLAM's own call (weights_only by default)
    with h5py.File(root / "h5_files" / f"{slide_id}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
    with h5py.File(root / "patches" / f"{slide_id}.h5", "r") as f:
        level, size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        patch_coords = f["coords"][:]
    return {"pt": pt.numpy(), "features": feats, "coords": coords, "patch_coords": patch_coords, "level": level,
            "patch_size": size}  # fmt: skip


def _stamp_loader(path: Path, stamp_version: str = "2.5.0") -> dict:
    """STAMP ``modeling/data.py``: ``get_coords`` (micrometre coordinates, tile size from
    ``tile_size_um``, version check), ``CoordsInfo.mpp``, ``detect_feature_type`` and the
    bag's ``feats`` read with ``[()]``."""
    from packaging.version import Version

    with h5py.File(path, "r") as f:
        feats = f["feats"][()]
        coords_um = f["coords"][:]
        tile_um = f.attrs.get("tile_size_um")
        tile_px = int(f.attrs["tile_size_px"])
        assert Version(f.attrs["stamp_version"]) <= Version(stamp_version)
        feat_type = str(f.attrs.get("feat_type"))
    assert tile_um
    return {"feats": feats, "coords_um": coords_um, "tile_size_um": float(tile_um), "mpp": tile_um / tile_px,
            "feat_type": feat_type}  # fmt: skip


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_equal_codes_at_equal_cells(fmt: str, cmu_store: Path, tmp_path: Path, cmu: Path) -> None:
    export_stores(cmu_store, fmt, tmp_path / "bags")
    res = import_bags(tmp_path / "bags", fmt, tmp_path / "back", slides=[cmu], extractor="multitask-4")
    a = open_store(cmu_store / "CMU-1-Small-Region.zarr")
    b = open_store(res[0].store)
    assert b.grid_shape == a.grid_shape and np.array_equal(b.tissue, a.tissue)
    np.testing.assert_array_equal(b.load(), a.load())
    m = b.meta
    assert (m.mpp, m.patch, m.code_size) == (0.5, 128, 128)
    np.testing.assert_allclose(m.step, a.meta.step, atol=0.05)
    np.testing.assert_allclose(m.origin, (0, 0), atol=0.5)
    assert m.slide_checksum == a.meta.slide_checksum and m.slide_dimensions == a.meta.slide_dimensions
    assert m.encoder_name == f"imported:{fmt}:multitask-4"
    assert m.extra["source_format"] == fmt and len(m.extra["source_sha256"]) == 64
    assert Path(m.extra["source_file"]).is_file()


def test_exports_load_in_each_tool(cmu_store: Path, tmp_path: Path) -> None:
    store = open_store(cmu_store / "CMU-1-Small-Region.zarr")
    cells = np.argwhere(store.tissue)
    codes = store.load()[:, cells[:, 0], cells[:, 1]].T
    m = store.meta
    corners = np.stack([cells[:, 1] * m.step[0], cells[:, 0] * m.step[1]], 1)

    export_stores(cmu_store, "trident", tmp_path / "t")
    t = _trident_loader(tmp_path / "t" / "CMU-1-Small-Region.h5")
    np.testing.assert_array_equal(t["features"], codes)
    assert np.abs(t["coords"] - corners).max() <= 0.5 and t["coords"].dtype == np.int64
    assert t["patch_size"] == 128 and t["target_magnification"] == 20 and t["level0_magnification"] == 20
    assert abs(t["patch_level0"] - m.patch_level0[0]) <= 1 and t["step"] == t["patch_level0"]
    assert (t["level0_width"], t["level0_height"]) == (2220, 2967)
    assert t["encoder"] == "encoder_multitask-4"

    export_stores(cmu_store, "clam", tmp_path / "c")
    c = _clam_loader(tmp_path / "c", "CMU-1-Small-Region")
    np.testing.assert_array_equal(c["pt"], codes)
    np.testing.assert_array_equal(c["features"], codes)
    np.testing.assert_array_equal(c["coords"], c["patch_coords"])
    assert c["coords"].dtype == np.int32 and np.abs(c["coords"] - corners).max() <= 0.5
    assert c["level"] == 0 and c["patch_size"] == round(m.patch_level0[0])

    export_stores(cmu_store, "stamp", tmp_path / "s")
    s = _stamp_loader(tmp_path / "s" / "CMU-1-Small-Region.h5")
    np.testing.assert_array_equal(s["feats"].astype(np.float32), codes)
    assert s["feats"].dtype == np.float16 and s["feat_type"] == "tile"
    np.testing.assert_allclose(s["coords_um"], corners * m.slide_mpp[0], atol=1e-2)
    assert s["tile_size_um"] == 64.0 and s["mpp"] == 0.5


# ----------------------------------------------------------------------------- the tools' own layouts


def _write_trident(path: Path, coords: np.ndarray, feats: np.ndarray, *, patch=256, src=40, dst=20, overlap=0,
                   size=(8192, 6144), encoder="uni_v1") -> Path:  # fmt: skip
    """A features file as TRIDENT's ``save_h5`` writes it: chunks of one row, resizable,
    attributes on ``coords`` and ``features``."""
    with h5py.File(path, "w") as f:
        for key, val in (("features", feats), ("coords", coords)):
            d = f.create_dataset(key, data=val, maxshape=(None, *val.shape[1:]), chunks=(1, *val.shape[1:]))
            if key == "coords":
                attrs = {"patch_size": patch, "patch_size_level0": patch * src // dst, "level0_magnification": src,
                         "target_magnification": dst, "overlap": overlap, "name": path.stem,
                         "savetodir": str(path.parent), "level0_width": size[0], "level0_height": size[1]}  # fmt: skip
            else:
                attrs = {"name": path.stem, "savetodir": str(path.parent), "encoder": encoder}
            for k, v in attrs.items():
                d.attrs[k] = v
    return path


def _grid_coords(rows: int, cols: int, step: int, seed: int, keep: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rc = np.argwhere(rng.random((rows, cols)) < keep)
    return rc, np.stack([rc[:, 1] * step, rc[:, 0] * step], 1).astype(np.int64)


def test_trident_folder_without_slides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40x scan patched at 20x, 256 px: 512 level-0 px per cell, 0.5 um/px nominal."""
    d = tmp_path / "features_uni_v1"
    d.mkdir()
    truth = {}
    for i in range(2):
        rc, xy = _grid_coords(12, 16, 512, seed=i)
        feats = np.random.default_rng(10 + i).normal(size=(len(xy), 1024)).astype(np.float32)
        _write_trident(d / f"slide{i}.h5", xy, feats)
        truth[f"slide{i}"] = (rc, feats)
    res = import_bags(d, "trident", tmp_path / "stores")
    stores = [open_store(r.store) for r in res]
    for s in stores:
        rc, feats = truth[s.slide_id]
        assert s.grid_shape == (12, 16) and s.code_size == 1024
        np.testing.assert_array_equal(np.argwhere(s.tissue), rc)
        np.testing.assert_array_equal(s.load()[:, rc[:, 0], rc[:, 1]].T, feats.astype(np.float16).astype(np.float32))
        assert (s.meta.mpp, s.meta.patch, s.meta.step, s.meta.origin) == (0.5, 256, (512.0, 512.0), (0.0, 0.0))
        assert s.meta.encoder_name == "imported:trident:uni_v1" and s.meta.slide_path == ""
        assert s.meta.slide_dimensions == (8192, 6144) and s.meta.slide_mpp == (0.25, 0.25)
        assert s.meta.slide_mpp_source == "estimated from the trident file"
    ident = check_same_encoder(stores, tmp_path / "stores")  # one extraction, one identity
    assert ident.code_size == 1024
    assert stores[0].meta.extra["source_sha256"] != stores[1].meta.extra["source_sha256"]

    with pytest.raises(OutputError, match="already holds stores for .*; pass `overwrite=True` to replace them"):
        import_bags(d, "trident", tmp_path / "stores")

    # an interrupted overwrite leaves the stores it would replace as they were
    import nic.store

    before = {s.slide_id: (s.attrs["created"], s.load()) for s in stores}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(nic.store, "mark_complete", interrupt)
        import_bags(d, "trident", tmp_path / "stores", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["slide0.zarr", "slide1.zarr"]
    for s in map(open_store, sorted((tmp_path / "stores").iterdir())):
        assert s.attrs["created"] == before[s.slide_id][0] and np.array_equal(s.load(), before[s.slide_id][1])


def test_overlap_and_off_grid_are_refused_unless_snapped(tmp_path: Path) -> None:
    d = tmp_path / "overlap"
    d.mkdir()
    rc, _ = _grid_coords(6, 6, 1, seed=0, keep=1.0)
    xy = np.stack([rc[:, 1] * 448, rc[:, 0] * 448], 1)  # 512 px patches every 448 px: overlap 32 at 20x
    _write_trident(d / "s.h5", xy, np.ones((len(xy), 8), np.float32), overlap=32)
    with pytest.raises(DataError, match="overlap.*`snap=True`"):
        import_bags(d, "trident", tmp_path / "o1")
    [r] = import_bags(d, "trident", tmp_path / "o2", snap=True)
    s = open_store(r.store)
    assert s.meta.step == (512.0, 512.0) and r.patches + r.dropped == 36 and r.max_shift <= 256 * np.sqrt(2)

    # two tissue regions with their own grid starts (as CLAM patches contours)
    a = np.stack(np.meshgrid(np.arange(3) * 256, np.arange(3) * 256), -1).reshape(-1, 2)
    coords = np.concatenate([a, a + [2000 + 37, 1500 + 11]])
    with pytest.raises(DataError, match="off one grid.*`snap=True`"):
        place_on_grid(coords, 256.0, source="x.h5")
    p = place_on_grid(coords, 256.0, snap=True)
    assert p.dropped == 0 and len(p.cells) == 18 and p.max_shift <= 128 * np.sqrt(2)
    assert len({tuple(c) for c in p.cells}) == 18


def test_grid_fit_recovers_fractional_steps() -> None:
    """Whole-pixel corners of a 128.2565 px step (a 0.499 um/px scan at 0.5) over 400 cells."""
    k = np.arange(0, 400, 3)
    xy = np.stack([np.rint(k * 128.2565), np.rint(k[::-1] * 128.2565)], 1)
    p = place_on_grid(xy, 128.0, 128.0, size_level0=(52000, 52000))
    np.testing.assert_array_equal(p.cells[:, 1], k)
    assert abs(p.step[0] - 128.2565) < 1e-3 and p.shape == (405, 405)


@settings(max_examples=60, deadline=None)
@given(
    step=st.floats(64, 1100),
    origin=st.tuples(st.floats(-0.999, 0.999), st.floats(-0.999, 0.999)),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    integer=st.booleans(),
)
def test_grid_recovered_from_corners(step, origin, rows, cols, seed, integer) -> None:
    """Any subset of any grid (fractional step and origin, also left of / above the slide),
    its corners rounded to whole pixels or not, comes back at the same cells, origin and step."""
    rc = np.argwhere(np.random.default_rng(seed).random((rows, cols)) < 0.5)
    if len(rc) < 2:
        rc = np.unique(np.array([[0, 0], [rows - 1, cols - 1]]), axis=0)
    o = np.array(origin) * step
    xy = o + rc[:, ::-1] * step
    xy = np.rint(xy) if integer else xy
    p = place_on_grid(xy, step, step)
    shift = rc.min(0) - p.cells.min(0)
    np.testing.assert_array_equal(p.cells + shift, rc)
    assert (p.cells >= 0).all() and len({tuple(c) for c in p.cells}) == len(rc)
    if len(np.unique(rc[:, 1])) > 1:
        assert abs(p.step[0] - step) <= 1.0 / max(1, np.ptp(rc[:, 1])) + 1e-6
    np.testing.assert_allclose(p.origin[0] + (p.cells[:, 1]) * p.step[0], xy[:, 0], atol=1.0)


def test_clam_layout_and_its_ambiguities(tmp_path: Path) -> None:
    """CLAM: features in h5_files (no attributes) and pt_files; geometry in patches/."""
    import torch

    root = tmp_path / "clam"
    for sub in ("h5_files", "pt_files", "patches"):
        (root / sub).mkdir(parents=True)
    rc, xy = _grid_coords(8, 8, 1024, seed=3)  # 256 px at level 2 of a 4x pyramid (Aperio)
    xy = xy.astype(np.int32)
    feats = np.random.default_rng(0).normal(size=(len(xy), 1024)).astype(np.float32)
    with h5py.File(root / "h5_files" / "s.h5", "w") as f:
        f["features"], f["coords"] = feats, xy
    torch.save(torch.from_numpy(feats), root / "pt_files" / "s.pt")

    with pytest.raises(DataError, match="`patches_dir=DIR`.*`patch_size=PX`"):
        import_bags(root, "clam", tmp_path / "x")
    with h5py.File(root / "patches" / "s.h5", "w") as f:
        f["coords"] = xy
        for k, v in {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]),
                     "level_dim": np.array([2048, 2048]), "name": "s"}.items():  # fmt: skip
            f["coords"].attrs[k] = v
    with pytest.raises(DataError, match="pyramid level.*`slides`.*`mpp`"):
        import_bags(root, "clam", tmp_path / "x")
    [r] = import_bags(root, "clam", tmp_path / "ok", mpp=0.2527, extractor="resnet50_trunc")
    s = open_store(r.store)
    assert (s.meta.mpp, s.meta.patch, s.meta.step) == (1.0, 256, (1024.0, 1024.0))
    assert s.meta.extra["source_mpp"] == pytest.approx(1.0108)
    np.testing.assert_array_equal(np.argwhere(s.tissue), rc)
    # the .pt files alone, with coordinates from the patching folder
    shutil.rmtree(root / "h5_files")
    [r2] = import_bags(root, "clam", tmp_path / "pt", mpp=0.2527, extractor="resnet50_trunc")
    np.testing.assert_array_equal(open_store(r2.store).load(), s.load())
    assert open_store(r2.store).encoder == s.encoder


def test_stamp_layout_needs_the_slides_um_per_px(tmp_path: Path) -> None:
    """STAMP 256 um / 224 px tiles on a 0.499 um/px scan: ceil(256 / 0.499) = 514 px per tile."""
    d = tmp_path / "stamp" / "ctranspath-abc12345"
    d.mkdir(parents=True)
    rc, xy_px = _grid_coords(10, 7, 514, seed=5)
    with h5py.File(d / "slide.h5", "w") as f:
        f["coords"] = (xy_px * 0.499).astype(np.float32)
        f["feats"] = np.random.default_rng(1).normal(size=(len(xy_px), 768)).astype(np.float16)
        for k, v in {"stamp_version": "2.4.0", "extractor": "ctranspath", "unit": "um", "tile_size_um": 256.0,
                     "tile_size_px": 224, "code_hash": "abc12345", "feat_type": "tile"}.items():  # fmt: skip
            f.attrs[k] = v
    with pytest.raises(DataError, match="micrometres.*`slides`.*`mpp`"):
        import_bags(d, "stamp", tmp_path / "x")
    [r] = import_bags(d.parent, "stamp", tmp_path / "ok", mpp=0.499)
    s = open_store(r.store)
    np.testing.assert_array_equal(np.argwhere(s.tissue), rc)
    assert s.meta.patch == 224 and s.meta.mpp == pytest.approx(256 / 224)
    assert s.meta.step[0] == pytest.approx(514, abs=0.01) and s.code_size == 768
    assert s.meta.encoder_name == "imported:stamp:ctranspath"


def test_cli_refusal_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / "b"
    d.mkdir()
    with h5py.File(d / "s.h5", "w") as f:
        f["coords"] = np.zeros((2, 2), np.int64)
    r = CliRunner().invoke(app, ["import-features", str(d), "--format", "trident", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "'features'" in r.stderr
    with h5py.File(d / "s.h5", "w") as f:  # CLAM-like: features and coords, no TRIDENT attributes
        f["coords"], f["features"] = np.zeros((2, 2), np.int64), np.zeros((2, 4), np.float32)
    r = CliRunner().invoke(app, ["import-features", str(d), "--format", "trident", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith("(for CLAM files pass --format clam)\n"), r.stderr  # the library's `fmt=clam`
    r = CliRunner().invoke(app, ["import-features", str(d), "--format", "bagit", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr == "error: --format must be one of trident, clam, stamp (got 'bagit')\n"


def test_imported_real_slide_bags_train_and_predict(cmu_store: Path, tmp_path: Path) -> None:
    """TRIDENT files of the real CMU slide (six bags, codes perturbed per 'patient') through
    import-features, nic train --model nic-cnn (2 folds, 1 epoch) and nic predict."""
    runner = CliRunner()
    assert (
        runner.invoke(app, ["export-features", str(cmu_store), "-f", "trident", "-o", str(tmp_path / "t")]).exit_code
        == 0
    )
    src = tmp_path / "t" / "CMU-1-Small-Region.h5"
    bags = tmp_path / "features_nic"
    bags.mkdir()
    rows = ["slide,patient,score"]
    for i in range(6):
        dst = bags / f"cmu{i}.h5"
        shutil.copy(src, dst)
        with h5py.File(dst, "r+") as f:
            f["features"][...] = f["features"][...] * (1 + 0.1 * i)
        rows.append(f"cmu{i},p{i},{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    r = runner.invoke(
        app, ["import-features", str(bags), "-f", "trident", "-o", str(tmp_path / "st"), "--mpp", "0.499"]
    )
    assert r.exit_code == 0, r.output
    train = ["train", "--compressed", str(tmp_path / "st"), "--labels", str(tmp_path / "labels.csv"),
             "--task", "regression", "--target", "score", "--model", "nic-cnn", "--folds", "2",
             "--epochs", "1", "--width", "8", "--batch-size", "4", "--out", str(tmp_path / "run")]  # fmt: skip
    r = runner.invoke(app, train)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "run"), "--compressed", str(tmp_path / "st"),
                            "--out", str(tmp_path / "pred.csv")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "pred.csv").read_text().strip().splitlines()) == 7
    maps = ["heatmap", "--model", str(tmp_path / "run"), "--compressed", str(tmp_path / "st"), "--out",
            str(tmp_path / "maps"), "--slide", "cmu0"]  # fmt: skip
    r = runner.invoke(app, maps)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "maps" / "cmu0.png").is_file()


def test_slides_must_match_the_bags(cmu_store: Path, tmp_path: Path, cmu: Path, wsi_dir: Path) -> None:
    export_stores(cmu_store, "trident", tmp_path / "t")
    with pytest.raises(DataError, match="no slide among `slides`: CMU-1-Small-Region.h5"):
        import_bags(tmp_path / "t", "trident", tmp_path / "a", slides=[wsi_dir / "camelyon_lowres_wsi.dcm"])
    with h5py.File(tmp_path / "t" / "CMU-1-Small-Region.h5", "r+") as f:
        f["coords"].attrs["level0_width"] = 4000
    with pytest.raises(DataError, match="made from a 4000 x 2967 px slide.*2220 x 2967"):
        import_bags(tmp_path / "t", "trident", tmp_path / "b", slides=[cmu])
    assert not (tmp_path / "b").exists()  # refused before anything was written
    # a bag of a 40x scan (0.25 um/px) given this 0.499 um/px slide: its codes would be at 1 um/px here
    with h5py.File(tmp_path / "t" / "CMU-1-Small-Region.h5", "r+") as f:
        f["coords"].attrs["level0_width"] = 2220
        f["coords"].attrs["level0_magnification"] = 40
        del f["coords"].attrs["patch_size_level0"]
    with pytest.raises(DataError, match=r"level 0 TRIDENT called 40x, but its slide is 0\.499 um/px \(20x\)"):
        import_bags(tmp_path / "t", "trident", tmp_path / "b", slides=[cmu])
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_folder_with_files(tmp_path: Path) -> None:
    from nic.bags import export_stores
    from nic.errors import OutputError
    from nic.synth import make_planted_cohort

    c = make_planted_cohort(tmp_path / "c", 4, grid=(12, 12), n_pairs=1, seed=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.h5").write_bytes(b"keep")
    with pytest.raises(OutputError, match="already holds files; pass `overwrite=True`"):
        export_stores(c.stores, "trident", tmp_path / "out")
    assert (tmp_path / "out" / "mine.h5").read_bytes() == b"keep"
