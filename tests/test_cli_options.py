"""The command line's options come from the library: defaults read from the config classes,
flags derived from parameter names, and errors printed with those flags."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nic.cli import app
from nic.cli._common import _field_defaults, cli_message, flag, library_default, with_flags
from nic.errors import DataError, OptionError, OutputError, check_choice, check_int, check_number

# every config class a command takes defaults from
CONFIGS = [
    "nic.learn.train:FitConfig",
    "nic.learn.run:CVConfig",
    "nic.encoder_training._config:EncoderTrainConfig",
    "nic.encoder_training._config:UnsupervisedConfig",
    "nic.patches.augment:AugmentConfig",
    "nic.synth._cohort:CohortConfig",
    "nic.compress._pipeline:CompressOptions",
]


def _real_defaults(where: str) -> dict[str, object]:
    import importlib

    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("where", CONFIGS)
def test_defaults_read_from_the_source_are_the_classes_defaults(where: str) -> None:
    """What the options show is exactly what the class would use, field by field (including
    fields a subclass redefines, e.g. the unsupervised run's shorter ``epochs``)."""
    real = _real_defaults(where)
    read = _field_defaults(*where.split(":"))
    assert read == real
    assert real, where


def test_a_field_without_a_literal_default_is_not_offered() -> None:
    with pytest.raises(KeyError, match="augment"):
        library_default("nic.encoder_training._config:EncoderTrainConfig", "augment")  # a default_factory


def _option_defaults(command) -> dict[str, object]:
    params = inspect.signature(command).parameters.items()
    return {name: p.default.default for name, p in params if p.default is not p.empty}  # not the context


def test_train_options_follow_the_fit_and_cv_configs() -> None:
    from nic.cli._learn import train
    from nic.learn import FitConfig

    got, fit = _option_defaults(train), FitConfig()
    for name in ("model", "epochs", "crop", "batch_size", "lr", "patience", "width", "dropout", "pool", "ties",
                 "seed", "device"):  # fmt: skip
        assert got[name] == getattr(fit, name), name
    assert (got["folds"], got["threads"]) == (5, None) == (_real_defaults(CONFIGS[1])["folds"], None)


def test_train_encoder_shared_options_defer_to_each_method() -> None:
    """Options both kinds of run take, with different defaults, are left to each config."""
    from nic.cli._train_encoder import train_encoder_cmd
    from nic.encoder_training import EncoderTrainConfig, UnsupervisedConfig

    got = _option_defaults(train_encoder_cmd)
    assert got["epochs"] is None and got["patience"] is None and got["lr"] is None
    fields = {f.name: f.default for f in dataclasses.fields(EncoderTrainConfig)}
    assert (got["batch_size"], got["seed"], got["workers"], got["encoder"]) == (
        fields["batch_size"], fields["seed"], fields["num_workers"], fields["encoder"]
    )  # fmt: skip
    assert got["val_fraction"] == fields["val_fraction"] and got["sampling"] == fields["sampling"]
    unsup = {f.name: f.default for f in dataclasses.fields(UnsupervisedConfig)}
    assert (got["patches"], got["val_patches"], got["kl_weight"]) == (
        unsup["patches"], unsup["val_patches"], unsup["kl_weight"]
    )  # fmt: skip
    assert (fields["epochs"], unsup["epochs"]) == (20, 5)  # the help names both
    shown = inspect.signature(train_encoder_cmd).parameters["epochs"].default.show_default
    assert shown == "20 (multitask), 5 (unsupervised)"


def test_the_command_line_imports_no_torch() -> None:
    """Reading the defaults from the sources keeps ``nic --help`` free of torch."""
    code = "import sys, nic.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- parameter names -> flags ---------------------------------------------------------------------


def test_flags_of_parameters() -> None:
    assert flag("lr") == "--lr" and flag("batch_size") == "--batch-size"
    assert flag("num_workers") == "--workers" and flag("early_stopping_patience") == "--patience"
    assert (flag("out_dir"), flag("n_slides"), flag("fmt"), flag("patches_dir")) == (
        "--out", "--slides", "--format", "--patches"
    )  # fmt: skip


def test_messages_name_parameters_for_python_and_flags_for_the_command_line() -> None:
    e = OptionError("`batch_size` must be an integer of at least 2 (got 1); or pass `overwrite=True`, `device=cpu`")
    assert cli_message(e) == "--batch-size must be an integer of at least 2 (got 1); or pass --overwrite, --device cpu"
    # what is not a parameter in backticks stays as it is
    assert with_flags("retrain it with `nic train`; `a b`") == "retrain it with `nic train`; `a b`"
    # a positional argument, named by its metavar, has no flag
    assert with_flags("choose another `OUT`, or `patches_dir=DIR`") == "choose another OUT, or --patches DIR"


def test_the_checks_word_their_errors_alike() -> None:
    for bad in (1, 2.0, True, "3"):
        with pytest.raises(OptionError, match=r"^`batch_size` must be an integer of at least 2 \(got"):
            check_int("batch_size", bad, 2)
    check_int("quality", np.int64(100), 1, 100)
    with pytest.raises(OptionError, match=r"`quality` must be an integer between 1 and 100 \(got 0\)"):
        check_int("quality", 0, 1, 100)
    check_number("val_fraction", 0.5, 0, 1, low_open=True, high_open=True)
    for bad in (0, 1, float("nan"), "0.5"):
        with pytest.raises(OptionError, match=r"`val_fraction` must be a number in \(0, 1\)"):
            check_number("val_fraction", bad, 0, 1, low_open=True, high_open=True)
    with pytest.raises(OptionError, match="`lr` must be a number greater than 0"):
        check_number("lr", 0.0, 0, float("inf"), low_open=True)
    with pytest.raises(OptionError, match="`sampling` must be one of a, b"):
        check_choice("sampling", "c", ("a", "b"))


# -- through the command line ---------------------------------------------------------------------


def _one_error_line(res) -> str:
    lines = [x for x in res.output.splitlines() if x]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_a_bad_device_reads_the_same_in_every_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fault, one class and one line, whichever command meets it."""
    import torch

    from nic._device import torch_device as resolve_device
    from nic.encoders import load_encoder
    from nic.learn import FitConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    want = "--device 'cuda' asked for, but torch sees no CUDA device; use --device cpu"
    faults = [lambda: load_encoder("nic-cnn", device="cuda"), lambda: resolve_device(FitConfig(device="cuda").device)]
    for fault in faults:
        with pytest.raises(OptionError) as info:
            fault()
        assert cli_message(info.value) == want
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,y\n")
    args = ["train", "--compressed", str(tmp_path), "--labels", str(labels), "--task", "regression", "--target", "y",
            "--out", str(tmp_path / "run"), "--device", "cuda"]  # fmt: skip
    assert _one_error_line(CliRunner().invoke(app, args)) == f"error: {want}"


def test_output_refusals_read_the_same(tmp_path: Path) -> None:
    from nic._outputs import check_new_file, check_new_folder

    f = tmp_path / "preds.csv"
    f.write_text("x\n")
    with pytest.raises(OutputError) as info:
        check_new_file(f)
    assert cli_message(info.value) == f"{f}: exists; pass --overwrite to replace it, or choose another --out"
    check_new_file(f, overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        check_new_file(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(OutputError) as info:
        check_new_folder(tmp_path / "run", None, holds=("config.json",), what="training runs")
    assert cli_message(info.value) == (
        f"{tmp_path / 'run'}: already holds training runs; choose another --out (training runs are never overwritten)"
    )
    check_new_folder(tmp_path / "run", None, holds=("checkpoints",))
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_new_folder(f)
    assert not issubclass(OutputError, DataError) and not issubclass(OptionError, DataError)


def test_an_option_is_named_by_the_flag_of_its_command(tmp_path: Path) -> None:
    """train-encoder's --aug-strength sets AugmentConfig's `strength`: its refusal names the
    flag this command has; augment-preview's --strength is the field's own flag."""
    from nic.patches.augment import AugmentConfig

    res = CliRunner().invoke(app, ["train-encoder", "--task", "t=class:/no/such.csv", "--aug-strength", "-1",
                                   "--out", str(tmp_path / "run")])  # fmt: skip
    assert _one_error_line(res) == "error: --aug-strength must be a number of at least 0 (got -1.0)"
    with pytest.raises(OptionError) as info:
        AugmentConfig(strength=-1.0)
    assert cli_message(info.value) == "--strength must be a number of at least 0 (got -1.0)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--task", "t=class:/no/such.csv", "--kl-weight", "5"], "--kl-weight is for --method vae; drop it from this "
         "--method multitask run"),
        (["--task", "t=class:/no/such.csv", "--patches", "10"], "--patches is for the unsupervised methods, --method "
         "vae or contrastive or bigan; drop it from this --method multitask run"),
        (["--method", "vae", "--slides", "/no/such", "--val-fraction", "0.3"], "--val-fraction is for --method "
         "multitask; drop it from this --method vae run"),
        (["--method", "contrastive", "--slides", "/no/such", "--upsample", "resize"], "--upsample is for --method vae "
         "or bigan; drop it from this --method contrastive run"),
    ],
)  # fmt: skip
def test_train_encoder_refuses_options_of_another_method(tmp_path: Path, args: list[str], error: str) -> None:
    """An option the run's method does not read is refused, not ignored; one left at its
    default (or given for its own method) is no error."""
    res = CliRunner().invoke(app, ["train-encoder", *args, "--out", str(tmp_path / "run")])
    assert _one_error_line(res) == f"error: {error}"
    res = CliRunner().invoke(app, ["train-encoder", "--method", "bigan", "--slides", "/no/such", "--patches", "10",
                                   "--instance-noise", "0.1", "--out", str(tmp_path / "run")])  # fmt: skip
    assert _one_error_line(res) == "error: /no/such: no such slide, folder or CSV"


def test_commands_refuse_existing_outputs_before_the_work(tmp_path: Path) -> None:
    """``nic report`` (OUT a flag) and ``nic encoders import-keras`` (OUT positional) refuse an
    existing output with the shared guard, in one line, and leave it as it was."""
    html = tmp_path / "report.html"
    html.write_text("keep")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "no-run"), "--out", str(html)])
    assert _one_error_line(res) == f"error: {html}: exists; pass --overwrite to replace it, or choose another --out"
    res = CliRunner().invoke(app, ["report", str(tmp_path / "no-run"), "--out", str(tmp_path)])
    assert _one_error_line(res) == f"error: {tmp_path}: is a folder; --out is the file to write"
    assert html.read_text() == "keep"

    src = tmp_path / "enc.h5"
    src.write_bytes(b"not read: the output is refused first")
    target = tmp_path / "enc" / "encoder.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"keep")
    res = CliRunner().invoke(app, ["encoders", "import-keras", str(src), str(target.parent)])
    assert _one_error_line(res) == f"error: {target}: exists; pass --overwrite to replace it, or choose another OUT"
    assert target.read_bytes() == b"keep"


def test_warnings_on_the_command_line_name_flags(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from nic.cli._common import setup_logging

    log = logging.getLogger("nic")
    try:
        setup_logging(False)  # what every nic command sets up
        capsys.readouterr()
        logging.getLogger("nic.learn.train").warning("epoch %d: a lower `lr` (now %g) may help", 3, 0.01)
        assert capsys.readouterr().err == "warning: epoch 3: a lower --lr (now 0.01) may help\n"
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
        log.setLevel(logging.NOTSET)


def test_cohort_config_checks_what_the_command_used_to(tmp_path: Path) -> None:
    from nic.synth import CohortConfig

    with pytest.raises(OptionError, match=r"`quality` must be an integer between 1 and 100 \(got 0\)"):
        CohortConfig(quality=0)
    with pytest.raises(OptionError, match="`transforms` must be an integer between 1 and 8"):
        CohortConfig(transforms=9)
    res = CliRunner().invoke(app, ["synth", "cohort", str(tmp_path / "c"), "--quality", "101"])
    assert _one_error_line(res) == "error: --quality must be an integer between 1 and 100 (got 101)"
    assert not (tmp_path / "c").exists()


def test_predict_refuses_threads_below_1(tmp_path: Path) -> None:
    """--threads 0 and -2 were ignored without a word (``if threads:``)."""
    for value in ("0", "-2"):
        res = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--compressed", str(tmp_path),
                                       "--out", str(tmp_path / "p.csv"), "--threads", value])  # fmt: skip
        assert _one_error_line(res) == f"error: --threads must be an integer of at least 1 (got {value})"
    assert not (tmp_path / "p.csv").exists()
