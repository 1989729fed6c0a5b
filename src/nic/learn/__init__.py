"""Learning patient labels from compressed slides.

- ``data``     labels CSV + stores -> :class:`Cohort`; crops sampled by distance from background
- ``models``   slide-level networks in a registry: ``nic-cnn``, ``meanpool``, ``abmil``
- ``losses``   MSE / BCE / CE and the Cox partial likelihood (Breslow, Efron)
- ``metrics``  Spearman, Pearson, MAE, AUC, balanced accuracy, c-index, bootstrap CIs
- ``cv``       patient-grouped, label-stratified folds and inner validation splits
- ``train``    one model fit (augmentation, early stopping) and test-time averaging
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
from nic.learn.metrics import TASK_METRICS, auc, balanced_accuracy, bootstrap_ci, c_index, mae, pearson, spearman
from nic.learn.models import ModelSpec, create_model, list_models, register_model
from nic.learn.run import CVResult, Run, TrainConfig, load_run, predict_run, train_cv
from nic.learn.train import FitConfig, FitHistory, SlideModel, event_batches, fit_model, patient_mean, training_view

__all__ = [
    "TASKS",
    "TASK_METRICS",
    "CVResult",
    "Cohort",
    "FitConfig",
    "FitHistory",
    "LabelSpec",
    "ModelSpec",
    "SlideModel",
    "SlideSource",
    "TrainConfig",
    "Run",
    "load_run",
    "auc",
    "balanced_accuracy",
    "bootstrap_ci",
    "c_index",
    "cox_ph_loss",
    "create_model",
    "crop_weights",
    "dihedral",
    "event_batches",
    "fit_model",
    "inner_split",
    "list_models",
    "load_cohort",
    "mae",
    "patient_folds",
    "patient_mean",
    "pearson",
    "predict_run",
    "register_model",
    "sample_crop_origin",
    "spearman",
    "task_loss",
    "train_cv",
    "training_view",
]
