"""Several patch datasets as one, with a task index per sample, and how to sample them.

Each dataset labels only its own task; :class:`MultitaskDataset` concatenates them and
returns ``(image, target, task)``.  :func:`multitask_sampler` mixes tasks in a batch
either in proportion to the datasets' sizes (``proportional``: every patch equally
likely, without replacement) or with every task equally likely (``balanced``: small
datasets are repeated, large ones subsampled, with replacement).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from nic.errors import DataError
from nic.patches._datasets import PatchDataset

logger = logging.getLogger(__name__)

__all__ = ["MultitaskDataset", "multitask_sampler", "Sampling", "task_weights"]

Sampling = Literal["proportional", "balanced"]


class MultitaskDataset:
    """Concatenated datasets; item ``i`` is ``(image uint8 (3, P, P), target float32 (), task int64 ())``.

    All datasets must share one patch size.  ``offsets[t]`` is the first index of task ``t``.
    """

    def __init__(self, datasets: Sequence[PatchDataset]) -> None:
        if not datasets:
            raise DataError("no datasets; give at least one task")
        sizes = {d.patch_size for d in datasets}
        if len(sizes) != 1:
            raise DataError(f"datasets have different patch sizes {sorted(sizes)}; build them for one encoder")
        self.datasets = list(datasets)
        self.sizes = np.asarray([len(d) for d in datasets], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.task_of = np.repeat(np.arange(len(datasets)), self.sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        import torch

        t = int(self.task_of[i])
        image, target = self.datasets[t][int(i - self.offsets[t])]
        return image, target, torch.tensor(t, dtype=torch.long)


def task_weights(sizes: Sequence[int], mode: Sampling) -> np.ndarray:
    """Per-sample sampling weights (sum(sizes),) for ``mode``; each task's share is
    ``n_t / N`` (proportional) or ``1 / T`` (balanced)."""
    sizes = np.asarray(sizes, np.int64)
    if mode == "proportional":
        return np.ones(int(sizes.sum()), np.float64)
    if mode == "balanced":
        return np.repeat(1.0 / np.maximum(sizes, 1), sizes).astype(np.float64)
    raise DataError(f"sampling must be 'proportional' or 'balanced', got {mode!r}")


def multitask_sampler(
    sizes: Sequence[int], mode: Sampling = "proportional", num_samples: int | None = None, seed: int = 0
) -> Any:
    """A ``torch.utils.data.Sampler`` over a :class:`MultitaskDataset` of task ``sizes``.

    ``num_samples`` is the epoch length (default: all patches).  Proportional sampling
    without ``num_samples`` is a plain shuffle.
    """
    import torch
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    weights = task_weights(sizes, mode)
    g = torch.Generator()
    g.manual_seed(int(seed))
    n = int(num_samples or len(weights))
    if mode == "proportional" and num_samples is None:
        return RandomSampler(range(len(weights)), generator=g)
    return WeightedRandomSampler(torch.as_tensor(weights), n, replacement=True, generator=g)
