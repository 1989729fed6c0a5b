"""Do heatmaps show where the evidence is?  Known answers on a generated cohort.

A generated cohort (``nic synth cohort`` / ``nic demo``) has truth maps: the class of every
256-px level-0 tile (``truth/<slide>.classes.png``).  Its survival hazard rises with the
tumour burden, so a survival model's evidence for higher risk should lie on tumour; its
growth-pattern label is decided where tumour meets stroma or normal tissue, so the
growth model's evidence should lie on the tumour rim.  For every slide this computes the
AUC of the heat against that truth over the tissue cells (signed heat for survival: tumour
cells should be the highest; |heat| for growth: rim cells should be the strongest) and
prints the median over slides for each heatmap method.

    python benchmarks/heatmap_truth.py DEMO_DIR   # the --out folder of `nic demo`
    python benchmarks/heatmap_truth.py --cohort COHORT --compressed DIR --runs RUNS
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from nic.explain._heatmap import slide_heatmap
from nic.learn import load_run
from nic.learn.data import open_sources
from nic.store import list_stores, open_store
from nic.synth._layout import TUMOUR

TILE = 256  # level-0 pixels per truth tile


def cell_truth(classes: np.ndarray, meta, shape: tuple[int, int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The truth class under the centre of every grid cell, (H, W)."""
    (ox, oy), (sx, sy) = meta.origin, meta.step
    rows = ((oy + (np.arange(shape[0]) + 0.5) * sy) // TILE).astype(int).clip(0, classes.shape[0] - 1)
    cols = ((ox + (np.arange(shape[1]) + 0.5) * sx) // TILE).astype(int).clip(0, classes.shape[1] - 1)
    return classes[np.ix_(rows, cols)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", nargs="?", type=Path, help="a `nic demo` output folder")
    ap.add_argument("--cohort", type=Path)
    ap.add_argument("--compressed", type=Path)
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--methods", default="gradcam,input-gradient")
    args = ap.parse_args()
    cohort = args.cohort or args.demo / "cohort"
    compressed = args.compressed or args.demo / "compressed"
    runs = args.runs or args.demo / "runs"
    sources = open_sources(list_stores(compressed))
    truths = {}
    for s in sources:
        classes = np.asarray(Image.open(cohort / "truth" / f"{s.slide_id}.classes.png"))
        t = cell_truth(classes, open_store(s.path, verify="none").meta, s.grid_shape)
        tumour = (t == TUMOUR) & s.tissue
        rim = tumour & ndi.binary_dilation(~tumour & s.tissue, iterations=1)
        rim |= ~tumour & s.tissue & ndi.binary_dilation(tumour, iterations=1)
        truths[s.slide_id] = (tumour, rim)
    for name, want, signed in (("survival", 0, True), ("growth_pattern", 1, False)):
        run = load_run(runs / name)
        for method in args.methods.split(","):
            t0, aucs = time.perf_counter(), []
            for s in sources:
                truth = truths[s.slide_id][want][s.tissue]
                if truth.all() or not truth.any():
                    continue
                heat = slide_heatmap(run, s, method).values[s.tissue]
                aucs.append(roc_auc_score(truth, heat if signed else np.abs(heat)))
            sec = (time.perf_counter() - t0) / max(len(sources), 1)
            target = "tumour cells" if want == 0 else "tumour rim cells"
            print(f"{name:15s} {method:15s} AUC of {'heat' if signed else '|heat|'} for {target}: median "
                  f"{np.median(aucs):.3f} (IQR {np.quantile(aucs, 0.25):.3f}-{np.quantile(aucs, 0.75):.3f}, "
                  f"{len(aucs)} slides), {sec:.2f} s per slide")  # fmt: skip


if __name__ == "__main__":
    main()
