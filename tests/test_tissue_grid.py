"""Tissue masks on real tiles and slides; the patch grid against a brute-force loop."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import nic
from nic.errors import OptionError
from nic.grid import cell_fractions
from nic.slide._readers import _over_white
from nic.tissue import ink, mask_from_rgb, saturation


@pytest.fixture
def tiles(shared_data: Path) -> Path:
    return shared_data / "tiles" / "histolab_tissue_vs_background"


def test_saturation_known_values():
    rgb = np.array([[[255, 255, 255], [200, 100, 50], [0, 0, 0], [100, 50, 100]]], np.uint8)
    assert np.allclose(saturation(rgb), [[0.0, 0.75, 0.0, 0.5]])


def test_ink_rules():
    rgb = np.array(
        [[[80, 180, 160], [40, 60, 160], [145, 49, 69], [209, 115, 153], [157, 75, 110], [240, 240, 240]]], np.uint8
    )
    assert ink(rgb).tolist() == [[True, True, True, False, False, False]]


def test_labelled_tiles(shared, tiles: Path):
    rows = list(csv.DictReader(open(tiles / "labels.csv")))
    fractions = {}
    for r in rows:
        rgb = _over_white(np.asarray(Image.open(tiles / r["filename"]).convert("RGBA")))
        fractions[r["filename"]] = (r["label"], mask_from_rgb(rgb, 2.0)[0].mean())
    tissue = [f for lab, f in fractions.values() if lab == "tissue"]
    empty = {k: f for k, (lab, f) in fractions.items() if lab == "no_tissue"}
    assert np.mean(tissue) > 0.6
    # background, a drawn line and green ink are not tissue; red ink is the hard case
    for name, f in empty.items():
        assert f < (0.4 if "red-pen" in name else 0.06), name


def test_slide_mask_in_strips_equals_one_read(shared, monkeypatch, wsi_dir: Path):
    import nic.slide._slide as slide_mod

    with nic.open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        whole = nic.tissue_mask(s, mpp=8.0)
        monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 20_000)
        strips = nic.tissue_mask(s, mpp=8.0)
    assert 0.2 < whole.fraction < 0.5
    assert np.array_equal(whole.mask, strips.mask)


def test_mask_of_blank_and_full_images():
    white = np.full((64, 64, 3), 245, np.uint8)
    assert not mask_from_rgb(white, 8.0)[0].any()
    pink = np.zeros((64, 64, 3), np.uint8) + np.array([220, 140, 190], np.uint8)
    assert mask_from_rgb(pink, 8.0)[0].all()


def brute_force(mask, scale, origin, step, extent, shape):
    """Tissue fraction by looping over every cell and every mask pixel centre."""
    out = np.zeros(shape)
    for r in range(shape[0]):
        for c in range(shape[1]):
            x0, y0 = origin[0] + c * step[0], origin[1] + r * step[1]
            inside = []
            for i in range(mask.shape[0]):
                for j in range(mask.shape[1]):
                    cx, cy = (j + 0.5) * scale[0], (i + 0.5) * scale[1]
                    if x0 <= cx < x0 + extent[0] and y0 <= cy < y0 + extent[1]:
                        inside.append(mask[i, j])
            if inside:
                out[r, c] = np.mean(inside)
            else:  # the mask pixel under the cell centre
                i = min(int((y0 + extent[1] / 2) / scale[1]), mask.shape[0] - 1)
                j = min(int((x0 + extent[0] / 2) / scale[0]), mask.shape[1] - 1)
                out[r, c] = mask[i, j]
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([4.0, 8.0, 16.0, 5.3, 40.0]),
    step=st.sampled_from([16.0, 32.0, 25.6, 12.0]),
    overlap=st.sampled_from([1.0, 1.5, 0.5]),
)
def test_cell_fractions_match_brute_force(seed, scale, step, overlap):
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(3, 12), rng.integers(3, 12))) > 0.5
    extent = step * overlap
    shape = (int((mask.shape[0] * scale - extent) // step) + 1, int((mask.shape[1] * scale - extent) // step) + 1)
    shape = (max(shape[0], 0), max(shape[1], 0))
    got = cell_fractions(mask, (scale, scale), (0.0, 0.0), (step, step), (extent, extent), shape)
    want = brute_force(mask, (scale, scale), (0.0, 0.0), (step, step), (extent, extent), shape)
    assert np.allclose(got, want, atol=1e-6)


def test_patch_grid_geometry(shared, wsi_dir: Path):
    with nic.open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        g = nic.patch_grid(s, mpp=0.5, patch=128)
        # 2220 x 2967 px at 0.499 um/px is 2215.6 x 2961.1 px at 0.5: 17 x 23 whole patches
        assert g.shape == (23, 17)
        assert g.step == pytest.approx((128 * 0.5 / 0.499,) * 2)
        assert 0 < g.n_tissue < 23 * 17
        pos = g.positions()
        rc = g.indices()
        assert len(pos) == len(rc) == g.n_tissue
        assert np.allclose(pos[:, 0], rc[:, 1] * g.step[0]) and np.allclose(pos[:, 1], rc[:, 0] * g.step[1])
        # the last cell lies inside the slide
        assert pos[:, 0].max() + g.patch_level0[0] <= s.dimensions[0]
        assert pos[:, 1].max() + g.patch_level0[1] <= s.dimensions[1]
        overlap = nic.patch_grid(s, mpp=0.5, patch=128, stride=64)
        assert overlap.shape == (45, 33)
        assert (g.tissue == (g.tissue_fraction >= 0.1)).all()
        # parameters out of range are refused by name, before any work
        for bad, match in (
            ({"min_tissue": 1.5}, r"^`min_tissue` must be a number in \[0, 1\] \(got 1.5\)$"),
            ({"patch": 0}, r"^`patch` must be an integer of at least 1 \(got 0\)$"),
            ({"stride": 64.0}, r"^`stride` must be an integer of at least 1 \(got 64.0\)$"),
            ({"mpp": 0.0}, r"^`mpp` must be a number greater than 0 \(got 0.0\)$"),
        ):
            with pytest.raises(OptionError, match=match):
                nic.patch_grid(s, **{"mpp": 0.5, "patch": 128, **bad})
