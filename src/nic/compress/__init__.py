"""Compression: every slide to a grid of codes, streaming and in parallel.

- ``_pipeline``  one slide: grid, read tasks, row blocks of codes, the store's attributes
- ``_encode``    :class:`BatchEncoder`: batched, channels-last, autocast, dihedral variants
- ``_workers``   reader processes and the shared-memory slots that carry patches back
- ``_cohort``    many slides: inputs (files, folders, CSV), per-slide locks, skip/resume, summary
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
from nic.compress._encode import DIHEDRAL_ORDER, BatchEncoder, dihedral_patch
from nic.compress._pipeline import CompressOptions, plan_slide, slide_checksum

__all__ = [
    "DIHEDRAL_ORDER",
    "BatchEncoder",
    "CompressOptions",
    "OutputFullError",
    "SlideLock",
    "SlideResult",
    "collect_slides",
    "compress_slide",
    "compress_slides",
    "dihedral_patch",
    "plan_slide",
    "slide_checksum",
    "summary_table",
]
