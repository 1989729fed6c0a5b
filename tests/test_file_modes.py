"""Weight files get their mode from the umask, like every other file nic writes."""

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
