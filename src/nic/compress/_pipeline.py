"""One slide to one compressed-slide store, streaming.

The grid is laid at the encoder's um/px and patch size (stride = patch) over the
slide's tissue (:func:`nic.grid.patch_grid`).  Tissue cells are cut into rectangular
read tasks (a strip of a few patch rows by up to a few dozen columns, read in one piece);
reader processes decode them while the main process encodes full batches; codes land
in a buffer of one zarr chunk row (``BLOCK_ROWS`` grid rows), which is written as soon as
all its tissue cells are encoded.  Memory is bounded by the batch, the read slots and two
or three row blocks, whatever the slide's size.  ``complete`` is written last.

Patches stay uint8 until the model call (:class:`~nic.compress._encode.BatchEncoder`,
which encodes one batch per core on a CPU).  With a CUDA device, slides stored as JPEG
tiles are decoded on the device instead (:mod:`nic.compress._tiles`), without reader
processes.  :func:`auto_settings` sizes the readers and the batch from the cores and the
device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from nic._outputs import file_sha256
from nic.compress._encode import DIHEDRAL_ORDER, BatchEncoder, Precision
from nic.compress._tiles import DeviceTiles, open_device_tiles
from nic.compress._workers import ReaderPool, ReadTask, Transport, read_patches
from nic.errors import EncoderError, MppError, OptionError, check_choice, check_int, check_number
from nic.grid import PatchGrid, patch_grid
from nic.slide._mpp import check_user_mpp
from nic.store import StoreAttrs, building_store, create_store, mark_complete
from nic.tissue import tissue_mask

logger = logging.getLogger(__name__)

__all__ = [
    "MPP_TOLERANCE",
    "CompressOptions",
    "Decode",
    "auto_settings",
    "SlidePlan",
    "check_mpp",
    "compress_planned",
    "encode_slide",
    "plan_slide",
    "slide_checksum",
    "store_attrs",
    "task_shape",
]

#: A slide may be at most this much coarser than the encoder's um/px (upsampling limit).
MPP_TOLERANCE = 1.25
#: Grid rows per zarr chunk and per write.
BLOCK_ROWS = 64
#: Read tasks (rectangles of cells): at most this many patches, this height and this width
#: in pixels at the grid's mpp (whole 256 px tiles at 128 px patches and 2x downsampling).
TASK_PATCHES = 128
TASK_HEIGHT_PX = 512
TASK_WIDTH_PX = 4096
#: Files up to this size get a full sha256; bigger ones a sampled one.
FULL_HASH_BYTES = 64 * 2**20
_SAMPLES, _SAMPLE_BYTES = 16, 2**20


Decode = Literal["auto", "readers", "device"]
Auto = Literal["auto"]


def auto_settings(cpus: int, device: str, patch: int) -> tuple[int, int]:
    """(reader processes, batch size) for ``cpus`` cores, a ``device`` type ("cpu", "cuda",
    "mps") and ``patch``-pixel patches.

    Readers: on a CPU the encoder needs the cores and decoding costs about a ninth of the
    smallest encoder's time (libjpeg-turbo ~0.1 ms per 128 px patch against ~1 ms for
    nic-cnn on one core), so one reader per 8 cores, at least one: 1 on 2-15 cores, 2 on
    16.  One reader decodes ~5,000 patches/s, more than a CPU encodes; more readers only
    take cores from the encoder.  On an accelerator the encoder needs one core
    to feed it and the other cores decode: ``cpus - 1`` readers, at least 1, at most 32
    (a 16-core GPU machine gets 15; JPEG slides on CUDA are decoded on the device anyway,
    the readers serve the other formats).

    Batch: on a CPU one batch per core is encoded at once (see
    :class:`~nic.compress._encode.BatchEncoder`), so about 256 patches in flight in all:
    64 up to 4 cores, then 256 / cores as a power of two, at least 16 (throughput per core
    is flat from ~16 patches).  On an accelerator as many patches as make about 16
    megapixels, a power of two between 32 and 1024: 1024 at 128 px, 256 at 224 or 256 px,
    64 at 512 px.
    """
    cpus = max(1, int(cpus))
    if device == "cpu":
        return max(1, cpus // 8), min(64, max(16, 2 ** int(math.log2(256 // cpus))))
    batch = 2 ** int(math.log2(max(1, (16 * 2**20) // (patch * patch))))
    return min(32, max(1, cpus - 1)), int(min(1024, max(32, batch)))


def _check_auto_int(param: str, value: Any, lowest: int) -> None:
    """:class:`OptionError` unless ``value`` is "auto" or an integer of at least ``lowest``
    (the wording of :func:`nic.errors.check_int`, with "auto" among the choices)."""
    if value == "auto":
        return
    try:
        check_int(param, value, lowest)
    except OptionError:
        raise OptionError(f"`{param}` must be auto or an integer of at least {lowest} (got {value!r})") from None


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CompressOptions:
    """How slides are compressed.

    ``mpp`` overrides the slides' own level-0 um/px (None: from the file).  ``workers``:
    reader processes (0 reads in the encoding process, without overlap) and
    ``batch_size``: patches per encoder call; "auto" chooses both from the cores and the
    device (:func:`auto_settings`).  ``device``: the encoder's torch device, "auto" for
    CUDA when torch sees one, else the CPU.  ``decode``: where JPEG tiles are decoded; "auto" on
    the device when it is CUDA and the slide allows it (:mod:`nic.compress._tiles`), else
    by the readers; "device" on the device whatever it is (on a CPU: in the encoding
    process); "readers" always by the readers.  ``dihedral`` stores the 8 rotations/flips
    of every patch.  ``min_tissue``: the share of a cell that must be tissue for the cell
    to be encoded.  ``precision``: autocast on accelerators ("auto": fp16 on CUDA, none on
    CPU).  ``transport``: how patches come back from the readers ("shm" shared memory or
    "pickle").  ``random_init``: allow an encoder without weights (a deliberate random
    baseline; refused otherwise), built with torch seeded by ``seed``.  ``busy_wait``:
    seconds to wait, after the other slides, for slides that another process holds (see
    :func:`nic.compress.compress_slides`).
    """

    mpp: float | None = None
    batch_size: int | Auto = "auto"
    workers: int | Auto = "auto"
    device: str = "auto"
    dihedral: bool = False
    overwrite: bool = False
    min_tissue: float = 0.1
    precision: Precision = "auto"
    transport: Transport = "shm"
    random_init: bool = False
    seed: int = 0
    busy_wait: float = 600.0
    decode: Decode = "auto"

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_user_mpp(self.mpp)
        _check_auto_int("batch_size", self.batch_size, 1)
        _check_auto_int("workers", self.workers, 0)
        check_choice("decode", self.decode, get_args(Decode))
        check_number("min_tissue", self.min_tissue, 0, 1)
        check_choice("precision", self.precision, get_args(Precision))
        check_choice("transport", self.transport, get_args(Transport))
        check_number("busy_wait", self.busy_wait, 0, math.inf)

    def resolved(self, patch: int, cpus: int | None = None) -> CompressOptions:
        """These options with "auto" workers and batch size replaced by :func:`auto_settings`
        for ``patch``-pixel patches, this machine's cores (or ``cpus``) and the device."""
        if self.workers != "auto" and self.batch_size != "auto":
            return self
        from nic._device import torch_device

        kind = torch_device(self.device).type
        readers, batch = auto_settings(cpus or available_cpus(), kind, patch)
        return dataclasses.replace(
            self,
            workers=readers if self.workers == "auto" else self.workers,
            batch_size=batch if self.batch_size == "auto" else self.batch_size,
        )


@dataclass
class SlidePlan:
    """The grid of one slide and the read tasks that cover its tissue cells, in order."""

    slide: Any
    grid: PatchGrid
    tasks: list[ReadTask]
    tissue_threshold: float

    @property
    def n_patches(self) -> int:
        return self.grid.n_tissue


def slide_checksum(path: str | Path) -> tuple[str, str]:
    """(method, hex digest) identifying a slide file's bytes.

    Files up to 64 MiB: ``sha256`` of the whole file.  Bigger ones: ``sha256-sampled``,
    the sha256 of the size and 16 evenly spaced 1 MiB blocks (first and last included),
    which reads 16 MiB instead of gigabytes and still changes with any re-scan or truncation.
    """
    p = Path(path)
    size = p.stat().st_size
    if size <= FULL_HASH_BYTES:
        return "sha256", file_sha256(p)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(str(size).encode())
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return "sha256-sampled", h.hexdigest()


def check_mpp(slide: Any, encoder_mpp: float) -> None:
    """Refuse a slide scanned much coarser than the encoder's um/px (patches would be upsampled)."""
    coarse = max(slide.mpp)
    if coarse > encoder_mpp * MPP_TOLERANCE:
        raise MppError(
            f"{slide.path}: scanned at {coarse:.4g} um/px, {coarse / encoder_mpp:.3g}x coarser than the encoder's "
            f"{encoder_mpp:g} um/px; patches would be upsampled, not read: use a higher-resolution scan of this "
            "slide or an encoder trained at a coarser um/px (if the file's pixel size is wrong, pass `mpp`)"
        )


def task_shape(patch: int) -> tuple[int, int]:
    """(rows, cols) of grid cells in one read task for ``patch``-pixel cells."""
    rows = max(1, TASK_HEIGHT_PX // patch)
    cols = max(1, min(TASK_PATCHES // rows, TASK_WIDTH_PX // patch))
    return rows, cols


def plan_slide(slide: Any, patch: int, mpp: float, min_tissue: float = 0.1, slide_mpp: Any = None) -> SlidePlan:
    """Grid (``patch`` px at ``mpp`` um/px, stride = patch) and read tasks of an open slide.

    A task is a rectangle of :func:`task_shape` cells, trimmed to the tissue cells inside
    it; rectangles without tissue are dropped.  Tasks run row-major, so row blocks finish
    in order.
    """
    check_mpp(slide, mpp)
    mask = tissue_mask(slide)
    grid = patch_grid(slide, mpp=mpp, patch=patch, stride=patch, min_tissue=min_tissue, mask=mask)
    tissue = grid.tissue
    rows, cols = grid.shape
    task_rows, task_cols = task_shape(patch)
    ox, oy = grid.origin
    sx, sy = grid.step
    tasks: list[ReadTask] = []
    for r0 in range(0, rows, task_rows):
        for c0 in range(0, cols, task_cols):
            t = tissue[r0 : r0 + task_rows, c0 : c0 + task_cols]
            if not t.any():
                continue
            rr, cc = np.nonzero(t)
            ra, rb, ca, cb = int(rr.min()), int(rr.max()), int(cc.min()), int(cc.max())
            tasks.append(
                ReadTask(
                    index=len(tasks),
                    slide=str(slide.path),
                    slide_mpp=slide_mpp,
                    location=(ox + (c0 + ca) * sx, oy + (r0 + ra) * sy),
                    size=((cb - ca + 1) * patch, (rb - ra + 1) * patch),
                    mpp=mpp,
                    patch=patch,
                    offsets=np.stack([(rr - ra) * patch, (cc - ca) * patch], axis=1).astype(np.int64),
                    cells=np.stack([r0 + rr, c0 + cc], axis=1).astype(np.int64),
                )
            )
    return SlidePlan(slide, grid, tasks, mask.threshold)


def store_attrs(plan: SlidePlan, encoder: Any, options: CompressOptions) -> StoreAttrs:
    """Provenance attributes of a store (:class:`nic.store.StoreAttrs`; units there).

    ``origin``, ``step`` and ``patch_level0`` are level-0 pixels (x, y); ``mpp`` is the
    grid's um/px; ``patch`` and ``stride`` are pixels at ``mpp``.
    """
    import nic

    slide, grid = plan.slide, plan.grid
    path = Path(slide.path).resolve()
    method, digest = slide_checksum(path)
    variants = 8 if options.dihedral else 1
    return StoreAttrs(
        slide_path=str(path),
        slide_size_bytes=path.stat().st_size,
        slide_checksum=digest,
        slide_checksum_method=method,
        slide_mpp=(float(slide.mpp[0]), float(slide.mpp[1])),
        slide_mpp_source=getattr(slide, "mpp_source", ""),
        slide_dimensions=(int(slide.dimensions[0]), int(slide.dimensions[1])),
        mpp=float(grid.mpp),
        patch=int(grid.patch),
        stride=int(grid.stride),
        origin=(float(grid.origin[0]), float(grid.origin[1])),
        step=(float(grid.step[0]), float(grid.step[1])),
        patch_level0=(float(grid.patch_level0[0]), float(grid.patch_level0[1])),
        grid_shape=(int(grid.shape[0]), int(grid.shape[1])),
        min_tissue=float(grid.min_tissue),
        tissue_threshold=float(plan.tissue_threshold),
        n_tissue=int(grid.n_tissue),
        code_size=int(encoder.code_size),
        variants=variants,
        variant_order=DIHEDRAL_ORDER if variants == 8 else "",
        encoder_name=encoder.name,
        encoder_checksum=encoder.checksum,
        encoder_config=encoder.config.to_json(),
        random_init=encoder.random_init,
        random_seed=encoder.source.get("seed") if encoder.random_init else None,
        nic_version=nic.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


class _Blocks:
    """Row blocks of codes (V, C, rows, W) float16, written to ``features`` when full."""

    def __init__(self, features: Any, tissue: np.ndarray, variants: int, code_size: int) -> None:
        self.features = features
        self.variants, self.code_size = variants, code_size
        self.rows, self.cols = tissue.shape
        n_blocks = math.ceil(self.rows / BLOCK_ROWS)
        self.remaining = [int(tissue[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS].sum()) for b in range(n_blocks)]
        self.buffers: dict[int, np.ndarray] = {}
        self.written = 0

    def add(self, codes: np.ndarray, cells: np.ndarray) -> None:
        """Place codes (V, n, C) at grid cells (n, 2) (row, col); :class:`EncoderError` for
        codes that are not finite (NaN, or beyond float16's +-65504) instead of storing them."""
        bad = ~np.isfinite(codes).all(axis=(0, 2))
        if bad.any():
            r, c = (int(v) for v in cells[int(np.argmax(bad))])
            raise EncoderError(
                f"the encoder gave codes that are NaN or beyond float16's range (|x| > 65504) for {int(bad.sum())} of "
                f"{len(cells)} patches of a batch, e.g. cell ({r}, {c}); with half precision on a GPU try "
                "`precision='fp32'`, else check the encoder's weights and normalisation"
            )
        block = cells[:, 0] // BLOCK_ROWS
        for b in np.unique(block):
            b = int(b)
            sel = block == b
            buf = self.buffers.get(b)
            if buf is None:
                h = min(BLOCK_ROWS, self.rows - b * BLOCK_ROWS)
                buf = self.buffers[b] = np.zeros((self.variants, self.code_size, h, self.cols), np.float16)
            rr, cc = cells[sel, 0] - b * BLOCK_ROWS, cells[sel, 1]
            buf[:, :, rr, cc] = codes[:, sel, :].transpose(0, 2, 1)
            self.remaining[b] -= int(sel.sum())
            if self.remaining[b] == 0:
                self._write(b)

    def _write(self, b: int) -> None:
        buf = self.buffers.pop(b)
        r0 = b * BLOCK_ROWS
        rows = slice(r0, r0 + buf.shape[2])
        if self.variants == 1:
            self.features[:, rows, :] = buf[0]
        else:
            self.features[:, :, rows, :] = buf
        self.written += 1

    def check_done(self) -> None:
        left = [b for b, n in enumerate(self.remaining) if n]
        if left or self.buffers:
            raise RuntimeError(f"internal error: row blocks {left} were not completed")


class _Batches:
    """Gathers patches into batches of ``runner.batch_size`` and hands them to the runner.

    Host patches (uint8 (n, P, P, 3), a reader's slot or array): a whole batch that lies in
    one array is handed over as it is (:meth:`BatchEncoder.submit_array`: read in place by
    a one-thread CPU runner, copied once otherwise); the rest are copied into the runner's
    input buffer.  Device patches (uint8 (n, 3, P, P), :mod:`nic.compress._tiles`)
    are concatenated there.  ``blocks`` receives the codes.
    """

    def __init__(self, runner: BatchEncoder, blocks: _Blocks) -> None:
        self.runner, self.blocks = runner, blocks
        self.batch = runner.batch_size
        self.cells = np.empty((self.batch, 2), np.int64)
        self.filled = 0
        self.tensors: list[Any] = []
        self.tensor_cells: list[np.ndarray] = []
        self.queued = 0

    def _take(self, results: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        for codes, where in results:
            self.blocks.add(codes, where)

    def host(self, patches: np.ndarray, cells: np.ndarray) -> None:
        """Encode (or buffer) host patches; ``patches`` may be reused once this returns."""
        n, i, b = len(patches), 0, self.batch
        while i < n:
            if self.filled == 0 and n - i >= b:
                self._take(self.runner.submit_array(patches[i : i + b], cells[i : i + b]))
                i += b
                continue
            k = min(b - self.filled, n - i)
            self.runner.buffer()[self.filled : self.filled + k] = patches[i : i + k]
            self.cells[self.filled : self.filled + k] = cells[i : i + k]
            self.filled += k
            i += k
            if self.filled == b:
                self._take(self.runner.submit(self.filled, self.cells))
                self.filled = 0

    def device(self, patches: Any, cells: np.ndarray) -> None:
        """Queue device patches; encode every full batch."""
        import torch

        self.tensors.append(patches)
        self.tensor_cells.append(cells)
        self.queued += len(patches)
        if self.queued < self.batch:
            return
        x, c = torch.cat(self.tensors), np.concatenate(self.tensor_cells)
        full = (len(x) // self.batch) * self.batch
        for lo in range(0, full, self.batch):
            self._take(self.runner.submit_tensor(x[lo : lo + self.batch], c[lo : lo + self.batch]))
        self.tensors, self.tensor_cells = ([x[full:]], [c[full:]]) if full < len(x) else ([], [])
        self.queued = len(x) - full

    def finish(self) -> None:
        """Encode what is left and collect what is pending."""
        import torch

        self._take(self.runner.submit(self.filled, self.cells[: self.filled]))
        self.filled = 0
        if self.queued:
            self._take(self.runner.submit_tensor(torch.cat(self.tensors), np.concatenate(self.tensor_cells)))
            self.tensors, self.tensor_cells, self.queued = [], [], 0
        self._take(self.runner.flush())


def encode_slide(
    plan: SlidePlan,
    runner: BatchEncoder,
    features: Any,
    pool: ReaderPool | None,
    on_patches: Callable[[int], None] | None = None,
    tiles: DeviceTiles | None = None,
) -> int:
    """Encode every tissue cell of ``plan`` into ``features`` (a zarr array); returns the count.

    Patches come from ``tiles`` (decoded on the device) when given, else from ``pool``
    (up to ``pool.capacity`` read tasks in flight while the current batch is encoded;
    results taken in task order), else are read here.
    """
    runner.reset()  # a slide that failed before may have left a batch pending
    blocks = _Blocks(features, plan.grid.tissue, runner.variants, int(runner.encoder.code_size))
    batches = _Batches(runner, blocks)
    tasks = plan.tasks
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if on_patches is not None:
            on_patches(n)

    if tiles is not None:
        for task, patches in tiles.stream(tasks):
            batches.device(patches, task.cells)
            count(task.n)
    elif pool is None:
        rows, cols = task_shape(plan.grid.patch)
        local = np.empty((rows * cols, *runner.buffer().shape[1:]), np.uint8)
        for task in tasks:
            batches.host(read_patches(task, slide=plan.slide, out=local), task.cells)
            count(task.n)
    else:
        inflight: deque[tuple[Any, int]] = deque()
        nxt = 0
        try:
            for task in tasks:
                while nxt < len(tasks) and len(inflight) < pool.capacity:
                    inflight.append(pool.submit(tasks[nxt]))
                    nxt += 1
                future, slot = inflight.popleft()
                try:
                    batches.host(pool.patches(pool.result(future), slot), task.cells)
                finally:
                    pool.release(slot)
                count(task.n)
        finally:
            for future, _ in inflight:
                future.cancel()
    batches.finish()
    blocks.check_done()
    return done


def device_tiles(plan: SlidePlan, runner: BatchEncoder, options: CompressOptions) -> DeviceTiles | None:
    """Tiles decoded on the runner's device for this slide, when ``options.decode`` asks for
    it ("device", or "auto" on CUDA) and the slide allows it (see :mod:`nic.compress._tiles`)."""
    if options.decode == "readers" or (options.decode == "auto" and runner.device.type != "cuda"):
        return None
    tiles = open_device_tiles(plan.slide, plan.tasks, plan.grid.mpp, runner.device)
    if tiles is None and options.decode == "device":
        logger.info("%s: tiles decoded by reader processes (not JPEG tiles the device decodes)", plan.slide.path)
    return tiles


def compress_planned(
    plan: SlidePlan,
    runner: BatchEncoder,
    encoder: Any,
    store: Path,
    options: CompressOptions,
    pool: ReaderPool | None,
    on_patches: Callable[[int], None] | None = None,
) -> int:
    """Create ``store`` (removing an unfinished one), encode, then mark it complete.

    A complete store (``overwrite``) is replaced only by a whole one: the new store is
    built in a hidden sibling folder and swapped in at the end, so a failure or an
    interruption leaves the old store as it was.
    """
    t0 = time.perf_counter()
    attrs = store_attrs(plan, encoder, options)
    variants = 8 if options.dihedral else 1
    grid = plan.grid
    with building_store(store) as (target, staged):
        features = create_store(
            target, int(encoder.code_size), grid.shape, grid.tissue, attrs, variants=variants, chunk=BLOCK_ROWS,
            in_new_folder=staged,
        )  # fmt: skip
        tiles = device_tiles(plan, runner, options)
        try:
            n = encode_slide(plan, runner, features, pool if tiles is None else None, on_patches, tiles)
        finally:
            if tiles is not None:
                tiles.close()
        seconds = time.perf_counter() - t0
        mark_complete(
            target, {"seconds": round(seconds, 3), "patches": n, "patches_per_s": round(n / max(seconds, 1e-9), 1)}
        )
    logger.info("%s: %d patches in %.1f s -> %s", plan.slide.path, n, seconds, store)
    return n
