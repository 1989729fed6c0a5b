"""Pictures a person can look at: tissue overlays and side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["save_png", "tissue_overlay", "side_by_side"]


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (temp file, then rename)."""
    from PIL import Image

    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
    tmp.replace(p)
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
