"""Real check of supervised multitask encoder training on the shared real data.

Trains small nic-cnn encoders on LC25000 lung type and MoNuSeg nuclei density (and the
generated patch tasks), then probes every encoder on LC25000 with source-group splits.

Leakage control: LC25000's 450 source groups are split once (stratified by class) into
an *encoder half* (used as the ``lung`` training task) and a *probe half*; every
encoder is probed on the probe half only, with ``--repeats`` group-aware 75/25 splits.

Encoders compared: random-init nic-cnn; the published Keras multitask-4 and BiGAN
weights; a single-task encoder (lung); a multitask encoder (lung + nuclei); and a
multitask encoder trained without any LC25000 label (MoNuSeg nuclei + generated tissue
type, nuclei count and mitosis).

Usage (2 threads; each training run takes a few minutes on 2 shared cores)::

    python benchmarks/real_check_encoder.py --work /tmp/nic_real_check --epochs 12

Writes ``<work>/results.json`` and ``<work>/results.md``.  Finished runs are reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
LC = SHARED / "data" / "patches" / "lc25000_lung_224"
MONUSEG = SHARED / "data" / "monuseg"
KERAS = SHARED / "weights" / "nic-keras"
MONUSEG_MPP = 0.2527  # MoNuSeg XML MicronsPerPixel; the TIFFs state none

log = logging.getLogger("real_check")


def split_lc25000(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write encoder-half and probe-half CSVs of LC25000 (absolute paths, split by source group)."""
    from nic.patches import group_split, read_patch_table

    table = read_patch_table(LC / "labels.csv")
    enc_idx, probe_idx = group_split(len(table), 0.5, table.groups, table.labels, seed=seed)
    assert not set(table.groups[enc_idx]) & set(table.groups[probe_idx])
    out = []
    for name, idx in (("lc_encoder_half.csv", enc_idx), ("lc_probe_half.csv", probe_idx)):
        path = work / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "source_group"])
            for i in idx:
                w.writerow([str(table.paths[i]), table.classes[table.labels[i]], table.groups[i]])
        out.append(path)
    return out[0], out[1]


def nuclei_dataset(work: Path) -> Path:
    """MoNuSeg XML -> 128 px patches at 0.5 um/px, stride 64 px, nuclei density per mm^2."""
    from nic.patches import nuclei_patch_dataset, pair_images_annotations

    out = work / "monuseg_nuclei"
    if (out / "nuclei.csv").is_file():
        return out / "nuclei.csv"
    pairs = pair_images_annotations(MONUSEG / "images", MONUSEG / "annotations_xml_gz")
    # One XML (TCGA-NH-A8F7) states no MicronsPerPixel; MoNuSeg images are 40x, ~0.25 um/px.
    return nuclei_patch_dataset(
        pairs, out, patch_size=128, mpp=0.5, stride=64, fallback_mpp=MONUSEG_MPP, target="density"
    )


def probe_row(r: Any) -> dict[str, Any]:
    """What the benchmark tables keep of a :class:`~nic.encoder_training.ProbeResult`."""
    return {"metrics": r.metrics, "spread": r.spread, "n_train": r.n_train, "n_test": r.n_test}


def synth_datasets(work: Path, n: int) -> Path:
    from nic.synth import make_patch_datasets

    out = work / "synth"
    if not (out / "mitosis.csv").is_file():
        make_patch_datasets(out, n=n, seed=0)
    return out


def train(work: Path, name: str, tasks: list[str], args: argparse.Namespace) -> tuple[Path, dict]:
    """One multitask run under ``work/runs/name`` (reused when finished); ``args`` gives
    ``epochs`` and ``seed``, and optionally ``sampling``, ``weight_decay``, ``aug_strength``, ``encoder``."""
    from nic.encoder_training import EncoderTrainConfig, parse_task_spec, train_encoder
    from nic.patches.augment import AugmentConfig

    run = work / "runs" / name
    if (run / "metrics.json").is_file() and (run / "encoder" / "encoder.safetensors").is_file():
        return run / "encoder", json.loads((run / "metrics.json").read_text())
    cfg = EncoderTrainConfig(
        tasks=tuple(parse_task_spec(t) for t in tasks),
        encoder=getattr(args, "encoder", "nic-cnn"),
        epochs=args.epochs,
        batch_size=64,
        lr=1e-3,
        weight_decay=getattr(args, "weight_decay", 0.0),
        sampling=getattr(args, "sampling", "proportional"),
        augment=AugmentConfig(strength=getattr(args, "aug_strength", 1.0)),
        early_stopping_patience=4,
        plateau_patience=2,
        seed=args.seed,
        progress=False,
    )
    t0 = time.perf_counter()
    train_encoder(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - t0
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return run / "encoder", metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nic_real_check"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--synth-n", type=int, default=100, help="generated patches per tissue class / per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated encoder names to (re)compute")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    lc_enc, lc_probe = split_lc25000(work, args.seed)
    nuclei = nuclei_dataset(work)
    synth = synth_datasets(work, args.synth_n)

    lung = f"lung=class:{lc_enc}"
    nuc = f"nuclei=regr:{nuclei}"
    runs = {
        "single-task (lung)": [lung],
        "multitask (lung + nuclei)": [lung, nuc],
        "multitask without LC25000 (nuclei + synth x3)": [
            nuc,
            f"tissue=class:{synth / 'tissue_type'}",
            f"synth_nuclei=regr:{synth / 'nuclei_density.csv'}",
            f"mitosis=class:{synth / 'mitosis.csv'}",
        ],
    }
    encoders: dict[str, str] = {
        "nic-cnn random init": "nic-cnn",
        "published multitask-4 (Keras)": str(KERAS / "encoder_multitask-4.h5"),
        "published BiGAN (Keras)": str(KERAS / "encoder_bigan.h5"),
    }
    training: dict[str, dict] = {}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, tasks in runs.items():
        if only and name not in only:
            path = work / "runs" / name / "encoder"
            if path.is_dir():
                encoders[name] = str(path)
                training[name] = json.loads((work / "runs" / name / "metrics.json").read_text())
            continue
        path, metrics = train(work, name, tasks, args)
        encoders[name] = str(path)
        training[name] = metrics

    from nic.encoder_training import embed_table, linear_probe
    from nic.encoders import load_encoder
    from nic.patches import read_patch_table

    probe_table = read_patch_table(lc_probe)
    torch.manual_seed(args.seed)
    results = {}
    for name, spec in encoders.items():
        enc = load_encoder(spec)
        t0 = time.perf_counter()
        codes = embed_table(enc, probe_table)
        t_embed = time.perf_counter() - t0
        r = linear_probe(
            enc, probe_table, repeats=args.repeats, seed=args.seed, codes=codes, random_init=spec == "nic-cnn"
        )
        results[name] = probe_row(r) | {"embed_patches_per_s": len(probe_table) / t_embed}
        log.info("%s: %s", name, r.line())

    lines = [
        f"LC25000 lung probe (probe half: {len(probe_table)} patches, {len(np.unique(probe_table.groups))} source "
        "groups; "
        f"{args.repeats} group-aware 75/25 splits; logistic regression on standardised codes)",
        "",
        "| encoder | accuracy | AUC (macro OvR) | epochs | train patches/s | val metrics (best epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m, s = r["metrics"], r["spread"]
        t = training.get(name, {})
        val = ", ".join(
            f"{k.removeprefix('val/')} {v:.3f}" for k, v in sorted(t.get("val", {}).items()) if k != "val_loss"
        )
        pps = t.get("train_patches_per_s_last_epoch")
        lines.append(
            f"| {name} | {m['accuracy']:.3f} ± {s['accuracy']:.3f} | {m['auc']:.3f} ± {s['auc']:.3f} | "
            f"{t.get('epochs', '')} | {f'{pps:.0f}' if pps else ''} | {val} |"
        )
    text = "\n".join(lines) + "\n"
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(
        json.dumps(
            {"probe": results, "training": training, "args": vars(args) | {"work": str(work)}}, indent=2, default=str
        )
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
