"""``nic compress`` (slides to compressed slides) and ``nic show`` (a picture of one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from nic._device import DEVICE_HELP
from nic.cli._common import MppOption, config_option, library_default

if TYPE_CHECKING:
    from nic.compress import CompressOptions, SlideResult

OPTIONS = "nic.compress._pipeline:CompressOptions"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("compress")(compress)
    app.command("show")(show)


def compress(
    slides: list[Path] = typer.Argument(
        ..., help="Slide files, folders of slides, or CSV files with a 'slide' or 'path' column."
    ),
    encoder: str = typer.Option(
        ...,
        "--encoder",
        "-e",
        help="Encoder: a registered name (nic encoders), timm:<name>, a Keras .h5 or a saved encoder.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the stores (<out>/<slide_id>.zarr)."),
    mpp: float | None = MppOption,
    workers: str = config_option(
        OPTIONS,
        "workers",
        "Reader processes: auto (one per 8 cores on a CPU, every core but one with a GPU) or a number "
        "(0: read in the encoding process).",
    ),
    batch_size: str = config_option(
        OPTIONS,
        "batch_size",
        "Patches per encoder batch: auto (64 on a CPU of up to 4 cores, about 16 megapixels on a GPU) or a number.",
    ),
    decode: str = config_option(
        OPTIONS,
        "decode",
        "Where JPEG tiles are decoded: auto (on a CUDA device when the slide allows it, else by the readers), "
        "readers, or device (also on a CPU).",
    ),
    device: str = config_option(OPTIONS, "device", f"torch device: {DEVICE_HELP}."),
    precision: str = config_option(
        OPTIONS,
        "precision",
        "Encoder arithmetic: auto (fp16 autocast on CUDA/MPS, fp32 on a CPU), fp32, fp16 or bf16.",
    ),
    dihedral: bool = config_option(
        OPTIONS, "dihedral", "Also store the 8 rotations/flips of every patch: (8, C, H, W)."
    ),
    overwrite: bool = config_option(OPTIONS, "overwrite", "Redo slides whose store is already complete."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help="Go on with the other slides when one fails."),
    min_tissue: float = config_option(OPTIONS, "min_tissue", "Share of a cell that must be tissue (0-1)."),
    random_init: bool = config_option(
        OPTIONS,
        "random_init",
        "Allow an encoder without weights: a deliberate random baseline (recorded in the stores).",
    ),
    seed: int = config_option(
        OPTIONS, "seed", "With --random-init: torch seed of the initialisation (recorded in the stores)."
    ),
    wait_busy: float = typer.Option(
        library_default(OPTIONS, "busy_wait"),
        "--wait-busy",
        min=0.0,
        help="Seconds to wait at the end for slides another process is compressing (0: check once).",
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars on stderr (default: when stderr is a terminal)."
    ),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Compress on Dask, one task per slide: local or local:N (N worker processes on this machine), a "
        "scheduler address (tcp://host:8786) or its scheduler file (.json). Needs the 'cluster' extra.",
    ),
    devices: str | None = typer.Option(
        None,
        "--devices",
        help="One Dask worker per device on this machine: 0,1 (cuda:0, cuda:1), or cpu,cpu; slides are shared "
        "among them. Implies --scheduler local.",
    ),
    torch_threads: int | None = typer.Option(
        None,
        "--torch-threads",
        min=1,
        help="With --scheduler/--devices: torch threads per worker (default: the worker's cores shared among "
        "the Dask threads of its machine).",
    ),
) -> None:
    """Compress slides into grids of codes, one zarr store per slide.

    Complete stores are skipped (unless --overwrite); unfinished ones (an interrupted
    run) are rebuilt.  The first failing slide stops the run (the rest are 'not run')
    unless --skip-errors; a full output disk stops it always.  A slide without tissue
    gets a complete, empty store and the status 'no tissue'.  Slides another process is
    compressing (busy) are checked again after the others, waiting up to --wait-busy
    seconds for that process: a slide it completed counts as skipped, one it left
    unfinished is compressed by this run, one still locked stays busy.  An encoder
    without weights (a registry name or timm:<model> without weights=) is refused unless
    --random-init.

    Exit codes: 0 every slide is done or skipped (complete); 1 some slide failed, was not
    run, had no tissue or is still busy (the others are complete, a rerun redoes only
    what is missing); 2 a bad option or input stopped the run before any slide.

    With --scheduler or --devices the slides are shared among the workers of a Dask
    cluster (the package's 'cluster' extra installs Dask): each worker loads the encoder
    once and runs the same single-slide job, with the same locks, skips, summary and exit
    codes; the slides, encoder files and --out must be at the same paths on every worker.
    A slide whose worker dies is run again on another worker.
    """
    from rich.console import Console

    from nic.cli._common import with_flags
    from nic.compress import CompressOptions, OutputFullError, collect_slides, compress_slides, summary_table
    from nic.errors import DataError

    options = CompressOptions(
        mpp=mpp, batch_size=_auto_or_int(batch_size), workers=_auto_or_int(workers), device=device,
        decode=decode, precision=precision, dihedral=dihedral, overwrite=overwrite, min_tissue=min_tissue,
        random_init=random_init, seed=seed, busy_wait=wait_busy,
    )  # fmt: skip
    files = collect_slides(slides)
    if not files:
        raise DataError(f"no slides found in {', '.join(map(str, slides))}; give slide files, a folder or a CSV")
    show_bars = sys.stderr.isatty() if progress is None else progress
    if scheduler is None and devices is None and torch_threads is None:
        results = compress_slides(files, encoder, out, options, skip_errors=skip_errors, progress=show_bars)
    else:
        results = _on_cluster(files, encoder, out, options, scheduler, devices, torch_threads, skip_errors, show_bars)
    for r in results:  # per-slide errors name parameters, as every library message does
        r.error = with_flags(r.error)
    Console(width=160).print(summary_table(results))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        typer.echo(f"error: {r.error}" if str(r.slide) in r.error else f"error: {r.slide}: {r.error}", err=True)
    busy = [r for r in results if r.status == "busy"]
    for r in busy:
        typer.echo(f"busy: {r.slide}: not compressed, {r.error}; run again once that process is done", err=True)
    if failed:
        not_run = sum(r.status == "not run" for r in results)
        full = any(isinstance(r.exception, OutputFullError) for r in failed)
        why = "free space in the output folder, then run again" if full else "use --skip-errors to go on past a failure"
        hint = f"; {not_run} slide(s) not run ({why})" if not_run else ""
        typer.echo(f"{len(failed)} of {len(results)} slide(s) failed{hint}", err=True)
    if busy:
        names = ", ".join(r.slide.name for r in busy)
        typer.echo(f"{len(busy)} of {len(results)} slide(s) busy (locked by another process): {names}", err=True)
    empty = [r for r in results if r.status == "no tissue"]
    if empty:
        names = ", ".join(r.slide.name for r in empty)
        typer.echo(
            f"{len(empty)} of {len(results)} slide(s) had no tissue: {names}; check the slide or lower --min-tissue "
            "(with --overwrite to redo their empty stores)",
            err=True,
        )
    if failed or busy or empty:
        raise typer.Exit(1)


def _auto_or_int(text: str) -> int | str:
    """An ``auto|N`` option's value: the number when it is one, else the text, which
    :class:`~nic.compress.CompressOptions` accepts ("auto") or refuses in one line."""
    try:
        return int(text)
    except ValueError:
        return text


def _on_cluster(
    files: list[Path],
    encoder: str,
    out: Path,
    options: CompressOptions,
    scheduler: str | None,
    devices: str | None,
    torch_threads: int | None,
    skip_errors: bool,
    progress: bool,
) -> list[SlideResult]:
    """``compress`` on a Dask cluster: the cluster options checked, then
    :func:`nic.compress.compress_on_cluster`."""
    from nic.compress import ClusterOptions, compress_on_cluster, parse_devices
    from nic.errors import OptionError

    if scheduler is None and devices is None:
        raise OptionError("`torch_threads` sets the threads of Dask workers; give it with `scheduler` or `devices`")
    parsed = parse_devices(devices) if devices is not None else ()
    if parsed and options.device != "auto":
        raise OptionError(
            f"`device` {options.device} and `devices` {devices} both given; `devices` places one worker per device, "
            "so give only `devices`"
        )
    cluster = ClusterOptions(scheduler=scheduler or "local", devices=parsed, torch_threads=torch_threads)
    return compress_on_cluster(files, encoder, out, options, cluster, skip_errors=skip_errors, progress=progress)


def show(
    store: Path = typer.Argument(..., help="A compressed slide (<out>/<slide_id>.zarr)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write."),
    max_side: int = typer.Option(1024, "--max-side", min=16, help="Longest side of the codes picture (pixels)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PNG."),
) -> None:
    """Picture a compressed slide: its first 3 principal components as RGB beside the thumbnail."""
    from nic._outputs import check_new_file
    from nic.explain import save_png, store_picture

    check_new_file(out, overwrite)  # before the work, not after it
    pic = store_picture(store, max_side=max_side)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, pic)
    typer.echo(f"{store} -> {out} ({pic.shape[1]} x {pic.shape[0]} px)")
