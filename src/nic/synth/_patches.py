"""Labelled patch datasets from the slide drawing code, for encoder training.

Three datasets, each labelling only its own task (patches at 0.5 um/px, 128 px = 64 um,
each with its own random staining):

- ``tissue_type/<class>/*.png``: one folder per tissue class (tumour, stroma, normal,
  lymphocytes, fat, necrosis);
- ``nuclei_density/*.png`` + ``nuclei_density.csv`` (``path,label``): label = number of
  nuclei drawn with their centre inside the patch (mitotic figures count as nuclei);
- ``mitosis/*.png`` + ``mitosis.csv`` (``path,label``): 1 when a mitosis-like figure was
  drawn (whole, inside the patch), else 0; negatives are mostly tumour, with some
  lymphocytes and necrosis (dark dots that are not mitoses).

CSV paths are relative to the CSV's folder; ``tissue_type/labels.csv`` (``path,label,group``)
lists the tissue-type patches.  Every patch is drawn independently (its own tissue and
staining), so no two share a source: the ``group`` column of each CSV gives every patch
its own group, its row number, which the dataset readers use to split by group.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nic._outputs import check_new_folder, holds_only, staged_folder
from nic.errors import OptionError, check_int
from nic.synth._textures import TISSUE_CLASSES, draw_tile, random_stain

__all__ = ["PatchDatasets", "make_patch_datasets"]

logger = logging.getLogger(__name__)


@dataclass
class PatchDatasets:
    """Where :func:`make_patch_datasets` wrote each dataset and how many patches."""

    out: Path
    tissue_type: Path  # folder of class folders
    nuclei_density: Path  # CSV
    mitosis: Path  # CSV
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _save(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, compress_level=1)


#: what a folder of patch datasets holds (any of them: ``overwrite`` may replace the folder)
_NAMES = ("tissue_type", "nuclei_density", "mitosis", "nuclei_density.csv", "mitosis.csv")


def _is_patches(folder: Path) -> bool:
    """Whether ``folder`` holds patch datasets nic wrote and nothing else (what ``overwrite`` may replace)."""
    return any((folder / n).exists() for n in _NAMES) and holds_only(folder, _NAMES)


def _write_csv(path: Path, rows: list[tuple[str, float | int | str]]) -> None:
    """``path,label,group`` with one group per patch (every patch is an independent draw)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "group"])
        w.writerows((*r, str(i)) for i, r in enumerate(rows))


def make_patch_datasets(
    out: str | Path, n: int = 200, seed: int = 0, *, size: int = 128, overwrite: bool = False
) -> PatchDatasets:
    """Write the tissue-type, nuclei-density and mitosis datasets under ``out``.

    ``n`` patches per tissue class for tissue type, ``n`` patches for nuclei density and
    ``n`` for mitosis (half positive); patches are ``size`` x ``size`` px at 0.5 um/px.
    """
    t0 = time.perf_counter()
    check_int("n", n, 1)
    check_int("size", size, 64)
    if size % 2:
        raise OptionError(f"`size` must be an even number of pixels (got {size})")
    check_int("seed", seed, 0)
    out = Path(out)
    # built in a hidden sibling folder that becomes `out` once every dataset is written: an
    # interrupted --overwrite leaves the old datasets whole, never new patches beside old CSVs
    check_new_folder(out, overwrite, holds=_NAMES, what="patch datasets")
    with staged_folder(out, overwrite, _is_patches) as stage:
        tt, nd, mi = stage / "tissue_type", stage / "nuclei_density", stage / "mitosis"
        for d in (nd, mi, *(tt / c for c in TISSUE_CLASSES)):
            d.mkdir(parents=True)
        counts: dict[str, int] = {}

        def patch(rng: np.random.Generator, cls: str, mitoses: int = 0) -> tuple[np.ndarray, int]:
            d = draw_tile(cls, rng, size, mitoses=mitoses, margin=20)
            return random_stain(rng).to_rgb(d.h, d.e), d.nuclei

        # (a) tissue type
        for ci, cls in enumerate(TISSUE_CLASSES):
            rng = np.random.default_rng([seed, 10, ci])
            for i in range(n):
                m = int(cls == "tumour" and rng.random() < 0.2)
                _save(tt / cls / f"{i:05d}.png", patch(rng, cls, m)[0])
            counts[f"tissue_type/{cls}"] = n
        # the order a folder of class folders is read in: classes and files sorted
        _write_csv(tt / "labels.csv", [(f"{c}/{i:05d}.png", c) for c in sorted(TISSUE_CLASSES) for i in range(n)])
        # (b) nuclei density
        rng = np.random.default_rng([seed, 11])
        rows: list[tuple[str, float | int | str]] = []
        for i in range(n):
            cls = TISSUE_CLASSES[int(rng.integers(len(TISSUE_CLASSES)))]
            rgb, nuclei = patch(rng, cls, int(cls == "tumour" and rng.random() < 0.2))
            name = f"nuclei_density/{i:05d}.png"
            _save(stage / name, rgb)
            rows.append((name, int(nuclei)))
        _write_csv(stage / "nuclei_density.csv", rows)
        counts["nuclei_density"] = n
        # (c) mitosis present
        rng = np.random.default_rng([seed, 12])
        rows = []
        for i in range(n):
            positive = i % 2 == 0
            cls = "tumour" if positive or rng.random() < 0.75 else ("lymphocytes", "necrosis")[int(rng.integers(2))]
            rgb, _ = patch(rng, cls, int(positive))
            name = f"mitosis/{i:05d}.png"
            _save(stage / name, rgb)
            rows.append((name, int(positive)))
        _write_csv(stage / "mitosis.csv", rows)
        counts["mitosis"] = n
    seconds = time.perf_counter() - t0
    logger.info("patch datasets in %s (%.1f s)", out, seconds)
    return PatchDatasets(out, out / "tissue_type", out / "nuclei_density.csv", out / "mitosis.csv", counts, seconds)
