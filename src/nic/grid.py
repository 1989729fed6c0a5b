"""The patch grid: where each code of a compressed slide comes from.

Cell (row, col) of a grid at ``mpp`` um/px with ``patch`` and ``stride`` pixels (both at
``mpp``) is the square patch whose top-left corner lies at level-0 pixel
``origin + (col, row) * step``, with ``step = stride * mpp / slide_mpp``; it spans
``patch * mpp / slide_mpp`` level-0 pixels.  Only whole patches inside the slide are
cells: ``cols = floor((W_mpp - patch) / stride) + 1`` with ``W_mpp`` the slide width at
``mpp``.  A cell's tissue fraction is the share of tissue-mask pixels whose centres fall
inside the cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nic.errors import check_int, check_number
from nic.slide import Slide
from nic.tissue import TissueMask, tissue_mask

__all__ = ["PatchGrid", "patch_grid", "cell_fractions"]


@dataclass(frozen=True)
class PatchGrid:
    """A patch grid over one slide.

    ``tissue_fraction`` is (rows, cols) float32 in [0, 1]; ``tissue`` marks the cells whose
    fraction is at least ``min_tissue``.  ``origin`` and ``step`` are level-0 pixels (x, y);
    ``patch`` and ``stride`` are pixels at ``mpp`` um/px.
    """

    mpp: float
    patch: int
    stride: int
    origin: tuple[float, float]
    step: tuple[float, float]
    patch_level0: tuple[float, float]
    tissue_fraction: np.ndarray
    min_tissue: float

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self.tissue_fraction.shape  # type: ignore[return-value]

    @property
    def tissue(self) -> np.ndarray:
        return (self.tissue_fraction >= self.min_tissue) & (self.tissue_fraction > 0)

    @property
    def n_tissue(self) -> int:
        return int(self.tissue.sum())

    def indices(self, tissue_only: bool = True) -> np.ndarray:
        """(N, 2) int (row, col) of the cells, row-major."""
        if tissue_only:
            return np.argwhere(self.tissue)
        rows, cols = self.shape
        return np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)

    def positions(self, tissue_only: bool = True) -> np.ndarray:
        """(N, 2) float64 level-0 (x, y) of the cells' top-left corners, row-major."""
        rc = self.indices(tissue_only)
        x = self.origin[0] + rc[:, 1] * self.step[0]
        y = self.origin[1] + rc[:, 0] * self.step[1]
        return np.stack([x, y], axis=1)


def _axis_cells(size_l0: int, mpp0: float, mpp: float, patch: int, stride: int) -> int:
    at_mpp = size_l0 * mpp0 / mpp
    if at_mpp + 1e-6 < patch:
        return 0
    return int(math.floor((at_mpp - patch) / stride + 1e-6)) + 1


def cell_fractions(
    mask: np.ndarray,
    mask_scale: tuple[float, float],
    origin: tuple[float, float],
    step: tuple[float, float],
    extent: tuple[float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """Share of mask pixels whose centres fall in each cell, (rows, cols) float32.

    ``mask_scale`` is level-0 pixels per mask pixel (x, y); ``origin``, ``step`` and
    ``extent`` (cell width, height) are level-0 pixels.  A cell that holds no mask pixel
    centre (mask coarser than the cells) takes the mask pixel under its centre.
    """
    rows, cols = shape
    out = np.zeros((rows, cols), np.float32)
    if rows == 0 or cols == 0 or mask.size == 0:
        return out
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    ii[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def bounds(n: int, o: float, st: float, ext: float, scale: float, limit: int) -> tuple[np.ndarray, ...]:
        a = (o + np.arange(n) * st) / scale  # cell start in mask pixels
        b = a + ext / scale
        lo = np.clip(np.ceil(a - 0.5), 0, limit).astype(np.int64)
        hi = np.clip(np.ceil(b - 0.5), 0, limit).astype(np.int64)
        centre = np.clip(np.floor((a + b) / 2), 0, limit - 1).astype(np.int64)
        return lo, hi, centre

    y0, y1, yc = bounds(rows, origin[1], step[1], extent[1], mask_scale[1], mask.shape[0])
    x0, x1, xc = bounds(cols, origin[0], step[0], extent[0], mask_scale[0], mask.shape[1])
    s = ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]
    n = np.outer(y1 - y0, x1 - x0)
    np.divide(s, n, out=out, where=n > 0, casting="unsafe")
    empty = n == 0
    if empty.any():
        out[empty] = mask[np.ix_(yc, xc)][empty]
    return out


def patch_grid(
    slide: Slide,
    mpp: float = 0.5,
    patch: int = 128,
    stride: int | None = None,
    min_tissue: float = 0.1,
    mask: TissueMask | None = None,
) -> PatchGrid:
    """The grid of ``patch``-pixel cells at ``mpp`` um/px over ``slide``, with tissue fractions.

    ``stride`` defaults to ``patch`` (no overlap).  ``mask`` defaults to
    ``tissue_mask(slide)``; pass one to reuse it across grids.
    """
    stride = patch if stride is None else stride
    check_int("patch", patch, 1)
    check_int("stride", stride, 1)
    check_number("mpp", mpp, 0, math.inf, low_open=True)
    check_number("min_tissue", min_tissue, 0, 1)
    mask = tissue_mask(slide) if mask is None else mask
    (w0, h0), (mx, my) = slide.dimensions, slide.mpp
    shape = (_axis_cells(h0, my, mpp, patch, stride), _axis_cells(w0, mx, mpp, patch, stride))
    step = (stride * mpp / mx, stride * mpp / my)
    extent = (patch * mpp / mx, patch * mpp / my)
    scale = (mask.mpp / mx, mask.mpp / my)
    frac = cell_fractions(mask.mask, scale, (0.0, 0.0), step, extent, shape)
    return PatchGrid(mpp, patch, stride, (0.0, 0.0), step, extent, frac, min_tissue)
