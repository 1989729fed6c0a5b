"""Cohorts of compressed slides (stores, not slide files) with planted signals, for tests
and benchmarks of :mod:`nic.learn`.

Not a model of tissue: codes are Gaussian noise on tissue cells plus four signals,
each set per PATIENT (all slides of a patient share it):

- ``proliferation`` (float): the mean of channel 0 over tissue (a level shift);
- ``growth_pattern`` (0/1): a SPATIAL label.  Every slide holds the same number of
  "A" blocks (channel 1 high) and "B" blocks (channel 2 high) of ``block`` x ``block``
  cells; with label 1 each A has a B right beside it, with label 0 no B lies within 2
  cells of an A.  The means of all
  channels are identical between labels, so only layout tells them apart;
- ``survival_time`` / ``survival_event``: exponential times with log-hazard
  ``beta * z``, where ``z`` is the level of channel 3, and uniform censoring;
- ``mitotic_index`` (float, with ``code_size`` >= 6): a ratio of two sparse counts, like
  mitoses per tumour cell.  A patient's "tumour" cells (channel 4 high) are 15-60% of the
  tissue, and each is a "mitosis" (channel 5 high) with a probability drawn log-uniformly
  from 0.02-0.3; the label is mitoses / tumour cells of the patient's first slide.  Neither
  channel's mean over tissue carries it alone.  Drawn from a random stream of its own, so
  the other signals are those of cohorts written before it existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nic.errors import OptionError
from nic.store import create_store, mark_complete, store_path

__all__ = ["PlantedCohort", "make_planted_cohort"]


@dataclass(frozen=True)
class PlantedCohort:
    """Where the stores and ``labels.csv`` (slide, patient, proliferation, growth_pattern,
    survival_time, survival_event) were written, and the true log-hazards per patient."""

    stores: Path
    labels: Path
    log_hazard: np.ndarray


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-1, 1), w / 2 + rng.uniform(-1, 1)
    ry, rx = h * rng.uniform(0.38, 0.5), w * rng.uniform(0.38, 0.5)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _place_pairs(
    rng: np.random.Generator, tissue: np.ndarray, n: int, adjacent: bool, block: int = 1
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Top-left cells of n A and n B blocks (block x block cells) inside tissue.

    Adjacent: each B block touches its A block on the right.  Apart: no B block lies within
    2 cells of an A block.  Blocks never overlap and keep one free cell around them.
    """
    h, w = tissue.shape
    b = block
    used = np.zeros_like(tissue)
    a_cells: list[tuple[int, int]] = []
    b_cells: list[tuple[int, int]] = []

    def free(y: int, x: int, hh: int, ww: int) -> bool:
        if y < 0 or x < 0 or y + hh > h or x + ww > w or not tissue[y : y + hh, x : x + ww].all():
            return False
        return not used[max(y - 1, 0) : y + hh + 1, max(x - 1, 0) : x + ww + 1].any()

    def far(y: int, x: int, others: list[tuple[int, int]]) -> bool:
        return all(max(oy - (y + b - 1), y - (oy + b - 1), ox - (x + b - 1), x - (ox + b - 1)) > 2 for oy, ox in others)

    for _ in range(5000):
        if len(a_cells) == n and len(b_cells) == n:
            break
        y, x = int(rng.integers(h)), int(rng.integers(w))
        if adjacent:
            if free(y, x, b, 2 * b):
                a_cells.append((y, x))
                b_cells.append((y, x + b))
                used[y : y + b, x : x + 2 * b] = True
            continue
        want_a = len(a_cells) <= len(b_cells) and len(a_cells) < n
        if free(y, x, b, b) and far(y, x, b_cells if want_a else a_cells):
            (a_cells if want_a else b_cells).append((y, x))
            used[y : y + b, x : x + b] = True
    if len(a_cells) < n or len(b_cells) < n:
        raise OptionError(
            f"could not place {n} pairs of {b} x {b} blocks in the tissue; use fewer `n_pairs` or a larger `grid`"
        )
    return a_cells, b_cells


def make_planted_cohort(
    folder: str | Path,
    n_patients: int = 40,
    grid: tuple[int, int] = (16, 16),
    code_size: int = 8,
    slides_per_patient: tuple[int, ...] = (1,),
    n_pairs: int = 6,
    block: int = 1,
    variants: int = 1,
    noise: float = 0.5,
    seed: int = 0,
) -> PlantedCohort:
    """Write ``folder/stores/<slide>.zarr`` and ``folder/labels.csv``; see the module doc.

    ``slides_per_patient`` is cycled over patients (e.g. ``(1, 2)``: every other patient
    has two slides).  ``variants=8`` writes 8 identical variants (the noise codes have no
    orientation), which exercises the dihedral code path without changing the signal.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    stores = folder / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    h, w = grid
    prolif = rng.uniform(0, 1, n_patients)
    pattern = np.arange(n_patients) % 2
    rng.shuffle(pattern)
    z = rng.normal(0, 1, n_patients)
    log_hazard = 1.5 * z
    t = rng.exponential(1.0 / np.exp(log_hazard))
    cens = rng.uniform(0, np.quantile(t, 0.9) * 1.5, n_patients)
    event = (t <= cens).astype(int)
    time = np.minimum(t, cens)
    sparse = code_size >= 6
    rng_m = np.random.default_rng([seed, 6])
    tumour_frac = rng_m.uniform(0.15, 0.6, n_patients)
    mitosis_p = np.exp(rng_m.uniform(np.log(0.02), np.log(0.3), n_patients))
    rows = []
    for p in range(n_patients):
        for j in range(slides_per_patient[p % len(slides_per_patient)]):
            sid = f"s{p:04d}_{j}"
            tissue = _tissue(rng, h, w)
            f = rng.normal(0, noise, (code_size, h, w)).astype(np.float32)
            f[0] += 2.0 * prolif[p]
            f[3] += 0.8 * z[p]
            a_cells, b_cells = _place_pairs(rng, tissue, n_pairs, bool(pattern[p]), block)
            for y, x in a_cells:
                f[1, y : y + block, x : x + block] += 4.0
            for y, x in b_cells:
                f[2, y : y + block, x : x + block] += 4.0
            index = None
            if sparse:
                tumour = tissue & (rng_m.random((h, w)) < tumour_frac[p])
                mitoses = tumour & (rng_m.random((h, w)) < mitosis_p[p])
                f[4] += 3.0 * tumour
                f[5] += 3.0 * mitoses
                index = float(mitoses.sum() / max(int(tumour.sum()), 1))
            f *= tissue
            store = store_path(stores, sid)
            arr = create_store(store, code_size, grid, tissue, {"encoder": "planted"}, variants=variants)
            arr[...] = np.broadcast_to(f, (variants, *f.shape)) if variants > 1 else f
            mark_complete(store)
            rows.append(
                {
                    "slide": sid,
                    "patient": f"p{p:04d}",
                    "proliferation": float(f[0][tissue].mean()) if j == 0 else None,
                    "growth_pattern": int(pattern[p]),
                    "survival_time": float(time[p]),
                    "survival_event": int(event[p]),
                    **({"mitotic_index": index if j == 0 else None} if sparse else {}),
                }
            )
    df = pd.DataFrame(rows)
    # proliferation is a patient label: the mean of channel 0 over the first slide's tissue
    df["proliferation"] = df.groupby("patient")["proliferation"].transform("first")
    if sparse:
        df["mitotic_index"] = df.groupby("patient")["mitotic_index"].transform("first")
    labels = folder / "labels.csv"
    df.to_csv(labels, index=False)
    return PlantedCohort(stores, labels, log_hazard)
