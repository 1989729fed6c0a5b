"""``nic info`` and ``nic tissue``: look at a slide before compressing it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from nic.cli._common import MppOption


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("tissue")(tissue)


def info(
    slide: Path = typer.Argument(..., help="Slide file (SVS, NDPI, MRXS, DICOM, TIFF, PNG, ...)."),
    mpp: float | None = MppOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print a slide's size, levels, um/px (and where it came from), vendor and reader."""
    from nic.slide import open_slide

    with open_slide(slide, mpp=mpp) as s:
        data = s.info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{data['path']}[/bold]")
    console.print(
        f"vendor {data['vendor']}, {data['width']} x {data['height']} px, "
        f"{data['mpp_x']:.4g} x {data['mpp_y']:.4g} um/px ({data['mpp_source']}), reader {data['backend']}"
    )
    table = Table("level", "width", "height", "downsample", "um/px")
    for i, lv in enumerate(data["levels"]):
        table.add_row(
            str(i),
            str(lv["width"]),
            str(lv["height"]),
            f"{lv['downsample']:g}",
            f"{data['mpp_x'] * lv['downsample']:.4g}",
        )
    console.print(table)


def tissue(
    slide: Path = typer.Argument(..., help="Slide file."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Mask PNG to write; the overlay goes beside it as <name>_overlay.png."
    ),
    mpp: float | None = MppOption,
    mask_mpp: float = typer.Option(8.0, "--mask-mpp", help="um/px of the mask (coarser is faster)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing mask and overlay."),
) -> None:
    """Detect tissue; write the mask and an overlay on the thumbnail to look at."""
    from nic._outputs import check_new_file
    from nic.errors import check_number
    from nic.explain import save_png, tissue_overlay
    from nic.slide import open_slide
    from nic.tissue import tissue_mask

    check_number("mask_mpp", mask_mpp, 0, float("inf"), low_open=True, high_open=True)
    overlay_path = out.with_name(out.stem + "_overlay.png")
    for path in (out, overlay_path):  # both refused before the slide is read
        check_new_file(path, overwrite)
    with open_slide(slide, mpp=mpp) as s:
        tm = tissue_mask(s, mpp=mask_mpp)
        thumb = s.thumbnail(tm.mpp)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, (tm.mask * 255).astype("uint8"))
    save_png(overlay_path, tissue_overlay(thumb, tm.mask))
    typer.echo(
        f"{slide}: {100 * tm.fraction:.1f}% tissue at {tm.mpp:g} um/px (saturation threshold {tm.threshold:.3f})\n"
        f"mask: {out}\noverlay: {overlay_path}"
    )
