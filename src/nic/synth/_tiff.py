"""Pyramidal tiled-TIFF writer that reuses pre-encoded JPEG tiles.

A slide is described by an *entry map*: a (rows, cols) integer array whose cell (r, c) names
the library entry drawn at level-0 tile (r, c) (tiles are 256 x 256 px).  Level 0 is
written by copying each entry's JPEG bytes, without decoding or encoding anything; each
lower level (downsample 2, 4, ...) is composed tile by tile from the entries'
pre-downsampled pixels and encoded once, so no level is ever held in memory whole.

The files are what OpenSlide calls generic tiled TIFF: JPEG compression (YCbCr, 2x2
chroma subsampling, each tile a complete JPEG stream), 256-px tiles, one page per level
in the main IFD chain, resolution tags in centimetres (20,000 px/cm is 0.5 um/px).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TILE", "TileLibrary", "encode_jpeg", "write_pyramid", "level_sizes"]

logger = logging.getLogger(__name__)

#: Tile edge in pixels, at every level.
TILE = 256


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """One complete JPEG stream (YCbCr, 2x2 subsampling) of an RGB uint8 (h, w, 3) array.

    The settings are those tifffile itself uses for JPEG tiles of an RGB page, so the
    bytes fit a page written with ``photometric='rgb', subsampling=(2, 2)``.
    """
    import imagecodecs

    return bytes(
        imagecodecs.jpeg8_encode(
            np.ascontiguousarray(rgb),
            level=quality,
            colorspace="RGB",
            outcolorspace="YCBCR",
            subsampling=(2, 2),
        )
    )


def _halve(rgb: np.ndarray) -> np.ndarray:
    """Area-downsample (..., h, w, 3) uint8 by 2 in h and w (h and w even)."""
    x = rgb.astype(np.uint16)
    s = x[..., 0::2, 0::2, :] + x[..., 1::2, 0::2, :] + x[..., 0::2, 1::2, :] + x[..., 1::2, 1::2, :]
    return ((s + 2) >> 2).astype(np.uint8)


@dataclass
class TileLibrary:
    """Pre-encoded 256-px tiles and their downsampled pixels.

    ``jpeg[i]`` are the level-0 bytes of entry i; ``half[i]`` its pixels downsampled by 2,
    (n, 128, 128, 3) uint8; ``blank[i]`` whether it is background (lower-level tiles made
    only of blank entries reuse one encoded tile).
    """

    jpeg: list[bytes]
    half: np.ndarray
    blank: np.ndarray
    _pyramid: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_tiles(
        cls, tiles: list[np.ndarray], blank: list[bool], quality: int, half: list[np.ndarray] | None = None
    ) -> TileLibrary:
        """Encode RGB uint8 tiles (256, 256, 3) once.

        ``half`` may give the tiles' 2x area downsamples (128, 128, 3) when known.
        """
        if not tiles:
            raise ValueError("a tile library needs at least one tile")
        jpeg = [encode_jpeg(t, quality) for t in tiles]
        halves = np.stack(half) if half is not None else np.stack([_halve(t) for t in tiles])
        return cls(jpeg, halves, np.asarray(blank, bool))

    def __len__(self) -> int:
        return len(self.jpeg)

    def level(self, k: int) -> np.ndarray:
        """Entry pixels downsampled by 2**k, (n, 256 >> k, 256 >> k, 3), for k >= 1."""
        if k not in self._pyramid:
            self._pyramid[k] = self.half if k == 1 else _halve(self.level(k - 1))
        return self._pyramid[k]

    @property
    def sizes(self) -> np.ndarray:
        return np.fromiter((len(b) for b in self.jpeg), np.int64, len(self.jpeg))


def level_sizes(width: int, height: int, min_size: int = 1024) -> list[tuple[int, int]]:
    """(width, height) of every level: halving until the larger side is below ``min_size``."""
    sizes = [(width, height)]
    while max(sizes[-1]) >= min_size and min(sizes[-1]) > 1:
        k = len(sizes)
        sizes.append((-(-width // 2**k), -(-height // 2**k)))
    return sizes


@dataclass
class WriteStats:
    """What :func:`write_pyramid` wrote: file size (bytes), levels (w, h), seconds."""

    path: Path
    bytes: int
    levels: list[tuple[int, int]]
    seconds: float
    encoded_tiles: int


def write_pyramid(
    path: Path,
    entries: np.ndarray,
    library: TileLibrary,
    *,
    mpp: float = 0.5,
    quality: int = 80,
    min_size: int = 1024,
    description: str = "",
) -> WriteStats:
    """Write a pyramidal tiled TIFF whose level-0 tile (r, c) is ``library`` entry ``entries[r, c]``.

    ``entries`` is (rows, cols) int; level 0 is (cols * 256, rows * 256) px at ``mpp``
    um/px.  Memory use is a few tiles plus the library, whatever the slide size.
    """
    import tifffile

    t0 = time.perf_counter()
    rows, cols = entries.shape
    width, height = cols * TILE, rows * TILE
    sizes = level_sizes(width, height, min_size)
    kmax = len(sizes) - 1
    step = 2**kmax
    if step > TILE:
        raise ValueError(f"slide too large for a {len(sizes)}-level pyramid of {TILE}-px tiles")
    # pad the map so every lower-level tile covers whole blocks of level-0 tiles
    background = int(np.flatnonzero(library.blank)[0]) if library.blank.any() else 0
    pr, pc = -(-rows // step) * step, -(-cols // step) * step
    padded = np.full((pr, pc), background, np.int64)
    padded[:rows, :cols] = entries
    level0_bytes = int(library.sizes[entries].sum())
    bigtiff = level0_bytes * 1.5 + 2**24 > 2**31
    res_cm = 1e4 / mpp
    encoded = 0
    common = dict(
        dtype=np.uint8,
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="rgb",
        subsampling=(2, 2),
        resolutionunit="CENTIMETER",
        metadata=None,
    )

    def level0() -> Iterator[bytes]:
        jpeg = library.jpeg
        for r in range(rows):
            for c in range(cols):
                yield jpeg[entries[r, c]]

    def lower(k: int) -> Iterator[bytes]:
        nonlocal encoded
        n = 2**k
        pixels = library.level(k)
        b = TILE // n
        w, h = sizes[k]
        blank_bytes: bytes | None = None
        for tr in range(-(-h // TILE)):
            for tc in range(-(-w // TILE)):
                sub = padded[tr * n : (tr + 1) * n, tc * n : (tc + 1) * n]
                if library.blank[sub].all():
                    if blank_bytes is None:
                        blank_bytes = encode_jpeg(_compose(pixels, np.full_like(sub, background), b), quality)
                    yield blank_bytes
                    continue
                encoded += 1
                yield encode_jpeg(_compose(pixels, sub, b), quality)

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for k, (w, h) in enumerate(sizes):
            data = level0() if k == 0 else lower(k)
            tif.write(
                data,
                shape=(h, w, 3),
                resolution=(res_cm / 2**k, res_cm / 2**k),
                subfiletype=1 if k else 0,
                description=description if k == 0 else None,
                software="nic.synth",
                **common,  # type: ignore[arg-type]
            )
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    logger.info(
        "wrote %s: %dx%d px, %d levels, %.1f MB in %.1f s", path, width, height, len(sizes), size / 1e6, seconds
    )
    return WriteStats(path, size, sizes, seconds, encoded)


def _compose(pixels: np.ndarray, sub: np.ndarray, b: int) -> np.ndarray:
    """A 256-px tile from blocks ``pixels[sub]``: (n, n) entries of (b, b, 3) pixels each."""
    n = sub.shape[0]
    blocks = pixels[sub]  # (n, n, b, b, 3)
    return blocks.transpose(0, 2, 1, 3, 4).reshape(n * b, n * b, 3)
