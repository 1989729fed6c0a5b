"""Compression: every slide to a grid of codes, streaming and in parallel.

- ``_pipeline``  one slide: grid, read tasks, row blocks of codes, the store's attributes
- ``_encode``    :class:`BatchEncoder`: uint8 in, batched, channels-last, autocast, dihedral variants
- ``_workers``   reader processes and the shared-memory slots that carry patches back
- ``_tiles``     JPEG tiles decoded on the encoder's device (nvJPEG on CUDA) and cut into patches there
- ``_cohort``    many slides: inputs (files, folders, CSV), per-slide locks, skip/resume, summary
- ``_distributed`` many slides on a Dask cluster or several GPUs: one task per slide, each the
  single-slide job of ``_cohort`` (needs the ``cluster`` extra only when used)
"""

from __future__ import annotations

from nic.compress._cohort import (
    OutputFullError,
    SlideLock,
    SlideResult,
    collect_slides,
    compress_slide,
    compress_slides,
    summary_table,
)
from nic.compress._distributed import ClusterOptions, compress_on_cluster, parse_devices, worker_device
from nic.compress._encode import DIHEDRAL_ORDER, BatchEncoder, dihedral_patch
from nic.compress._pipeline import CompressOptions, plan_slide, slide_checksum

__all__ = [
    "DIHEDRAL_ORDER",
    "BatchEncoder",
    "ClusterOptions",
    "CompressOptions",
    "OutputFullError",
    "SlideLock",
    "SlideResult",
    "collect_slides",
    "compress_on_cluster",
    "compress_slide",
    "compress_slides",
    "dihedral_patch",
    "parse_devices",
    "plan_slide",
    "slide_checksum",
    "summary_table",
    "worker_device",
]
