"""Train an unsupervised encoder (VAE, contrastive, BiGAN) on patches sampled from slides.

Same run folder, Lightning machinery (:func:`~nic.encoder_training._train.make_trainer`),
augmentation and export as the multitask encoder::

    config.json        the UnsupervisedConfig, the encoder's config and the slides
    checkpoints/       Lightning checkpoints (best by val_loss where the method has one, and last)
    logs/              CSV logs (and TensorBoard when installed)
    preview.png        the latest preview (VAE: inputs over reconstructions; BiGAN: samples,
                       inputs, reconstructions; contrastive: pairs and P(same)); previews/ per epoch
    encoder/           the trained encoder (safetensors + JSON), ready for ``nic compress``
    metrics.json       validation metrics, epochs, patches/s and seconds per 10,000 patches
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic.encoder_training._train import TrainResult, _quiet_lightning, export_best, make_trainer
from nic.errors import DataError
from nic.patches.augment import AugmentConfig

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "UnsupervisedConfig", "train_unsupervised"]

METHODS = ("vae", "contrastive", "bigan")
_DEFAULT_LR = {"vae": 1e-3, "contrastive": 1e-3, "bigan": 2e-4}


@dataclass(frozen=True)
class UnsupervisedConfig:
    """An unsupervised run; written to ``<run>/config.json``.

    ``slides``: files, folders or CSVs (see :func:`~nic.encoder_training._sampling.slide_paths`);
    ``slide_mpp`` the level-0 um/px of slides that state none.  ``patches`` training
    patches (pairs for ``contrastive``) are drawn once by ``seed`` from the tissue cells
    (at least ``min_tissue`` tissue) at the encoder's um/px, ``val_patches`` more with
    another seed; ``balance`` ``slides`` draws every slide equally often (else every tissue
    cell).  ``lr`` ``None`` is the method's default (Adam; 2e-4 for the BiGAN);
    ``kl_weight`` weighs the VAE's KL term against its summed squared error.
    Early stopping on ``val_loss`` (VAE, contrastive) after ``early_stopping_patience``
    epochs; the BiGAN runs all ``epochs``.
    """

    method: str
    slides: tuple[str, ...]
    slide_mpp: float | None = None
    encoder: str = "nic-cnn"
    patches: int = 4000
    val_patches: int = 256
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None
    kl_weight: float = 0.01
    min_tissue: float = 0.5
    balance: str = "cells"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping_patience: int = 4
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    precision: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"unknown unsupervised method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.slides:
            raise DataError(f"method {self.method!r} learns from slides; give --slides FILE|FOLDER|CSV")
        if self.patches < 2 or self.val_patches < 2 or self.epochs < 1 or self.batch_size < 2:
            raise DataError(
                f"patches, val patches and batch size must be >= 2 and epochs >= 1, got {self.patches}, "
                f"{self.val_patches}, {self.batch_size} and {self.epochs}"
            )

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else _DEFAULT_LR[self.method])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_json()
        d["slides"] = list(self.slides)
        return d


def _preview_callback(out: Path, batch: Any) -> Any:
    """Writes ``out/preview.png`` and ``out/previews/epoch_NNN.png`` after every validation."""
    from lightning.pytorch.callbacks import Callback

    class _Preview(Callback):
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            was_training = pl_module.training
            pl_module.eval()
            moved = (
                tuple(t.to(pl_module.device) for t in batch) if isinstance(batch, tuple) else batch.to(pl_module.device)
            )
            rows = pl_module.preview(moved)
            pl_module.train(was_training)
            picture = preview_grid(rows)
            from PIL import Image

            (out / "previews").mkdir(exist_ok=True)
            img = Image.fromarray(picture)
            img.save(out / "previews" / f"epoch_{trainer.current_epoch:03d}.png")
            img.save(out / "preview.png")

    return _Preview()


def preview_grid(rows: list[Any], size: int = 96, gap: int = 4) -> np.ndarray:
    """Rows of pictures (N, 3, H, W) in [0, 1] -> one uint8 RGB picture, each tile ``size`` px."""
    import torch.nn.functional as F

    n = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * (size + gap) - gap, n * (size + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        t = F.interpolate(r.detach().float().cpu().clamp(0, 1), size=(size, size), mode="nearest")
        tiles = (t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        for j, tile in enumerate(tiles):
            canvas[i * (size + gap) : i * (size + gap) + size, j * (size + gap) : j * (size + gap) + size] = tile
    return canvas


def train_unsupervised(config: UnsupervisedConfig, out: str | Path) -> TrainResult:
    """Train ``config.method`` on patches of ``config.slides`` in the run folder ``out``.

    Returns a :class:`TrainResult`; the encoder is saved with :func:`nic.encoders.save_encoder`
    in ``out/encoder``.  Bad input raises :class:`DataError` or
    :class:`~nic.errors.EncoderError` before training; ``out`` holding a run is a :class:`DataError`.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from nic.encoder_training._methods import BiganModule, SiameseModule, VaeModule
    from nic.encoder_training._sampling import SlidePairs, SlidePatches, SlidePatchSampler, slide_paths
    from nic.encoders import load_encoder

    out = Path(out)
    if (out / "config.json").exists() or (out / "checkpoints").exists():
        raise DataError(f"{out}: already holds a training run; give a new --out folder (runs are never overwritten)")
    sources = slide_paths(list(config.slides), config.slide_mpp)
    L.seed_everything(config.seed, workers=True, verbose=False)
    encoder = load_encoder(config.encoder)
    t0 = time.perf_counter()
    sampler = SlidePatchSampler(sources, encoder.mpp, encoder.patch_size, config.min_tissue, config.balance)
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "contrastive":
        train_ds: Any = SlidePairs(sampler, config.patches, config.seed)
        val_ds: Any = SlidePairs(sampler, config.val_patches, config.seed + 10_000)
    else:
        train_ds = SlidePatches(sampler, config.patches, config.seed)
        val_ds = SlidePatches(sampler, config.val_patches, config.seed + 10_000)
    logger.info("sampled %d slides in %.1f s", len(sources), time.perf_counter() - t0)
    (out / "config.json").write_text(
        json.dumps(
            {
                "train": config.to_json(),
                "encoder": encoder.config.to_json(),
                "encoder_source": encoder.source,
                "slides": [
                    {"path": str(s.path), "mpp": s.mpp, "fallback_mpp": s.fallback_mpp, "tissue_cells": int(n)}
                    for s, n in zip(sources, sampler.n_cells)
                ],
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    loader_args: dict[str, Any] = {"batch_size": config.batch_size, "num_workers": config.num_workers}
    if config.num_workers > 0:
        loader_args["persistent_workers"] = True
    g = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_ds, shuffle=True, generator=g, drop_last=len(train_ds) > config.batch_size, **loader_args
    )
    val_loader = DataLoader(val_ds, shuffle=False, **loader_args)
    preview_batch = next(iter(DataLoader(val_ds, batch_size=8, shuffle=False)))
    if isinstance(preview_batch, list):
        preview_batch = tuple(preview_batch)

    encoder.module.train()
    common = {"lr": config.learning_rate, "augment": config.augment, "seed": config.seed}
    if config.method == "vae":
        module: Any = VaeModule(
            encoder.module, encoder.code_size, encoder.patch_size, kl_weight=config.kl_weight, **common
        )
    elif config.method == "contrastive":
        module = SiameseModule(encoder.module, encoder.code_size, **common)
    else:
        module = BiganModule(encoder.module, encoder.code_size, encoder.patch_size, **common)
    monitor = None if config.method == "bigan" else "val_loss"
    trainer, ckpt, speed, precision = make_trainer(
        out,
        epochs=config.epochs,
        accelerator=config.accelerator,
        precision=config.precision,
        progress=config.progress,
        n_batches=len(train_loader),
        early_stopping_patience=config.early_stopping_patience,
        monitor=monitor,
        extra_callbacks=[_preview_callback(out, preview_batch)],
    )
    logger.info(
        "training %s (%s) on %d %s from %d slides, precision %s",
        encoder.name,
        config.method,
        len(train_ds),
        "pairs" if config.method == "contrastive" else "patches",
        len(sources),
        precision,
    )
    with _quiet_lightning():
        trainer.fit(module, train_loader, val_loader)

    source = {"format": "nic-train-encoder", "method": config.method, "run": str(out.resolve()), "slides": len(sources)}
    best, metrics, path = export_best(
        trainer, ckpt, module, encoder, out, config.method, source, use_best=monitor is not None
    )
    pps = speed.last
    per_pair = 2 if config.method == "contrastive" else 1
    mean_pps = speed.samples / speed.seconds if speed.seconds > 0 else float("nan")
    result = TrainResult(out, path, metrics, pps, int(trainer.current_epoch))
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "method": config.method,
                "best_checkpoint": best,
                "epochs": result.epochs,
                "train_items_per_s_last_epoch": pps,
                "train_items_per_s_mean": mean_pps,
                "patches_per_item": per_pair,
                "seconds_per_10k_patches": 10_000 / (mean_pps * per_pair) if mean_pps > 0 else None,
                "train_seconds": speed.seconds,
                "val": metrics,
            },
            indent=2,
        )
        + "\n"
    )
    logger.info("run %s: %d epochs, %.1f items/s; encoder in %s", out, result.epochs, pps, path)
    return result
