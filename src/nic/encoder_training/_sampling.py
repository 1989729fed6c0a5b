"""Unlabelled tissue patches sampled from slides, for the unsupervised encoder methods.

Nothing is written to disk: positions are drawn once (reproducible by ``seed``) from the
tissue cells of each slide's patch grid, and each patch is read when it is asked for
through :meth:`nic.slide.Slide.read_region` (the fast tile path where the format has one).

- :func:`slide_paths`: a list of files, folders and CSVs -> slide paths (and per-slide um/px)
- :class:`SlidePatchSampler`: tissue cells of every slide; random patches, adjacent pairs,
  pairs from different slides, as level-0 positions
- :class:`SlidePatches` / :class:`SlidePairs`: torch datasets over drawn positions
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic.errors import DataError, OptionError
from nic.slide import list_slides

logger = logging.getLogger(__name__)

__all__ = ["SlideSource", "slide_paths", "SlidePatchSampler", "SlidePatches", "SlidePairs"]

# The four neighbours of a grid cell, (row, col) offsets.
_WHOLE_PIXELS = 17_000_000  # slides up to this many pixels at the target um/px sit in memory
_NEIGHBOURS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)])


@dataclass(frozen=True)
class SlideSource:
    """One slide: its path, a level-0 um/px that overrides the file's (``mpp``), and one
    used only when the file states none (``fallback_mpp``)."""

    path: Path
    mpp: float | None = None
    fallback_mpp: float | None = None

    def open(self) -> Any:
        """The opened :class:`~nic.slide.Slide`."""
        from nic.errors import MppError
        from nic.slide import open_slide

        if self.mpp is not None or self.fallback_mpp is None:
            return open_slide(self.path, mpp=self.mpp)
        try:
            return open_slide(self.path)
        except MppError:
            return open_slide(self.path, mpp=self.fallback_mpp)


def slide_paths(items: list[str | Path], mpp: float | None = None) -> list[SlideSource]:
    """Slides named by ``items``: files, folders (their slide files, sorted) or CSVs
    (:func:`nic.slide.list_slides`, strict: every slide must be there before training).

    A CSV has a ``slide`` or ``path`` column (paths relative to the CSV) and optionally an
    ``mpp`` column (level-0 um/px, overriding the file's).  ``mpp`` is the pixel size of
    every slide whose file states none.
    """
    out = [SlideSource(p, row_mpp, mpp) for p, row_mpp in list_slides(items, strict=True, mpp_column=True)]
    if not out:
        raise OptionError("no slides given; pass `slides` (files, folders or CSVs)")
    return out


class SlidePatchSampler:
    """The tissue cells of every slide at ``mpp`` um/px and ``patch`` px, and draws from them.

    A cell is usable when at least ``min_tissue`` of it is tissue.  ``balance`` ``cells``
    draws every tissue cell equally often (large slides give most patches), ``slides``
    every slide equally often (small slides are not drowned).  Slides without any
    usable cell are skipped with a warning; none at all is a :class:`DataError`.
    Positions are level-0 (x, y) of a patch's top-left corner, with the slide's index.
    """

    def __init__(
        self,
        slides: list[SlideSource],
        mpp: float = 0.5,
        patch: int = 128,
        min_tissue: float = 0.5,
        balance: str = "cells",
    ) -> None:
        if balance not in ("cells", "slides"):
            raise DataError(f"balance must be 'cells' (every tissue cell equally likely) or 'slides', got {balance!r}")
        self.balance = balance
        from nic.grid import patch_grid

        self.sources, self.mpp, self.patch = list(slides), float(mpp), int(patch)
        self.grids, self.cells = [], []
        for src in self.sources:
            with src.open() as slide:
                grid = patch_grid(slide, mpp=self.mpp, patch=self.patch, min_tissue=min_tissue)
            self.grids.append(grid)
            self.cells.append(grid.indices())
            if grid.n_tissue == 0:
                logger.warning("%s: no tissue cell of %d px at %s um/px; skipped", src.path, patch, mpp)
        self.n_cells = np.array([len(c) for c in self.cells])
        if self.n_cells.sum() == 0:
            raise DataError(f"no tissue patches of {patch} px at {mpp} um/px in {len(slides)} slide(s)")
        logger.info("%d tissue cells in %d slides", int(self.n_cells.sum()), len(slides))
        # One reader for every dataset drawn from this sampler, so small slides sit in memory once.
        self.reader = _Reader(self.sources, self.mpp, self.patch)

    def _position(self, s: int, rc: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        """Level-0 (x, y) of cells ``rc`` (N, 2) of slide ``s``, shifted by ``jitter`` (N, 2) in cells."""
        g = self.grids[s]
        x = g.origin[0] + (rc[:, 1] + jitter[:, 0]) * g.step[0]
        y = g.origin[1] + (rc[:, 0] + jitter[:, 1]) * g.step[1]
        return np.stack([x, y], 1)

    def _draw_cells(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(slide index (n,), cell (n, 2)), drawn as ``balance`` says."""
        if self.balance == "slides":
            has = np.flatnonzero(self.n_cells > 0)
            s = has[rng.integers(0, len(has), n)]
            cell = (rng.random(n) * self.n_cells[s]).astype(int)
        else:
            flat = rng.integers(0, int(self.n_cells.sum()), n)
            starts = np.concatenate([[0], np.cumsum(self.n_cells)])
            s = np.searchsorted(starts, flat, side="right") - 1
            cell = flat - starts[s]
        rc = np.stack([self.cells[si][c] for si, c in zip(s, cell)]) if n else np.zeros((0, 2), int)
        return s, rc

    def patches(self, n: int, seed: int = 0, jitter: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random tissue patches: (slide index (n,) int, level-0 (x, y) (n, 2) float).

        Each patch is a tissue cell shifted by up to ``jitter`` of a cell in x and y (so
        small slides still give many distinct patches).
        """
        rng = np.random.default_rng(seed)
        s, rc = self._draw_cells(n, rng)
        shift = rng.uniform(-jitter, jitter, (n, 2))
        pos = np.concatenate([self._position(si, rc[i : i + 1], shift[i : i + 1]) for i, si in enumerate(s)])
        return s, pos.reshape(n, 2)

    def neighbour_pairs(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` pairs of adjacent, non-overlapping tissue patches of one slide.

        Returns (slide index (n,), first (x, y) (n, 2), second (x, y) (n, 2)): the second
        patch is the first moved by exactly one patch width left, right, up or down, and
        both cells are tissue.  Both are shifted together by a random sub-cell jitter.  Slides
        are drawn as ``balance`` says, so positives and negatives come from the same slides.
        """
        rng = np.random.default_rng(seed)
        usable = []  # per slide: (cell index, neighbour offset index) with both cells tissue
        for g, cells in zip(self.grids, self.cells):
            tissue = g.tissue
            pairs = []
            for k, (dr, dc) in enumerate(_NEIGHBOURS):
                r2, c2 = cells[:, 0] + dr, cells[:, 1] + dc
                ok = (r2 >= 0) & (r2 < tissue.shape[0]) & (c2 >= 0) & (c2 < tissue.shape[1])
                ok[ok] = tissue[r2[ok], c2[ok]]
                pairs.append(np.stack([np.flatnonzero(ok), np.full(int(ok.sum()), k)], 1))
            usable.append(np.concatenate(pairs) if pairs else np.zeros((0, 2), int))
        sizes = np.array([len(u) for u in usable])
        if sizes.sum() == 0:
            raise DataError("no two adjacent tissue cells in any slide; give larger slides or a lower min_tissue")
        if self.balance == "slides":  # as for single patches: every slide (with a pair) equally often
            has = np.flatnonzero(sizes > 0)
            s = has[rng.integers(0, len(has), n)]
            pick = (rng.random(n) * sizes[s]).astype(int)
        else:
            starts = np.concatenate([[0], np.cumsum(sizes)])
            flat = rng.integers(0, int(sizes.sum()), n)
            s = np.searchsorted(starts, flat, side="right") - 1
            pick = flat - starts[s]
        shift = rng.uniform(-0.25, 0.25, (n, 2))
        a = np.zeros((n, 2))
        b = np.zeros((n, 2))
        for i, (si, f) in enumerate(zip(s, pick)):
            cell_i, k = usable[si][f]
            rc = self.cells[si][cell_i : cell_i + 1]
            a[i] = self._position(si, rc, shift[i : i + 1])[0]
            b[i] = self._position(si, rc + _NEIGHBOURS[k], shift[i : i + 1])[0]
        return s, a, b

    def other_slide_pairs(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` pairs of tissue patches from two different slides (needs two slides with tissue).

        Returns (slide of first (n,), first (x, y), slide of second (n,), second (x, y)).
        """
        if int((self.n_cells > 0).sum()) < 2:
            raise DataError("pairs from different slides need at least two slides with tissue; give more `slides`")
        rng = np.random.default_rng(seed)
        sa, pa = self.patches(n, seed=int(rng.integers(1 << 31)))
        sb, pb = self.patches(n, seed=int(rng.integers(1 << 31)))
        same = sa == sb
        while same.any():  # redraw the second patch of pairs that landed on one slide
            s2, p2 = self.patches(int(same.sum()), seed=int(rng.integers(1 << 31)))
            sb[same], pb[same] = s2, p2
            same = sa == sb
        return sa, pa, sb, pb


class _Reader:
    """Opens each slide once per process (data-loader workers open their own).

    A slide of at most ``_WHOLE_PIXELS`` pixels at the target um/px is read whole once
    and patches are cropped from memory (nearest whole pixel at the target um/px);
    larger slides are read patch by patch.
    """

    def __init__(self, sources: list[SlideSource], mpp: float, patch: int) -> None:
        self.sources, self.mpp, self.patch = sources, mpp, patch
        self._open: dict[int, Any] = {}

    def _slide(self, s: int) -> Any:
        entry = self._open.get(s)
        if entry is None:
            slide = self.sources[s].open()
            w, h = slide.size_at(self.mpp)
            if w * h <= _WHOLE_PIXELS:
                image = slide.read_region((0.0, 0.0), (w, h), mpp=self.mpp)
                scale = (slide.mpp[0] / self.mpp, slide.mpp[1] / self.mpp)
                slide.close()
                entry = (None, image, scale)
            else:
                entry = (slide, None, (1.0, 1.0))
            self._open[s] = entry
        return entry

    def read(self, s: int, xy: np.ndarray) -> np.ndarray:
        """uint8 (patch, patch, 3) at level-0 ``xy`` of slide ``s`` (white outside the slide)."""
        slide, image, scale = self._slide(s)
        p = self.patch
        if slide is not None:
            return slide.read_region((float(xy[0]), float(xy[1])), (p, p), mpp=self.mpp)
        x, y = int(round(xy[0] * scale[0])), int(round(xy[1] * scale[1]))
        h, w = image.shape[:2]
        if 0 <= x and 0 <= y and x + p <= w and y + p <= h:
            return image[y : y + p, x : x + p]
        out = np.full((p, p, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + p, w), min(y + p, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": self.sources, "mpp": self.mpp, "patch": self.patch, "_open": {}}


class SlidePatches:
    """Torch dataset of ``n`` random tissue patches: item ``i`` is uint8 (3, P, P)."""

    def __init__(self, sampler: SlidePatchSampler, n: int, seed: int = 0) -> None:
        self.slide, self.xy = sampler.patches(n, seed)
        self._reader = sampler.reader

    def __len__(self) -> int:
        return len(self.slide)

    def __getitem__(self, i: int) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self._reader.read(int(self.slide[i]), self.xy[i]))).permute(
            2, 0, 1
        )


class SlidePairs:
    """Torch dataset of ``n`` patch pairs for the siamese task: (a, b, label) with a, b uint8 (3, P, P).

    Label 1: adjacent patches of one slide; label 0: patches from two different slides.
    Half of the pairs are positives (order shuffled by ``seed``).
    """

    def __init__(self, sampler: SlidePatchSampler, n: int, seed: int = 0) -> None:
        n_pos = n // 2
        sp, pa, pb = sampler.neighbour_pairs(n_pos, seed)
        sa, na, sb, nb = sampler.other_slide_pairs(n - n_pos, seed + 1)
        self.slide_a = np.concatenate([sp, sa])
        self.slide_b = np.concatenate([sp, sb])
        self.xy_a, self.xy_b = np.concatenate([pa, na]), np.concatenate([pb, nb])
        self.label = np.concatenate([np.ones(n_pos), np.zeros(n - n_pos)]).astype(np.float32)
        order = np.random.default_rng(seed + 2).permutation(n)
        for k in ("slide_a", "slide_b", "xy_a", "xy_b", "label"):
            setattr(self, k, getattr(self, k)[order])
        self._reader = sampler.reader

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> Any:
        import torch

        a = self._reader.read(int(self.slide_a[i]), self.xy_a[i])
        b = self._reader.read(int(self.slide_b[i]), self.xy_b[i])
        t = [torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1) for v in (a, b)]
        return t[0], t[1], torch.tensor(self.label[i])
