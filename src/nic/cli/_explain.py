"""``nic heatmap`` and ``nic report``: where a trained run's evidence lies (thin over :mod:`nic.explain`)."""

from __future__ import annotations

from pathlib import Path

import typer

from nic.cli._names import NamesCommand


def heatmap(
    model: Path = typer.Option(..., "--model", help="Run folder written by `nic train`."),
    compressed: Path = typer.Option(..., "--compressed", help="Folder of compressed slides (<slide_id>.zarr)."),
    out: Path = typer.Option(..., "--out", help="Folder for <slide>.png, <slide>.heatmap.tiff, <slide>.geojson."),
    slides: list[str] = typer.Option([], "--slide", help="Slide ids to map (repeat the option); default: every store."),
    method: str = typer.Option("auto", "--method", help="Evidence map: {names:nic.explain._heatmap:METHODS}."),
    output: str | None = typer.Option(None, "--output", help="Output to explain, e.g. prob_<class> (multiclass)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace maps already in OUT, or a folder of another run's maps."
    ),
) -> None:
    """Heatmaps of a run's evidence on each slide: PNG over the thumbnail, pyramidal TIFF, QuPath GeoJSON.

    Maps of more slides of the same run (same --method and --output) may be added to OUT;
    maps already there, or of another run, are refused unless --overwrite."""
    from nic._outputs import check_writable
    from nic.errors import DataError
    from nic.explain import write_heatmaps
    from nic.learn import load_run
    from nic.learn.data import open_sources
    from nic.learn.run import check_run_encoder
    from nic.store import list_stores, store_path

    run = load_run(model)
    check_writable(out, folder=True)
    paths = [store_path(compressed, s) for s in slides] if slides else list_stores(compressed)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"no store for {', '.join(missing[:5])}; give slide ids of stores in {compressed}")
    if not paths:
        raise DataError(f"{compressed}: no compressed slides (*.zarr) found")
    sources = open_sources(paths, folder=compressed)
    check_run_encoder(run, sources, compressed)
    records = write_heatmaps(run, sources, out, method, output, overwrite)
    for r in records:
        typer.echo(f"{r['slide']}: {r['png']}, {r['tiff']}, {r['geojson']}")


def report(
    run: Path = typer.Argument(..., help="Run folder written by `nic train`."),
    out: Path = typer.Option(..., "--out", help="HTML file to write (self-contained: open it in any browser)."),
    gallery: int = typer.Option(3, "--gallery", min=0, help="Heatmaps of this many most and least confident patients."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report."),
) -> None:
    """One HTML page: metrics with CIs, curves, calibration, survival analysis, uncertainty, heatmaps, config."""
    from nic._outputs import check_new_file
    from nic.explain import write_report

    check_new_file(out, overwrite)  # before the work, not after it
    write_report(run, out, gallery)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``heatmap`` and ``report`` to ``app``."""
    app.command("heatmap", cls=NamesCommand)(heatmap)
    app.command("report")(report)
