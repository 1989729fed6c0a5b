"""Slide layouts: class maps at tile resolution (one cell = one 256-px tile at level 0).

A layout is a (rows, cols) uint8 array of class ids (:data:`nic.synth._textures.CLASSES`)
plus a (rows, cols) uint8 count of mitosis-like figures per tumour tile.  Every tile is a
single class, so every 128-px patch of the grid at 0.5 um/px is too.

The growth-pattern label is built so that only spatial context tells it:

- *desmoplastic* (label 1): tumour nodules fenced by a one-tile stroma rim;
- *replacement* (label 0): tumour touches normal parenchyma directly, and exactly as many
  stroma tiles as the rim would hold are placed elsewhere (bands and blobs at least one
  tile away from tumour).

Both variants come from one drawn layout, so every class count is identical between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from nic.synth._textures import CLASS_ID

__all__ = ["Layout", "tissue_shape", "growth_layout", "place_field", "smooth_field", "adjacent"]

BG, TUMOUR, STROMA, NORMAL = CLASS_ID["background"], CLASS_ID["tumour"], CLASS_ID["stroma"], CLASS_ID["normal"]
LYMPH, FAT, NECROSIS = CLASS_ID["lymphocytes"], CLASS_ID["fat"], CLASS_ID["necrosis"]
_RING = np.ones((3, 3), bool)


@dataclass
class Layout:
    """A slide's class map (rows, cols) uint8 and mitoses per tile (rows, cols) uint8."""

    classes: np.ndarray
    mitoses: np.ndarray

    def count(self, class_id: int) -> int:
        return int(np.count_nonzero(self.classes == class_id))

    @property
    def tissue(self) -> int:
        return int(np.count_nonzero(self.classes != BG))


class LayoutFailed(Exception):
    """The drawn layout cannot hold the requested amounts; draw another."""


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed noise of ``shape`` with unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() or 1.0)


def tissue_shape(rng: np.random.Generator, rows: int, cols: int, coverage: float) -> np.ndarray:
    """A blob of tissue (rows, cols) bool covering about ``coverage`` of the slide.

    One connected piece without holes, with at least one background tile all round.
    """
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    yy = (yy + 0.5) / rows * 2 - 1
    xx = (xx + 0.5) / cols * 2 - 1
    t = rng.uniform(0, np.pi)
    u = xx * np.cos(t) + yy * np.sin(t)
    v = -xx * np.sin(t) + yy * np.cos(t)
    aspect = rng.uniform(0.7, 1.0)
    r = (u / aspect) ** 2 + (v * aspect) ** 2
    r = r + 0.35 * smooth_field(rng, (rows, cols), max(rows, cols) / 7)
    inner = np.zeros((rows, cols), bool)
    inner[1:-1, 1:-1] = True
    order = np.argsort(np.where(inner, r, np.inf), axis=None, kind="stable")
    mask = np.zeros(rows * cols, bool)
    mask[order[: int(round(coverage * rows * cols))]] = True
    mask = mask.reshape(rows, cols) & inner
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, lab, range(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(mask) & inner


def place_field(
    rng: np.random.Generator, candidates: np.ndarray, n: int, sigma: float | tuple[float, float]
) -> np.ndarray:
    """Choose ``n`` tiles among ``candidates`` (bool map) where a smooth random field peaks.

    A small isotropic ``sigma`` gives blobs; an anisotropic one gives bands.  Raises
    :class:`LayoutFailed` when there are fewer than ``n`` candidates.
    """
    out = np.zeros(candidates.shape, bool)
    if n <= 0:
        return out
    idx = np.flatnonzero(candidates)
    if len(idx) < n:
        raise LayoutFailed(f"{n} tiles wanted, {len(idx)} candidates")
    field = smooth_field(rng, candidates.shape, sigma).ravel()[idx]
    out.flat[idx[np.argsort(-field, kind="stable")[:n]]] = True
    return out


def adjacent(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Tiles of ``mask`` with at least one of their 8 neighbours in ``other``."""
    return mask & ndi.binary_dilation(other, _RING)


@dataclass(frozen=True)
class GrowthParams:
    """Amounts of one slide, as fractions of its tissue tiles (except ``nodules``)."""

    tumour: float
    necrosis: float  # fraction of the tumour's inner tiles that are necrotic
    extra_stroma: float
    lymphocytes: float
    fat: float
    nodules: int
    coverage: float


def growth_layout(rng: np.random.Generator, rows: int, cols: int, p: GrowthParams, desmoplastic: bool) -> Layout:
    """Draw a layout with tumour nodules, then make it desmoplastic or replacement.

    Both variants are built from the same draw (the ``rng`` state is consumed
    identically), so the class counts do not depend on ``desmoplastic``.  Raises
    :class:`LayoutFailed` when the amounts do not fit.
    """
    tissue = tissue_shape(rng, rows, cols, p.coverage)
    n_tissue = int(tissue.sum())
    depth = ndi.distance_transform_cdt(np.pad(tissue, 1), metric="chessboard")[1:-1, 1:-1]
    eligible = depth >= 3  # room for tumour, its rim and normal tissue before the edge
    n_tumour = max(4, int(round(p.tumour * n_tissue)))
    if eligible.sum() < n_tumour * 1.2:
        raise LayoutFailed("tissue too thin for the tumour amount")
    # nodules: seeds in deep tissue, grown by distance plus noise
    weights = np.where(eligible, depth, 0).astype(float).ravel()
    seeds = rng.choice(weights.size, size=p.nodules, replace=False, p=weights / weights.sum())
    yy, xx = np.mgrid[0:rows, 0:cols]
    score = np.full((rows, cols), np.inf)
    for s in seeds:
        sy, sx = divmod(int(s), cols)
        score = np.minimum(score, np.hypot(yy - sy, xx - sx) / rng.uniform(0.6, 1.4))
    score = score + 1.2 * smooth_field(rng, (rows, cols), 1.5)
    idx = np.flatnonzero(eligible)
    tumour = np.zeros((rows, cols), bool)
    tumour.flat[idx[np.argsort(score.ravel()[idx], kind="stable")[:n_tumour]]] = True
    # necrotic centres of big nodules
    inner = ndi.distance_transform_cdt(np.pad(tumour, 1), metric="chessboard")[1:-1, 1:-1] >= 3
    necrosis = place_field(rng, inner, int(round(p.necrosis * inner.sum())), 1.0)
    tumour &= ~necrosis
    lesion = tumour | necrosis
    rim = ndi.binary_dilation(lesion, _RING) & ~lesion
    far = tissue & ~ndi.binary_dilation(lesion, _RING)  # not touching tumour
    stroma_extra = place_field(rng, far, int(round(p.extra_stroma * n_tissue)), _band_sigma(rng))
    # replacement stroma: as many tiles as the rim, elsewhere, as bands or blobs
    free = far & ~stroma_extra
    stroma_moved = place_field(rng, free, int(rim.sum()), _band_sigma(rng))
    rest = free & ~stroma_moved  # candidates that exist in both variants
    lymph = place_field(rng, rest, int(round(p.lymphocytes * n_tissue)), 0.8)
    fat = place_field(rng, rest & ~lymph, int(round(p.fat * n_tissue)), 1.5)

    classes = np.where(tissue, NORMAL, BG).astype(np.uint8)
    classes[tumour] = TUMOUR
    classes[necrosis] = NECROSIS
    classes[stroma_extra] = STROMA
    classes[rim if desmoplastic else stroma_moved] = STROMA
    classes[lymph] = LYMPH
    classes[fat] = FAT
    return Layout(classes, np.zeros((rows, cols), np.uint8))


def _band_sigma(rng: np.random.Generator) -> tuple[float, float]:
    """Correlation lengths (tiles) of a band-like or blob-like field."""
    if rng.random() < 0.5:
        return (0.7, 3.0) if rng.random() < 0.5 else (3.0, 0.7)
    return (1.2, 1.2)


def rim_contact(classes: np.ndarray) -> float:
    """Fraction of tumour tiles on a nodule border whose non-tumour neighbours are stroma.

    The truth of the growth pattern read back from a class map: about 1 for desmoplastic,
    0 for replacement.  NaN when there is no tumour border.
    """
    lesion = (classes == TUMOUR) | (classes == NECROSIS)
    ring = ndi.binary_dilation(lesion, _RING) & ~lesion
    border = lesion & ndi.binary_dilation(ring, _RING)
    if not border.any():
        return float("nan")
    return float(np.count_nonzero(adjacent(border, ring & (classes == STROMA)))) / float(border.sum())
