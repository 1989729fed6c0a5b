"""Pixel sources behind :class:`nic.slide.Slide`.

A reader knows a list of levels and returns RGB uint8 pixels of one level; areas
outside the level are white.  Three readers:

- :class:`OpenSlideReader`: every format OpenSlide 4 reads.
- :class:`TiffTileReader`: the fast path for TIFF-based slides.  It reads the stored
  compressed tiles with ``os.pread`` and decodes them with imagecodecs (through
  tifffile's per-page decoder, which applies the JPEG tables, colour space and
  predictor), keeping a small cache of decoded tiles.
- :class:`ImageReader`: small plain images (PNG, JPEG, strip TIFF) held in memory.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

WHITE = 255


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in its own pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


class Reader(Protocol):
    levels: list[Level]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of ``level`` (level coordinates) as (h, w, 3) uint8."""
        ...

    def close(self) -> None: ...


def _paste(out: np.ndarray, src: np.ndarray, x: int, y: int) -> None:
    """Paste ``src`` whose top-left is at (x, y) of ``out``, clipping to ``out``."""
    h, w = out.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + src.shape[1], w), min(y + src.shape[0], h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = src[y0 - y : y1 - y, x0 - x : x1 - x]


class OpenSlideReader:
    """Pixels through ``openslide.OpenSlide.read_region``, composed on white."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(handle.level_dimensions, handle.level_downsamples, strict=True)
        ]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.levels[level].downsample
        # OpenSlide takes the location in level-0 pixels and the size in level pixels.
        rgba = np.asarray(self.handle.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        return _over_white(rgba)

    def close(self) -> None:
        self.handle.close()


def _over_white(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """RGBA composed over a white background: non-premultiplied (as PIL returns it), or
    ``premultiplied`` (a TIFF's associated alpha, whose colour is already scaled by alpha)."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    if premultiplied:
        rgb = np.minimum(rgba[..., :3].astype(np.uint16) + (WHITE - a), WHITE)
    else:
        rgb = (rgba[..., :3].astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


#: TIFF ExtraSamples value of an unassociated (not premultiplied) alpha.  libtiff, and so
#: OpenSlide, takes associated and unspecified extra samples as premultiplied alpha.
UNASSOCIATED_ALPHA = 2


def premultiplied_alpha(page: Any) -> bool:
    """Whether the fourth sample of a tifffile RGBA ``page`` is premultiplied alpha."""
    extra = tuple(page.extrasamples or ())
    return not (extra and int(extra[0]) == UNASSOCIATED_ALPHA)


class _TiffLevel:
    """One tiled TIFF page: where its tiles lie in the file and how to decode them."""

    def __init__(self, page: Any) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.cols = -(-self.width // self.tw)
        self.rows = -(-self.height // self.th)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.decode = page.decode  # tifffile binds tables, colour space and predictor
        self.jpegtables = page.jpegtables
        self.premultiplied = premultiplied_alpha(page)


#: TIFF compressions the fast path decodes (none, LZW, JPEG, deflate, JPEG 2000 variants, ...).
#: Not 33003, Aperio's JPEG 2000 of YCbCr components: they decode to Y, Cb and Cr, which
#: only OpenSlide turns into RGB.
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 33004, 33005, 34712, 50000, 50001, 50002}
JPEG = 7
#: Compressions whose YCbCr pixels tifffile (imagecodecs) decodes to RGB: old-style JPEG,
#: JPEG and lossy JPEG.  With any other compression they come back as stored.
_YCBCR_TO_RGB = {6, 7, 33007, 34892}
APERIO_J2K_YCBCR = 33003


def ycbcr_as_stored(page: Any) -> bool:
    """Whether tifffile decodes ``page`` to Y, Cb, Cr samples rather than RGB: Aperio's
    JPEG 2000 YCbCr, or photometric YCbCr with a compression other than JPEG."""
    compression = int(page.compression)
    return compression == APERIO_J2K_YCBCR or (int(page.photometric) == 6 and compression not in _YCBCR_TO_RGB)


def tiled_rgb_page(page: Any) -> bool:
    """Whether the fast path can decode ``page``: tiled, 8-bit RGB (YCbCr only when JPEG
    decoding turns it into RGB), a known compression."""
    photometric = int(page.photometric)
    return bool(
        page.is_tiled
        and page.tiledepth == 1
        and page.bitspersample == 8
        and page.samplesperpixel in (3, 4)
        and page.planarconfig == 1
        and (photometric == 2 or (photometric == 6 and int(page.compression) == JPEG))  # RGB, JPEG YCbCr
        and int(page.compression) in FAST_COMPRESSIONS
    )


class TiffTileReader:
    """Fast reading of tiled TIFF levels; levels it cannot decode go to ``fallback``.

    ``pages[i]`` is the tifffile page of level ``i`` or None.  The reader holds an open
    file descriptor and is safe to use from several threads (``os.pread`` has no shared
    file position); worker processes open their own.
    """

    def __init__(
        self,
        path: Path,
        levels: list[Level],
        pages: list[Any | None],
        fallback: Reader | None,
        tiff: Any,
        cache_bytes: int = 96 * 2**20,
    ) -> None:
        self.levels = levels
        self._tiff = tiff
        self._fallback = fallback
        self._tl = [_TiffLevel(p) if p is not None else None for p in pages]
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    @property
    def fast_levels(self) -> list[int]:
        return [i for i, t in enumerate(self._tl) if t is not None]

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """The decoded tile (th, tw, 3) at (col, row) of ``level``, edge padding included."""
        key = (level, col, row)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        tl = self._tl[level]
        assert tl is not None
        index = row * tl.cols + col
        n = int(tl.counts[index])
        if n == 0:  # sparse tile: not stored, reads as background
            tile = np.full((tl.th, tl.tw, 3), WHITE, np.uint8)
        else:
            data = os.pread(self._fd, n, int(tl.offsets[index]))
            arr = tl.decode(data, index, jpegtables=tl.jpegtables)[0]
            tile = arr.reshape(arr.shape[-3:])
            tile = _over_white(tile, tl.premultiplied) if tile.shape[-1] == 4 else tile
        with self._lock:
            self._cache[key] = tile
            self._cached += tile.nbytes
            while self._cached > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tl = self._tl[level]
        if tl is None:
            assert self._fallback is not None
            return self._fallback.read(level, x, y, w, h)
        out = np.full((h, w, 3), WHITE, np.uint8)
        c0, c1 = max(x // tl.tw, 0), min((x + w - 1) // tl.tw, tl.cols - 1)
        r0, r1 = max(y // tl.th, 0), min((y + h - 1) // tl.th, tl.rows - 1)
        for row in range(r0, r1 + 1):
            for col in range(c0, c1 + 1):
                tile = self.tile(level, col, row)
                # clip the tile's edge padding to the level's size
                tw = min(tl.tw, tl.width - col * tl.tw)
                th = min(tl.th, tl.height - row * tl.th)
                _paste(out, tile[:th, :tw], col * tl.tw - x, row * tl.th - y)
        return out

    def close(self) -> None:
        os.close(self._fd)
        self._tiff.close()
        if self._fallback is not None:
            self._fallback.close()


class ImageReader:
    """A plain image held in memory as one level."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.levels = [Level(rgb.shape[1], rgb.shape[0], 1.0)]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), WHITE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        _paste(out, self.rgb[y0 : y + h, x0 : x + w], x0 - x, y0 - y)
        return out

    def close(self) -> None:
        pass
