"""Patches at level-0 coordinates -> cells of one regular grid (or a clear refusal).

A bag's coordinates are the level-0 top-left corners (x, y) of its patches.  They sit on
one grid when, per axis, every coordinate is ``origin + k * step`` (k integer) to within
:func:`tolerance` pixels; the step is fitted to the coordinates (least squares), seeded
with the step the bag's attributes give, so integer-rounded corners of a fractional step
(a 128.26 px step written as whole pixels) are recognised.  Patches that overlap (step
smaller than the patch) or lie off one grid are refused, unless ``snap``: then each patch
goes to the nearest cell of a grid with step = patch (anchored where most patches lie),
at most half a cell away; of several patches that land on one cell the nearest is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nic.errors import DataError

__all__ = ["Placement", "place_on_grid", "tolerance"]


@dataclass(frozen=True)
class Placement:
    """Where each patch of a bag goes.

    ``cells``: (N, 2) int64 (row, col) of the kept patches; ``keep``: (N,) bool, which
    patches of the bag were kept (all unless snapping dropped duplicates); ``origin`` and
    ``step``: level-0 pixels (x, y); ``shape``: (rows, cols); ``max_shift``: the largest
    distance in level-0 pixels a patch was moved (0 unless snapped).
    """

    cells: np.ndarray
    keep: np.ndarray
    origin: tuple[float, float]
    step: tuple[float, float]
    shape: tuple[int, int]
    max_shift: float = 0.0
    dropped: int = 0


def tolerance(step: float) -> float:
    """Level-0 pixels a corner may miss its grid point by: rounding to whole pixels, or 0.5%."""
    return max(1.0, 0.005 * step)


def _fit_axis(v: np.ndarray, hint: float) -> tuple[float, float, np.ndarray]:
    """(offset, step, k) with v ~ offset + step * k; k counted along sorted unique values."""
    u = np.unique(v)
    step = hint
    for _ in range(2):  # seed with the hint, then with the fitted step
        gaps = np.rint(np.diff(u) / step)
        ku = np.concatenate([[0.0], np.cumsum(gaps)])
        if ku[-1] > 0:
            step, offset = np.polyfit(ku, u, 1)
        else:
            offset = float(u[0])
    offset, step = round(float(offset), 6), round(float(step), 6)  # least-squares noise off exact grids
    k = np.rint((v - offset) / step)
    return offset, step, k.astype(np.int64)


def _phase(v: np.ndarray, step: float) -> float:
    """The offset in [0, step) shared by most coordinates (1-px bins)."""
    ph = np.mod(v, step)
    bins, counts = np.unique(np.floor(ph), return_counts=True)
    best = bins[np.argmax(counts)]
    return float(np.median(ph[np.floor(ph) == best]))


def _cells_for_size(size: float | None, origin: float, step: float, patch: float) -> int:
    if size is None:
        return 0
    return max(0, int(math.floor((size - origin - patch) / step + 1e-6)) + 1)


def place_on_grid(
    coords: np.ndarray,
    patch_level0: float,
    step_hint: float | None = None,
    *,
    snap: bool = False,
    size_level0: tuple[int, int] | None = None,
    source: str = "",
) -> Placement:
    """Cells of the patches at level-0 top-left ``coords`` (N, 2) float (x, y).

    ``patch_level0``: patch side in level-0 pixels; ``step_hint``: level-0 pixels between
    neighbouring patches as the bag's attributes say (default: the patch side);
    ``size_level0``: the slide's level-0 (width, height) when known, so the grid spans
    the slide like one ``nic compress`` lays.  :class:`DataError` (naming ``source``) for
    overlapping or off-grid patches unless ``snap``.
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    n = len(coords)
    hint = float(step_hint or patch_level0)
    if not hint > 0 or not patch_level0 > 0:
        raise DataError(f"{source}: patch size {patch_level0!r} and step {hint!r} must be positive level-0 pixels")
    keep = np.ones(n, bool)
    shift, dropped = 0.0, 0
    if n == 0:
        origin, step = (0.0, 0.0), (hint, hint)
        cells = np.zeros((0, 2), np.int64)
    elif snap:
        s = max(hint, float(patch_level0))
        step = (s, s)
        origin = (_phase(coords[:, 0], s), _phase(coords[:, 1], s))
        cols = np.rint((coords[:, 0] - origin[0]) / s).astype(np.int64)
        rows = np.rint((coords[:, 1] - origin[1]) / s).astype(np.int64)
        # a patch left of the anchor column goes to the cell it overlaps most, never to -1
        o = np.array(origin)
        shift_xy = coords - (o + np.stack([cols, rows], 1) * s)
        dist = np.hypot(shift_xy[:, 0], shift_xy[:, 1])
        order = np.lexsort((dist, cols, rows))
        first = np.ones(n, bool)
        same = (np.diff(rows[order]) == 0) & (np.diff(cols[order]) == 0)
        first[1:] = ~same
        keep = np.zeros(n, bool)
        keep[order[first]] = True
        dropped = int(n - keep.sum())
        shift = float(dist[keep].max())
        cells = np.stack([rows, cols], 1)
        lo = cells[keep].min(0)
        shift_cells = np.minimum(lo, 0)  # cells above / left of the anchor: move the origin
        origin = (origin[0] + shift_cells[1] * s, origin[1] + shift_cells[0] * s)
        cells = cells[keep] - shift_cells
    else:
        ox, sx, kx = _fit_axis(coords[:, 0], hint)
        oy, sy, ky = _fit_axis(coords[:, 1], hint)
        # an axis with one distinct value says nothing about its step: take the other's
        if len(np.unique(kx)) == 1 and len(np.unique(ky)) > 1:
            sx = sy
        elif len(np.unique(ky)) == 1 and len(np.unique(kx)) > 1:
            sy = sx
        for v, off, s, k, axis in ((coords[:, 0], ox, sx, kx, "x"), (coords[:, 1], oy, sy, ky, "y")):
            miss = np.abs(v - (off + s * k))
            tol = tolerance(s)
            if miss.max() > tol:
                bad = int((miss > tol).sum())
                raise DataError(
                    f"{source}: {bad} of {n} patches lie off one grid (up to {miss.max():.1f} level-0 px from the "
                    f"nearest {s:.2f} px step in {axis}; e.g. separate tissue regions with their own grid starts); "
                    "pass `snap=True` to move each to the nearest cell (at most half a cell, duplicates dropped)"
                )
            if s < patch_level0 - tol:
                raise DataError(
                    f"{source}: patches overlap (step {s:.1f} level-0 px in {axis}, patch {patch_level0:.1f} px); "
                    "nic's grid holds one code per cell: pass `snap=True` to keep one patch per patch-sized cell"
                )
        step = (sx, sy)
        # the cell corner nearest the slide's top-left, a rounding error below 0 counting as 0;
        # a patch that starts left of / above the slide (snapped stores export those) starts the grid
        origin = (
            ox - max(0, math.floor((ox + tolerance(sx)) / sx)) * sx,
            oy - max(0, math.floor((oy + tolerance(sy)) / sy)) * sy,
        )
        cells = np.stack(
            [ky + int(round((oy - origin[1]) / sy)), kx + int(round((ox - origin[0]) / sx))], axis=1
        ).astype(np.int64)
        flat = cells[:, 0] * (cells[:, 1].max() + 1) + cells[:, 1]
        if len(np.unique(flat)) != n:
            raise DataError(
                f"{source}: {n - len(np.unique(flat))} patches share a grid cell with another (overlapping or "
                "repeated coordinates); pass `snap=True` to keep one patch per cell"
            )
    if len(cells):
        if cells.min() < 0:  # never index from the far side of the grid
            raise AssertionError(f"{source}: a patch placed at cell {cells.min(0).tolist()}, left of / above the grid")
        rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    else:
        rows = cols = 0
    if size_level0 is not None:
        cols = max(cols, _cells_for_size(size_level0[0], origin[0], step[0], patch_level0))
        rows = max(rows, _cells_for_size(size_level0[1], origin[1], step[1], patch_level0))
    return Placement(cells, keep, (float(origin[0]), float(origin[1])), step, (rows, cols), shift, dropped)
