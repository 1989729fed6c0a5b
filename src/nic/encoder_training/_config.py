"""Configuration of encoder training runs: the multitask tasks, the unsupervised methods,
and the trainer settings every method shares.

- :class:`EncoderRunSettings`: encoder, batches, augmentation, seed, loader and trainer
  settings, the same for every method;
- :class:`EncoderTrainConfig`: a supervised multitask run (its :class:`TaskSpec` s);
- :class:`UnsupervisedConfig`: a VAE, contrastive or BiGAN run on slides.

Constructing a config checks its values (:class:`~nic.errors.OptionError`) and reads no
file; a changed copy is ``dataclasses.replace(config, ...)``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from nic.errors import DataError, OptionError, check_choice, check_int, check_number
from nic.patches._datasets import DatasetSpec, parse_dataset_spec, pop_positive
from nic.patches.augment import AugmentConfig

__all__ = [
    "METHODS",
    "TaskSpec",
    "EncoderRunSettings",
    "EncoderTrainConfig",
    "UnsupervisedConfig",
    "parse_task_spec",
]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")

#: The unsupervised methods, beside ``multitask``.
METHODS = ("vae", "contrastive", "bigan")
_DEFAULT_LR = {"vae": 1e-3, "contrastive": 1e-3, "bigan": 2e-4}
#: How tasks share an epoch (see :func:`nic.patches.multitask_sampler`).
SAMPLING = ("proportional", "balanced")
#: How unsupervised patches are drawn from slides (see :class:`SlidePatchSampler`).
BALANCE = ("cells", "slides")
#: How the VAE's decoder and the BiGAN's generator upsample (see :class:`~nic.encoder_training._methods.Decoder`).
UPSAMPLE = ("transposed", "resize")
_DEFAULT_UPSAMPLE = {"vae": "transposed", "contrastive": "transposed", "bigan": "resize"}


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
    try:
        ds = parse_dataset_spec(spec, extra=("weight",))
    except DataError as e:
        raise DataError(f"task {name!r}: {e}") from None
    weight = pop_positive(dict(ds.options), "weight", f"task {name!r}")
    return TaskSpec(name, DatasetSpec(ds.path, ds.kind, ds.mpp, ds.group, ds.label, ds.path_col), weight or 1.0)


@dataclass(frozen=True, kw_only=True)
class EncoderRunSettings:
    """What every encoder training method shares; written to ``<run>/config.json``.

    ``encoder``: any :func:`nic.encoders.load_encoder` spec (registry name = random init,
    a Keras .h5 or saved encoder = fine-tuning).  ``epochs`` at most (early stopping on
    ``val_loss`` after ``early_stopping_patience`` epochs without improvement, where the
    method has a validation loss), ``batch_size`` patches (pairs for ``contrastive``),
    colour/geometry ``augment``\\ ation, ``seed`` of every draw, ``num_workers`` loader
    processes; ``accelerator`` and ``precision`` go to Lightning (``precision`` ``None``:
    16-bit mixed on a GPU, 32 on a CPU); ``progress`` shows the progress bar.

    ``devices`` > 1 trains data-parallel (DDP) on that many devices of the accelerator (GPUs,
    or CPU processes with the gloo backend): ``batch_size`` is then per device, so a step
    sees ``devices * batch_size`` patches.
    """

    encoder: str = "nic-cnn"
    epochs: int = 20
    batch_size: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping_patience: int = 6
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    precision: str | None = None
    progress: bool = True
    devices: int = 1

    #: the smallest batch the method trains with
    _min_batch = 1

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, self._min_batch)
        check_int("early_stopping_patience", self.early_stopping_patience, 0)
        check_int("num_workers", self.num_workers, 0)
        check_int("devices", self.devices, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_json()
        return d


@dataclass(frozen=True, kw_only=True)
class EncoderTrainConfig(EncoderRunSettings):
    """A supervised multitask run: one head per :class:`TaskSpec` on a shared encoder.

    ``lr`` (Adam, with ``weight_decay`` as an L2 penalty on every weight) is divided by 10
    when ``val_loss`` has not improved for ``plateau_patience`` epochs (down to ``min_lr``);
    ``samples_per_epoch`` (default: all training patches) sets the epoch length, drawn
    across tasks as ``sampling`` says; ``max_per_task`` caps each task's training patches
    (quick runs); ``val_fraction`` of each task's groups is held out for validation.
    """

    tasks: tuple[TaskSpec, ...]
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sampling: str = "proportional"
    samples_per_epoch: int | None = None
    max_per_task: int | None = None
    val_fraction: float = 0.2
    plateau_patience: int = 2
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        if not self.tasks:
            raise OptionError("no tasks; give at least one task as `tasks` (NAME=KIND:PATH)")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise OptionError(f"task name(s) {', '.join(dup)} given twice; name each task once")
        super().__post_init__()
        check_number("lr", self.lr, 0, float("inf"), low_open=True)
        check_number("weight_decay", self.weight_decay, 0, float("inf"))
        check_choice("sampling", self.sampling, SAMPLING)
        for name in ("samples_per_epoch", "max_per_task"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_number("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["tasks"] = [t.to_json() for t in self.tasks]
        return d


@dataclass(frozen=True, kw_only=True)
class UnsupervisedConfig(EncoderRunSettings):
    """An unsupervised run (``method`` one of :data:`METHODS`) on patches of slides.

    ``slides``: files, folders or CSVs (see :func:`~nic.encoder_training._sampling.slide_paths`);
    ``slide_mpp`` the level-0 um/px of slides that state none.  ``patches`` training
    patches (pairs for ``contrastive``) are drawn once by ``seed`` from the tissue cells
    (at least ``min_tissue`` tissue) at the encoder's um/px, ``val_patches`` more with
    another seed; ``balance`` ``slides`` draws every slide equally often (else every tissue
    cell).  ``lr`` ``None`` is the method's default (Adam; 2e-4 for the BiGAN);
    ``kl_weight`` weighs the VAE's KL term against its summed squared error; ``upsample``
    is how the VAE's decoder and the BiGAN's generator enlarge their maps (:data:`UPSAMPLE`;
    ``None``: the method's default, ``transposed`` for the VAE, ``resize`` for the BiGAN);
    ``instance_noise`` the standard deviation of the Gaussian noise added to every image the
    BiGAN's discriminator sees (in [-1, 1] units), decreasing linearly to 0 by mid-run.
    The BiGAN has no validation loss to stop on and runs all ``epochs``.
    """

    method: str
    slides: tuple[str, ...]
    slide_mpp: float | None = None
    patches: int = 4000
    val_patches: int = 256
    epochs: int = 5
    lr: float | None = None
    kl_weight: float = 0.01
    upsample: str | None = None
    instance_noise: float = 0.2
    min_tissue: float = 0.5
    balance: str = "cells"
    early_stopping_patience: int = 4

    _min_batch = 2  # batch norm, and a contrastive batch needs a pair of each kind

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if not self.slides:
            raise OptionError(f"method {self.method!r} learns from slides; give `slides` (files, folders or CSVs)")
        super().__post_init__()
        check_int("patches", self.patches, 2)
        check_int("val_patches", self.val_patches, 2)
        if self.lr is not None:
            check_number("lr", self.lr, 0, float("inf"), low_open=True)
        if self.slide_mpp is not None:
            check_number("slide_mpp", self.slide_mpp, 0, float("inf"), low_open=True)
        check_number("kl_weight", self.kl_weight, 0, float("inf"))
        check_number("instance_noise", self.instance_noise, 0, float("inf"))
        check_number("min_tissue", self.min_tissue, 0, 1)
        check_choice("balance", self.balance, BALANCE)
        if self.upsample is not None:
            check_choice("upsample", self.upsample, UPSAMPLE)

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else _DEFAULT_LR[self.method])

    @property
    def upsampling(self) -> str:
        """``upsample``, or the method's default when it is ``None``."""
        return self.upsample if self.upsample is not None else _DEFAULT_UPSAMPLE[self.method]

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["slides"] = list(self.slides)
        d["upsample"] = self.upsampling  # what the run used
        return d
