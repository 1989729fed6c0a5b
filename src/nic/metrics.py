"""Metrics as pure functions of numpy arrays: one definition for every layer.

Patch-level (encoder training, the linear probe) and patient-level (slide models, the run
report) results are scored by the same functions, so a number means the same thing
wherever it is printed.  Only numpy is needed (no torch, no scipy): ranks are computed
here, with ties given their average rank as scipy's ``rankdata`` does.

Arguments are ``(y, pred)``: ``y`` (N,) targets, class indices or 0/1 labels and ``pred``
(N,) values or scores, or (N, K) class probabilities; the c-index takes
``(time, event, risk)``.  A metric that is undefined for its input (fewer than two
values, a constant side, one class only, no comparable pairs, a NaN label, value or score)
is NaN rather than an error, so cross-validation folds and bootstrap resamples can skip it.

Definitions, each checked against a reference library in the tests:

- :func:`spearman` / :func:`pearson`: ``scipy.stats.spearmanr`` / ``pearsonr``;
- :func:`auc`: 1-D scores are binary ROC AUC (``sklearn.metrics.roc_auc_score``); (N, 2)
  probabilities use column 1; (N, K > 2) is the one-vs-rest macro mean,
  ``roc_auc_score(y, pred, multi_class="ovr", average="macro")``, and NaN when any of the
  K classes is absent from ``y`` (sklearn refuses that case; averaging only the classes
  present would mix different quantities across folds and bootstrap resamples);
- :func:`accuracy` / :func:`balanced_accuracy`: ``accuracy_score`` /
  ``balanced_accuracy_score`` of the argmax (or of ``pred >= 0.5`` for 1-D probabilities);
- :func:`c_index`: Harrell's, ``lifelines.utils.concordance_index(time, -risk, event)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "auc",
    "balanced_accuracy",
    "binary_auc",
    "c_index",
    "expected_calibration_error",
    "mae",
    "pearson",
    "spearman",
]

_NAN = float("nan")


def _pair(y: np.ndarray, pred: np.ndarray, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``y`` and ``pred`` as arrays with the same number of rows (broadcasting would hide a mistake)."""
    y, pred = np.asarray(y), np.asarray(pred, dtype)
    if y.ndim != 1 or len(y) != len(pred):
        raise ValueError(f"y must be (N,) with one row per row of pred; got shapes {y.shape} and {pred.shape}")
    return y, pred


def _has_nan(*arrays: np.ndarray) -> bool:
    """Whether a float array among ``arrays`` holds a NaN (a missing label or score)."""
    return any(a.dtype.kind in "fc" and bool(np.isnan(a).any()) for a in arrays)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), tied values sharing their average rank (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, len(x)])
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def pearson(y: np.ndarray, pred: np.ndarray) -> float:
    """Pearson correlation; NaN with fewer than two values, a constant side or a NaN."""
    y, pred = _pair(y, pred)
    y = y.astype(np.float64)
    if len(y) < 2 or np.isnan(y).any() or np.isnan(pred).any() or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return _NAN
    a, b = y - y.mean(), pred - pred.mean()
    return float(np.clip(a @ b / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def spearman(y: np.ndarray, pred: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN where :func:`pearson` is."""
    y, pred = _pair(y, pred)
    y = y.astype(np.float64)
    if len(y) < 2 or np.isnan(y).any() or np.isnan(pred).any():
        return _NAN
    return pearson(_average_ranks(y), _average_ranks(pred))


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, in the target's unit; NaN for no values."""
    y, pred = _pair(y, pred)
    return float(np.mean(np.abs(y.astype(np.float64) - pred))) if len(y) else _NAN


def _hard(pred: np.ndarray) -> np.ndarray:
    """Class decisions: argmax of (N, K) probabilities, or ``pred >= 0.5`` for (N,) probabilities of class 1."""
    return (pred >= 0.5).astype(np.int64) if pred.ndim == 1 else pred.argmax(1)


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of class indices ``y`` equal to the decision of ``pred`` (see :func:`balanced_accuracy`);
    NaN for no values or a NaN."""
    y, pred = _pair(y, pred)
    if not len(y) or _has_nan(y, pred):
        return _NAN
    return float(np.mean(_hard(pred) == y.astype(np.int64)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``.

    ``pred`` (N,) probabilities of class 1 are thresholded at 0.5; (N, K) probabilities
    use the argmax.  NaN for no values or a NaN.
    """
    y, pred = _pair(y, pred)
    if not len(y) or _has_nan(y, pred):
        return _NAN
    y, hard = y.astype(np.int64), _hard(pred)
    return float(np.mean([np.mean(hard[y == k] == k) for k in np.unique(y)]))


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of labels ``y`` (N,) (non-zero = positive) against ``score`` (N,).

    The Mann-Whitney statistic with tied scores counting one half; NaN when one class is
    absent or a label or score is NaN.
    """
    y, score = _pair(y, score)
    if _has_nan(y):
        return _NAN
    pos = y.astype(bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(score).any():
        return _NAN
    r = _average_ranks(score)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(y: np.ndarray, pred: np.ndarray) -> float:
    """ROC AUC of class indices ``y`` (N,) against scores ``pred``.

    ``pred`` (N,): binary, ``y`` non-zero = positive.  (N, 2): binary with the scores of
    class 1.  (N, K > 2): the mean over the K classes of the one-vs-rest AUC of column k
    for class k; NaN unless every class 0..K-1 occurs in ``y`` and none is all of it, and
    NaN for a NaN label or score.
    """
    y, pred = _pair(y, pred)
    if _has_nan(y, pred):
        return _NAN
    if pred.ndim == 1:
        return binary_auc(y, pred)
    if pred.ndim != 2:
        raise ValueError(f"pred must be (N,) scores or (N, K) class probabilities; got shape {pred.shape}")
    y = y.astype(np.int64)
    if pred.shape[1] == 2:
        return binary_auc(y == 1, pred[:, 1])
    if not np.isin(y, np.arange(pred.shape[1])).all():
        return _NAN
    return float(np.mean([binary_auc(y == k, pred[:, k]) for k in range(pred.shape[1])]))


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; higher ``risk`` should mean an earlier event.

    Comparable pairs (i, j): i had the event and ``t_i < t_j``, or ``t_i == t_j`` with j
    censored (j was still at risk when i died); two events at the same time are not
    comparable.  A pair is concordant when ``risk_i > risk_j``; tied risks count 1/2.
    Equals ``lifelines.utils.concordance_index(time, -risk, event)``.  NaN without pairs,
    and NaN when a time or risk is not finite or an event is NaN (as the other metrics;
    lifelines raises).
    """
    t, risk = _pair(time, risk)
    t = t.astype(np.float64)
    event = np.asarray(event)
    e = event.astype(bool)
    if e.shape != t.shape:
        raise ValueError(f"event must be (N,) like time; got shapes {e.shape} and {t.shape}")
    if not (np.isfinite(t).all() and np.isfinite(risk.astype(np.float64)).all()) or _has_nan(event):
        return _NAN
    num, den = 0.0, 0
    for i in np.flatnonzero(e):  # one row of the N x N pair table at a time: patient cohorts are small
        comp = (t > t[i]) | ((t == t[i]) & ~e)
        if comp.any():
            rj = risk[comp]
            num += float((risk[i] > rj).sum() + 0.5 * (risk[i] == rj).sum())
            den += int(comp.sum())
    return num / den if den else _NAN


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins.

    Binary: ``prob`` (N,) of class 1, bins over ``prob`` and the observed rate of class 1
    per bin.  Multiclass: ``prob`` (N, K), top-label calibration (confidence = the largest
    probability, accuracy = whether that class is ``y``).  ECE = sum_b n_b/N |acc_b - conf_b|.
    NaN for no values or a NaN.
    """
    y, prob = _pair(y, prob)
    if not len(y) or _has_nan(y, prob):
        return _NAN
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
