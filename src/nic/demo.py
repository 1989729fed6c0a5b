"""``nic demo``: the whole pipeline on a generated cohort, in a few minutes on 2 cores.

Stages: generate a cohort of slides with known labels; inspect one slide (info, tissue);
lay the patch grids; generate labelled patch datasets and train a small supervised
multitask encoder on them; compress every slide with that encoder and draw one
compressed slide; train and cross-validate slide-level models for the three label kinds
(regression, binary, survival); draw where each run's evidence lies (heatmaps) and write
one HTML report per run.  Each stage writes under ``out`` and reports what it made through
``say`` (one line per result).

Every setting is checked before the first stage, the cohort's patients against the folds
included (the cohort is planned, cheaply, first).  The demo is built in ``out`` itself,
not in a staged folder: its stores record their slides' paths, its reports their runs'.
Until it is finished ``out`` holds a ``.nic-partial`` file naming the process; a demo that
fails removes what it wrote, and a folder left by one that was killed is removed by the
next ``run_demo`` into it, so no half-made demo looks like a result or blocks a rerun.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nic.errors import DataError, OptionError, check_int

__all__ = ["DemoConfig", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo: slides, their side in level-0 pixels at 0.5 um/px, and the seed.

    ``encoder_method`` ``multitask`` trains the supervised encoder on generated patch
    datasets; ``vae``, ``contrastive`` or ``bigan`` train that unsupervised encoder on
    ``unsupervised_patches`` patches (pairs) sampled from the cohort's slides instead.
    """

    slides: int = 36
    size: int = 4096
    seed: int = 0
    patches_per_class: int = 120
    encoder_epochs: int = 2
    encoder_method: str = "multitask"
    unsupervised_patches: int = 1500
    slide_epochs: int = 25
    folds: int = 3
    workers: int = 2

    def __post_init__(self) -> None:
        check_int("slides", self.slides, 1)
        check_int("seed", self.seed, 0)
        check_int("patches_per_class", self.patches_per_class, 1)
        check_int("encoder_epochs", self.encoder_epochs, 1)
        check_int("unsupervised_patches", self.unsupervised_patches, 16)
        check_int("slide_epochs", self.slide_epochs, 1)
        check_int("folds", self.folds, 2)
        check_int("workers", self.workers, 1)


#: patients per cross-validation fold the demo needs: with fewer, folds train on two or
#: three patients and a survival model can rank nobody (its report then fails)
PATIENTS_PER_FOLD = 3


def _cohort_fits(config: DemoConfig, slides: int) -> tuple[int, bool]:
    """(patients, whether the cohort of ``slides`` slides suits every learning stage)."""
    from nic.synth import plan_cohort

    rows = {sp.patient_id: sp.row for sp in plan_cohort(slides, config.size, config.seed)}
    patterns = {r["growth_pattern"] for r in rows.values()}
    events = sum(r["survival_event"] for r in rows.values())
    return len(rows), len(rows) >= PATIENTS_PER_FOLD * config.folds and len(patterns) == 2 and events >= 2


def check_demo(config: DemoConfig) -> None:
    """Every setting of ``config``, before any work: the encoder method, the slide size, and
    whether the cohort's patients can fill the folds of every learning stage (a regression,
    a binary label with both classes, survival with deaths).  An :class:`OptionError` names
    the fewest ``slides`` that would do."""
    from nic.encoder_training import METHODS
    from nic.errors import check_choice

    check_choice("encoder_method", config.encoder_method, ("multitask", *METHODS))
    patients, fits = _cohort_fits(config, config.slides)  # checks `size` too
    if fits:
        return
    enough = next((n for n in range(config.slides + 1, config.slides + 200) if _cohort_fits(config, n)[1]), None)
    advice = f"use `slides` of at least {enough}" if enough else "use more `slides`, or another `seed`"
    raise OptionError(
        f"`slides` {config.slides}: a cohort of {patients} patients; the demo's {config.folds}-fold "
        f"cross-validation needs at least {PATIENTS_PER_FOLD * config.folds} ({PATIENTS_PER_FOLD} per fold), both "
        f"growth patterns and 2 deaths: {advice}"
    )


def run_demo(out: Path, config: DemoConfig = DemoConfig(), say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into ``out`` (which must be empty or absent); return a summary.

    Settings are checked first (:func:`check_demo`); if a stage fails, what the demo wrote
    is removed, so ``out`` is as it was and the demo can be run again into it."""
    from nic._outputs import PARTIAL_MARK, check_new_folder, left_by_dead_process, mark_partial

    out = Path(out)
    check_demo(config)
    if out.is_dir() and left_by_dead_process(out):  # a demo whose process ended before finishing it
        logger.warning("%s: removing the unfinished demo a process that ended left there", out)
        shutil.rmtree(out)
    check_new_folder(out, None, what="files")  # the demo never overwrites anything
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    mark_partial(out)
    try:
        summary = _run_stages(out, config, say)
    except BaseException:
        _remove(out, created)
        say(f"the unfinished demo was removed: {out}")
        raise
    (out / PARTIAL_MARK).unlink()
    say(f"summary: {out / 'summary.json'}")
    return summary


def _remove(out: Path, created: bool) -> None:
    """Remove what the demo wrote: ``out`` itself when the demo made it, else its contents."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _run_stages(out: Path, config: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    summary: dict[str, Any] = {"out": str(out), "stages": {}}

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        say(f"[{name}]")
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        summary["stages"][name] = result
        say(f"  done in {result['seconds']} s")
        return result

    cohort = stage("cohort", lambda: _cohort(out, config, say))
    stage("inspect", lambda: _inspect(out, Path(cohort["slides"][0]), say))
    stage("grid", lambda: _grids([Path(p) for p in cohort["slides"]], say))
    enc = stage("encoder", lambda: _encoder(out, config, say, cohort["slides"]))
    stage("compress", lambda: _compress(out, cohort["slides"], enc["encoder"], config, say))
    stage("learn", lambda: _learn(out, Path(cohort["labels"]), config, say))
    stage("explain", lambda: _explain(out, say))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cohort(out: Path, config: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from nic.synth import make_cohort

    cohort = make_cohort(
        out / "cohort", n_slides=config.slides, size=config.size, seed=config.seed, workers=config.workers
    )
    patients = len({r["patient"] for r in cohort.rows})
    say(
        f"  {len(cohort.slides)} slides of {config.size} px at 0.5 um/px from {patients} patients: "
        f"{out / 'cohort' / 'slides'}"
    )
    say(f"  labels (proliferation, growth_pattern, survival): {cohort.labels}")
    return {"slides": [str(p) for p in cohort.slides], "labels": str(cohort.labels), "patients": patients}


def _inspect(out: Path, path: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from nic.explain import save_png, tissue_overlay
    from nic.slide import open_slide
    from nic.tissue import tissue_mask

    with open_slide(path) as s:
        info = s.info()
        tm = tissue_mask(s)
        overlay = save_png(out / "tissue_overlay.png", tissue_overlay(s.thumbnail(tm.mpp), tm.mask))
    say(
        f"  {path.name}: {info['width']} x {info['height']} px, {len(info['levels'])} levels, "
        f"{info['mpp_x']} um/px ({info['mpp_source']}), reader {info['backend']}"
    )
    say(f"  tissue {100 * tm.fraction:.0f}% of the slide; overlay: {overlay}")
    return {"info": info, "tissue_fraction": tm.fraction, "overlay": str(overlay)}


def _grids(paths: list[Path], say: Callable[[str], None]) -> dict[str, Any]:
    from nic.grid import patch_grid
    from nic.slide import open_slide

    cells = []
    for p in paths:
        with open_slide(p) as s:
            g = patch_grid(s, mpp=0.5, patch=128)
        cells.append(g.n_tissue)
    say(
        f"  grids of {g.shape[0]} x {g.shape[1]} cells (128 px at 0.5 um/px); tissue cells per slide "
        f"{min(cells)}-{max(cells)}, {sum(cells)} in all"
    )
    return {"grid_shape": list(g.shape), "tissue_cells": cells}


def _encoder(out: Path, config: DemoConfig, say: Callable[[str], None], slides: list[str]) -> dict[str, Any]:
    from nic.encoder_training import EncoderTrainConfig, parse_task_spec, train_encoder
    from nic.synth import make_patch_datasets

    if config.encoder_method != "multitask":
        from nic.encoder_training import UnsupervisedConfig, train_unsupervised

        ucfg = UnsupervisedConfig(
            method=config.encoder_method,
            slides=tuple(slides),
            patches=config.unsupervised_patches,
            val_patches=min(256, max(16, config.unsupervised_patches // 8)),
            epochs=config.encoder_epochs,
            seed=config.seed,
            progress=False,
        )
        result = train_unsupervised(ucfg, out / "encoder_run")
        say(f"  {config.encoder_method} nic-cnn on {len(slides)} slides, {result.epochs} epochs")
        say(f"  preview: {out / 'encoder_run' / 'preview.png'}; encoder: {result.encoder_path}")
        return {"encoder": str(result.encoder_path), "metrics": result.metrics}

    ds = make_patch_datasets(out / "patches", n=config.patches_per_class, seed=config.seed)
    say(f"  patch datasets (tissue type, nuclei density, mitosis): {ds.out}")
    tasks = (
        parse_task_spec(f"tissue=class:{ds.tissue_type}"),
        parse_task_spec(f"nuclei=regr:{ds.nuclei_density}"),
        parse_task_spec(f"mitosis=class:{ds.mitosis}"),
    )
    cfg = EncoderTrainConfig(
        tasks=tasks, encoder="nic-cnn", epochs=config.encoder_epochs, seed=config.seed, progress=False
    )
    result = train_encoder(cfg, out / "encoder_run")
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("val"))
    say(f"  multitask nic-cnn, {result.epochs} epochs at {result.patches_per_s:.0f} patches/s; {shown}")
    say(f"  encoder (without heads): {result.encoder_path}")
    return {"encoder": str(result.encoder_path), "metrics": result.metrics}


def _compress(
    out: Path, slides: list[str], encoder: str, config: DemoConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    from nic.compress import CompressOptions, compress_slides
    from nic.explain import save_png, store_picture

    results = compress_slides(slides, encoder, out / "compressed", CompressOptions(workers=config.workers))
    failed = [r for r in results if r.status != "done"]
    if failed:
        raise DataError(f"{failed[0].slide}: compression failed ({failed[0].error})")
    patches = sum(r.patches for r in results)
    seconds = sum(r.seconds for r in results)
    say(
        f"  {len(results)} slides, {patches} tissue patches at {patches / max(seconds, 1e-9):.0f} patches/s: "
        f"{out / 'compressed'}"
    )
    pic = save_png(out / "compressed_slide.png", store_picture(results[0].store))
    say(f"  codes of {results[0].store.name} as colour beside the slide: {pic}")
    return {"stores": [str(r.store) for r in results], "patches": patches}


def _learn(out: Path, labels: Path, config: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from nic.learn import CVConfig, FitConfig, LabelSpec, train_cv

    jobs = {
        "proliferation": LabelSpec(labels, "regression", target="proliferation"),
        "growth_pattern": LabelSpec(labels, "binary", target="growth_pattern"),
        "survival": LabelSpec(labels, "survival", time="survival_time", event="survival_event"),
    }
    # one start of nic-cnn's cell-ratio stage (`nic train` makes 3): a demo, kept to minutes
    fit = FitConfig(epochs=config.slide_epochs, seed=config.seed, ratio_starts=1)
    results: dict[str, Any] = {}
    for name, spec in jobs.items():
        run = out / "runs" / name
        res = train_cv(CVConfig(out / "compressed", spec, fit, folds=config.folds, out=run, n_bootstrap=200))
        shown = []
        for metric, v in res.metrics.items():
            if v.get("value") is None:
                continue
            lo, hi = v.get("ci95") or (float("nan"), float("nan"))
            shown.append(f"{metric} {v['value']:.2f} [{lo:.2f}, {hi:.2f}]")
        say(f"  {name} ({spec.task}, nic-cnn, {config.folds}-fold CV, out of fold): {'; '.join(shown)}")
        say(f"    {run / 'metrics.json'}, {run / 'predictions.csv'}")
        results[name] = res.metrics
    return results


def _explain(out: Path, say: Callable[[str], None], n_slides: int = 2) -> dict[str, Any]:
    from nic.explain import write_heatmaps, write_report
    from nic.learn import load_run
    from nic.learn.data import open_sources
    from nic.store import list_stores

    sources = open_sources(list_stores(out / "compressed")[:n_slides])
    made: dict[str, Any] = {}
    for name in ("proliferation", "growth_pattern", "survival"):
        run_dir = out / "runs" / name
        records = write_heatmaps(load_run(run_dir), sources, out / "heatmaps" / name)
        report = write_report(run_dir, out / "reports" / f"{name}.html")
        say(f"  {name}: heatmaps ({records[0]['method']}) {out / 'heatmaps' / name}; report {report}")
        made[name] = {"heatmaps": records, "report": str(report)}
    return made
