"""Mosaic cohorts: slides tiled from a folder of real labelled tiles.

Each real tile is resized to 256 px once and JPEG-encoded once; every slide then reuses
those bytes.  The slide label is defined by the *arrangement* of the tumour tiles:
``clustered`` = 1 when they form one contiguous nodule, 0 when they are scattered with no
two touching; the number of tumour tiles is drawn the same way for both, so counting
tiles cannot tell the label.  Tiles are taken to be at 0.5 um/px after resizing (a
nominal scale: the source magnification of public tile sets is often unknown).

The labels CSV needs the columns ``path`` (relative to the tiles folder) and ``label``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from nic.errors import DataError, check_int
from nic.synth._cohort import MPP, Cohort, _rng, staged_cohort, tile_grid, write_legend
from nic.synth._labels import draw_survival, patients_for, write_labels
from nic.synth._layout import BG, NORMAL, TUMOUR, Layout, smooth_field, tissue_shape
from nic.synth._textures import Stain, draw_tile
from nic.synth._tiff import TILE, TileLibrary, write_pyramid

__all__ = ["MosaicConfig", "make_mosaic_cohort", "read_tile_labels"]

logger = logging.getLogger(__name__)
_RING = np.ones((3, 3), bool)


@dataclass(frozen=True)
class MosaicConfig:
    """Settings of a mosaic cohort; the label names default to LC25000 lung tiles."""

    tumour: tuple[str, ...] = ("lung_aca", "lung_scc")
    normal: tuple[str, ...] = ("lung_n",)
    pool: int = 200  # tiles per label, at most, chosen once per cohort
    tumour_fraction: tuple[float, float] = (0.06, 0.2)  # of tissue tiles
    quality: int = 85
    two_slide_fraction: float = 0.175
    hazard_per_burden: float = 20.0  # log-hazard per unit tumour fraction
    median_survival: float = 36.0
    censoring: float = 0.3
    coverage: tuple[float, float] = (0.45, 0.68)


def read_tile_labels(tiles: Path, labels: Path) -> list[tuple[Path, str]]:
    """(tile path, label) rows of a labels CSV whose ``path`` column is relative to ``tiles``."""
    if not tiles.is_dir():
        raise DataError(f"{tiles}: tile folder not found; pass `tiles` with the folder that holds the tiles")
    if not labels.is_file():
        raise DataError(f"{labels}: labels CSV not found; pass `labels` with a CSV of path,label rows")
    try:
        with open(labels, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "path" not in fields or "label" not in fields:
                raise DataError(
                    f"{labels}: needs columns 'path' and 'label', found {fields or 'none'}; "
                    "write a header line path,label"
                )
            rows = [(tiles / r["path"], r["label"]) for r in reader if r.get("path") and r.get("label")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{labels}: not a readable CSV ({e}); give a text CSV with path,label columns") from e
    if not rows:
        raise DataError(f"{labels}: no rows with a path and a label; add some tiles to it")
    return rows


def _load_tile(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: tile listed in the labels CSV is missing; fix the CSV or the folder")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (TILE, TILE):
                rgb = rgb.resize((TILE, TILE), Image.Resampling.LANCZOS)
            return np.asarray(rgb)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e}); remove it from the labels CSV") from e


def _arrangement(
    rng: np.random.Generator, rows: int, cols: int, tumour_fraction: float, coverage: float, clustered: bool
) -> Layout:
    """Tissue with ``tumour_fraction`` of its tiles tumour, in one nodule or scattered."""
    tissue = tissue_shape(rng, rows, cols, coverage)
    depth = ndi.distance_transform_cdt(np.pad(tissue, 1), metric="chessboard")[1:-1, 1:-1]
    inside = depth >= 2
    n = max(2, int(round(tumour_fraction * tissue.sum())))
    n = min(n, int(inside.sum()) // 5)
    noise = smooth_field(rng, (rows, cols), 1.2)
    order = rng.permutation(np.flatnonzero(inside))
    tumour = np.zeros((rows, cols), bool)
    if clustered:
        weights = depth.ravel().astype(float) ** 2
        seed = int(rng.choice(weights.size, p=weights / weights.sum()))
        sy, sx = divmod(seed, cols)
        yy, xx = np.mgrid[0:rows, 0:cols]
        score = np.hypot(yy - sy, xx - sx) + 0.8 * noise
        idx = np.flatnonzero(inside)
        tumour.flat[idx[np.argsort(score.ravel()[idx], kind="stable")[:n]]] = True
    else:
        blocked = np.zeros((rows, cols), bool)
        for i in order:
            if tumour.sum() >= n:
                break
            if not blocked.flat[i]:
                tumour.flat[i] = True
                r, c = divmod(int(i), cols)
                blocked[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
        for i in order:  # pragma: no cover - only when the tissue is too small to scatter
            if tumour.sum() >= n:
                break
            tumour.flat[i] = True
    classes = np.where(tissue, NORMAL, BG).astype(np.uint8)
    classes[tumour] = TUMOUR
    return Layout(classes, np.zeros((rows, cols), np.uint8))


def tumour_contact(classes: np.ndarray) -> float:
    """Fraction of tumour tiles with a tumour neighbour: ~1 clustered, 0 scattered."""
    tum = classes == TUMOUR
    if not tum.any():
        return float("nan")
    neigh = ndi.convolve(tum.astype(np.int32), _RING.astype(np.int32), mode="constant") - tum
    touching = tum & (neigh > 0)
    return float(touching.sum() / tum.sum())


def make_mosaic_cohort(
    out: str | Path,
    tiles: str | Path,
    labels: str | Path | None = None,
    n_slides: int = 10,
    seed: int = 0,
    size: int | tuple[int, int] = 8192,
    *,
    config: MosaicConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write a cohort of slides tiled from real labelled tiles, labelled by arrangement.

    ``tiles`` is the folder of tiles, ``labels`` its CSV (default ``tiles/labels.csv``)
    with ``path,label`` columns.  ``size`` is the level-0 side in px at 0.5 um/px.
    Writes ``slides/<slide>.tiff``, ``labels.csv`` (``slide, patient, clustered,
    tumour_label, tumour_fraction, tumour_burden, survival_time, survival_event, ...``)
    and the truth maps, like :func:`nic.synth.make_cohort`.
    """
    t0 = time.perf_counter()
    cfg = config or MosaicConfig()
    tiles = Path(tiles)
    labels = Path(labels) if labels is not None else tiles / "labels.csv"
    table = read_tile_labels(tiles, labels)
    by_label: dict[str, list[Path]] = {}
    for tile_path, lab in table:
        by_label.setdefault(lab, []).append(tile_path)
    wanted = (*cfg.tumour, *cfg.normal)
    missing = [lab for lab in wanted if lab not in by_label]
    if missing or not cfg.tumour or not cfg.normal:
        raise DataError(
            f"{labels}: labels {', '.join(missing) or '(none given)'} not found; the CSV has "
            f"{', '.join(sorted(by_label))}; pass `tumour` and `normal` with some of these"
        )
    check_int("n_slides", n_slides, 1)
    rows_, cols_ = tile_grid(size)
    out = Path(out)
    check_int("seed", seed, 0)
    with staged_cohort(out, overwrite) as stage:
        # the library: every chosen tile read, resized and encoded once for the whole cohort
        rng = _rng(seed, 20)
        tiles_rgb: list[np.ndarray] = []
        blank: list[bool] = []
        groups: dict[str, np.ndarray] = {}
        for lab in wanted:
            paths = sorted(by_label[lab])
            chosen = [paths[int(i)] for i in sorted(rng.choice(len(paths), min(cfg.pool, len(paths)), replace=False))]
            start = len(tiles_rgb)
            tiles_rgb += [_load_tile(p) for p in chosen]
            blank += [False] * len(chosen)
            groups[lab] = np.arange(start, len(tiles_rgb))
        stain = Stain()
        start = len(tiles_rgb)
        for _ in range(2):
            d = draw_tile("background", rng, TILE)
            tiles_rgb.append(stain.to_rgb(d.h, d.e))
            blank.append(True)
        groups["__background__"] = np.arange(start, len(tiles_rgb))
        lib = TileLibrary.from_tiles(tiles_rgb, blank, cfg.quality)
        del tiles_rgb

        owner = patients_for(n_slides, cfg.two_slide_fraction, _rng(seed, 21))
        params: list[dict[str, Any]] = []
        for p in range(max(owner) + 1):
            r = _rng(seed, 22, p)
            params.append(
                {
                    "clustered": int(r.integers(2)),
                    "tumour_fraction": float(r.uniform(*cfg.tumour_fraction)),
                    "tumour_label": cfg.tumour[int(r.integers(len(cfg.tumour)))],
                }
            )
        layouts: list[Layout] = []
        for i, p in enumerate(owner):
            r = _rng(seed, 23, i)
            layouts.append(
                _arrangement(
                    r,
                    rows_,
                    cols_,
                    params[p]["tumour_fraction"],
                    float(r.uniform(*cfg.coverage)),
                    bool(params[p]["clustered"]),
                )
            )
        fractions = [lay.count(TUMOUR) / lay.tissue for lay in layouts]
        burden = {
            p: float(np.mean([f for f, o in zip(fractions, owner, strict=True) if o == p])) for p in range(len(params))
        }
        times, events = draw_survival(
            _rng(seed, 24),
            np.array([burden[p] for p in range(len(params))]),
            cfg.hazard_per_burden,
            cfg.median_survival,
            cfg.censoring,
        )
        written: list[Path] = []
        rows: list[dict[str, Any]] = []
        for i, (p, lay) in enumerate(zip(owner, layouts, strict=True)):
            r = _rng(seed, 25, i)
            entries = np.zeros(lay.classes.shape, np.int64)
            for cid, group in ((BG, groups["__background__"]), (TUMOUR, groups[params[p]["tumour_label"]])):
                cells = np.flatnonzero(lay.classes == cid)
                entries.flat[cells] = group[r.integers(len(group), size=len(cells))]
            normal = np.concatenate([groups[lab] for lab in cfg.normal])
            cells = np.flatnonzero(lay.classes == NORMAL)
            entries.flat[cells] = normal[r.integers(len(normal), size=len(cells))]
            slide_id, patient_id = f"slide_{i:04d}", f"patient_{p:04d}"
            path = stage / "slides" / f"{slide_id}.tiff"
            write_pyramid(
                path,
                entries,
                lib,
                mpp=MPP,
                quality=cfg.quality,
                description=f"nic.synth mosaic slide {slide_id}; patient {patient_id}; seed {seed}; mpp {MPP}",
            )
            from PIL import Image

            Image.fromarray(lay.classes).save(stage / "truth" / f"{slide_id}.classes.png")
            Image.fromarray(lay.mitoses).save(stage / "truth" / f"{slide_id}.mitoses.png")
            written.append(out / "slides" / f"{slide_id}.tiff")
            rows.append(
                {
                    "slide": slide_id,
                    "patient": patient_id,
                    "clustered": params[p]["clustered"],
                    "tumour_label": params[p]["tumour_label"],
                    "tumour_fraction": fractions[i],
                    "tumour_burden": burden[p],
                    "survival_time": float(times[p]),
                    "survival_event": int(events[p]),
                    "tumour_contact": tumour_contact(lay.classes),
                    "tumour_tiles": lay.count(TUMOUR),
                    "tissue_tiles": lay.tissue,
                    "width": cols_ * TILE,
                    "height": rows_ * TILE,
                }
            )
            if progress:
                progress(i + 1, len(owner))
        write_labels(stage / "labels.csv", rows)
        write_legend(
            stage,
            "mosaic",
            seed,
            {
                "size": [cols_ * TILE, rows_ * TILE],
                "tiles": str(tiles),
                "tile_labels": str(labels),
                "config": asdict(cfg),
                "note": "truth class ids: 0 background, 1 tumour tile, 3 normal tile",
            },
        )
    labels_out = out / "labels.csv"
    seconds = time.perf_counter() - t0
    logger.info("mosaic cohort of %d slides in %s (%.1f s)", len(written), out, seconds)
    return Cohort(out, written, labels_out, rows, seconds)
