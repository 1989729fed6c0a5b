"""Fitting one slide-level model (the model and its test-time averaging: :mod:`nic.learn.slide_model`).

A plain PyTorch loop (no Lightning trainer: on 2 CPU cores and tiny grids its per-run
setup cost exceeded the training itself).  Augmentation per training crop:

- the crop centre is drawn in proportion to the distance from background;
- stores with 8 dihedral variants: a random variant ``k`` and the same transform
  ``dihedral(grid, k)`` of the grid, i.e. a faithful rotation/flip of the whole slide;
- stores with 1 variant: a random rotation/flip of the grid only.  This is WEAKER: the
  codes themselves do not rotate, so the model sees layouts that no real slide gives.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nic._device import torch_device
from nic.errors import DataError, check_choice, check_int, check_number
from nic.learn.data import Cohort, SlideSource, code_stats, dihedral, sample_crop_origin
from nic.learn.losses import TIES, task_loss
from nic.learn.models import POOLS, ModelSpec, create_model
from nic.learn.slide_model import SlideModel, _to_device, patient_mean
from nic.learn.targets import TARGET_TRANSFORMS, TargetScale

__all__ = [
    "FitConfig",
    "FitHistory",
    "fit_model",
    "event_batches",
    "default_crop",
    "training_view",
]

logger = logging.getLogger(__name__)

#: the reference crop side, grid cells
REFERENCE_CROP = 400


@dataclass
class FitConfig:
    """Hyper-parameters of one model fit (units: grid cells, epochs, slides)."""

    model: str = "nic-cnn"
    epochs: int = 100
    batch_size: int = 16
    #: the reference uses 1e-2; on generated and planted cohorts 3e-3 fitted regression
    #: targets that 1e-2 did not (and learnt the planted spatial label more reliably than 1e-3)
    lr: float = 3e-3
    weight_decay: float = 1e-5
    crop: int | None = None  #: crop side in cells; None: min(400, largest grid side)
    #: epochs without validation improvement before stopping; attention models sat on a
    #: plateau for 10-20 epochs before finding the sparse mitosis signal
    patience: int = 20
    min_epochs: int = 20  #: no lr decay or stopping before this epoch (noisy early validation)
    lr_patience: int = 8  #: epochs without improvement before lr /= 10
    min_lr: float = 1e-5
    val_fraction: float = 0.2
    tta_crops: int = 10  #: test crops per slide (1 when the slide fits in a crop)
    tta_variants: bool = True  #: average the 8 variants (or grid rotations/flips)
    val_crops: int = 2
    class_weights: bool = True
    augment: bool = True  #: random rotation/flip (variant) per training crop
    ties: str = "efron"
    width: int = 128
    #: the reference uses channel dropout 0.2; with ~100 slides even 0.1 kept nic-cnn from
    #: fitting regression targets (training Spearman 0.2-0.6 against 0.9 without)
    dropout: float = 0.0
    pool: str = "maxmean"
    #: nic-cnn: channels of the cell-ratio branch (log of gated mean per-cell evidence, e.g.
    #: mitoses per tumour cell; :class:`~nic.learn.models.CellRatio`), trained first, then the
    #: convolutional path on what it leaves; 0: the reference network alone, one stage
    ratio_heads: int = 4
    #: nic-cnn with a ratio branch: starts of the ratio stage (fresh branch weights each);
    #: one start in six or so stuck on a poor solution (a fold at Spearman 0.47 where other
    #: starts gave 0.88-0.92)
    ratio_starts: int = 3
    #: nic-cnn with a ratio branch: keep every start of the ratio stage as a copy of the
    #: branch and average their outputs; False: only the start with the lowest validation
    #: loss, chosen on the ~16 patients a fold holds out for early stopping (proliferation
    #: Spearman with the average 0.933 -> 0.944, 0.932 -> 0.939, 0.836 -> 0.862 and
    #: 0.822 -> 0.841 on four cohort x seed runs, lowest folds 0.66-0.89 -> 0.72-0.92)
    ratio_average: bool = True
    #: nic-cnn with a ratio branch: ``min_epochs`` of the ratio stage; its validation loss can
    #: rise for 30-50 epochs before the sparse mitosis signal emerges (with the general
    #: minimum of 20, every start of a fold stopped at epoch 40 still rising: Spearman 0.37)
    ratio_min_epochs: int = 60
    #: regression targets: "auto" (log for skewed non-negative targets), "none", "log", "rank";
    #: see :mod:`nic.learn.targets`
    target_transform: str = "auto"
    seed: int = 0
    device: str = "auto"  #: torch device; "auto": the first CUDA device when torch sees one, else cpu

    def __post_init__(self) -> None:
        # pure checks of the values; the device is checked where it is used (fit_model, train_cv)
        check_int("batch_size", self.batch_size, 2)  # BatchNorm needs 2 samples per batch
        check_int("epochs", self.epochs, 1)
        check_int("ratio_heads", self.ratio_heads, 0)
        check_int("ratio_starts", self.ratio_starts, 1)
        check_int("min_epochs", self.min_epochs, 0)
        check_int("ratio_min_epochs", self.ratio_min_epochs, 0)
        # 0 would stop every fit after its first epoch (the patience is used up at once)
        check_int("patience", self.patience, 1)
        check_int("lr_patience", self.lr_patience, 0)
        # meanpool with width 0 predicts a constant; abmil's attention is width // 2 wide
        check_int("width", self.width, 2)
        check_int("tta_crops", self.tta_crops, 1)
        check_int("val_crops", self.val_crops, 1)
        check_int("seed", self.seed, 0)
        if self.crop is not None:
            check_int("crop", self.crop, 1)
        check_number("lr", self.lr, 0, math.inf, low_open=True, high_open=True)
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        check_number("weight_decay", self.weight_decay, 0, math.inf, high_open=True)
        check_number("min_lr", self.min_lr, 0, math.inf, high_open=True)
        # inner_split holds out 1 / round(1 / fraction) of the patients: above 0.5 it is 0.5
        check_number("val_fraction", self.val_fraction, 0, 0.5)
        check_choice("pool", self.pool, POOLS)
        check_choice("ties", self.ties, TIES)
        check_choice("target_transform", self.target_transform, TARGET_TRANSFORMS)


def default_crop(sources: list[SlideSource], crop: int | None) -> int:
    """The crop side: ``crop`` if given, else min(400, largest grid side of the cohort)."""
    if crop is not None:
        check_int("crop", crop, 1)
        return int(crop)
    return int(min(REFERENCE_CROP, max(max(s.grid_shape) for s in sources)))


def event_batches(events: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches (positions into ``events``) each holding at least one event and two samples.

    Events and censored samples are dealt round-robin over ``ceil(n / batch_size)`` batches
    (fewer when there are fewer events), so batch sizes stay within one of each other.
    """
    ev = np.asarray(events).astype(bool)
    n, n_ev = len(ev), int(ev.sum())
    if n_ev == 0:
        raise DataError("no events among the training patients; survival needs events in every fold")
    nb = max(1, min(math.ceil(n / batch_size), n_ev, n // 2))
    batches: list[list[int]] = [[] for _ in range(nb)]
    for i, j in enumerate(rng.permutation(np.flatnonzero(ev))):
        batches[i % nb].append(int(j))
    start = n_ev % nb
    for i, j in enumerate(rng.permutation(np.flatnonzero(~ev))):
        batches[(start + i) % nb].append(int(j))
    return [rng.permutation(np.asarray(batches[i], dtype=np.int64)) for i in rng.permutation(nb)]


def training_view(
    src: SlideSource, crop: int, rng: np.random.Generator, augment: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """One training crop: features (C, crop, crop) float32, tissue (crop, crop) bool, and ``k``.

    The centre follows :func:`~nic.learn.data.crop_weights`; ``k`` (0-7, 0 without
    ``augment``) is the dihedral transform applied to the grid, and for an 8-variant store
    also the variant read, so the view is the compressed image of ``dihedral(slide, k)``.
    """
    y0, x0 = sample_crop_origin(src.weights, crop, rng)
    k = int(rng.integers(8)) if augment else 0
    f, m = src.crop(y0, x0, crop, k if src.variants == 8 else 0)
    return np.ascontiguousarray(dihedral(f, k)), np.ascontiguousarray(dihedral(m, k)), k


def _plain_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:  # BatchNorm needs 2 samples
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    return out


@dataclass
class FitHistory:
    """Per-epoch training loss and validation loss (NaN without validation), the lr, and
    which training stage and start each epoch belonged to (``"all"`` for one-stage models;
    ``"ratio"``/``"ratio.2"``/... and ``"conv"`` for nic-cnn with a ratio branch).

    Losses are recorded as computed: an epoch whose loss was not finite shows NaN or inf
    there, and is never the best epoch.  ``best_epoch`` indexes these lists: the epoch whose
    weights were kept (in the last stage that improved on the stages before it).
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    stage: list[str] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def _class_weight(task: str, y: np.ndarray, n_classes: int) -> torch.Tensor | None:
    if task == "binary":
        pos = max(int(y.sum()), 1)
        return torch.tensor([(len(y) - pos) / pos], dtype=torch.float32)
    if task == "multiclass":
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return None


def _finite_gradient(net: torch.nn.Module) -> bool:
    """Whether every gradient of ``net`` is finite."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True


def _build_model(
    cohort: Cohort, sources: list[SlideSource], fit_patients: np.ndarray, cfg: FitConfig, seed: int, dev: torch.device
) -> SlideModel:
    """A fresh network (seeded) with the fit slides' code statistics and, for regression,
    the target map fitted on the fit patients' targets."""
    torch.manual_seed(seed)
    crop = default_crop(sources, cfg.crop)
    spec = ModelSpec(
        sources[0].code_size,
        cohort.n_outputs,
        cfg.width,
        cfg.dropout,
        cfg.pool,
        crop,
        ratio_heads=cfg.ratio_heads,
        ratio_branches=cfg.ratio_starts if cfg.ratio_average and cfg.ratio_heads > 0 else 1,
    )
    net = create_model(cfg.model, spec)
    if hasattr(net, "set_code_stats"):
        net.set_code_stats(*code_stats([sources[i] for i in cohort.slides_of(fit_patients)], seed=seed))
    net.to(dev)
    scale = TargetScale()
    if cohort.task == "regression":  # kind and offset from the whole cohort: every fold agrees
        kind, offset = TargetScale.resolve(cohort.y, cfg.target_transform)
        scale = TargetScale.fit(cohort.y[fit_patients], kind, offset)
    return SlideModel(cfg.model, spec, cohort.task, crop, net, scale, cohort.classes)


@dataclass
class _Selection:
    """Which epoch's weights to keep: the best finite validation loss, counting stale epochs
    (from ``min_epochs`` on) for early stopping; without validation, the last epoch that trained."""

    patience: int
    min_epochs: int
    best: float = math.inf
    stale: int = 0
    state: dict[str, torch.Tensor] | None = None
    n_trained: int = 0  #: epochs that stepped at all
    n_good: int = 0  #: epochs that did not fail
    best_epoch: int = -1  #: index in the run's history of the kept weights; -1: none kept

    def update(self, epoch: int, index: int, net: torch.nn.Module, failed: bool, vloss: float | None) -> bool:
        """Record epoch ``epoch`` of this stage (``index`` in the run's history; ``vloss``
        None: no validation); True when training should stop."""
        if vloss is None:
            if not failed:
                self.n_good += 1
                self.state, self.best_epoch = copy.deepcopy(net.state_dict()), index
            return False
        failed = failed or not math.isfinite(vloss)
        self.n_good += not failed
        if not failed and vloss < self.best - 1e-6:
            self.best, self.state, self.stale, self.best_epoch = vloss, copy.deepcopy(net.state_dict()), 0, index
        elif epoch >= self.min_epochs:
            self.stale += 1
        return self.stale >= self.patience


def _train_epoch(
    model: SlideModel,
    sources: list[SlideSource],
    batches: list[np.ndarray],
    y: np.ndarray,
    time: np.ndarray | None,
    opt: torch.optim.Optimizer,
    cw: torch.Tensor | None,
    cfg: FitConfig,
    rng: np.random.Generator,
) -> tuple[list[float], int]:
    """One pass over ``batches`` (positions into ``sources``/``y``/``time``, slide-aligned):
    one random crop per slide; a batch whose loss or gradient is not finite does not step.
    Returns the batch losses and how many batches stepped."""
    net, task = model.net, model.task
    dev = next(net.parameters()).device
    net.train()
    losses, n_stepped = [], 0
    for idx in batches:
        views = [training_view(sources[s], model.crop, rng, cfg.augment) for s in idx]
        x, mk = _to_device([v[0] for v in views], dev), _to_device([v[1] for v in views], dev)
        yt = torch.from_numpy(model.target.forward(y[idx]) if task == "regression" else y[idx]).to(dev)
        tt = torch.from_numpy(time[idx]).to(dev) if time is not None else None
        loss = task_loss(task, net(x, mk), yt, tt, cw, cfg.ties)  # type: ignore[arg-type]
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            continue
        loss.backward()
        if not _finite_gradient(net):
            losses[-1] = math.nan
            continue
        opt.step()
        n_stepped += 1
    return losses, n_stepped


def _validation_loss(
    model: SlideModel, cohort: Cohort, sources: list[SlideSource], val_patients: np.ndarray, cfg: FitConfig, seed: int
) -> float:
    """The task loss of the patient-level (slide-averaged) outputs on ``val_patients``."""
    val_slides = cohort.slides_of(val_patients)
    raw = model.predict_raw([sources[i] for i in val_slides], cfg.val_crops, False, seed)
    praw = patient_mean(raw, cohort.slide_patient[val_slides], val_patients)
    yv = cohort.y[val_patients]
    yv_t = torch.from_numpy(model.target.forward(yv) if model.task == "regression" else yv)
    tv = torch.from_numpy(cohort.time[val_patients]) if cohort.time is not None else None
    return float(task_loss(model.task, torch.from_numpy(praw).float(), yv_t, tv, None, cfg.ties))  # type: ignore[arg-type]


def fit_model(
    cohort: Cohort,
    sources: list[SlideSource],
    fit_patients: np.ndarray,
    val_patients: np.ndarray,
    cfg: FitConfig,
    seed: int,
) -> tuple[SlideModel, FitHistory]:
    """Train one model on the slides of ``fit_patients``; early stopping on ``val_patients``.

    ``sources`` are aligned with ``cohort.slide_ids``.  The loss of a batch uses one random
    crop per slide with the patient's label; the validation loss is the task loss of the
    patient-level (slide-averaged) outputs.  Adam; lr /= 10 after ``lr_patience`` epochs
    without improvement (down to ``min_lr``); the best validation epoch's weights are kept.
    Models with training stages (nic-cnn with a ratio branch) are trained stage after stage,
    each with a fresh optimiser; a later stage keeps the earlier stages' weights unless it
    improves the validation loss, and the ratio stage runs ``ratio_starts`` times (each start
    a copy of the branch, averaged, with ``ratio_average``; else the best start is kept).

    A batch whose loss or gradient is not finite does not step the optimizer; an epoch
    with no finite training batch or a non-finite validation loss counts as failed, never
    as an improvement.  :class:`DataError` when every epoch failed.
    """
    import time as _time

    t_start = _time.perf_counter()
    dev = torch_device(cfg.device)
    rng = np.random.default_rng(seed)
    model = _build_model(cohort, sources, fit_patients, cfg, seed, dev)
    net = model.net
    if cohort.task == "survival" and len(val_patients) and not cohort.y[val_patients].any():
        # the Cox loss of a validation part without events is a constant 0: selecting on it
        # would silently keep the epoch-0 weights, so train all epochs and keep the last
        logger.warning(
            "no events among the %d validation patients; no early stopping, keeping the last epoch", len(val_patients)
        )
        val_patients = val_patients[:0]
    validate = len(cohort.slides_of(val_patients)) > 0
    hist = FitHistory()
    stages = getattr(net, "stages", ("all",))
    keep = _Selection(cfg.patience, cfg.min_epochs)
    for si, stage in enumerate(stages):
        if len(stages) > 1:
            net.set_stage(stage)
        # copies of the ratio branch are averaged: one start trains each; else restarts of
        # the one branch are chosen by validation loss, so without validation there is one
        copies = len(getattr(net, "ratio", ())) if stage == "ratio" else 1
        starts = copies if copies > 1 else cfg.ratio_starts if stage == "ratio" and validate else 1
        # a later stage starts from the earlier stages' result, which it must beat
        to_beat = keep.best if si and validate else None
        kept: list[_Selection] = []
        for start in range(starts):
            branch = start if copies > 1 else 0
            if stage == "ratio":
                net.set_stage(stage, branch)
            if start:
                net.restart_stage(stage, torch.Generator().manual_seed(seed * 1009 + start), branch)
            label = stage if start == 0 else f"{stage}.{start + 1}"
            min_epochs = cfg.ratio_min_epochs if stage == "ratio" else cfg.min_epochs
            sel = _fit_stage(
                model, cohort, sources, fit_patients, val_patients, cfg, seed, rng, hist, label, to_beat, min_epochs
            )
            kept.append(sel)
        if copies > 1:
            best = _average_copies(model, kept, cohort, sources, val_patients, cfg, seed)
        else:  # the first of the starts with the lowest validation loss
            best = min(kept, key=lambda sel: sel.best)
        if si == 0 and best.n_good == 0:
            what = "training" if best.n_trained == 0 else "validation"
            raise DataError(
                f"the {what} loss was not finite in any of the {len(hist.train_loss)} epochs, so no model was"
                f" kept; try a lower `lr` (now {cfg.lr:g})"
            )
        if best.state is not None:
            net.load_state_dict(best.state)
            hist.best_epoch = best.best_epoch
            keep = best
        else:  # the stage improved on nothing: back to the earlier stages' weights (it trained in place)
            assert keep.state is not None  # the first stage always keeps an epoch (or raised above)
            net.load_state_dict(keep.state)
            if best.n_good == 0:
                logger.warning("the %s stage had no finite loss; keeping the weights of the stage before", stage)
    if len(stages) > 1:
        net.set_stage("all")
    net.eval()  # stays on ``dev``: the fold's test predictions run there too
    hist.seconds = _time.perf_counter() - t_start
    return model, hist


def _average_copies(
    model: SlideModel,
    starts: list[_Selection],
    cohort: Cohort,
    sources: list[SlideSource],
    val_patients: np.ndarray,
    cfg: FitConfig,
    seed: int,
) -> _Selection:
    """The ratio stage's copies together: copy k takes its weights from start k's kept epoch
    and an equal share of the output (none for a start that kept nothing); the result is a
    selection of all of them, with their validation loss, for the next stage to beat."""
    net = model.net
    good = [k for k, sel in enumerate(starts) if sel.state is not None]
    out = _Selection(cfg.patience, cfg.ratio_min_epochs)
    out.n_trained = sum(sel.n_trained for sel in starts)
    out.n_good = sum(sel.n_good for sel in starts)
    if not good:
        return out
    with torch.no_grad():
        for k in good:
            prefixes = (f"ratio.{k}.", f"ratio_out.{k}.")
            net.load_state_dict({n: v for n, v in starts[k].state.items() if n.startswith(prefixes)}, strict=False)  # type: ignore[union-attr]
        weights = torch.zeros_like(net.ratio_weights)
        weights[good] = 1.0 / len(good)
        net.ratio_weights.copy_(weights)
    net.set_stage("ratio", None)
    validate = len(val_patients) > 0
    out.best = _validation_loss(model, cohort, sources, val_patients, cfg, seed) if validate else math.inf
    if validate and not math.isfinite(out.best):
        logger.warning("the averaged ratio branch has a non-finite validation loss; keeping its best copy alone")
        k = min(good, key=lambda i: starts[i].best)
        net.ratio_weights.zero_()[k] = 1.0
        out.best = starts[k].best
    out.state, out.best_epoch = copy.deepcopy(net.state_dict()), max(starts[k].best_epoch for k in good)
    logger.info(
        "ratio stage: %d copies averaged, validation loss %.4f (copies %s)",
        len(good),
        out.best,
        ", ".join(f"{sel.best:.4f}" for sel in starts),
    )
    return out


def _fit_stage(
    model: SlideModel,
    cohort: Cohort,
    sources: list[SlideSource],
    fit_patients: np.ndarray,
    val_patients: np.ndarray,
    cfg: FitConfig,
    seed: int,
    rng: np.random.Generator,
    hist: FitHistory,
    label: str,
    to_beat: float | None,
    min_epochs: int,
) -> _Selection:
    """One stage (or one start of it): Adam on the parameters that train, lr decay on
    plateau, early stopping (neither before ``min_epochs``); epochs are appended to ``hist``
    under ``label``.  ``to_beat``: the validation loss of the weights the stage starts from
    (a later stage), which its best epoch must improve on to be kept."""
    task, net = cohort.task, model.net
    dev = next(net.parameters()).device
    fit_slides = cohort.slides_of(fit_patients)
    y_slide = cohort.y[cohort.slide_patient]
    cw = _class_weight(task, y_slide[fit_slides], cohort.n_outputs) if cfg.class_weights else None
    cw = cw.to(dev) if cw is not None else None
    t_slide = cohort.time[cohort.slide_patient] if cohort.time is not None else None
    validate = len(val_patients) > 0
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.lr_patience, min_lr=cfg.min_lr)
    keep = _Selection(cfg.patience, min_epochs)
    if to_beat is not None:
        keep.best = to_beat
    for epoch in range(cfg.epochs):
        if task == "survival":
            batches = event_batches(y_slide[fit_slides], cfg.batch_size, rng)
        else:
            batches = _plain_batches(len(fit_slides), cfg.batch_size, rng)
        losses, n_stepped = _train_epoch(
            model, sources, [fit_slides[b] for b in batches], y_slide, t_slide, opt, cw, cfg, rng
        )
        hist.train_loss.append(float(np.mean(losses)))
        hist.lr.append(opt.param_groups[0]["lr"])
        hist.stage.append(label)
        if n_stepped < len(batches):
            logger.warning(
                "epoch %d: %d of %d training batches had a non-finite loss or gradient and were skipped;"
                " a lower `lr` (now %g) may help",
                epoch,
                len(batches) - n_stepped,
                len(batches),
                cfg.lr,
            )
        failed = n_stepped == 0
        keep.n_trained += not failed
        vloss = _validation_loss(model, cohort, sources, val_patients, cfg, seed) if validate else None
        hist.val_loss.append(float("nan") if vloss is None else vloss)
        stop = keep.update(epoch, len(hist.train_loss) - 1, net, failed, vloss)
        if vloss is not None and epoch >= min_epochs:
            sched.step(math.inf if failed or not math.isfinite(vloss) else vloss)  # a failed epoch is no improvement
        logger.debug(
            "%s epoch %d: train %.4f val %.4f lr %.1e",
            label,
            epoch,
            hist.train_loss[-1],
            hist.val_loss[-1],
            hist.lr[-1],
        )
        if stop:
            logger.info("%s: early stop at epoch %d (best %d)", label, epoch, keep.best_epoch)
            break
    return keep
