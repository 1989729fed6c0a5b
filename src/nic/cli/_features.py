"""``nic import-features`` and ``nic export-features``: feature bags of TRIDENT, CLAM and
STAMP to and from nic stores (thin over :mod:`nic.bags`)."""

from __future__ import annotations

from pathlib import Path

import typer

from nic.cli._names import NamesCommand

FORMAT_HELP = "Layout of the feature files: {names:nic.bags._formats:FORMATS}."


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("import-features", cls=NamesCommand)(import_features)
    app.command("export-features", cls=NamesCommand)(export_features)


def import_features(
    folder: Path = typer.Argument(
        ..., help="Folder of feature files (TRIDENT features_<encoder>/, CLAM's features dir, STAMP's output)."
    ),
    fmt: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the stores (<out>/<slide_id>.zarr)."),
    slides: list[Path] | None = typer.Option(
        None,
        "--slides",
        help="The slides (files, folders or CSVs), matched by name: records their size, um/px and checksum. "
        "Repeatable.",
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Level-0 um/px of the slides when --slides is not given (or overrides theirs)."
    ),
    patch_size: int | None = typer.Option(
        None, "--patch-size", min=1, help="Patch side in level-0 pixels, for files that do not record it (CLAM)."
    ),
    patches: Path | None = typer.Option(
        None, "--patches", help="CLAM's patching folder (patches/*.h5 with the coords attributes)."
    ),
    extractor: str = typer.Option("", "--extractor", help="Name of the feature extractor, where files omit it."),
    snap: bool = typer.Option(
        False, "--snap", help="Move overlapping or off-grid patches to the nearest cell instead of refusing."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace stores that already exist in --out."),
) -> None:
    """Place another tool's patch features on nic's grid: one store per slide, ready for nic train."""
    from nic.bags import import_bags

    results = import_bags(
        folder, fmt.lower(), out, slides=list(slides or []), mpp=mpp, patch_size=patch_size, patches_dir=patches,
        extractor=extractor, snap=snap, overwrite=overwrite,
    )  # fmt: skip
    for r in results:
        extra = (
            f", {r.dropped} dropped by --snap (moved up to {r.max_shift:.0f} px)" if r.dropped or r.max_shift else ""
        )
        typer.echo(f"{r.source.name}: {r.patches} patches on a {r.grid_shape[0]} x {r.grid_shape[1]} grid{extra}")
    typer.echo(f"wrote {len(results)} store(s) to {out}")


def export_features(
    compressed: Path = typer.Argument(..., help="Folder of compressed slides (<slide_id>.zarr)."),
    fmt: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the feature files to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that already holds files."),
) -> None:
    """Write nic's codes in TRIDENT, CLAM or STAMP layout, one file per slide (CLAM: h5, pt and patches)."""
    from nic.bags import export_stores

    files = export_stores(compressed, fmt.lower(), out, overwrite=overwrite)
    typer.echo(f"wrote {len(files)} file(s) to {out}")
