"""Regression target transforms: known values, round trips, the auto rule, saved models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nic.errors import DataError, OptionError
from nic.learn import ModelSpec, SlideModel, TargetScale, create_model


def test_none_is_the_standard_score() -> None:
    y = np.array([1.0, 2.0, 3.0, 6.0])
    t = TargetScale.fit(y, "none")
    np.testing.assert_allclose(t.forward(y), (y - 3.0) / np.std(y), rtol=1e-6)
    np.testing.assert_allclose(t.inverse(t.forward(y)), y, rtol=1e-6)


def test_log_of_positive_targets_has_no_offset() -> None:
    y = np.array([1.0, 10.0, 100.0])
    t = TargetScale.fit(y, "log")
    assert t.offset == 0.0
    # log10-spaced targets are evenly spaced after the log: -1.2247, 0, 1.2247
    np.testing.assert_allclose(t.forward(y), [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-6)
    np.testing.assert_allclose(t.inverse(np.array([0.0])), [10.0], rtol=1e-6)  # the geometric mean


def test_log_offsets_zero_counts_by_half_the_smallest_positive_target() -> None:
    y = np.array([0.0, 0.4, 2.0, 8.0])
    t = TargetScale.fit(y, "log")
    assert t.offset == pytest.approx(0.2)
    z = np.log(y + 0.2)
    np.testing.assert_allclose(t.forward(y), (z - z.mean()) / z.std(), rtol=1e-5)
    np.testing.assert_allclose(t.inverse(t.forward(y)), y, atol=1e-5)


def test_log_refuses_negative_targets() -> None:
    with pytest.raises(DataError, match="log needs targets >= 0.*use rank or none"):
        TargetScale.fit(np.array([-1.0, 2.0, 3.0]), "log")


def test_a_held_out_zero_meets_the_cohort_offset_and_predictions_stay_non_negative() -> None:
    y = np.array([0.0, 3.0, 5.0, 8.0, 20.0, 100.0])
    kind, offset = TargetScale.resolve(y)  # decided on the whole cohort
    assert (kind, offset) == ("log", 1.5)
    t = TargetScale.fit(y[1:], kind, offset)  # a fold whose fit part has no zero
    z = t.forward(y)
    assert np.isfinite(z).all() and z[0] > -4  # not log(1e-300)
    np.testing.assert_allclose(t.inverse(z), y, atol=1e-4)
    assert t.inverse(np.array([-50.0]))[0] == 0.0  # never below the smallest possible target


def test_rank_gives_normal_scores_with_ties_averaged() -> None:
    y = np.array([5.0, 1.0, 1.0, 30.0, 2.0])
    t = TargetScale.fit(y, "rank")
    q = stats.norm.ppf((stats.rankdata(y) - 0.5) / 5)  # ties share rank 1.5
    np.testing.assert_allclose(t.forward(y), (q - q.mean()) / q.std(), rtol=1e-5)
    # a new value between two training targets is placed between their scores, and back
    mid = t.forward(np.array([3.5]))[0]
    lo, hi = t.forward(np.array([2.0, 5.0]))
    assert lo < mid < hi
    np.testing.assert_allclose(t.inverse(np.array([mid])), [3.5], rtol=1e-5)
    # predictions stay within the training range
    assert t.inverse(np.array([-50.0, 50.0])).tolist() == [1.0, 30.0]


def test_auto_takes_the_log_of_skewed_non_negative_targets_only() -> None:
    rng = np.random.default_rng(0)
    assert TargetScale.fit(np.exp(rng.uniform(0, np.log(120), 200)), "auto").kind == "log"
    assert TargetScale.fit(rng.uniform(10, 20, 200), "auto").kind == "none"
    assert TargetScale.fit(rng.normal(size=200), "auto").kind == "none"  # negative values
    assert TargetScale.fit(np.ones(5), "auto").kind == "none"
    with pytest.raises(OptionError, match="`target_transform` must be one of"):
        TargetScale.fit(np.ones(5), "sqrt")


def test_saved_models_keep_their_transform_and_old_runs_still_load(tmp_path: Path) -> None:
    spec = ModelSpec(3, 1, width=8, input_size=4)
    scale = TargetScale.fit(np.array([0.0, 1.0, 4.0, 9.0, 60.0]), "log")
    SlideModel("meanpool", spec, "regression", 4, create_model("meanpool", spec), scale).save(tmp_path / "m")
    back = SlideModel.load(tmp_path / "m")
    assert back.target == scale
    z = np.array([[0.3], [-1.0]])
    np.testing.assert_allclose(back.to_prediction(z), scale.inverse(z[:, 0]))
    # a model.json written before transforms existed: a plain mean and standard deviation
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    del meta["target"]
    meta.update(target_mean=2.0, target_std=3.0)
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert SlideModel.load(tmp_path / "m").to_prediction(np.array([[1.0]])).tolist() == [5.0]
