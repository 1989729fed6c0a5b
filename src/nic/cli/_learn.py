"""``nic train`` and ``nic predict``: patient labels from compressed slides (thin over :mod:`nic.learn`)."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    compressed: Path = typer.Option(..., "--compressed", help="Folder of compressed slides (<slide_id>.zarr)."),
    labels: Path = typer.Option(
        ..., "--labels", help="CSV with a slide column (id or path), a patient column and targets."
    ),
    task: str = typer.Option(..., "--task", help="regression | binary | multiclass | survival"),
    out: Path = typer.Option(
        ..., "--out", help="Run folder to write (metrics.json, predictions.csv, fold_*/, config.json)."
    ),
    target: str | None = typer.Option(None, "--target", help="Label column (regression, binary, multiclass)."),
    time: str | None = typer.Option(None, "--time", help="Survival time column."),
    event: str | None = typer.Option(None, "--event", help="Survival event column (1 = event, 0 = censored)."),
    model: str = typer.Option("nic-cnn", "--model", help="Slide model: nic-cnn, meanpool, abmil."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds (by patient)."),
    epochs: int = typer.Option(
        100, "--epochs", help="Most epochs per fold (early stopping on an inner validation split)."
    ),
    crop: int | None = typer.Option(
        None, "--crop", help="Crop side in grid cells [default: min(400, largest grid side)]."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Slides per batch."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate (divided by 10 on plateau)."),
    patience: int = typer.Option(20, "--patience", help="Epochs without validation improvement before stopping."),
    width: int = typer.Option(128, "--width", help="Filters / hidden units of the model."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout rate (channel dropout in nic-cnn)."),
    pool: str = typer.Option("maxmean", "--pool", help="nic-cnn global pooling: maxmean | max | mean | attention."),
    ties: str = typer.Option("efron", "--ties", help="Cox ties: efron | breslow."),
    seed: int = typer.Option(0, "--seed", help="Seed of splits, crops and weights."),
    slide_column: str = typer.Option("slide", "--slide-column", help="Slide column of the labels CSV."),
    patient_column: str = typer.Option("patient", "--patient-column", help="Patient column of the labels CSV."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch."),
    device: str = typer.Option("auto", "--device", help="torch device: auto (cuda when available), cpu, cuda, cuda:1."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
) -> None:
    """Cross-validated training of a slide-level model; prints the pooled out-of-fold metrics."""
    from nic.learn import FitConfig, LabelSpec, TrainConfig, train_cv

    cfg = TrainConfig(
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
            ties=ties,
            seed=seed,
            device=device,
        ),
        folds=folds,
        out=out,
        overwrite=overwrite,
        threads=threads,
    )
    cfg.labels.check()
    if ties not in ("efron", "breslow"):
        from nic.errors import DataError

        raise DataError(f"--ties must be efron or breslow, got {ties!r}")
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
    from nic._outputs import check_writable, write_atomic
    from nic.errors import DataError
    from nic.learn import predict_run

    if out.exists() and not overwrite:
        raise DataError(f"{out}: exists; pass --overwrite to replace it")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; --out is the CSV file to write")
    check_writable(out)  # before the work, not after it
    if threads:
        import torch

        torch.set_num_threads(threads)
    df = predict_run(model, compressed, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: df.to_csv(tmp, index=False))
    typer.echo(f"wrote {len(df)} rows to {out}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``predict`` to ``app``."""
    app.command("train")(train)
    app.command("predict")(predict)
