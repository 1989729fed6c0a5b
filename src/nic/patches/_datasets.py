"""Labelled patch datasets: class folders or CSV tables, read into a :class:`PatchTable`.

A dataset is one of

- a folder of class folders (``root/<class>/*.png|jpg|tif``): classification (a
  ``labels.csv`` inside the folder is read instead, as it may hold groups);
- a CSV ``path,label[,group]`` (paths relative to the CSV's folder): classification when
  ``label`` holds names or integers, regression when it holds floats.

A *dataset spec* names a dataset and its kind in one string, ``KIND:PATH[?key=value&...]``
with KIND ``class`` or ``regr`` (or no prefix: inferred), and keys ``mpp`` (um/px of the
patches; they are then resampled to the encoder's um/px), ``group`` (group column),
``label`` / ``path`` (column names; a folder of class folders has none, so they need its
``labels.csv``); other keys are refused.  :class:`PatchDataset` serves the patches as uint8
tensors at the encoder's patch size.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np

from nic._missing import MISSING_NUMBER
from nic.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Kind",
    "DatasetSpec",
    "PatchTable",
    "PatchDataset",
    "parse_dataset_spec",
    "read_patch_table",
    "load_patch",
    "group_split",
    "IMAGE_SUFFIXES",
]

Kind = Literal["class", "regr"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_GROUP_COLUMNS = ("group", "source_group")  # looked for when no group column is named
_SPEC_KEYS = ("mpp", "group", "label", "path")
_INTEGER = re.compile(r"[+-]?\d+")
_WHOLE_FLOAT = re.compile(r"([+-]?\d+)\.0*")
_KIND_ALIASES = {
    "class": "class",
    "cls": "class",
    "classification": "class",
    "regr": "regr",
    "reg": "regr",
    "regression": "regr",
}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lies and how to read it (see the module docstring for the string form).

    ``kind`` is ``None`` when it is to be inferred; ``mpp`` is the patches' um/px
    (``None``: unknown, patches are resized to the patch size); ``group``/``label``/``path``
    name CSV columns; ``options`` keeps the keys the caller allowed (e.g. a task's ``weight``).
    """

    path: Path
    kind: Kind | None = None
    mpp: float | None = None
    group: str | None = None
    label: str = "label"
    path_col: str = "path"
    options: dict[str, str] = field(default_factory=dict)


def pop_positive(opts: dict[str, str], key: str, where: str, unit: str = "") -> float | None:
    """``opts.pop(key)`` as a positive number (``None`` when absent); a :class:`DataError`
    naming ``where`` (e.g. the spec it came from) otherwise."""
    if key not in opts:
        return None
    text, unit = opts.pop(key), f" ({unit})" if unit else ""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {key} must be a number{unit}, got {text!r}") from None
    if not value > 0:
        raise DataError(f"{where}: {key} must be positive{unit}, got {value}")
    return value


def parse_dataset_spec(spec: str | Path, extra: Collection[str] = ()) -> DatasetSpec:
    """``[class:|regr:]PATH[?mpp=0.5&group=COL&label=COL&path=COL]`` -> :class:`DatasetSpec`.

    ``extra`` names the further keys the caller reads from ``options`` (a task's
    ``weight``); any other key is a :class:`DataError` (a misspelt ``grp`` or ``MPP``
    would otherwise be dropped without a word).
    """
    text = str(spec).strip()
    if not text:
        raise DataError("empty dataset spec; write KIND:PATH, e.g. class:/data/labels.csv or regr:/data/nuclei.csv")
    kind: Kind | None = None
    head, sep, rest = text.partition(":")
    if sep and head.lower() in _KIND_ALIASES:
        kind = _KIND_ALIASES[head.lower()]  # type: ignore[assignment]
        text = rest
    elif sep and len(head) > 1 and "/" not in head and "\\" not in head:
        raise DataError(f"dataset spec {spec!r}: unknown kind {head!r}; use class:PATH or regr:PATH")
    base, _, query = text.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - {*_SPEC_KEYS, *extra})
    if unknown:
        raise DataError(
            f"dataset spec {spec!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join([*_SPEC_KEYS, *extra])}"
        )
    mpp = pop_positive(opts, "mpp", f"dataset spec {spec!r}", "um/px")
    if not base:
        raise DataError(f"dataset spec {spec!r} has no path; write KIND:PATH")
    return DatasetSpec(
        path=Path(base).expanduser(),
        kind=kind,
        mpp=mpp,
        group=opts.pop("group", None) or None,
        label=opts.pop("label", "label"),
        path_col=opts.pop("path", "path"),
        options=opts,
    )


@dataclass
class PatchTable:
    """A labelled patch dataset: N image files with one label each.

    ``labels`` is int64 class indices into ``classes`` (classification) or float32 targets
    (regression, ``classes == ()``); ``groups`` (N,) holds group names (``None``: every
    patch is its own group); ``mpp`` is the patches' um/px when known.
    """

    paths: list[Path]
    labels: np.ndarray
    kind: Kind
    classes: tuple[str, ...] = ()
    groups: np.ndarray | None = None
    mpp: float | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_outputs(self) -> int:
        """Head width: number of classes, or 1 for regression."""
        return len(self.classes) if self.kind == "class" else 1

    def subset(self, index: Sequence[int] | np.ndarray) -> PatchTable:
        """The rows ``index`` as a new table (same classes and mpp)."""
        idx = np.asarray(index, dtype=np.int64)
        return PatchTable(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            kind=self.kind,
            classes=self.classes,
            groups=None if self.groups is None else self.groups[idx],
            mpp=self.mpp,
            source=self.source,
        )

    def describe(self) -> str:
        """One line: size, kind, classes or target range, groups."""
        if self.kind == "class":
            counts = np.bincount(self.labels, minlength=len(self.classes))
            what = ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts))
        else:
            what = f"target {float(self.labels.min()):.3g}..{float(self.labels.max()):.3g}"
        groups = f", {len(np.unique(self.groups))} groups" if self.groups is not None else ""
        return f"{len(self)} patches ({self.kind}: {what}{groups})"


def _read_folder(root: Path, kind: Kind | None) -> PatchTable:
    if kind == "regr":
        raise DataError(
            f"{root}: a folder of class folders is a classification dataset; use class:{root} or a CSV for regression"
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders inside; expected {root}/<class>/<image>.png or a CSV path,label")
    files = {c: sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in folders}
    classes = [c for c in folders if files[c]]
    empty = [c for c in folders if not files[c]]
    if len(classes) < 2:
        held = f"only {classes[0]!r} holds" if classes else "none holds"
        raise DataError(
            f"{root}: of the class folders {folders} {held} images ({', '.join(IMAGE_SUFFIXES)}); "
            "a classifier needs two or more classes with images"
        )
    if empty:
        logger.warning("%s: class folder(s) %s hold no images and are left out", root, ", ".join(empty))
    paths = [p for c in classes for p in files[c]]
    labels = [i for i, c in enumerate(classes) for _ in files[c]]
    return PatchTable(paths, np.asarray(labels, np.int64), "class", tuple(classes), None, None, str(root))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (names stripped) and the rows of a CSV (``.tsv``: tab-separated) with their line numbers.

    A row with more fields than the header is a :class:`DataError`; a short one lacks the
    trailing columns (callers check the ones they need).
    """
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel starts its UTF-8 CSVs with a BOM
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, r) for r in reader if r]  # blank lines skipped, as csv.DictReader does
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV ({e})") from e
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: column(s) {', '.join(map(repr, dup))} appear twice in the header; rename one")
    for line, r in rows:
        if len(r) > len(header):
            raise DataError(
                f"{path}: line {line} has {len(r)} fields, the header {len(header)}; quote fields that hold a "
                f"{'tab' if delimiter == chr(9) else 'comma'}"
            )
    return header, [(line, dict(zip(header, r))) for line, r in rows]


def _class_name(text: str) -> str:
    """A class label as written, but a whole number written as a float (``1.0``, as pandas
    writes an integer column with a gap) as the integer (``1``); ``01`` stays ``01``."""
    m = _WHOLE_FLOAT.fullmatch(text)
    return m.group(1) if m else text


def _read_csv(path: Path, spec: DatasetSpec) -> PatchTable:
    header, rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; expected a header path,label[,group] and one row per patch")
    for need in (spec.path_col, spec.label):
        if need not in header:
            raise DataError(
                f"{path}: no column {need!r} (columns: {', '.join(header)}); name it with ?path=COL / ?label=COL"
            )
    group_col = spec.group
    if group_col is not None and group_col not in header:
        raise DataError(f"{path}: no group column {group_col!r} (columns: {', '.join(header)})")
    if group_col is None:
        group_col = next((c for c in _GROUP_COLUMNS if c in header), None)
        if group_col:
            logger.info("%s: splitting by group column %r", path, group_col)
    for line, r in rows:
        short = [c for c in (spec.path_col, spec.label, group_col) if c and c not in r]
        if short:
            raise DataError(f"{path}: line {line} has no {short[0]!r} field; give every row {', '.join(header)}")
    lines = [line for line, _ in rows]
    raw = [r[spec.label].strip() for _, r in rows]
    if any(v == "" for v in raw):
        line = lines[raw.index("")]
        raise DataError(f"{path}: empty {spec.label!r} on line {line}; every patch needs a label")
    kind = spec.kind
    if kind != "class":
        # a numeric column with a missing-number marker (NA, nan, null, ...) is neither classes nor targets
        marked = [i for i, v in enumerate(raw) if v in MISSING_NUMBER]
        rest = [v for v in raw if v not in MISSING_NUMBER]
        if marked and (kind == "regr" or (rest and all(_is_float(v) for v in rest))):
            i = marked[0]
            raise DataError(
                f"{path}: {spec.label!r} on line {lines[i]} is {raw[i]!r}, a missing number; every patch needs a "
                f"label: drop the row{'' if kind else f' (or write class:{path} if {raw[i]!r} is a class)'}"
            )
    numeric = all(_is_float(v) for v in raw)
    if kind is None:
        # Floats that are not all whole numbers are a regression target; names and integers are classes.
        kind = "regr" if numeric and not all(float(v).is_integer() for v in raw) else "class"
        logger.info("%s: label column %r read as %s", path, spec.label, "regression" if kind == "regr" else "classes")
    if kind == "regr":
        if not numeric:
            i = next(i for i, v in enumerate(raw) if not _is_float(v))
            raise DataError(
                f"{path}: regression label {spec.label!r} holds {raw[i]!r} on line {lines[i]}, not a number; "
                f"use class:{path} for classes"
            )
        labels = np.asarray([float(v) for v in raw], np.float32)
        if not np.isfinite(labels).all():
            i = int(np.flatnonzero(~np.isfinite(labels))[0])
            raise DataError(f"{path}: regression label {spec.label!r} is {raw[i]!r} on line {lines[i]}; drop the row")
        classes: tuple[str, ...] = ()
    else:
        names = [_class_name(v) for v in raw]
        integers = all(_INTEGER.fullmatch(c) for c in names)
        # integer classes in numeric order (2 before 10), the same number written two ways apart
        classes = tuple(sorted(set(names), key=(lambda c: (int(c), c)) if integers else None))
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([lookup[c] for c in names], np.int64)
        if len(classes) < 2:
            raise DataError(
                f"{path}: label {spec.label!r} has one class only ({classes[0]!r}); a classifier needs two or more"
            )
    base = path.parent
    paths = [
        (base / r[spec.path_col].strip())
        if not Path(r[spec.path_col].strip()).is_absolute()
        else Path(r[spec.path_col].strip())
        for _, r in rows
    ]
    groups = None
    if group_col:
        groups = np.asarray([r[group_col].strip() for _, r in rows], dtype=object)
        if any(g == "" for g in groups):
            line = lines[list(groups).index("")]
            raise DataError(f"{path}: empty group in column {group_col!r} on line {line}; give every row a group")
    return PatchTable(paths, labels, kind, classes, groups, spec.mpp, str(path))


def read_patch_table(spec: str | Path | DatasetSpec, check_files: bool = True) -> PatchTable:
    """Read a dataset given as a spec string, a path or a :class:`DatasetSpec`.

    ``check_files`` raises :class:`DataError` naming the first missing image.
    """
    if not isinstance(spec, DatasetSpec):
        spec = parse_dataset_spec(spec)
    path = spec.path
    if path.is_dir():
        csv_inside = path / "labels.csv"
        if csv_inside.is_file():
            # A labels.csv beside the class folders wins: it may carry the groups.
            logger.info("%s: reading %s", path, csv_inside.name)
            table = _read_csv(csv_inside, spec)
        else:
            named = {"group": spec.group, "label": spec.label, "path": spec.path_col}
            given = [f"{k} {v!r}" for k, v in named.items() if v not in (None, k)]
            if given:
                raise DataError(
                    f"{path}: a folder of class folders has no columns to read {', '.join(given)} from; give a "
                    f"CSV path,label,group instead (a {csv_inside.name} in the folder is read in place of its folders)"
                )
            table = _read_folder(path, spec.kind)
            table.mpp = spec.mpp
    elif path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise DataError(f"{path}: not a CSV; give a CSV path,label[,group] or a folder of class folders")
        table = _read_csv(path, spec)
    else:
        raise DataError(f"dataset {path} does not exist; give a CSV path,label[,group] or a folder of class folders")
    if check_files:
        missing = [p for p in table.paths if not p.is_file()]
        if missing:
            raise DataError(
                f"{table.source}: {len(missing)} image file(s) missing, e.g. {missing[0]}; "
                "fix the paths (relative to the CSV)"
            )
    logger.info("dataset %s: %s", table.source, table.describe())
    return table


# ----------------------------------------------------------------------------- reading pixels


def load_patch(path: str | Path, patch_size: int, scale: float | None = None) -> np.ndarray:
    """Read an image as uint8 RGB (patch_size, patch_size, 3).

    ``scale`` (dataset um/px / encoder um/px) resizes the image by that factor and then
    centre-crops (or reflect-pads) to ``patch_size`` pixels, so a pixel covers the
    encoder's um/px.  ``scale=None`` (um/px unknown) resizes the shorter side to
    ``patch_size`` and centre-crops the longer one.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if scale is None:
                f = patch_size / min(w, h)
            else:
                f = float(scale)
            nw, nh = max(1, round(w * f)), max(1, round(h * f))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None if f > 0.5 else 2.0)
            a = np.array(im)  # writable copy (torch refuses read-only arrays)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e
    return _crop_or_pad(a, patch_size)


def _crop_or_pad(a: np.ndarray, p: int) -> np.ndarray:
    """Centre-crop or reflect-pad an (H, W, 3) image to (p, p, 3)."""
    h, w = a.shape[:2]
    if h < p or w < p:
        ph, pw = max(0, p - h), max(0, p - w)
        a = np.pad(
            a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge"
        )
        h, w = a.shape[:2]
    y, x = (h - p) // 2, (w - p) // 2
    return np.ascontiguousarray(a[y : y + p, x : x + p])


class PatchDataset:
    """A torch-style dataset over a :class:`PatchTable` at an encoder's patch size and um/px.

    Item ``i`` is ``(image, label)``: ``image`` a uint8 tensor (3, patch_size, patch_size),
    ``label`` a float32 scalar tensor (class index or target).  With ``cache`` the resized
    patches are kept in memory after the first read (``None``: cache when they take less
    than 2 GiB).
    """

    def __init__(self, table: PatchTable, patch_size: int, mpp: float | None = None, cache: bool | None = None) -> None:
        self.table = table
        self.patch_size = int(patch_size)
        self.scale = None if (table.mpp is None or mpp is None) else float(table.mpp) / float(mpp)
        if cache is None:
            cache = len(table) * self.patch_size**2 * 3 < 2 * 1024**3
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.table)

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` as uint8 (P, P, 3)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        a = load_patch(self.table.paths[i], self.patch_size, self.scale)
        if self._cache is not None:
            self._cache[i] = a
        return a

    def read_all(self) -> np.ndarray:
        """All patches as uint8 (N, P, P, 3)."""
        out = np.empty((len(self), self.patch_size, self.patch_size, 3), np.uint8)
        for i in range(len(self)):
            out[i] = self.read(i)
        return out

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        a = self.read(int(i))
        return torch.from_numpy(a).permute(2, 0, 1), torch.tensor(float(self.table.labels[i]), dtype=torch.float32)


# ----------------------------------------------------------------------------- splitting


def warn_ungrouped(table: PatchTable, where: str, held_out: str) -> None:
    """Warn, as ``where``, when ``table`` has no groups: a split of it then goes patch by
    patch, so ``held_out`` (validation, test) patches may come from a training patch's source."""
    if table.groups is None:
        logger.warning("%s: no group column; %s patches may share a source with training ones", where, held_out)


def group_split(
    n: int,
    test_fraction: float,
    groups: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..n-1 into (train, test) so that no group is on both sides.

    About ``test_fraction`` of the groups go to test.  With class ``labels`` and groups
    that each hold one class, the groups of each class are split separately (stratified).
    Without ``groups`` every index is its own group.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    g = np.arange(n).astype(str).astype(object) if groups is None else np.asarray(groups, dtype=object)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} samples")
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(g.astype(str), return_inverse=True)
    strata: list[np.ndarray] = [np.arange(len(uniq))]
    if labels is not None:
        lab = np.asarray(labels)
        first = np.full(len(uniq), -1, dtype=np.int64)
        pure = True
        for gi in range(len(uniq)):
            vals = np.unique(lab[inv == gi])
            pure &= len(vals) == 1
            first[gi] = int(vals[0]) if np.issubdtype(vals.dtype, np.integer) else -1
        if pure and (first >= 0).all():
            strata = [np.flatnonzero(first == c) for c in np.unique(first)]
    test_groups: list[int] = []
    for s in strata:
        s = rng.permutation(s)
        k = int(round(len(s) * test_fraction))
        k = min(max(k, 1), len(s) - 1) if len(s) > 1 else 0
        test_groups += list(s[:k])
    if not test_groups:
        raise DataError(
            f"cannot split {len(uniq)} group(s) into train and test; give more groups or a separate test set"
        )
    is_test = np.isin(inv, np.asarray(test_groups))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
