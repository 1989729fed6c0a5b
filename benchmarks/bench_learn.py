"""Seconds per training epoch of the slide-level models over compressed slides, on this CPU.

Writes N planted stores (default 200 slides, 64 x 64 cells, C = 128, float16) to a
temporary folder, then times full training epochs (one random crop per slide, the
default crop = the whole 64-cell grid, batch 16, augmentation on) and one test-time pass
(1 crop x 1 view per slide; the default test-time
averaging uses 8 views, 8 x that time).  Run: ``python benchmarks/bench_learn.py [--slides 200]
[--grid 64] [--channels 128] [--threads 2] [--models nic-cnn,meanpool,abmil] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--models", default="nic-cnn,meanpool,abmil")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    a = ap.parse_args()

    import numpy as np
    import torch

    from nic.learn import FitConfig, LabelSpec, fit_model, load_cohort
    from nic.learn.data import open_sources
    from nic.synth import make_planted_cohort

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        c = make_planted_cohort(Path(tmp), a.slides, grid=(a.grid, a.grid), code_size=a.channels, n_pairs=8, seed=0)
        t_gen = time.perf_counter() - t0
        co = load_cohort(c.stores, LabelSpec(c.labels, "regression", target="proliferation"))
        t0 = time.perf_counter()
        src = open_sources(co.store_paths)
        for s in src:  # read every store once (the in-memory cache), timed separately
            s.crop(0, 0, 1)
        t_read = time.perf_counter() - t0
        allp = np.arange(len(co.patients))
        print(
            f"{a.slides} slides {a.grid}x{a.grid} C={a.channels}, {a.threads} threads, device {a.device}; "
            f"generate {t_gen:.1f} s, open+read {t_read:.1f} s"
        )
        for name in a.models.split(","):
            cfg = FitConfig(model=name, epochs=a.epochs, batch_size=16, device=a.device)
            m, hist = fit_model(co, src, allp, allp[:0], cfg, seed=0)
            per_epoch = hist.seconds / len(hist.train_loss)
            t0 = time.perf_counter()
            m.predict_raw(src, n_crops=1, variants=False)
            t_pred = time.perf_counter() - t0
            print(
                f"{name:9s} train {per_epoch:6.2f} s/epoch (mean of {a.epochs}); "
                f"predict {a.slides} slides x 1 view {t_pred:.2f} s (x8 with variant averaging)"
            )


if __name__ == "__main__":
    main()
