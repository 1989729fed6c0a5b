"""``nic train-encoder``, ``nic probe``, ``nic augment-preview``, ``nic nuclei-patches``, ``nic concat-encoders``.

Thin commands over :mod:`nic.encoder_training` and :mod:`nic.patches`; heavy imports stay
inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from nic.cli._common import config_option, flag, library_default, set_torch_threads
from nic.cli._names import NamesCommand

_DATASET_HELP = (
    "Dataset: [class:|regr:]PATH[?mpp=UM_PX&group=COL&label=COL]. PATH is a folder of class folders "
    "or a CSV path,label[,group] (paths relative to the CSV). Without a prefix the kind is inferred "
    "(float labels = regression)."
)

_TASK_HELP = (
    "A task, repeatable: NAME=KIND:PATH[?mpp=UM_PX&group=COL&label=COL&weight=W]. KIND is 'class' "
    "(folder of class folders, or CSV path,label[,group]) or 'regr' (CSV with a float label). "
    "mpp: the patches' um/px (they are resampled to the encoder's); without it they are resized to "
    "the patch size. group: column that keeps related patches on one side of the split "
    "(default: a 'group' or 'source_group' column if present). weight: loss weight (default 1). "
    "Example: --task lung=class:lc25000/labels.csv --task nuclei=regr:nuclei/nuclei.csv?mpp=0.5"
)


MULTITASK = "nic.encoder_training._config:EncoderTrainConfig"
UNSUPERVISED = "nic.encoder_training._config:UnsupervisedConfig"
AUGMENT = "nic.patches.augment:AugmentConfig"


def _per_method(name: str, help: str, *decls: str) -> Any:
    """An option of both kinds of run whose default is each config's own (``None`` here)."""
    multitask, unsupervised = library_default(MULTITASK, name), library_default(UNSUPERVISED, name)
    if multitask == unsupervised:
        return typer.Option(multitask, flag(name), *decls, help=help)
    shown = f"{multitask} (multitask), {unsupervised if unsupervised is not None else 'per method'} (unsupervised)"
    return typer.Option(None, flag(name), *decls, help=help, show_default=shown)


def _check_method_options(ctx: typer.Context, method: str, methods: tuple[str, ...]) -> None:
    """Refuse an option the user gave (not its default) that ``method``'s run does not read."""
    from nic.errors import OptionError

    belongs = {"slide_mpp": methods, "patches": methods, "val_patches": methods, "kl_weight": ("vae",),
               "upsample": ("vae", "bigan"), "instance_noise": ("bigan",)}  # fmt: skip
    belongs |= dict.fromkeys(("weight_decay", "sampling", "samples_per_epoch", "max_per_task", "val_fraction"),
                             ("multitask",))  # fmt: skip
    for name, owners in belongs.items():
        source = ctx.get_parameter_source(name)  # by name: typer carries its own copy of click's enum
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if given and method not in owners:
            whose = ("the unsupervised methods, " if owners == methods else "") + "--method " + " or ".join(owners)
            raise OptionError(f"{flag(name)} is for {whose}; drop it from this --method {method} run")


def train_encoder_cmd(
    ctx: typer.Context,
    task: list[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP + " Needed by --method multitask only."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (config, checkpoints, logs, encoder/)."),
    method: str = typer.Option(
        "multitask",
        "--method",
        "-m",
        help="multitask (supervised, --task), or unsupervised on --slides: vae, contrastive (siamese: adjacent "
        "patches vs patches of other slides) or bigan.",
    ),
    slides: list[str] = typer.Option(
        None,
        "--slides",
        "-s",
        help="Unsupervised methods: slides to sample tissue patches from, repeatable: files, folders, or CSVs "
        "with a 'slide' or 'path' column (and optionally 'mpp').",
    ),
    slide_mpp: float | None = config_option(
        UNSUPERVISED, "slide_mpp", "Level-0 um/px of slides whose files state none (e.g. 0.25 for 40x images)."
    ),
    patches: int = config_option(
        UNSUPERVISED, "patches", "Unsupervised methods: training patches (pairs for contrastive), drawn once by --seed."
    ),
    val_patches: int = config_option(UNSUPERVISED, "val_patches", "Unsupervised methods: validation patches (pairs)."),
    kl_weight: float = config_option(UNSUPERVISED, "kl_weight", "VAE: weight of the KL term (small)."),
    upsample: str | None = typer.Option(
        None,
        "--upsample",
        help="VAE decoder and BiGAN generator: {names:nic.encoder_training._config:UPSAMPLE} (resize: nearest"
        " then a 3x3 conv, no checkerboard).",
        show_default="transposed (vae), resize (bigan)",
    ),
    instance_noise: float = config_option(
        UNSUPERVISED,
        "instance_noise",
        "BiGAN: sd of the noise added to the discriminator's images ([-1, 1] units), decreasing to 0 (0: none).",
    ),
    encoder: str = _per_method(
        "encoder",
        "Encoder to train: registry name (random init), timm:<model>, a Keras .h5 or saved encoder (fine-tune).",
        "-e",
    ),
    epochs: int | None = _per_method("epochs", "Maximum epochs (early stopping may end sooner)."),
    batch_size: int = _per_method(
        "batch_size", "Patches per batch and device, all tasks mixed (a step sees --devices x this many)."
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Adam learning rate; multitask divides it by 10 on a validation plateau.",
        show_default=f"{library_default(MULTITASK, 'lr')} (multitask); vae, contrastive 1e-3, bigan 2e-4",
    ),
    aug_strength: float = typer.Option(
        library_default(AUGMENT, "strength"),
        "--aug-strength",
        help="Colour/geometry augmentation strength (0 = none, 1 = default heavy).",
    ),
    weight_decay: float = config_option(
        MULTITASK, "weight_decay", "Multitask: L2 penalty on the weights (Adam weight_decay); 0 for none."
    ),
    sampling: str = config_option(
        MULTITASK, "sampling", "'proportional' (by dataset size) or 'balanced' (tasks equally often)."
    ),
    samples_per_epoch: int | None = config_option(
        MULTITASK, "samples_per_epoch", "Epoch length in patches (default: all training patches)."
    ),
    max_per_task: int | None = config_option(
        MULTITASK, "max_per_task", "Use at most this many training patches per task (default: all)."
    ),
    val_fraction: float = config_option(
        MULTITASK, "val_fraction", "Fraction of each task's groups held out for validation."
    ),
    patience: int | None = _per_method(
        "early_stopping_patience", "Early stopping: epochs without val_loss improvement."
    ),
    seed: int = _per_method("seed", "Random seed (splits, sampling, augmentation, init)."),
    workers: int = _per_method("num_workers", "Data-loading worker processes."),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: torch's)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    devices: int = _per_method(
        "devices",
        "Train data-parallel (DDP) on this many devices: GPUs, or CPU processes (gloo) without one. Under "
        "torchrun or SLURM the processes they start join; otherwise nic starts one per device.",
    ),
) -> None:
    """Train a patch encoder and export it to OUT/encoder (use it with 'nic compress --encoder OUT/encoder').

    multitask: a shared encoder with one linear head per --task; each dataset labels only
    its own task. vae, contrastive, bigan: unsupervised, on tissue patches sampled from
    --slides (no labels); OUT/preview.png shows what it learns after every epoch.
    """
    from nic.encoder_training import (
        METHODS,
        EncoderTrainConfig,
        UnsupervisedConfig,
        parse_task_spec,
        train_encoder,
        train_unsupervised,
    )
    from nic.errors import OptionError, check_choice, check_number
    from nic.patches.augment import AugmentConfig

    check_choice("method", method, ("multitask", *METHODS))
    _check_method_options(ctx, method, METHODS)
    check_number("aug_strength", aug_strength, 0, float("inf"))  # named by this command's flag, not `strength`
    set_torch_threads(threads)
    # options left out take each config's own default
    given = {"epochs": epochs, "lr": lr, "early_stopping_patience": patience}
    shared = {k: v for k, v in given.items() if v is not None}
    shared |= {"encoder": encoder, "batch_size": batch_size, "augment": AugmentConfig(strength=aug_strength),
               "seed": seed, "num_workers": workers, "progress": progress, "devices": devices}  # fmt: skip
    if method == "multitask":
        if slides:
            raise OptionError("--slides is for the unsupervised methods; give --method vae, contrastive or bigan")
        tasks = tuple(parse_task_spec(t) for t in task or ())
        config = EncoderTrainConfig(tasks=tasks, weight_decay=weight_decay, sampling=sampling,
                                    samples_per_epoch=samples_per_epoch, max_per_task=max_per_task,
                                    val_fraction=val_fraction, **shared)  # fmt: skip
        result, items = train_encoder(config, out), "patches"
    else:
        if task:
            raise OptionError(f"--method {method} learns without labels; drop --task (or use --method multitask)")
        uconfig = UnsupervisedConfig(method=method, slides=tuple(slides or ()), slide_mpp=slide_mpp, patches=patches,
                                     val_patches=val_patches, kl_weight=kl_weight, upsample=upsample,
                                     instance_noise=instance_noise, **shared)  # fmt: skip
        result, items = train_unsupervised(uconfig, out), "items"
    typer.echo(f"encoder: {result.encoder_path.parent}")
    if method != "multitask":
        typer.echo(f"preview: {out / 'preview.png'}")
    typer.echo(f"epochs: {result.epochs}, training: {result.patches_per_s:.1f} {items}/s")
    for k, v in sorted(result.metrics.items()):
        typer.echo(f"{k}: {v:.4f}")


def probe_cmd(
    encoder: str = typer.Option(
        ..., "--encoder", "-e", help="Encoder spec: registry name, timm:<model>, Keras .h5, or saved encoder."
    ),
    data: str = typer.Option(..., "--data", "-d", help=_DATASET_HELP),
    test: str = typer.Option(
        "", "--test", help="Separate test dataset (same spec form); default: a group-aware split of --data."
    ),
    group_col: str = typer.Option(
        "", "--group-col", help="Group column of --data (default: 'group' or 'source_group' if present)."
    ),
    test_fraction: float = typer.Option(
        0.25, "--test-fraction", help="Fraction of groups held out when there is no --test."
    ),
    repeats: int = typer.Option(1, "--repeats", help="Number of group-aware splits to average."),
    seed: int = typer.Option(0, "--seed", help="Seed of the splits (and of the initialisation with --random-init)."),
    random_init: bool = typer.Option(
        False, "--random-init", help="Allow an encoder without weights: a deliberate random baseline, seeded by --seed."
    ),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads (default: torch's)."),
) -> None:
    """Linear probe of a frozen encoder: accuracy and AUC (classes) or Spearman and MAE (regression).

    An encoder without weights (a registry name or timm:<model> without weights=) is
    refused unless --random-init.
    """
    import dataclasses

    from nic.encoder_training import linear_probe
    from nic.encoders import load_encoder
    from nic.encoders._io import require_weights
    from nic.patches import parse_dataset_spec, read_patch_table

    set_torch_threads(threads)
    spec = parse_dataset_spec(data)
    if group_col:
        spec = dataclasses.replace(spec, group=group_col)
    table = read_patch_table(spec)
    test_table = read_patch_table(test) if test else None
    enc = load_encoder(encoder, seed=seed if random_init else None)
    require_weights(enc, encoder, random_init)
    result = linear_probe(
        enc, table, test_table, test_fraction=test_fraction, repeats=repeats, seed=seed, random_init=random_init
    )
    name = f"{enc.name} (random init, seed {seed})" if enc.random_init else enc.name
    typer.echo(f"{name}: {result.line()}")


def augment_preview_cmd(
    data: str = typer.Argument(..., help=_DATASET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output picture (.png or .jpg)."),
    n: int = typer.Option(6, "--n", help="Number of patches (rows)."),
    variants: int = typer.Option(7, "--variants", help="Augmented variants per patch (columns after the original)."),
    strength: float = config_option(AUGMENT, "strength", "Augmentation strength."),
    patch_size: int = typer.Option(128, "--patch-size", help="Patch size in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed (patch choice and augmentation)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing picture."),
) -> None:
    """Draw a grid: each row one patch, first column the original, then augmented variants."""
    import numpy as np
    import torch
    from PIL import Image

    from nic._outputs import check_new_file, write_atomic
    from nic.errors import OptionError, check_int
    from nic.explain import image_grid
    from nic.patches import PatchDataset, read_patch_table
    from nic.patches.augment import AugmentConfig, augment

    check_int("n", n, 1)
    check_int("variants", variants, 1)
    check_int("patch_size", patch_size, 8)
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if out.suffix.lower() not in formats:
        raise OptionError(f"{out}: --out is a .png or .jpg picture")
    check_new_file(out, overwrite)
    table = read_patch_table(data)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(table), size=min(n, len(table)), replace=False)
    ds = PatchDataset(table.subset(np.sort(idx)), patch_size, None, cache=False)
    patches = torch.from_numpy(ds.read_all()).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator()
    g.manual_seed(seed)
    cols = [patches] + [augment(patches, AugmentConfig(strength=strength), g) for _ in range(variants)]
    grid = (torch.stack(cols, 1).permute(0, 1, 3, 4, 2).numpy() * 255 + 0.5).astype(np.uint8)  # (rows, cols, P, P, 3)
    picture = Image.fromarray(image_grid(list(grid)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: picture.save(tmp, format=formats[out.suffix.lower()]))
    typer.echo(f"wrote {out} ({grid.shape[0]} patches x {grid.shape[1] - 1} variants, strength {strength})")


def nuclei_patches_cmd(
    images: Path = typer.Argument(..., help="Folder of images (e.g. MoNuSeg images/)."),
    annotations: Path = typer.Argument(
        ...,
        help="Folder of annotations with the same names: Aperio/MoNuSeg .xml(.gz) or binary/instance mask .png/.tif.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: patches/ and nuclei.csv (path,label,group,count)."
    ),
    patch_size: int = typer.Option(128, "--patch-size", help="Patch size in pixels at --mpp."),
    mpp: float = typer.Option(0.5, "--mpp", help="um/px of the patches written."),
    stride: int = typer.Option(0, "--stride", help="Stride in pixels at --mpp (0 = patch size)."),
    source_mpp: float = typer.Option(
        0.0,
        "--source-mpp",
        help="um/px of the images, over the annotation's MicronsPerPixel (XML coordinates stated at another "
        "um/px are scaled to it).",
    ),
    fallback_mpp: float = typer.Option(
        0.0, "--fallback-mpp", help="um/px of images whose annotation states none (masks never do)."
    ),
    target: str = typer.Option(
        "density", "--target", help="'density' (nuclei per mm^2) or 'count' (nuclei per patch)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out."),
) -> None:
    """Cut annotated images into patches labelled with their nuclei density (a regression dataset)."""
    from nic.patches import nuclei_patch_dataset, pair_images_annotations

    pairs = pair_images_annotations(images, annotations)
    csv_path = nuclei_patch_dataset(
        pairs,
        out,
        patch_size=patch_size,
        mpp=mpp,
        stride=stride or None,
        source_mpp=source_mpp or None,
        target=target,
        fallback_mpp=fallback_mpp or None,
        overwrite=overwrite,  # type: ignore[arg-type]
    )
    typer.echo(f"wrote {csv_path}; train with --task nuclei=regr:{csv_path}")


def concat_encoders_cmd(
    encoders: list[str] = typer.Argument(
        ..., help="Encoder specs with weights, or weightless ones ('nic encoders list' says which), in code order."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the combined encoder (safetensors + JSON)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an encoder already in --out."),
) -> None:
    """Combine encoders into one whose code is their codes concatenated (same patch size and um/px).

    'nic compress --encoder OUT' then writes one store per slide with every part's codes;
    OUT/encoder.json records each part's name, code range, checksum and source.
    """
    from nic._outputs import check_new_file
    from nic.encoders import load_encoder, save_encoder
    from nic.encoders._concat import concat_encoders

    check_new_file(out if out.suffix == ".safetensors" else out / "encoder.safetensors", overwrite)
    combined = concat_encoders([load_encoder(spec) for spec in encoders])
    path = save_encoder(combined, out)
    for part in combined.source["parts"]:
        typer.echo(f"codes {part['codes'][0]}-{part['codes'][1] - 1}: {part['name']} ({part['checksum'][:12]})")
    typer.echo(f"encoder: {path.parent} (code size {combined.code_size})")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("train-encoder", cls=NamesCommand)(train_encoder_cmd)
    app.command("probe")(probe_cmd)
    app.command("augment-preview")(augment_preview_cmd)
    app.command("nuclei-patches")(nuclei_patches_cmd)
    app.command("concat-encoders")(concat_encoders_cmd)
