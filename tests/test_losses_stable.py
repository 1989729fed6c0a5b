"""The Cox loss stays finite and exact when a risk set lies far below the largest log-risk."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from nic.learn import cox_ph_loss


def _mp_cox(r: list, t: list[float], ev: list[int], ties: str) -> mpmath.mpf:
    """-log L / n_events straight from the definition, in 60-digit arithmetic."""
    ll = mpmath.mpf(0)
    for tau in sorted({ti for ti, e in zip(t, ev) if e}):
        s_r = mpmath.fsum(mpmath.exp(rj) for rj, tj in zip(r, t) if tj >= tau)
        dk = [ri for ri, ti, e in zip(r, t, ev) if e and ti == tau]
        s_d = mpmath.fsum(mpmath.exp(ri) for ri in dk)
        ll += mpmath.fsum(dk)
        for k in range(len(dk)):
            c = mpmath.mpf(k) / len(dk) if ties == "efron" else 0
            ll -= mpmath.log(s_r - c * s_d)
    return -ll / sum(ev)


def _mp_reference(r: list[float], t: list[float], ev: list[int], ties: str) -> tuple[float, list[float]]:
    """Loss and gradient (numerical differentiation at 60 digits) as floats."""
    with mpmath.workdps(60):
        x = [mpmath.mpf(v) for v in r]
        loss = _mp_cox(x, t, ev, ties)
        grad = []
        for j in range(len(r)):
            order = tuple(int(i == j) for i in range(len(r)))
            grad.append(float(mpmath.diff(lambda *a: _mp_cox(list(a), t, ev, ties), x, order)))
    return float(loss), grad


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize(("top", "dtype"), [(90.0, torch.float32), (110.0, torch.float32), (800.0, torch.float64)])
def test_cox_loss_risk_set_far_below_the_maximum(top: float, dtype: torch.dtype, ties: str) -> None:
    # times [1, 2], both events: loss = log(1 + e^-top) / 2, gradient (-s/2, s/2) with s = 1 / (1 + e^top)
    r = torch.tensor([top, 0.0], dtype=dtype, requires_grad=True)
    loss = cox_ph_loss(r, torch.tensor([1.0, 2.0]), torch.tensor([1, 1]), ties)  # type: ignore[arg-type]
    loss.backward()
    assert r.grad is not None
    assert math.isfinite(float(loss.detach())) and torch.isfinite(r.grad).all()
    s = 1 / (1 + math.exp(top)) if top < 700 else 0.0
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-top)) / 2, abs=1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # float32: ulp(top) ~ 1e-5
    assert r.grad.tolist() == pytest.approx([-s / 2, s / 2], abs=tol)


# a tie of two events at the top (t=1), a tie of three events 300 below it (t=5),
# a censored sample and a lone event far below everything (t=9)
_R = [300.0, 299.5, 1.0, 1.2, -0.5, 0.3, -40.0]
_T = [1.0, 1.0, 5.0, 5.0, 5.0, 7.0, 9.0]
_E = [1, 1, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cox_loss_ties_at_extreme_risks_match_high_precision_reference(ties: str, dtype: torch.dtype) -> None:
    want_loss, want_grad = _mp_reference(_R, _T, _E, ties)
    # in shuffled order: the loss cannot depend on how the samples are listed
    perm = [4, 0, 6, 2, 5, 1, 3]
    r = torch.tensor([_R[i] for i in perm], dtype=dtype, requires_grad=True)
    loss = cox_ph_loss(r, torch.tensor([_T[i] for i in perm]), torch.tensor([_E[i] for i in perm]), ties)  # type: ignore[arg-type]
    loss.backward()
    assert r.grad is not None
    tol = 1e-4 if dtype == torch.float32 else 1e-10  # float32: ulp(300) ~ 3e-5
    assert float(loss.detach()) == pytest.approx(want_loss, abs=tol)
    got = [0.0] * len(perm)
    for k, i in enumerate(perm):
        got[i] = float(r.grad[k])
    assert got == pytest.approx(want_grad, abs=tol)
    # the two approximations differ here (ties), so the reference does tell them apart
    other = _mp_reference(_R, _T, _E, "efron" if ties == "breslow" else "breslow")[0]
    assert abs(other - want_loss) > 100 * tol
