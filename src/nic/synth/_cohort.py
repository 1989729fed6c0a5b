"""Procedural cohorts: patients, slide layouts, labels, and their pyramidal TIFF slides.

Two steps, both deterministic in ``seed``:

1. :func:`plan_cohort` draws patients and the class map of every slide (cheap: tile
   resolution only) and computes the labels from what will be drawn.
2. :func:`make_cohort` draws a small pool of textures once, then writes each slide by
   reusing pre-encoded JPEG tiles (see :mod:`nic.synth._tiff`).

Labels (``labels.csv``, one row per slide):

- ``proliferation``: mitosis-like figures drawn in the patient's tumour per mm2 of tumour
  (all the patient's slides pooled);
- ``growth_pattern``: 1 desmoplastic (tumour fenced by stroma), 0 replacement (tumour
  touching normal parenchyma); the class amounts do not depend on it;
- ``survival_time`` (months), ``survival_event`` (1 death, 0 censored): exponential hazard
  rising with ``tumour_burden``, the patient's mean tumour fraction;
- auxiliary truth: class fractions of the slide's tissue, counts, ``rim_contact``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic.dihedral import compose_rot_then_flip, dihedral
from nic.errors import OptionError, check_int
from nic.synth._labels import draw_survival, patients_for, write_labels
from nic.synth._layout import (
    BG,
    TUMOUR,
    GrowthParams,
    Layout,
    LayoutFailed,
    growth_layout,
    rim_contact,
)
from nic.synth._textures import CLASSES, Stain, draw_tile, random_stain
from nic.synth._tiff import TILE, TileLibrary, _halve, write_pyramid

__all__ = ["CohortConfig", "Cohort", "SlidePlan", "plan_cohort", "make_cohort", "tile_grid"]

logger = logging.getLogger(__name__)

#: um per level-0 pixel of every generated slide.
MPP = 0.5
#: Area of one 256-px tile at 0.5 um/px, in mm2 (128 um x 128 um).
TILE_MM2 = (TILE * MPP / 1000.0) ** 2
#: Smallest slide side (level-0 px): room for tissue, tumour, rim and normal tissue.
MIN_SIZE = 4096
#: Largest slide side (level-0 px) the pyramid writer supports.
MAX_SIZE = 2**22


@dataclass(frozen=True)
class CohortConfig:
    """Settings of a procedural cohort (defaults are what ``nic synth cohort`` uses).

    Ranges are (low, high) drawn uniformly per patient unless stated.
    """

    quality: int = 80  # JPEG quality of every tile
    variants: int = 6  # drawn textures per class (per mitosis count for tumour)
    transforms: int = 8  # dihedral transforms of each texture used as further variants (1-8)
    two_slide_fraction: float = 0.175  # patients with two slides
    tumour_fraction: tuple[float, float] = (0.04, 0.42)  # tumour tiles / tissue tiles
    mitosis_rate: tuple[float, float] = (0.02, 1.5)  # figures per tumour tile, log-uniform
    max_mitoses: int = 3  # per 256-px tile
    # log-hazard per unit of tumour fraction; with the burdens drawn here (sd ~0.08) the
    # true burden as risk score has a c-index of ~0.80 (0.77-0.84 over survival draws);
    # at 12 it was ~0.73, too close to what a model should reach to tell good from bad
    hazard_per_burden: float = 20.0
    median_survival: float = 36.0  # months, at the cohort's mean burden
    censoring: float = 0.3  # expected censored fraction
    stain_jitter: float = 1.0  # 0: every slide stained alike
    coverage: tuple[float, float] = (0.45, 0.68)  # tissue share of the slide area
    pyramid: bool = True  # False: level 0 only, like the huge single-level scans some labs have

    def __post_init__(self) -> None:
        check_int("quality", self.quality, 1, 100)
        check_int("variants", self.variants, 1)
        check_int("transforms", self.transforms, 1, 8)


@dataclass
class SlidePlan:
    """One planned slide: ids, its layout, and its labels row."""

    slide_id: str
    patient_id: str
    index: int
    layout: Layout
    row: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cohort:
    """A written cohort: its folder, slide files, labels file and label rows."""

    out: Path
    slides: list[Path]
    labels: Path
    rows: list[dict[str, Any]]
    seconds: float = 0.0


def tile_grid(size: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of 256-px tiles for a level-0 ``size`` (px, or (width, height)), rounded up."""
    w, h = (size, size) if isinstance(size, int) else size
    for v in (w, h):
        if not isinstance(v, int | np.integer) or v < MIN_SIZE or v > MAX_SIZE:
            raise OptionError(
                f"`size` must be between {MIN_SIZE} and {MAX_SIZE} level-0 pixels (at 0.5 um/px) (got {v!r})"
            )
    return -(-int(h) // TILE), -(-int(w) // TILE)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _patient_params(rng: np.random.Generator, cfg: CohortConfig) -> dict[str, float | int]:
    lo, hi = cfg.mitosis_rate
    return {
        "tumour": float(rng.uniform(*cfg.tumour_fraction)),
        "mitosis_rate": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
        "growth_pattern": int(rng.integers(2)),
        "necrosis": float(rng.uniform(0.0, 0.5)),
        "extra_stroma": float(rng.uniform(0.0, 0.08)),
        "lymphocytes": float(rng.uniform(0.0, 0.05)),
        "fat": float(rng.uniform(0.0, 0.08)),
    }


def _slide_layout(rng: np.random.Generator, rows: int, cols: int, pp: dict[str, Any], cfg: CohortConfig) -> Layout:
    """Draw a layout for the patient parameters ``pp``, retrying when amounts do not fit."""
    tumour = pp["tumour"]
    for attempt in range(60):
        gp = GrowthParams(
            tumour=tumour,
            necrosis=pp["necrosis"],
            extra_stroma=pp["extra_stroma"],
            lymphocytes=pp["lymphocytes"],
            fat=pp["fat"],
            nodules=int(rng.integers(1, 2 + max(1, rows * cols // 400))),
            coverage=float(rng.uniform(*cfg.coverage)),
        )
        try:
            layout = growth_layout(rng, rows, cols, gp, desmoplastic=bool(pp["growth_pattern"]))
            break
        except LayoutFailed:
            if attempt % 6 == 5:
                tumour *= 0.9
    else:  # pragma: no cover - the amounts above always fit after a few shrinks
        raise RuntimeError("could not draw a slide layout")
    tum = layout.classes == TUMOUR
    counts = np.minimum(rng.poisson(pp["mitosis_rate"], int(tum.sum())), cfg.max_mitoses)
    layout.mitoses[tum] = counts.astype(np.uint8)
    return layout


def plan_cohort(
    n_slides: int, size: int | tuple[int, int], seed: int, config: CohortConfig | None = None
) -> list[SlidePlan]:
    """Draw patients, slide layouts and labels without writing anything.

    ``size`` is the level-0 size in pixels at 0.5 um/px (rounded up to whole 256-px tiles).
    Returns one :class:`SlidePlan` per slide with its labels row filled in.
    """
    cfg = config or CohortConfig()
    check_int("n_slides", n_slides, 1)
    check_int("seed", seed, 0)
    rows, cols = tile_grid(size)
    owner = patients_for(n_slides, cfg.two_slide_fraction, _rng(seed, 0))
    n_patients = max(owner) + 1
    params = [_patient_params(_rng(seed, 1, p), cfg) for p in range(n_patients)]
    plans: list[SlidePlan] = []
    for i, p in enumerate(owner):
        layout = _slide_layout(_rng(seed, 2, i), rows, cols, params[p], cfg)
        plans.append(SlidePlan(f"slide_{i:04d}", f"patient_{p:04d}", i, layout))
    # patient-level truth
    by_patient: dict[str, list[SlidePlan]] = {}
    for sp in plans:
        by_patient.setdefault(sp.patient_id, []).append(sp)
    burden, prolif = {}, {}
    for pid, sps in by_patient.items():
        tissue = [sp.layout.tissue for sp in sps]
        tum = [sp.layout.count(TUMOUR) for sp in sps]
        burden[pid] = float(np.mean([t / s for t, s in zip(tum, tissue, strict=True)]))
        mit = sum(int(sp.layout.mitoses.sum()) for sp in sps)
        prolif[pid] = mit / (sum(tum) * TILE_MM2)
    pids = sorted(by_patient)
    times, events = draw_survival(
        _rng(seed, 3), np.array([burden[p] for p in pids]), cfg.hazard_per_burden, cfg.median_survival, cfg.censoring
    )
    surv = {p: (float(t), int(e)) for p, t, e in zip(pids, times, events, strict=True)}
    for sp in plans:
        lay, pp = sp.layout, params[int(sp.patient_id.split("_")[1])]
        n_tissue = lay.tissue
        sp.row = {
            "slide": sp.slide_id,
            "patient": sp.patient_id,
            "proliferation": prolif[sp.patient_id],
            "growth_pattern": int(pp["growth_pattern"]),
            "survival_time": surv[sp.patient_id][0],
            "survival_event": surv[sp.patient_id][1],
            "tumour_burden": burden[sp.patient_id],
            "tumour_fraction": lay.count(TUMOUR) / n_tissue,
            **{
                f"{c}_fraction": lay.count(i) / n_tissue
                for i, c in enumerate(CLASSES)
                if c not in ("background", "tumour")
            },
            "mitoses": int(lay.mitoses.sum()),
            "tumour_tiles": lay.count(TUMOUR),
            "tissue_tiles": n_tissue,
            "rim_contact": rim_contact(lay.classes),
            "mitosis_rate": pp["mitosis_rate"],
            "width": cols * TILE,
            "height": rows * TILE,
        }
    return plans


# -- textures and rendering ----------------------------------------------------------------


@dataclass
class TexturePool:
    """Drawn stain densities shared by a cohort's slides.

    ``keys[i]`` is (class id, mitoses) of texture i; ``h``/``e`` are (n, 256, 256) float16.
    """

    keys: list[tuple[int, int]]
    h: np.ndarray
    e: np.ndarray

    @classmethod
    def draw(cls, seed: int, cfg: CohortConfig) -> TexturePool:
        rng = _rng(seed, 4)
        keys: list[tuple[int, int]] = []
        hs, es = [], []
        for cid, name in enumerate(CLASSES):
            counts = range(cfg.max_mitoses + 1) if cid == TUMOUR else [0]
            for m in counts:
                for _ in range(cfg.variants if cid != BG else 2):
                    d = draw_tile(name, rng, TILE, mitoses=m)
                    keys.append((cid, m))
                    hs.append(d.h.astype(np.float16))
                    es.append(d.e.astype(np.float16))
        return cls(keys, np.stack(hs), np.stack(es))


def _dihedral(a: np.ndarray, t: int) -> np.ndarray:
    """Texture variant t (0-7) of an (h, w, ...) array: ``t % 4`` quarter turns, then a
    left-right flip when ``t >= 4`` (the enumeration generated cohorts were made with)."""
    return np.ascontiguousarray(dihedral(a, compose_rot_then_flip(t % 4, t >= 4), axes=(0, 1)))


def _slide_library(
    pool: TexturePool, stain: Stain, cfg: CohortConfig
) -> tuple[TileLibrary, dict[tuple[int, int], np.ndarray]]:
    """Encode the pool in one slide's staining; returns the library and entries per key."""
    tiles, halves, blank, keys = [], [], [], []
    for i, key in enumerate(pool.keys):
        rgb = stain.to_rgb(pool.h[i], pool.e[i])
        half = _halve(rgb)  # the dihedral group commutes with 2x2 area averaging
        for t in range(max(1, min(8, cfg.transforms))):
            tiles.append(_dihedral(rgb, t))
            halves.append(_dihedral(half, t))
            blank.append(key[0] == BG)
            keys.append(key)
    lib = TileLibrary.from_tiles(tiles, blank, cfg.quality, halves)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, key in enumerate(keys):
        groups.setdefault(key, []).append(j)
    return lib, {k: np.asarray(v) for k, v in groups.items()}


def _entry_map(rng: np.random.Generator, layout: Layout, groups: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Library entry of every tile: a random variant of the tile's (class, mitoses)."""
    entries = np.zeros(layout.classes.shape, np.int64)
    for key, ids in groups.items():
        cells = np.flatnonzero((layout.classes == key[0]) & (layout.mitoses == key[1]))
        if len(cells):
            entries.flat[cells] = ids[rng.integers(len(ids), size=len(cells))]
    return entries


def _write_truth(folder: Path, slide_id: str, layout: Layout) -> None:
    from PIL import Image

    Image.fromarray(layout.classes).save(folder / f"{slide_id}.classes.png")
    Image.fromarray(layout.mitoses).save(folder / f"{slide_id}.mitoses.png")


_POOL: TexturePool | None = None


def _init_worker(pool: TexturePool) -> None:
    global _POOL
    _POOL = pool


def _render(
    out: Path, sp: SlidePlan, seed: int, cfg: CohortConfig, pool: TexturePool | None = None
) -> tuple[Path, float]:
    """Write one planned slide and its truth maps; returns (path, seconds)."""
    pool = pool or _POOL
    assert pool is not None
    rng = _rng(seed, 5, sp.index)
    stain = random_stain(rng, cfg.stain_jitter)
    lib, groups = _slide_library(pool, stain, cfg)
    entries = _entry_map(rng, sp.layout, groups)
    path = out / "slides" / f"{sp.slide_id}.tiff"
    desc = f"nic.synth procedural slide {sp.slide_id}; patient {sp.patient_id}; seed {seed}; mpp {MPP}"
    min_size = 1024 if cfg.pyramid else 2**62
    stats = write_pyramid(path, entries, lib, mpp=MPP, quality=cfg.quality, min_size=min_size, description=desc)
    _write_truth(out / "truth", sp.slide_id, sp.layout)
    return path, stats.seconds


def _is_cohort(folder: Path) -> bool:
    """Whether ``folder`` looks like a cohort nic wrote (what ``overwrite`` may replace)."""
    from nic._outputs import holds_only

    return (folder / "cohort.json").is_file() and holds_only(folder, ("slides", "truth", "labels.csv", "cohort.json"))


@contextlib.contextmanager
def staged_cohort(out: Path, overwrite: bool) -> Iterator[Path]:
    """The folder to write a cohort into: a hidden sibling of ``out`` that becomes ``out``
    once slides, truth maps, ``labels.csv`` and ``cohort.json`` are all written
    (:func:`nic._outputs.staged_folder`).  An interrupted run leaves the old cohort as it
    was, never new slides beside old labels.  ``out`` must be absent or empty, or hold a
    cohort and ``overwrite``."""
    from nic._outputs import check_new_folder, staged_folder

    check_new_folder(out, overwrite, holds=("slides", "labels.csv", "cohort.json"), what="a cohort")
    with staged_folder(out, overwrite, _is_cohort) as stage:
        for sub in ("slides", "truth"):
            (stage / sub).mkdir()
        yield stage


def write_legend(out: Path, kind: str, seed: int, extra: dict[str, Any]) -> None:
    """``cohort.json``: class ids of the truth maps, units and the settings used."""
    legend = {
        "kind": kind,
        "seed": seed,
        "mpp": MPP,
        "tile_px": TILE,
        "classes": {str(i): c for i, c in enumerate(CLASSES)},
        "truth": "truth/<slide>.classes.png: class id per 256-px level-0 tile; "
        "truth/<slide>.mitoses.png: mitosis-like figures per tile",
        **extra,
    }
    (out / "cohort.json").write_text(json.dumps(legend, indent=2) + "\n")


def make_cohort(
    out: str | Path,
    n_slides: int = 10,
    size: int | tuple[int, int] = 8192,
    seed: int = 0,
    *,
    config: CohortConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write a procedural cohort to ``out``: ``slides/<slide>.tiff``, ``labels.csv``, truth maps.

    ``size`` is the level-0 side in pixels at 0.5 um/px (or (width, height)), rounded up
    to a multiple of 256.  Slides are pyramidal JPEG tiled TIFFs that OpenSlide opens as
    generic-tiff at 0.5 um/px.  ``workers`` > 1 writes slides in that many processes; the
    output is the same byte for byte.  ``progress(done, total)`` is called after each slide.
    """
    t0 = time.perf_counter()
    cfg = config or CohortConfig()
    out = Path(out)
    plans = plan_cohort(n_slides, size, seed, cfg)
    check_int("workers", workers, 1)
    with staged_cohort(out, overwrite) as stage:
        pool = TexturePool.draw(seed, cfg)
        n_done = 0
        if workers > 1 and len(plans) > 1:
            with ProcessPoolExecutor(min(workers, len(plans)), initializer=_init_worker, initargs=(pool,)) as ex:
                futures = [ex.submit(_render, stage, sp, seed, cfg) for sp in plans]
                for fut in futures:
                    fut.result()
                    n_done += 1
                    if progress:
                        progress(n_done, len(plans))
        else:
            for sp in plans:
                _render(stage, sp, seed, cfg, pool)
                n_done += 1
                if progress:
                    progress(n_done, len(plans))
        rows = [sp.row for sp in plans]
        write_labels(stage / "labels.csv", rows)
        write_legend(
            stage, "procedural", seed, {"size": [plans[0].row["width"], plans[0].row["height"]], "config": asdict(cfg)}
        )
    paths = [out / "slides" / f"{sp.slide_id}.tiff" for sp in plans]
    labels = out / "labels.csv"
    seconds = time.perf_counter() - t0
    logger.info("cohort of %d slides in %s (%.1f s)", len(paths), out, seconds)
    return Cohort(out, paths, labels, rows, seconds)
