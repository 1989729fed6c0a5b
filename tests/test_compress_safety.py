"""Compression that never ends in a silent wrong answer: encoders without weights, slides
without tissue, the stop after a failure, a full disk, slides another process finishes,
and the exit codes of ``nic compress``.

Slides are small generated tiled TIFFs (:func:`tests.test_compress.write_slide`); the
encoder is ``nic-cnn`` with seed-0 weights saved in the project's format.
"""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import nic
from nic.cli import app
from nic.compress import CompressOptions, SlideLock, compress_slide, compress_slides, summary_table
from nic.errors import EncoderError, SlideError
from nic.store import is_complete, open_store, store_path
from tests.test_compress import write_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Read-only slides: ``b``, ``c``, ``d`` with tissue (0.5 um/px), ``white`` without any,
    ``bad`` not a slide at all."""
    import tifffile

    d = tmp_path_factory.mktemp("slides")
    white = d / "white.tif"
    tifffile.imwrite(
        white, np.full((1024, 1024, 3), 255, np.uint8), tile=(256, 256), compression="jpeg", photometric="rgb",
        resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER",
    )  # fmt: skip
    bad = d / "bad.tif"
    bad.write_bytes(b"this is not a slide" * 100)
    return {
        "b": write_slide(d / "b.tif", (1024, 1024), 0.5, seed=2),
        "c": write_slide(d / "c.tif", (1024, 768), 0.5, seed=3),
        "d": write_slide(d / "d.tif", (768, 1024), 0.5, seed=5),
        "white": white,
        "bad": bad,
    }


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return nic.load_encoder(encoder_dir)


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _features(store: Path) -> np.ndarray:
    return np.asarray(open_store(store).features[...], np.float32)


# -- (5) encoders without weights -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nic-cnn", "timm:resnet18"])
def test_an_encoder_without_weights_is_refused(slides, tmp_path, spec):
    out = tmp_path / "out"
    res = _cli("compress", slides["b"], "--encoder", spec, "--out", out, "--workers", "0")
    assert res.exit_code == 2, res.output
    [line] = [x for x in res.output.splitlines() if x]
    assert line.startswith(f"error: encoder '{spec}' has no weights")
    assert f"'{spec}?weights=FILE.safetensors'" in line and "Keras .h5" in line and "--random-init" in line
    assert not out.exists()
    with pytest.raises(EncoderError, match="has no weights"):
        compress_slides([slides["b"]], nic.create_encoder("nic-cnn"), out, CompressOptions(workers=0))


def test_random_init_is_explicit_seeded_and_recorded(slides, encoder_dir, tmp_path):
    def run(out: str, *extra: str) -> Path:
        res = _cli("compress", slides["b"], "--encoder", "nic-cnn", "--random-init", "--out", tmp_path / out,
                   "--workers", "0", *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
        return store_path(tmp_path / out, "b")

    first, again, other = run("s0"), run("s0bis"), run("s1", "--seed", "1")
    np.testing.assert_array_equal(_features(first), _features(again))
    assert not np.array_equal(_features(first), _features(other))
    attrs = dict(open_store(first).attrs)
    assert (attrs["random_init"], attrs["random_seed"], attrs["encoder_checksum"]) == (True, 0, "")
    assert dict(open_store(other).attrs)["random_seed"] == 1
    # a rerun with the same seed gives the same codes, so it keeps the store; another seed does not
    res = _cli(
        "compress", slides["b"], "--encoder", "nic-cnn", "--random-init", "--out", tmp_path / "s0", "--workers", "0"
    )
    assert res.exit_code == 0 and "skipped" in res.output, res.output
    args = ("--encoder", "nic-cnn", "--random-init", "--seed", "2", "--out", tmp_path / "s0", "--workers", "0")
    res = _cli("compress", slides["b"], *args)
    assert res.exit_code == 1 and "random_seed 0 (this run: 2)" in res.output, res.output
    weighted = compress_slide(slides["b"], encoder_dir, tmp_path / "w", workers=0)
    assert (dict(open_store(weighted).attrs)["random_init"], dict(open_store(weighted).attrs)["random_seed"]) == (
        False,
        None,
    )


def test_timm_pretrained_weights_get_a_checksum(monkeypatch):
    """Hub weights are weights: ``pretrained=true`` is not refused as a random init."""
    import timm
    import torch

    made = []
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):  # no network here: the "download" is a seeded init
        made.append(pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    enc = nic.load_encoder("timm:test_resnet?pretrained=true&patch_size=32")
    assert made[0] is True and not enc.random_init and len(enc.checksum) == 64
    assert enc.source["format"] == "timm-pretrained"
    assert nic.load_encoder("timm:test_resnet?pretrained=true&patch_size=32").checksum == enc.checksum
    assert nic.load_encoder("timm:test_resnet?patch_size=32").random_init


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    from nic.synth import make_patch_datasets

    out = tmp_path_factory.mktemp("patches")
    make_patch_datasets(out, n=8, seed=0)
    return out / "tissue_type"


def test_probe_refuses_random_init_unless_asked(patches, tmp_path):
    tiny = "nic-cnn?code_size=16&width=8&depth=2&patch_size=32"
    res = _cli("probe", "--encoder", tiny, "--data", f"class:{patches}")
    assert res.exit_code == 2, res.output
    [line] = [x for x in res.output.splitlines() if x]
    assert line.startswith(f"error: encoder '{tiny}' has no weights") and "--random-init" in line
    runs = [_cli("probe", "--encoder", tiny, "--data", f"class:{patches}", "--random-init") for _ in range(2)]
    assert [r.exit_code for r in runs] == [0, 0], runs[0].output
    assert "(random init, seed 0)" in runs[0].output and runs[0].output == runs[1].output
    from nic.encoder_training import linear_probe
    from nic.patches import read_patch_table

    with pytest.raises(EncoderError, match="has no weights"):
        linear_probe(nic.load_encoder(tiny), read_patch_table(patches))


# -- (8) slides without tissue ----------------------------------------------------------------


def test_a_slide_without_tissue_is_reported_on_every_run(slides, encoder, encoder_dir, tmp_path):
    out = tmp_path / "out"
    args = ["compress", slides["white"], slides["b"], "--encoder", encoder_dir, "--out", out, "--workers", "0"]
    for _ in range(2):  # the rerun finds the empty store complete and says so again
        res = _cli(*args)
        assert res.exit_code == 1, res.output
        assert "no tissue" in res.output and "skipped" not in res.output.split("white.tif")[1].split("\n")[0]
        assert "1 of 2 slide(s) had no tissue: white.tif; check the slide or lower --min-tissue" in res.output
    store = store_path(out, "white")
    assert is_complete(store) and dict(open_store(store).attrs)["n_tissue"] == 0
    assert is_complete(store_path(out, "b"))
    [r] = compress_slides([slides["white"]], encoder, tmp_path / "lib", CompressOptions(workers=0))
    assert r.status == "no tissue" and r.patches == 0
    with pytest.raises(SlideError, match="white.tif: no tissue found"):
        compress_slide(slides["white"], encoder, tmp_path / "lib", workers=0)


# -- (10) the first failure stops the run -----------------------------------------------------


def test_the_first_failure_stops_the_run(slides, encoder, tmp_path):
    out = tmp_path / "out"
    todo = [slides["bad"], slides["b"], slides["c"], slides["d"]]
    results = compress_slides(todo, encoder, out, CompressOptions(workers=0))
    assert [r.status for r in results] == ["failed", "not run", "not run", "not run"]
    assert all(r.error == "not run: the run stopped after bad.tif failed" for r in results[1:])
    assert not any(store_path(out, s.stem).exists() for s in todo[1:])
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(summary_table(results))
    text = console.export_text()
    assert str(store_path(out, "b")) not in text and text.count("not run: the run stopped after bad.tif failed") == 3


# -- (13) a full disk ---------------------------------------------------------------------------


def test_a_full_disk_names_the_output_folder_and_stops(slides, encoder, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    real = LocalStore.set

    async def full(self, key, value):
        if key.startswith("features/c"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full)
    out = tmp_path / "out"
    results = compress_slides([slides["b"], slides["c"]], encoder, out, CompressOptions(workers=0), skip_errors=True)
    assert [r.status for r in results] == ["failed", "not run"]
    assert results[0].error == (
        f"{slides['b']}: the output folder {out} is full (No space left on device) while writing b.zarr; "
        "free space there or give another `out_dir`, then run again (the unfinished store is rebuilt)"
    )
    assert results[1].error == "not run: the output folder filled up at b.tif"
    assert store_path(out, "b").exists() and not is_complete(store_path(out, "b"))
    monkeypatch.setattr(LocalStore, "set", real)
    [again] = compress_slides([slides["b"]], encoder, out, CompressOptions(workers=0))
    assert again.status == "done" and is_complete(again.store)


def test_a_lock_file_that_cannot_be_written_is_a_failed_slide(slides, encoder, tmp_path, monkeypatch):
    def full(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlideLock, "acquire", full)
    out = tmp_path / "out"
    [r] = compress_slides([slides["b"]], encoder, out, CompressOptions(workers=0))
    assert r.status == "failed" and f"the output folder {out} is full" in r.error


# -- (13) slides another process finishes -------------------------------------------------------


def _hold(store: Path, then) -> tuple[SlideLock, threading.Timer]:
    lock = SlideLock(store)
    assert lock.acquire()

    def finish():
        then()
        lock.release()

    timer = threading.Timer(1.0, finish)
    timer.start()
    return lock, timer


def test_a_busy_slide_finished_by_its_holder_counts_as_skipped(slides, encoder, encoder_dir, tmp_path):
    ready = compress_slide(slides["b"], encoder, tmp_path / "elsewhere", workers=0)
    out = tmp_path / "out"
    out.mkdir()
    # another "process" holds b, then puts its complete store in place and lets go
    _, timer = _hold(store_path(out, "b"), lambda: shutil.copytree(ready, store_path(out, "b")))
    res = _cli("compress", slides["b"], slides["c"], "--encoder", encoder_dir, "--out", out, "--workers", "0")
    timer.join()
    assert res.exit_code == 0, res.output
    assert "slide(s) busy" not in res.output and res.output.count("skipped") == 1
    assert is_complete(store_path(out, "b")) and is_complete(store_path(out, "c"))


def test_a_busy_slide_left_unfinished_by_its_holder_is_compressed(slides, encoder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _, timer = _hold(store_path(out, "b"), lambda: None)  # the holder dies without a store
    results = compress_slides([slides["b"]], encoder, out, CompressOptions(workers=0))  # waits up to 600 s
    timer.join()
    assert [r.status for r in results] == ["done"] and is_complete(store_path(out, "b"))


def test_a_slide_still_busy_after_the_wait_exits_1(slides, encoder_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with SlideLock(store_path(out, "b")) as lock:
        assert lock.acquire()
        res = _cli(
            "compress", slides["b"], "--encoder", encoder_dir, "--out", out, "--workers", "0", "--wait-busy", "1.5"
        )
    assert res.exit_code == 1, res.output
    assert "1 of 1 slide(s) busy (locked by another process): b.tif" in res.output


# -- (12b) a script without the main guard ---------------------------------------------------------


def test_a_script_without_the_main_guard_fails_at_once_and_says_why(slides, encoder_dir, tmp_path):
    """Reader processes import the calling script again; an unguarded script used to run the
    job again in the reader, which then waited (600 s) for the slide the parent had locked
    while the parent waited for the reader."""
    import json
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import json\n"
        "from nic.compress import CompressOptions, compress_slides\n"
        f"r = compress_slides([{str(slides['b'])!r}], {str(encoder_dir)!r}, {str(tmp_path / 'out')!r}, "
        "CompressOptions(workers=1))\n"
        "print(json.dumps([[x.status, x.error] for x in r]))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [[status, error]] = json.loads(run.stdout.strip().splitlines()[-1])
    assert status == "failed"
    assert error.startswith("a reader process ended abruptly") and 'under `if __name__ == "__main__":`' in error
    # the reader's own error, on stderr, says what happened
    assert "nic was called while a worker process was starting and importing the main script" in run.stderr
    assert not is_complete(store_path(tmp_path / "out", "b"))


def test_the_main_guard_check_fires_only_in_a_starting_worker(monkeypatch):
    import multiprocessing as mp

    from nic._processes import check_main_guard, spawn_context
    from nic.errors import NicError

    check_main_guard()  # this process is no starting worker
    assert spawn_context().get_start_method() == "spawn"
    monkeypatch.setattr(mp.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(NicError, match="worker process was starting"):
        check_main_guard()
    with pytest.raises(NicError, match="worker process was starting"):
        spawn_context()


# -- (13) exit codes ----------------------------------------------------------------------------


def test_compress_help_states_the_exit_codes():
    res = _cli("compress", "--help")
    text = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 0
    assert "Exit codes: 0 every slide is done or skipped" in text
    assert "1 some slide failed, was not run, had no tissue or is still busy" in text
    assert "2 a bad option or input stopped the run before any slide" in text
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands["compress"].params}
    assert (
        params["wait_busy"].default == CompressOptions().busy_wait and params["seed"].default == CompressOptions().seed
    )
