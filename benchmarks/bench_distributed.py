"""A cohort compressed on a local Dask cluster against one process (ratios from one run).

    python benchmarks/bench_distributed.py [--slides 6] [--size 8192] [--cluster-workers 2] [--readers 2]

Rows of the table (the same generated cohort, ``nic-cnn`` with a seeded random
initialisation, each run into an empty output folder):

(a)  one process, ``compress_slides`` with torch on every core: the baseline;
(a') one process with torch on as many threads as one cluster worker gets: the run whose
     stores the cluster must equal bit for bit (torch's CPU kernels split their sums by
     thread count, so (a) may differ from it in the last bits of some codes);
(b)  ``compress_on_cluster`` with ``scheduler=local:N`` end to end: the cluster started,
     every slide compressed, the cluster closed;
(b') the same on a cluster already running, its workers warmed up on a slide each (what a
     long-lived cluster costs per cohort).

Asserted: (b) and (b') give the statuses, patch counts and ``features`` bytes of (a');
(a) is within float16 rounding of them.  Printed: wall seconds and each row's time as a
ratio to (a) and to (a') (column ``a_``: on a machine shared with other jobs, torch on
every core can be slower than on one thread, so both one-process runs are baselines).
With N workers on N cores expect ~1x at best: one process already keeps every core busy,
so a cluster pays off with more machines or GPUs, not on one CPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _features(store: Path) -> np.ndarray:
    from nic.store import open_store

    return np.asarray(open_store(store).features[...])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=8192, help="level-0 side of each slide in px (at least 4096)")
    ap.add_argument("--cluster-workers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2, help="reader processes per slide (CompressOptions.workers)")
    ap.add_argument("--encoder", default="nic-cnn")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cohort and stores (default: a temp one)")
    args = ap.parse_args()

    import torch
    from dask.system import CPU_COUNT

    from nic.compress import ClusterOptions, CompressOptions, compress_on_cluster, compress_slides
    from nic.compress._distributed import _connect
    from nic.synth import CohortConfig, make_cohort

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    config = CohortConfig(variants=2, transforms=2)
    slides = make_cohort(work / "cohort", args.slides, args.size, seed=0, config=config, overwrite=True).slides
    options = CompressOptions(workers=args.readers, random_init=True, seed=0)
    n = args.cluster_workers
    share = max(1, CPU_COUNT // n)
    print(
        f"{len(slides)} slides of {args.size} px, {args.encoder}, {args.readers} reader(s) per slide, "
        f"{CPU_COUNT} cores; cluster: {n} workers x {share} torch thread(s)"
    )

    def fresh(name: str) -> Path:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    seconds: dict[str, float] = {}
    results: dict[str, list] = {}

    def local(key: str, threads: int) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            results[key] = compress_slides(slides, args.encoder, fresh(key), options)
            seconds[key] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    local("a", CPU_COUNT)
    local("a2", share)
    t0 = time.perf_counter()
    results["b"] = compress_on_cluster(
        slides, args.encoder, fresh("b"), options, ClusterOptions(f"local:{n}", torch_threads=share)
    )
    seconds["b"] = time.perf_counter() - t0
    with _connect(ClusterOptions(f"local:{n}"), len(slides)) as client:
        client.wait_for_workers(n)
        running = ClusterOptions(client, torch_threads=share)
        compress_on_cluster(slides[:n], args.encoder, fresh("warmup"), options, running)  # imports torch, loads nic-cnn
        t0 = time.perf_counter()
        results["b2"] = compress_on_cluster(slides, args.encoder, fresh("b2"), options, running)
        seconds["b2"] = time.perf_counter() - t0

    # -- the outputs: the cluster's stores are (a')'s, bit for bit ----------------------------
    def summary(key: str) -> list[tuple[str, str, int]]:
        return [(r.slide.name, r.status, r.patches) for r in results[key]]

    worst = 0.0
    for key in ("b", "b2"):
        assert summary(key) == summary("a2"), (key, summary(key), summary("a2"))
        for r, ref in zip(results[key], results["a2"]):
            assert _features(r.store).tobytes() == _features(ref.store).tobytes(), (key, r.slide.name)
    for r, ref in zip(results["a"], results["a2"]):
        a, b = _features(r.store).astype(np.float32), _features(ref.store).astype(np.float32)
        worst = max(worst, float(np.abs(a - b).max()))
        assert np.allclose(a, b, rtol=2e-3, atol=1e-4), r.slide.name
    patches = sum(r.patches for r in results["a"])

    labels = {
        "a": f"(a)  one process, {CPU_COUNT} torch threads",
        "a2": f"(a') one process, {share} torch thread(s)",
        "b": f"(b)  local:{n} cluster, started and closed",
        "b2": f"(b') local:{n} cluster, already running",
    }
    print(f"{patches} patches; stores of (b), (b') == (a') byte for byte; (a) vs (a') max |diff| {worst:.2g}")
    print(f"{'run':44s} {'seconds':>8s} {'patches/s':>10s} {'time / (a)':>11s} {'time / (a_)':>11s}")
    for key, label in labels.items():
        t = seconds[key]
        print(f"{label:44s} {t:8.1f} {patches / t:10.0f} {t / seconds['a']:10.2f}x {t / seconds['a2']:10.2f}x")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
