"""Train a multitask encoder with Lightning and export it without its heads.

A run folder holds::

    config.json        the full EncoderTrainConfig, the encoder's config, tasks, classes, target scaling
    splits.csv         task, split (train/val), path of every patch used
    checkpoints/       Lightning checkpoints (best by val_loss, and last)
    logs/              CSV logs (and TensorBoard, when the tensorboard package is installed)
    encoder/           the trained encoder (safetensors + JSON), ready for ``nic compress``
    metrics.json       best validation metrics, epochs, training patches/s

With ``devices`` > 1 the run is data-parallel (Lightning DDP): under ``torchrun`` or SLURM
(which start the processes) Lightning's ``ddp`` joins them; from a plain ``nic`` command or a
notebook :func:`launch` spawns one process per device, each running the whole run with its
rank in the environment, as ``torchrun`` would.  Each process reads the data; Lightning
shards every epoch's draw (a ``DistributedSampler``, or a wrapper around the project's own
samplers, which draw the same seeded order in every process).  Batch norm is synchronised
on GPUs (a step over ``devices`` shards of ``batch_size`` patches then normalises like one
step over their union; torch has no CPU SyncBatchNorm).  The validation loss is averaged
over the processes (``sync_dist``), so early stopping and the plateau schedule decide alike
everywhere; AUC and Spearman, which do not average over shards, are computed on the whole
gathered validation set.  Only rank 0 writes the run folder, the metrics and the exported encoder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic.encoder_training._config import EncoderRunSettings, EncoderTrainConfig
from nic.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train_encoder", "prepare_tasks", "make_trainer", "launch", "global_rank"]


@dataclass
class TrainResult:
    """What a run produced: its folder, the exported encoder and the best validation metrics."""

    run_dir: Path
    encoder_path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    patches_per_s: float = float("nan")
    epochs: int = 0


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def prepare_tasks(config: EncoderTrainConfig, patch_size: int, mpp: float) -> tuple[list[Any], list[Any], list[Any]]:
    """Read every task's dataset and split it by group.

    Returns ``(heads, train_datasets, val_datasets)``: one :class:`TaskHead` and one
    :class:`~nic.patches.PatchDataset` pair per task, at ``patch_size`` px and ``mpp`` um/px.
    """
    from nic.encoder_training._module import TaskHead
    from nic.patches import PatchDataset, group_split, read_patch_table
    from nic.patches._datasets import warn_ungrouped

    heads, train_sets, val_sets = [], [], []
    for i, task in enumerate(config.tasks):
        table = read_patch_table(task.dataset)
        labels = table.labels if table.kind == "class" else None
        try:
            tr, va = group_split(len(table), config.val_fraction, table.groups, labels, seed=config.seed + i)
        except DataError as e:
            raise DataError(f"task {task.name!r}: {e}") from None
        warn_ungrouped(table, f"task {task.name}", "validation")
        if config.max_per_task and len(tr) > config.max_per_task:
            rng = np.random.default_rng(config.seed + 100 + i)
            tr = np.sort(rng.choice(tr, config.max_per_task, replace=False))
        train, val = table.subset(tr), table.subset(va)
        if table.kind == "regr":
            mean, std = float(train.labels.mean()), float(train.labels.std()) or 1.0
        else:
            mean, std = 0.0, 1.0
        heads.append(TaskHead(task.name, table.kind, table.num_outputs, task.weight, mean, std, table.classes))
        train_sets.append(PatchDataset(train, patch_size, mpp))
        val_sets.append(PatchDataset(val, patch_size, mpp))
        logger.info("task %s: train %s; val %s", task.name, train.describe(), val.describe())
    return heads, train_sets, val_sets


def _write_splits(path: Path, heads: list[Any], train_sets: list[Any], val_sets: list[Any]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "split", "path"])
        for h, tr, va in zip(heads, train_sets, val_sets):
            for split, ds in (("train", tr), ("val", va)):
                for p in ds.table.paths:
                    w.writerow([h.name, split, str(p)])


def train_encoder(config: EncoderTrainConfig, out: str | Path) -> TrainResult:
    """Train a multitask encoder as ``config`` says, in the run folder ``out``.

    Returns a :class:`TrainResult`; the encoder (without heads) is saved with
    :func:`nic.encoders.save_encoder` in ``out/encoder``.  Raises :class:`DataError` or
    :class:`~nic.errors.EncoderError` for bad input before any training starts, and
    :class:`~nic.errors.OutputError` when ``out`` already holds a run.  ``config.devices``
    > 1 trains on that many devices (see :func:`launch`).
    """
    return launch(_train_encoder, config, out)


def _train_encoder(config: EncoderTrainConfig, out: str | Path) -> TrainResult:
    from nic.encoders import load_encoder

    out = start_run(out, config.seed)
    encoder = load_encoder(config.encoder)
    heads, train_sets, val_sets = prepare_tasks(config, encoder.patch_size, encoder.mpp)
    if global_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_splits(out / "splits.csv", heads, train_sets, val_sets)
        write_run_config(out, config, encoder, heads=[dataclasses.asdict(h) for h in heads])
    train_loader, val_loader = _multitask_loaders(config, train_sets, val_sets)
    module = _multitask_module(config, encoder, heads)
    trainer, ckpt, speed, precision = make_trainer(out, config, n_batches=len(train_loader))
    logger.info("training %s on %d patches (%s), %d tasks, precision %s", encoder.name,
                len(train_loader.dataset), config.sampling, len(heads), precision)  # fmt: skip
    fit(trainer, module, train_loader, val_loader)
    if not trainer.is_global_zero:
        return TrainResult(out, out / "encoder", epochs=int(trainer.current_epoch))
    names = [h.name for h in heads]
    source = {"format": "nic-train-encoder", "run": str(out.resolve()), "tasks": names}
    best, metrics, path = export_best(trainer, ckpt, module, encoder, out, f"multitask-{'-'.join(names)}", source)
    # The last epoch's rate: patches are cached in memory after the first epoch.
    result = TrainResult(out, path, metrics, speed.last, int(trainer.current_epoch))
    write_metrics(out, result, best, speed, "patches")
    logger.info("run %s: %d epochs, %.1f patches/s; encoder in %s", out, result.epochs, speed.last, path)
    return result


# -- the steps every method takes -----------------------------------------------------------------


def start_run(out: str | Path, seed: int) -> Path:
    """The run folder ``out`` (created when the first file is written): refused when it
    already holds a run (runs are never overwritten) or cannot be written; and every
    generator seeded with ``seed``."""
    import lightning as L

    from nic._outputs import check_new_folder

    out = Path(out)
    if global_rank() == 0:  # the other processes of a DDP run would see rank 0's first files
        check_new_folder(out, None, holds=("config.json", "checkpoints"), what="training runs")
    L.seed_everything(seed, workers=True, verbose=False)
    return out


def write_run_config(out: Path, config: EncoderRunSettings, encoder: Any, **extra: Any) -> None:
    """``out/config.json``: the run's settings, the encoder's config and source, and ``extra``."""
    run = {"train": config.to_json(), "encoder": encoder.config.to_json(), "encoder_source": encoder.source}
    _write_json(out / "config.json", {**run, **extra})


def loader_args(config: EncoderRunSettings) -> dict[str, Any]:
    """DataLoader arguments every method uses: batch size and worker processes."""
    args: dict[str, Any] = {"batch_size": config.batch_size, "num_workers": config.num_workers}
    if config.num_workers > 0:
        args["persistent_workers"] = True
    return args


def _multitask_loaders(config: EncoderTrainConfig, train_sets: list[Any], val_sets: list[Any]) -> tuple[Any, Any]:
    """Training batches drawn across tasks as ``config.sampling`` says; validation in order."""
    from torch.utils.data import DataLoader

    from nic.patches import MultitaskDataset, multitask_sampler

    train_ds, val_ds = MultitaskDataset(train_sets), MultitaskDataset(val_sets)
    sampler = multitask_sampler(train_ds.sizes, config.sampling, config.samples_per_epoch, seed=config.seed)  # type: ignore[arg-type]
    args = loader_args(config)
    train = DataLoader(train_ds, sampler=sampler, drop_last=len(sampler) > config.batch_size, **args)
    return train, DataLoader(val_ds, shuffle=False, **args)


def _multitask_module(config: EncoderTrainConfig, encoder: Any, heads: list[Any]) -> Any:
    """The shared encoder (in training mode) with one head per task."""
    from nic.encoder_training._module import MultitaskModule

    encoder.module.train()
    return MultitaskModule(
        encoder.module,
        encoder.code_size,
        heads,
        lr=config.lr,
        weight_decay=config.weight_decay,
        plateau_patience=config.plateau_patience,
        min_lr=config.min_lr,
        augment=config.augment,
        seed=config.seed,
    )


def fit(trainer: Any, module: Any, train_loader: Any, val_loader: Any) -> None:
    """``trainer.fit`` without Lightning's notices for its own users."""
    with _quiet_lightning():
        trainer.fit(module, train_loader, val_loader)


def export_best(
    trainer: Any, ckpt: Any, module: Any, encoder: Any, out: Path, name: str, source: dict[str, Any],
    use_best: bool = True,
) -> tuple[str, dict[str, float], Path]:  # fmt: skip
    """After ``trainer.fit``: the best checkpoint's weights (when ``use_best`` and there is
    one) into ``module``, the validation metrics of that epoch (read back from the CSV log),
    and the trained encoder saved to ``out/encoder`` as ``name`` with ``source`` (a new
    :class:`~nic.encoders.Encoder`; ``encoder``, the one training started from, is left as it was).
    Returns (best checkpoint path or "", metrics, encoder path)."""
    import torch

    from nic.encoders import Encoder, save_encoder

    best = ckpt.best_model_path if use_best else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    if best:
        metrics = _best_epoch_metrics(out / "logs" / "metrics.csv", ckpt.best_model_score) or metrics
    module.encoder.eval()
    trained = Encoder(module.encoder.cpu(), dataclasses.replace(encoder.config, name=name), encoder.checksum, source)
    return best, metrics, save_encoder(trained, out / "encoder")


def write_metrics(out: Path, result: TrainResult, best: str, speed: Any, unit: str, **extra: Any) -> None:
    """``out/metrics.json``: the best checkpoint, epochs, training speed in ``unit`` per
    second (last epoch and mean), training seconds, the validation metrics and ``extra``."""
    summary = {
        **extra,
        "best_checkpoint": best,
        "epochs": result.epochs,
        f"train_{unit}_per_s_last_epoch": speed.last,
        f"train_{unit}_per_s_mean": speed.mean,
        "train_seconds": speed.seconds,
        "val": result.metrics,
    }
    _write_json(out / "metrics.json", summary)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _speed_callback() -> Any:
    """A Lightning callback measuring training patches/s over the training epochs
    (data loading, augmentation, step): ``last`` (last epoch), ``mean``, ``samples``, ``seconds``."""
    from lightning.pytorch.callbacks import Callback

    class _Speed(Callback):
        def __init__(self) -> None:
            self.samples, self.seconds, self._t0, self._n, self.last = 0, 0.0, 0.0, 0, float("nan")

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._t0 = time.perf_counter()
            self._n = 0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            first = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._n += int(first.shape[0]) * trainer.world_size  # every process steps on a batch as large

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            dt = time.perf_counter() - self._t0
            self.seconds += dt
            self.samples += self._n
            self.last = self._n / dt if dt > 0 else float("nan")

        @property
        def mean(self) -> float:
            return self.samples / self.seconds if self.seconds > 0 else float("nan")

    return _Speed()


def make_trainer(
    out: Path,
    settings: EncoderRunSettings,
    *,
    n_batches: int = 1,
    monitor: str | None = "val_loss",
    extra_callbacks: list[Any] | None = None,
) -> tuple[Any, Any, Any, str]:
    """The Lightning trainer every encoder method uses: checkpoints, CSV (and TensorBoard) logs,
    early stopping, learning-rate monitor and the patches/s callback, as ``settings`` say
    (epochs, early stopping patience, accelerator, precision, progress bar).

    ``monitor`` ``None`` keeps only the last checkpoint and stops after ``epochs`` (for
    methods without a validation loss that means anything, e.g. GANs).  Returns
    ``(trainer, checkpoint callback, speed callback, precision)``.
    """
    epochs, accelerator, precision = settings.epochs, settings.accelerator, settings.precision
    progress, early_stopping_patience = settings.progress, settings.early_stopping_patience
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    speed = _speed_callback()
    if monitor is None:
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)
    else:
        ckpt = ModelCheckpoint(
            dirpath=out / "checkpoints", filename="best-{epoch:03d}", monitor=monitor, mode="min", save_last=True
        )
    callbacks: list[Any] = [ckpt, LearningRateMonitor(logging_interval="epoch"), speed, *(extra_callbacks or [])]
    if monitor is not None and early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="min", patience=early_stopping_patience))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    loggers: list[Any] = [CSVLogger(out / "logs", name="", version="")]
    if _tensorboard_available():
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out / "logs", name="tensorboard", version=""))
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    precision = precision or ("16-mixed" if gpu else "32-true")
    ddp: dict[str, Any] = {}
    if settings.devices > 1:
        # the processes exist already (torchrun, SLURM, or launch()): Lightning's ddp joins them.
        # Batch-norm statistics over the whole step's batch need SyncBatchNorm, which torch has
        # for CUDA only: on CPU processes each normalises its own shard.
        ddp = {"strategy": "ddp", "sync_batchnorm": gpu}
    with _quiet_lightning():  # the device notices and a logger tip come from the constructor
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=settings.devices,
            **ddp,
            precision=precision,  # type: ignore[arg-type]
            callbacks=callbacks,
            logger=loggers,
            default_root_dir=out,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=max(1, min(50, n_batches // 2)),
            num_sanity_val_steps=0,
        )
    return trainer, ckpt, speed, precision


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's notices for its own users are not shown to nic's.

    Its INFO lines ("GPU available ...", the litlogger tip, "`Trainer.fit` stopped ...")
    go below the ``lightning`` loggers' level, and the FutureWarning that torch raises
    when Lightning builds a ``LeafSpec`` is ignored.  Lightning's own warnings still
    show; everything is restored on exit.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            # Lightning's all_gather calls a torch function torch now marks deprecated
            warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _best_epoch_metrics(csv_path: Path, best_score: Any) -> dict[str, float]:
    """Validation metrics of the epoch whose val_loss equals ``best_score`` in Lightning's CSV log."""
    if best_score is None or not csv_path.is_file():
        return {}
    best = float(best_score)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            v = row.get("val_loss", "")
            if v and abs(float(v) - best) <= 1e-6 * max(1.0, abs(best)):
                return {k: float(x) for k, x in row.items() if k.startswith("val") and x != ""}
    return {}


# -- several devices ------------------------------------------------------------------------------


#: whether this process is one rank of a multi-device run (set by :func:`launch`): only then do
#: the rank variables count (a single-device run started as one of several SLURM tasks is rank 0)
_IN_DDP = False


def global_rank() -> int:
    """This process's rank in a DDP run (0 outside one), from the variables torchrun,
    SLURM or :func:`launch` set."""
    if not _IN_DDP:
        return 0
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _launched_externally() -> bool:
    """Whether torchrun or SLURM started this process as one of several ranks."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(target: Any, config: Any, out: Path, rank: int, world: int, port: int, results: Any) -> None:
    """One spawned DDP process: the rendezvous variables torchrun would set, then the run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    global _IN_DDP
    _IN_DDP = True
    import torch

    # the processes share this machine's cores (a GPU process needs few)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        results.put((rank, target(config, out), None))
    except BaseException as e:  # noqa: BLE001 -- every failure goes back to the parent, which raises it
        try:
            import pickle

            pickle.dumps(e)
        except Exception:  # noqa: BLE001
            e = RuntimeError(f"{type(e).__name__}: {e}")
        results.put((rank, None, e))


def launch(target: Any, config: EncoderRunSettings, out: str | Path) -> TrainResult:
    """``target(config, out)`` in this process, or with ``config.devices`` > 1 in one spawned
    process per device (unless torchrun or SLURM started the processes already).

    The spawned processes are started with the ``spawn`` method, so this works from a plain
    command and from a notebook.  The first process that fails ends the others, and its
    error is raised here as it was raised there (an :class:`~nic.errors.OutputError` for a
    run folder that exists is raised before any process starts).  Returns rank 0's result.
    """
    global _IN_DDP
    if _launched_externally() and config.devices > 1:
        _IN_DDP = True
        return target(config, out)
    out = Path(out)
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        return target(config, out) if config.devices == 1 else _spawn_ranks(target, config, out)
    except BaseException:
        _undo_unstarted_run(out, before)
        raise


def _undo_unstarted_run(out: Path, before: set[Path] | None) -> None:
    """After a run failed before its first checkpoint, remove what it wrote (``before``: the
    entries ``out`` held, None if it did not exist), so the folder does not look like a run
    and a rerun is not refused; a run with a checkpoint is kept (it holds training done)."""
    ckpts = out / "checkpoints"
    if not out.is_dir() or (ckpts.is_dir() and any(f.is_file() for f in ckpts.rglob("*"))):
        return
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in set(out.iterdir()) - before:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _spawn_ranks(target: Any, config: EncoderRunSettings, out: Path) -> TrainResult:
    """:func:`launch`'s processes, one per device; rank 0's result."""
    import queue

    from nic._outputs import check_new_folder
    from nic._processes import WORKER_DIED_HINT, spawn_context

    ctx = spawn_context()  # first: a rank re-running an unguarded script would find `out` made
    check_new_folder(out, None, holds=("config.json", "checkpoints"), what="training runs")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(target, config, out, r, config.devices, port, results), daemon=False)
             for r in range(config.devices)]  # fmt: skip
    for p in procs:
        p.start()
    got: dict[int, TrainResult] = {}
    try:
        while len(got) < len(procs):
            try:
                rank, result, error = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and not p.is_alive()]
                if dead:
                    code = procs[dead[0]].exitcode
                    raise RuntimeError(
                        f"training process {dead[0]} ended with exit code {code} without a result: {WORKER_DIED_HINT}"
                    ) from None
                continue
            if error is not None:
                raise error
            got[rank] = result
    finally:
        for p in procs:
            if p.is_alive() and len(got) < len(procs):
                p.terminate()
        for p in procs:
            p.join(10)
    return got[0]
