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

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from nic.encoder_training._config import METHODS, UnsupervisedConfig
from nic.encoder_training._train import (
    TrainResult,
    export_best,
    fit,
    global_rank,
    launch,
    loader_args,
    make_trainer,
    start_run,
    write_metrics,
    write_run_config,
)

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "UnsupervisedConfig", "train_unsupervised", "preview_grid"]


def _preview_callback(out: Path, batch: Any) -> Any:
    """Writes ``out/preview.png`` and ``out/previews/epoch_NNN.png`` after every validation."""
    from lightning.pytorch.callbacks import Callback

    class _Preview(Callback):
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or not trainer.is_global_zero:
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
    """Rows of pictures (N, 3, H, W) in [0, 1] -> one uint8 RGB picture, each tile ``size`` px
    (nearest-neighbour), laid out by :func:`nic.explain.image_grid`."""
    import torch.nn.functional as F

    from nic.explain._pictures import image_grid

    tiles = []
    for r in rows:
        t = F.interpolate(r.detach().float().cpu().clamp(0, 1), size=(size, size), mode="nearest")
        tiles.append((t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
    return image_grid(tiles, gap)


def train_unsupervised(config: UnsupervisedConfig, out: str | Path) -> TrainResult:
    """Train ``config.method`` on patches of ``config.slides`` in the run folder ``out``.

    Returns a :class:`TrainResult`; the encoder is saved with :func:`nic.encoders.save_encoder`
    in ``out/encoder``.  Bad input raises :class:`~nic.errors.DataError` or
    :class:`~nic.errors.EncoderError` before training; ``out`` holding a run is an
    :class:`~nic.errors.OutputError`.  ``config.devices`` > 1 trains on that many devices
    (see :func:`~nic.encoder_training._train.launch`).
    """
    return launch(_train_unsupervised, config, out)


def _train_unsupervised(config: UnsupervisedConfig, out: str | Path) -> TrainResult:
    from nic.encoder_training._sampling import SlidePatchSampler, slide_paths
    from nic.encoders import load_encoder

    out = start_run(out, config.seed)
    sources = slide_paths(list(config.slides), config.slide_mpp)
    encoder = load_encoder(config.encoder)
    t0 = time.perf_counter()
    sampler = SlidePatchSampler(sources, encoder.mpp, encoder.patch_size, config.min_tissue, config.balance)
    train_ds, val_ds = _datasets(config, sampler)
    logger.info("sampled %d slides in %.1f s", len(sources), time.perf_counter() - t0)
    if global_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        slides = [{"path": str(s.path), "mpp": s.mpp, "fallback_mpp": s.fallback_mpp, "tissue_cells": int(n)}
                  for s, n in zip(sources, sampler.n_cells)]  # fmt: skip
        write_run_config(out, config, encoder, slides=slides)
    train_loader, val_loader, preview_batch = _loaders(config, train_ds, val_ds)
    module = _module(config, encoder)
    monitor = None if config.method == "bigan" else "val_loss"
    trainer, ckpt, speed, precision = make_trainer(
        out, config, n_batches=len(train_loader), monitor=monitor,
        extra_callbacks=[_preview_callback(out, preview_batch)],
    )  # fmt: skip
    items = "pairs" if config.method == "contrastive" else "patches"
    logger.info("training %s (%s) on %d %s from %d slides, precision %s", encoder.name, config.method,
                len(train_ds), items, len(sources), precision)  # fmt: skip
    fit(trainer, module, train_loader, val_loader)
    if not trainer.is_global_zero:
        return TrainResult(out, out / "encoder", epochs=int(trainer.current_epoch))
    source = {"format": "nic-train-encoder", "method": config.method, "run": str(out.resolve()), "slides": len(sources)}
    best, metrics, path = export_best(
        trainer, ckpt, module, encoder, out, config.method, source, use_best=monitor is not None
    )
    result = TrainResult(out, path, metrics, speed.last, int(trainer.current_epoch))
    per_item = 2 if config.method == "contrastive" else 1
    seconds_10k = 10_000 / (speed.mean * per_item) if speed.mean > 0 else None
    write_metrics(out, result, best, speed, "items", method=config.method, patches_per_item=per_item,
                  seconds_per_10k_patches=seconds_10k)  # fmt: skip
    logger.info("run %s: %d epochs, %.1f items/s; encoder in %s", out, result.epochs, speed.last, path)
    return result


def _datasets(config: UnsupervisedConfig, sampler: Any) -> tuple[Any, Any]:
    """Training and validation draws: patch pairs for ``contrastive``, single patches otherwise."""
    from nic.encoder_training._sampling import SlidePairs, SlidePatches

    kind = SlidePairs if config.method == "contrastive" else SlidePatches
    return kind(sampler, config.patches, config.seed), kind(sampler, config.val_patches, config.seed + 10_000)


def _loaders(config: UnsupervisedConfig, train_ds: Any, val_ds: Any) -> tuple[Any, Any, Any]:
    """Shuffled training batches (seeded), validation batches, and the first 8 validation
    items for the previews."""
    import torch
    from torch.utils.data import DataLoader

    args = loader_args(config)
    g = torch.Generator().manual_seed(config.seed)
    train = DataLoader(train_ds, shuffle=True, generator=g, drop_last=len(train_ds) > config.batch_size, **args)
    preview = next(iter(DataLoader(val_ds, batch_size=8, shuffle=False)))
    return train, DataLoader(val_ds, shuffle=False, **args), tuple(preview) if isinstance(preview, list) else preview


def _module(config: UnsupervisedConfig, encoder: Any) -> Any:
    """The Lightning module of ``config.method`` around the encoder (in training mode)."""
    from nic.encoder_training._methods import BiganModule, SiameseModule, VaeModule

    encoder.module.train()
    common = {"lr": config.learning_rate, "augment": config.augment, "seed": config.seed}
    if config.method == "contrastive":
        return SiameseModule(encoder.module, encoder.code_size, **common)
    common["upsample"] = config.upsampling
    if config.method == "vae":
        return VaeModule(encoder.module, encoder.code_size, encoder.patch_size, kl_weight=config.kl_weight, **common)
    return BiganModule(
        encoder.module, encoder.code_size, encoder.patch_size, instance_noise=config.instance_noise, **common
    )
