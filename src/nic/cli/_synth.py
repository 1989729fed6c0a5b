"""``nic synth``: generated cohorts, patch datasets and mosaic cohorts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from nic.cli._common import config_option

COHORT = "nic.synth._cohort:CohortConfig"

synth_app = typer.Typer(
    name="synth",
    help="Generate synthetic slides, cohorts and patch datasets (demos, tests, benchmarks).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``synth`` group to ``app``."""
    app.add_typer(synth_app, name="synth")


def _progress(label: str) -> Callable[[int, int], None]:
    """A progress callback that prints ``label done/total`` on stderr."""

    def report(done: int, total: int) -> None:
        typer.echo(f"{label} {done}/{total}", err=True)

    return report


@synth_app.command("cohort")
def cohort(
    out: Path = typer.Argument(..., help="Output folder: slides/, truth/, labels.csv, cohort.json."),
    slides: int = typer.Option(10, "--slides", "-n", help="Number of slides."),
    size: int = typer.Option(8192, "--size", help="Level-0 side of each slide in px at 0.5 um/px (rounded up to 256)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    workers: int = typer.Option(1, "--workers", help="Processes writing slides in parallel."),
    quality: int = config_option(COHORT, "quality", "JPEG quality of the tiles (1-100)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the cohort in OUT (the old one stays until the new one is whole)."
    ),
) -> None:
    """Write procedural H&E-like slides with patient labels (proliferation, growth pattern, survival)."""
    from nic.synth import CohortConfig, make_cohort

    c = make_cohort(
        out,
        slides,
        size,
        seed,
        config=CohortConfig(quality=quality),
        workers=workers,
        overwrite=overwrite,
        progress=_progress("slide"),
    )
    n_patients = len({r["patient"] for r in c.rows})
    typer.echo(
        f"{len(c.slides)} slides of {c.rows[0]['width']} x {c.rows[0]['height']} px at 0.5 um/px "
        f"({n_patients} patients) in {c.out / 'slides'} ({c.seconds:.1f} s)\nlabels: {c.labels}"
    )


@synth_app.command("patches")
def patches(
    out: Path = typer.Argument(..., help="Output folder: tissue_type/, nuclei_density(.csv), mitosis(.csv)."),
    n: int = typer.Option(200, "--n", help="Patches per tissue class, and per regression/mitosis dataset."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the datasets in OUT (the old ones stay until the new ones are whole)."
    ),
) -> None:
    """Write labelled 128-px patch datasets at 0.5 um/px: tissue type, nuclei density, mitosis."""
    from nic.synth import make_patch_datasets

    d = make_patch_datasets(out, n=n, seed=seed, overwrite=overwrite)
    typer.echo(
        f"tissue type: {d.tissue_type}/<class>/*.png\nnuclei density: {d.nuclei_density}\n"
        f"mitosis: {d.mitosis}\n{sum(d.counts.values())} patches in {d.seconds:.1f} s"
    )


@synth_app.command("mosaic")
def mosaic(
    out: Path = typer.Argument(..., help="Output folder: slides/, truth/, labels.csv, cohort.json."),
    tiles: Path = typer.Option(..., "--tiles", help="Folder of real labelled tiles."),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV with path,label columns (paths relative to --tiles); default TILES/labels.csv."
    ),
    slides: int = typer.Option(10, "--slides", "-n", help="Number of slides."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    size: int = typer.Option(8192, "--size", help="Level-0 side of each slide in px (tiles are placed at 256 px)."),
    tumour: list[str] = typer.Option(
        ["lung_aca", "lung_scc"], "--tumour", help="Labels of tumour tiles (repeat the option)."
    ),
    normal: list[str] = typer.Option(["lung_n"], "--normal", help="Labels of normal tiles (repeat the option)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the cohort in OUT (the old one stays until the new one is whole)."
    ),
) -> None:
    """Tile slides from real labelled tiles; label 'clustered' = tumour tiles in one nodule vs scattered."""
    from nic.synth import MosaicConfig, make_mosaic_cohort

    cfg = MosaicConfig(tumour=tuple(tumour), normal=tuple(normal))
    c = make_mosaic_cohort(
        out, tiles, labels, slides, seed, size, config=cfg, overwrite=overwrite, progress=_progress("slide")
    )
    typer.echo(f"{len(c.slides)} mosaic slides in {c.out / 'slides'} ({c.seconds:.1f} s)\nlabels: {c.labels}")
