"""``nic demo``: the whole pipeline on a generated cohort."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out: Path = typer.Option(Path("nic-demo"), "--out", "-o", help="Folder for every output (must be new or empty)."),
    slides: int = typer.Option(
        36, "--slides", help="Slides in the generated cohort (enough for 3 patients in each of the 3 folds)."
    ),
    size: int = typer.Option(4096, "--size", help="Side of each slide in level-0 pixels (0.5 um/px)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort and of every training run."),
    encoder_method: str = typer.Option(
        "multitask",
        "--encoder-method",
        help="multitask (on generated patch datasets) | vae | contrastive | bigan (on the cohort's slides, no labels).",
    ),
) -> None:
    """Generate a cohort and run every stage of the pipeline on it, printing where outputs go.

    Every setting is checked before the first stage; a demo that fails removes what it wrote."""
    from nic.demo import DemoConfig, run_demo

    run_demo(out, DemoConfig(slides=slides, size=size, seed=seed, encoder_method=encoder_method), say=typer.echo)
