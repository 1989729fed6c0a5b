"""The masked multitask loss and the per-task metrics, as plain functions.

Every sample belongs to one task and is labelled for that task only, so its loss is the
loss of its own task's head: cross-entropy for classification (target = class index),
mean squared error for regression (target standardised by the caller).  The metrics are
those of :mod:`nic.metrics`, the functions slide-level learning reports with too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nic.metrics import accuracy, auc, mae, spearman

__all__ = ["masked_multitask_loss", "task_metrics"]


def masked_multitask_loss(
    outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    task: torch.Tensor,
    kinds: Sequence[str],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of each sample's own-task loss, times its task weight.

    ``outputs[t]`` (N, K_t): head ``t`` applied to every sample; ``targets`` (N,) float
    (class index or standardised target); ``task`` (N,) int64; ``kinds[t]`` is ``"class"``
    or ``"regr"``; ``weights[t]`` the task's loss weight (default 1).

    Returns ``(loss, per_task)``: ``loss = sum_i w_{t(i)} l_i / N`` (a scalar with gradient)
    and ``per_task`` (T,), the unweighted mean loss of each task over its own samples
    (NaN for tasks absent from the batch), detached.
    """
    n = targets.shape[0]
    w = [1.0] * len(kinds) if weights is None else [float(v) for v in weights]
    total = targets.new_zeros(())
    per_task = torch.full((len(kinds),), float("nan"), device=targets.device)
    for t, kind in enumerate(kinds):
        idx = (task == t).nonzero().flatten()
        if len(idx) == 0:
            continue
        out = outputs[t].index_select(0, idx)
        y = targets.index_select(0, idx)
        if kind == "class":
            losses = F.cross_entropy(out.float(), y.long(), reduction="none")
        elif kind == "regr":
            losses = F.mse_loss(out[:, 0].float(), y.float(), reduction="none")
        else:
            raise ValueError(f"task kind must be 'class' or 'regr', got {kind!r}")
        total = total + w[t] * losses.sum()
        per_task[t] = losses.mean().detach()
    return total / max(n, 1), per_task


def task_metrics(kind: str, y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Metrics of one task: ``{"acc", "auc"}`` for class probabilities ``out`` (N, K);
    ``{"spearman", "mae"}`` for regression predictions ``out`` (N,) in target units."""
    if kind == "class":
        return {"acc": accuracy(y, out), "auc": auc(y, out)}
    return {"spearman": spearman(y, out), "mae": mae(y, out)}
