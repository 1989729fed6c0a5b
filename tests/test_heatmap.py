"""Heatmaps: known answers on planted cohorts, exact alignment on the slide, the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from nic.cli import app
from nic.explain import Heatmap, heatmap_geojson, slide_heatmap, write_heatmap_tiff
from nic.explain._heatmap import default_method, window_origins
from nic.explain._overlays import colour_scale, colourise, rasterise
from nic.learn import CVConfig, FitConfig, LabelSpec, load_run, train_cv
from nic.learn.data import dihedral, dihedral_inverse, open_sources
from nic.store import StoreAttrs
from nic.synth import PlantedCohort, make_planted_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    return make_planted_cohort(tmp_path_factory.mktemp("hm"), 48, n_pairs=8, noise=0.3, seed=1)


@pytest.fixture(scope="module")
def growth_run(planted: PlantedCohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hmrun") / "run"
    spec = LabelSpec(planted.labels, "binary", target="growth_pattern")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is faster than two busy ones
    try:
        # the reference nic-cnn (no cell-ratio branch), so that Grad-CAM applies
        fit = FitConfig(epochs=25, width=32, batch_size=8, ratio_heads=0)
        train_cv(CVConfig(planted.stores, spec, fit, folds=2, out=out))
    finally:
        torch.set_num_threads(before)
    return out


def test_dihedral_inverse_undoes_every_transform() -> None:
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    for k in range(8):
        np.testing.assert_array_equal(dihedral_inverse(dihedral(a, k), k), a)


def test_windows_cover_every_cell() -> None:
    for grid, crop in [((10, 10), 16), ((40, 23), 16), ((16, 17), 16), ((100, 7), 32)]:
        seen = np.zeros(grid, bool)
        for y, x in window_origins(grid, crop, np.full(grid, 1 / (grid[0] * grid[1]))):
            seen[max(y, 0) : y + crop, max(x, 0) : x + crop] = True
        assert seen.all(), (grid, crop)


@pytest.mark.parametrize("method", ["gradcam", "input-gradient"])
def test_heat_sits_on_the_planted_evidence(planted: PlantedCohort, growth_run: Path, method: str) -> None:
    """Label 1 = every A block (channel 1) has a B block (channel 2) beside it: the evidence
    for label 1 must be on those blocks (per-slide AUC of heat vs block cells)."""
    run = load_run(growth_run)
    labels = pd.read_csv(planted.labels).set_index("slide")["growth_pattern"]
    aucs = []
    for src in open_sources(sorted(planted.stores.glob("*.zarr"))):
        if labels[src.slide_id] != 1:
            continue
        f = np.asarray(src._features[...], np.float32)
        truth = ((f[1] > 2) | (f[2] > 2))[src.tissue]
        hm = slide_heatmap(run, src, method)
        assert np.isnan(hm.values[~src.tissue]).all() and np.isfinite(hm.values[src.tissue]).all()
        aucs.append(roc_auc_score(truth, hm.values[src.tissue]))
    assert np.median(aucs) >= 0.75, aucs


def test_default_methods_and_refusals() -> None:
    from nic.cli._common import cli_message
    from nic.errors import OptionError

    assert default_method("nic-cnn") == "input-gradient" and default_method("abmil") == "contribution"
    assert default_method("meanpool") == "input-gradient"
    with pytest.raises(OptionError, match=r"^`method` attention needs a abmil model; this run's is 'nic-cnn'") as info:
        default_method("nic-cnn", "attention")
    assert cli_message(info.value).startswith("--method attention needs a abmil model")
    with pytest.raises(OptionError, match=r"^`method` must be one of auto, .* \(got 'saliency'\)$"):
        default_method("nic-cnn", "saliency")


def test_gradcam_is_refused_for_a_nic_cnn_with_a_ratio_branch(planted: PlantedCohort, tmp_path: Path) -> None:
    from nic.errors import OptionError

    spec = LabelSpec(planted.labels, "binary", target="growth_pattern")
    fit = FitConfig(epochs=1, width=8, batch_size=8, ratio_starts=1)
    train_cv(CVConfig(planted.stores, spec, fit, folds=2, out=tmp_path / "r"))
    run = load_run(tmp_path / "r")
    src = open_sources(sorted(planted.stores.glob("*.zarr"))[:1])[0]
    with pytest.raises(OptionError, match=r"^`method` gradcam explains only nic-cnn.s convolutional path"):
        slide_heatmap(run, src, "gradcam")
    assert slide_heatmap(run, src).method == "input-gradient"


def test_abmil_contributions_sum_to_the_output(planted: PlantedCohort, tmp_path: Path) -> None:
    from nic.explain._heatmap import _abmil

    spec = LabelSpec(planted.labels, "regression", target="proliferation")
    res = train_cv(CVConfig(planted.stores, spec, FitConfig(model="abmil", epochs=2, width=16, batch_size=8), folds=2))
    net = res.models[0].net
    src = open_sources(sorted(planted.stores.glob("*.zarr"))[:2])
    x = torch.from_numpy(np.stack([s.crop(0, 0, 16)[0] for s in src]))
    m = torch.from_numpy(np.stack([s.crop(0, 0, 16)[1] for s in src]))
    with torch.no_grad():
        share = _abmil(net, x, m, 0, False).sum((1, 2))
        out = net(x, m)[:, 0] - net.out.bias[0]
    np.testing.assert_allclose(share.numpy(), out.numpy(), rtol=1e-5, atol=1e-6)


def test_survival_maps_are_in_the_units_of_the_predictions(planted: PlantedCohort) -> None:
    """A survival fold model's predictions are its log-risks standardised by its own scale
    (so folds average fairly): its abmil contributions sum to its output less the bias in
    those units, not in the network's raw scale, which differs from fold to fold."""
    from nic.explain._heatmap import model_map

    spec = LabelSpec(planted.labels, "survival", time="survival_time", event="survival_event")
    res = train_cv(CVConfig(planted.stores, spec, FitConfig(model="abmil", epochs=2, width=16, batch_size=8), folds=2))
    src = open_sources(sorted(planted.stores.glob("*.zarr"))[:1])[0]
    for model in res.models:
        assert model.risk_scale is not None and model.crop >= max(src.grid_shape)  # one window
        heat = model_map(model, src, "contribution", 0, variants=False)
        x, m = src.crop(0, 0, model.crop)
        with torch.no_grad():
            raw = float(model.net(torch.from_numpy(x[None]), torch.from_numpy(m[None]))[0, 0] - model.net.out.bias[0])
        assert np.nansum(heat) == pytest.approx(raw / model.risk_scale[1], rel=1e-5)


# -- alignment ----------------------------------------------------------------------------


def _meta(origin=(37.0, 53.0), step=(256.0, 256.0), grid=(3, 4), dims=(1400, 1000), mpp=(0.25, 0.25)):
    geometry = {"origin": origin, "step": step, "patch_level0": step, "grid_shape": grid}
    return StoreAttrs(**geometry, slide_dimensions=dims, slide_mpp=mpp, mpp=0.5, patch=128, stride=128)


def test_rasterise_matches_a_brute_force_placement() -> None:
    meta = _meta()
    values = np.arange(12, dtype=float).reshape(3, 4)
    values[1, 2] = np.nan
    for mpp in (0.5, 1.3, 4.0):
        img = rasterise(values, meta, mpp)
        assert img.shape == (round(1000 * 0.25 / mpp), round(1400 * 0.25 / mpp))
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                x, y = (j + 0.5) * mpp / 0.25, (i + 0.5) * mpp / 0.25  # level-0 centre of the pixel
                c, r = int((x - 37) // 256), int((y - 53) // 256)
                want = values[r, c] if 0 <= r < 3 and 0 <= c < 4 and x >= 37 and y >= 53 else np.nan
                assert (np.isnan(want) and np.isnan(img[i, j])) or img[i, j] == want, (mpp, i, j)


def _cell_colours(values: np.ndarray, signed: bool = True) -> np.ndarray:
    cmap, lo, hi = colour_scale(values, signed)
    return colourise(values, cmap, lo, hi)


def test_tiff_covers_the_slide_and_opens_in_openslide(tmp_path: Path) -> None:
    meta = _meta()
    values = np.linspace(-1, 1, 12).reshape(3, 4)
    hm = Heatmap("s", values, np.ones((3, 4), bool), "gradcam", "risk", True)
    path = write_heatmap_tiff(hm, meta, tmp_path / "s.heatmap.tiff", px_per_cell=8)
    with openslide.OpenSlide(str(path)) as osl:
        mpp = float(osl.properties[openslide.PROPERTY_NAME_MPP_X])
        w, h = osl.dimensions
        # the same physical extent as the slide (within one map pixel)
        assert abs(w * mpp - 1400 * 0.25) <= mpp and abs(h * mpp - 1000 * 0.25) <= mpp
        colours = _cell_colours(values)
        for r in range(3):
            for c in range(4):
                cx, cy = 37 + (c + 0.5) * 256, 53 + (r + 0.5) * 256  # level-0 centre of the cell
                px, py = int(cx * 0.25 / mpp), int(cy * 0.25 / mpp)
                if px >= w or py >= h:
                    continue
                got = np.asarray(osl.read_region((px, py), 0, (1, 1)).convert("RGB"))[0, 0]
                np.testing.assert_array_equal(got, colours[r, c])
        assert osl.level_count >= 1


def test_picture_of_a_store_without_slide_geometry_says_so(tmp_path: Path) -> None:
    from nic.errors import StoreError
    from nic.explain._overlays import heatmap_png

    hm = Heatmap("s", np.zeros((3, 4)), np.ones((3, 4), bool), "gradcam", "risk", True)
    meta = StoreAttrs(grid_shape=(3, 4), mpp=0.5, patch=128, stride=128)  # made by hand: no slide geometry
    with pytest.raises(StoreError, match="no grid geometry"):
        heatmap_png(hm, meta, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_heatmap_of_a_compressed_025_slide_is_aligned(tmp_path: Path) -> None:
    """A real store of a 0.25 um/px slide: every cell's colour sits where the grid says."""
    import nic
    from nic.compress import compress_slide
    from nic.store import open_store
    from tests.test_compress import write_slide

    slide = write_slide(tmp_path / "a.tif", (3072, 2560), 0.25, seed=1)
    torch.manual_seed(0)
    nic.save_encoder(nic.create_encoder("nic-cnn"), tmp_path / "enc")
    s = open_store(compress_slide(slide, tmp_path / "enc", tmp_path / "c", workers=0))
    meta = s.meta
    assert meta.slide_mpp == (0.25, 0.25) and meta.step == (256.0, 256.0)
    rng = np.random.default_rng(0)
    values = np.where(s.tissue, rng.normal(size=s.tissue.shape), np.nan)
    hm = Heatmap(s.slide_id, values, s.tissue, "gradcam", "risk", True)
    path = write_heatmap_tiff(hm, meta, tmp_path / "a.heatmap.tiff")
    colours = _cell_colours(values)
    with openslide.OpenSlide(str(path)) as osl:
        mpp = float(osl.properties[openslide.PROPERTY_NAME_MPP_X])
        assert abs(osl.dimensions[0] * mpp - 3072 * 0.25) <= mpp
        full = np.asarray(osl.read_region((0, 0), 0, osl.dimensions).convert("RGB"))
    ox, oy = meta.origin  # type: ignore[misc]
    for r, c in zip(*np.nonzero(s.tissue)):
        px = int((ox + (c + 0.5) * 256) * 0.25 / mpp)
        py = int((oy + (r + 0.5) * 256) * 0.25 / mpp)
        np.testing.assert_array_equal(full[py, px], colours[r, c])
    geo = heatmap_geojson(hm, meta)
    assert len(geo["features"]) == int(s.tissue.sum())
    f0 = geo["features"][0]
    r, c = f0["properties"]["measurements"]["row"], f0["properties"]["measurements"]["col"]
    assert f0["geometry"]["coordinates"][0][0] == [ox + c * 256, oy + r * 256]


def test_cli_heatmap_writes_every_output(planted: PlantedCohort, growth_run: Path, tmp_path: Path) -> None:
    import shutil

    import zarr

    stores = tmp_path / "stores"
    shutil.copytree(planted.stores, stores)
    sid = sorted(p.name[:-5] for p in stores.glob("*.zarr"))[0]
    # planted stores carry no slide geometry: give this one a grid on a 0.5 um/px slide
    zarr.open_group(str(stores / f"{sid}.zarr"), mode="r+").attrs.update(
        origin=[0.0, 0.0], step=[128.0, 128.0], patch_level0=[128.0, 128.0], slide_dimensions=[2048, 2048],
        slide_mpp=[0.5, 0.5],
    )  # fmt: skip
    res = CliRunner().invoke(app, ["heatmap", "--model", str(growth_run), "--compressed", str(stores), "--slide", sid,
                                   "--out", str(tmp_path / "hm")])  # fmt: skip
    assert res.exit_code == 0, res.output
    for suffix in (".png", ".heatmap.tiff", ".geojson", ".heatmap.npy"):
        assert (tmp_path / "hm" / f"{sid}{suffix}").is_file()
    assert json.loads((tmp_path / "hm" / f"{sid}.geojson").read_text())["type"] == "FeatureCollection"


def test_cli_heatmap_adds_slides_of_its_run_and_refuses_to_mix_or_replace(
    planted: PlantedCohort, tmp_path: Path
) -> None:
    """Maps of further slides of the same run may join a folder; maps already there, or a
    folder of another run's maps, are refused (once they were silently replaced and mixed)."""
    import shutil

    import zarr

    stores = tmp_path / "stores"
    shutil.copytree(planted.stores, stores)
    sids = sorted(p.name[:-5] for p in stores.glob("*.zarr"))[:3]
    for sid in sids:
        zarr.open_group(str(stores / f"{sid}.zarr"), mode="r+").attrs.update(
            origin=[0.0, 0.0], step=[128.0, 128.0], patch_level0=[128.0, 128.0], slide_dimensions=[2048, 2048],
            slide_mpp=[0.5, 0.5],
        )  # fmt: skip
    spec = LabelSpec(planted.labels, "binary", target="growth_pattern")
    fit = FitConfig(epochs=1, width=8, batch_size=8, ratio_heads=0)
    for name in ("a", "b"):
        train_cv(CVConfig(planted.stores, spec, fit, folds=2, out=tmp_path / name))
    hm = tmp_path / "hm"

    def heatmap(run: str, sid: str, *extra: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, ["heatmap", "--model", str(tmp_path / run), "--compressed", str(stores),
                                        "--slide", sid, "--out", str(hm), *extra])  # fmt: skip

    assert heatmap("a", sids[0]).exit_code == 0
    first = (hm / f"{sids[0]}.heatmap.npy").read_bytes()
    res = heatmap("a", sids[0])
    assert res.exit_code == 2 and res.output == (
        f"error: {hm}: already holds heatmaps of {sids[0]}; pass --overwrite to replace them, or choose another --out\n"
    )
    assert heatmap("a", sids[1]).exit_code == 0  # another slide of the same run joins the folder
    assert json.loads((hm / "heatmaps.json").read_text())["slides"] == sids[:2]
    res = heatmap("b", sids[2])  # a new slide, but of another run: refused
    assert res.exit_code == 2 and "holds heatmaps of" in res.output and "--overwrite" in res.output
    assert not (hm / f"{sids[2]}.png").exists() and (hm / f"{sids[0]}.heatmap.npy").read_bytes() == first
    res = heatmap("b", sids[2], "--overwrite")  # replaces the folder whole: one run's maps only
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in hm.glob("*.heatmap.npy")) == [f"{sids[2]}.heatmap.npy"]
    assert json.loads((hm / "heatmaps.json").read_text())["run"] == str((tmp_path / "b").resolve())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = CliRunner().invoke(app, ["heatmap", "--model", str(tmp_path / "a"), "--compressed", str(stores),
                                   "--out", str(afile)])  # fmt: skip
    assert res.exit_code == 2 and res.output == f"error: {afile}: exists and is not a folder; choose another --out\n"
