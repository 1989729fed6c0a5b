"""Pictures a person can look at: tissue overlays, side-by-side panels and grids of tiles."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["save_png", "tissue_overlay", "side_by_side", "image_grid", "pca_rgb", "store_picture"]


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (temp file, then rename)."""
    from PIL import Image

    from nic._outputs import write_atomic

    p = Path(path)
    write_atomic(p, lambda tmp: Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG"))
    return p


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ys = (np.arange(shape[0]) * mask.shape[0] // max(shape[0], 1)).clip(0, mask.shape[0] - 1)
    xs = (np.arange(shape[1]) * mask.shape[1] // max(shape[1], 1)).clip(0, mask.shape[1] - 1)
    return mask[np.ix_(ys, xs)]


def tissue_overlay(thumb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 200, 80)) -> np.ndarray:
    """The thumbnail (H, W, 3) beside a copy with tissue tinted and its outline drawn."""
    from scipy import ndimage as ndi

    if mask.shape != thumb.shape[:2]:
        mask = _resize_nearest(mask, thumb.shape[:2])
    tinted = thumb.astype(np.float32)
    tinted[mask] = 0.6 * tinted[mask] + 0.4 * np.asarray(colour, np.float32)
    edge = mask & ~ndi.binary_erosion(mask)
    tinted[edge] = (255, 0, 0)
    return side_by_side([thumb, tinted.astype(np.uint8)])


def side_by_side(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Place RGB images left to right on white, top-aligned."""
    h = max(im.shape[0] for im in images)
    w = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for im in images:
        rgb = im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=2)
        out[: rgb.shape[0], x : x + rgb.shape[1]] = rgb
        x += rgb.shape[1] + gap
    return out


def image_grid(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Rows of uint8 tiles, each row (N, H, W, 3), as one picture on white: the tiles of a
    row left to right (:func:`side_by_side`), the rows top to bottom, ``gap`` px apart."""
    lines = [side_by_side(list(r), gap) for r in rows]
    out = np.full((sum(x.shape[0] for x in lines) + gap * (len(lines) - 1), max(x.shape[1] for x in lines), 3),
                  255, np.uint8)  # fmt: skip
    y = 0
    for x in lines:
        out[y : y + x.shape[0], : x.shape[1]] = x
        y += x.shape[0] + gap
    return out


def pca_rgb(features: np.ndarray, tissue: np.ndarray, background: int = 255) -> np.ndarray:
    """The first three principal components of the tissue codes as RGB, uint8 (H, W, 3).

    ``features`` is (C, H, W), ``tissue`` (H, W) bool.  Each component is stretched
    between its 1st and 99th percentile over the tissue cells; its sign is fixed so that
    its largest loading is positive (the same store always gives the same picture).
    Background cells are ``background`` (white).
    """
    c, h, w = features.shape
    out = np.full((h, w, 3), background, np.uint8)
    x = features[:, tissue].T.astype(np.float64)  # (n, C)
    if len(x) < 2:
        return out
    x -= x.mean(axis=0)
    vals, vecs = np.linalg.eigh(x.T @ x / (len(x) - 1))
    vecs = vecs[:, np.argsort(vals)[::-1][:3]]
    vecs *= np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])] < 0, -1.0, 1.0)
    pcs = x @ vecs  # (n, k), k = min(3, C)
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    scaled = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    rgb = np.zeros((len(x), 3))
    rgb[:, : scaled.shape[1]] = scaled
    out[tissue] = np.rint(rgb * 255).astype(np.uint8)
    return out


def store_picture(store: str | Path, max_side: int = 1024) -> np.ndarray:
    """A compressed slide's codes (:func:`pca_rgb`, variant 0) beside the slide's thumbnail.

    Each grid cell becomes an ``f`` x ``f`` block, ``f`` chosen so the longer side is at
    most ``max_side`` pixels; the thumbnail is read at the matching um/px (cell um / f), so
    both pictures have the same scale.  The thumbnail is left out (with a log message)
    when the slide file named in the store's attributes is gone.
    """
    from nic.store import open_store

    s = open_store(store)
    feats = s.load(0)
    h, w = s.grid_shape
    f = max(1, min(32, max_side // max(h, w, 1)))
    pic = np.repeat(np.repeat(pca_rgb(feats, s.tissue), f, axis=0), f, axis=1)
    slide_path = Path(s.meta.slide_path)
    if not s.meta.slide_path or not slide_path.is_file():
        logger.info("%s: slide %s not found; showing the codes only", store, slide_path)
        return pic
    from nic.slide import open_slide

    if s.meta.stride is None or s.meta.mpp is None:
        logger.info("%s: no grid attributes; showing the codes only", store)
        return pic
    cell_um = s.meta.stride * s.meta.mpp
    with open_slide(slide_path, mpp=s.meta.slide_mpp) as slide:
        thumb = slide.thumbnail(cell_um / f)
    return side_by_side([thumb, pic])
