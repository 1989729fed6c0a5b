"""Patient-level metrics as pure functions of numpy arrays, and bootstrap CIs.

All take ``(y, pred)`` with ``y`` (N,) targets / class indices / events and ``pred`` (N,)
values, probabilities or log-risks (or (N, K) class probabilities for multiclass); the
c-index also takes ``time`` (N,).  Risk convention: higher ``pred`` = higher risk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TASK_METRICS",
    "spearman",
    "pearson",
    "mae",
    "auc",
    "balanced_accuracy",
    "c_index",
    "compute_metric",
    "bootstrap_ci",
    "binary_auc",
    "expected_calibration_error",
    "survival_analysis",
    "SurvivalAnalysis",
]


def spearman(y: np.ndarray, pred: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if np.ptp(y) == 0 or np.ptp(pred) == 0:
        return float("nan")
    return float(spearmanr(y, pred).statistic)


def pearson(y: np.ndarray, pred: np.ndarray) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if np.ptp(y) == 0 or np.ptp(pred) == 0:
        return float("nan")
    return float(np.corrcoef(y, pred)[0, 1])


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, in the target's unit."""
    return float(np.mean(np.abs(np.asarray(y, float) - np.asarray(pred, float))))


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of boolean labels ``y`` (N,) against scores (N,) (Mann-Whitney, ties halved);
    NaN when one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, pred: np.ndarray) -> float:
    """ROC AUC; (N, K) class probabilities give the macro one-vs-rest mean over classes present."""
    pred = np.asarray(pred, float)
    y = np.asarray(y).astype(np.int64)
    if pred.ndim == 1:
        return binary_auc(y, pred)
    vals = [binary_auc(y == k, pred[:, k]) for k in range(pred.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(vals)) if len(vals) == pred.shape[1] else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall; binary ``pred`` are probabilities (threshold 0.5), (N, K) uses argmax."""
    pred = np.asarray(pred, float)
    y = np.asarray(y).astype(np.int64)
    hard = (pred >= 0.5).astype(np.int64) if pred.ndim == 1 else pred.argmax(1)
    return float(np.mean([np.mean(hard[y == k] == k) for k in np.unique(y)]))


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; higher ``risk`` should mean an earlier event.

    Comparable pairs (i, j): i had the event and ``t_i < t_j``, or ``t_i == t_j`` with j
    censored (lifelines' rule).  Concordant when ``risk_i > risk_j``; tied risks count 1/2.
    Equals ``lifelines.utils.concordance_index(time, -risk, event)``.  NaN without pairs.
    """
    t = np.asarray(time, float)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, float)
    num, den = 0.0, 0
    for i in np.flatnonzero(e):  # O(N^2) in chunks of one row: fine for patient cohorts
        comp = (t > t[i]) | ((t == t[i]) & ~e)
        if not comp.any():
            continue
        rj = r[comp]
        num += float((r[i] > rj).sum() + 0.5 * (r[i] == rj).sum())
        den += int(comp.sum())
    return num / den if den else float("nan")


#: metric names computed for each task (keys of ``metrics.json``)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("spearman", "pearson", "mae"),
    "binary": ("auc", "balanced_accuracy"),
    "multiclass": ("auc", "balanced_accuracy"),
    "survival": ("c_index",),
}

_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": spearman,
    "pearson": pearson,
    "mae": mae,
    "auc": auc,
    "balanced_accuracy": balanced_accuracy,
}


def compute_metric(name: str, y: np.ndarray, pred: np.ndarray, time: np.ndarray | None = None) -> float:
    """Metric ``name`` (a value of :data:`TASK_METRICS`); survival passes ``y`` = events."""
    if name == "c_index":
        if time is None:
            raise ValueError("c_index needs times")
        return c_index(time, y, pred)
    return _FUNCS[name](y, pred)


def bootstrap_ci(
    name: str,
    y: np.ndarray,
    pred: np.ndarray,
    time: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of metric ``name``, resampling rows (patients) with replacement.

    Resamples where the metric is undefined (e.g. one class only) are skipped.
    """
    rng = np.random.default_rng(seed)
    y, pred = np.asarray(y), np.asarray(pred)
    n = len(y)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = compute_metric(name, y[idx], pred[idx], None if time is None else np.asarray(time)[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return float(lo), float(hi)


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins.

    Binary: ``prob`` (N,) of class 1, bins over ``prob`` and the observed rate of class 1
    per bin.  Multiclass: ``prob`` (N, K), top-label calibration (confidence = the largest
    probability, accuracy = whether that class is ``y``).  ECE = sum_b n_b/N |acc_b - conf_b|.
    """
    y, prob = np.asarray(y), np.asarray(prob, np.float64)
    if prob.ndim == 2:
        conf, hit = prob.max(1), (prob.argmax(1) == y).astype(np.float64)
    else:
        conf, hit = prob, (y == 1).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


@dataclass
class SurvivalAnalysis:
    """Survival results of out-of-fold log-risks (lifelines and scikit-survival inside).

    ``groups``: risk group per patient (0 low .. G-1 high, by risk quantiles);
    ``km``: per group (times, survival probabilities) of the Kaplan-Meier estimate;
    ``logrank_p``: the multivariate log-rank test across the groups;
    ``times``, ``td_auc``, ``mean_td_auc``: cumulative/dynamic AUC at the 25/50/75%
    quantiles of the event times (inverse-probability-of-censoring weighted);
    ``ibs``: the integrated Brier score of the survival functions
    ``S(t | r) = S0(t)^exp(r)``, ``S0`` the Breslow baseline of the log-risks themselves,
    over the 10th-90th percentile of the event times, and ``ibs_km`` the same for the
    Kaplan-Meier curve alone (the reference a useful model beats).
    """

    groups: np.ndarray
    km: list[tuple[np.ndarray, np.ndarray]]
    logrank_p: float
    times: np.ndarray
    td_auc: np.ndarray
    mean_td_auc: float
    ibs: float
    ibs_km: float


def survival_analysis(time: np.ndarray, event: np.ndarray, risk: np.ndarray, n_groups: int = 3) -> SurvivalAnalysis:
    """Kaplan-Meier curves of risk groups, log-rank test, time-dependent AUC and the
    integrated Brier score; see :class:`SurvivalAnalysis`."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test
    from sksurv.functions import StepFunction
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.metrics import cumulative_dynamic_auc, integrated_brier_score
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    time, event, risk = np.asarray(time, np.float64), np.asarray(event).astype(bool), np.asarray(risk, np.float64)
    cuts = np.quantile(risk, np.linspace(0, 1, n_groups + 1)[1:-1])
    groups = np.searchsorted(cuts, risk, side="right")
    km = []
    for g in range(n_groups):
        fit = KaplanMeierFitter().fit(time[groups == g], event[groups == g])
        sf = fit.survival_function_
        km.append((sf.index.to_numpy(np.float64), sf.iloc[:, 0].to_numpy(np.float64)))
    logrank_p = float(multivariate_logrank_test(time, groups, event).p_value)
    y = Surv.from_arrays(event, time)
    ev_times = time[event]
    # evaluation times strictly inside the follow-up, where the censoring estimate is defined
    lo, hi = np.quantile(ev_times, [0.1, 0.9])
    hi = min(hi, np.nextafter(time.max(), -np.inf))
    times = np.unique(np.quantile(ev_times, [0.25, 0.5, 0.75]).clip(lo, hi))
    td_auc, mean_auc = cumulative_dynamic_auc(y, y, risk, times)
    grid = np.unique(np.linspace(lo, hi, 50))
    breslow = BreslowEstimator().fit(risk, event, time)
    surv = np.stack([fn(grid) for fn in breslow.get_survival_function(risk)])
    ibs = integrated_brier_score(y, y, surv, grid)
    km_t, km_s = kaplan_meier_estimator(event, time)
    km_fn = StepFunction(np.concatenate([[0.0], km_t]), np.concatenate([[1.0], km_s]))
    ibs_km = integrated_brier_score(y, y, np.tile(km_fn(grid), (len(time), 1)), grid)
    return SurvivalAnalysis(
        groups, km, logrank_p, times, np.asarray(td_auc), float(mean_auc), float(ibs), float(ibs_km)
    )
