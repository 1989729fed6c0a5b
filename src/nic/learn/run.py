"""Cross-validated training runs and prediction with a saved run.

A run folder holds ``config.json`` (written first: it marks the folder as a run),
``metrics.json`` (written last: pooled out-of-fold value, 95% bootstrap CI by patient,
per-fold values, for each metric of the task), ``predictions.csv`` (out-of-fold, one row
per patient), ``folds.json`` (which patients were tested in which fold, and the training
histories) and ``fold_<k>/model.*``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic.errors import DataError
from nic.learn.cv import inner_split, patient_folds
from nic.learn.data import Cohort, LabelSpec, SlideSource, load_cohort, open_sources
from nic.learn.metrics import TASK_METRICS, bootstrap_ci, compute_metric
from nic.learn.train import FitConfig, FitHistory, SlideModel, _check_int, patient_mean, default_crop, fit_model

__all__ = ["TrainConfig", "CVResult", "train_cv", "predict_run"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """A cross-validated training run: data, model fit settings, folds and outputs."""

    compressed: Path
    labels: LabelSpec
    fit: FitConfig = field(default_factory=FitConfig)
    folds: int = 5
    out: Path | None = None  #: run folder; None keeps everything in memory
    overwrite: bool = False
    n_bootstrap: int = 1000
    threads: int | None = None  #: torch CPU threads during the run (restored after); None: leave as is

    def __post_init__(self) -> None:
        _check_int("--folds", self.folds, 2)
        if self.threads is not None:
            _check_int("--threads", self.threads, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compressed"] = str(self.compressed)
        d["out"] = None if self.out is None else str(self.out)
        d["labels"]["labels"] = str(self.labels.labels)
        return d


@dataclass
class CVResult:
    """Out-of-fold predictions (one row per patient), metrics, fold models and histories."""

    metrics: dict[str, dict[str, Any]]
    predictions: Any  # pandas.DataFrame
    models: list[SlideModel]
    histories: list[FitHistory]
    folds: list[tuple[np.ndarray, np.ndarray]]


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; --out must be a run folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: the run folder exists; pass --overwrite to replace it or choose another --out")
        if not (out / "config.json").is_file():
            raise DataError(f"{out}: not a nic run folder (no config.json); refusing to delete it, choose another --out")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the run folder ({e.strerror or e})") from e


def _finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, so metrics.json stays strict JSON (an undefined metric is null)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _prediction_frame(cohort: Cohort, pidx: np.ndarray, pred: np.ndarray, fold: np.ndarray | None):  # -> DataFrame
    import pandas as pd

    d: dict[str, Any] = {"patient": [cohort.patients[i] for i in pidx]}
    if fold is not None:
        d["fold"] = fold
    d["n_slides"] = [int((cohort.slide_patient == i).sum()) for i in pidx]
    task = cohort.task
    if task == "regression":
        d["target"], d["prediction"] = cohort.y[pidx], pred
    elif task == "survival":
        d["time"], d["event"], d["risk"] = cohort.time[pidx], cohort.y[pidx], pred  # type: ignore[index]
    else:
        assert cohort.classes is not None
        d["target"] = [cohort.classes[c] for c in cohort.y[pidx]]
        if task == "binary":
            d["probability"] = pred
        else:
            for k, c in enumerate(cohort.classes):
                d[f"prob_{c}"] = pred[:, k]
            d["prediction"] = [cohort.classes[c] for c in pred.argmax(1)]
    return pd.DataFrame(d)


def _metrics(cohort: Cohort, pidx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    t = cohort.time[pidx] if cohort.time is not None else None
    return {m: compute_metric(m, cohort.y[pidx], pred, t) for m in TASK_METRICS[cohort.task]}


def train_cv(config: TrainConfig) -> CVResult:
    """K-fold cross-validation by patient; writes the run folder when ``config.out`` is set.

    Each fold trains on K-1 parts (with an inner validation split for early stopping and lr
    decay) and predicts its held-out patients with test-time averaging; the out-of-fold
    predictions of all patients give the pooled metrics and their bootstrap CIs.
    """
    import torch

    from nic.learn.models import list_models

    config.labels.check()
    if config.fit.model not in list_models():
        raise DataError(f"unknown model {config.fit.model!r}; choose one of {', '.join(list_models())}")
    # check every input before touching the run folder: a typo must not delete a good run
    cohort = load_cohort(config.compressed, config.labels)
    sources = open_sources(cohort.store_paths)
    crop = default_crop(sources, config.fit.crop)
    folds = patient_folds(cohort, config.folds, config.fit.seed)
    if config.out is not None:
        out = Path(config.out)
        _prepare_out(out, config.overwrite)
        # config.json first (it marks the folder as a nic run, so --overwrite can clean a
        # crashed run); metrics.json last (an unfinished run never looks complete)
        (out / "config.json").write_text(json.dumps({**config.to_json(), "crop": crop, "classes": cohort.classes,
                                                      "code_size": sources[0].code_size}, indent=2))
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train_cv(config, cohort, sources, crop, folds)
    finally:
        torch.set_num_threads(before)


def _train_cv(config: TrainConfig, cohort: Cohort, sources: list[SlideSource], crop: int,
              folds: list[tuple[np.ndarray, np.ndarray]]) -> CVResult:
    cfg = config.fit
    n_p = len(cohort.patients)
    oof_raw = np.full((n_p, cohort.n_outputs), np.nan)
    fold_of = np.full(n_p, -1)
    models, hists = [], []
    per_fold: dict[str, list[float]] = {m: [] for m in TASK_METRICS[cohort.task]}
    for k, (train_p, test_p) in enumerate(folds):
        fit_p, val_p = inner_split(cohort, train_p, cfg.val_fraction, cfg.seed + k)
        fit_cfg = FitConfig(**{**asdict(cfg), "crop": crop})
        model, hist = fit_model(cohort, sources, fit_p, val_p, fit_cfg, cfg.seed * 1000 + k)
        test_s = cohort.slides_of(test_p)
        raw = model.predict_raw([sources[i] for i in test_s], cfg.tta_crops, cfg.tta_variants, cfg.seed)
        oof_raw[test_p] = patient_mean(raw, cohort.slide_patient[test_s], test_p)
        fold_of[test_p] = k
        for m, v in _metrics(cohort, test_p, model.to_prediction(oof_raw[test_p])).items():
            per_fold[m].append(v)
        models.append(model)
        hists.append(hist)
        logger.info("fold %d/%d: %d epochs in %.1f s; %s", k + 1, len(folds), len(hist.train_loss), hist.seconds,
                    ", ".join(f"{m}={v[-1]:.3f}" for m, v in per_fold.items()))
        if config.out is not None:
            model.save(Path(config.out) / f"fold_{k}")
    allp = np.arange(n_p)
    if cohort.task == "survival":
        # the Cox partial likelihood fixes no offset and each fold's model has its own
        # scale: z-score the out-of-fold log-risks within each fold before pooling them
        for k in range(len(folds)):
            sel = fold_of == k
            r = oof_raw[sel]
            oof_raw[sel] = (r - r.mean(axis=0)) / (r.std(axis=0) + 1e-12)
    pred = models[0].to_prediction(oof_raw)
    pooled = _metrics(cohort, allp, pred)
    t = cohort.time if cohort.time is not None else None
    metrics: dict[str, dict[str, Any]] = {}
    for m, v in pooled.items():
        lo, hi = bootstrap_ci(m, cohort.y, pred, t, config.n_bootstrap, seed=cfg.seed)
        metrics[m] = {"value": v, "ci95": [lo, hi], "folds": per_fold[m]}
    frame = _prediction_frame(cohort, allp, pred, fold_of)
    if config.out is not None:
        out = Path(config.out)
        frame.to_csv(out / "predictions.csv", index=False)
        (out / "folds.json").write_text(json.dumps(
            [{"fold": k, "test_patients": [cohort.patients[i] for i in te], "history": asdict(h)}
             for k, ((_, te), h) in enumerate(zip(folds, hists))], indent=2))
        (out / "metrics.json").write_text(json.dumps(_finite_or_none(metrics), indent=2))  # last: the run is complete
    return CVResult(metrics, frame, models, hists, folds)


def predict_run(run: str | Path, compressed: str | Path, labels: str | Path | None = None):  # -> DataFrame
    """Apply the fold models of a run (their mean raw output) to every store in ``compressed``.

    Returns one row per slide (``slide``, then the task's prediction columns); with
    ``labels`` (a CSV with the run's slide and patient columns) one row per patient, the
    mean of its slides' outputs.
    """
    import pandas as pd

    from nic.learn.data import _resolve_ids
    from nic.store import list_stores

    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{run}: not a nic run folder (no config.json); pass the --out folder of `nic train`")
    cfg = json.loads(cfg_path.read_text())
    fold_dirs = sorted(p for p in run.glob("fold_*") if (p / "model.json").is_file())
    if not fold_dirs or not (run / "metrics.json").is_file():
        raise DataError(f"{run}: no metrics.json or fold models (fold_*/model.json); the training run did not finish")
    models = [SlideModel.load(p) for p in fold_dirs]
    paths = list_stores(compressed)
    if not paths:
        raise DataError(f"{compressed}: no compressed slides (*.zarr) found")
    sources: list[SlideSource] = open_sources(paths)
    if sources[0].code_size != cfg["code_size"]:
        raise DataError(f"{compressed}: codes have size {sources[0].code_size}, the model was trained on {cfg['code_size']}; "
                        "compress with the training run's encoder")
    fit = cfg["fit"]
    raw = np.mean([m.predict_raw(sources, fit["tta_crops"], fit["tta_variants"], fit["seed"]) for m in models], axis=0)
    ids = [p.name[: -len(".zarr")] for p in paths]
    keys, rows = ids, raw
    key_name = "slide"
    if labels is not None:
        lab = Path(labels)
        sc, pc = cfg["labels"]["slide_column"], cfg["labels"]["patient_column"]
        try:
            df = pd.read_csv(lab, dtype=str)
        except (OSError, ValueError) as e:
            raise DataError(f"{lab}: not a readable CSV ({e})") from e
        for c in (sc, pc):
            if c not in df.columns:
                raise DataError(f"{lab}: missing column {c!r}; found {', '.join(df.columns)}")
        pat_of = dict(zip(_resolve_ids(df[sc].tolist(), set(ids)), df[pc]))
        missing = [s for s in ids if s not in pat_of]
        if missing:
            raise DataError(f"{len(missing)} store(s) in {compressed} have no row in {lab}: {', '.join(missing[:10])}")
        sp = np.array([pat_of[s] for s in ids])
        keys = sorted(set(sp))
        rows = np.stack([raw[sp == p].mean(0) for p in keys])
        key_name = "patient"
    pred = models[0].to_prediction(rows)
    d: dict[str, Any] = {key_name: keys}
    task = models[0].task
    if task == "regression":
        d["prediction"] = pred
    elif task == "survival":
        d["risk"] = pred
    elif task == "binary":
        d["probability"] = pred
    else:
        classes = models[0].classes or []
        for k, c in enumerate(classes):
            d[f"prob_{c}"] = pred[:, k]
        d["prediction"] = [classes[i] for i in pred.argmax(1)]
    return pd.DataFrame(d)
