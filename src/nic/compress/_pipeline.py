"""One slide to one compressed-slide store, streaming.

The grid is laid at the encoder's um/px and patch size (stride = patch) over the
slide's tissue (:func:`nic.grid.patch_grid`).  Tissue cells are cut into rectangular
read tasks (a strip of a few patch rows by up to a few dozen columns, read in one piece);
reader processes decode them while the main process encodes full batches; codes land
in a buffer of one zarr chunk row (``BLOCK_ROWS`` grid rows), which is written as soon as
all its tissue cells are encoded.  Memory is bounded by the batch, the read slots and two
or three row blocks, whatever the slide's size.  ``complete`` is written last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nic.compress._encode import DIHEDRAL_ORDER, BatchEncoder, Precision
from nic.compress._workers import ReaderPool, ReadTask, Transport, read_patches
from nic.errors import MppError
from nic.grid import PatchGrid, patch_grid
from nic.slide._mpp import check_user_mpp
from nic.store import StoreAttrs, create_store, mark_complete
from nic.tissue import tissue_mask

logger = logging.getLogger(__name__)

__all__ = [
    "MPP_TOLERANCE",
    "CompressOptions",
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


@dataclass(frozen=True)
class CompressOptions:
    """How slides are compressed.

    ``mpp`` overrides the slides' own level-0 um/px (None: from the file).  ``workers``:
    reader processes (0 reads in the encoding process, without overlap).  ``dihedral``
    stores the 8 rotations/flips of every patch.  ``min_tissue``: the share of a cell that
    must be tissue for the cell to be encoded.  ``precision``: autocast on accelerators
    ("auto": fp16 on CUDA, none on CPU).  ``transport``: how patches come back from the
    readers ("shm" shared memory or "pickle").  ``random_init``: allow an encoder without
    weights (a deliberate random baseline; refused otherwise), built with torch seeded by
    ``seed``.  ``busy_wait``: seconds to wait, after the other slides, for slides that
    another process holds (see :func:`nic.compress.compress_slides`).
    """

    mpp: float | None = None
    batch_size: int = 64
    workers: int = 2
    device: str = "cpu"
    dihedral: bool = False
    overwrite: bool = False
    min_tissue: float = 0.1
    precision: Precision = "auto"
    transport: Transport = "shm"
    random_init: bool = False
    seed: int = 0
    busy_wait: float = 600.0

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_user_mpp(self.mpp)
        if self.busy_wait < 0:
            raise ValueError(f"busy_wait must be 0 or more seconds, got {self.busy_wait}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")


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
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return "sha256", h.hexdigest()
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
            "slide or an encoder trained at a coarser um/px (if the file's pixel size is wrong, pass --mpp)"
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
        """Place codes (V, n, C) at grid cells (n, 2) (row, col)."""
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


def encode_slide(
    plan: SlidePlan,
    runner: BatchEncoder,
    features: Any,
    pool: ReaderPool | None,
    on_patches: Callable[[int], None] | None = None,
) -> int:
    """Encode every tissue cell of ``plan`` into ``features`` (a zarr array); returns the count.

    With a ``pool``, up to ``pool.capacity`` read tasks are in flight while the current
    batch is encoded; results are taken in task order.
    """
    runner.reset()  # a slide that failed before may have left a batch pending
    tissue = plan.grid.tissue
    blocks = _Blocks(features, tissue, runner.variants, int(runner.encoder.code_size))
    batch = runner.batch_size
    cells = np.empty((batch, 2), np.int64)
    filled = 0
    done = 0
    tasks = plan.tasks
    inflight: deque[tuple[Any, int]] = deque()
    nxt = 0
    rows, cols = task_shape(plan.grid.patch)
    local = None if pool is not None else np.empty((rows * cols, *runner.buffer().shape[1:]), np.uint8)

    def top_up() -> None:
        nonlocal nxt
        if pool is None:
            return
        while nxt < len(tasks) and len(inflight) < pool.capacity:
            inflight.append(pool.submit(tasks[nxt]))
            nxt += 1

    try:
        top_up()
        for task in tasks:
            slot = -1
            if pool is not None:
                future, slot = inflight.popleft()
                patches = pool.patches(future.result(), slot)
            else:
                patches = read_patches(task, slide=plan.slide, out=local)
            i = 0
            while i < task.n:
                k = min(batch - filled, task.n - i)
                runner.buffer()[filled : filled + k] = patches[i : i + k]
                cells[filled : filled + k] = task.cells[i : i + k]
                filled += k
                i += k
                if filled == batch:
                    for codes, where in runner.submit(filled, cells):
                        blocks.add(codes, where)
                    filled = 0
            if pool is not None:
                pool.release(slot)
                top_up()
            done += task.n
            if on_patches is not None:
                on_patches(task.n)
        for codes, where in runner.submit(filled, cells[:filled]):
            blocks.add(codes, where)
        for codes, where in runner.flush():
            blocks.add(codes, where)
    finally:
        for future, _ in inflight:
            future.cancel()
    blocks.check_done()
    return done


def compress_planned(
    plan: SlidePlan,
    runner: BatchEncoder,
    encoder: Any,
    store: Path,
    options: CompressOptions,
    pool: ReaderPool | None,
    on_patches: Callable[[int], None] | None = None,
) -> int:
    """Create ``store`` (removing an unfinished one), encode, then mark it complete."""
    t0 = time.perf_counter()
    attrs = store_attrs(plan, encoder, options)
    variants = 8 if options.dihedral else 1
    grid = plan.grid
    features = create_store(
        store, int(encoder.code_size), grid.shape, grid.tissue, attrs, variants=variants, chunk=BLOCK_ROWS
    )
    n = encode_slide(plan, runner, features, pool, on_patches)
    seconds = time.perf_counter() - t0
    mark_complete(
        store, {"seconds": round(seconds, 3), "patches": n, "patches_per_s": round(n / max(seconds, 1e-9), 1)}
    )
    logger.info("%s: %d patches in %.1f s -> %s", plan.slide.path, n, seconds, store)
    return n
