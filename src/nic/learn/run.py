"""Cross-validated training runs and prediction with a saved run.

A run folder holds ``config.json`` (the settings, the number of folds and the identity of
the encoder whose stores it was trained on), ``metrics.json`` (pooled out-of-fold value,
95% bootstrap CI by patient, per-fold values, for each metric of the task),
``predictions.csv`` (out-of-fold, one row per patient), ``folds.json`` (which patients
were tested in which fold, and the training histories) and ``fold_<k>/model.*``.

The folder is built beside its destination and moved into place when the run is whole
(:func:`nic._outputs.staged_folder`): an interrupted run leaves no folder that looks like
a result, and ``overwrite`` keeps the old run until the new one is complete.

With ``CVConfig.devices`` the folds run in parallel worker processes
(:mod:`nic.learn.folds`); the run is assembled from them exactly as sequentially.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic._device import check_devices, parse_devices, torch_device
from nic._outputs import staged_folder
from nic.errors import DataError, OptionError, check_int
from nic.learn.cv import patient_folds
from nic.learn.data import Cohort, LabelSpec, SlideSource, load_cohort, open_sources
from nic.learn.folds import fit_fold, fit_folds_parallel
from nic.learn.metrics import TASK_METRICS, bootstrap_ci, compute_metric
from nic.learn.slide_model import SlideModel, patient_mean
from nic.learn.targets import TargetScale
from nic.learn.train import FitConfig, FitHistory, default_crop
from nic.store import EncoderIdentity

__all__ = ["CVConfig", "CVResult", "Run", "train_cv", "load_run", "predict_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CVConfig:
    """A cross-validated training run: data, model fit settings, folds and outputs.

    Constructing one checks its values and nothing else (no files, no devices); a changed
    copy is ``dataclasses.replace(config, ...)``.
    """

    compressed: Path
    labels: LabelSpec
    fit: FitConfig = field(default_factory=FitConfig)
    folds: int = 5
    out: Path | None = None  #: run folder; None keeps everything in memory
    overwrite: bool = False
    n_bootstrap: int = 1000
    threads: int | None = None  #: torch CPU threads during the run (restored after); None: leave as is
    #: fit the folds in parallel worker processes, fold k on ``devices[k % n]`` (e.g. ``("cuda:0", "cuda:1")``,
    #: ``("cpu", "cpu")``; ``"0,1"`` is read as CUDA indices); None: one fold after another on ``fit.device``
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_int("folds", self.folds, 2)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.devices is not None:
            object.__setattr__(self, "devices", parse_devices(self.devices))

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


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, so metrics.json stays strict JSON (an undefined metric is null)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _prediction_frame(cohort: Cohort, pidx: np.ndarray, pred: np.ndarray, fold: np.ndarray | None,
                      spread: np.ndarray | None = None):  # fmt: skip  # -> DataFrame
    """One row per patient; ``spread``: the standard deviation of the prediction over the
    test views (crops x dihedral variants) of the patient's slides."""
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
    if spread is not None:
        d["spread"] = spread
    return pd.DataFrame(d)


def _views_of_patients(views: list[np.ndarray], slide_patient: np.ndarray, patients: np.ndarray) -> list[np.ndarray]:
    """Per patient (in ``patients`` order) the views (V, n_out) of all its slides, stacked."""
    return [np.concatenate([v for v, sp in zip(views, slide_patient) if sp == p]) for p in patients]


def _per_fold_prediction(models: list[SlideModel], raw: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Raw outputs (P, n_out) -> predictions, row ``i`` by the model of fold ``fold_of[i]``."""
    pred: np.ndarray | None = None
    for k, model in enumerate(models):
        sel = fold_of == k
        v = model.to_prediction(raw[sel])
        if pred is None:
            pred = np.full((len(raw), *v.shape[1:]), np.nan)
        pred[sel] = v
    assert pred is not None
    return pred


def _metrics(cohort: Cohort, pidx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    t = cohort.time[pidx] if cohort.time is not None else None
    return {m: compute_metric(m, cohort.y[pidx], pred, t) for m in TASK_METRICS[cohort.task]}


def train_cv(config: CVConfig) -> CVResult:
    """K-fold cross-validation by patient; writes the run folder when ``config.out`` is set.

    Each fold trains on K-1 parts (with an inner validation split for early stopping and lr
    decay) and predicts its held-out patients with test-time averaging; the out-of-fold
    predictions of all patients give the pooled metrics and their bootstrap CIs.
    """
    import torch

    from nic.learn.models import list_models

    config.labels.check()
    if config.fit.model not in list_models():
        known = ", ".join(list_models())
        raise OptionError(f"`model` {config.fit.model!r} is not a slide model; choose one of {known}")
    # check every input before touching the run folder: a typo must not delete a good run
    if config.devices:
        check_devices(config.devices)  # a bad or unavailable device fails before any work
    else:
        torch_device(config.fit.device)
    cohort = load_cohort(config.compressed, config.labels)
    sources = open_sources(cohort.store_paths, folder=config.compressed)
    crop = default_crop(sources, config.fit.crop)
    folds = patient_folds(cohort, config.folds, config.fit.seed)
    run_info = {"crop": crop, "classes": cohort.classes, "code_size": sources[0].code_size,
                "encoder": sources[0].encoder.to_json()}  # fmt: skip
    if cohort.task == "regression":  # the kind "auto" chose and the log offset, the same for every fold
        kind, offset = TargetScale.resolve(cohort.y, config.fit.target_transform)
        run_info["target_transform"] = {"kind": kind, "offset": offset}
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if config.out is None:
            return _train_cv(config, cohort, sources, crop, folds, None)
        with staged_folder(config.out, config.overwrite, _is_run) as stage:
            (stage / "config.json").write_text(json.dumps({**config.to_json(), **run_info}, indent=2))
            return _train_cv(config, cohort, sources, crop, folds, stage)
    finally:
        torch.set_num_threads(before)


def _train_cv(
    config: CVConfig,
    cohort: Cohort,
    sources: list[SlideSource],
    crop: int,
    folds: list[tuple[np.ndarray, np.ndarray]],
    out: Path | None,
) -> CVResult:
    """The folds (one after another, or in parallel with ``config.devices``); results go to
    ``out`` (the staged run folder) when given."""
    cfg = config.fit
    n_p = len(cohort.patients)
    oof_raw = np.full((n_p, cohort.n_outputs), np.nan)
    fold_of = np.full(n_p, -1)
    spread = np.full(n_p, np.nan)
    models, hists = [], []
    per_fold: dict[str, list[float]] = {m: [] for m in TASK_METRICS[cohort.task]}
    fitted = fit_folds_parallel(config, cohort, crop, folds) if config.devices else None
    for k, (_, test_p) in enumerate(folds):
        model, hist, views = fitted[k] if fitted is not None else fit_fold(config, cohort, sources, crop, k, folds)
        test_s = cohort.slides_of(test_p)
        raw = np.stack([v.mean(0) for v in views])
        oof_raw[test_p] = patient_mean(raw, cohort.slide_patient[test_s], test_p)
        if cohort.task == "survival":
            # the Cox partial likelihood fixes no offset and each fold's model has its own scale:
            # the model z-scores its log-risks with the statistics of its out-of-fold ones, both
            # here, before they are pooled, and in predict_run, before the fold models are averaged
            r = oof_raw[test_p, 0]
            model.risk_scale = (float(r.mean()), float(r.std()) or 1.0)
        pv = _views_of_patients(views, cohort.slide_patient[test_s], test_p)
        spread[test_p] = [model.spread(v) for v in pv]
        fold_of[test_p] = k
        for m, v in _metrics(cohort, test_p, model.to_prediction(oof_raw[test_p])).items():
            per_fold[m].append(v)
        models.append(model)
        hists.append(hist)
        logger.info(
            "fold %d/%d: %d epochs in %.1f s; %s",
            k + 1,
            len(folds),
            len(hist.train_loss),
            hist.seconds,
            ", ".join(f"{m}={v[-1]:.3f}" for m, v in per_fold.items()),
        )
        if out is not None:
            model.save(out / f"fold_{k}")
    allp = np.arange(n_p)
    # each fold's model converts its own outputs (its own target scaling or risk standardisation)
    pred = _per_fold_prediction(models, oof_raw, fold_of)
    pooled = _metrics(cohort, allp, pred)
    t = cohort.time if cohort.time is not None else None
    metrics: dict[str, dict[str, Any]] = {}
    for m, v in pooled.items():
        lo, hi = bootstrap_ci(m, cohort.y, pred, t, config.n_bootstrap, seed=cfg.seed)
        metrics[m] = {"value": v, "ci95": [lo, hi], "folds": per_fold[m]}
    frame = _prediction_frame(cohort, allp, pred, fold_of, spread)
    if out is not None:
        frame.to_csv(out / "predictions.csv", index=False)
        (out / "folds.json").write_text(
            json.dumps(
                [
                    {"fold": k, "test_patients": [cohort.patients[i] for i in te], "history": asdict(h)}
                    for k, ((_, te), h) in enumerate(zip(folds, hists))
                ],
                indent=2,
            )
        )
        (out / "metrics.json").write_text(json.dumps(_finite_or_none(metrics), indent=2))
    return CVResult(metrics, frame, models, hists, folds)


@dataclass
class Run:
    """A finished training run read back: its config, fold models and encoder identity."""

    path: Path
    config: dict[str, Any]
    models: list[SlideModel]
    encoder: EncoderIdentity | None  #: None for runs written before nic recorded it

    @property
    def task(self) -> str:
        return self.models[0].task


def load_run(run: str | Path) -> Run:
    """Read a run folder written by :func:`train_cv`; every fold its config lists must be
    there and load, else a :class:`DataError` naming what is missing."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{run}: not a nic run folder (no config.json); pass a folder `nic train` wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
        n_folds = int(cfg["folds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{cfg_path}: not a readable run config ({e}); train the run again with `nic train`") from e
    if not (run / "metrics.json").is_file():
        raise DataError(f"{run}: no metrics.json; the training run did not finish, train it again with `nic train`")
    missing = [f"fold_{k}" for k in range(n_folds) if not (run / f"fold_{k}" / "model.json").is_file()]
    if missing:
        raise DataError(
            f"{run}: the run has {n_folds} folds but {', '.join(missing)} (model.json) is missing; "
            "restore the run folder or train it again with `nic train`"
        )
    models = [SlideModel.load(run / f"fold_{k}") for k in range(n_folds)]
    enc = cfg.get("encoder")
    return Run(run, cfg, models, EncoderIdentity.from_json(enc) if isinstance(enc, dict) else None)


def check_run_encoder(run: Run, sources: list[SlideSource], compressed: Path) -> None:
    """A :class:`DataError` unless ``sources`` hold codes of the encoder ``run`` was trained on."""
    have = sources[0].encoder
    if run.encoder is None:
        if have.code_size != run.config.get("code_size"):
            raise DataError(f"{compressed}: codes have size {have.code_size}, the run {run.path} was trained on "
                            f"{run.config.get('code_size')}; compress with the training run's encoder")  # fmt: skip
        logger.warning(
            "%s: the run does not record its encoder (an older nic); only the code size was checked", run.path
        )
        return
    diff = have.diff(run.encoder)
    if diff:
        raise DataError(
            f"{compressed}: the stores were made with {have.describe()}, the run {run.path} was trained on stores of "
            f"{run.encoder.describe()} ({'; '.join(diff)}); compress these slides with the run's encoder and settings"
        )


def predict_run(run: str | Path, compressed: str | Path, labels: str | Path | None = None):  # -> DataFrame
    """Apply every fold model of a run to every store in ``compressed``; the prediction is
    the mean of the fold models' predictions (each converted with its own scaling; survival:
    each fold model's log-risks z-scored with the statistics of its out-of-fold log-risks,
    as the run's pooled out-of-fold risks are).

    Returns one row per slide (``slide``, then the task's prediction columns); with
    ``labels`` (a CSV with the run's slide and patient columns) one row per patient, each
    fold model averaging its raw outputs over the patient's slides as in training.
    Stores must hold codes of the run's encoder and settings; stores without tissue are
    left out with a warning.
    """
    import pandas as pd

    from nic.learn.data import read_slide_table
    from nic.store import list_stores, store_id

    r = load_run(run)
    if r.task == "survival" and any(m.risk_scale is None for m in r.models):
        logger.warning(
            "%s: the run does not record its folds' risk scales (an older nic); the fold models' log-risks are "
            "averaged as they are, so a fold with larger ones weighs more (train the run again to fix)",
            r.path,
        )
    compressed = Path(compressed)
    paths = list_stores(compressed)
    if not paths:
        raise DataError(f"{compressed}: no compressed slides (*.zarr) found")
    sources: list[SlideSource] = open_sources(paths, folder=compressed)
    check_run_encoder(r, sources, compressed)
    empty = [s.slide_id for s in sources if not s.tissue.any()]
    if empty:
        logger.warning("%d slide(s) in %s have no tissue cells and get no prediction: %s%s", len(empty), compressed,
                       ", ".join(empty[:10]), " ..." if len(empty) > 10 else "")  # fmt: skip
        sources = [s for s in sources if s.tissue.any()]
        if not sources:
            raise DataError(f"{compressed}: no store holds tissue; check the slides and `nic compress`")
    ids = [s.slide_id for s in sources]
    keys: list[str] = ids
    key_name = "slide"
    group: np.ndarray | None = None
    if labels is not None:
        lab = Path(labels)
        sc, pc = r.config["labels"]["slide_column"], r.config["labels"]["patient_column"]
        table = read_slide_table(lab, sc, pc, {store_id(p) for p in paths})
        pat_of = dict(zip(table["slide_id"], table["patient"]))
        missing = [s for s in ids if s not in pat_of]
        if missing:
            raise DataError(f"{len(missing)} store(s) in {compressed} have no row in {lab}: {', '.join(missing[:10])}")
        sp = np.array([pat_of[s] for s in ids])
        keys = sorted(set(sp))
        group = np.array([keys.index(p) for p in sp])
        key_name = "patient"
    fit = r.config["fit"]
    group = np.arange(len(ids)) if group is None else group
    preds, spread_values = [], []
    for m in r.models:
        views = m.predict_views(sources, fit["tta_crops"], fit["tta_variants"], fit["seed"])
        raw = patient_mean(np.stack([v.mean(0) for v in views]), group, np.arange(len(keys)))
        preds.append(m.to_prediction(raw))
        spread_values.append([m.to_prediction(v) for v in _views_of_patients(views, group, np.arange(len(keys)))])
    pred = np.mean(preds, axis=0)
    d: dict[str, Any] = {key_name: keys}
    if r.task == "regression":
        d["prediction"] = pred
    elif r.task == "survival":
        d["risk"] = pred
    elif r.task == "binary":
        d["probability"] = pred
    else:
        classes = r.models[0].classes or []
        for k, c in enumerate(classes):
            d[f"prob_{c}"] = pred[:, k]
        d["prediction"] = [classes[i] for i in pred.argmax(1)]
    # spread: over fold models and their test views (crops x variants); multiclass: of the
    # probability of the class the mean prediction picks
    spread = []
    for i in range(len(keys)):
        v = np.concatenate([per_model[i] for per_model in spread_values])
        spread.append(float((v[:, int(pred[i].argmax())] if v.ndim == 2 else v).std()))
    d["spread"] = spread
    return pd.DataFrame(d)
