"""Labelled patch datasets, multitask sampling and colour augmentation.

- ``_datasets``  :class:`PatchTable` (class folders / CSV ``path,label[,group]``), dataset
  specs, :class:`PatchDataset` (patches at an encoder's size and um/px), :func:`group_split`
- ``_nuclei``    nucleus annotations (Aperio/MoNuSeg XML, masks) -> nuclei count/density patches
- ``_multitask`` :class:`MultitaskDataset` and proportional / balanced sampling
- ``augment``    batched torch augmentation: HED stain jitter, colour, flips, blur, noise
"""

from __future__ import annotations

from nic.patches._datasets import (
    DatasetSpec,
    PatchDataset,
    PatchTable,
    group_split,
    load_patch,
    parse_dataset_spec,
    read_patch_table,
)
from nic.patches._multitask import MultitaskDataset, multitask_sampler, task_weights
from nic.patches._nuclei import (
    NucleiAnnotation,
    count_in_windows,
    nuclei_patch_dataset,
    pair_images_annotations,
    read_nuclei,
    read_nuclei_mask,
    read_nuclei_xml,
)

__all__ = [
    "DatasetSpec",
    "MultitaskDataset",
    "NucleiAnnotation",
    "PatchDataset",
    "PatchTable",
    "count_in_windows",
    "group_split",
    "load_patch",
    "multitask_sampler",
    "nuclei_patch_dataset",
    "pair_images_annotations",
    "parse_dataset_spec",
    "read_nuclei",
    "read_nuclei_mask",
    "read_nuclei_xml",
    "read_patch_table",
    "task_weights",
]
