"""Labels, stores and crops: everything the slide-level learner reads.

- :class:`LabelSpec` names the labels CSV and its columns; :func:`load_cohort` joins it
  with a folder of compressed slides into a :class:`Cohort` (one row per patient, several
  slides per patient allowed).
- :class:`SlideSource` reads crops of one compressed slide (grid cells, zero-padded).
- :func:`crop_weights` / :func:`sample_crop_origin`: crops sampled in proportion to the
  distance from background; ``dihedral`` (from :mod:`nic.dihedral`): the 8 rotations/flips.

Grid coordinates are cells of the compressed grid (row ``y``, column ``x``), never pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from nic._missing import MISSING_CLASS, MISSING_NUMBER
from nic.dihedral import dihedral, dihedral_inverse
from nic.errors import DataError, OptionError
from nic.store import EncoderIdentity, check_same_encoder, list_stores, open_store, slide_id_for, store_id

__all__ = [
    "TASKS",
    "Task",
    "LabelSpec",
    "Cohort",
    "SlideSource",
    "load_cohort",
    "open_sources",
    "read_labels",
    "read_slide_table",
    "crop_weights",
    "sample_crop_origin",
    "dihedral",
    "dihedral_inverse",
]

logger = logging.getLogger(__name__)

Task = Literal["regression", "binary", "multiclass", "survival"]
TASKS: tuple[str, ...] = ("regression", "binary", "multiclass", "survival")


@dataclass(frozen=True)
class LabelSpec:
    """Where the labels are and which columns to use.

    ``target`` names the label column for regression/binary/multiclass; ``time`` and
    ``event`` (1 = event observed, 0 = censored) name the survival columns.
    """

    labels: Path
    task: Task
    target: str | None = None
    time: str | None = None
    event: str | None = None
    slide_column: str = "slide"
    patient_column: str = "patient"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`OptionError` when the columns named do not fit the task (no file is read)."""
        if self.task not in TASKS:
            raise OptionError(f"`task` {self.task!r} is not a task; choose one of {', '.join(TASKS)}")
        if self.task == "survival":
            if not self.time or not self.event:
                raise OptionError("task 'survival' needs `time` and `event` (columns of the labels CSV)")
        elif not self.target:
            raise OptionError(f"task {self.task!r} needs `target` (a column of the labels CSV)")


@dataclass
class Cohort:
    """Patients with labels and the stores of their slides.

    ``y``: (P,) float32 targets (regression), int64 class indices (binary/multiclass) or
    event indicators (survival); ``time``: (P,) float64 survival times (survival only).
    ``slide_patient[s]`` is the patient index of slide ``s``.
    """

    task: Task
    patients: list[str]
    y: np.ndarray
    slide_ids: list[str]
    store_paths: list[Path]
    slide_patient: np.ndarray
    time: np.ndarray | None = None
    classes: list[str] | None = None

    @property
    def n_outputs(self) -> int:
        """Model outputs: one, or one per class for multiclass."""
        return len(self.classes) if self.task == "multiclass" and self.classes else 1

    def strata(self) -> np.ndarray:
        """(P,) int labels to stratify folds by: class, event, or quintile of the target."""
        if self.task == "regression":
            qs = np.quantile(self.y, [0.2, 0.4, 0.6, 0.8])
            return np.searchsorted(qs, self.y, side="right").astype(np.int64)
        return self.y.astype(np.int64)

    def slides_of(self, patient_idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Slide indices of the given patients (in slide order)."""
        return np.flatnonzero(np.isin(self.slide_patient, np.asarray(patient_idx)))


def _label_columns(spec: LabelSpec) -> list[str]:
    return [spec.time, spec.event] if spec.task == "survival" else [spec.target]  # type: ignore[list-item]


def read_labels(spec: LabelSpec, store_ids: Collection[str] = ()):  # -> pandas.DataFrame
    """The rows of the labels CSV with a label, checked (see :func:`read_slide_table`).

    Columns ``slide``, ``slide_id`` (resolved against ``store_ids``), ``patient`` and the
    label columns: strings for ids and class labels, numbers for survival and regression
    labels.  Rows with a missing label are left out with a warning that counts them.
    """
    spec.check()
    return _labelled(_read_label_table(spec, store_ids), spec)


def _read_label_table(spec: LabelSpec, store_ids: Collection[str]):  # -> DataFrame
    """Every row of the labels CSV, read and checked, labelled or not."""
    cols = _label_columns(spec)
    numeric = cols if spec.task in ("survival", "regression") else []
    return read_slide_table(spec.labels, spec.slide_column, spec.patient_column, store_ids, cols, numeric)


def _labelled(df, spec: LabelSpec):  # -> DataFrame
    """The rows of ``df`` (:func:`_read_label_table`) with a label; survival labels checked."""
    path, label_cols = spec.labels, _label_columns(spec)
    na = df[label_cols].isna().any(axis=1)
    if na.any():
        logger.warning("%s: %d of %d rows have a missing label and are left out", path, int(na.sum()), len(df))
        df = df[~na]
    if spec.task == "survival":
        if not df[spec.event].isin([0, 1]).all():
            raise DataError(f"{path}: event column {spec.event!r} must hold 0 (censored) or 1 (event)")
        if (df[spec.time] < 0).any():
            raise DataError(f"{path}: time column {spec.time!r} has negative values")
    if df.empty:
        raise DataError(f"{path}: no rows with labels left")
    return df.reset_index(drop=True)


def _rows(mask) -> str:  # mask: a boolean Series over the frame of read_slide_table
    """CSV line numbers (the header is line 1) of the first rows where ``mask`` holds."""
    rows = [int(r) for r in mask.index[mask.to_numpy()] + 2]
    return ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")


#: True/False as pandas and R write them, read as 1/0 in a numeric column (an event)
_BOOLEAN = {v: "1" for v in ("True", "TRUE", "true")} | {v: "0" for v in ("False", "FALSE", "false")}


def read_slide_table(
    path: str | Path,
    slide_column: str,
    patient_column: str,
    store_ids: Collection[str] = (),
    columns: Sequence[str] = (),
    numeric: Sequence[str] = (),
):  # -> pandas.DataFrame
    """Read a CSV of slides, their patients and ``columns``; every CSV row, in file order.

    Returns the columns ``slide`` (as written), ``slide_id`` (resolved against
    ``store_ids``: an id, a slide path or a store path), ``patient`` and ``columns``, the
    row index being the CSV line minus 2.  Ids, patients and class labels are stripped of
    surrounding whitespace; in ids only an empty cell is missing, in class labels also the
    usual markers (``NA``, ``nan``, ``NULL``, ... but not ``None``, which may name a class);
    ``numeric`` columns are numbers, with those markers (``None`` too) as missing values and
    ``True``/``False`` as 1/0 (an event column as pandas or R write it).  :class:`DataError`
    for a missing column, an empty slide or patient cell, one slide on two rows (also when
    written two ways, such as a path and an id), and a numeric cell that is not a finite
    number.  ``patient_column`` may be ``slide_column`` (one slide per patient).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file; pass a CSV with columns {slide_column},{patient_column},...")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several parser errors
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    wanted = [slide_column, patient_column, *columns]
    missing = [c for c in dict.fromkeys(wanted) if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {', '.join(map(str, raw.columns))}"
            " (name them with `slide_column`, `patient_column`, `target`, `time` or `event`)"
        )
    df = pd.DataFrame({"slide": raw[slide_column], "patient": raw[patient_column]})
    for c in columns:
        df[c] = raw[c]
    for c in df.columns:
        df[c] = df[c].str.strip()
        if c in numeric:  # True/False (pandas, R's TRUE/FALSE) as 1/0: an event column
            df[c] = df[c].mask(df[c].isin(MISSING_NUMBER)).replace(_BOOLEAN)
        elif c in columns:  # a class column: R's NA and the like are missing, a class may be called "None"
            df[c] = df[c].mask(df[c].isin(MISSING_CLASS))
        else:  # ids: only an empty cell is missing
            df[c] = df[c].mask(df[c] == "")
    empty = df["slide"].isna() | df["patient"].isna()
    if empty.any():
        raise DataError(f"{path}: empty slide or patient cell in row(s) {_rows(empty)}; fill them in or drop the rows")
    for c in numeric:
        conv = pd.to_numeric(df[c], errors="coerce")
        bad = df[c].notna() & ~np.isfinite(conv.to_numpy(np.float64))
        if bad.any():
            i = bad.idxmax()
            raise DataError(
                f"{path}: column {c!r} must be {'numeric' if np.isnan(conv[i]) else 'finite'}; found {df[c][i]!r} in"
                f" row {i + 2} (leave the cell empty for a missing label)"
            )
        df[c] = conv
    df.insert(1, "slide_id", _resolve_ids(df["slide"].tolist(), set(store_ids)))
    if patient_column == slide_column:
        df["patient"] = df["slide_id"]
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        sid = df["slide_id"][dup].iloc[0]
        same = df[df["slide_id"] == sid]
        how = ", ".join(f"row {i + 2} {v!r}" for i, v in same["slide"].items())
        more = int(df["slide_id"][dup].nunique()) - 1
        raise DataError(
            f"{path}: slide {sid!r} is listed more than once ({how})"
            f"{f' and {more} more slide(s) too' if more else ''}; keep one row per slide"
        )
    return df


def _resolve_ids(values: Sequence[str], store_ids: set[str]) -> list[str]:
    """Slide column entries (ids, slide paths or store paths) -> slide ids."""
    out = []
    for v in values:
        v = str(v).strip()
        out.append(v if v in store_ids else slide_id_for(v))
    return out


def load_cohort(compressed: str | Path, spec: LabelSpec, require_all_stores: bool = True) -> Cohort:
    """Join the labels CSV with the stores in ``compressed`` (one ``<slide_id>.zarr`` each).

    A CSV slide without a store is a :class:`DataError`, and so is a store without a CSV row
    when ``require_all_stores``; both list the offending slides.  Labels must agree across the
    slides of one patient.
    """
    spec.check()
    stores = {store_id(p): p for p in list_stores(compressed)}
    table = _read_label_table(spec, set(stores))
    df = _labelled(table, spec)
    no_store = sorted(set(df["slide_id"]) - set(stores))
    if no_store:
        raise DataError(
            f"{len(no_store)} slide(s) in {spec.labels} have no store in {compressed}: "
            f"{', '.join(no_store[:10])}{' ...' if len(no_store) > 10 else ''}; compress them or drop their rows"
        )
    if require_all_stores:
        extra = sorted(set(stores) - set(table["slide_id"]))
        if extra:
            raise DataError(
                f"{len(extra)} store(s) in {compressed} have no row in {spec.labels}: "
                f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}; add their labels or move them out"
            )
    df = _drop_tissueless(df, stores, compressed)
    label_cols = _label_columns(spec)
    per_patient = df.groupby("patient", sort=True)[label_cols].nunique()
    conflict = per_patient.index[(per_patient > 1).any(axis=1)].tolist()
    if conflict:
        raise DataError(f"{spec.labels}: patient(s) with different labels on their slides: {', '.join(conflict[:10])}")
    first = df.groupby("patient", sort=True)[label_cols].first()
    patients = [str(p) for p in first.index]
    pindex = {p: i for i, p in enumerate(patients)}
    classes: list[str] | None = None
    time = None
    if spec.task == "regression":
        y = first[spec.target].to_numpy(np.float32)
    elif spec.task == "survival":
        y = first[spec.event].to_numpy(np.int64)
        time = first[spec.time].to_numpy(np.float64)
        if y.sum() < 2:
            raise DataError(f"{spec.labels}: fewer than 2 events in column {spec.event!r}; survival needs events")
    else:
        raw = first[spec.target].astype(str).to_numpy()
        classes = sorted(set(raw), key=_class_key)
        if spec.task == "binary" and len(classes) != 2:
            raise DataError(f"{spec.labels}: binary target {spec.target!r} must have 2 values; found {classes[:10]}")
        if len(classes) < 2:
            raise DataError(f"{spec.labels}: target {spec.target!r} has a single class {classes}")
        cidx = {c: i for i, c in enumerate(classes)}
        y = np.array([cidx[v] for v in raw], dtype=np.int64)
    df = df.sort_values("slide_id").reset_index(drop=True)
    logger.info("cohort: %d patients, %d slides, task %s", len(patients), len(df), spec.task)
    return Cohort(
        task=spec.task,
        patients=patients,
        y=y,
        slide_ids=df["slide_id"].tolist(),
        store_paths=[stores[s] for s in df["slide_id"]],
        slide_patient=np.array([pindex[p] for p in df["patient"]], dtype=np.int64),
        time=time,
        classes=classes,
    )


def _drop_tissueless(df, stores: dict[str, Path], compressed: str | Path):  # -> DataFrame
    """Rows whose store holds tissue (damaged stores raise here); the rest are left out
    with a warning, and so are patients left without a slide."""
    empty = [sid for sid in df["slide_id"] if not open_store(stores[sid]).has_tissue]
    if not empty:
        return df
    logger.warning(
        "%d slide(s) in %s have no tissue cells and are left out: %s%s (check the slides, or compress them with a "
        "lower `min_tissue`)", len(empty), compressed, ", ".join(empty[:10]), " ..." if len(empty) > 10 else "",
    )  # fmt: skip
    kept = df[~df["slide_id"].isin(empty)]
    lost = sorted(set(df["patient"]) - set(kept["patient"]))
    if lost:
        logger.warning("%d patient(s) have no slide with tissue and are left out: %s", len(lost), ", ".join(lost[:10]))
    if kept.empty:
        raise DataError(f"{compressed}: no store of a labelled slide holds tissue; check the slides and `nic compress`")
    return kept.reset_index(drop=True)


def _class_key(v: str) -> tuple[int, float | str]:
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)


# ----------------------------------------------------------------------------- crops


def crop_weights(tissue: np.ndarray) -> np.ndarray:
    """(H, W) float64 probabilities of each cell as a crop centre.

    Proportional to the Euclidean distance (in cells) from the nearest background cell,
    the grid border counting as background; uniform over the grid when there is no tissue.
    """
    from scipy.ndimage import distance_transform_edt

    t = np.asarray(tissue, dtype=bool)
    if not t.any():
        return np.full(t.shape, 1.0 / t.size)
    d = distance_transform_edt(np.pad(t, 1))[1:-1, 1:-1]
    return d / d.sum()


def _origin_1d(center: int, crop: int, extent: int, rng: np.random.Generator | None) -> int:
    if extent >= crop:
        return int(np.clip(center - crop // 2, 0, extent - crop))
    slack = crop - extent  # the slide is padded: it sits at a random or centred offset
    return -int(rng.integers(0, slack + 1)) if rng is not None else -(slack // 2)


def sample_crop_origin(
    weights: np.ndarray, crop: int, rng: np.random.Generator | None, center: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Top-left cell ``(y0, x0)`` of a ``crop`` x ``crop`` window.

    The centre is drawn from ``weights`` (see :func:`crop_weights`) unless given; the window
    is shifted to lie inside the grid along every axis the grid is at least ``crop`` long.
    Along a shorter axis the origin is negative: the slide is zero-padded, placed at a
    random offset (``rng`` given) or centred (``rng`` None).
    """
    h, w = weights.shape
    if center is None:
        if rng is None:
            raise ValueError("either rng or center is needed")
        flat = int(rng.choice(weights.size, p=weights.ravel()))
        center = divmod(flat, w)
    return _origin_1d(center[0], crop, h, rng), _origin_1d(center[1], crop, w, rng)


@dataclass
class SlideSource:
    """Reads crops of one compressed slide; features are cached in memory once read.

    ``weights``: the crop-centre probabilities, (H, W).
    """

    path: Path
    tissue: np.ndarray
    variants: int
    code_size: int
    grid_shape: tuple[int, int]
    weights: np.ndarray
    cache: bool = True
    _features: object = field(default=None, repr=False)
    encoder: EncoderIdentity = field(default_factory=EncoderIdentity)
    _array: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, cache: bool = True) -> SlideSource:
        s = open_store(path)
        weights = crop_weights(s.tissue)
        return cls(
            Path(path), s.tissue, s.variants, s.code_size, s.grid_shape, weights, cache, s.features, encoder=s.encoder
        )

    @property
    def slide_id(self) -> str:
        return store_id(self.path)

    def _read(self, variant: int, ys: slice, xs: slice) -> np.ndarray:
        if self.cache and self._array is None:
            a = np.asarray(self._features[...])  # type: ignore[index]
            self._array = a if a.ndim == 4 else a[None]  # float16 in memory, float32 per crop
        if self._array is not None:
            return self._array[variant, :, ys, xs]
        f = self._features
        return np.asarray(f[variant, :, ys, xs] if f.ndim == 4 else f[:, ys, xs])  # type: ignore[union-attr,index]

    def crop(self, y0: int, x0: int, size: int, variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Features (C, size, size) float32 and tissue (size, size) bool of a window.

        The window starts at cell ``(y0, x0)`` (may be negative); cells outside the grid are 0.
        """
        h, w = self.grid_shape
        feats = np.zeros((self.code_size, size, size), np.float32)
        mask = np.zeros((size, size), bool)
        ya, yb = max(y0, 0), min(y0 + size, h)
        xa, xb = max(x0, 0), min(x0 + size, w)
        if ya < yb and xa < xb:
            feats[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read(variant, slice(ya, yb), slice(xa, xb))
            mask[ya - y0 : yb - y0, xa - x0 : xb - x0] = self.tissue[ya:yb, xa:xb]
        return feats, mask


def code_stats(
    sources: Sequence[SlideSource], max_cells_per_slide: int = 4096, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64, (C,)) of the tissue codes (variant 0).

    At most ``max_cells_per_slide`` tissue cells per slide (a seeded sample) enter, so huge
    slides do not dominate and the cost stays bounded.
    """
    rng = np.random.default_rng(seed)
    n = 0
    s1 = s2 = None
    for src in sources:
        ys, xs = np.nonzero(src.tissue)
        if len(ys) == 0:
            continue
        if len(ys) > max_cells_per_slide:
            pick = rng.choice(len(ys), max_cells_per_slide, replace=False)
            ys, xs = ys[pick], xs[pick]
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        block = src._read(0, slice(y0, y1), slice(x0, x1)).astype(np.float64)
        v = block[:, ys - y0, xs - x0]  # (C, n)
        s1 = v.sum(1) if s1 is None else s1 + v.sum(1)
        s2 = (v * v).sum(1) if s2 is None else s2 + (v * v).sum(1)
        n += v.shape[1]
    if s1 is None or s2 is None:
        c = sources[0].code_size if sources else 0
        return np.zeros(c), np.ones(c)
    mean = s1 / n
    return mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))


#: keep every slide's codes in memory when they fit in this many bytes (float16 on disk)
CACHE_BYTES = 4 << 30


def open_sources(
    paths: Sequence[Path], cache_bytes: int = CACHE_BYTES, folder: str | Path | None = None
) -> list[SlideSource]:
    """Open every store (see :class:`SlideSource`); all must hold codes of one encoder.

    Stores of different encoders, um/px, patch sizes or variant counts are a
    :class:`DataError` naming the odd ones (``folder`` names where they are).  The codes
    are cached in memory after the first read when all stores together hold at most
    ``cache_bytes`` (float16); otherwise every crop is read from disk (zarr chunks).
    """
    srcs = [SlideSource.open(p) for p in paths]
    if not srcs:
        return srcs
    check_same_encoder(srcs, folder if folder is not None else Path(srcs[0].path).parent, DataError)
    total = sum(int(np.prod(s._features.shape)) * 2 for s in srcs)  # type: ignore[attr-defined]
    if total > cache_bytes:
        logger.info("codes take %.1f GB > %.1f GB: reading crops from disk", total / 1e9, cache_bytes / 1e9)
        for s in srcs:
            s.cache = False
    return srcs
