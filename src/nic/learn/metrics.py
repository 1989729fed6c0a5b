"""Which metrics each task reports, their bootstrap CIs, and the survival analysis of a run.

The metric functions themselves live in :mod:`nic.metrics` (pure numpy, shared with
encoder training); this module names the ones each task reports (the keys of
``metrics.json``), computes them by name, bootstraps their CIs over patients, and runs
the Kaplan-Meier / log-rank / time-dependent AUC / Brier analysis of survival runs
(lifelines and scikit-survival inside).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nic.metrics import auc, balanced_accuracy, c_index, mae, pearson, spearman

__all__ = [
    "TASK_METRICS",
    "compute_metric",
    "bootstrap_ci",
    "survival_analysis",
    "SurvivalAnalysis",
]


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
