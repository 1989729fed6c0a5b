"""Many slides into one output folder: inputs, per-slide locks, skip/resume, the summary.

For each slide ``S`` the store is ``<out>/<id>.zarr`` (:func:`nic.store.store_path`):

- a complete store is skipped unless ``overwrite``;
- otherwise the slide's lock ``<out>/<id>.zarr.lock`` is taken (``flock``, not
  blocking).  The kernel drops the lock when its holder dies, even by ``kill -9``, so a
  lock file left by a dead process is simply taken over; a live holder makes the slide
  ``busy`` (another process is compressing it) and it is left to that process;
- an unfinished store (interrupted run) is rebuilt from scratch, which gives exactly the
  result of a clean run;
- a slide without tissue cells gets a complete store with ``n_tissue`` 0 (a rerun does
  not redo it) and the status ``no tissue``, also when a rerun finds that store;
- the first failure stops the run (the later slides are ``not run``) unless
  ``skip_errors``; a full output disk stops it in any case;
- after the last slide, the ``busy`` ones are tried again, waiting up to
  ``CompressOptions.busy_wait`` seconds for their holders: a store the other process
  completed is ``skipped``, one it left unfinished is compressed here.

One encoder, one :class:`BatchEncoder` and one pool of reader processes serve the whole
cohort.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nic._outputs import check_writable
from nic.compress._encode import BatchEncoder
from nic.compress._pipeline import CompressOptions, compress_planned, plan_slide, slide_checksum, task_shape
from nic.compress._workers import ReaderPool
from nic.errors import DataError, SlideError, StoreError
from nic.slide import SLIDE_SUFFIXES, list_slides
from nic.store import StoreAttrs, encoder_settings_sha256, is_complete, slide_id_for, store_path, verify_store

logger = logging.getLogger(__name__)

__all__ = [
    "OutputFullError", "SlideResult", "SlideLock", "collect_slides", "compress_slides", "compress_slide",
    "summary_table", "SLIDE_SUFFIXES",
]  # fmt: skip

Status = Literal["done", "skipped", "no tissue", "busy", "failed", "not run"]


@dataclass
class SlideResult:
    """What happened to one slide; ``seconds`` is wall time, ``patches`` the cells encoded.

    ``error`` says why a slide failed, is busy or was not run.  ``no tissue``: the slide's
    store is complete but holds no tissue cell (nothing to learn from).
    """

    slide: Path
    store: Path
    status: Status
    patches: int = 0
    seconds: float = 0.0
    error: str = ""
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0


class OutputFullError(StoreError):
    """The output folder's disk is full (or over quota): the run stops, as every later slide
    would fail too; the slide's store is left unfinished and is rebuilt by the next run."""


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in ``e`` or its causes, if any."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return None


class SlideLock:
    """An exclusive, non-blocking lock file ``<store>.lock`` held with ``flock``.

    The file holds the holder's pid and host for people to read.  A lock file whose
    holder died is free (the kernel releases ``flock`` locks with the process).
    """

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another live process holds it."""
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder before us may have unlinked the file between open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} host {os.uname().nodename}\n".encode())
                self._fd = fd
                return True
            os.close(fd)
        return False

    def holder(self) -> str:
        """The lock file's text ("pid N host H"), or "" when there is none."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:  # pragma: no cover
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def collect_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Slide files from paths, folders (their slide files, sorted) and CSV files
    (:func:`nic.slide.list_slides`, not strict: a missing file is kept, and fails as
    that slide's result).

    Duplicates are dropped; two different files with one slide id are a
    :class:`DataError` (they would share a store).
    """
    out: list[Path] = []
    seen: dict[str, Path] = {}
    for f, _ in list_slides(inputs):
        sid = slide_id_for(f)
        if sid in seen:
            if seen[sid].resolve() != f.resolve():
                raise DataError(
                    f"{f} and {seen[sid]} share the slide id {sid!r} and would write one store; "
                    "rename one or compress them into different `out_dir` folders"
                )
            continue
        seen[sid] = f
        out.append(f)
    return out


class _Bars:
    """rich progress bars for the cohort (slides) and the current slide (patches/s)."""

    def __init__(self, enabled: bool, n_slides: int) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._cohort: Any = None
        self._slide: Any = None
        self.n_slides = n_slides

    @contextmanager
    def running(self) -> Iterator[_Bars]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        with self._progress:
            self._cohort = self._progress.add_task("slides", total=self.n_slides, rate="")
            yield self
        self._progress = None

    def start_slide(self, name: str, total: int) -> None:
        if self._progress is None:
            return
        if self._slide is not None:
            self._progress.remove_task(self._slide)
        self._slide = self._progress.add_task(name, total=total, rate="")

    def patches(self, n: int) -> None:
        if self._progress is None or self._slide is None:
            return
        self._progress.advance(self._slide, n)
        speed = self._progress.tasks[[t.id for t in self._progress.tasks].index(self._slide)].speed
        if speed:
            self._progress.update(self._slide, rate=f"{speed:,.0f} patches/s")

    def slide_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._cohort, 1)


class _Cohort:
    """Shared state of one cohort run: encoder, batch runner, reader pool."""

    def __init__(self, encoder: Any, out_dir: Path, options: CompressOptions, bars: _Bars) -> None:
        self.encoder, self.out_dir, self.bars = encoder, out_dir, bars
        self.options = options.resolved(int(encoder.patch_size))  # "auto" readers and batch size
        self.runner: BatchEncoder | None = None
        self.pool: ReaderPool | None = None

    def get_pool(self) -> ReaderPool | None:
        o = self.options
        if o.workers == 0:
            return None
        if self.pool is None:
            slots = 2 * o.workers + 2
            patch = int(self.encoder.patch_size)
            rows, cols = task_shape(patch)
            self.pool = ReaderPool(o.workers, patch, rows * cols, slots, o.transport)
        return self.pool

    def drop_pool(self) -> None:
        """Stop the readers (after a failure their queued reads are stale)."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.close(cancel=True)

    def _skip(self, slide: Path, store: Path) -> SlideResult | None:
        """A complete store is kept only when it is intact and was made the way this run
        would make it: same encoder (with saved weights), settings and slide file (size and
        checksum).  None for a damaged store: it is rebuilt like an unfinished one."""
        meta = StoreAttrs.from_json(_open_attrs(store))
        damage = verify_store(store, meta, deep=True)
        if damage:
            logger.warning("%s: complete but damaged (%s); rebuilding it", store, "; ".join(damage[:3]))
            return None
        e, o = self.encoder, self.options
        want: dict[str, Any] = {
            "encoder_name": e.name, "encoder_checksum": e.checksum, "code_size": int(e.code_size),
            "mpp": float(e.mpp), "patch": int(e.patch_size), "variants": 8 if o.dihedral else 1,
            "min_tissue": float(o.min_tissue),
        }  # fmt: skip
        if o.mpp is not None:  # the slide's level-0 um/px given by the user
            mx, my = (o.mpp, o.mpp) if isinstance(o.mpp, int | float) else o.mpp
            want["slide_mpp"] = [float(mx), float(my)]
        try:
            path = slide.resolve()
            want["slide_size_bytes"] = path.stat().st_size
            want["slide_checksum"] = slide_checksum(path)[1]
        except OSError as ex:
            err = StoreError(f"{store}: a complete store, but its slide {slide} cannot be read to check it ({ex})")
            return SlideResult(slide, store, "failed", error=str(err), exception=err)
        diff = meta.diff(want)
        if o.mpp is None and meta.slide_mpp_source == "given by the user":
            diff.append(f"slide_mpp {list(meta.slide_mpp or ())!r} given by the user (this run: the file's)")
        seed = e.source.get("seed") if e.random_init else None
        diff += meta.diff({"random_init": e.random_init, "random_seed": seed})
        have_settings = encoder_settings_sha256(meta.encoder_config)
        if have_settings is not None and have_settings != encoder_settings_sha256(e.config.to_json()):
            diff.append(f"encoder settings {_settings_diff(meta.encoder_config or {}, e.config.to_json())}")
        if e.random_init and seed is None:  # an unseeded random initialisation is never the same twice
            diff.insert(
                0,
                "random-initialised encoder: its codes cannot be resumed or matched; "
                "pass `overwrite=True` or use saved weights",
            )
        if diff:
            err = StoreError(
                f"{store}: a complete store made differently ({'; '.join(diff)}); "
                "pass `overwrite=True` to redo it, or use another `out_dir` folder"
            )
            return SlideResult(slide, store, "failed", error=str(err), exception=err)
        logger.info("%s: complete, skipped (use overwrite to redo it)", store)
        return SlideResult(slide, store, "skipped")

    def run(self, slide: Path) -> SlideResult:
        from nic.slide import open_slide

        o = self.options
        store = store_path(self.out_dir, slide_id_for(slide))
        if not o.overwrite and is_complete(store):
            kept = self._skip(slide, store)
            if kept is not None:
                return kept
        lock = SlideLock(store)
        try:
            locked = lock.acquire()
        except OSError as e:  # the lock file cannot be written: a full or read-only output folder
            err = self._output_error(slide, store, e) or StoreError(
                f"{store}: cannot write its lock file in {self.out_dir} ({e.strerror or e}); "
                "give an `out_dir` folder you can write to"
            )
            return SlideResult(slide, store, "failed", error=str(err), exception=err)
        if not locked:
            return SlideResult(slide, store, "busy", error=f"locked by {lock.holder() or 'another process'}")
        t0 = time.perf_counter()
        reading = False
        try:
            if not o.overwrite and is_complete(store):  # finished by another process meanwhile
                kept = self._skip(slide, store)
                if kept is not None:
                    return kept
            pool = self.get_pool()  # started before planning: worker start-up overlaps the tissue mask
            with open_slide(slide, mpp=o.mpp) as s:
                plan = plan_slide(s, int(self.encoder.patch_size), float(self.encoder.mpp), o.min_tissue, o.mpp)
                if self.runner is None:
                    self.runner = BatchEncoder(self.encoder, o.batch_size, o.device, o.dihedral, o.precision)
                self.bars.start_slide(slide.name, plan.n_patches)
                reading = True
                n = compress_planned(plan, self.runner, self.encoder, store, o, pool, self.bars.patches)
            return SlideResult(slide, store, "done", n, time.perf_counter() - t0)
        except Exception as e:
            if reading:  # reads of this slide may still be queued or running: start afresh
                self.drop_pool()
            e = self._output_error(slide, store, e) or e
            logger.info("%s failed: %s", slide, e)
            return SlideResult(slide, store, "failed", seconds=time.perf_counter() - t0, error=str(e), exception=e)
        finally:
            lock.release()

    def _output_error(self, slide: Path, store: Path, e: BaseException) -> OutputFullError | None:
        """An :class:`OutputFullError` naming the output folder when ``e`` comes from a full disk."""
        full = _disk_full(e)
        if full is None:
            return None
        err = OutputFullError(
            f"{slide}: the output folder {self.out_dir} is full ({os.strerror(full.errno)}) while writing "
            f"{store.name}; free space there or give another `out_dir`, then run again (the unfinished store is "
            "rebuilt)"
        )
        err.__cause__ = e
        return err

    def settle(self, result: SlideResult) -> SlideResult:
        """``no tissue`` for a done or skipped slide whose store holds no tissue cell."""
        if result.status == "done" and result.patches == 0:
            result.status = "no tissue"
        elif result.status == "skipped" and _open_attrs(result.store).get("n_tissue") == 0:
            result.status = "no tissue"
        return result

    def retry_busy(self, results: list[SlideResult], wait: float) -> None:
        """Run the ``busy`` slides of ``results`` again, in place, until none is busy or
        ``wait`` seconds have passed (0: once).  A slide whose holder completed it is then
        ``skipped``; one whose holder let go unfinished is compressed here."""
        pending = [i for i, r in enumerate(results) if r.status == "busy"]
        if pending and wait > 0:
            names = ", ".join(results[i].slide.name for i in pending)
            logger.warning(
                "waiting up to %.0f s for %d slide(s) that other processes hold: %s", wait, len(pending), names
            )
        deadline = time.monotonic() + wait
        while pending:
            for i in list(pending):
                r = self.run(results[i].slide)
                if r.status != "busy":
                    results[i] = self.settle(r)
                    pending.remove(i)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            time.sleep(min(1.0, left))


def _settings_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    """``"mean [..] (this run: [..])"`` for each config key that differs, name aside."""
    keys = sorted((set(have) | set(want)) - {"name"})
    return ", ".join(f"{k} {have.get(k)!r} (this run: {want.get(k)!r})" for k in keys if have.get(k) != want.get(k))


def _open_attrs(store: Path) -> dict[str, object]:
    import zarr

    return dict(zarr.open_group(str(store), mode="r").attrs)


def compress_slides(
    slides: Sequence[str | Path],
    encoder: Any,
    out_dir: str | Path,
    options: CompressOptions | None = None,
    *,
    skip_errors: bool = False,
    progress: bool = False,
) -> list[SlideResult]:
    """Compress ``slides`` (paths, folders or CSVs, see :func:`collect_slides`) into ``out_dir``.

    ``encoder`` is an :class:`nic.encoders.Encoder` or a spec for
    :func:`nic.encoders.load_encoder`.  An encoder without weights is refused
    (:class:`~nic.errors.EncoderError`) unless ``options.random_init``; a spec is then
    built with torch seeded by ``options.seed``.  A failing slide is recorded as
    ``failed``; without ``skip_errors`` every slide after the first failure is ``not run``
    (after a full output disk, also with ``skip_errors``).  A slide without tissue is ``no
    tissue`` (its store is complete, with ``n_tissue`` 0).  Slides locked by another
    process are tried again at the end, waiting up to ``options.busy_wait`` seconds
    (none after a failure).  Returns one result per slide, in order.  KeyboardInterrupt
    stops at once and leaves the current store unfinished.

    Reader processes are started with ``spawn``, which imports the calling script again:
    a script that calls this with ``workers > 0`` needs the usual
    ``if __name__ == "__main__":`` guard, and should import torch inside it.
    """
    from nic._processes import check_main_guard
    from nic.encoders import Encoder, load_encoder
    from nic.encoders._io import require_weights

    check_main_guard()  # in a reader re-running an unguarded script, this would wait for the parent's lock
    options = options or CompressOptions()
    files = collect_slides(slides)
    if isinstance(encoder, Encoder):
        enc = encoder
        require_weights(enc, None, options.random_init)
    else:
        seed = options.seed if options.random_init else None
        enc = load_encoder(encoder, device=options.device, seed=seed)
        require_weights(enc, encoder, options.random_init)
    if enc.random_init:
        logger.info(
            "compressing with a random initialisation of %s (seed %s): a baseline", enc.name, enc.source.get("seed")
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder; give a folder for the compressed slides")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    bars = _Bars(progress, len(files))
    cohort = _Cohort(enc, out, options, bars)
    results: list[SlideResult] = []
    stop: SlideResult | None = None  # the failure that ended the run
    try:
        with bars.running():
            for f in files:
                if stop is not None:
                    why = (
                        f"the output folder filled up at {stop.slide.name}"
                        if isinstance(stop.exception, OutputFullError)
                        else f"the run stopped after {stop.slide.name} failed"
                    )
                    results.append(SlideResult(f, store_path(out, slide_id_for(f)), "not run", error=f"not run: {why}"))
                    continue
                r = cohort.settle(cohort.run(f))
                results.append(r)
                bars.slide_done()
                if r.status == "failed" and (not skip_errors or isinstance(r.exception, OutputFullError)):
                    stop = r
            failed = any(r.status == "failed" for r in results)
            cohort.retry_busy(results, 0.0 if failed else options.busy_wait)
    finally:
        cohort.drop_pool()
    return results


def compress_slide(
    slide_path: str | Path,
    encoder: Any,
    out_dir: str | Path,
    options: CompressOptions | None = None,
    *,
    progress: bool = False,
    **fields: Any,
) -> Path:
    """Compress one slide into ``<out_dir>/<slide_id>.zarr`` and return the store's path.

    ``options`` (a :class:`CompressOptions`, default: its defaults) says how; keyword
    arguments replace single fields of it (``compress_slide(s, enc, out, workers=0,
    dihedral=True)``).  The grid lies at the encoder's um/px and patch size (stride =
    patch) over the slide's tissue.  A complete store is kept unless ``overwrite``; an
    unfinished one is rebuilt.  Errors: :class:`nic.errors.NicError` (e.g.
    :class:`~nic.errors.MppError` for a scan much coarser than the encoder's um/px,
    :class:`~nic.errors.EncoderError` for an encoder without weights unless
    ``random_init``, :class:`~nic.errors.StoreError` when another process still holds the
    slide's lock after ``busy_wait`` seconds, :class:`~nic.errors.SlideError` when the
    slide has no tissue: its store is then complete with ``n_tissue`` 0).
    """
    options = dataclasses.replace(options or CompressOptions(), **fields)
    [result] = compress_slides([slide_path], encoder, out_dir, options, progress=progress)
    if result.exception is not None:
        raise result.exception
    if result.status == "busy":
        raise StoreError(
            f"{result.store}: another process ({result.error}) is compressing this slide now; wait for it or use "
            "another `out_dir`"
        )
    if result.status == "no tissue":
        raise SlideError(
            f"{result.slide}: no tissue found (no grid cell at least {options.min_tissue:g} tissue); its store "
            f"{result.store} is complete but empty; check the slide or lower `min_tissue` (with `overwrite=True`)"
        )
    return result.store


def summary_table(results: Sequence[SlideResult]) -> Any:
    """A rich Table: slide, status, patches, seconds, patches/s, store or error."""
    from rich.table import Table

    table = Table("slide", "status", "patches", "seconds", "patches/s", "store / error")
    colour = {
        "done": "green",
        "skipped": "cyan",
        "no tissue": "magenta",
        "busy": "yellow",
        "failed": "red",
        "not run": "dim",
    }
    for r in results:
        table.add_row(
            r.slide.name,
            f"[{colour[r.status]}]{r.status}[/]",
            str(r.patches) if r.patches else "",
            f"{r.seconds:.1f}" if r.seconds else "",
            f"{r.patches_per_s:,.0f}" if r.patches else "",
            r.error if r.error else str(r.store),
        )
    return table
