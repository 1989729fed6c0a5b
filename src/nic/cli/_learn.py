"""``nic train`` and ``nic predict``: patient labels from compressed slides (thin over :mod:`nic.learn`)."""

from __future__ import annotations

from pathlib import Path

import typer

from nic._device import DEVICE_HELP
from nic.cli._common import config_option, library_default, set_torch_threads
from nic.cli._names import NamesCommand

FIT = "nic.learn.train:FitConfig"
CV = "nic.learn.run:CVConfig"


def train(
    compressed: Path = typer.Option(..., "--compressed", help="Folder of compressed slides (<slide_id>.zarr)."),
    labels: Path = typer.Option(
        ..., "--labels", help="CSV with a slide column (id or path), a patient column and targets."
    ),
    task: str = typer.Option(..., "--task", help="Task: {names:nic.learn.data:TASKS}."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder to write (metrics.json, predictions.csv, fold_*/, config.json)."
    ),
    target: str | None = typer.Option(None, "--target", help="Label column (regression, binary, multiclass)."),
    time: str | None = typer.Option(None, "--time", help="Survival time column."),
    event: str | None = typer.Option(None, "--event", help="Survival event column (1 = event, 0 = censored)."),
    model: str = config_option(FIT, "model", "Slide model: {names:nic.learn.models:list_models}."),
    folds: int = config_option(CV, "folds", "Cross-validation folds (by patient)."),
    epochs: int = config_option(FIT, "epochs", "Most epochs per fold (early stopping on an inner validation split)."),
    crop: int | None = config_option(FIT, "crop", "Crop side in grid cells (default: min(400, largest grid side))."),
    batch_size: int = config_option(FIT, "batch_size", "Slides per batch."),
    lr: float = config_option(FIT, "lr", "Adam learning rate (divided by 10 on plateau)."),
    patience: int = config_option(FIT, "patience", "Epochs without validation improvement before stopping."),
    width: int = config_option(FIT, "width", "Filters / hidden units of the model."),
    dropout: float = config_option(FIT, "dropout", "Dropout rate (channel dropout in nic-cnn)."),
    pool: str = config_option(FIT, "pool", "nic-cnn global pooling: {names:nic.learn.models:POOLS}."),
    ratio_heads: int = config_option(
        FIT,
        "ratio_heads",
        "nic-cnn: channels of the cell-ratio branch (log of per-cell evidence over a per-cell gate, e.g. mitoses"
        " per tumour cell), trained before the convolutional path; 0: the reference network alone.",
    ),
    ratio_starts: int = config_option(
        FIT, "ratio_starts", "nic-cnn: starts of the ratio branch's training (see --ratio-average)."
    ),
    ratio_min_epochs: int = config_option(
        FIT, "ratio_min_epochs", "nic-cnn: epochs of the ratio branch's training before lr decay or early stopping."
    ),
    ratio_average: bool = typer.Option(
        library_default(FIT, "ratio_average"),
        "--ratio-average/--ratio-best",
        help="nic-cnn: keep every start of the ratio branch's training and average them, or only the start with"
        " the lowest validation loss.",
    ),
    target_transform: str = config_option(
        FIT,
        "target_transform",
        "Regression target before the standard score: {names:nic.learn.targets:TARGET_TRANSFORMS}"
        " (auto: log when it makes non-negative targets less skewed).",
    ),
    ties: str = config_option(FIT, "ties", "Cox ties: {names:nic.learn.losses:TIES}."),
    seed: int = config_option(FIT, "seed", "Seed of splits, crops and weights."),
    slide_column: str = typer.Option("slide", "--slide-column", help="Slide column of the labels CSV."),
    patient_column: str = typer.Option("patient", "--patient-column", help="Patient column of the labels CSV."),
    threads: int | None = config_option(CV, "threads", "CPU threads for torch (default: torch's)."),
    device: str = config_option(FIT, "device", f"torch device: {DEVICE_HELP}."),
    devices: str | None = typer.Option(
        None,
        "--devices",
        help="Fit the folds in parallel worker processes, fold k on the k-th device (cyclic), e.g. cuda:0,cuda:1, "
        "0,1 (CUDA indices) or cpu,cpu; each worker uses --threads torch threads (default: the cores shared "
        "among them). Replaces --device.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
) -> None:
    """Cross-validated training of a slide-level model; prints the pooled out-of-fold metrics."""
    from nic._device import parse_devices
    from nic.learn import CVConfig, FitConfig, LabelSpec, train_cv

    cfg = CVConfig(
        compressed=compressed,
        labels=LabelSpec(labels, task, target, time, event, slide_column, patient_column),  # type: ignore[arg-type]
        fit=FitConfig(
            model=model,
            epochs=epochs,
            crop=crop,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            width=width,
            dropout=dropout,
            pool=pool,
            ratio_heads=ratio_heads,
            ratio_starts=ratio_starts,
            ratio_min_epochs=ratio_min_epochs,
            ratio_average=ratio_average,
            target_transform=target_transform,
            ties=ties,
            seed=seed,
            device=device,
        ),
        folds=folds,
        out=out,
        overwrite=overwrite,
        threads=threads,
        devices=None if devices is None else parse_devices(devices),
    )
    res = train_cv(cfg)
    for name, m in res.metrics.items():
        lo, hi = m["ci95"]
        typer.echo(
            f"{name}: {m['value']:.3f} (95% CI {lo:.3f}-{hi:.3f}); folds " + ", ".join(f"{v:.3f}" for v in m["folds"])
        )
    typer.echo(f"wrote {out}")


def predict(
    model: Path = typer.Option(..., "--model", help="Run folder written by `nic train`."),
    compressed: Path = typer.Option(..., "--compressed", help="Folder of compressed slides to predict."),
    out: Path = typer.Option(..., "--out", help="CSV to write (one row per slide, or per patient with --labels)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV with slide and patient columns: aggregate per patient."
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output CSV."),
) -> None:
    """Apply a trained run (the mean of its fold models) to a folder of compressed slides."""
    from nic._outputs import check_new_file, write_atomic
    from nic.learn import predict_run

    set_torch_threads(threads)  # 0 or -2 were once ignored without a word
    check_new_file(out, overwrite)  # before the work, not after it
    df = predict_run(model, compressed, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: df.to_csv(tmp, index=False))
    typer.echo(f"wrote {len(df)} rows to {out}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``predict`` to ``app``."""
    app.command("train", cls=NamesCommand)(train)
    app.command("predict")(predict)
