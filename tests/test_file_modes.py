"""Files nic writes: modes from the umask (weights like every other file), and staged folders
that leave the old result or the new one, never a mix or none."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nic._outputs import save_safetensors
from nic.encoders import create_encoder, save_encoder
from nic.learn import ModelSpec, SlideModel, create_model


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_safetensors_follows_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(3)}, path, metadata={"k": "v"})
    assert _mode(path) == 0o666 & ~umask  # 0o644 under umask 022
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_encoder_and_slide_model_weights_are_readable_like_their_json(tmp_path: Path, umask: int) -> None:
    want = 0o666 & ~umask
    weights = save_encoder(create_encoder("nic-cnn", code_size=8, width=8), tmp_path / "enc")
    assert _mode(weights) == want == _mode(weights.with_suffix(".json"))
    spec = ModelSpec(4, 1, width=8, input_size=8)
    SlideModel("nic-cnn", spec, "regression", 8, create_model("nic-cnn", spec)).save(tmp_path / "fold_0")
    assert _mode(tmp_path / "fold_0" / "model.safetensors") == want == _mode(tmp_path / "fold_0" / "model.json")


# -- staged folders: the old result or the new one, never a mix or none ----------------------


def _result(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.txt").write_text(text)
    return folder


def test_a_failed_swap_puts_the_old_result_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nic._outputs import staged_folder
    from nic.errors import OutputError

    out = _result(tmp_path / "out", "old")
    real, calls = os.replace, []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # stage -> out, after out was moved aside
            raise OSError(16, "Device or resource busy")
        return real(a, b)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OutputError, match="cannot move the finished result into place"):
        with staged_folder(out, replace=True) as stage:
            _result(stage, "new")
    monkeypatch.undo()
    assert (out / "result.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left


def test_a_swap_killed_between_its_moves_is_undone_by_the_next_run(tmp_path: Path) -> None:
    """What a process killed after moving the old result aside leaves (markers naming a dead
    process): the next staged folder for it puts the old result back, then proceeds."""
    import subprocess
    import sys

    from nic._outputs import PARTIAL_MARK, remove_dead_partials, staged_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    old = tmp_path / ".out.old-abc"
    _result(old / "out", "old")
    (old / PARTIAL_MARK).write_text(pid)
    stage = _result(tmp_path / ".out.partial-def", "new, never swapped in")
    (stage / PARTIAL_MARK).write_text(pid)
    remove_dead_partials(tmp_path / "out")
    assert (tmp_path / "out" / "result.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_folder(tmp_path / "out", replace=True) as s:
        _result(s, "new")
    assert (tmp_path / "out" / "result.txt").read_text() == "new" and not (tmp_path / "out" / PARTIAL_MARK).exists()


def test_staged_folders_follow_links_and_keep_other_peoples_files(tmp_path: Path) -> None:
    from nic._outputs import holds_only, staged_folder
    from nic.errors import OutputError

    target = _result(tmp_path / "scratch" / "run", "old")
    (tmp_path / "link").symlink_to(target)
    with staged_folder(tmp_path / "link", replace=True) as s:
        _result(s, "new")
    assert (tmp_path / "link").is_symlink() and (target / "result.txt").read_text() == "new"
    mine = _result(tmp_path / "mine", "old")
    (mine / "notes.txt").write_text("the user's")
    is_ours = lambda f: holds_only(f, ("result.txt",))  # noqa: E731
    for replace in (False, True):
        with pytest.raises(OutputError, match="holds files nic did not write; choose another `out`"):
            with staged_folder(mine, replace=replace, is_ours=is_ours):
                pass
    assert (mine / "notes.txt").exists()
