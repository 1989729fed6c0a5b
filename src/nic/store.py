"""The compressed-slide format: one zarr (v3) group per slide, ``<out>/<slide_id>.zarr``.

- ``features``: float16, (C, H, W), or (8, C, H, W) with the 8 dihedral re-encodings;
  background cells are exactly 0.
- ``tissue``: bool (H, W), which grid cells hold tissue.
- attributes: ``format``, slide path, size and checksum, ``mpp``, ``patch``, ``stride``,
  ``origin`` (level-0 pixels of cell (0, 0)), ``cell_size`` (level-0 pixels per cell
  step, x and y), encoder name and weight checksum, software version, and ``complete``,
  written last.  A store without ``complete: true`` is unfinished: it is rebuilt, never
  read as a result.  A complete store whose chunk files no longer match its ``chunks``
  record is damaged: reading it is refused, ``nic compress`` rebuilds it.

:class:`StoreAttrs` is the one typed view of these attributes (write, read, compare);
:class:`EncoderIdentity` is the part that says which codes a store holds, and what the
learning stages compare across stores and against a trained run.

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
``encoder_config``, ``random_init`` (and its ``random_seed``); ``nic_version``,
``created``; at completion ``seconds``, ``patches``, ``patches_per_s``, ``chunks`` (the
integrity record: size and CRC-32 of every chunk file written) and ``complete``.  The
code of cell (row, col) is that of the ``patch`` x ``patch`` pixels at ``mpp`` whose
top-left corner is level-0 ``origin + (col, row) * step``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nic.errors import StoreError

__all__ = [
    "FORMAT",
    "CompressedSlide",
    "EncoderIdentity",
    "StoreAttrs",
    "encoder_settings_sha256",
    "open_store",
    "create_store",
    "building_store",
    "mark_complete",
    "is_complete",
    "verify_store",
    "store_path",
    "store_id",
    "slide_id_for",
    "list_stores",
    "check_same_encoder",
]

logger = logging.getLogger(__name__)

FORMAT = "nic-compressed-slide/1"
SUFFIX = ".zarr"
#: Known multi-part slide suffixes stripped whole when deriving a slide id.
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")
#: The arrays of a store whose chunk files the integrity record covers.
_ARRAYS = ("features", "tissue")


def slide_id_for(path: str | Path) -> str:
    """The slide id of a slide file: its name without the format suffix."""
    name = Path(path).name
    for suf in _MULTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def store_path(out_dir: str | Path, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}{SUFFIX}"


def store_id(path: str | Path) -> str:
    """The slide id of a store path: its folder name without ``.zarr``."""
    path = Path(path)
    return path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name


# ----------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class EncoderIdentity:
    """Which codes a store holds: two stores can be learnt from together only when equal.

    ``checksum`` is the sha256 of the encoder's weights ("" for a random initialisation,
    which ``random_seed`` then identifies); ``mpp`` and ``patch`` are the grid's um/px and
    patch side in pixels; ``variants`` is 8 for dihedral stores, else 1; ``settings`` is
    :func:`encoder_settings_sha256` of the encoder's config (the same weights with another
    normalisation or pooling give other codes), None where not recorded (runs of older
    versions): then it is not compared.
    """

    name: str = ""
    checksum: str = ""
    mpp: float | None = None
    patch: int | None = None
    code_size: int | None = None
    variants: int = 1
    random_init: bool = False
    random_seed: int | None = None
    settings: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EncoderIdentity:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def diff(self, other: EncoderIdentity) -> list[str]:
        """What differs, as ``"field X (not Y)"`` phrases (empty when equal); checksums are
        shortened to their first 12 hex digits."""
        labels = {"name": "encoder", "checksum": "weights sha256", "mpp": "um/px", "patch": "patch px",
                  "code_size": "code size", "variants": "variants", "random_init": "random init",
                  "random_seed": "random seed",
                  "settings": "settings sha256 (normalisation, architecture options)"}  # fmt: skip
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "settings" and (a is None or b is None):
                continue
            if a != b:
                if f.name in ("checksum", "settings"):
                    a, b = a[:12], b[:12]
                out.append(f"{labels[f.name]} {a!r} (not {b!r})")
        return out

    def describe(self) -> str:
        """One line for messages: name, weights, um/px, patch, code size, variants."""
        if self.random_init:
            weights = "random init" + (f" seed {self.random_seed}" if self.random_seed is not None else "")
        else:
            weights = f"weights {self.checksum[:12]}" if self.checksum else "no weight checksum"
        parts = [weights]
        if self.mpp is not None:
            parts.append(f"{self.mpp:g} um/px")
        if self.patch is not None:
            parts.append(f"{self.patch} px")
        if self.code_size is not None:
            parts.append(f"code size {self.code_size}")
        if self.variants == 8:
            parts.append("8 dihedral variants")
        return f"{self.name or 'an unnamed encoder'} ({', '.join(parts)})"


def encoder_settings_sha256(config: Mapping[str, Any] | None) -> str | None:
    """sha256 of what in an encoder's recorded config (``EncoderConfig.to_json()``) decides
    its codes besides the weights: everything but its display ``name``.  None for None."""
    if config is None:
        return None
    import hashlib
    import json

    text = json.dumps({k: v for k, v in config.items() if k != "name"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _pair(v: Any, kind: type = float) -> tuple[Any, Any] | None:
    return None if v is None else (kind(v[0]), kind(v[1]))


@dataclass(frozen=True)
class StoreAttrs:
    """The attributes of a compressed-slide store, typed (units as in the module docstring).

    Every field has a default so stores written by hand (tests, planted cohorts) and by
    older versions read back; keys this class does not know are kept in ``extra``.
    """

    # the slide
    slide_path: str = ""
    slide_size_bytes: int | None = None
    slide_checksum: str = ""
    slide_checksum_method: str = ""
    slide_mpp: tuple[float, float] | None = None
    slide_mpp_source: str = ""
    slide_dimensions: tuple[int, int] | None = None
    # the grid (origin, step, patch_level0: level-0 pixels, x and y; patch, stride: px at mpp)
    mpp: float | None = None
    patch: int | None = None
    stride: int | None = None
    origin: tuple[float, float] | None = None
    step: tuple[float, float] | None = None
    patch_level0: tuple[float, float] | None = None
    grid_shape: tuple[int, int] | None = None
    min_tissue: float | None = None
    tissue_threshold: float | None = None
    n_tissue: int | None = None
    # the encoder
    code_size: int | None = None
    variants: int = 1
    variant_order: str = ""
    encoder_name: str = ""
    encoder_checksum: str = ""
    encoder_config: dict[str, Any] | None = None
    random_init: bool = False
    random_seed: int | None = None
    # the run
    nic_version: str = ""
    created: str = ""
    seconds: float | None = None
    patches: int | None = None
    patches_per_s: float | None = None
    chunks: dict[str, list[int]] | None = None
    complete: bool = False
    format: str = ""  #: FORMAT in every store nic writes (create_store sets it)
    extra: dict[str, Any] = field(default_factory=dict)

    _PAIRS = {"slide_mpp": float, "slide_dimensions": int, "origin": float, "step": float,
              "patch_level0": float, "grid_shape": int}  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StoreAttrs:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        for k, kind in cls._PAIRS.items():
            if kw.get(k) is not None:
                kw[k] = _pair(kw[k], kind)
        extra = {k: v for k, v in d.items() if k not in known and k != "cell_size"}
        return cls(**kw, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready attributes; ``cell_size`` is written as an alias of ``step``."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        if self.step is not None:
            d["cell_size"] = list(self.step)
        d.update(self.extra)
        return d

    @property
    def encoder(self) -> EncoderIdentity:
        return EncoderIdentity(self.encoder_name, self.encoder_checksum, self.mpp, self.patch, self.code_size,
                               self.variants, bool(self.random_init), self.random_seed,
                               encoder_settings_sha256(self.encoder_config))  # fmt: skip

    def diff(self, want: Mapping[str, Any]) -> list[str]:
        """``"key X (this run: Y)"`` for every key of ``want`` whose value here differs."""
        have = self.to_json()
        return [f"{k} {have.get(k)!r} (this run: {v!r})" for k, v in want.items() if have.get(k) != v]


# ----------------------------------------------------------------------------- reading


@dataclass
class CompressedSlide:
    """A finished store opened for reading (arrays are read lazily from disk)."""

    path: Path
    features: Any  # zarr array, (C, H, W) or (8, C, H, W), float16
    tissue: np.ndarray  # (H, W) bool
    meta: StoreAttrs

    @property
    def attrs(self) -> dict[str, Any]:
        """The attributes as written (JSON)."""
        return self.meta.to_json()

    @property
    def slide_id(self) -> str:
        return store_id(self.path)

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

    @property
    def encoder(self) -> EncoderIdentity:
        """The store's encoder identity, with shapes taken from the arrays themselves."""
        from dataclasses import replace

        return replace(self.meta.encoder, code_size=self.code_size, variants=self.variants)

    @property
    def has_tissue(self) -> bool:
        return bool(self.tissue.any())

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


def _chunk_files(path: Path) -> Iterable[tuple[str, Path]]:
    """(key, file) of every chunk file of the store's arrays: ``features/c/0/0/0`` etc."""
    for name in _ARRAYS:
        root = path / name
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name != "zarr.json":
                yield f.relative_to(path).as_posix(), f


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def chunk_record(path: str | Path) -> dict[str, list[int]]:
    """``{key: [size in bytes, CRC-32]}`` of every chunk file a store holds now."""
    return {k: [f.stat().st_size, _crc(f)] for k, f in _chunk_files(Path(path))}


def verify_store(path: str | Path, meta: StoreAttrs | None = None, deep: bool = False) -> list[str]:
    """What is wrong with a complete store's chunk files against its ``chunks`` record.

    Checks that every recorded chunk file exists with its recorded size and that no
    unrecorded one appeared; ``deep`` also compares CRC-32 checksums (reads every byte).
    Returns one phrase per problem (empty: intact).  A store written before the record
    existed cannot be checked and passes.
    """
    p = Path(path)
    if meta is None:
        meta = StoreAttrs.from_json(dict(_open_group(p).attrs))
    if meta.chunks is None:
        return []
    problems: list[str] = []
    present = dict(_chunk_files(p))
    for key, (size, crc) in meta.chunks.items():
        f = present.pop(key, None)
        if f is None:
            problems.append(f"chunk {key} is missing")
            continue
        actual = f.stat().st_size
        if actual != size:
            problems.append(f"chunk {key} has {actual} bytes (recorded {size})")
        elif deep and _crc(f) != crc:
            problems.append(f"chunk {key} changed (CRC-32 differs)")
    problems += [f"chunk {key} was not written by nic" for key in present]
    return problems


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a store whose ``complete`` attribute is true (intact or not)."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return False
    try:
        return bool(_open_group(p).attrs.get("complete", False))
    except StoreError:
        return False


Verify = Literal["size", "deep", "none"]


def open_store(path: str | Path, verify: Verify = "size") -> CompressedSlide:
    """Open a finished store; an unfinished, damaged or foreign one is a :class:`StoreError`.

    ``verify``: "size" checks that every recorded chunk file is there with its size (a
    ``stat`` per chunk), "deep" also its CRC-32 (reads everything), "none" skips both.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such compressed slide; run `nic compress` first")
    g = _open_group(p)
    meta = StoreAttrs.from_json(dict(g.attrs))
    if meta.format != FORMAT:
        raise StoreError(f"{p}: not a nic compressed slide (format {meta.format!r}, expected {FORMAT!r})")
    if not meta.complete:
        raise StoreError(f"{p}: the store is unfinished (compression was interrupted); run `nic compress` again")
    if verify != "none":
        problems = verify_store(p, meta, deep=verify == "deep")
        if problems:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise StoreError(
                f"{p}: the store is damaged ({problems[0]}{more}); run `nic compress` again on its slide "
                "into the same output folder to rebuild it"
            )
    if meta.chunks is None:
        logger.debug("%s: written before chunk records; its chunks cannot be verified", p)
    try:
        tissue = np.asarray(g["tissue"][...], dtype=bool)
        features = g["features"]
    except Exception as e:  # zarr/numcodecs raise several types for unreadable chunks
        raise StoreError(f"{p}: the store is damaged ({e}); run `nic compress` again on its slide to rebuild it") from e
    return CompressedSlide(p, features, tissue, meta)


# ----------------------------------------------------------------------------- writing


def create_store(
    path: str | Path,
    code_size: int,
    grid_shape: tuple[int, int],
    tissue: np.ndarray,
    attrs: StoreAttrs | Mapping[str, Any],
    variants: int = 1,
    chunk: int = 64,
    in_new_folder: bool = False,
) -> Any:
    """Create an empty, unfinished store (features all 0) and return its ``features`` array.

    An existing store at ``path`` is removed first; callers decide whether that is allowed.
    ``in_new_folder``: ``path`` is an empty folder made for the store (a staged one, see
    :func:`nic._outputs.staged_folder`), kept as it is.
    """
    import zarr

    p = Path(path)
    if p.exists() and not in_new_folder:
        shutil.rmtree(p)
    h, w = grid_shape
    if tissue.shape != (h, w):
        raise ValueError(f"tissue mask {tissue.shape} does not match the grid {grid_shape}")
    d = attrs.to_json() if isinstance(attrs, StoreAttrs) else dict(attrs)
    g = zarr.open_group(str(p), mode="a" if in_new_folder else "w", zarr_format=3)
    g.attrs.update({**d, "format": FORMAT, "complete": False})
    shape: tuple[int, ...] = (code_size, h, w)
    chunks: tuple[int, ...] = (code_size, chunk, chunk)
    if variants > 1:
        shape, chunks = (variants, *shape), (1, *chunks)
    feats = g.create_array("features", shape=shape, chunks=chunks, dtype="float16", fill_value=0)
    t = g.create_array("tissue", shape=(h, w), chunks=(max(h, 1), max(w, 1)), dtype="bool", fill_value=False)
    t[...] = tissue
    return feats


@contextlib.contextmanager
def building_store(path: str | Path) -> Iterator[tuple[Path, bool]]:
    """``(where, staged)``: where to build the store ``path``, for :func:`create_store`
    (``in_new_folder=staged``) and :func:`mark_complete`.

    Without a complete store at ``path`` that is ``path`` itself (an unfinished store there
    is rebuilt).  A complete one is replaced only by a whole one: the new store is built in
    a hidden sibling folder that takes its place on a clean exit
    (:func:`nic._outputs.staged_folder`), so a failure or an interruption leaves it as it was.
    """
    from nic._outputs import remove_dead_partials, staged_folder

    p = Path(path)
    if not is_complete(p):
        if p.parent.is_dir():
            remove_dead_partials(p)  # a store a killed swap had moved aside goes back first
        if not is_complete(p):
            yield p, False
            return
    with staged_folder(p, replace=True, is_ours=is_complete) as stage:  # it clears such leftovers itself
        yield stage, True


def mark_complete(path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Record the chunk files, then write ``complete: true``: the last write of a store."""
    g = _open_group(Path(path), mode="r+")
    g.attrs.update({**dict(extra or {}), "chunks": chunk_record(path)})
    g.attrs["complete"] = True


def list_stores(folder: str | Path) -> list[Path]:
    """The ``*.zarr`` stores in ``folder``, sorted by name (finished or not)."""
    f = Path(folder)
    if not f.is_dir():
        raise StoreError(f"{f}: no such folder of compressed slides")
    return sorted(p for p in f.iterdir() if p.name.endswith(SUFFIX) and p.is_dir())


def check_same_encoder(
    stores: Iterable[Any], folder: str | Path, error: type[Exception] = StoreError
) -> EncoderIdentity:
    """The one encoder identity of ``stores`` (anything with ``encoder`` and ``slide_id``,
    e.g. :class:`CompressedSlide`); ``error`` naming the odd stores otherwise.

    The identity most stores share is taken as the folder's; the message lists the
    stores that differ from it and how (first ten).
    """
    groups: dict[EncoderIdentity, list[str]] = {}
    for s in stores:
        groups.setdefault(s.encoder, []).append(s.slide_id)
    if not groups:
        raise error(f"{folder}: no compressed slides")
    main = max(groups, key=lambda k: len(groups[k]))
    if len(groups) == 1:
        return main
    odd = [(ident, ids) for ident, ids in groups.items() if ident != main]
    n_odd = sum(len(ids) for _, ids in odd)
    parts = [
        f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}: {'; '.join(ident.diff(main))}" for ident, ids in odd
    ]
    raise error(
        f"{folder}: {n_odd} of {n_odd + len(groups[main])} stores were made with another encoder or settings than the "
        f"rest ({main.describe()}): {' | '.join(parts[:10])}; compress every slide with one encoder and settings"
    )
