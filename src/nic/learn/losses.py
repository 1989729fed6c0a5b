"""Losses as plain functions of tensors, one per task.

Survival convention (used everywhere in :mod:`nic.learn`): the model output is a
log-risk (log hazard ratio); HIGHER output = HIGHER risk = shorter expected survival.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

__all__ = ["cox_ph_loss", "task_loss"]

Ties = Literal["breslow", "efron"]


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
    if ties not in ("breslow", "efron"):
        raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    ev = event.reshape(-1).bool()
    n_events = int(ev.sum())
    if n_events == 0:
        return risk.sum() * 0.0
    taus = torch.unique(time[ev])  # (U,) distinct event times
    at_risk = time[None, :] >= taus[:, None]  # (U, N)
    in_d = (time[None, :] == taus[:, None]) & ev[None, :]  # (U, N)
    c = risk.detach().max()
    e = torch.exp(risk - c)
    s_r = (at_risk * e).sum(1)  # (U,)
    s_d = (in_d * e).sum(1)
    d = in_d.sum(1)  # (U,)
    if ties == "breslow":
        log_den = d * (torch.log(s_r) + c)
    else:
        ls = torch.arange(int(d.max()), dtype=risk.dtype, device=risk.device)  # (L,)
        frac = ls[None, :] / d[:, None]  # (U, L)
        valid = ls[None, :] < d[:, None]
        inner = s_r[:, None] - frac * s_d[:, None]
        inner = torch.where(valid, inner, torch.ones_like(inner))
        log_den = ((torch.log(inner) + c) * valid).sum(1)
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
