"""Read throughput: nic's fast TIFF tile path against OpenSlide's read_region.

Reads the same randomly ordered, distinct 256 x 256 px level-0 tiles of a generated
40,000 x 40,000 px slide (pyramidal JPEG TIFF at 0.5 um/px) three ways, one core each:

- ``openslide``: ``openslide.OpenSlide.read_region`` to a NumPy RGB array, as peer tools do;
- ``nic``: ``Slide.read_region`` on the fast path (pread + imagecodecs through tifffile);
- ``nic-openslide``: ``Slide.read_region`` with ``backend="openslide"`` (our overhead on top).

Also reads 128 px patches at 0.5 um/px (4 per tile) through both, the compression access
pattern.  Ratios are measured in one run, so machine noise hits both sides alike.

    python benchmarks/bench_read.py [--size 40000] [--tiles 2000] [--slide PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_slide(folder: Path, size: int, seed: int) -> Path:
    from nic.synth import make_cohort

    cohort = make_cohort(folder, n_slides=1, size=size, seed=seed)
    return cohort.slides[0]


def timed(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000, help="side of the generated slide, level-0 px")
    ap.add_argument("--tiles", type=int, default=2000, help="distinct tiles read per reader")
    ap.add_argument("--slide", type=Path, help="read this slide instead of generating one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import openslide

    import nic

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = args.slide or make_slide(Path(tmp), args.size, args.seed)
        made = time.perf_counter() - t0
        fast = nic.open_slide(path, mpp=None if args.slide is None else None)
        if fast.backend != "tiff":
            raise SystemExit(f"{path}: the fast path does not apply ({fast.backend})")
        fast._reader._cache_bytes = 0  # every read decodes: no help from the tile cache
        ref = nic.open_slide(path, backend="openslide")
        raw = openslide.OpenSlide(str(path))
        w, h = fast.dimensions
        rng = np.random.default_rng(args.seed)
        cols, rows = w // 256, h // 256
        picks = rng.choice(cols * rows, size=min(args.tiles, cols * rows), replace=False)
        tiles = [(int(p % cols) * 256, int(p // cols) * 256) for p in picks]
        n = len(tiles)

        results = {
            "openslide": timed(lambda xy: np.asarray(raw.read_region(xy, 0, (256, 256)).convert("RGB")), tiles),
            "nic": timed(lambda xy: fast.read_region(xy, (256, 256)), tiles),
            "nic-openslide": timed(lambda xy: ref.read_region(xy, (256, 256)), tiles),
        }
        patches = [(x + dx, y + dy) for x, y in tiles[: n // 4] for dy in (0, 128) for dx in (0, 128)]
        fast._reader._cache_bytes = 64 * 2**20  # patch reads share tiles, as in compression
        p_fast = timed(lambda xy: fast.read_region(xy, (128, 128), mpp=0.5), patches)
        p_os = timed(lambda xy: np.asarray(raw.read_region(xy, 0, (128, 128)).convert("RGB")), patches)

    print(f"slide: {w} x {h} px, {fast.levels.__len__()} levels, made in {made:.1f} s; {n} distinct 256-px tiles")
    base = n / results["openslide"]
    print(f"{'reader':16s} {'tiles/s':>10s} {'x openslide':>12s}")
    for name, sec in results.items():
        print(f"{name:16s} {n / sec:10.0f} {n / sec / base:12.2f}")
    print(
        f"128-px patches at 0.5 um/px: nic {len(patches) / p_fast:.0f}/s, openslide {len(patches) / p_os:.0f}/s, "
        f"ratio {p_os / p_fast:.2f}"
    )


if __name__ == "__main__":
    main()
