"""Fitting the folds of a cross-validated run: one after another, or in parallel worker
processes over several devices (``CVConfig.devices``).

In parallel, the folds run in spawned processes, one per device (fold ``k`` on
``devices[k % n]``, one fold per device at a time).  Each worker reopens the stores by path,
sets its torch threads and fits its fold with the same code and seeds as the sequential
loop (:func:`fit_fold`); the fold's weights (on the CPU), history and test views come back
and :mod:`nic.learn.run` assembles the run from them as it does sequentially.  On the CPU
with the same torch threads per fold the results equal a sequential run's.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nic._device import torch_device
from nic.learn.cv import inner_split
from nic.learn.data import Cohort, SlideSource, open_sources
from nic.learn.slide_model import SlideModel
from nic.learn.train import FitHistory, fit_model

if TYPE_CHECKING:
    from nic.learn.run import CVConfig

__all__ = ["fit_fold", "fit_folds_parallel"]

logger = logging.getLogger(__name__)


def fit_fold(
    config: CVConfig,
    cohort: Cohort,
    sources: list[SlideSource],
    crop: int,
    k: int,
    folds: list[tuple[np.ndarray, np.ndarray]],
    device: str | None = None,
) -> tuple[SlideModel, FitHistory, list[np.ndarray]]:
    """Fold ``k``: the model fitted on its training patients (inner split for early
    stopping), its history and the test views of its held-out slides.  ``device`` replaces
    ``config.fit.device`` (a parallel worker's device)."""
    cfg = config.fit
    train_p, test_p = folds[k]
    fit_p, val_p = inner_split(cohort, train_p, cfg.val_fraction, cfg.seed + k)
    fit_cfg = dataclasses.replace(cfg, crop=crop, device=device or cfg.device)
    model, hist = fit_model(cohort, sources, fit_p, val_p, fit_cfg, cfg.seed * 1000 + k)
    test_s = cohort.slides_of(test_p)
    views = model.predict_views([sources[i] for i in test_s], cfg.tta_crops, cfg.tta_variants, cfg.seed)
    return model, hist, views


@dataclass(frozen=True)
class _FoldJob:
    """What a worker process needs to fit one fold (everything pickles; stores go by path)."""

    config: CVConfig
    cohort: Cohort
    crop: int
    k: int
    folds: list[tuple[np.ndarray, np.ndarray]]
    device: str
    threads: int


#: the stores a worker process opened, by their paths: later folds in the same worker reuse
#: them (and the codes they cached in memory)
_WORKER_SOURCES: dict[tuple[str, ...], list[SlideSource]] = {}


def _run_fold_job(job: _FoldJob) -> tuple[int, dict[str, Any], dict[str, Any], FitHistory, list[np.ndarray]]:
    """In a worker process: fit one fold on ``job.device`` with ``job.threads`` torch threads.

    Returns ``(k, model meta, state dict on the CPU, history, test views)``.
    """
    import torch

    torch.set_num_threads(job.threads)
    dev = torch_device(job.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # kernels and caches on this fold's GPU only
    key = tuple(str(p) for p in job.cohort.store_paths)
    if key not in _WORKER_SOURCES:
        _WORKER_SOURCES.clear()
        _WORKER_SOURCES[key] = open_sources(job.cohort.store_paths, folder=job.config.compressed)
    model, hist, views = fit_fold(job.config, job.cohort, _WORKER_SOURCES[key], job.crop, job.k, job.folds, job.device)
    state = {name: t.detach().cpu() for name, t in model.net.state_dict().items()}
    return job.k, model.meta(), state, hist, views


def _model_from(meta: dict[str, Any], state: dict[str, Any]) -> SlideModel:
    """The :class:`SlideModel` a worker fitted, rebuilt from its meta and weights (on the CPU)."""
    model = SlideModel.from_meta(meta)
    model.net.load_state_dict(state)
    model.net.eval()
    return model


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the folds not started and end the worker processes still fitting one."""
    # the executor has no public way to end its workers before Python 3.14; shutdown forgets them
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(5)


def fit_folds_parallel(
    config: CVConfig,
    cohort: Cohort,
    crop: int,
    folds: list[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[SlideModel, FitHistory, list[np.ndarray]]]:
    """Every fold in a spawned worker process, one fold per device at a time (fold ``k`` on
    ``devices[k % n]``).  The first fold that fails stops the others and its error is raised
    here as it was raised in the worker."""
    import torch

    from nic._processes import WORKER_DIED_HINT, spawn_context

    assert config.devices
    devices = config.devices
    n = min(len(devices), len(folds))
    threads = config.threads or max(1, torch.get_num_threads() // n)
    jobs = [_FoldJob(config, cohort, crop, k, folds, devices[k % len(devices)], threads) for k in range(len(folds))]
    logger.info("fitting %d folds in %d worker processes on %s, %d torch threads each",
                len(folds), n, ", ".join(devices[:n]), threads)  # fmt: skip
    out: dict[int, tuple[SlideModel, FitHistory, list[np.ndarray]]] = {}
    pool = ProcessPoolExecutor(max_workers=n, mp_context=spawn_context())
    try:
        # one fold per device at a time: fold k + n starts on fold k's device when k is done
        running: dict[Future[Any], int] = {pool.submit(_run_fold_job, jobs[k]): k for k in range(n)}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                k = running.pop(fut)
                try:
                    _, meta, state, hist, views = fut.result()  # a worker's error is raised here
                except BrokenProcessPool as e:
                    raise RuntimeError(f"the worker fitting fold {k} ended abruptly: {WORKER_DIED_HINT}") from e
                out[k] = (_model_from(meta, state), hist, views)
                if k + n < len(jobs):
                    running[pool.submit(_run_fold_job, jobs[k + n])] = k + n
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    return [out[k] for k in range(len(folds))]
