"""Reader processes: each opens its own :class:`nic.slide.Slide` and cuts patches out of
rectangles of grid cells read in one piece (a strip of patch rows at a time, through
the slide's fast tile path when it has one).

Patches travel back to the encoding process in one of two ways:

- ``"shm"``: the worker writes them into a shared-memory slot the parent lent it and
  returns only the count (one copy, no pickling);
- ``"pickle"``: the worker returns a uint8 array that is pickled through a pipe.

The pool is started with the ``spawn`` method (never fork a process that holds torch
threads); workers ignore SIGINT so that Ctrl-C reaches only the parent, which then
shuts them down.  While a pool is open, SIGTERM to the parent (when it has no handler of
its own) raises ``SystemExit(143)``, so the same shutdown runs: the shared memory and the
executor's semaphores are released instead of being reported as leaked.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nic._processes import WORKER_DIED_HINT, spawn_context
from nic.errors import NicError

logger = logging.getLogger(__name__)

__all__ = ["ReadTask", "ReaderPool", "read_patches", "Transport"]

Transport = Literal["shm", "pickle"]

#: Slides a worker keeps open (a cohort moves from slide to slide).
_MAX_OPEN = 2


@dataclass(frozen=True)
class ReadTask:
    """One rectangle of grid cells to read.

    ``location`` is the level-0 pixel (x, y) of the rectangle's top-left corner and
    ``size`` its (width, height) in pixels at ``mpp`` um/px.  ``offsets`` is (N, 2) int
    (y, x) of the top-left corners of the N wanted patches inside the rectangle, in
    pixels at ``mpp``; ``cells`` is (N, 2) int (row, col) of those patches in the grid.
    """

    index: int
    slide: str
    slide_mpp: float | tuple[float, float] | None
    location: tuple[float, float]
    size: tuple[int, int]
    mpp: float
    patch: int
    offsets: np.ndarray
    cells: np.ndarray

    @property
    def n(self) -> int:
        return int(len(self.offsets))


# -- worker-side state ------------------------------------------------------------------
_slides: OrderedDict[tuple[str, Any], Any] = OrderedDict()
_slots: list[np.ndarray] = []
_shms: list[Any] = []


def _open(path: str, mpp: float | tuple[float, float] | None) -> Any:
    from nic.slide import open_slide

    key = (path, mpp)
    slide = _slides.get(key)
    if slide is None:
        slide = open_slide(path, mpp=mpp)
        _slides[key] = slide
        while len(_slides) > _MAX_OPEN:
            _slides.popitem(last=False)[1].close()
    else:
        _slides.move_to_end(key)
    return slide


def read_patches(task: ReadTask, slide: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """The task's patches as uint8 (N, patch, patch, 3), written into ``out`` when given.

    ``slide`` defaults to the worker's own open copy of ``task.slide``.
    """
    s = slide if slide is not None else _open(task.slide, task.slide_mpp)
    region = s.read_region(task.location, task.size, task.mpp)
    p = task.patch
    if out is None:
        out = np.empty((task.n, p, p, 3), np.uint8)
    for i, (y, x) in enumerate(task.offsets):
        out[i] = region[y : y + p, x : x + p]
    return out[: task.n]


def _exit_with_parent() -> None:
    """End this worker when the parent dies (even by ``kill -9``).

    The workers themselves hold the writing end of the executor's task pipe, so they
    would never see it close; without this they would wait forever, and keep the
    resource tracker (which unlinks the shared memory) alive.
    """
    import os
    import threading
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is None or parent.sentinel is None:  # pragma: no cover - not a spawned worker
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="nic-parent-watch", daemon=True).start()


def _init_worker(slot_names: list[str], slot_shape: tuple[int, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    from multiprocessing import shared_memory

    import nic.slide  # noqa: F401  (import the readers now, while the parent plans the grid)

    for name in slot_names:
        # Spawned workers share the parent's resource tracker, which unlinks the segments
        # if the parent dies without doing so (kill -9).
        shm = shared_memory.SharedMemory(name=name)
        _shms.append(shm)
        _slots.append(np.ndarray(slot_shape, np.uint8, buffer=shm.buf))


def _noop() -> None:
    pass


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM while a pool is open: unwind (closing the pool) instead of dying at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise SystemExit(128 + signum)


def _catch_sigterm() -> bool:
    """Install :func:`_terminate` when SIGTERM has its default action and this is the main thread."""
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def _release_sigterm() -> None:
    if signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_shm(task: ReadTask, slot: int) -> int:
    read_patches(task, out=_slots[slot])
    return task.n


def _run_pickle(task: ReadTask) -> np.ndarray:
    return read_patches(task)


class ReaderPool:
    """``workers`` reader processes and, for ``transport="shm"``, ``slots`` shared buffers
    of ``max_patches`` patches each (uint8, (max_patches, patch, patch, 3)).

    :meth:`submit` returns a future; :meth:`patches` turns its result into the patch
    array (a view into the slot for ``"shm"``, valid until :meth:`release`).
    """

    def __init__(self, workers: int, patch: int, max_patches: int, slots: int, transport: Transport = "shm") -> None:
        if transport not in ("shm", "pickle"):
            raise ValueError(f"transport must be 'shm' or 'pickle', got {transport!r}")
        self.transport = transport
        self.slot_shape = (max_patches, patch, patch, 3)
        self._shms: list[Any] = []
        self.slots: list[np.ndarray] = []
        self.free: list[int] = []
        names: list[str] = []
        self.capacity = slots
        self._sigterm = _catch_sigterm()
        try:
            if transport == "shm":
                from multiprocessing import shared_memory

                nbytes = int(np.prod(self.slot_shape))
                for _ in range(slots):
                    shm = shared_memory.SharedMemory(create=True, size=nbytes)
                    self._shms.append(shm)
                    self.slots.append(np.ndarray(self.slot_shape, np.uint8, buffer=shm.buf))
                    names.append(shm.name)
                self.free = list(range(slots))
            self._pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=spawn_context(),
                initializer=_init_worker,
                initargs=(names, self.slot_shape),
            )
            # start every worker now (the executor starts them on demand), so that their
            # start-up overlaps the parent's tissue mask and grid
            for _ in range(workers):
                self._pool.submit(_noop)
        except BaseException:
            self._unlink()
            raise

    def submit(self, task: ReadTask) -> tuple[Future[Any], int]:
        """Start reading ``task``; returns (future, slot) (slot -1 for ``"pickle"``)."""
        if self.transport == "shm":
            slot = self.free.pop()
            return self._pool.submit(_run_shm, task, slot), slot
        return self._pool.submit(_run_pickle, task), -1

    def result(self, future: Future[Any]) -> Any:
        """The result of a read :meth:`submit` started; a reader that died is a
        :class:`NicError` saying what kills readers."""
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise NicError(f"a reader process ended abruptly: {WORKER_DIED_HINT}") from e

    def patches(self, result: Any, slot: int) -> np.ndarray:
        if slot < 0:
            return result
        return self.slots[slot][: int(result)]

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free.append(slot)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers (cancelling queued reads when ``cancel``) and free the slots."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
        finally:
            self._unlink()

    def _unlink(self) -> None:
        self.slots.clear()
        for shm in self._shms:
            try:
                shm.unlink()
            except FileNotFoundError:  # pragma: no cover - already gone
                pass
            try:
                shm.close()
            except BufferError:  # a patch view is still alive; the mapping goes with it
                pass
        self._shms.clear()
        if self._sigterm:
            self._sigterm = False
            _release_sigterm()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.close(cancel=exc_type is not None)
