"""Multitask loss, metrics, the Lightning module, a tiny training run, the probe and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from nic.encoder_training import (
    EncoderTrainConfig,
    MultitaskModule,
    TaskHead,
    linear_probe,
    masked_multitask_loss,
    parse_task_spec,
    task_metrics,
    train_encoder,
)
from nic.errors import DataError, OptionError, OutputError

TINY = "nic-cnn?code_size=16&width=8&depth=2&patch_size=32"


@pytest.fixture(scope="module")
def lc25000(shared_data: Path) -> Path:
    return shared_data / "patches" / "lc25000_lung_224"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated patch datasets (read only): tissue_type/, nuclei_density.csv, mitosis.csv."""
    from nic.synth import make_patch_datasets

    out = tmp_path_factory.mktemp("synth")
    make_patch_datasets(out, n=8, seed=0)  # 128 px; size=64 fails inside synth (fat texture)
    return out


# ----------------------------------------------------------------------------- loss and metrics


def test_masked_loss_equals_separate_task_losses() -> None:
    g = torch.Generator().manual_seed(0)
    n = 10
    task = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0, 1])
    targets = torch.where(task == 0, torch.randint(0, 3, (n,), generator=g).float(), torch.randn(n, generator=g))
    targets = torch.where(task == 2, torch.randint(0, 2, (n,), generator=g).float(), targets)
    outputs = [
        torch.randn(n, 3, generator=g, requires_grad=True),
        torch.randn(n, 1, generator=g, requires_grad=True),
        torch.randn(n, 2, generator=g, requires_grad=True),
    ]
    kinds, weights = ["class", "regr", "class"], [1.0, 0.5, 2.0]
    loss, per_task = masked_multitask_loss(outputs, targets, task, kinds, weights)
    m = [task == t for t in range(3)]
    separate = [
        F.cross_entropy(outputs[0][m[0]], targets[m[0]].long()),
        F.mse_loss(outputs[1][m[1], 0], targets[m[1]]),
        F.cross_entropy(outputs[2][m[2]], targets[m[2]].long()),
    ]
    expected = sum(w * s * int(mask.sum()) for w, s, mask in zip(weights, separate, m)) / n
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_task, torch.stack([s.detach() for s in separate]))
    loss.backward()
    # a head's outputs get gradient only from its own task's samples
    for t in range(3):
        assert torch.all(outputs[t].grad[~m[t]] == 0)
        assert torch.any(outputs[t].grad[m[t]] != 0)


def test_masked_loss_absent_task_and_bad_kind() -> None:
    out = [torch.zeros(2, 2), torch.zeros(2, 1)]
    loss, per_task = masked_multitask_loss(out, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), ["class", "regr"])
    torch.testing.assert_close(loss, torch.tensor(np.log(2.0), dtype=torch.float32))
    assert torch.isnan(per_task[1])
    with pytest.raises(ValueError):
        masked_multitask_loss(out, torch.zeros(2), torch.tensor([1, 1]), ["class", "survival"])


def test_task_metrics_match_references() -> None:
    """The per-task validation metrics are nic.metrics' (checked in full in tests/test_metrics.py)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    prob = rng.dirichlet(np.ones(3), 200)
    prob[np.arange(200), y] += 0.3  # some signal
    prob /= prob.sum(1, keepdims=True)
    got = task_metrics("class", y, prob)
    assert got["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert got["acc"] == pytest.approx(accuracy_score(y, prob.argmax(1)))
    assert np.isnan(task_metrics("class", y % 2, prob)["auc"])  # a class missing: undefined, not averaged away
    yb = rng.integers(0, 2, 100)
    pb = np.round(rng.random(100), 1)  # ties
    assert task_metrics("class", yb, np.stack([1 - pb, pb], 1))["auc"] == pytest.approx(roc_auc_score(yb, pb))
    a, b = rng.random(50), rng.random(50)
    got = task_metrics("regr", a, b)
    assert got["spearman"] == pytest.approx(spearmanr(a, b).statistic)
    assert got["mae"] == pytest.approx(np.abs(a - b).mean())
    assert np.isnan(task_metrics("regr", a, np.ones(50))["spearman"])


# ----------------------------------------------------------------------------- configuration


def test_parse_task_spec() -> None:
    t = parse_task_spec("nuclei=regr:/d/n.csv?mpp=0.25&weight=0.5&group=image")
    assert (t.name, t.weight, t.dataset.kind, t.dataset.mpp, t.dataset.group) == ("nuclei", 0.5, "regr", 0.25, "image")
    for bad, match in [
        ("lung", "NAME=KIND:PATH"),
        ("9x=class:/a", "task name"),
        ("a=class:/x?colour=red", "unknown key.*colour"),
        ("a=class:/x?weight=0", "positive"),
        ("a=tissue:/x", "unknown kind"),
    ]:
        with pytest.raises(DataError, match=match):
            parse_task_spec(bad)
    with pytest.raises(OptionError, match="twice"):
        EncoderTrainConfig(tasks=(parse_task_spec("a=class:/x"), parse_task_spec("a=regr:/y")))
    with pytest.raises(OptionError, match="at least one task as `tasks`"):
        EncoderTrainConfig(tasks=())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epochs": 0}, "`epochs` must be an integer of at least 1"),
        ({"batch_size": 0}, "`batch_size` must be an integer of at least 1"),
        ({"lr": 0.0}, "`lr` must be a number greater than 0"),
        ({"weight_decay": -1e-4}, "`weight_decay` must be a number"),
        ({"sampling": "random"}, "`sampling` must be one of proportional, balanced"),
        ({"samples_per_epoch": 0}, "`samples_per_epoch` must be an integer of at least 1"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be a number in \(0, 1\)"),
        ({"num_workers": -1}, "`num_workers` must be an integer of at least 0"),
    ],
)
def test_encoder_train_config_checks_its_values(kw: dict, match: str) -> None:
    task = parse_task_spec("a=class:/x")
    with pytest.raises(OptionError, match=match):
        EncoderTrainConfig(tasks=(task,), **kw)
    cfg = EncoderTrainConfig(tasks=(task,))
    assert dataclasses.replace(cfg, epochs=3).epochs == 3 and cfg.epochs == 20  # frozen; copies are checked too
    with pytest.raises(OptionError, match=match):
        dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------- module


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_module_training_step_and_validation_metrics() -> None:
    from nic.encoders import load_encoder

    enc = load_encoder(TINY)
    heads = [TaskHead("kind", "class", 3), TaskHead("count", "regr", 1, weight=0.5, target_mean=10.0, target_std=2.0)]
    module = MultitaskModule(enc.module.train(), enc.code_size, heads, seed=0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    task = torch.tensor([0, 0, 0, 1, 1, 1])
    targets = torch.tensor([0.0, 1.0, 2.0, 8.0, 10.0, 12.0])
    z = module._standardise(targets, task)
    torch.testing.assert_close(z, torch.tensor([0.0, 1.0, 2.0, -1.0, 0.0, 1.0]))
    loss = module.training_step((images, targets, task), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in module.heads.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.encoder.parameters())
    module.eval()
    outs = module(images.float() / 255)
    assert [tuple(o.shape) for o in outs] == [(6, 3), (6, 1)]


# ----------------------------------------------------------------------------- training run


def test_train_encoder_tiny_run(tmp_path: Path, synth: Path) -> None:
    from nic.encoders import load_encoder

    cfg = EncoderTrainConfig(
        tasks=(
            parse_task_spec(f"tissue=class:{synth / 'tissue_type'}"),
            parse_task_spec(f"nuclei=regr:{synth / 'nuclei_density.csv'}?weight=0.5"),
            parse_task_spec(f"mitosis=class:{synth / 'mitosis.csv'}"),
        ),
        encoder=TINY,
        epochs=2,
        batch_size=16,
        sampling="balanced",
        progress=False,
    )
    result = train_encoder(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in (
        "config.json",
        "splits.csv",
        "metrics.json",
        "logs/metrics.csv",
        "encoder/encoder.safetensors",
        "encoder/encoder.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    config = json.loads((run / "config.json").read_text())
    assert [t["name"] for t in config["train"]["tasks"]] == ["tissue", "nuclei", "mitosis"]
    assert config["train"]["augment"]["strength"] == 1.0 and config["heads"][1]["kind"] == "regr"
    assert {"val/tissue/acc", "val/tissue/auc", "val/nuclei/spearman", "val/nuclei/mae"} <= set(result.metrics)
    assert result.patches_per_s > 0 and result.epochs == 2
    # the export is the encoder alone, loadable by spec, same codes as the trained module
    enc = load_encoder(str(run / "encoder"))
    assert enc.code_size == 16 and enc.patch_size == 32 and enc.source["tasks"] == ["tissue", "nuclei", "mitosis"]
    ckpt = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=True)
    state = {k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    ref = load_encoder(TINY)
    ref.module.load_state_dict(state)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(enc.embed(x), ref.embed(x), atol=1e-5)
    with pytest.raises(OutputError, match="already holds training runs"):
        train_encoder(cfg, run)
    # splits keep every patch on one side
    rows = (run / "splits.csv").read_text().splitlines()[1:]
    seen: dict[tuple[str, str], str] = {}
    for r in rows:
        task, split, path = r.split(",", 2)
        assert seen.setdefault((task, path), split) == split


def test_train_encoder_bad_dataset_fails_before_training(tmp_path: Path) -> None:
    cfg = EncoderTrainConfig(
        tasks=(parse_task_spec(f"x=class:{tmp_path / 'nothing.csv'}"),), encoder=TINY, progress=False
    )
    with pytest.raises(DataError, match="does not exist"):
        train_encoder(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- probe


def test_linear_probe_group_split_and_test_set(synth: Path) -> None:
    from nic.encoders import load_encoder
    from nic.patches import read_patch_table

    enc = load_encoder(TINY)
    tissue = read_patch_table(synth / "tissue_type")
    r = linear_probe(enc, tissue, repeats=2, seed=0, random_init=True)
    assert r.kind == "class" and set(r.metrics) == {"accuracy", "auc"} and r.repeats == 2
    assert 0 <= r.metrics["accuracy"] <= 1 and "±" in r.line()
    r2 = linear_probe(enc, tissue, test=tissue, random_init=True)
    assert r2.n_test == len(tissue)
    nuclei = read_patch_table(f"regr:{synth / 'nuclei_density.csv'}")
    r3 = linear_probe(enc, nuclei, random_init=True)
    assert set(r3.metrics) == {"spearman", "mae"}
    with pytest.raises(DataError, match="same kind"):
        linear_probe(enc, tissue, test=nuclei, random_init=True)


def test_linear_probe_warns_when_it_splits_patch_by_patch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    from nic.encoders import load_encoder
    from nic.patches import read_patch_table

    rows = []
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / f"p{i}.png")
        rows.append(f"p{i}.png,{'ab'[i % 2]},s{i // 2}\n")
    (tmp_path / "slide.csv").write_text("path,label,slide\n" + "".join(rows))  # a group column nic cannot guess
    enc = load_encoder("mean-rgb")
    with caplog.at_level("WARNING"):
        linear_probe(enc, read_patch_table(tmp_path / "slide.csv"), repeats=3)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{tmp_path / 'slide.csv'}: no group column; test patches may share a source with training ones"]
    caplog.clear()
    (tmp_path / "spaced.csv").write_text("path,label, group\n" + "".join(rows))  # header names are stripped
    with caplog.at_level("WARNING"):
        linear_probe(enc, read_patch_table(tmp_path / "spaced.csv"))
    assert "no group column" not in caplog.text


# ----------------------------------------------------------------------------- CLI


def _run(args: list[str]) -> object:
    from nic.cli import app

    return CliRunner().invoke(app, args)


def test_cli_help_documents_the_task_spec() -> None:
    r = _run(["train-encoder", "--help"])
    assert r.exit_code == 0 and "NAME=KIND:PATH" in r.output and "regr" in r.output


def test_cli_train_probe_preview(tmp_path: Path, synth: Path) -> None:
    run = tmp_path / "run"
    r = _run(
        [
            "train-encoder",
            "--task",
            f"tissue=class:{synth / 'tissue_type'}",
            "--task",
            f"nuclei=regr:{synth / 'nuclei_density.csv'}",
            "--encoder",
            TINY,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--aug-strength",
            "0.5",
            "--weight-decay",
            "0.001",
            "--no-progress",
            "--out",
            str(run),
        ]
    )
    assert r.exit_code == 0, r.output
    assert "patches/s" in r.output and (run / "encoder" / "encoder.safetensors").is_file()
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["augment"]["strength"] == 0.5 and saved["weight_decay"] == 0.001
    r = _run(["probe", "--encoder", str(run / "encoder"), "--data", f"class:{synth / 'tissue_type'}"])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "auc" in r.output
    pic = tmp_path / "grid.png"
    r = _run(
        [
            "augment-preview",
            str(synth / "tissue_type"),
            "--out",
            str(pic),
            "--n",
            "3",
            "--variants",
            "4",
            "--patch-size",
            "32",
        ]
    )
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(pic).size == (5 * 32 + 4 * 4, 3 * 32 + 2 * 4)
    r = _run(["augment-preview", str(synth / "tissue_type"), "--out", str(pic)])
    assert r.exit_code == 2 and "exists; pass --overwrite to replace it" in r.output, r.output
    assert Image.open(pic).size == (5 * 32 + 4 * 4, 3 * 32 + 2 * 4)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path: Path, synth: Path) -> None:
    """An unreadable patch found while training (exit 2): no run folder is left to look like
    a run and refuse the rerun; in a folder that held other files, only those stay."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth / "tissue_type", data)
    bad = sorted((data / "tumour").glob("*.png"))[0]
    good = bad.read_bytes()
    bad.write_text("not a png")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    args = ["train-encoder", "--task", f"t=class:{data}", "--encoder", TINY, "--epochs", "1", "--batch-size", "8"]
    for out in (tmp_path / "run", tmp_path / "kept"):
        r = _run([*args, "--out", str(out)])
        assert r.exit_code == 2 and "cannot read the image" in r.output, r.output
    assert not (tmp_path / "run").exists(), sorted(map(str, (tmp_path / "run").rglob("*")))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    bad.write_bytes(good)
    r = _run([*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0 and (tmp_path / "run" / "encoder" / "encoder.safetensors").is_file(), r.output


def test_cli_probe_published_weights_on_lc25000_subset(tmp_path: Path, keras_dir: Path, lc25000: Path) -> None:
    rows = (lc25000 / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    keep = [r for r in body if int(r.rsplit("_g", 1)[1]) < 12]  # 12 source groups per class
    (tmp_path / "sub.csv").write_text("\n".join([header] + [f"{lc25000}/{r}" for r in keep]) + "\n")
    r = _run(
        [
            "probe",
            "--encoder",
            str(keras_dir / "encoder_multitask-4.h5"),
            "--data",
            str(tmp_path / "sub.csv"),
            "--group-col",
            "source_group",
        ]
    )
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ["train-encoder", "--task", "lung", "--out", "RUN"],
        ["train-encoder", "--task", "lung=class:/no/such.csv", "--out", "RUN"],
        ["probe", "--encoder", "no-such-encoder", "--data", "class:/no/such"],
        ["probe", "--encoder", "nic-cnn", "--data", "class:/no/such"],
        ["augment-preview", "class:/no/such", "--out", "x.png"],
        ["nuclei-patches", "/no/images", "/no/ann", "--out", "OUT"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    args = [a.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path / "out")) for a in args]
    r = _run(args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["augment-preview", "class:/no/such", "--out", "OUT.png", "--patch-size", "0"], "--patch-size must be"),
        (["train-encoder", "--task", "lung=class:/no/such.csv", "--out", "RUN", "--threads", "-2"], "--threads must"),
        (["probe", "--encoder", "nic-cnn", "--data", "class:/no/such", "--threads", "-1"], "--threads must"),
    ],
)
def test_cli_bad_numbers_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path / "out")) for a in args]
    r = _run(args)
    assert r.exit_code == 2 and r.output.startswith(f"error: {message}"), r.output
    assert not any(tmp_path.iterdir())


def test_cli_nuclei_patches(tmp_path: Path, shared_data: Path) -> None:
    import shutil

    stem = "TCGA-B0-5698-01Z-00-DX1"
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    shutil.copy(shared_data / "monuseg" / "images" / f"{stem}.tif", tmp_path / "img")
    shutil.copy(shared_data / "monuseg" / "binary_masks" / f"{stem}.png", tmp_path / "ann")
    r = _run(["nuclei-patches", str(tmp_path / "img"), str(tmp_path / "ann"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "um/px" in r.output  # masks state no pixel size
    r = _run(
        [
            "nuclei-patches",
            str(tmp_path / "img"),
            str(tmp_path / "ann"),
            "--out",
            str(tmp_path / "out"),
            "--fallback-mpp",
            "0.252",
            "--target",
            "count",
        ]
    )
    assert r.exit_code == 0, r.output
    from nic.patches import read_patch_table

    t = read_patch_table(f"regr:{tmp_path / 'out' / 'nuclei.csv'}")
    assert len(t) == 9 and t.labels.sum() <= 335  # 3 x 3 patches of 254 px; 335 mask components in all
    # a second run never replaces the dataset silently
    args = [
        "nuclei-patches",
        str(tmp_path / "img"),
        str(tmp_path / "ann"),
        "--out",
        str(tmp_path / "out"),
        "--fallback-mpp",
        "0.252",
        "--target",
        "density",
    ]
    r = _run(args)
    assert r.exit_code == 2 and "already holds" in r.output
    assert read_patch_table(f"regr:{tmp_path / 'out' / 'nuclei.csv'}").labels.sum() == t.labels.sum()
    r = _run([*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    t2 = read_patch_table(f"regr:{tmp_path / 'out' / 'nuclei.csv'}")
    assert len(t2) == 9 and t2.labels.sum() > t.labels.sum()  # densities per mm^2 now
    # an overwrite that fails (patches larger than the image) leaves the dataset as it was
    r = _run([*args, "--overwrite", "--patch-size", "1024"])
    assert r.exit_code == 2 and "smaller than one 1024 px patch" in r.output, r.output
    t3 = read_patch_table(f"regr:{tmp_path / 'out' / 'nuclei.csv'}")
    assert np.array_equal(t3.labels, t2.labels) and all(p.is_file() for p in t3.paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann", "img", "out"]  # nothing staged is left
    for flag, value in (("--stride", "-1"), ("--mpp", "0"), ("--source-mpp", "-0.5"), ("--patch-size", "0")):
        r = _run([*args, "--overwrite", flag, value])
        assert r.exit_code == 2 and r.output.startswith(f"error: {flag} must be"), r.output


# ----------------------------------------------------------------------------- several devices


def test_devices_is_checked_and_an_existing_run_is_refused_before_any_process_starts(
    tmp_path: Path, synth: Path
) -> None:
    import multiprocessing

    task = parse_task_spec(f"tissue=class:{synth / 'tissue_type'}")
    with pytest.raises(OptionError, match="devices"):
        EncoderTrainConfig(tasks=(task,), devices=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds training runs"):
        train_encoder(EncoderTrainConfig(tasks=(task,), encoder=TINY, devices=2, progress=False), tmp_path / "run")
    assert multiprocessing.active_children() == []


@pytest.mark.slow  # two spawned CPU processes (gloo) import torch and Lightning: ~30 s on 2 cores
def test_two_cpu_processes_train_one_encoder(tmp_path: Path, synth: Path) -> None:
    from nic.encoders import load_encoder

    cfg = EncoderTrainConfig(
        tasks=(
            parse_task_spec(f"tissue=class:{synth / 'tissue_type'}"),
            parse_task_spec(f"nuclei=regr:{synth / 'nuclei_density.csv'}"),
        ),
        encoder=TINY,
        epochs=2,
        batch_size=8,
        sampling="balanced",
        progress=False,
        accelerator="cpu",
        devices=2,
    )
    run = tmp_path / "run"
    result = train_encoder(cfg, run)
    assert result.run_dir == run and result.epochs == 2
    assert sorted(p.name for p in (run / "encoder").iterdir()) == ["encoder.json", "encoder.safetensors"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val"] == result.metrics
    assert {"val_loss", "val/tissue/auc", "val/nuclei/spearman"} <= set(result.metrics)
    # the CSV log holds one row per logged step/epoch, written by rank 0 only (no duplicates)
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(set(rows))
    assert json.loads((run / "config.json").read_text())["train"]["devices"] == 2
    enc = load_encoder(str(run / "encoder"))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert enc.embed(x).shape == (4, enc.code_size) and np.isfinite(enc.embed(x)).all()


def test_a_single_device_run_started_as_one_of_several_slurm_tasks_writes_its_run(monkeypatch) -> None:
    """Rank variables only count inside a multi-device run: `srun -n 4` of four one-device
    runs must not make three of them skip writing their results."""
    import nic.encoder_training._train as train_mod

    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setattr(train_mod, "_IN_DDP", False)
    assert train_mod.global_rank() == 0
    monkeypatch.setattr(train_mod, "_IN_DDP", True)
    assert train_mod.global_rank() == 2
