"""Compression on a Dask cluster: the same stores and summary as one process, the local
run's stopping rules, a worker killed mid-slide, the command line, devices per worker.

The cohort is generated (``nic.synth``, 3 slides of 4096 px, ~600 tissue patches each);
the encoder is ``nic-cnn`` with a fixed random initialisation, saved once.  The reference
is a local run on one torch thread, the workers' thread count here: the torch CPU kernels
split their sums by thread count, so only equal counts give equal bits.

The default run keeps what proves the feature (a cluster run equals the local run; a
worker killed mid-slide loses nothing) and the cheap refusals; ``-m slow`` adds the
stopping rules, busy slides, encoder objects and the command line on a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import nic
from nic.cli import app
from nic.compress import (
    ClusterOptions,
    CompressOptions,
    SlideLock,
    compress_on_cluster,
    compress_slides,
    parse_devices,
    worker_device,
)
from nic.errors import EncoderError, NicError, OptionError
from nic.store import is_complete, open_store, store_path

distributed = pytest.importorskip("distributed")

#: The runs here: no reader processes, on the CPU (the reference's bits are those of the
#: CPU kernels at one thread; a CUDA device, the default where there is one, gives others).
ON_CPU = CompressOptions(workers=0, device="cpu")


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Three generated slides (read-only)."""
    from nic.synth import CohortConfig, make_cohort

    out = tmp_path_factory.mktemp("cohort") / "c"
    return make_cohort(out, 3, 4096, seed=0, config=CohortConfig(variants=2, transforms=2)).slides


def _features(store: Path) -> bytes:
    return np.asarray(open_store(store).features[...]).tobytes()


@pytest.fixture(scope="module")
def reference(slides, encoder_dir, tmp_path_factory) -> dict[str, tuple[str, int, bytes]]:
    """slide name -> (status, patches, features bytes) of a local run on one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        results = compress_slides(slides, encoder_dir, out, ON_CPU)
    finally:
        torch.set_num_threads(before)
    return {r.slide.name: (r.status, r.patches, _features(r.store)) for r in results}


@pytest.fixture(scope="module")
def address():
    """The scheduler address of a ``local:2`` cluster as ``--scheduler local:2`` starts it (two
    worker processes, one thread each, allowed to start reader processes).  One test kills
    a worker; its Nanny starts a fresh one under the same name, so the cluster stays whole."""
    from nic.compress._distributed import _connect

    with _connect(ClusterOptions("local:2"), 2) as client:
        client.wait_for_workers(2)
        yield client.scheduler.address


def _check_equal(results, reference) -> None:
    assert {r.slide.name: (r.status, r.patches) for r in results} == {k: v[:2] for k, v in reference.items()}
    for r in results:
        assert _features(r.store) == reference[r.slide.name][2], r.slide.name


def _loads(address: str) -> dict[str, list]:
    from nic.compress._distributed import _loaded_encoders

    with distributed.Client(address) as client:
        return client.run(_loaded_encoders)


# -- a cluster run against the local run ------------------------------------------------------


def test_cluster_run_equals_the_local_run_and_loads_the_encoder_once_per_worker(
    slides, encoder_dir, reference, address, tmp_path
):
    cluster = ClusterOptions(scheduler=address, torch_threads=1)
    results = compress_on_cluster(slides, encoder_dir, tmp_path / "out", ON_CPU, cluster)
    assert [r.slide for r in results] == slides
    assert [r.store for r in results] == [store_path(tmp_path / "out", s.stem) for s in slides]
    _check_equal(results, reference)
    loads = _loads(address)
    assert len(loads) == 2 and all(len(v) <= 1 for v in loads.values()), loads
    assert sum(len(v) for v in loads.values()) < len(slides)
    assert not list((tmp_path / "out").glob("*.lock"))

    # a rerun skips the complete stores, as a local rerun does
    again = compress_on_cluster(slides, encoder_dir, tmp_path / "out", ON_CPU, cluster)
    assert [r.status for r in again] == ["skipped"] * len(slides)
    assert all(len(v) <= 1 for v in _loads(address).values())


@pytest.mark.slow  # an encoder object scattered to the workers gives the reference codes (~2 s)
def test_an_encoder_object_is_sent_to_the_workers(slides, encoder_dir, reference, address, tmp_path):
    cluster = ClusterOptions(scheduler=address, torch_threads=1)
    enc = nic.load_encoder(encoder_dir)
    [r] = compress_on_cluster(slides[:1], enc, tmp_path, ON_CPU, cluster)
    assert r.status == "done" and _features(r.store) == reference[slides[0].name][2]


@pytest.mark.slow  # the local run's stopping rule and --skip-errors on a cluster (~5 s)
def test_first_failure_stops_the_run_as_a_local_run_does(slides, encoder_dir, address, tmp_path):
    bad = tmp_path / "broken.tif"  # not a slide: fails at once
    bad.write_bytes(b"II*\x00 not a slide")
    todo = [bad, *slides]
    opts = ON_CPU
    local = compress_slides(todo, encoder_dir, tmp_path / "local", opts)
    cluster = ClusterOptions(scheduler=address, torch_threads=1)
    results = compress_on_cluster(todo, encoder_dir, tmp_path / "o1", opts, cluster)
    assert results[0].status == local[0].status == "failed"
    assert results[0].error == local[0].error and type(results[0].exception) is type(local[0].exception)
    # the slide started beside the failing one may finish; no slide is started after it
    assert results[-1].status == "not run" and results[-1].error == local[-1].error
    assert {r.status for r in results[1:]} <= {"done", "not run"}
    for r in results:
        assert (r.status == "done") == is_complete(r.store), r.slide.name
        if r.status == "not run":
            assert not r.store.exists()

    skipped = compress_on_cluster(todo[:2], encoder_dir, tmp_path / "o2", opts, cluster, skip_errors=True)
    assert [r.status for r in skipped] == ["failed", "done"]


def test_checks_before_any_slide_raise_as_in_a_local_run(slides, encoder_dir, address, tmp_path):
    cluster = ClusterOptions(scheduler=address, torch_threads=1)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(NicError) as local:
        compress_slides(slides[:1], encoder_dir, not_a_folder, ON_CPU)
    with pytest.raises(type(local.value)) as remote:
        compress_on_cluster(slides[:1], encoder_dir, not_a_folder, ON_CPU, cluster)
    assert str(remote.value) == str(local.value)

    with pytest.raises(EncoderError, match="has no weights"):  # a registry name without weights or random_init
        compress_on_cluster(slides[:1], "nic-cnn", tmp_path / "o", ON_CPU, cluster)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a locked slide is busy, then done once its holder lets go during the wait (~3 s)
def test_busy_slide_is_left_to_its_holder_then_done(slides, encoder_dir, reference, address, tmp_path):
    cluster = ClusterOptions(scheduler=address, torch_threads=1)
    opts = replace(ON_CPU, busy_wait=0)
    held = store_path(tmp_path, slides[0].stem)
    with SlideLock(held) as lock:
        assert lock.acquire()
        [r] = compress_on_cluster(slides[:1], encoder_dir, tmp_path, opts, cluster)
        assert r.status == "busy" and f"pid {os.getpid()}" in r.error
    assert not held.exists()
    # a holder that lets go unfinished during the end-of-run wait: the slide is compressed then
    with SlideLock(held) as lock:
        assert lock.acquire()
        threading.Timer(1.0, lock.release).start()
        [r] = compress_on_cluster(slides[:1], encoder_dir, tmp_path, replace(opts, busy_wait=60), cluster)
    assert r.status == "done"
    assert _features(r.store) == reference[slides[0].name][2]


def test_workers_get_their_devices_by_name(address):
    from nic.compress._distributed import _Placement

    placement = _Placement(("cpu", "meta"), 1, {})  # any two devices this machine has

    def device() -> str:
        return placement.apply(CompressOptions(device="cpu"))[0].device

    with distributed.Client(address) as client:
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        got = {names[a]: client.submit(device, workers=[a], pure=False).result() for a in names}
    assert got == {0: "cpu", 1: "meta"}


# -- a worker killed mid-slide ------------------------------------------------------------------


class KillOnce(distributed.WorkerPlugin):
    """SIGKILLs the worker that holds ``store``'s lock once the store exists unfinished,
    the first time only (``marker`` records it, for every worker and its restarts)."""

    def __init__(self, store: str, marker: str) -> None:
        self.store, self.marker = Path(store), Path(marker)

    def setup(self, worker: object) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        lock = self.store.with_name(self.store.name + ".lock")
        me = f"pid {os.getpid()} "
        while not self.marker.exists():
            try:
                holder = lock.read_text()
            except OSError:
                holder = ""
            if holder.startswith(me) and (self.store / "zarr.json").is_file() and not is_complete(self.store):
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.write(fd, f"{os.getpid()}\n".encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)


def test_a_worker_killed_mid_slide_ends_with_every_slide_complete_and_equal(
    slides, encoder_dir, reference, address, tmp_path
):
    out = tmp_path / "out"
    victim = store_path(out, slides[1].stem)
    marker = tmp_path / "killed"
    with distributed.Client(address) as client:
        before = set(client.scheduler_info()["workers"])
        client.register_plugin(KillOnce(str(victim), str(marker)), name="kill-once")
        try:
            results = compress_on_cluster(
                slides, encoder_dir, out, ON_CPU, ClusterOptions(scheduler=client, torch_threads=1)
            )
        finally:
            client.unregister_worker_plugin("kill-once")
        client.wait_for_workers(2)
        after = set(client.scheduler_info()["workers"])
    assert marker.is_file(), "no worker was killed"
    assert len(before - after) == 1  # the killed worker is gone, a fresh one took its name
    _check_equal(results, reference)
    assert all(is_complete(r.store) for r in results)
    assert not list(out.glob("*.lock"))  # the dead worker's lock file was taken over, then released


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.slow  # the command line on a running cluster, reader processes inside workers, a rerun (~5 s)
def test_cli_scheduler_address(slides, encoder_dir, reference, address, tmp_path):
    """The command line on a running cluster, one reader process per slide inside each worker."""
    out = tmp_path / "out"
    todo = slides[:2]
    args = ["compress", *map(str, todo), "--encoder", str(encoder_dir), "--out", str(out), "--workers", "1",
            "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--scheduler", address, "--torch-threads", "1", "--progress"])
    assert res.exit_code == 0, res.output
    assert res.output.count(" done ") == len(todo), res.output
    for s in todo:
        assert _features(store_path(out, s.stem)) == reference[s.name][2]
    res = CliRunner().invoke(app, [*args, "--scheduler", address, "--torch-threads", "1"])  # a rerun
    assert res.exit_code == 0 and res.output.count(" skipped ") == len(todo), res.output


@pytest.mark.slow  # a cluster start of its own (~10-20 s here); the address fixture runs the same _connect code
def test_cli_scheduler_local_2_end_to_end(slides, encoder_dir, reference, tmp_path):
    """``--scheduler local:2`` starts its own cluster, compresses, and closes it."""
    out = tmp_path / "out"
    args = ["compress", *map(str, slides), "--encoder", str(encoder_dir), "--out", str(out), "--workers", "0",
            "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--scheduler", "local:2", "--torch-threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count(" done ") == len(slides), res.output
    for s in slides:
        assert _features(store_path(out, s.stem)) == reference[s.name][2]


@pytest.mark.slow  # a cluster start of its own
def test_cli_devices_cpu_cpu_runs_one_worker_per_device(slides, encoder_dir, reference, tmp_path):
    out = tmp_path / "out"
    args = ["compress", *map(str, slides), "--encoder", str(encoder_dir), "--out", str(out), "--workers", "0"]
    res = CliRunner().invoke(app, ["-v", *args, "--devices", "cpu,cpu", "--torch-threads", "1"])
    assert res.exit_code == 0, res.output
    assert "local Dask cluster of 2 worker(s)" in res.output, res.output
    for s in slides:
        assert _features(store_path(out, s.stem)) == reference[s.name][2]


def test_cli_devices_refuse_cuda_without_it_and_bad_combinations(slides, tmp_path):
    import torch

    runner = CliRunner()
    base = ["compress", str(slides[0]), "--encoder", "mean-rgb", "--out", str(tmp_path / "o")]
    if not torch.cuda.is_available():
        res = runner.invoke(app, [*base, "--devices", "0,1"])
        assert res.exit_code == 2
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "--devices" in lines[0] and "no CUDA device" in lines[0], res.output
    res = runner.invoke(app, [*base, "--devices", "cpu,cpu", "--scheduler", "local:3"])
    assert res.exit_code == 2 and "--devices" in res.output and "local:3" in res.output, res.output
    res = runner.invoke(app, [*base, "--devices", "cpu", "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "one worker per device on this machine" in res.output, res.output
    res = runner.invoke(app, [*base, "--scheduler", "yarn"])
    assert res.exit_code == 2 and "--scheduler 'yarn' is not local" in res.output, res.output
    res = runner.invoke(app, [*base, "--torch-threads", "2"])
    assert res.exit_code == 2 and "--scheduler" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_devices_and_worker_names():
    assert parse_devices("0,1") == ("cuda:0", "cuda:1")
    assert parse_devices(" cpu, cpu ") == ("cpu", "cpu")
    assert parse_devices(["cuda:1", "3"]) == ("cuda:1", "cuda:3")
    with pytest.raises(OptionError, match="empty entry"):
        parse_devices("0,,1")
    assert worker_device(1, ("cuda:0", "cuda:1"), "cpu") == "cuda:1"
    assert worker_device("tcp://x:1", (), "cuda") == "cuda"
    with pytest.raises(OptionError, match="not a worker of a local cluster"):
        worker_device("gpu-node-3", ("cuda:0",), "cpu")
    with pytest.raises(OptionError, match="no device"):
        worker_device(2, ("cuda:0", "cuda:1"), "cpu")
    assert ClusterOptions(devices=("cpu", "cpu")).local_workers() == ("local", 2)
    assert ClusterOptions("local:3").local_workers() == ("local", 3)
    assert ClusterOptions("tcp://h:8786").local_workers() == ("remote", None)
    with pytest.raises(OptionError, match="must be 1 or more"):
        ClusterOptions("local:0")


def test_nic_imports_without_dask_and_says_how_to_install_it(slides, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["dask"] = None  # as if not installed
        sys.modules["distributed"] = None
        import nic, nic.compress, nic.cli
        from nic.cli import app
        from typer.testing import CliRunner
        res = CliRunner().invoke(app, ["compress", {str(slides[0])!r}, "--encoder", "mean-rgb", "--out",
                                       {str(tmp_path / "o")!r}, "--scheduler", "local:2"])
        print(res.exit_code)
        print(res.output)
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    code_line, *lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert code_line == "2" and len(lines) == 1, p.stdout
    assert "pip install 'neural-image-compression[cluster]'" in lines[0] and "--scheduler" in lines[0]


def test_a_scheduler_without_workers_is_waited_for_aloud(monkeypatch, caplog):
    """A reachable scheduler with no worker yet (a batch queue still starting them): the
    client says so every WORKER_WAIT_S seconds instead of waiting in silence, and goes on
    when a worker joins."""
    import logging

    from nic.compress import _distributed

    monkeypatch.setattr(_distributed, "WORKER_WAIT_S", 0.3)
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as lc,
        distributed.Client(lc) as client,
        caplog.at_level(logging.WARNING, logger="nic"),
    ):
        timer = threading.Timer(1.2, lc.scale, args=(1,))
        timer.start()
        try:
            _distributed._wait_for_a_worker(client, lc.scheduler_address)
        finally:
            timer.cancel()
        assert len(client.scheduler_info()["workers"]) == 1
    waits = [r.getMessage() for r in caplog.records if "has no worker yet" in r.getMessage()]
    assert waits and "start workers for it" in waits[0], caplog.text


def test_a_scheduler_file_that_is_not_one_is_a_one_line_error(slides, tmp_path):
    bad = tmp_path / "scheduler.json"
    bad.write_text("this is not what a Dask scheduler writes")
    res = CliRunner().invoke(
        app,
        ["compress", str(slides[0]), "--encoder", "mean-rgb", "--out", str(tmp_path / "o"), "--scheduler", str(bad)],
    )
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: --scheduler {bad}: cannot reach a Dask scheduler through this scheduler file")
    assert not (tmp_path / "o").exists()
