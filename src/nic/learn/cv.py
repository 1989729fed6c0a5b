"""Patient-grouped, label-stratified splits for cross-validation and early stopping."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from nic.errors import OptionError
from nic.learn.data import Cohort

__all__ = ["patient_folds", "inner_split"]

logger = logging.getLogger(__name__)


def _grouped_split(strata: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        return list(sgkf.split(np.zeros(len(strata)), strata, groups))


def _strata(cohort: Cohort, patients: np.ndarray, k: int) -> np.ndarray:
    """Stratum per patient in ``patients``: class / event, or a quantile bin of the target
    (as many bins as keep about ``k`` patients in each, at most 5)."""
    if cohort.task != "regression":
        return cohort.strata()[patients]
    y = cohort.y[patients]
    bins = int(np.clip(len(y) // k, 1, 5))
    qs = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(qs, y, side="right").astype(np.int64)


def _safe_split(strata: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        return _grouped_split(strata, groups, k, seed)
    except ValueError:  # every stratum smaller than k: split by group only
        logger.warning("too few patients per stratum for %d stratified splits; splitting by patient only", k)
        return _grouped_split(np.zeros_like(strata), groups, k, seed)


def patient_folds(cohort: Cohort, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, test) pairs of PATIENT indices, stratified by label (event for survival).

    The split runs over slides with sklearn's ``StratifiedGroupKFold`` grouped by patient, so
    all slides of a patient fall on one side; returned indices are patient indices.
    """
    n = len(cohort.patients)
    if k < 2:
        raise OptionError(f"`folds` must be at least 2 (got {k})")
    if k > n:
        raise OptionError(f"`folds` {k} is more than the {n} patients with labels")
    sp = cohort.slide_patient
    splits = _safe_split(_strata(cohort, np.arange(n), k)[sp], sp, k, seed)
    out = []
    for tr, te in splits:
        ptr, pte = np.unique(sp[tr]), np.unique(sp[te])
        if np.intersect1d(ptr, pte).size:  # cannot happen with a grouped splitter
            raise RuntimeError("a patient landed on both sides of a split")
        out.append((ptr, pte))
    return out


def inner_split(
    cohort: Cohort, patients: np.ndarray, fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``patients`` (indices) into (fit, validation) for early stopping.

    About ``fraction`` of them go to validation (at least one patient), stratified and
    grouped like :func:`patient_folds`; with fewer than 5 patients there is no validation
    part.  For survival the validation part holds at least one event when ``patients`` hold two.
    """
    patients = np.asarray(patients)
    if len(patients) < 5 or fraction <= 0:
        return patients, patients[:0]
    k = min(max(2, int(round(1 / fraction))), len(patients))  # at most one validation patient per split
    fit, val = _safe_split(_strata(cohort, patients, k), np.arange(len(patients)), k, seed)[0]
    fit, val = patients[fit], patients[val]
    if cohort.task == "survival" and len(val) and not cohort.y[val].any() and cohort.y[fit].sum() >= 2:
        # a validation part without events has a constant Cox loss: swap an event patient
        # of the fit part with a censored one of the validation part (fit keeps >= 1 event)
        rng = np.random.default_rng(seed)
        i = int(rng.choice(np.flatnonzero(cohort.y[fit] > 0)))
        j = int(rng.integers(len(val)))
        fit, val = fit.copy(), val.copy()
        fit[i], val[j] = val[j], fit[i]
        fit, val = np.sort(fit), np.sort(val)
    return fit, val
