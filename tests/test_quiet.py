"""What a user sees: nic's own lines (INFO only with -v), no other library's chatter."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

TINY = "nic-cnn?code_size=16&width=8&depth=2&patch_size=32"

# what Lightning and torch printed around a `nic train-encoder` run before
_LIGHTNING_NOISE = ("GPU available", "TPU available", "HPU available", "litlogger", "LeafSpec", "Trainer.fit")


def _run(args: list[str]):  # -> click.testing.Result
    from nic.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated patch datasets (read only)."""
    from nic.synth import make_patch_datasets

    out = tmp_path_factory.mktemp("patches")
    make_patch_datasets(out, n=8, seed=0)
    return out


def test_verbose_shows_nic_info_lines_and_the_default_does_not(tmp_path: Path) -> None:
    quiet = _run(["synth", "patches", str(tmp_path / "a"), "--n", "1"])
    assert quiet.exit_code == 0, quiet.output
    assert "patch datasets in" not in quiet.output
    loud = _run(["-v", "synth", "patches", str(tmp_path / "b"), "--n", "1"])
    assert loud.exit_code == 0, loud.output
    assert f"INFO nic.synth._patches: patch datasets in {tmp_path / 'b'}" in loud.stderr
    assert "patch datasets in" not in loud.stdout  # log lines go to stderr only
    # and the next command without -v is quiet again
    again = _run(["synth", "patches", str(tmp_path / "c"), "--n", "1"])
    assert "patch datasets in" not in again.output


@pytest.fixture
def nic_handler():  # type: ignore[no-untyped-def]
    """Removes the command line's handler from the ``nic`` logger after the test."""
    from nic.cli._common import setup_logging

    yield setup_logging
    log = logging.getLogger("nic")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)


def test_missing_labels_are_one_clean_warning_line(
    tmp_path: Path, nic_handler, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from nic.learn.data import LabelSpec, read_labels

    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide": list("abcd"), "patient": list("PQRS"), "y": ["0", "1", None, "1"]}).to_csv(csv, index=False)
    nic_handler(False)  # what every nic command sets up
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_labels(LabelSpec(csv, "binary", target="y"))
    assert len(df) == 3 and list(df["patient"]) == ["P", "Q", "S"]
    assert not caught  # no raw UserWarning with its source line
    assert capsys.readouterr().err == f"warning: {csv}: 1 of 4 rows have a missing label and are left out\n"


def test_generated_patch_datasets_have_groups_the_reader_finds(patches: Path, caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    from nic.encoder_training import EncoderTrainConfig, parse_task_spec, prepare_tasks
    from nic.patches import read_patch_table
    from nic.patches._datasets import _read_folder

    for spec in (patches / "tissue_type", patches / "nuclei_density.csv", patches / "mitosis.csv"):
        table = read_patch_table(spec)
        assert table.groups is not None and len(set(table.groups)) == len(table), spec  # one group per draw
    # the folder reads as before (same patches, labels and classes), now with its groups
    grouped, plain = read_patch_table(patches / "tissue_type"), _read_folder(patches / "tissue_type", None)
    assert grouped.paths == plain.paths and grouped.classes == plain.classes
    np.testing.assert_array_equal(grouped.labels, plain.labels)
    config = EncoderTrainConfig(
        tasks=(
            parse_task_spec(f"tissue=class:{patches / 'tissue_type'}"),
            parse_task_spec(f"nuclei=regr:{patches / 'nuclei_density.csv'}"),
            parse_task_spec(f"mitosis=class:{patches / 'mitosis.csv'}"),
        )
    )
    with caplog.at_level("WARNING"):
        prepare_tasks(config, 32, 0.5)
    assert "no group column" not in caplog.text


def test_train_encoder_prints_no_lightning_notices(patches: Path, tmp_path: Path) -> None:
    # a real process: Lightning's handler and warnings go to the real stderr
    nuclei = tmp_path / "nuclei.csv"  # without its group column: one warning line is expected
    pd.read_csv(patches / "nuclei_density.csv")[["path", "label"]].assign(
        path=lambda d: [str(patches / p) for p in d["path"]]
    ).to_csv(nuclei, index=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "nic",
        "train-encoder",
        "--task",
        f"tissue=class:{patches / 'tissue_type'}",
        "--task",
        f"nuclei=regr:{nuclei}",
        "--encoder",
        TINY,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    for noise in _LIGHTNING_NOISE:
        assert noise not in r.stderr and noise not in r.stdout, noise
    assert r.stderr.splitlines() == [
        "warning: task nuclei: no group column; validation patches may share a source with training ones"
    ]
    assert "encoder:" in r.stdout and "val_loss" in r.stdout


def test_truncated_tiff_logs_no_tifffile_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, wsi_dir: Path) -> None:
    import nic
    from nic.errors import SlideError

    data = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.DEBUG), pytest.raises(SlideError, match="truncated"):
        nic.open_slide(cut)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


_POOL_SCRIPT = """
import time
from nic.compress._workers import ReaderPool

if __name__ == "__main__":
    with ReaderPool(1, 8, 4, 2) as pool:
        pool._pool.submit(time.sleep, 0).result()  # the worker is up
        print("ready", flush=True)
        time.sleep(120)
"""


def test_sigterm_with_open_reader_pool_leaks_nothing(tmp_path: Path) -> None:
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)  # returns once the resource tracker has closed stderr too
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    assert "leaked" not in err and "resource_tracker" not in err, err
