"""Losses of nic.learn and its metrics by name with bootstrap CIs, against reference libraries and
hand-computed answers (the metric functions themselves: tests/test_metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nic.errors import OptionError
from nic.learn import bootstrap_ci, cox_ph_loss, task_loss
from nic.learn.metrics import compute_metric
from nic.metrics import c_index, spearman


def _hand_cox(r: np.ndarray, ties: str) -> float:
    """times [1, 2, 2, 3], events [1, 1, 1, 0]: two event times, a tie of two at t=2."""
    e = np.exp(r)
    ll = r[0] - math.log(e.sum())
    s_r, s_d = e[1:].sum(), e[1] + e[2]
    ll += r[1] + r[2]
    if ties == "breslow":
        ll -= 2 * math.log(s_r)
    else:
        ll -= math.log(s_r) + math.log(s_r - 0.5 * s_d)
    return -ll / 3


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_hand_computed(ties: str) -> None:
    r = np.array([0.5, -0.2, 0.3, 0.1])
    got = cox_ph_loss(torch.tensor(r), torch.tensor([1.0, 2, 2, 3]), torch.tensor([1, 1, 1, 0]), ties)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(_hand_cox(r, ties), rel=1e-10)
    # shifting every risk by a constant does not change a partial likelihood
    shifted = cox_ph_loss(torch.tensor(r + 7.0), torch.tensor([1.0, 2, 2, 3]), torch.tensor([1, 1, 1, 0]), ties)  # type: ignore[arg-type]
    assert float(shifted) == pytest.approx(float(got), rel=1e-9)


def test_cox_efron_matches_lifelines_and_breslow_equals_efron_without_ties() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(3)
    n = 60
    x = rng.normal(size=n)
    t = np.ceil(rng.exponential(np.exp(-0.8 * x)) * 4)  # integer times: many ties
    ev = (rng.uniform(size=n) < 0.75).astype(int)
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": t, "e": ev}), "t", "e")
    beta = float(cph.params_["x"])
    risk = torch.tensor(beta * x, dtype=torch.float64)
    loss = cox_ph_loss(risk, torch.tensor(t), torch.tensor(ev), "efron")
    assert -float(loss) * ev.sum() == pytest.approx(cph.log_likelihood_, rel=1e-6)
    t_unique = t + rng.uniform(0, 0.01, n)  # no ties: the two approximations agree
    b = cox_ph_loss(risk, torch.tensor(t_unique), torch.tensor(ev), "breslow")
    e = cox_ph_loss(risk, torch.tensor(t_unique), torch.tensor(ev), "efron")
    assert float(b) == pytest.approx(float(e), rel=1e-12)
    # with ties Breslow's denominator is larger, so its loss is larger
    assert float(cox_ph_loss(risk, torch.tensor(t), torch.tensor(ev), "breslow")) > float(loss)


def test_cox_loss_gradient_and_no_events() -> None:
    r = torch.zeros(5, requires_grad=True)
    loss = cox_ph_loss(r, torch.arange(5.0), torch.tensor([1, 0, 1, 0, 0]))
    loss.backward()
    assert torch.isfinite(r.grad).all() and r.grad[0] < 0  # raising an early event's risk lowers the loss
    z = torch.zeros(3, requires_grad=True)
    none = cox_ph_loss(z, torch.arange(3.0), torch.zeros(3))
    none.backward()
    assert float(none.detach()) == 0.0 and z.grad is not None
    with pytest.raises(OptionError, match="`ties` must be one of efron, breslow"):
        cox_ph_loss(r, torch.arange(5.0), torch.ones(5), "exact")  # type: ignore[arg-type]


def test_task_losses_match_torch() -> None:
    out = torch.tensor([[0.2], [-1.0], [2.0]])
    y = torch.tensor([1.0, 0.0, 1.0])
    assert float(task_loss("regression", out, y)) == pytest.approx(float(((out[:, 0] - y) ** 2).mean()))
    w = torch.tensor([3.0])
    want = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y, pos_weight=w)
    assert float(task_loss("binary", out, y, class_weight=w)) == pytest.approx(float(want))
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    assert float(task_loss("multiclass", logits, torch.tensor([0, 1]))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    )


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=100)
    pred = y + rng.normal(scale=0.5, size=100)
    lo, hi = bootstrap_ci("spearman", y, pred, n_boot=300, seed=1)
    assert lo < spearman(y, pred) < hi and hi - lo < 0.3
    assert (lo, hi) == bootstrap_ci("spearman", y, pred, n_boot=300, seed=1)
    time = rng.exponential(size=100)
    ev = rng.integers(0, 2, 100)
    lo, hi = bootstrap_ci("c_index", ev, -time, time, n_boot=200)
    assert 0.5 < lo <= hi <= 1.0


def test_compute_metric_names_the_nic_metrics() -> None:
    rng = np.random.default_rng(5)
    time, ev, risk = rng.exponential(size=30), rng.integers(0, 2, 30), rng.normal(size=30)
    assert compute_metric("c_index", ev, risk, time) == c_index(time, ev, risk)
    assert compute_metric("spearman", time, risk) == spearman(time, risk)
    with pytest.raises(ValueError, match="times"):
        compute_metric("c_index", ev, risk)
