"""nic.metrics against scikit-learn, scipy and lifelines on random data with ties, and on the edge
cases where a metric is undefined (one class, constant predictions, no comparable pairs)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from nic.metrics import (
    accuracy,
    auc,
    balanced_accuracy,
    binary_auc,
    c_index,
    expected_calibration_error,
    mae,
    pearson,
    spearman,
)

SEEDS = range(12)


def _sklearn_auc(y: object, score: object, **kw: object) -> float:
    """sklearn's ROC AUC, NaN where it calls the score undefined (older versions raise, newer warn)."""
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_auc_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            return float(roc_auc_score(y, score, **kw))
        except ValueError:
            return float("nan")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_correlations_match_scipy_with_ties(seed: int) -> None:
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 80))
    a = np.round(rng.normal(size=n), int(rng.integers(0, 2)))  # rounding: many tied values
    b = np.round(a * rng.uniform(-1, 1) + rng.normal(size=n), 1)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert pearson(a, b) == pytest.approx(pearsonr(a, b).statistic, abs=1e-12)


def test_correlations_known_answers_and_undefined_cases() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(y, y[::-1]) == pytest.approx(-1.0)
    assert spearman(y, [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert spearman(y, y**3) == pytest.approx(1.0) and pearson(y, y**3) < 1.0
    for f in (spearman, pearson):
        assert math.isnan(f(y, np.ones(5)))  # constant predictions
        assert math.isnan(f(np.ones(5), y))  # constant targets
        assert math.isnan(f([1.0], [2.0]))  # one value
        assert math.isnan(f([], []))
        assert math.isnan(f([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]))


def test_mae_matches_sklearn() -> None:
    from sklearn.metrics import mean_absolute_error

    rng = np.random.default_rng(0)
    y, p = rng.normal(size=40), rng.normal(size=40)
    assert mae(y, p) == pytest.approx(mean_absolute_error(y, p))
    assert mae([1, 2, 3, 4, 5], [2, 1, 5, 2, 5]) == pytest.approx(6 / 5)
    assert math.isnan(mae([], []))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_matches_sklearn_with_tied_scores(seed: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 100))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(y * rng.uniform(0, 1) + rng.uniform(size=n), 1)  # rounded: tied scores
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert binary_auc(y.astype(bool), s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # (N, 2) class probabilities: the scores of class 1, as sklearn's binary case takes the greater label's
    two = np.stack([1 - s, s], 1)
    assert auc(y, two) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_binary_auc_known_answers_and_undefined_cases() -> None:
    from sklearn.metrics import roc_auc_score

    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # hand-computed
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5 == roc_auc_score([0, 1, 0, 1], [0.5] * 4)  # constant
    assert auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0 and auc([0, 0, 1], [0.3, 0.2, 0.1]) == 0.0
    assert math.isnan(_sklearn_auc([1, 1, 1], [0.1, 0.2, 0.3]))  # one class: undefined for both
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))
    assert math.isnan(auc([0, 1], [0.2, np.nan]))


@pytest.mark.parametrize("k", [3, 4, 6])
def test_multiclass_auc_is_sklearns_one_vs_rest_macro(k: int) -> None:
    from sklearn.metrics import roc_auc_score

    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3 * k, 150))
        y = rng.integers(0, k, n)
        y[:k] = np.arange(k)  # every class present
        logits = np.round(rng.normal(size=(n, k)) + rng.uniform(0, 2) * np.eye(k)[y], 1)
        prob = _softmax(logits)
        prob[: n // 4] = prob[0]  # a block of identical rows: tied scores in every column
        want = roc_auc_score(y, prob, multi_class="ovr", average="macro")
        assert auc(y, prob) == pytest.approx(want, abs=1e-12)


def test_multiclass_auc_undefined_when_a_class_is_absent() -> None:
    rng = np.random.default_rng(5)
    prob = _softmax(rng.normal(size=(30, 3)))
    y = rng.integers(0, 2, 30)  # class 2 never occurs
    assert math.isnan(_sklearn_auc(y, prob, multi_class="ovr", labels=[0, 1, 2]))
    assert math.isnan(auc(y, prob))
    assert math.isnan(auc(np.zeros(30, int), prob))  # one class only
    assert math.isnan(auc(np.full(30, 3), prob))  # a label without a column
    # constant predictions are defined: every one-vs-rest AUC is 1/2
    assert auc(np.arange(30) % 3, np.full((30, 3), 1 / 3)) == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracies_match_sklearn(seed: int) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 90))
    y3 = rng.integers(0, 3, n)
    prob = _softmax(rng.normal(size=(n, 3)) + np.eye(3)[y3])
    assert accuracy(y3, prob) == pytest.approx(accuracy_score(y3, prob.argmax(1)))
    assert balanced_accuracy(y3, prob) == pytest.approx(balanced_accuracy_score(y3, prob.argmax(1)))
    y = rng.integers(0, 2, n)
    p = np.round(rng.uniform(size=n), 1)  # some exactly 0.5: class 1, as sklearn's 0.5 threshold here
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, (p >= 0.5).astype(int)))
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, (p >= 0.5).astype(int)))


def test_accuracies_edge_cases() -> None:
    # a class predicted but absent from y does not enter the balanced mean (sklearn warns and drops it too)
    assert balanced_accuracy([0, 0, 1, 1], np.eye(3)[[0, 2, 1, 1]]) == pytest.approx((0.5 + 1.0) / 2)
    assert balanced_accuracy([1, 1, 1], [0.9, 0.2, 0.7]) == pytest.approx(2 / 3)  # one class: its recall
    assert accuracy([0, 1, 1], np.full((3, 2), 0.5)) == pytest.approx(1 / 3)  # constant: argmax picks class 0
    assert math.isnan(accuracy([], np.zeros((0, 3)))) and math.isnan(balanced_accuracy([], []))


def _survival(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    risk = np.round(rng.normal(size=n), 1)  # tied risks
    time = np.ceil(rng.exponential(np.exp(-risk)) * 3)  # integer times: tied event and censoring times
    event = rng.uniform(size=n) < 0.6
    return time, event, risk


@pytest.mark.parametrize("seed", SEEDS)
def test_c_index_matches_lifelines_with_ties(seed: int) -> None:
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(seed)
    time, event, risk = _survival(rng, int(rng.integers(5, 150)))
    if not event.any():
        event[0] = True
    ours = c_index(time, event, risk)
    assert ours == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    assert c_index(time, event, -risk) == pytest.approx(1 - ours, abs=1e-12)  # tied risks count 1/2 both ways


def test_c_index_known_answers_and_undefined_cases() -> None:
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(0)
    time, event, risk = _survival(rng, 200)
    assert c_index(time, event, risk) > 0.6  # the sign is right: higher risk, earlier event
    assert c_index(time, event, np.zeros(200)) == 0.5  # constant predictions
    # times 1 (event), 2 (event), 3 (censored); risks 3, 2, 1: all three pairs concordant
    assert c_index([1, 2, 3], [1, 1, 0], [3, 2, 1]) == 1.0
    assert c_index([1, 2, 3], [1, 1, 0], [1, 2, 3]) == 0.0
    # a death and a censoring at the same time are comparable (the censored one was still at risk) ...
    assert c_index([2, 2], [1, 0], [1, 0]) == 1.0 == concordance_index([2, 2], [0, 1], [1, 0])
    # ... two deaths at the same time are not
    assert math.isnan(c_index([2, 2], [1, 1], [1, 0]))
    with pytest.raises(ZeroDivisionError):
        concordance_index([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0, 0])  # lifelines: "no admissable pairs"
    assert math.isnan(c_index([1, 2, 3], [0, 0, 0], [1, 2, 3]))  # no events
    assert math.isnan(c_index([1, 2, 3], [0, 0, 1], [1, 2, 3]))  # only the last time is an event
    assert math.isnan(c_index([1, 2, 3], [1, 1, 1], [1.0, np.nan, 3.0]))  # a risk that is not a number
    assert math.isnan(c_index([1, np.inf, 3], [1, 1, 1], [1.0, 2.0, 3.0]))


def test_expected_calibration_error_known_answers() -> None:
    # binary: bins [0.1, 0.2) and [0.8, 0.9); observed rates 0 and 1 -> |0 - 0.1| and |1 - 0.85| halves
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.1, 0.8, 0.9]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.15)
    # multiclass top label: confidence 0.6 right, 0.6 wrong -> |0.5 - 0.6|
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2]])
    assert expected_calibration_error([0, 0], probs) == pytest.approx(0.1)
    assert math.isnan(expected_calibration_error([], []))


def test_a_nan_label_makes_every_metric_nan() -> None:
    # a missing label is undefined input, as a NaN score is: never a positive, an event or a miss
    y, score = np.array([0.0, np.nan, 1.0, 0.0]), np.array([0.1, 0.05, 0.8, 0.2])
    probs = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.05
    for f in (spearman, pearson, mae, auc, binary_auc, accuracy, balanced_accuracy, expected_calibration_error):
        assert math.isnan(f(y, score)), f.__name__
    for f in (auc, accuracy, balanced_accuracy, expected_calibration_error):
        assert math.isnan(f([0.0, 1.0, np.nan, 2.0], probs)), f.__name__
    assert math.isnan(c_index([1.0, 2.0, 3.0], [1.0, np.nan, 0.0], [3.0, 2.0, 1.0]))
    assert math.isnan(accuracy([0, 1], [0.2, np.nan]))  # a NaN score too


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="one row per row"):
        mae([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one row per row"):
        auc([0, 1, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="event"):
        c_index([1.0, 2.0], [1], [0.1, 0.2])


def test_importing_metrics_needs_neither_torch_nor_scipy() -> None:
    code = "import sys, nic.metrics; print(sorted({'torch', 'scipy', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
