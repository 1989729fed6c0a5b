"""A slide's stored JPEG tiles decoded on the encoder's device, and patches cut there.

On a CUDA device the tiles of a read task are decoded in batches by nvJPEG
(``torchvision.io.decode_jpeg`` on a list of tiles), pasted into the task's rectangle,
resampled and cut into uint8 patches (N, 3, P, P) on the GPU: the pixels never pass
through host memory and no reader process decodes them.  The same code runs on a CPU
device (torchvision's libjpeg-turbo, in the encoding process), which is how it is tested
without a GPU; there the reader processes are faster.

What the host does: read the raw tile bytes (``os.pread``, on a few threads, one batch of
tasks ahead) and put the level's JPEG tables in front of each tile.  Resampling follows
:meth:`nic.slide.Slide.read_region` step by step: the same pyramid level and source box,
a plain crop at the level's own pixel size, a k x k block mean rounded the way Pillow's
``reduce`` rounds it (the CPU path's), else exact area resampling with the same overlap
weights, as dense matrices.

Which slides: those read through the fast TIFF tile path whose level at the encoder's
um/px is stored as tiled JPEG with 3 samples; and only when the patches of one probe task
equal the CPU path's within :data:`PROBE_MEAN_TOLERANCE` (this refuses, e.g., Aperio's
RGB-coded JPEG, which needs a colour-space override that nvJPEG and torchvision do not
offer).  Otherwise :func:`open_device_tiles` returns None and the CPU path is used.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic.compress._workers import ReadTask, read_patches
from nic.errors import SlideError

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceTiles", "JpegLevel", "PROBE_MEAN_TOLERANCE", "block_mean", "cut_patches", "decode_tiles",
    "jpeg_level", "open_device_tiles",
]  # fmt: skip

#: TIFF compression code of JPEG.
JPEG = 7
#: Largest mean absolute difference (grey levels) between the device path's patches and
#: the CPU path's on the probe task: JPEG decoders differ by a level or two in places
#: (IDCT, chroma upsampling), a wrong colour space by tens (~50 on Aperio's RGB JPEG).
PROBE_MEAN_TOLERANCE = 3.0
#: Tiles decoded in one call (nvJPEG batches); tasks are grouped up to this many.
BATCH_TILES = 256
#: Threads reading raw tile bytes ahead of the decoder.
READ_THREADS = 4


@dataclass(frozen=True)
class JpegLevel:
    """Where the JPEG tiles of one pyramid level lie in the file.

    ``width``/``height`` are the level's size and ``tile_w``/``tile_h`` a tile's, in the
    level's pixels; tile ``(col, row)`` is ``counts[i]`` bytes at ``offsets[i]``,
    ``i = row * cols + col`` (0 bytes: not stored, white); ``tables`` are the JPEG tables
    shared by the tiles (b"" when each tile carries its own).
    """

    path: Path
    level: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


def jpeg_level(slide: Any, mpp: float) -> JpegLevel | None:
    """The JPEG tiles of the level ``slide.read_region`` reads at ``mpp`` um/px, when that
    level comes through the fast TIFF tile path (a tiled, 8-bit, 3-sample JPEG page of the
    level's size); None otherwise."""
    if not str(getattr(slide, "backend", "")).startswith("tiff"):
        return None
    import tifffile

    from nic.slide._readers import tiled_rgb_page

    level = slide.best_level(mpp)
    lv = slide.levels[level]
    try:
        tif = tifffile.TiffFile(slide.path)
    except Exception:  # the slide's own reader opened it; anything odd here just means "no"
        return None
    with tif:
        pages = list(tif.pages)
        if tif.is_ome and tif.series:
            pages += [s.pages[0] for s in tif.series[0].levels]
        for page in pages:
            if (page.imagewidth, page.imagelength) != (lv.width, lv.height) or not tiled_rgb_page(page):
                continue
            if int(page.compression) != JPEG or page.samplesperpixel != 3:
                return None
            tables = bytes(page.jpegtables or b"")
            return JpegLevel(
                path=Path(slide.path), level=level, width=int(page.imagewidth), height=int(page.imagelength),
                tile_w=int(page.tilewidth), tile_h=int(page.tilelength),
                offsets=np.asarray(page.dataoffsets, np.int64), counts=np.asarray(page.databytecounts, np.int64),
                tables=tables[:-2] if tables.endswith(b"\xff\xd9") else tables,
            )  # fmt: skip
    return None


def decode_tiles(data: Sequence[Any], device: Any) -> list[Any]:
    """``torchvision.io.decode_jpeg`` of a list of JPEG byte tensors, as RGB (3, H, W) uint8 on
    ``device``: one batched nvJPEG call on CUDA, libjpeg-turbo tile by tile on a CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 announces that torchcodec takes this over
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))


def _to_device(a: np.ndarray, device: Any) -> Any:
    """``a`` as a tensor on ``device``; to CUDA through pinned memory, without blocking: a copy
    from pageable memory would wait for the encoder's kernels queued before it."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def block_mean(x: Any, k: int) -> Any:
    """Mean of each k x k block of uint8 (C, H, W), rounded as Pillow's ``Image.reduce`` (the
    CPU path's ``_block_mean``): ``(sum + k*k // 2) >> log2(k*k)`` for powers of two, else
    ``((sum + k*k // 2) * int(2**24 / k**2)) >> 24``."""
    import torch

    c, h, w = x.shape
    h, w = h // k, w // k
    s = x[:, : h * k, : w * k].reshape(c, h, k, w, k).sum(dim=(2, 4), dtype=torch.int64) + (k * k) // 2
    if k & (k - 1) == 0:
        s = s >> int(math.log2(k * k))
    else:
        s = (s * int(float(1 << 24) / (k * k))) >> 24
    return s.to(torch.uint8)


def area_resize(x: Any, box: tuple[float, float, float, float], w: int, h: int) -> Any:
    """:func:`nic.slide._slide.area_resize` of uint8 (C, Hs, Ws) on its device: the same
    overlap weights as dense matrices, rounded half to even and clipped."""
    import torch

    from nic.slide._slide import _overlap_matrix

    x0, y0, x1, y1 = box
    ry = _to_device(_overlap_matrix(y0, y1, h, x.shape[1]).toarray(), x.device)
    rx = _to_device(_overlap_matrix(x0, x1, w, x.shape[2]).toarray(), x.device)
    out = torch.matmul(torch.matmul(ry, x.float()), rx.T)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def cut_patches(region: Any, offsets: np.ndarray, patch: int) -> Any:
    """Patches of ``region`` (C, H, W) with top-left corners ``offsets`` (N, 2) (y, x), as
    (N, C, patch, patch) channels-last (memory (N, patch, patch, C), what the encoder takes).

    A read task's patches lie on the grid of its rectangle (offsets are multiples of
    ``patch``), so they are cut with one reshape and one gather, not one copy per patch.
    """
    import torch

    c, h, w = region.shape
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    if len(off) and not (off % patch).any() and h % patch == 0 and w % patch == 0:
        cells = region.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)  # (R, C, p, p, c)
        rows, cols = _to_device((off // patch).T, region.device)
        return cells[rows, cols].contiguous().permute(0, 3, 1, 2)
    out = torch.stack([region[:, y : y + patch, x : x + patch] for y, x in off.tolist()])
    return out.contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class _Read:
    """One rectangle of the level to decode, and how to bring it to the task's pixels."""

    x: int
    y: int
    w: int
    h: int
    mode: str  # "crop", "block" or "area"
    k: int
    box: tuple[float, float, float, float]
    out_w: int
    out_h: int
    out_y: int  # first output row (a task read in horizontal strips)


class DeviceTiles:
    """The patches of read tasks, from a :class:`JpegLevel` decoded on ``device``.

    :meth:`stream` yields ``(task, patches)`` in task order, patches uint8 (N, 3, P, P) on
    the device; the raw bytes of the next group of tasks are read on threads while the
    current one is decoded.  Close it (or use it as a context manager) to close the file.
    """

    def __init__(self, slide: Any, level: JpegLevel, device: Any) -> None:
        import torch

        self.slide, self.level, self.device = slide, level, torch.device(device)
        self._fd = os.open(level.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="nic-tiles")

    # -- geometry (as Slide.read_region) -----------------------------------------------------
    def reads(self, task: ReadTask) -> list[_Read]:
        """The level rectangles that give ``task``'s region, as :meth:`Slide.read_region` reads it."""
        from nic.slide._slide import MAX_READ_PIXELS

        s = self.slide
        w, h = task.size
        x, y = float(task.location[0]), float(task.location[1])
        fx, fy = task.mpp / s.mpp[0], task.mpp / s.mpp[1]
        ds = s.levels[self.level.level].downsample
        box = (x / ds, y / ds, (x + w * fx) / ds, (y + h * fy) / ds)
        rows_per_piece = max(1, int(MAX_READ_PIXELS / max((box[2] - box[0]) * fy / ds, 1.0)))
        if rows_per_piece >= h:
            return [self._read_box(box, w, h, 0)]
        out = []
        for r0 in range(0, h, rows_per_piece):
            r1 = min(h, r0 + rows_per_piece)
            out.append(self._read_box((box[0], (y + r0 * fy) / ds, box[2], (y + r1 * fy) / ds), w, r1 - r0, r0))
        return out

    @staticmethod
    def _read_box(box: tuple[float, float, float, float], w: int, h: int, out_y: int) -> _Read:
        x0, y0, x1, y1 = box
        ix0, iy0 = math.floor(x0 + 1e-6), math.floor(y0 + 1e-6)
        ix1, iy1 = math.ceil(x1 - 1e-6), math.ceil(y1 - 1e-6)
        kx, ky = (x1 - x0) / w, (y1 - y0) / h
        aligned = abs(x0 - ix0) < 1e-6 and abs(y0 - iy0) < 1e-6
        if aligned and abs(kx - 1) < 1e-6 and abs(ky - 1) < 1e-6:
            return _Read(ix0, iy0, w, h, "crop", 1, box, w, h, out_y)
        k = round(kx)
        if aligned and k > 1 and abs(kx - k) < 1e-6 and abs(ky - k) < 1e-6:
            return _Read(ix0, iy0, w * k, h * k, "block", k, box, w, h, out_y)
        sub = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
        return _Read(ix0, iy0, ix1 - ix0, iy1 - iy0, "area", 0, sub, w, h, out_y)

    def _tiles_of(self, r: _Read) -> list[tuple[int, int]]:
        lv = self.level
        c0, c1 = max(r.x // lv.tile_w, 0), min((r.x + r.w - 1) // lv.tile_w, lv.cols - 1)
        r0, r1 = max(r.y // lv.tile_h, 0), min((r.y + r.h - 1) // lv.tile_h, lv.rows - 1)
        return [(c, rr) for rr in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    # -- bytes, decoding, assembly -------------------------------------------------------------
    def _raw(self, tiles: list[tuple[int, int]]) -> list[Any]:
        """JPEG byte tensors of the stored ones among ``tiles`` (None for a tile not stored)."""
        import torch

        lv = self.level
        out: list[Any] = []
        for c, r in tiles:
            i = r * lv.cols + c
            n = int(lv.counts[i])
            if n == 0:
                out.append(None)
                continue
            data = os.pread(self._fd, n, int(lv.offsets[i]))
            buf = bytearray(lv.tables + data[2:]) if lv.tables else bytearray(data)  # tables, then the tile after SOI
            out.append(torch.frombuffer(buf, dtype=torch.uint8))
        return out

    def _decode(self, tiles: list[tuple[int, int]], raw: list[Any]) -> dict[tuple[int, int], Any]:
        stored = [(t, d) for t, d in zip(tiles, raw) if d is not None]
        if not stored:
            return {}
        try:
            images = decode_tiles([d for _, d in stored], self.device)
        except RuntimeError as e:
            try:  # nvJPEG refuses some JPEG variants that libjpeg-turbo reads: those tiles on the CPU
                images = [im.to(self.device) for im in decode_tiles([d for _, d in stored], "cpu")]
            except RuntimeError:
                images = None
            if images is not None:
                logger.warning("%s: nvJPEG could not decode some tiles (%s); decoded on the CPU", self.level.path,
                               " ".join(str(e).split()))  # fmt: skip
                return self._check_shapes(stored, images)
            cols = sorted({c for (c, _), _ in stored})
            rows = sorted({r for (_, r), _ in stored})
            raise SlideError(
                f"{self.level.path}: a JPEG tile of level {self.level.level} (columns {cols[0]}-{cols[-1]}, rows "
                f"{rows[0]}-{rows[-1]}) cannot be decoded ({' '.join(str(e).split())}); the file is damaged, copy it "
                "again"
            ) from e
        return self._check_shapes(stored, images)

    def _check_shapes(self, stored: list[tuple[tuple[int, int], Any]], images: list[Any]) -> dict[tuple[int, int], Any]:
        lv = self.level
        for (c, r), img in zip((t for t, _ in stored), images):
            if tuple(img.shape) != (3, lv.tile_h, lv.tile_w):
                raise SlideError(
                    f"{lv.path}: the JPEG tile at column {c}, row {r} of level {lv.level} decodes to "
                    f"{tuple(img.shape)[1:]} pixels, not the tile size ({lv.tile_h}, {lv.tile_w}); the file is damaged"
                )
        return {t: img for (t, _), img in zip(stored, images)}

    def _region(self, r: _Read, decoded: dict[tuple[int, int], Any]) -> Any:
        """The level pixels of ``r`` (3, h, w), white outside the level and for missing tiles.

        The tiles under ``r`` are laid out as one mosaic (a stack and a reshape), its part
        beyond the level's edge made white (edge tiles are padded), then cropped: a handful
        of tensor operations per task, whatever the number of tiles.
        """
        import torch

        lv = self.level
        tiles = self._tiles_of(r)
        out_of_level = not tiles
        if not out_of_level:
            c0, r0 = tiles[0]
            nc, nr = tiles[-1][0] - c0 + 1, tiles[-1][1] - r0 + 1
            white = self._white()
            grid = torch.stack([decoded.get(t, white) for t in tiles])  # row-major (nr * nc, 3, th, tw)
            th, tw = lv.tile_h, lv.tile_w
            mosaic = grid.view(nr, nc, 3, th, tw).permute(2, 0, 3, 1, 4).reshape(3, nr * th, nc * tw)
            ex, ey = lv.width - c0 * tw, lv.height - r0 * th  # the level's extent in the mosaic
            if ex < nc * tw:
                mosaic[:, :, ex:] = 255
            if ey < nr * th:
                mosaic[:, ey:, :] = 255
            ox, oy = r.x - c0 * tw, r.y - r0 * th  # the region's corner in the mosaic
            if ox >= 0 and oy >= 0 and ox + r.w <= nc * tw and oy + r.h <= nr * th:
                return mosaic[:, oy : oy + r.h, ox : ox + r.w]
        out = torch.full((3, r.h, r.w), 255, dtype=torch.uint8, device=self.device)
        if out_of_level:
            return out
        x0, y0 = max(-ox, 0), max(-oy, 0)  # the overlap, in region coordinates
        x1, y1 = min(nc * tw - ox, r.w), min(nr * th - oy, r.h)
        if x1 > x0 and y1 > y0:
            out[:, y0:y1, x0:x1] = mosaic[:, oy + y0 : oy + y1, ox + x0 : ox + x1]
        return out

    def _white(self) -> Any:
        import torch

        if getattr(self, "_white_tile", None) is None:
            shape = (3, self.level.tile_h, self.level.tile_w)
            self._white_tile = torch.full(shape, 255, dtype=torch.uint8, device=self.device)
        return self._white_tile

    def _task_pixels(self, reads: list[_Read], decoded: dict[tuple[int, int], Any], task: ReadTask) -> Any:
        import torch

        w, h = task.size
        pieces = []
        for r in reads:
            src = self._region(r, decoded)
            if r.mode == "block":
                src = block_mean(src, r.k)
            elif r.mode == "area":
                src = area_resize(src, r.box, r.out_w, r.out_h)
            pieces.append(src)
        region = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if tuple(region.shape) != (3, h, w):  # pragma: no cover - a geometry bug, not a user error
            raise RuntimeError(f"internal error: task region {tuple(region.shape)} is not (3, {h}, {w})")
        return region

    def stream(self, tasks: Sequence[ReadTask]) -> Iterator[tuple[ReadTask, Any]]:
        """``(task, patches)`` for each task, in order; patches uint8 (N, 3, P, P) on the device."""
        groups = _groups([len(self._tiles_needed(t)) for t in tasks], BATCH_TILES)
        ahead: deque[tuple[list[ReadTask], list[list[_Read]], list[tuple[int, int]], Future[Any]]] = deque()
        pending = iter(groups)

        def prefetch() -> None:
            for lo, hi in pending:
                group = list(tasks[lo:hi])
                reads = [self.reads(t) for t in group]
                tiles = sorted({tile for rs in reads for r in rs for tile in self._tiles_of(r)})
                ahead.append((group, reads, tiles, self._pool.submit(self._raw, tiles)))
                return

        prefetch()
        try:
            while ahead:
                group, reads, tiles, raw = ahead.popleft()
                prefetch()  # the next group's bytes are read while this one is decoded and encoded
                decoded = self._decode(tiles, raw.result())
                for task, rs in zip(group, reads):
                    yield task, cut_patches(self._task_pixels(rs, decoded, task), task.offsets, task.patch)
        finally:
            for *_, fut in ahead:
                fut.cancel()

    def _tiles_needed(self, task: ReadTask) -> list[tuple[int, int]]:
        return [tile for r in self.reads(task) for tile in self._tiles_of(r)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DeviceTiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive items whose ``sizes`` sum to about ``limit`` (each
    range holds at least one item)."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > limit:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def open_device_tiles(slide: Any, tasks: Sequence[ReadTask], mpp: float, device: Any) -> DeviceTiles | None:
    """A :class:`DeviceTiles` for ``slide`` at ``mpp`` um/px on ``device``, or None when the
    slide's tiles are not JPEG through the fast path (:func:`jpeg_level`) or the probe task
    (the middle one of ``tasks``) differs from the CPU path by more than
    :data:`PROBE_MEAN_TOLERANCE` on average."""
    level = jpeg_level(slide, mpp)
    if level is None or not tasks:
        return None
    tiles = DeviceTiles(slide, level, device)
    try:
        task = tasks[len(tasks) // 2]
        [(_, got)] = list(tiles.stream([task]))
        want = read_patches(task, slide=slide)
        diff = np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - want.astype(np.int16))
        mean, worst = float(diff.mean()), int(diff.max())
    except SlideError as e:
        logger.info("%s: tiles not decoded on %s (%s); reader processes decode them", slide.path, device, e)
        tiles.close()
        return None
    except BaseException:
        tiles.close()
        raise
    if mean > PROBE_MEAN_TOLERANCE:
        logger.info(
            "%s: its JPEG tiles decode differently on %s (mean difference %.2f, max %d grey levels, e.g. a colour "
            "space torchvision does not take); reader processes decode them",
            slide.path, device, mean, worst,
        )  # fmt: skip
        tiles.close()
        return None
    logger.debug("%s: JPEG tiles decoded on %s (probe: mean difference %.3f, max %d)", slide.path, device, mean, worst)
    return tiles
