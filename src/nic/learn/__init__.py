"""Learning patient labels from compressed slides.

- ``data``     labels CSV + stores -> :class:`Cohort`; crops sampled by distance from background
- ``models``   slide-level networks in a registry: ``nic-cnn``, ``meanpool``, ``abmil``
- ``losses``   MSE / BCE / CE and the Cox partial likelihood (Breslow, Efron)
- ``metrics``  the metrics each task reports (functions in :mod:`nic.metrics`), bootstrap CIs, survival analysis
- ``cv``       patient-grouped, label-stratified folds and inner validation splits
- ``targets``  regression targets <-> outputs: log / rank transforms, standard scores
- ``slide_model`` a trained network: save/load, test-time views and averaging
- ``train``    one model fit (augmentation, early stopping on an inner split)
- ``folds``    fitting a run's folds, one after another or in parallel over devices
- ``run``      cross-validated runs (:func:`train_cv`) and :func:`predict_run`

Survival convention: model outputs are log-risks, higher = earlier event.
"""

from __future__ import annotations

from nic.learn.cv import inner_split, patient_folds
from nic.learn.data import (
    TASKS,
    Cohort,
    LabelSpec,
    SlideSource,
    crop_weights,
    dihedral,
    load_cohort,
    sample_crop_origin,
)
from nic.learn.losses import cox_ph_loss, task_loss
from nic.learn.metrics import TASK_METRICS, bootstrap_ci
from nic.learn.models import ModelSpec, create_model, list_models, register_model
from nic.learn.run import CVConfig, CVResult, Run, load_run, predict_run, train_cv
from nic.learn.slide_model import SlideModel, patient_mean
from nic.learn.targets import TARGET_TRANSFORMS, TargetScale
from nic.learn.train import FitConfig, FitHistory, event_batches, fit_model, training_view

__all__ = [
    "TASKS",
    "TASK_METRICS",
    "TARGET_TRANSFORMS",
    "TargetScale",
    "CVConfig",
    "CVResult",
    "Cohort",
    "FitConfig",
    "FitHistory",
    "LabelSpec",
    "ModelSpec",
    "SlideModel",
    "SlideSource",
    "Run",
    "load_run",
    "bootstrap_ci",
    "cox_ph_loss",
    "create_model",
    "crop_weights",
    "dihedral",
    "event_batches",
    "fit_model",
    "inner_split",
    "list_models",
    "load_cohort",
    "patient_folds",
    "patient_mean",
    "predict_run",
    "register_model",
    "sample_crop_origin",
    "task_loss",
    "train_cv",
    "training_view",
]
