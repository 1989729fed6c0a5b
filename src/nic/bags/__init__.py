"""Feature bags of other tools (TRIDENT, CLAM, STAMP) to and from nic stores.

- :func:`import_bags`: each slide's ``features`` + ``coords`` placed at their grid cells
  and written as an ordinary store (:mod:`nic.store`), whose provenance says where the
  codes came from: ``encoder_name`` ``imported:<format>:<extractor>``, an
  ``encoder_checksum`` shared by every bag of one extraction (format, extractor and its
  settings), and per slide ``source_format``, ``source_file``, ``source_sha256`` in the
  attributes.  ``mpp`` is the extraction's nominal um/px (TRIDENT: 10 / target
  magnification, STAMP: tile_size_um / tile_size_px, CLAM: level um/px to 2 significant
  digits), so slides scanned at 0.499 and 0.502 um/px stay one cohort;
  ``source_mpp`` is the grid's actual um/px on that slide when it is known.  Without the
  slide, ``slide_mpp`` is estimated from the file (``slide_mpp_source`` says so) and
  ``slide_dimensions`` is what the file records, else the extent of the grid.
- :func:`export_stores`: nic's codes in each tool's own layout (see ``_formats``).

Layouts, units and attributes of each tool are described in ``nic.bags._formats``; the
grid rules (tolerances, snapping) in ``nic.bags._place``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nic.bags._formats import FORMATS, Bag, ExportItem, SlideInfo, find_bags, identity_checksum, read_bag, write_bag
from nic.bags._place import Placement, place_on_grid
from nic.errors import DataError, OutputError, StoreError, check_choice

__all__ = ["FORMATS", "ImportResult", "import_bags", "export_stores", "place_on_grid", "read_bag"]

logger = logging.getLogger(__name__)

#: Grid rows written at once (a zarr chunk row of the store).
BLOCK_ROWS = 64
#: Largest magnitude float16 holds.
F16_MAX = 65504.0


@dataclass
class ImportResult:
    """One imported slide: its store, patches placed, cells and seconds."""

    slide_id: str
    source: Path
    store: Path
    patches: int
    grid_shape: tuple[int, int]
    seconds: float
    dropped: int = 0
    max_shift: float = 0.0


def _slide_table(slides: list[str | Path] | None, mpp: float | None) -> dict[str, Path]:
    if not slides:
        return {}
    from nic.compress import collect_slides
    from nic.store import slide_id_for

    return {slide_id_for(p): p for p in collect_slides(slides)}


def _slide_facts(path: Path | None, mpp: float | None) -> tuple[SlideInfo, dict[str, Any]]:
    """What the store records of the slide (``slide_*`` attributes), read from the file."""
    if path is None:
        if mpp is None:
            return SlideInfo(), {}
        from nic.slide._mpp import check_user_mpp

        mx, my = check_user_mpp(mpp)
        return SlideInfo((mx, my)), {"slide_mpp": (mx, my), "slide_mpp_source": "given by the user"}
    from nic.compress import slide_checksum
    from nic.slide import open_slide

    with open_slide(path, mpp=mpp) as s:
        info = SlideInfo(
            (float(s.mpp[0]), float(s.mpp[1])),
            (int(s.dimensions[0]), int(s.dimensions[1])),
            tuple(float(lv.downsample) for lv in s.levels),
        )
        source = s.mpp_source
    resolved = path.resolve()
    method, digest = slide_checksum(resolved)
    return info, {
        "slide_path": str(resolved), "slide_size_bytes": resolved.stat().st_size, "slide_checksum": digest,
        "slide_checksum_method": method, "slide_mpp": info.mpp, "slide_mpp_source": source,
        "slide_dimensions": info.size,
    }  # fmt: skip


def _file_sha256(path: Path) -> str:
    from nic._outputs import file_sha256

    return file_sha256(path)


def _write_store(bag: Bag, place: Placement, out: Path, slide: dict[str, Any], extractor: str, t0: float) -> Path:
    import nic
    from nic.store import StoreAttrs, building_store, create_store, mark_complete, store_path

    feats = bag.read_features()
    if not place.keep.all():
        feats = feats[place.keep]
    if feats.size and not np.isfinite(feats).all():
        raise DataError(f"{bag.path}: the features hold NaN or infinite values; extract them again")
    big = float(np.abs(feats).max()) if feats.size else 0.0
    if big > F16_MAX:
        raise DataError(
            f"{bag.path}: features reach {big:.3g}, beyond float16 (65504), the store's code type; "
            "scale them before importing"
        )
    feats16 = feats.astype(np.float16)
    del feats
    rows, cols = place.shape
    tissue = np.zeros((rows, cols), bool)
    cells = place.cells
    tissue[cells[:, 0], cells[:, 1]] = True
    identity = {**bag.identity, "extractor": extractor or bag.identity.get("extractor", "")}
    name = f"imported:{bag.format}:{identity['extractor'] or 'unknown'}"
    stride = int(round(bag.patch * place.step[0] / bag.patch_level0))
    extra: dict[str, Any] = {
        "source_format": bag.format, "source_file": str(bag.path.resolve()), "source_sha256": _file_sha256(bag.path),
        "source_mpp": bag.source_mpp, "source_attrs": bag.attrs,
    }  # fmt: skip
    if place.dropped or place.max_shift:
        extra.update({"snapped": True, "snap_max_shift_level0": place.max_shift, "snap_dropped": place.dropped})
    if "slide_dimensions" not in slide:  # no slide file: what the bag says, else the grid's extent
        slide = {**slide, "slide_dimensions": bag.size_level0 or _extent(place, bag.patch_level0)}
    if "slide_mpp" not in slide:
        est = bag.mpp * bag.patch / bag.patch_level0
        slide = {**slide, "slide_mpp": (est, est), "slide_mpp_source": f"estimated from the {bag.format} file"}
    attrs = StoreAttrs(
        **slide,
        mpp=float(bag.mpp), patch=int(bag.patch), stride=stride, origin=place.origin,
        step=(float(place.step[0]), float(place.step[1])), patch_level0=(bag.patch_level0, bag.patch_level0),
        grid_shape=(rows, cols), n_tissue=int(len(cells)), code_size=int(bag.code_size), variants=1,
        encoder_name=name, encoder_checksum=identity_checksum(identity),
        encoder_config={"imported": identity}, random_init=False, nic_version=nic.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"), extra=extra,
    )  # fmt: skip
    path = store_path(out, bag.slide_id)
    order = np.argsort(cells[:, 0], kind="stable")
    cells, feats16 = cells[order], feats16[order]
    bounds = np.searchsorted(cells[:, 0], np.arange(0, rows + BLOCK_ROWS, BLOCK_ROWS))
    with building_store(path) as (target, staged):  # a store it replaces stays until this one is whole
        features = create_store(
            target, int(bag.code_size), (rows, cols), tissue, attrs, chunk=BLOCK_ROWS, in_new_folder=staged
        )
        for b, r0 in enumerate(range(0, rows, BLOCK_ROWS)):
            lo, hi = bounds[b], bounds[b + 1]
            if lo == hi:
                continue
            h = min(BLOCK_ROWS, rows - r0)
            buf = np.zeros((bag.code_size, h, cols), np.float16)
            buf[:, cells[lo:hi, 0] - r0, cells[lo:hi, 1]] = feats16[lo:hi].T
            features[:, r0 : r0 + h, :] = buf
        seconds = time.perf_counter() - t0
        n = int(len(cells))
        done = {"seconds": round(seconds, 3), "patches": n, "patches_per_s": round(n / max(seconds, 1e-9), 1)}
        mark_complete(target, done)
    return path


def _extent(place: Placement, patch_level0: float) -> tuple[int, int]:
    """Level-0 (width, height) the grid's cells span."""
    rows, cols = place.shape
    w = place.origin[0] + max(cols - 1, 0) * place.step[0] + patch_level0
    h = place.origin[1] + max(rows - 1, 0) * place.step[1] + patch_level0
    return int(np.ceil(w)), int(np.ceil(h))


def import_bags(
    folder: str | Path,
    fmt: str,
    out: str | Path,
    *,
    slides: list[str | Path] | None = None,
    mpp: float | None = None,
    patch_size: int | None = None,
    patches_dir: str | Path | None = None,
    extractor: str = "",
    snap: bool = False,
    overwrite: bool = False,
) -> list[ImportResult]:
    """Import every bag of ``folder`` (``fmt``: trident, clam or stamp) into stores in ``out``.

    ``slides``: slide files, folders or CSVs (as ``nic compress`` takes them), matched to the
    bags by slide id, to record each slide's size, um/px and checksum and to convert
    micrometres or pyramid levels to level-0 pixels; ``mpp``: the slides' level-0 um/px
    when they are not given (or override theirs).  ``patch_size``: patch side in level-0
    pixels for files that do not say it; ``patches_dir``: CLAM's patching folder;
    ``extractor``: the feature extractor's name where the files do not record it (CLAM).
    ``snap``: place overlapping or off-grid patches on the nearest cell instead of refusing.
    Every bag is checked before any store is written, so a refusal leaves ``out`` as it was.
    """
    check_choice("fmt", fmt, FORMATS)
    from nic._outputs import check_writable
    from nic.store import is_complete, store_path

    folder, out = Path(folder), Path(out)
    files = find_bags(folder, fmt)
    if not files:
        raise DataError(f"{folder}: no {fmt} feature files (*.h5{' or pt_files/*.pt' if fmt == 'clam' else ''})")
    table = _slide_table(slides, mpp)
    if table:
        missing = [f.name for f in files if _bag_id(f) not in table]
        if missing:
            raise DataError(
                f"{len(missing)} feature file(s) have no slide among `slides`: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; give their slides too or import them separately"
            )
    if not overwrite:
        done = [f.name for f in files if is_complete(store_path(out, _bag_id(f)))]
        if done:
            raise OutputError(
                f"{out}: already holds stores for {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}; "
                "pass `overwrite=True` to replace them, or give another `out`"
            )
    check_writable(out, folder=True)
    planned = []
    for f in files:
        t0 = time.perf_counter()
        info, facts = _slide_facts(table.get(_bag_id(f)), mpp)
        bag = read_bag(f, fmt, info, patch_size=patch_size, patches_dir=Path(patches_dir) if patches_dir else None)
        if info.size and bag.size_level0 and bag.size_level0 != info.size:
            raise DataError(
                f"{f}: made from a {bag.size_level0[0]} x {bag.size_level0[1]} px slide, but its slide "
                f"{table.get(_bag_id(f))} is {info.size[0]} x {info.size[1]} px; give the slide it was made from"
            )
        if info.size:
            bag.size_level0 = info.size
        place = place_on_grid(bag.coords, bag.patch_level0, bag.step_level0, snap=snap, size_level0=bag.size_level0,
                              source=str(f))  # fmt: skip
        planned.append((bag, place, facts, time.perf_counter() - t0))
    idents = {(b.identity.get("extractor") or extractor, b.code_size, b.patch, b.mpp) for b, *_ in planned}
    if len(idents) > 1:
        logger.warning("%s: the bags differ in extractor, code size, patch or um/px: %s", folder, sorted(idents))
    if fmt == "clam" and not extractor:
        logger.warning("CLAM files do not name their feature extractor; pass `extractor=NAME` to record it")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for bag, place, facts, t_read in planned:
        t0 = time.perf_counter() - t_read
        path = _write_store(bag, place, out, facts, extractor, t0)
        results.append(
            ImportResult(
                bag.slide_id,
                bag.path,
                path,
                int(place.keep.sum()),
                place.shape,
                time.perf_counter() - t0,
                place.dropped,
                place.max_shift,
            )  # fmt: skip
        )
        if place.dropped:
            logger.warning("%s: snapped, %d overlapping patches dropped", bag.path, place.dropped)
        logger.info("%s: %d patches -> %s", bag.path, results[-1].patches, path)
    return results


def _bag_id(path: Path) -> str:
    from nic.store import slide_id_for

    return slide_id_for(path)


def export_stores(
    folder: str | Path, fmt: str, out: str | Path, *, variant: int = 0, overwrite: bool = False
) -> list[Path]:
    """Write the codes of every complete store in ``folder`` in ``fmt``'s layout under ``out``.

    One file per slide (CLAM: ``h5_files/``, ``pt_files/`` and ``patches/``); coordinates are
    the level-0 top-left corners of the tissue cells (rounded to whole pixels for TRIDENT
    and CLAM, micrometres for STAMP).  Dihedral stores export ``variant`` (0: as scanned).
    Returns the files written.  A non-empty ``out`` is refused unless ``overwrite``.
    """
    check_choice("fmt", fmt, FORMATS)
    from nic._outputs import check_new_folder
    from nic.store import list_stores, open_store

    stores = [open_store(p) for p in list_stores(folder)]
    if not stores:
        raise StoreError(f"{folder}: no compressed slides to export")
    out = Path(out)
    check_new_folder(out, overwrite, what="files")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for s in stores:
        m = s.meta
        if m.origin is None or m.step is None or m.mpp is None or m.patch is None:
            raise StoreError(
                f"{s.path}: no grid geometry (origin, step, mpp, patch) to place its codes; compress it again"
            )
        cells = np.argwhere(s.tissue)
        codes = s.load(variant)[:, cells[:, 0], cells[:, 1]].T if len(cells) else np.zeros((0, s.code_size), np.float32)
        xy = np.stack([m.origin[0] + cells[:, 1] * m.step[0], m.origin[1] + cells[:, 0] * m.step[1]], 1)
        p0 = float(m.patch_level0[0]) if m.patch_level0 else float(m.step[0]) * m.patch / (m.stride or m.patch)
        slide_mpp = float(m.slide_mpp[0]) if m.slide_mpp else m.mpp * m.patch / p0
        if m.slide_dimensions:
            size = (int(m.slide_dimensions[0]), int(m.slide_dimensions[1]))
        else:
            rows, cols = s.grid_shape
            size = (
                int(np.ceil(m.origin[0] + (cols - 1) * m.step[0] + p0)),
                int(np.ceil(m.origin[1] + (rows - 1) * m.step[1] + p0)),
            )
        item = ExportItem(
            s.slide_id, xy, codes.astype(np.float32), int(m.patch), float(m.mpp), p0, int(m.stride or m.patch),
            slide_mpp, size, m.encoder_name, m.encoder_checksum or identity_checksum({"name": m.encoder_name}),
        )  # fmt: skip
        written += write_bag(item, fmt, out)
    return written
