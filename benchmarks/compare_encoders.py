"""Compare patch encoders as the NIC papers do, on this machine's CPU: the LC25000 probe.

Trains nic's unsupervised encoders (``vae``, ``contrastive``, ``bigan``) on tissue patches
sampled from the shared real slides (CMU-1-Small-Region, the 13 MoNuSeg images) and a
generated cohort's slides (``nic synth cohort``), every slide drawn equally often; then
probes every encoder on LC25000 lung (3 classes, 1,800 patches, 450 source groups) with
``--repeats`` group-aware 75/25 splits (logistic regression on standardised codes), and on
the MoNuSeg nuclei density (nuclei per mm2 of 128 px patches at 0.5 um/px, stride 64 px,
cut from the 13 annotated images; ridge regression, Spearman, splits by image).

Encoders: random-init nic-cnn (seeded), ``mean-rgb``, nic's VAE, contrastive and BiGAN,
and the published Keras BiGAN and multitask-4 weights.  No encoder here has seen a
LC25000 patch, so the whole set is the probe set.  The unsupervised encoders did see the
MoNuSeg images' pixels (never their annotations) during training.

Other encoders, such as nic's multitask encoders from ``transfer_encoders.py``, join the
table with ``--encoder NAME=SPEC``.

With ``--slide-cv``, every encoder also compresses one generated cohort (``--cv-slides``
slides of ``--cv-size`` px, seed ``--cv-seed``; or an existing ``nic synth cohort`` folder
given as ``--cv-cohort``) and the three slide-level labels are cross-validated on its codes
with the default ``nic train`` settings (nic-cnn, 5 folds by patient): growth pattern (AUC),
proliferation (Spearman) and survival (c-index, beside the true tumour burden's).  Each
encoder's store folder and CV results stay under ``<work>/slide_cv``; finished parts are
reused.
Variants of a method go in their own run folder (``--suffix=-kl0.001``, with ``=`` since
the value starts with a dash); ``--no-probe`` trains only.

Usage (each training run takes minutes on 2 shared cores)::

    python benchmarks/compare_encoders.py --work /tmp/nic_compare --patches 3000 --epochs 2

Writes ``<work>/results.json`` and ``<work>/results.md``; finished runs are reused. Slide-level
results are kept per cohort and seed under ``<work>/slide_cv/``, so a rerun with ``--cv-encoders``
recomputes only those and keeps the other encoders' rows of the same cohort and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from real_check_encoder import KERAS, LC, MONUSEG, MONUSEG_MPP, SHARED, nuclei_dataset, probe_row

REAL_SLIDES = (SHARED / "data" / "wsi" / "CMU-1-Small-Region.svs", MONUSEG / "images")

log = logging.getLogger("compare_encoders")


def cohort(work: Path, slides: int, size: int, seed: int) -> Path:
    out = work / "cohort"
    if not (out / "labels.csv").is_file():
        cmd = ["nic", "synth", "cohort", str(out), "--slides", str(slides), "--size", str(size), "--seed", str(seed)]
        subprocess.run(cmd, check=True)
    return out / "slides"


#: the slide-level labels of a ``nic synth cohort``: (name, task, LabelSpec arguments, metric)
SLIDE_LABELS = (
    ("growth", "binary", {"target": "growth_pattern"}, "auc"),
    ("proliferation", "regression", {"target": "proliferation"}, "spearman"),
    ("survival", "survival", {"time": "survival_time", "event": "survival_event"}, "c_index"),
)


def slide_cv_folder(work: Path, cohort_dir: Path, name: str, seed: int) -> Path:
    """Where encoder ``name``'s slide-level results on ``cohort_dir`` with training seed
    ``seed`` are kept: results of another cohort or seed are never reused for these."""
    import hashlib
    import re

    key = hashlib.sha256(f"{cohort_dir.resolve()}|{seed}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return work / "slide_cv" / f"{cohort_dir.resolve().name}-seed{seed}-{key}" / slug


def cached_slide_cv(folder: Path) -> dict[str, dict] | None:
    """The three labels' results kept in ``folder``, or None if any is missing."""
    caches = [folder / f"cv_{label}.json" for label, *_ in SLIDE_LABELS]
    if not all(c.is_file() for c in caches):
        return None
    return {label: json.loads(c.read_text()) for (label, *_), c in zip(SLIDE_LABELS, caches)}


def slide_cv(work: Path, cohort_dir: Path, name: str, spec: str, args: argparse.Namespace) -> dict[str, dict]:
    """Compress ``cohort_dir/slides`` with encoder ``spec`` and cross-validate the three
    slide-level labels on the codes; {label: metric entry of metrics.json}."""
    from nic.compress import CompressOptions, compress_slides
    from nic.learn import CVConfig, FitConfig, LabelSpec, train_cv

    folder = slide_cv_folder(work, cohort_dir, name, args.seed)
    stores = folder / "compressed"
    results = compress_slides(
        [cohort_dir / "slides"],
        spec,
        stores,
        CompressOptions(random_init=spec == "nic-cnn", seed=args.seed),
    )
    bad = [r for r in results if r.status not in ("done", "skipped", "no tissue")]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} slides not compressed ({bad[0].slide}: {bad[0].status})")
    out: dict[str, dict] = {}
    for label, task, columns, metric in SLIDE_LABELS:
        cache = folder / f"cv_{label}.json"
        if not cache.is_file():
            t0 = time.perf_counter()
            cfg = CVConfig(
                stores,
                LabelSpec(cohort_dir / "labels.csv", task, **columns),  # type: ignore[arg-type]
                FitConfig(seed=args.seed),
                folds=5,
                threads=args.threads,
            )
            m = train_cv(cfg).metrics[metric]
            cache.write_text(json.dumps({**m, "seconds": time.perf_counter() - t0}, indent=2) + "\n")
        out[label] = json.loads(cache.read_text())
        v = out[label]
        log.info("%s: %s %s %.3f (%.3f-%.3f)", name, label, metric, v["value"], *v["ci95"])
    return out


def train(work: Path, method: str, slides: tuple[str, ...], args: argparse.Namespace) -> tuple[str, dict]:
    from nic.encoder_training._unsupervised import UnsupervisedConfig, train_unsupervised

    run = work / "runs" / f"{method}{args.suffix}"
    if (run / "metrics.json").is_file():
        return str(run / "encoder"), json.loads((run / "metrics.json").read_text())
    cfg = UnsupervisedConfig(
        method=method,
        slides=slides,
        slide_mpp=MONUSEG_MPP,
        patches=args.patches,
        val_patches=256,
        kl_weight=args.kl_weight,
        upsample=args.upsample,  # None: the method's default
        **({} if args.instance_noise is None else {"instance_noise": args.instance_noise}),
        epochs=args.epochs,
        batch_size=64,
        balance="slides",
        seed=args.seed if args.train_seed is None else args.train_seed,
        progress=False,
    )
    t0 = time.perf_counter()
    train_unsupervised(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - t0
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return str(run / "encoder"), metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nic_compare"))
    ap.add_argument("--patches", type=int, default=3000, help="training patches (pairs) per method")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--kl-weight", type=float, default=0.01, help="VAE KL weight")
    ap.add_argument(
        "--upsample", default=None, help="VAE decoder / BiGAN generator: transposed or resize (default: nic's)"
    )
    ap.add_argument("--instance-noise", type=float, default=None, help="BiGAN: instance noise sd (default: nic's)")
    ap.add_argument("--train-seed", type=int, default=None, help="seed of the encoder training (default: --seed)")
    ap.add_argument("--suffix", default="", help="appended to the run folders' names (variants of a method)")
    ap.add_argument("--no-probe", action="store_true", help="train only")
    ap.add_argument("--methods", default="vae,contrastive,bigan")
    ap.add_argument("--cohort-slides", type=int, default=8)
    ap.add_argument("--cohort-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--encoder", action="append", default=[], metavar="NAME=SPEC", help="one more encoder to probe (repeatable)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slide-cv", action="store_true", help="also cross-validate slide labels on each encoder's codes")
    ap.add_argument("--cv-cohort", type=Path, default=None, help="an existing `nic synth cohort` folder")
    ap.add_argument("--cv-slides", type=int, default=120)
    ap.add_argument("--cv-size", type=int, default=4096)
    ap.add_argument("--cv-seed", type=int, default=2029)
    ap.add_argument(
        "--cv-encoders", default="", help="names of encoders to cross-validate, comma-separated (default all)"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    slides = tuple(str(p) for p in REAL_SLIDES) + (str(cohort(work, args.cohort_slides, args.cohort_size, 7)),)

    encoders: dict[str, str] = {
        "nic-cnn random init (seed 0)": "nic-cnn",
        "mean-rgb": "mean-rgb",
        "published BiGAN (Keras)": str(KERAS / "encoder_bigan.h5"),
        "published multitask-4 (Keras)": str(KERAS / "encoder_multitask-4.h5"),
    }
    for item in args.encoder:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"--encoder {item!r}: write NAME=SPEC, e.g. 'nic multitask=/runs/mt/encoder'")
        encoders[name] = spec
    training: dict[str, dict] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        train(work, method, slides, args)
    if args.no_probe:
        return
    for run in sorted((work / "runs").glob("*/metrics.json")):  # every finished run, variants included
        encoders[f"nic {run.parent.name}"] = str(run.parent / "encoder")
        training[f"nic {run.parent.name}"] = json.loads(run.read_text())

    from nic.encoder_training import linear_probe
    from nic.encoders import load_encoder
    from nic.patches import read_patch_table

    table = read_patch_table(LC / "labels.csv")
    nuclei = read_patch_table(nuclei_dataset(work))
    results, density = {}, {}
    for name, spec in encoders.items():
        random_init = spec == "nic-cnn"
        enc = load_encoder(spec, seed=args.seed if random_init else None)
        r = linear_probe(enc, table, repeats=args.repeats, seed=args.seed, random_init=random_init)
        results[name] = probe_row(r)
        log.info("%s: LC25000 %s", name, r.line())
        r = linear_probe(enc, nuclei, repeats=args.repeats, seed=args.seed, random_init=random_init)
        density[name] = probe_row(r)
        log.info("%s: MoNuSeg density %s", name, r.line())

    cv: dict[str, dict] = {}
    if args.slide_cv:
        cv_cohort = args.cv_cohort
        if cv_cohort is None:
            cv_cohort = cohort(work / "cv", args.cv_slides, args.cv_size, args.cv_seed).parent
        chosen = [n.strip() for n in args.cv_encoders.split(",") if n.strip()] or list(encoders)
        unknown = sorted(set(chosen) - set(encoders))
        if unknown:
            raise SystemExit(f"--cv-encoders: no encoder named {unknown[0]!r}; the table has {', '.join(encoders)}")
        for name in encoders:  # every encoder's row: computed now if chosen, else kept from an earlier run
            if name in chosen:
                cv[name] = slide_cv(work, cv_cohort, name, encoders[name], args)
            elif (kept := cached_slide_cv(slide_cv_folder(work, cv_cohort, name, args.seed))) is not None:
                cv[name] = kept

    lines = [
        f"LC25000 lung probe ({len(table)} patches, 450 source groups, 3 classes; {args.repeats} group-aware "
        "75/25 splits, mean ± sd; logistic regression on standardised codes). Unsupervised encoders: "
        f"{args.patches} patches (pairs) x {args.epochs} epochs from the shared slides and a generated cohort.",
        "",
        f"MoNuSeg nuclei density probe ({len(nuclei)} patches from {len(set(nuclei.groups))} images; ridge "
        f"regression, {args.repeats} splits by image, 75/25): Spearman, mean ± sd.",
        "",
        "| encoder | LC25000 accuracy | LC25000 AUC (macro OvR) | MoNuSeg density Spearman | epochs |"
        " s per 10,000 patches (training) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m, s = r["metrics"], r["spread"]
        d, ds = density[name]["metrics"], density[name]["spread"]
        t = training.get(name, {})
        per10k = t.get("seconds_per_10k_patches")
        speed = f"{per10k:.0f}" if per10k else ""
        lines.append(
            f"| {name} | {m['accuracy']:.3f} ± {s['accuracy']:.3f} | {m['auc']:.3f} ± {s['auc']:.3f} | "
            f"{d['spearman']:.3f} ± {ds['spearman']:.3f} | {t.get('epochs', '')} | {speed} |"
        )
    if cv:
        import pandas as pd

        from nic.metrics import c_index

        p = pd.read_csv(cv_cohort / "labels.csv").groupby("patient").first()
        oracle = c_index(p.survival_time.values, p.survival_event.values, p.tumour_burden.values)
        lines += [
            "",
            f"Slide-level 5-fold CV by patient on one generated cohort ({cv_cohort}; default `nic train`,"
            f" nic-cnn, seed {args.seed}): pooled out-of-fold value (95% bootstrap CI) and the lowest fold."
            f" The true tumour burden's c-index: {oracle:.3f}.",
            "",
            "| encoder | growth pattern AUC | proliferation Spearman | survival c-index |",
            "|---|---|---|---|",
        ]
        for name, row in cv.items():
            cells = [
                f"{v['value']:.3f} ({v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}); lowest fold {min(v['folds']):.3f}"
                for v in (row[label] for label, *_ in SLIDE_LABELS)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = {"probe": results, "density_probe": density, "training": training, "slide_cv": cv}
    (work / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
