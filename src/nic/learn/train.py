"""Fitting one slide-level model and predicting with it (test-time averaging).

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
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic._device import torch_device
from nic.errors import DataError, NicError
from nic.learn.data import Cohort, SlideSource, code_stats, dihedral, sample_crop_origin
from nic.learn.losses import task_loss
from nic.learn.models import POOLS, ModelSpec, create_model

__all__ = [
    "resolve_device",
    "FitConfig",
    "FitHistory",
    "SlideModel",
    "fit_model",
    "event_batches",
    "default_crop",
    "training_view",
    "patient_mean",
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
    seed: int = 0
    device: str = "auto"  #: torch device; "auto": the first CUDA device when torch sees one, else cpu

    def __post_init__(self) -> None:
        _check_int("--batch-size", self.batch_size, 2)  # BatchNorm needs 2 samples per batch
        _check_int("--epochs", self.epochs, 1)
        if not (isinstance(self.lr, (int, float, np.floating)) and math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"--lr must be a number greater than 0 (got {self.lr!r})")
        resolve_device(self.device)  # a bad or unavailable device fails before any work
        if not (isinstance(self.dropout, (int, float, np.floating)) and 0 <= self.dropout < 1):
            raise DataError(f"--dropout must be a number in [0, 1) (got {self.dropout!r})")
        if self.pool not in POOLS:
            raise DataError(f"--pool must be one of {', '.join(POOLS)} (got {self.pool!r})")


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device ("auto": cuda when available); a one-line error otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch_device(device, DataError)


def _check_int(option: str, value: Any, lowest: int) -> None:
    """Raise a one-line :class:`DataError` unless ``value`` is an integer >= ``lowest``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise DataError(f"{option} must be an integer of at least {lowest} (got {value!r})")


def default_crop(sources: list[SlideSource], crop: int | None) -> int:
    """The crop side: ``crop`` if given, else min(400, largest grid side of the cohort)."""
    if crop is not None:
        if crop < 1:
            raise DataError(f"--crop must be at least 1 cell (got {crop})")
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
class SlideModel:
    """A trained network with what is needed to use it: task, crop, target scaling, classes."""

    name: str
    spec: ModelSpec
    task: str
    crop: int
    net: torch.nn.Module
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: list[str] | None = None

    def meta(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "spec": asdict(self.spec),
            "task": self.task,
            "crop": self.crop,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "classes": self.classes,
        }

    def save(self, folder: Path) -> None:
        """``folder/model.safetensors`` (weights) and ``folder/model.json`` (the rest)."""
        from nic._outputs import save_safetensors

        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors"
        )
        (folder / "model.json").write_text(json.dumps(self.meta(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> SlideModel:
        """The model saved by :meth:`save` in ``folder``; :class:`DataError` for a missing or damaged one."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        damaged = "the run is damaged; retrain it with `nic train`"
        try:
            meta = json.loads((folder / "model.json").read_text())
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: not a saved nic slide model ({e}); train one with `nic train`") from e
        except SafetensorError as e:
            raise DataError(f"{folder}: model.safetensors is not a readable weight file ({e}); {damaged}") from e
        try:
            spec = ModelSpec(**meta["spec"])
            net = create_model(meta["model"], spec)
            model = cls(
                meta["model"],
                spec,
                meta["task"],
                int(meta["crop"]),
                net,
                meta["target_mean"],
                meta["target_std"],
                meta["classes"],
            )
        except (KeyError, TypeError, ValueError, NicError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{folder}: model.json does not describe a nic slide model ({why}); {damaged}") from e
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(
                f"{folder}: the weights in model.safetensors do not fit the {model.name!r} model of"
                f" model.json ({_state_mismatch(net.state_dict(), state)}); {damaged}"
            ) from e
        net.eval()
        return model

    def to_prediction(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs (N, n_out) -> (N,) values / probabilities / log-risks, or (N, K) probabilities."""
        if self.task == "regression":
            return raw[:, 0] * self.target_std + self.target_mean
        if self.task == "binary":
            return 1 / (1 + np.exp(-raw[:, 0]))
        if self.task == "multiclass":
            e = np.exp(raw - raw.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        return raw[:, 0]

    def predict_raw(
        self, sources: list[SlideSource], n_crops: int, variants: bool, seed: int = 0, batch: int = 16
    ) -> np.ndarray:
        """(S, n_out) raw outputs per slide, averaged over test crops and variants
        (the mean of :meth:`predict_views`)."""
        return np.stack([v.mean(0) for v in self.predict_views(sources, n_crops, variants, seed, batch)])

    @torch.no_grad()
    def predict_views(
        self, sources: list[SlideSource], n_crops: int, variants: bool, seed: int = 0, batch: int = 16
    ) -> list[np.ndarray]:
        """Per slide, the raw outputs (V, n_out) of every test view: crops x variants.

        Crops: one centred window when the slide fits in the crop, else ``n_crops`` centres
        drawn (seeded) in proportion to distance from background.  Variants: the 8 stored
        variants with their grid transform, or the 8 grid rotations/flips of a 1-variant store.
        """
        self.net.eval()
        dev = next(self.net.parameters()).device
        out = []
        for si, src in enumerate(sources):
            rng = np.random.default_rng([seed, si])
            h, w = src.grid_shape
            if h <= self.crop and w <= self.crop:
                origins = [sample_crop_origin(src.weights, self.crop, None, center=(h // 2, w // 2))]
            else:
                origins = [sample_crop_origin(src.weights, self.crop, rng) for _ in range(max(1, n_crops))]
            ks = range(8) if variants else [0]
            views = [(o, k) for o in origins for k in ks]
            acc = []
            for b in range(0, len(views), batch):
                xs, ms = [], []
                for (y0, x0), k in views[b : b + batch]:
                    f, m = src.crop(y0, x0, self.crop, k if src.variants == 8 else 0)
                    xs.append(dihedral(f, k))
                    ms.append(dihedral(m, k))
                x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).to(dev)
                mk = torch.from_numpy(np.ascontiguousarray(np.stack(ms))).to(dev)
                acc.append(self.net(x, mk).double().cpu().numpy())
            out.append(np.concatenate(acc))
        return out

    def spread(self, views: np.ndarray) -> float:
        """Standard deviation over views (V, n_out) of the converted prediction: the value,
        probability or log-risk (multiclass: the probability of the class the mean picks)."""
        pred = self.to_prediction(views)
        if pred.ndim == 2:
            pred = pred[:, int(pred.mean(0).argmax())]
        return float(pred.std())


def _state_mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """One line on how a loaded state dict differs from a model's own."""
    parts = []
    if missing := [k for k in want if k not in got]:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra := [k for k in got if k not in want]:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if shaped := [k for k in want if k in got and got[k].shape != want[k].shape]:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} of another shape, e.g. {k} {tuple(got[k].shape)} instead of {tuple(want[k].shape)}"
        )
    return "; ".join(parts) or "the tensors do not match"


def patient_mean(raw: np.ndarray, slide_patient: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Mean of slide outputs (S, n_out) per patient in ``patients`` order -> (P, n_out)."""
    return np.stack([raw[slide_patient == p].mean(0) for p in patients])


@dataclass
class FitHistory:
    """Per-epoch training loss and validation loss (NaN without validation), and the lr.

    Losses are recorded as computed: an epoch whose loss was not finite shows NaN or inf
    there, and is never the best epoch.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
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

    A batch whose loss or gradient is not finite does not step the optimizer; an epoch
    with no finite training batch or a non-finite validation loss counts as failed, never
    as an improvement.  :class:`DataError` when every epoch failed.
    """
    import time as _time

    t_start = _time.perf_counter()
    dev = resolve_device(cfg.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    crop = default_crop(sources, cfg.crop)
    spec = ModelSpec(sources[0].code_size, cohort.n_outputs, cfg.width, cfg.dropout, cfg.pool, crop)
    net = create_model(cfg.model, spec)
    task = cohort.task
    fit_slides = cohort.slides_of(fit_patients)
    if hasattr(net, "set_code_stats"):
        net.set_code_stats(*code_stats([sources[i] for i in fit_slides], seed=seed))
    net.to(dev)
    val_slides = cohort.slides_of(val_patients)
    y_slide = cohort.y[cohort.slide_patient]
    mean, std = 0.0, 1.0
    if task == "regression":
        yp = cohort.y[fit_patients].astype(np.float64)
        mean, std = float(yp.mean()), float(yp.std() or 1.0)
    model = SlideModel(cfg.model, spec, task, crop, net, mean, std, cohort.classes)
    cw = _class_weight(task, y_slide[fit_slides], cohort.n_outputs) if cfg.class_weights else None
    cw = cw.to(dev) if cw is not None else None
    t_slide = cohort.time[cohort.slide_patient] if cohort.time is not None else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.lr_patience, min_lr=cfg.min_lr)
    hist = FitHistory()
    best, best_state, stale = math.inf, None, 0
    n_trained, n_good = 0, 0  # epochs that stepped at all; epochs that did not fail
    if task == "survival" and len(val_slides) and not cohort.y[val_patients].any():
        # the Cox loss of a validation part without events is a constant 0: selecting on it
        # would silently keep the epoch-0 weights, so train all epochs and keep the last
        logger.warning(
            "no events among the %d validation patients; no early stopping, keeping the last epoch", len(val_patients)
        )
        val_patients, val_slides = val_patients[:0], val_slides[:0]
    val_sources = [sources[i] for i in val_slides]
    for epoch in range(cfg.epochs):
        net.train()
        if task == "survival":
            batches = event_batches(y_slide[fit_slides], cfg.batch_size, rng)
        else:
            batches = _plain_batches(len(fit_slides), cfg.batch_size, rng)
        losses, n_stepped = [], 0
        for b in batches:
            idx = fit_slides[b]
            xs, ms = [], []
            for s in idx:
                f, m, _ = training_view(sources[s], crop, rng, cfg.augment)
                xs.append(f)
                ms.append(m)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).to(dev, non_blocking=True)
            mk = torch.from_numpy(np.ascontiguousarray(np.stack(ms))).to(dev, non_blocking=True)
            yt = torch.from_numpy(((y_slide[idx] - mean) / std) if task == "regression" else y_slide[idx]).to(dev)
            tt = torch.from_numpy(t_slide[idx]).to(dev) if t_slide is not None else None
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
        hist.train_loss.append(float(np.mean(losses)))
        hist.lr.append(opt.param_groups[0]["lr"])
        if n_stepped < len(batches):
            logger.warning(
                "epoch %d: %d of %d training batches had a non-finite loss or gradient and were skipped;"
                " a lower --lr (now %g) may help",
                epoch,
                len(batches) - n_stepped,
                len(batches),
                cfg.lr,
            )
        failed = n_stepped == 0
        n_trained += not failed
        if len(val_slides):
            raw = model.predict_raw(val_sources, cfg.val_crops, False, seed)
            praw = patient_mean(raw, cohort.slide_patient[val_slides], val_patients)
            yv = cohort.y[val_patients]
            yv_t = torch.from_numpy(((yv - mean) / std) if task == "regression" else yv)
            tv = torch.from_numpy(cohort.time[val_patients]) if cohort.time is not None else None
            vloss = float(task_loss(task, torch.from_numpy(praw).float(), yv_t, tv, None, cfg.ties))  # type: ignore[arg-type]
            hist.val_loss.append(vloss)
            failed = failed or not math.isfinite(vloss)
            n_good += not failed
            if not failed and vloss < best - 1e-6:
                best, best_state, stale, hist.best_epoch = vloss, copy.deepcopy(net.state_dict()), 0, epoch
            elif epoch >= cfg.min_epochs:
                stale += 1
            if epoch >= cfg.min_epochs:
                sched.step(math.inf if failed else vloss)  # a failed epoch is no improvement
            logger.debug("epoch %d: train %.4f val %.4f lr %.1e", epoch, hist.train_loss[-1], vloss, hist.lr[-1])
            if stale >= cfg.patience:
                logger.info("early stop at epoch %d (best %d)", epoch, hist.best_epoch)
                break
        else:
            hist.val_loss.append(float("nan"))
            if not failed:  # no validation: the last epoch that trained
                n_good += 1
                best_state, hist.best_epoch = copy.deepcopy(net.state_dict()), epoch
            logger.debug("epoch %d: train %.4f", epoch, hist.train_loss[-1])
    if n_good == 0:
        what = "training" if n_trained == 0 else "validation"
        raise DataError(
            f"the {what} loss was not finite in any of the {len(hist.train_loss)} epochs, so no model was"
            f" kept; try a lower --lr (now {cfg.lr:g})"
        )
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()  # stays on ``dev``: the fold's test predictions run there too
    hist.seconds = _time.perf_counter() - t_start
    return model, hist
