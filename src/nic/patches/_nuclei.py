"""Nucleus annotations -> a regression patch dataset of nuclei counts or densities.

Reads the formats users have: Aperio/MoNuSeg XML (one ``<Region>`` polygon per nucleus,
``.xml`` or ``.xml.gz``; the root's ``MicronsPerPixel`` gives um/px) and binary or
instance masks (PNG/TIFF; connected components of a binary mask are nuclei, the labels of
an instance mask are).  A nucleus belongs to a patch when its centroid lies inside it.

:func:`nuclei_patch_dataset` cuts each image into patches that cover ``patch_size``
pixels at ``mpp`` um/px, saves them resized to ``patch_size`` and writes a CSV
``path,label,group,count`` (``label``: count, or density in nuclei per mm^2; ``group``:
the source image, so splits keep an image on one side).
"""

from __future__ import annotations

import csv
import gzip
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from nic.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "NucleiAnnotation",
    "read_nuclei_xml",
    "read_nuclei_mask",
    "read_nuclei",
    "polygon_centroid",
    "count_in_windows",
    "nuclei_patch_dataset",
    "pair_images_annotations",
]

_XML_SUFFIXES = (".xml", ".xml.gz")
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class NucleiAnnotation:
    """Nucleus centroids of one image: ``centroids`` (M, 2) as (x, y) in level pixels.

    ``mpp`` is the um/px the file states (``None``: not stated); ``source`` the file;
    ``shape`` the (height, width) of a mask in pixels (``None`` for an XML).
    """

    centroids: np.ndarray
    mpp: float | None
    source: str
    shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.centroids)


def _strip_suffixes(path: Path) -> str:
    name = path.name
    for s in (".xml.gz", ".xml", *_MASK_SUFFIXES, ".jpg", ".jpeg"):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def polygon_centroid(xy: np.ndarray) -> np.ndarray:
    """Area centroid (x, y) of a closed polygon (K, 2); the vertex mean if it has no area."""
    x, y = xy[:, 0], xy[:, 1]
    xs, ys = np.roll(x, -1), np.roll(y, -1)
    cross = x * ys - xs * y
    area = cross.sum() / 2
    if abs(area) < 1e-9:
        return xy.mean(0)
    return np.array([((x + xs) * cross).sum() / (6 * area), ((y + ys) * cross).sum() / (6 * area)])


def read_nuclei_xml(path: str | Path) -> tuple[list[np.ndarray], float | None]:
    """Polygons of an Aperio/MoNuSeg XML file (``.xml`` or ``.xml.gz``).

    Returns (polygons, mpp): one (K, 2) float array of (x, y) vertices in pixels per
    ``<Region>`` with at least one vertex, and the root's ``MicronsPerPixel`` (or ``None``).
    """
    path = Path(path)
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            root = ET.parse(f).getroot()
    except (OSError, ET.ParseError, EOFError) as e:
        raise DataError(f"{path}: not a readable annotation XML ({e})") from e
    mpp: float | None = None
    text = root.get("MicronsPerPixel")
    if text:
        try:
            mpp = float(text) or None
        except ValueError:
            mpp = None
    polygons = []
    for region in root.iter("Region"):
        verts = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        arr = np.asarray(verts, dtype=np.float64).reshape(-1, 2)
        arr = arr[np.isfinite(arr).all(1)]
        if len(arr):
            polygons.append(arr)
    if root.find(".//Region") is None:
        raise DataError(f"{path}: no <Region> elements; expected Aperio/MoNuSeg XML with one polygon per nucleus")
    return polygons, mpp


def read_nuclei_mask(path: str | Path) -> np.ndarray:
    """Nucleus centroids (M, 2) as (x, y) pixels from a binary or instance mask image.

    A mask with values {0, v} is binary (nuclei = 8-connected components); more distinct
    values are instance labels: a nucleus is one 8-connected piece of one non-zero label, so
    touching nuclei with their own labels stay apart and so do separate nuclei sharing a
    label (a mask coloured by nucleus type).  A colour mask's label is its RGB colour
    (background black); alpha is ignored.
    """
    return _read_mask(path)[0]


def _read_mask(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_nuclei_mask`'s centroids and the mask's (height, width)."""
    from PIL import Image, UnidentifiedImageError
    from scipy import ndimage

    try:
        with Image.open(path) as im:
            m = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read the mask ({e})") from e
    if m.ndim == 3:
        if m.shape[-1] >= 3:  # one integer per colour: nuclei of different colours stay apart
            rgb = m[..., :3].astype(np.uint32)
            m = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        else:
            m = m[..., 0]
    shape = (int(m.shape[0]), int(m.shape[1]))
    labels, n = ndimage.label(m > 0, structure=np.ones((3, 3), bool))
    if len(np.unique(m)) > 2:
        # a nucleus is one connected piece of one value: touching nuclei of an instance mask
        # stay apart, and so do separate nuclei of one colour in a mask coloured by type
        fg = labels > 0
        key = labels[fg].astype(np.int64) * (int(m.max()) + 1) + m[fg].astype(np.int64)
        _, inverse = np.unique(key, return_inverse=True)
        labels = np.zeros(m.shape, np.int64)
        labels[fg] = inverse + 1
        n = int(inverse.max()) + 1 if len(inverse) else 0
    if n == 0:
        return np.zeros((0, 2)), shape
    cy_cx = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, np.arange(1, n + 1)))
    return cy_cx[:, ::-1].astype(np.float64), shape


def read_nuclei(path: str | Path) -> NucleiAnnotation:
    """Centroids from an XML (polygon area centroids) or a mask file, by suffix."""
    path = Path(path)
    low = path.name.lower()
    if low.endswith(_XML_SUFFIXES):
        polygons, mpp = read_nuclei_xml(path)
        cents = np.asarray([polygon_centroid(p) for p in polygons]).reshape(-1, 2)
        return NucleiAnnotation(cents, mpp, str(path))
    if low.endswith(_MASK_SUFFIXES):
        centroids, shape = _read_mask(path)
        return NucleiAnnotation(centroids, None, str(path), shape)
    raise DataError(f"{path}: unknown annotation type; give .xml/.xml.gz (Aperio/MoNuSeg) or a mask .png/.tif")


def count_in_windows(centroids: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Number of centroids (M, 2) (x, y) inside each square window [x0, x0+size) x [y0, y0+size).

    ``x0``, ``y0`` (K,) are window corners in the same pixels; returns int64 (K,).
    """
    c = np.asarray(centroids, np.float64).reshape(-1, 2)
    x0 = np.asarray(x0, np.float64)[:, None]
    y0 = np.asarray(y0, np.float64)[:, None]
    inside = (c[None, :, 0] >= x0) & (c[None, :, 0] < x0 + size) & (c[None, :, 1] >= y0) & (c[None, :, 1] < y0 + size)
    return inside.sum(1).astype(np.int64)


def pair_images_annotations(images: str | Path, annotations: str | Path) -> list[tuple[Path, Path]]:
    """Match images to annotation files by name stem (``a.tif`` <-> ``a.xml.gz`` / ``a.png``).

    Raises :class:`DataError` when an image has no annotation.
    """
    images, annotations = Path(images), Path(annotations)
    for d in (images, annotations):
        if not d.is_dir():
            raise DataError(f"{d} is not a folder; give the image folder and the annotation folder")
    ann = {}
    for p in sorted(annotations.iterdir()):
        if p.name.lower().endswith(_XML_SUFFIXES + _MASK_SUFFIXES):
            ann.setdefault(_strip_suffixes(p), p)
    pairs = []
    for p in sorted(images.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        stem = _strip_suffixes(p)
        if stem not in ann:
            raise DataError(f"{p}: no annotation named {stem}.xml/.xml.gz/.png in {annotations}")
        pairs.append((p, ann[stem]))
    if not pairs:
        raise DataError(f"{images}: no images")
    return pairs


def _in_image_pixels(ann: NucleiAnnotation, image: Path, shape: tuple[int, int], mpp: float) -> np.ndarray:
    """``ann``'s centroids in the pixels of ``image`` ((height, width) ``shape`` at ``mpp`` um/px).

    A mask must have the image's shape; an XML's coordinates, at the um/px it states, are
    scaled to ``mpp`` when that differs by more than 10% (an image resized after it was
    annotated; a smaller difference is a rounded um/px).  A :class:`DataError` when more
    than 10% of the nuclei fall outside the image (annotations of another image or scale).
    """
    h, w = shape
    if ann.shape is not None and ann.shape != shape:
        raise DataError(
            f"{ann.source}: the mask is {ann.shape[1]}x{ann.shape[0]} px, its image {image.name} {w}x{h} px; "
            "give a mask of the image's size"
        )
    c = ann.centroids
    if ann.mpp and abs(ann.mpp / mpp - 1) > 0.1:
        logger.info("%s: coordinates at %g um/px scaled to the image's %g um/px", ann.source, ann.mpp, mpp)
        c = c * (ann.mpp / mpp)
    outside = int((~((c[:, 0] >= 0) & (c[:, 0] < w) & (c[:, 1] >= 0) & (c[:, 1] < h))).sum())
    if outside > 0.1 * len(c):
        stated = f"at {ann.mpp} um/px, " if ann.mpp else ""
        raise DataError(
            f"{ann.source}: {outside} of {len(c)} nuclei lie outside its {w}x{h} px image {image.name} "
            f"({stated}image at {mpp} um/px); pair each image with its own annotation, and give a resized "
            "image's um/px as `source_mpp`"
        )
    if outside:
        logger.warning("%s: %d of %d nuclei lie outside image %s", ann.source, outside, len(c), image.name)
    return c


def nuclei_patch_dataset(
    pairs: Sequence[tuple[str | Path, str | Path]],
    out: str | Path,
    patch_size: int = 128,
    mpp: float = 0.5,
    stride: int | None = None,
    source_mpp: float | None = None,
    target: Literal["count", "density"] = "density",
    fallback_mpp: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Cut annotated images into patches and write a regression dataset; returns the CSV.

    ``pairs``: (image, annotation) files.  Each patch covers ``patch_size`` pixels at
    ``mpp`` um/px (``stride`` in the same pixels, default ``patch_size``): a window of
    ``patch_size * mpp / source_mpp`` image pixels, saved resized to ``patch_size`` as
    ``out/patches/<image>_<y>_<x>.png``.  ``source_mpp`` (um/px of the images) wins over
    the annotation's ``MicronsPerPixel``: an XML's coordinates, at the um/px it states, are
    scaled to the images' when the two differ by more than 10% (images resized after they
    were annotated); ``fallback_mpp`` is used where a file states none.  A mask must have its
    image's size; annotations with more than 10% of their nuclei outside the image are a
    :class:`DataError`.
    The CSV ``out/nuclei.csv`` has columns ``path,label,group,count``: ``label`` is the count
    or the density (nuclei per mm^2).  It is written last (through a temporary file), so a
    folder without it is unfinished.
    ``out`` must be new or empty; with ``overwrite``, a nuclei dataset there (``nuclei.csv``
    and ``patches/``, nothing else) is replaced once the new one is whole: the dataset is
    built in a hidden sibling folder (:func:`nic._outputs.staged_folder`), so a failure
    leaves ``out`` as it was.
    """
    from nic._outputs import staged_folder
    from nic.errors import check_choice, check_int, check_number

    check_choice("target", target, ("count", "density"))
    check_int("patch_size", patch_size, 8)
    check_number("mpp", mpp, 0, float("inf"), low_open=True, high_open=True)
    if stride is not None:
        check_int("stride", stride, 0)
    for name, value in (("source_mpp", source_mpp), ("fallback_mpp", fallback_mpp)):
        if value is not None:
            check_number(name, value, 0, float("inf"), low_open=True, high_open=True)
    pairs = list(pairs)
    with staged_folder(out, replace=overwrite, is_ours=_is_nuclei_dataset) as stage:
        csv_path = _write_nuclei_dataset(pairs, stage, patch_size, mpp, int(stride or patch_size), source_mpp,
                                         target, fallback_mpp)  # fmt: skip
    csv_path = Path(out) / csv_path.name
    logger.info("wrote %s", csv_path)
    return csv_path


def _is_nuclei_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds a nuclei dataset and nothing else (so replacing it loses nothing else)."""
    from nic._outputs import holds_only

    return (folder / "nuclei.csv").exists() and holds_only(folder, ("nuclei.csv", "patches"))


def _write_nuclei_dataset(
    pairs: Sequence[tuple[str | Path, str | Path]],
    out: Path,
    patch_size: int,
    mpp: float,
    stride: int,
    source_mpp: float | None,
    target: str,
    fallback_mpp: float | None,
) -> Path:
    """:func:`nuclei_patch_dataset`'s work, into the new folder ``out``."""
    from PIL import Image

    (out / "patches").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, str, int]] = []
    for image_path, ann_path in pairs:
        image_path = Path(image_path)
        ann = read_nuclei(ann_path)
        smpp = source_mpp or ann.mpp or fallback_mpp
        if not smpp:
            raise DataError(
                f"{ann_path}: states no MicronsPerPixel; pass the images' um/px (`source_mpp` or `fallback_mpp`)"
            )
        try:
            with Image.open(image_path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DataError(f"{image_path}: cannot read the image ({e})") from e
        w, h = img.size
        centroids = _in_image_pixels(ann, image_path, (h, w), smpp)
        win = patch_size * mpp / smpp  # window side in image pixels
        step = stride * mpp / smpp
        if win > min(w, h):
            raise DataError(
                f"{image_path}: {w}x{h} px at {smpp} um/px is smaller than one {patch_size} px patch at {mpp} um/px"
            )
        nx, ny = int((w - win) // step) + 1, int((h - win) // step) + 1
        xs = np.arange(nx) * step
        ys = np.arange(ny) * step
        gx, gy = np.meshgrid(xs, ys)
        counts = count_in_windows(centroids, gx.ravel(), gy.ravel(), win)
        area_mm2 = (patch_size * mpp / 1000.0) ** 2
        stem = _strip_suffixes(image_path)
        for (x0, y0), n in zip(zip(gx.ravel(), gy.ravel()), counts):
            box = (float(x0), float(y0), float(x0 + win), float(y0 + win))
            patch = img.resize((patch_size, patch_size), Image.BILINEAR, box=box, reducing_gap=None)
            name = f"patches/{stem}_{int(round(y0))}_{int(round(x0))}.png"
            patch.save(out / name)
            label = float(n) if target == "count" else float(n) / area_mm2
            rows.append((name, label, stem, int(n)))
        logger.info("%s: %d nuclei, %d patches", image_path.name, len(ann), len(counts))
    csv_path = out / "nuclei.csv"
    tmp = csv_path.with_name(csv_path.name + ".part")
    with open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "label", "group", "count"])
        for name, label, group, n in rows:
            wr.writerow([name, f"{label:.6g}", group, n])
    tmp.replace(csv_path)
    return csv_path
