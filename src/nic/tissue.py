"""Tissue detection at low resolution.

Otsu's threshold on the HSV saturation of a thumbnail (stain is coloured, glass and
background are grey or white), kept inside sane bounds so that an all-background or an
all-tissue image is not split in two; pen marks (green, blue, red ink) and black are
left out by colour rules; then morphological clean-up: closing, removal of
specks and filling of small holes.  The thumbnail is read in strips (``Slide.thumbnail``),
so a single-level 100,000 x 100,000 px slide never sits in memory at full resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nic.errors import check_number
from nic.slide import Slide

__all__ = ["TissueMask", "tissue_mask", "mask_from_rgb", "saturation", "ink"]

logger = logging.getLogger(__name__)

#: Otsu's threshold on saturation is clipped to this range: below it, grey glass and
#: JPEG noise pass as tissue; above it, pale eosin-only tissue is lost.
THRESHOLD_BOUNDS = (0.05, 0.18)
#: Pixels darker than this (max of R, G, B) are ink, dust or scanner borders, not tissue.
DARK = 25


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask (H, W) whose pixels are ``mpp`` um wide.

    Pixel (i, j) covers level-0 x in [j * s, (j + 1) * s) with s = mpp / slide mpp.
    """

    mask: np.ndarray
    mpp: float
    threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of uint8 RGB (H, W, 3), as float32 in [0, 1]."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def ink(rgb: np.ndarray) -> np.ndarray:
    """Pen marks, (H, W) bool: green, blue and black-blue ink (green at least red), and red
    ink (blue under 0.55 red).  Haematoxylin and eosin are always redder than green and
    keep blue well above half of red.
    """
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    coloured = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)) > 30
    return coloured & ((g >= r) | (b * 100 < 55 * r))


def mask_from_rgb(rgb: np.ndarray, mpp: float, min_area_um2: float = 10_000.0) -> tuple[np.ndarray, float]:
    """Tissue mask and the saturation threshold used, for an RGB image at ``mpp`` um/px.

    ``min_area_um2``: tissue pieces and holes smaller than this area are removed / filled
    (default 100 x 100 um).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool), THRESHOLD_BOUNDS[0]
    sat = ndi.gaussian_filter(saturation(rgb), sigma=1.0)
    dark = (rgb.max(axis=2) < DARK) | ink(rgb)
    values = sat[~dark]
    if values.size and float(values.max() - values.min()) > 1e-6:
        t = float(threshold_otsu(values))
    else:
        t = THRESHOLD_BOUNDS[0]
    t = float(np.clip(t, *THRESHOLD_BOUNDS))
    mask = (sat > t) & ~dark
    radius = max(1, round(16.0 / mpp))  # close gaps of ~30 um
    if radius <= 8:
        structure = _disk(radius)
        mask = ndi.binary_closing(np.pad(mask, radius), structure=structure)[radius:-radius, radius:-radius]
    min_px = max(1, int(min_area_um2 / (mpp * mpp)))
    mask = remove_small_objects(mask, max_size=min_px)
    mask = remove_small_holes(mask, max_size=min_px)
    return mask, t


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def tissue_mask(slide: Slide, mpp: float = 8.0) -> TissueMask:
    """The tissue mask of ``slide`` at ``mpp`` um/px (default 8, i.e. 16x coarser than 0.5).

    A slide scanned coarser than ``mpp`` is masked at its own resolution instead.
    """
    check_number("mpp", mpp, 0, float("inf"), low_open=True, high_open=True)
    mpp = max(mpp, max(slide.mpp))
    rgb = slide.thumbnail(mpp)
    mask, t = mask_from_rgb(rgb, mpp)
    logger.debug("%s: tissue threshold %.3f, %.1f%% tissue", slide.path, t, 100 * mask.mean())
    return TissueMask(mask, mpp, t)
