"""The masked multitask loss and the per-task metrics, as plain functions.

Every sample belongs to one task and is labelled for that task only, so its loss is the
loss of its own task's head: cross-entropy for classification (target = class index),
mean squared error for regression (target standardised by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nic.learn.metrics import binary_auc

__all__ = ["masked_multitask_loss", "accuracy", "auc", "spearman", "mae", "task_metrics"]


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


def accuracy(y: np.ndarray, prob: np.ndarray) -> float:
    """Fraction of class indices ``y`` (N,) equal to the argmax of ``prob`` (N, K)."""
    return float(np.mean(np.argmax(prob, 1) == np.asarray(y))) if len(y) else float("nan")


def auc(y: np.ndarray, prob: np.ndarray) -> float:
    """ROC AUC of class indices ``y`` (N,) against ``prob`` (N, K): binary for K == 2,
    else the macro mean of one-vs-rest AUCs over the classes present (Mann-Whitney, ties halved)."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, np.float64)
    if prob.shape[1] == 2:
        return binary_auc(y == 1, prob[:, 1])
    vals = [binary_auc(y == k, prob[:, k]) for k in range(prob.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(vals)) if vals else float("nan")


def spearman(y: np.ndarray, pred: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return float("nan")
    return float(spearmanr(y, pred).statistic)


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, in the target's units."""
    return float(np.mean(np.abs(np.asarray(y, float) - np.asarray(pred, float)))) if len(y) else float("nan")


def task_metrics(kind: str, y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Metrics of one task: ``{"acc", "auc"}`` for class probabilities ``out`` (N, K);
    ``{"spearman", "mae"}`` for regression predictions ``out`` (N,) in target units."""
    if kind == "class":
        return {"acc": accuracy(y, out), "auc": auc(y, out)}
    return {"spearman": spearman(y, out), "mae": mae(y, out)}
