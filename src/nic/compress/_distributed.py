"""Many slides on a Dask cluster: one task per slide, each the single-slide job of
:func:`nic.compress.compress_slides` run on a worker.

The client lists the slides, asks one worker to load the encoder and check the output
folder (the errors that stop a local run before any slide stop this one the same way),
then keeps one task in flight per worker thread.  Each task loads the encoder once per
worker process (a cache keyed by the encoder spec, device and seed), sets the worker's
torch threads and device, and calls ``compress_slides([slide], ...)``: the per-slide lock,
skip/resume and the ``complete`` marker are the local ones.  The results come back to the
client, which applies the local run's policy:

- the first failure stops the run (no new slide is started; the slides already running
  on other workers finish; the others are ``not run``) unless ``skip_errors``; a full
  output disk stops it in any case;
- ``busy`` slides (locked by another process) are tried again at the end, waiting up to
  ``CompressOptions.busy_wait`` seconds (none after a failure);
- a worker that dies mid-slide: the scheduler runs the slide again on another worker (up
  to ``distributed.scheduler.allowed-failures`` deaths, 3 by default); the lock of the
  dead process is an ``flock`` that the kernel dropped with it, so the retry takes it
  and rebuilds the unfinished store.  A task that raises is retried ``retries`` times.

With the same torch threads per process, the stores equal a local run's byte for byte
(the torch CPU kernels split their sums by thread count, so a different thread count
changes the last bits of some codes).

``dask`` and ``distributed`` are the optional extra ``cluster``; they are imported only
when a cluster is used.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nic._device import check_devices, parse_devices
from nic.compress._cohort import (
    OutputFullError,
    SlideResult,
    _Bars,
    collect_slides,
    compress_slides,
)
from nic.compress._pipeline import CompressOptions
from nic.errors import NicError, OptionError
from nic.store import slide_id_for, store_path

logger = logging.getLogger(__name__)

__all__ = [
    "ClusterOptions",
    "compress_on_cluster",
    "default_local_workers",
    "parse_devices",
    "check_devices",
    "worker_device",
]

INSTALL_HINT = "pip install 'neural-image-compression[cluster]'"
#: Encoders a worker keeps loaded (a worker usually serves one cohort, one encoder).
_MAX_ENCODERS = 2
#: Cores per worker of a ``local`` cluster without a count: the encoder's threads plus
#: the reader processes that feed it.
CORES_PER_LOCAL_WORKER = 4


def _distributed() -> Any:
    """The ``distributed`` module, or a one-line :class:`OptionError` naming the install."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as e:
        raise OptionError(
            f"`scheduler` and `devices` run on Dask, which is not installed ({e.name or e}); {INSTALL_HINT}"
        ) from e
    return distributed


# -- options ---------------------------------------------------------------------------------


def worker_device(name: Any, devices: Sequence[str], default: str) -> str:
    """The torch device of the worker called ``name``: ``devices[name]`` for the workers of
    a local cluster (named 0, 1, ...), ``default`` when no devices are given."""
    if not devices:
        return default
    try:
        i = int(name)
    except (TypeError, ValueError):
        raise OptionError(
            f"worker {name!r} is not a worker of a local cluster (named 0, 1, ...); `devices` places only those"
        ) from None
    if not 0 <= i < len(devices):
        raise OptionError(f"worker {i} has no device: `devices` gives {len(devices)} ({', '.join(devices)})")
    return devices[i]


def default_local_workers(cpus: int, n_slides: int) -> int:
    """Workers of a ``local`` cluster without a count: one per
    :data:`CORES_PER_LOCAL_WORKER` cores, at least one, at most one per slide."""
    return max(1, min(max(1, n_slides), cpus // CORES_PER_LOCAL_WORKER))


@dataclass(frozen=True)
class ClusterOptions:
    """Where the slides of :func:`compress_on_cluster` are compressed.

    ``scheduler``: ``"local"`` (a Dask ``LocalCluster`` of worker processes on this
    machine, :func:`default_local_workers` of them), ``"local:N"`` (N workers), the address
    of a running scheduler (``"tcp://host:8786"``), its scheduler file (``.json``, as
    ``dask scheduler --scheduler-file`` writes), or a connected ``distributed.Client`` (a
    cluster started in Python: dask-jobqueue, dask-kubernetes, dask-cuda).  ``devices``: one torch device per worker
    of a local cluster (worker ``i`` uses ``devices[i]``; :func:`parse_devices` reads
    ``"0,1"``); empty: every worker uses ``CompressOptions.device``.  ``torch_threads``:
    torch threads of each worker (None: the worker's cores divided by the Dask threads on
    its machine).  ``retries``: Dask retries of a slide whose task raised (a worker that
    dies is handled by the scheduler, see the module docstring).
    """

    scheduler: Any = "local"
    devices: tuple[str, ...] = ()
    torch_threads: int | None = None
    retries: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        kind, n = self.local_workers()
        if self.devices and kind != "local":
            raise OptionError(
                f"`devices` starts one worker per device on this machine, but `scheduler` is {self.scheduler!r}; "
                "give each worker of that cluster its device when starting it (CUDA_VISIBLE_DEVICES, or "
                "dask-cuda's LocalCUDACluster) and pass `device=cuda`"
            )
        if self.devices and n is not None and n != len(self.devices):
            raise OptionError(
                f"`scheduler` {self.scheduler!r} asks for {n} worker(s) but `devices` gives {len(self.devices)} "
                f"({', '.join(self.devices)}); one worker runs per device, so give `scheduler=local`"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise OptionError(f"`torch_threads` must be at least 1, got {self.torch_threads}")
        if self.retries < 0:
            raise OptionError(f"`retries` must be 0 or more, got {self.retries}")

    def local_workers(self) -> tuple[str, int | None]:
        """``("local", N or None)`` for a local cluster; ``("remote", None)`` for an address or
        file, ``("client", None)`` for a client."""
        if not isinstance(self.scheduler, str):
            return "client", None
        s = self.scheduler.strip()
        if s == "local":
            return "local", len(self.devices) or None
        if s.startswith("local:"):
            n = s.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise OptionError(f"`scheduler` {s!r}: the worker count after local: must be 1 or more, e.g. local:2")
            return "local", int(n)
        if "://" in s or s.endswith(".json"):
            return "remote", None
        raise OptionError(
            f"`scheduler` {s!r} is not local, local:N, a scheduler address (tcp://host:8786) or a scheduler file "
            "(.json)"
        )


# -- the worker side -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """What a worker needs to place its work: its device and its torch threads."""

    devices: tuple[str, ...]
    torch_threads: int | None
    #: Dask threads per host when the run started (for the default torch threads).
    host_threads: Mapping[str, int] = field(default_factory=dict)

    def apply(self, options: CompressOptions) -> tuple[CompressOptions, int]:
        """Set this worker's torch threads and CUDA device; the options with its device, and
        its share of its machine's cores."""
        import torch
        from dask.system import CPU_COUNT
        from distributed import get_worker
        from distributed.comm import get_address_host

        from nic._device import torch_device

        worker = get_worker()
        device = worker_device(worker.name, self.devices, options.device)
        on_host = self.host_threads.get(get_address_host(worker.address), worker.state.nthreads)
        share = max(1, CPU_COUNT // max(1, on_host))
        threads = self.torch_threads or share
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        dev = torch_device(device)  # a device this worker lacks is an OptionError: the slide fails, not the worker
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)  # pinned buffers and kernels on this worker's GPU only
        return replace(options, device=device), share


def _readers(options: CompressOptions, patch: int, cpus: int) -> CompressOptions:
    """``options`` with "auto" readers and batch size sized for this worker's ``cpus`` (not
    the whole machine's, which its other workers share), and no readers in a daemon process
    (which may not start any)."""
    if options.workers == "auto" or options.batch_size == "auto":
        options = options.resolved(patch, cpus=cpus)
    if options.workers and multiprocessing.current_process().daemon:
        _warn_daemon()
        options = replace(options, workers=0)
    return options


_encoders: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_encoders_lock = threading.Lock()
#: Keys of the encoders this process loaded, in order (a worker loads each once).
_loaded: list[tuple[Any, ...]] = []
_daemon_warned = False


def _warn_daemon() -> None:
    global _daemon_warned
    if not _daemon_warned:
        _daemon_warned = True
        logger.warning(
            "this Dask worker is a daemon process, which may not start reader processes: it reads the slides "
            "itself; set distributed.worker.daemon: false in the workers' Dask configuration to use readers"
        )


def _worker_encoder(spec: Any, options: CompressOptions) -> Any:
    """The encoder of ``spec`` on ``options.device``, loaded once per worker process.

    Built and checked the way :func:`compress_slides` builds a spec (seeded when
    ``random_init``; refused without weights otherwise).  An encoder object (scattered by
    the client) is used as it is.
    """
    from nic.encoders import Encoder, load_encoder
    from nic.encoders._io import require_weights

    if isinstance(spec, Encoder):
        return spec
    seed = options.seed if options.random_init else None
    key = (str(spec), str(options.device), options.random_init, seed)
    with _encoders_lock:
        enc = _encoders.get(key)
        if enc is not None:
            _encoders.move_to_end(key)
            return enc
        enc = load_encoder(spec, device=options.device, seed=seed)
        require_weights(enc, spec, options.random_init)
        _encoders[key] = enc
        _loaded.append(key)
        while len(_encoders) > _MAX_ENCODERS:
            _encoders.popitem(last=False)
        return enc


def _portable(e: BaseException | None) -> BaseException | None:
    """``e`` if it pickles (it travels back to the client), else a RuntimeError with its text."""
    if e is None:
        return None
    try:
        pickle.dumps(e)
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
    return e


def _prepare_task(spec: Any, out: str, options: CompressOptions, placement: _Placement) -> dict[str, Any]:
    """On one worker: load the encoder into its cache and check the output folder, with
    the checks a local run makes before any slide (they raise here, and on the client)."""
    import nic

    opts, cpus = placement.apply(options)
    enc = _worker_encoder(spec, opts)
    compress_slides([], enc, out, _readers(opts, int(enc.patch_size), cpus))
    return {"encoder": enc.name, "device": opts.device, "nic_version": nic.__version__}


def _slide_task(slide: str, spec: Any, out: str, options: CompressOptions, placement: _Placement) -> SlideResult:
    """On a worker: compress one slide with the single-slide job of :func:`compress_slides`."""
    path = Path(slide)
    try:
        opts, cpus = placement.apply(options)
        enc = _worker_encoder(spec, opts)
        [result] = compress_slides([path], enc, out, _readers(opts, int(enc.patch_size), cpus), skip_errors=True)
    except NicError as e:  # this worker cannot load the encoder or write the output folder
        result = SlideResult(path, store_path(out, slide_id_for(path)), "failed", error=str(e), exception=e)
    result.exception = _portable(result.exception)
    return result


def _loaded_encoders() -> list[tuple[Any, ...]]:
    """The encoder keys this worker process loaded (each once)."""
    return list(_loaded)


# -- the client side -------------------------------------------------------------------------


@contextlib.contextmanager
def _connect(cluster: ClusterOptions, n_slides: int) -> Iterator[Any]:
    """A Dask client for ``cluster``; a local cluster lives as long as the context."""
    distributed = _distributed()
    import dask

    kind, n = cluster.local_workers()
    if kind == "client":
        yield cluster.scheduler
        return
    if kind == "remote":
        s = cluster.scheduler.strip()
        if s.endswith(".json") and "://" not in s:
            if not Path(s).is_file():
                raise OptionError(f"`scheduler` {s}: no such scheduler file; give the file the scheduler wrote")
            try:
                client = distributed.Client(scheduler_file=s, timeout="30s")
            except (OSError, ValueError, KeyError, AssertionError, TypeError) as e:  # stale, or not one
                raise OptionError(
                    f"`scheduler` {s}: cannot reach a Dask scheduler through this scheduler file ({type(e).__name__}: "
                    f"{e}); is the scheduler running, and is this the file it wrote?"
                ) from e
        else:
            try:
                client = distributed.Client(s, timeout="30s")
            except OSError as e:
                raise OptionError(f"`scheduler` {s}: cannot reach a Dask scheduler there ({e})") from e
        with client:
            _wait_for_a_worker(client, s)
            yield client
        return
    from dask.system import CPU_COUNT

    workers = n or default_local_workers(CPU_COUNT, n_slides)
    # Non-daemon workers may start the reader processes (the Nanny reads this setting at
    # every worker start, restarts included, so it stays set while the cluster lives).
    # No memory limit: a slide's memory is bounded by the pipeline, and a Nanny that pauses
    # or kills a worker at a share of the machine's memory would only fail big encoders.
    with (
        dask.config.set({"distributed.worker.daemon": False}),
        distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=":0"
        ) as lc,
        distributed.Client(lc) as client,
    ):
        logger.info("local Dask cluster of %d worker(s) at %s", workers, lc.scheduler_address)
        yield client


#: seconds between the messages while a scheduler has no worker yet
WORKER_WAIT_S = 60.0


def _wait_for_a_worker(client: Any, scheduler: str) -> None:
    """Return once the scheduler has a worker, saying every :data:`WORKER_WAIT_S` seconds
    that it waits (workers of a batch queue may take long to start; Ctrl-C stops)."""
    waited = 0.0
    while True:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            return
        except TimeoutError:
            waited += WORKER_WAIT_S
            logger.warning(
                "the Dask scheduler %s has no worker yet (waited %.0f s); start workers for it (e.g. `dask worker "
                "%s`, or scale your dask-jobqueue/kubernetes cluster), or press Ctrl-C",
                scheduler, waited, scheduler,
            )  # fmt: skip


def _encoder_arg(client: Any, encoder: Any) -> Any:
    """What the tasks get for ``encoder``: a spec (paths made absolute, so that workers
    with another working folder find them), or an encoder object sent once to every worker."""
    from nic.encoders import Encoder

    if isinstance(encoder, Encoder):
        return client.scatter(encoder, broadcast=True, hash=False)
    spec = str(encoder)
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _threads_by_host(client: Any) -> dict[str, int]:
    hosts: dict[str, int] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        hosts[w["host"]] = hosts.get(w["host"], 0) + int(w["nthreads"])
    return hosts


def _task_result(future: Any, slide: Path, store: Path, killed: type[BaseException]) -> SlideResult:
    """The slide's result as the client reports it (the user's paths), failures included."""
    try:
        r: SlideResult = future.result()
    except killed as e:
        err = f"{slide}: the Dask workers compressing it died ({e}); its store is unfinished and a rerun rebuilds it"
        return SlideResult(slide, store, "failed", error=err, exception=RuntimeError(err))
    except Exception as e:
        return SlideResult(slide, store, "failed", error=f"{type(e).__name__}: {e}", exception=e)
    r.slide, r.store = slide, store
    return r


def compress_on_cluster(
    slides: Sequence[str | Path],
    encoder: Any,
    out_dir: str | Path,
    options: CompressOptions | None = None,
    cluster: ClusterOptions | Any = None,
    *,
    skip_errors: bool = False,
    progress: bool = False,
) -> list[SlideResult]:
    """:func:`nic.compress.compress_slides` with one Dask task per slide.

    ``cluster`` is a :class:`ClusterOptions` (default: a local cluster), or a scheduler
    for one (an address, ``"local:2"``, a ``distributed.Client``).  ``encoder`` is a spec
    (loaded once per worker; its files must be at the same path on every worker, as must
    the slides and ``out_dir``) or an encoder object (sent once to every worker).
    ``CompressOptions.workers`` reader processes run inside each worker.  The results,
    statuses and stores are those of a local run (see the module docstring for what
    differs: slides already running when one fails are finished).
    A missing ``dask``/``distributed`` is an :class:`OptionError` naming the install.
    """
    from nic._processes import check_main_guard

    check_main_guard()
    distributed = _distributed()
    options = options or CompressOptions()
    if cluster is None:
        cluster = ClusterOptions()
    elif not isinstance(cluster, ClusterOptions):
        cluster = ClusterOptions(scheduler=cluster)
    if cluster.local_workers()[0] == "client" and not isinstance(cluster.scheduler, distributed.Client):
        raise OptionError(
            f"`scheduler` is a {type(cluster.scheduler).__name__}; give local, local:N, an address, a scheduler "
            "file or a distributed.Client"
        )
    files = collect_slides(slides)
    out = Path(out_dir)
    stores = [store_path(out, slide_id_for(f)) for f in files]
    if cluster.devices:
        check_devices(cluster.devices)
    bars = _Bars(progress, len(files))
    with _connect(cluster, len(files)) as client:
        spec = _encoder_arg(client, encoder)
        placement = _Placement(cluster.devices, cluster.torch_threads, _threads_by_host(client))
        abs_out = str(out.absolute())
        info = client.submit(
            _prepare_task, spec, abs_out, options, placement, key=f"nic-prepare-{uuid.uuid4().hex[:8]}"
        ).result()
        import nic

        if info["nic_version"] != nic.__version__:
            logger.warning(
                "the Dask workers run nic %s, this process %s; the stores record the workers' version",
                info["nic_version"],
                nic.__version__,
            )
        run = _Run(client, distributed, spec, abs_out, placement, cluster.retries)
        with bars.running():
            results = run.first_pass(files, stores, options, skip_errors, bars)
            failed = any(r.status == "failed" for r in results)
            run.busy_pass(results, files, stores, replace(options, busy_wait=0.0 if failed else options.busy_wait))
    return results


class _Run:
    """The task loop of :func:`compress_on_cluster` on a connected client."""

    def __init__(self, client: Any, distributed: Any, spec: Any, out: str, placement: _Placement, retries: int):
        self.client, self.distributed = client, distributed
        self.spec, self.out, self.placement, self.retries = spec, out, placement, retries

    def _submit(self, slide: Path, options: CompressOptions) -> Any:
        key = f"nic-compress-{slide_id_for(slide)}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(
            _slide_task, str(slide.absolute()), self.spec, self.out, options, self.placement,
            key=key, retries=self.retries, pure=False,
        )  # fmt: skip

    def _slots(self) -> int:
        """Tasks to keep in flight: one per worker thread now (workers may come and go)."""
        return max(1, sum(self.client.nthreads().values()))

    def first_pass(
        self,
        files: list[Path],
        stores: list[Path],
        options: CompressOptions,
        skip_errors: bool,
        bars: _Bars,
    ) -> list[SlideResult]:
        """Every slide once; busy ones are checked once more at once, as a local run does."""
        first = replace(options, busy_wait=0.0)
        results: list[SlideResult | None] = [None] * len(files)
        waiting = list(range(len(files)))
        running: dict[Any, int] = {}
        done = self.distributed.as_completed()
        stop: SlideResult | None = None
        killed = self.distributed.KilledWorker
        try:
            while waiting and len(running) < self._slots():
                i = waiting.pop(0)
                fut = self._submit(files[i], first)
                running[fut] = i
                done.add(fut)
            for fut in done:
                i = running.pop(fut)
                r = _task_result(fut, files[i], stores[i], killed)
                results[i] = r
                bars.slide_done()
                logger.info("%s: %s (%d patches, %.1f s)", files[i], r.status, r.patches, r.seconds)
                if (
                    r.status == "failed"
                    and stop is None
                    and (not skip_errors or isinstance(r.exception, OutputFullError))
                ):
                    stop = r
                while stop is None and waiting and len(running) < self._slots():
                    j = waiting.pop(0)
                    nxt = self._submit(files[j], first)
                    running[nxt] = j
                    done.add(nxt)
        except BaseException:
            self.client.cancel(list(running))
            raise
        if stop is not None:
            why = (
                f"the output folder filled up at {stop.slide.name}"
                if isinstance(stop.exception, OutputFullError)
                else f"the run stopped after {stop.slide.name} failed"
            )
            for i in waiting:
                results[i] = SlideResult(files[i], stores[i], "not run", error=f"not run: {why}")
        return [r for r in results if r is not None]

    def busy_pass(
        self, results: list[SlideResult], files: list[Path], stores: list[Path], options: CompressOptions
    ) -> None:
        """The busy slides again, in place, each waiting up to ``options.busy_wait`` seconds
        for its holder (on a worker, as :func:`compress_slides` waits)."""
        pending = [i for i, r in enumerate(results) if r.status == "busy"]
        if not pending:
            return
        if options.busy_wait > 0:
            names = ", ".join(files[i].name for i in pending)
            logger.warning(
                "waiting up to %.0f s for %d slide(s) that other processes hold: %s",
                options.busy_wait,
                len(pending),
                names,
            )
        t0 = time.monotonic()
        futures = {self._submit(files[i], options): i for i in pending}
        try:
            for fut in self.distributed.as_completed(futures):
                i = futures[fut]
                results[i] = _task_result(fut, files[i], stores[i], self.distributed.KilledWorker)
        except BaseException:
            self.client.cancel(list(futures))
            raise
        logger.info("busy slides settled in %.1f s", time.monotonic() - t0)
