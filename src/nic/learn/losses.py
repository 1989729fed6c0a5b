"""Losses as plain functions of tensors, one per task.

Survival convention (used everywhere in :mod:`nic.learn`): the model output is a
log-risk (log hazard ratio); HIGHER output = HIGHER risk = shorter expected survival.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.nn import functional as F

from nic.errors import OptionError

__all__ = ["cox_ph_loss", "task_loss", "TIES"]

Ties = Literal["breslow", "efron"]
#: The approximations for tied event times a Cox loss takes.
TIES: tuple[str, ...] = ("efron", "breslow")


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: Ties = "efron") -> torch.Tensor:
    """Negative Cox log partial likelihood per event.

    Args:
        risk: (N,) log-risk scores (higher = earlier event).
        time: (N,) follow-up times (any unit).
        event: (N,) 1 where the event was observed, 0 where censored.
        ties: ``"breslow"`` or ``"efron"`` approximation for tied event times.

    Returns:
        Scalar ``-log L / n_events``; with ``log L = sum_k [sum_{i in D_k} r_i -
        sum_{l<d_k} log(sum_{j: t_j >= t_k} e^{r_j} - c_l sum_{i in D_k} e^{r_i})]``,
        ``c_l = 0`` (Breslow) or ``l / d_k`` (Efron).  0 (with a gradient) when no event.
    """
    if ties not in TIES:
        raise OptionError(f"`ties` must be one of {', '.join(TIES)} (got {ties!r})")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    ev = event.reshape(-1).bool()
    n_events = int(ev.sum())
    if n_events == 0:
        return risk.sum() * 0.0
    # latest time first: the running log-sum-exp up to the last sample of a time is the
    # log of that time's risk-set sum, exact however far below the global maximum it lies
    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], ev[order]
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)  # (N,), (G,)
    lse_r = torch.logcumsumexp(r, 0)[counts.cumsum(0) - 1]  # (G,) log sum_{j: t_j >= t_g} e^{r_j}
    ge, re = group[e], r[e]  # group and risk of each event
    n_groups = len(counts)
    d = torch.zeros(n_groups, dtype=risk.dtype, device=risk.device).index_add_(0, ge, torch.ones_like(re))  # (G,)
    has = d > 0
    if ties == "breslow":
        log_den = d[has] * lse_r[has]
    else:
        # log sum_{i in D_g} e^{r_i}, shifted by the group's largest event risk
        top = torch.full((n_groups,), -math.inf, dtype=risk.dtype, device=risk.device)
        top = top.scatter_reduce(0, ge, re.detach(), reduce="amax")
        s_d = torch.zeros_like(top).index_add(0, ge, torch.exp(re - top[ge]))
        lse_d = top[has] + torch.log(s_d[has])
        dg, lse_rg = d[has], lse_r[has]
        # S_D <= S_R: the ratio is at most 1 up to rounding, and l / d < 1 keeps log1p finite
        ratio = torch.exp(torch.clamp(lse_d - lse_rg, max=0.0))  # (U,)
        ls = torch.arange(int(dg.max()), dtype=risk.dtype, device=risk.device)  # (L,)
        valid = ls[None, :] < dg[:, None]  # (U, L)
        frac = torch.where(valid, ls[None, :] / dg[:, None], torch.zeros_like(valid, dtype=risk.dtype))
        log_den = (lse_rg[:, None] + torch.log1p(-frac * ratio[:, None])) * valid
        log_den = log_den.sum(1)
    loglik = risk[ev].sum() - log_den.sum()
    return -loglik / n_events


def task_loss(
    task: str,
    out: torch.Tensor,
    y: torch.Tensor,
    time: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ties: Ties = "efron",
) -> torch.Tensor:
    """The loss of ``task`` for raw outputs ``out`` (B, n_outputs).

    regression: MSE against ``y`` (B,) float; binary: BCE with logits, ``class_weight`` a
    (1,) positive-class weight; multiclass: cross-entropy, ``class_weight`` (K,);
    survival: :func:`cox_ph_loss` with ``y`` the events and ``time`` the times.
    """
    if task == "regression":
        return F.mse_loss(out[:, 0], y.float())
    if task == "binary":
        return F.binary_cross_entropy_with_logits(out[:, 0], y.float(), pos_weight=class_weight)
    if task == "multiclass":
        return F.cross_entropy(out, y.long(), weight=class_weight)
    if task == "survival":
        if time is None:
            raise ValueError("survival loss needs times")
        return cox_ph_loss(out[:, 0], time, y, ties)
    raise ValueError(f"unknown task {task!r}")
