"""Training patch encoders (supervised multitask; unsupervised VAE, contrastive, BiGAN), and
the linear probe that compares encoders.

- ``_config``  :class:`TaskSpec` (``NAME=KIND:PATH``), :class:`EncoderTrainConfig` (multitask),
  :class:`UnsupervisedConfig` and the :class:`EncoderRunSettings` they share
- ``_losses``  the masked multitask loss and per-task metrics, as plain functions
- ``_module``  :class:`MultitaskModule`: shared encoder + one linear head per task (Lightning)
- ``_train``   :func:`train_encoder`: run folder, checkpoints, early stopping, export;
  :func:`make_trainer`, the Lightning trainer every method uses
- ``_sampling``  unlabelled tissue patches and patch pairs drawn from slides (no patch dump)
- ``_methods``   :class:`VaeModule`, :class:`SiameseModule`, :class:`BiganModule` (Lightning)
- ``_unsupervised``  :func:`train_unsupervised`: the same run folder for those, with previews
- ``_probe``   :func:`linear_probe`: frozen codes -> logistic / ridge regression

Lightning is imported on first use of the training names, so the probe stays light.
"""

from __future__ import annotations

from nic._lazy import lazy_attributes

_LAZY = {
    "TaskSpec": "nic.encoder_training._config",
    "EncoderRunSettings": "nic.encoder_training._config",
    "EncoderTrainConfig": "nic.encoder_training._config",
    "UnsupervisedConfig": "nic.encoder_training._config",
    "METHODS": "nic.encoder_training._config",
    "parse_task_spec": "nic.encoder_training._config",
    "masked_multitask_loss": "nic.encoder_training._losses",
    "task_metrics": "nic.encoder_training._losses",
    "MultitaskModule": "nic.encoder_training._module",
    "TaskHead": "nic.encoder_training._module",
    "TrainResult": "nic.encoder_training._train",
    "train_encoder": "nic.encoder_training._train",
    "prepare_tasks": "nic.encoder_training._train",
    "make_trainer": "nic.encoder_training._train",
    "train_unsupervised": "nic.encoder_training._unsupervised",
    "SlidePatchSampler": "nic.encoder_training._sampling",
    "SlidePatches": "nic.encoder_training._sampling",
    "SlidePairs": "nic.encoder_training._sampling",
    "slide_paths": "nic.encoder_training._sampling",
    "VaeModule": "nic.encoder_training._methods",
    "SiameseModule": "nic.encoder_training._methods",
    "BiganModule": "nic.encoder_training._methods",
    "ProbeResult": "nic.encoder_training._probe",
    "embed_table": "nic.encoder_training._probe",
    "linear_probe": "nic.encoder_training._probe",
    "probe_codes": "nic.encoder_training._probe",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes("nic.encoder_training", _LAZY, globals(), __all__)
