"""Configuration of a multitask encoder training run: the tasks and the trainer settings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from nic.errors import DataError
from nic.patches._datasets import DatasetSpec, parse_dataset_spec
from nic.patches.augment import AugmentConfig

__all__ = ["TaskSpec", "TrainConfig", "parse_task_spec"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class TaskSpec:
    """One task: a name (letters, digits, ``_``, ``-``), its dataset and its loss weight."""

    name: str
    dataset: DatasetSpec
    weight: float = 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self.dataset)
        d["path"] = str(self.dataset.path)
        return {"name": self.name, "weight": self.weight, "dataset": d}


def parse_task_spec(text: str) -> TaskSpec:
    """``NAME=KIND:PATH[?mpp=..&group=..&weight=..]`` -> :class:`TaskSpec`.

    KIND is ``class`` (class folders or CSV ``path,label[,group]``) or ``regr`` (CSV with
    a float ``label``); ``weight`` is the task's loss weight (default 1).
    """
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not spec.strip():
        raise DataError(
            f"task {text!r}: write NAME=KIND:PATH, e.g. lung=class:/data/lung/labels.csv or "
            "nuclei=regr:/data/nuclei.csv"
        )
    if not _NAME.match(name):
        raise DataError(f"task name {name!r}: use letters, digits, '_' or '-', starting with a letter")
    ds = parse_dataset_spec(spec)
    opts = dict(ds.options)
    weight = 1.0
    if "weight" in opts:
        try:
            weight = float(opts.pop("weight"))
        except ValueError:
            raise DataError(f"task {name!r}: weight must be a number") from None
        if not weight > 0:
            raise DataError(f"task {name!r}: weight must be positive, got {weight}")
    if opts:
        raise DataError(
            f"task {name!r}: unknown option(s) {', '.join(sorted(opts))}; known: mpp, group, label, path, weight"
        )
    return TaskSpec(name, DatasetSpec(ds.path, ds.kind, ds.mpp, ds.group, ds.label, ds.path_col), weight)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; written to ``<run>/config.json``.

    ``encoder``: any :func:`nic.encoders.load_encoder` spec (registry name = random init,
    a Keras .h5 or saved encoder = fine-tuning).  ``epochs``/``batch_size``/``lr`` (Adam)
    as usual; ``samples_per_epoch`` (default: all training patches) sets the epoch length;
    ``max_per_task`` caps each task's training patches (quick runs); ``val_fraction`` of
    each task's groups is held out for validation.  The learning rate is divided by 10
    when ``val_loss`` has not improved for ``plateau_patience`` epochs (down to
    ``min_lr``); training stops after ``early_stopping_patience`` epochs without
    improvement.  ``precision`` ``None`` means 16-bit mixed on a GPU, 32 on a CPU.
    """

    tasks: tuple[TaskSpec, ...]
    encoder: str = "nic-cnn"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    sampling: str = "proportional"
    samples_per_epoch: int | None = None
    max_per_task: int | None = None
    val_fraction: float = 0.2
    early_stopping_patience: int = 6
    plateau_patience: int = 2
    min_lr: float = 1e-5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    precision: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DataError("no tasks; give at least one --task NAME=KIND:PATH")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"task name(s) {', '.join(dup)} given twice; name each task once")
        if self.epochs < 1 or self.batch_size < 1:
            raise DataError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.sampling not in ("proportional", "balanced"):
            raise DataError(f"sampling must be 'proportional' or 'balanced', got {self.sampling!r}")
        if not 0 < self.val_fraction < 1:
            raise DataError(f"val fraction must be between 0 and 1, got {self.val_fraction}")

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("tasks", "augment")}
        d["tasks"] = [t.to_json() for t in self.tasks]
        d["augment"] = self.augment.to_json()
        return d
