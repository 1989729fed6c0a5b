"""Tissue detection on a huge single-level slide: time and peak memory.

Writes a generated slide with level 0 only (default 100,000 x 100,000 px, JPEG tiles),
then runs ``nic.tissue_mask`` at 8 um/px.  Level 0 alone would be 30 GB of RGB; the mask
is built from strips, so peak memory stays a small multiple of one strip.

    python benchmarks/bench_tissue.py [--size 100000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000, help="side of the single-level slide, px")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import nic
    from nic.synth import CohortConfig, make_cohort

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cohort = make_cohort(Path(tmp), 1, args.size, args.seed, config=CohortConfig(pyramid=False))
        made = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with nic.open_slide(cohort.slides[0]) as s:
            assert len(s.levels) == 1, s.levels
            t0 = time.perf_counter()
            tm = nic.tissue_mask(s, mpp=8.0)
            sec = time.perf_counter() - t0
            w, h = s.dimensions
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpx = w * h / 1e9
    print(
        f"single-level slide {w} x {h} px ({gpx:.1f} gigapixels, {w * h * 3 / 2**30:.0f} GiB as RGB), written in "
        f"{made:.0f} s"
    )
    print(
        f"tissue_mask at 8 um/px: {sec:.1f} s ({gpx / sec:.2f} gigapixels/s), mask {tm.mask.shape}, "
        f"{100 * tm.fraction:.0f}% tissue"
    )
    print(f"peak RSS {peak:.0f} MiB (before masking {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
