"""``nic audit``: every slide's readability, um/px, magnification and pyramid, before compressing."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("audit")(audit)


def audit(
    slides: list[Path] = typer.Argument(..., help="Slide files, folders of slides, or CSVs with a 'slide' column."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the table: .csv (nic compress reads it) or .html."
    ),
    encoder: str | None = typer.Option(
        None,
        "--encoder",
        "-e",
        help="Encoder to check against (its um/px and patch size; its speed is measured) "
        "[default: 128 px at 0.5 um/px, 300 patches/s].",
    ),
    patches_per_s: float | None = typer.Option(
        None, "--patches-per-s", min=0.001, help="Throughput for the time estimate (overrides the measured one)."
    ),
    tissue: bool = typer.Option(
        True, "--tissue/--no-tissue", help="Estimate tissue patches (reads a thumbnail of each slide)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """One row per slide with a flag for every suspicious value; exit code 1 when a slide would fail."""
    from nic._outputs import check_new_file
    from nic.audit import AuditOptions, audit_slides, write_csv, write_html
    from nic.errors import OptionError

    if out is not None:
        if out.suffix.lower() not in (".csv", ".html", ".htm"):
            raise OptionError(f"{out}: `out` must end in .csv or .html")
        check_new_file(out, overwrite)  # before the audit; never the slide list it reads, unless asked
    opts = AuditOptions(tissue=tissue)
    if encoder is not None:
        opts = _encoder_options(encoder, tissue)
    if patches_per_s is not None:
        opts = AuditOptions(opts.mpp, opts.patch, patches_per_s, tissue)
    rows = audit_slides(slides, opts)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        (write_html if out.suffix.lower() in (".html", ".htm") else write_csv)(rows, out)
    _print(rows, opts)
    if out is not None:
        typer.echo(f"wrote {out}")
    if any(r.would_fail for r in rows):
        raise typer.Exit(1)


def _encoder_options(spec: str, tissue: bool) -> object:
    """The encoder's um/px and patch size, and its throughput measured on 2 batches of random patches."""
    import time

    import numpy as np

    from nic.audit import AuditOptions
    from nic.encoders import load_encoder

    enc = load_encoder(spec).for_inference()
    x = np.random.default_rng(0).integers(0, 256, (32, enc.patch_size, enc.patch_size, 3), dtype=np.uint8)
    enc.embed(x[:4])  # warm-up
    t0 = time.perf_counter()
    enc.embed(x)
    rate = len(x) / max(time.perf_counter() - t0, 1e-6)
    return AuditOptions(enc.mpp, enc.patch_size, round(rate * 0.8, 1), tissue)  # ~20% goes to reading


def _print(rows: list, opts: object) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("slide", "vendor", "size", "levels", "um/px (source)", "obj.", "near level", "patches", "min",
                  "flags")  # fmt: skip
    for r in rows:
        size = f"{r.width} x {r.height}" if r.width else ""
        mpp = f"{r.mpp_x:.4g} ({r.mpp_source})" if r.mpp_x else ""
        near = f"{r.nearest_level} ({r.nearest_level_mpp:.3g})" if r.nearest_level is not None else ""
        colour = "red" if r.would_fail else "yellow" if r.flags else "green"
        table.add_row(
            Path(r.slide).name, r.vendor, size, r.downsamples, mpp,
            f"{r.objective_power:g}x" if r.objective_power else "", near,
            "" if r.tissue_patches is None else str(r.tissue_patches),
            "" if r.est_seconds is None else f"{r.est_seconds / 60:.1f}",
            f"[{colour}]{'; '.join(r.flags) or 'ok'}[/]",
        )  # fmt: skip
    Console(width=200).print(table)
    fails = sum(r.would_fail for r in rows)
    typer.echo(f"{len(rows)} slide(s), {fails} would fail, {sum(bool(r.flags) for r in rows)} flagged")
