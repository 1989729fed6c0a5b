"""Time writing one generated slide: a 40,000 x 40,000 px slide (and 100,000 px with --huge).

Usage::

    python benchmarks/bench_synth.py            # 40,000 px
    python benchmarks/bench_synth.py --huge     # also 100,000 px (needs ~2 GB of disk)
    python benchmarks/bench_synth.py --size 20000 --keep /tmp/bench

Prints, per size: seconds in total (plan + texture pool + writing), seconds writing the
pyramid alone, file size, MB/s written and level-0 megapixels per second.  The target on
a 2-core machine is under a minute for 40,000 px.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def bench(size: int, out: Path, seed: int) -> dict[str, float]:
    from nic.slide import open_slide
    from nic.synth import CohortConfig
    from nic.synth._cohort import TexturePool, _render, plan_cohort

    cfg = CohortConfig()
    t0 = time.perf_counter()
    plan = plan_cohort(1, size, seed, cfg)[0]
    t1 = time.perf_counter()
    pool = TexturePool.draw(seed, cfg)
    t2 = time.perf_counter()
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    path, _ = _render(out, plan, seed, cfg, pool)
    t3 = time.perf_counter()
    mb = path.stat().st_size / 1e6
    with open_slide(path) as s:  # the result must open and read
        s.read_region((s.dimensions[0] // 2, s.dimensions[1] // 2), (512, 512), mpp=0.5)
        levels = len(s.levels)
    w, h = plan.row["width"], plan.row["height"]
    return {
        "size": float(w),
        "levels": float(levels),
        "plan_s": t1 - t0,
        "pool_s": t2 - t1,
        "write_s": t3 - t2,
        "total_s": t3 - t0,
        "mb": mb,
        "mb_per_s": mb / (t3 - t2),
        "mpx_per_s": w * h / 1e6 / (t3 - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000, help="level-0 side in px (default 40000)")
    ap.add_argument("--huge", action="store_true", help="also time a 100,000 px slide")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the slides")
    args = ap.parse_args()
    sizes = [args.size] + ([100_000] if args.huge else [])
    root = args.keep or Path(tempfile.mkdtemp(prefix="nic-bench-synth-"))
    try:
        for size in sizes:
            r = bench(size, root / f"s{size}", args.seed)
            print(
                f"{int(r['size'])} x {int(r['size'])} px, {int(r['levels'])} levels: total {r['total_s']:.1f} s "
                f"(plan {r['plan_s']:.1f}, textures {r['pool_s']:.1f}, write {r['write_s']:.1f}); "
                f"{r['mb']:.0f} MB at {r['mb_per_s']:.0f} MB/s; {r['mpx_per_s']:.0f} Mpx/s overall",
                flush=True,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
