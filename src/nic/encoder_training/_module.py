"""The multitask Lightning module: one shared encoder, one linear head per task."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from nic.encoder_training._losses import masked_multitask_loss, task_metrics
from nic.patches.augment import AugmentConfig, ColorAugment

logger = logging.getLogger(__name__)

__all__ = ["TaskHead", "MultitaskModule"]


@dataclass(frozen=True)
class TaskHead:
    """A head's task: ``kind`` ``class`` (``num_outputs`` classes) or ``regr`` (1 output).

    Regression targets are standardised with ``target_mean``/``target_std`` (from the
    training split) for the loss; metrics are in the original units.
    """

    name: str
    kind: str
    num_outputs: int
    weight: float = 1.0
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: tuple[str, ...] = ()


class MultitaskModule(L.LightningModule):
    """Shared ``encoder`` (float RGB [0, 1] (N, 3, P, P) -> (N, C)) plus a linear head per task.

    A batch is ``(images uint8 (N, 3, P, P), targets float (N,), task int64 (N,))``.  In
    training, images are augmented on the device (:class:`ColorAugment`); the loss is the
    masked multitask loss (each sample counts for its own task only, times the task's
    weight).  Validation logs ``val_loss`` and ``val/<task>/<metric>`` (acc and auc, or
    spearman and mae).  Adam with ReduceLROnPlateau (factor 0.1) on ``val_loss``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        code_size: int,
        tasks: Sequence[TaskHead],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        plateau_patience: int = 2,
        min_lr: float = 1e-5,
        augment: AugmentConfig = AugmentConfig(),
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.tasks = list(tasks)
        self.heads = nn.ModuleList(nn.Linear(code_size, t.num_outputs) for t in self.tasks)
        self.augment = ColorAugment(augment, seed=seed)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.plateau_patience, self.min_lr = int(plateau_patience), float(min_lr)
        self.register_buffer("_mean", torch.tensor([t.target_mean for t in self.tasks], dtype=torch.float32))
        self.register_buffer("_std", torch.tensor([t.target_std for t in self.tasks], dtype=torch.float32))
        self.save_hyperparameters(
            {
                "tasks": [asdict(t) for t in self.tasks],
                "lr": lr,
                "weight_decay": weight_decay,
                "augment": asdict(augment),
            }
        )
        self._val: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []

    # ------------------------------------------------------------------ pieces

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tasks]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Float RGB (N, 3, P, P) in [0, 1] -> one (N, K_t) output per task."""
        codes = self.encoder(x.contiguous(memory_format=torch.channels_last))
        return [head(codes) for head in self.heads]

    def _standardise(self, targets: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        regr = torch.tensor([k == "regr" for k in self.kinds], device=targets.device)[task]
        z = (targets - self._mean[task]) / self._std[task]
        return torch.where(regr, z, targets)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255.0)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets, task = batch
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = self.augment(self._inputs(images))  # in float32, also under mixed precision
        outputs = self(x)
        loss, per_task = masked_multitask_loss(
            outputs, self._standardise(targets, task), task, self.kinds, [t.weight for t in self.tasks]
        )
        n = images.shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        for t, v in zip(self.tasks, per_task):
            if not math.isnan(float(v)):
                self.log(f"train/{t.name}/loss", v, batch_size=int((task == self.tasks.index(t)).sum()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets, task = batch
        outputs = self(self._inputs(images))
        loss, _ = masked_multitask_loss(
            outputs, self._standardise(targets, task), task, self.kinds, [t.weight for t in self.tasks]
        )
        n = images.shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)
        self._val.append((targets.detach().cpu(), task.detach().cpu(), [o.detach().float().cpu() for o in outputs]))

    def _gathered(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This process's validation rows, or under DDP every process's (each holds an equal
        share: the distributed sampler pads the validation set to a multiple of the devices)."""
        local = torch.cat(parts)
        if self._trainer is None or self._trainer.world_size <= 1:
            return local
        every = self.all_gather(local.to(self.device))  # (world, n, ...)
        return every.reshape(-1, *local.shape[1:]).cpu()

    def on_validation_epoch_end(self) -> None:
        # AUC and Spearman do not decompose over shards: computed on the whole validation set
        # (gathered from every process), so every process logs the same values
        if not self._val:
            return
        targets = self._gathered([v[0] for v in self._val]).numpy()
        task = self._gathered([v[1] for v in self._val]).numpy()
        outs = [self._gathered([v[2][t] for v in self._val]) for t in range(len(self.tasks))]
        self._val.clear()
        for t, spec in enumerate(self.tasks):
            sel = task == t
            if not sel.any():
                continue
            if spec.kind == "class":
                out = torch.softmax(outs[t][torch.from_numpy(sel)], 1).numpy()
                y = targets[sel].astype(np.int64)
            else:
                out = outs[t][torch.from_numpy(sel), 0].numpy() * spec.target_std + spec.target_mean
                y = targets[sel]
            for name, value in task_metrics(spec.kind, y, out).items():
                if not math.isnan(value):
                    # the same value in every process: the mean over them is the value itself
                    self.log(f"val/{spec.name}/{name}", value, prog_bar=False, sync_dist=True)

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.1, patience=self.plateau_patience, min_lr=self.min_lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}
