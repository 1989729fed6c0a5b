"""Transfer, leave one dataset out: does a multitask encoder help on a task it never saw?

For each real labelled patch set in ../shared/data that is large enough to probe with
group splits,

- ``lung``: LC25000 lung type (3 classes, 1,800 tiles, 450 source groups),
- ``nuclei``: MoNuSeg nuclei density (128 px at 0.5 um/px, stride 64 px; 13 images),
- ``mitosis``: AMi-Br atypical vs normal mitotic figure (1,664 crops, 180 images),

a nic-cnn multitask encoder is trained on the *other* real sets plus the generated patch
tasks (tissue type, nuclei density, mitosis; ``nic synth patches``), and every encoder is
probed on the left-out set: logistic regression (classes) or ridge regression (density) on
standardised codes, ``--repeats`` group-aware 75/25 splits, mean ± sd.  Beside it: random
initialisation (the floor to beat) and the published Keras multitask-4 weights.  The
small tile sets (9 NCT-CRC tiles, 23 tissue/background tiles) are too small to probe by
group and are left out.

Usage (each encoder trains for minutes on 2 cores)::

    python benchmarks/transfer_encoders.py --work /tmp/nic_transfer --epochs 12

Writes ``<work>/results.json`` and ``<work>/results.md``; finished runs are reused.  Recipe
variants go in their own run folders (``--suffix``) with ``--sampling``, ``--aug-strength``,
``--weight-decay``, ``--encoder`` (the architecture: ``nic-cnn`` or e.g. a timm ResNet at
128 px, ``'timm:resnet18?patch_size=128&mpp=0.5'``; its random initialisation is the floor).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from real_check_encoder import KERAS, LC, SHARED, nuclei_dataset, probe_row, synth_datasets, train

AMIBR = SHARED / "data" / "patches" / "mitosis_amibr_128" / "labels.csv"

log = logging.getLogger("transfer")


def datasets(work: Path) -> dict[str, str]:
    """The real sets as task specs ``KIND:PATH``."""
    return {
        "lung": f"class:{LC / 'labels.csv'}",
        "nuclei": f"regr:{nuclei_dataset(work)}",
        "mitosis": f"class:{AMIBR}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nic_transfer"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--synth-n", type=int, default=100, help="generated patches per tissue class / per task")
    ap.add_argument("--sampling", default="proportional", help="task sampling of the multitask runs")
    ap.add_argument("--aug-strength", type=float, default=1.0)
    ap.add_argument(
        "--weight-decay", type=float, default=None, help="Adam weight decay (default: nic's; 0 for the runs before it)"
    )
    ap.add_argument(
        "--encoder",
        default="nic-cnn",
        help="the architecture trained (and its random init probed), e.g. 'timm:resnet18?patch_size=128&mpp=0.5'",
    )
    ap.add_argument("--suffix", default="", help="appended to the run folders' names (recipe variants)")
    ap.add_argument("--leave-out", default="lung,nuclei,mitosis", help="the sets to leave out, one run each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.weight_decay is None:
        from nic.encoder_training import EncoderTrainConfig

        args.weight_decay = EncoderTrainConfig.weight_decay  # the dataclass field's default

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    real = datasets(work)
    synth = synth_datasets(work, args.synth_n)
    generated = [
        f"synth_tissue=class:{synth / 'tissue_type'}",
        f"synth_nuclei=regr:{synth / 'nuclei_density.csv'}",
        f"synth_mitosis=class:{synth / 'mitosis.csv'}",
    ]

    from nic.encoder_training import linear_probe
    from nic.encoders import load_encoder
    from nic.patches import read_patch_table

    results: dict[str, dict] = {}
    training: dict[str, dict] = {}
    for held in [s.strip() for s in args.leave_out.split(",") if s.strip()]:
        if held not in real:
            raise SystemExit(f"--leave-out {held!r}: not one of {', '.join(real)}")
        tasks = [f"{name}={spec}" for name, spec in real.items() if name != held] + generated
        name = f"without-{held}{args.suffix}"
        path, training[name] = train(work, name, tasks, args)
        table = read_patch_table(real[held])
        encoders = {
            f"{args.encoder} random init": args.encoder,
            "published multitask-4 (Keras)": str(KERAS / "encoder_multitask-4.h5"),
            f"nic multitask {name}": str(path),
        }
        results[held] = {}
        for label, spec in encoders.items():
            random_init = spec == args.encoder
            enc = load_encoder(spec, seed=args.seed if random_init else None)
            r = linear_probe(enc, table, repeats=args.repeats, seed=args.seed, random_init=random_init)
            results[held][label] = probe_row(r)
            log.info("%s on %s: %s", label, held, r.line())

    lines = [
        f"Leave one dataset out: probe on the left-out set ({args.repeats} group-aware 75/25 splits, mean ± sd); "
        f"nic encoders trained on the other real sets + 3 generated tasks, {args.epochs} epochs, sampling "
        f"{args.sampling}, augmentation strength {args.aug_strength:g}, weight decay {args.weight_decay:g}, "
        f"architecture {args.encoder}.",
        "",
        "| left out | encoder | probe |",
        "|---|---|---|",
    ]
    for held, rows in results.items():
        for label, r in rows.items():
            m, s = r["metrics"], r["spread"]
            text = ", ".join(f"{k} {v:.3f} ± {s[k]:.3f}" for k, v in m.items())
            lines.append(f"| {held} | {label} | {text} |")
    out = {"probe": results, "training": training, "args": vars(args) | {"work": str(work)}}
    (work / "results.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
