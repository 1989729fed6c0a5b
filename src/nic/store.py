"""The compressed-slide format: one zarr (v3) group per slide, ``<out>/<slide_id>.zarr``.

- ``features``: float16, (C, H, W), or (8, C, H, W) with the 8 dihedral re-encodings;
  background cells are exactly 0.
- ``tissue``: bool (H, W), which grid cells hold tissue.
- attributes: ``format``, slide path, size and checksum, ``mpp``, ``patch``, ``stride``,
  ``origin`` (level-0 pixels of cell (0, 0)), ``cell_size`` (level-0 pixels per cell
  step, x and y), encoder name and weight checksum, software version, and ``complete``,
  written last.  A store without ``complete: true`` is unfinished: it is rebuilt, never
  read as a result.

Attributes written by ``nic compress`` (:func:`nic.compress.compress_slide`):
``slide_path`` (absolute), ``slide_size_bytes``, ``slide_checksum`` with
``slide_checksum_method`` ("sha256" of the whole file up to 64 MiB, else
"sha256-sampled": size + 16 evenly spaced 1 MiB blocks), ``slide_mpp`` (x, y um/px of
level 0), ``slide_mpp_source``, ``slide_dimensions`` (level-0 width, height);
``mpp`` (um/px of the grid), ``patch`` and ``stride`` (pixels at ``mpp``), ``origin``,
``step`` (= ``cell_size``) and ``patch_level0`` (level-0 pixels, x, y), ``grid_shape``
(rows, cols), ``min_tissue``, ``tissue_threshold``, ``n_tissue``; ``code_size``,
``variants`` (1 or 8) and ``variant_order`` (how variant k was made: a left-right flip
when k >= 4, then ``k % 4`` quarter turns counter-clockwise, as ``np.rot90``),
``encoder_name``, ``encoder_checksum`` (sha256 of the weights, "" for random init),
``encoder_config``; ``nic_version``, ``created``; at completion ``seconds``,
``patches``, ``patches_per_s`` and ``complete``.  The code of cell (row, col) is that of
the ``patch`` x ``patch`` pixels at ``mpp`` whose top-left corner is level-0
``origin + (col, row) * step``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic.errors import StoreError

__all__ = [
    "FORMAT",
    "CompressedSlide",
    "open_store",
    "create_store",
    "mark_complete",
    "is_complete",
    "store_path",
    "slide_id_for",
    "list_stores",
]

FORMAT = "nic-compressed-slide/1"
SUFFIX = ".zarr"
#: Known multi-part slide suffixes stripped whole when deriving a slide id.
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")


def slide_id_for(path: str | Path) -> str:
    """The slide id of a slide file: its name without the format suffix."""
    name = Path(path).name
    for suf in _MULTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def store_path(out_dir: str | Path, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}{SUFFIX}"


@dataclass
class CompressedSlide:
    """A finished store opened for reading (arrays are read lazily from disk)."""

    path: Path
    features: Any  # zarr array, (C, H, W) or (8, C, H, W), float16
    tissue: np.ndarray  # (H, W) bool
    attrs: dict[str, Any]

    @property
    def slide_id(self) -> str:
        return self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else self.path.name

    @property
    def variants(self) -> int:
        """8 when the store holds the dihedral re-encodings, else 1."""
        return int(self.features.shape[0]) if self.features.ndim == 4 else 1

    @property
    def code_size(self) -> int:
        return int(self.features.shape[-3])

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.features.shape[-2]), int(self.features.shape[-1])

    def load(self, variant: int | None = 0) -> np.ndarray:
        """Features as a float32 array: (C, H, W) for one variant, (V, C, H, W) for ``None``."""
        f = self.features
        if f.ndim == 3:
            a = f[...]
            return a[None].astype(np.float32) if variant is None else a.astype(np.float32)
        return (f[...] if variant is None else f[variant]).astype(np.float32)


def _open_group(path: Path, mode: str = "r") -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as e:  # zarr raises several types for missing or damaged groups
        raise StoreError(f"{path}: not a readable compressed-slide store ({e}); run `nic compress` again") from e


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a store whose ``complete`` attribute is true."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return False
    try:
        return bool(_open_group(p).attrs.get("complete", False))
    except StoreError:
        return False


def open_store(path: str | Path) -> CompressedSlide:
    """Open a finished store; an unfinished or foreign one is a :class:`StoreError`."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such compressed slide; run `nic compress` first")
    g = _open_group(p)
    attrs = dict(g.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{p}: not a nic compressed slide (format {attrs.get('format')!r}, expected {FORMAT!r})")
    if not attrs.get("complete", False):
        raise StoreError(f"{p}: the store is unfinished (compression was interrupted); run `nic compress` again")
    return CompressedSlide(p, g["features"], np.asarray(g["tissue"][...], dtype=bool), attrs)


def create_store(
    path: str | Path,
    code_size: int,
    grid_shape: tuple[int, int],
    tissue: np.ndarray,
    attrs: Mapping[str, Any],
    variants: int = 1,
    chunk: int = 64,
) -> Any:
    """Create an empty, unfinished store (features all 0) and return its ``features`` array.

    An existing store at ``path`` is removed first; callers decide whether that is allowed.
    """
    import zarr

    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    h, w = grid_shape
    if tissue.shape != (h, w):
        raise ValueError(f"tissue mask {tissue.shape} does not match the grid {grid_shape}")
    g = zarr.open_group(str(p), mode="w", zarr_format=3)
    g.attrs.update({"format": FORMAT, **dict(attrs), "complete": False})
    shape: tuple[int, ...] = (code_size, h, w)
    chunks: tuple[int, ...] = (code_size, chunk, chunk)
    if variants > 1:
        shape, chunks = (variants, *shape), (1, *chunks)
    feats = g.create_array("features", shape=shape, chunks=chunks, dtype="float16", fill_value=0)
    t = g.create_array("tissue", shape=(h, w), chunks=(max(h, 1), max(w, 1)), dtype="bool", fill_value=False)
    t[...] = tissue
    return feats


def mark_complete(path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``complete: true`` (after any ``extra`` attributes): the last write of a store."""
    g = _open_group(Path(path), mode="r+")
    if extra:
        g.attrs.update(dict(extra))
    g.attrs["complete"] = True


def list_stores(folder: str | Path) -> list[Path]:
    """The ``*.zarr`` stores in ``folder``, sorted by name (finished or not)."""
    f = Path(folder)
    if not f.is_dir():
        raise StoreError(f"{f}: no such folder of compressed slides")
    return sorted(p for p in f.iterdir() if p.name.endswith(SUFFIX) and p.is_dir())
