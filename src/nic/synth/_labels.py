"""Patient bookkeeping shared by the procedural and mosaic cohorts: who has two slides,
survival drawn from tumour burden, and the labels table.  (How well a risk orders the drawn
times is :func:`nic.metrics.c_index`.)"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["patients_for", "draw_survival", "write_labels"]


def patients_for(n_slides: int, two_slide_fraction: float, rng: np.random.Generator) -> list[int]:
    """Patient index of each slide: about ``two_slide_fraction`` of patients get two slides.

    Returns a list of length ``n_slides``; the two slides of a patient are adjacent.
    """
    n_patients = max(1, min(n_slides, round(n_slides / (1.0 + two_slide_fraction))))
    n_two = n_slides - n_patients
    two = set(rng.choice(n_patients, size=n_two, replace=False).tolist()) if n_two else set()
    out: list[int] = []
    for p in range(n_patients):
        out += [p, p] if p in two else [p]
    return out


def draw_survival(
    rng: np.random.Generator,
    burden: np.ndarray,
    hazard_per_burden: float,
    median_months: float,
    censoring: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Survival time (months) and event (1 death, 0 censored) per patient.

    The hazard is exponential, ``h = ln 2 / median * exp(hazard_per_burden * (burden -
    mean burden))``, so it rises with tumour burden (fraction of tissue that is tumour).
    Censoring times are exponential and independent of the event time, with a rate set so
    that the expected censored fraction is ``censoring``.
    """
    burden = np.asarray(burden, float)
    h = math.log(2.0) / median_months * np.exp(hazard_per_burden * (burden - burden.mean()))
    t_event = rng.exponential(1.0 / h)
    if censoring <= 0:
        return np.round(t_event, 2), np.ones(len(h), np.int64)
    lo, hi = -30.0, 30.0  # bisection on log censoring rate
    for _ in range(100):
        mid = (lo + hi) / 2
        hc = math.exp(mid)
        if float(np.mean(hc / (hc + h))) < censoring:
            lo = mid
        else:
            hi = mid
    t_cens = rng.exponential(1.0 / math.exp((lo + hi) / 2), size=len(h))
    event = (t_event <= t_cens).astype(np.int64)
    time = np.maximum(np.round(np.minimum(t_event, t_cens), 2), 0.01)
    return time, event


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "" if math.isnan(v) else f"{float(v):.6g}"
    return str(v)


def write_labels(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys, in column order) as a CSV file."""
    if not rows:
        raise ValueError("no rows")
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow([_fmt(v) for v in r.values()])
