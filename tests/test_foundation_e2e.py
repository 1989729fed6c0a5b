"""A foundation-class encoder end to end: a ViT-B/16 shape (one block, random weights saved to
a file, as local foundation weights would be) at 224 px and 0.5 um/px through compression,
``nic train --model nic-cnn``, heatmaps and the report, at code sizes 768 and (``-m slow``) 1536."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nic.cli import app
from nic.encoders import load_encoder
from nic.store import open_store
from tests.test_compress import write_slide


@pytest.mark.parametrize("width", [768, pytest.param(1536, marks=pytest.mark.slow)])
def test_vit_codes_flow_through_compress_train_heatmap_report(width: int, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    arch = "timm:vit_base_patch16_224?depth=1" + ("" if width == 768 else "&embed_dim=1536&num_heads=12")
    torch.manual_seed(0)
    vit = load_encoder(arch)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.module.body.state_dict().items()}, str(weights))
    spec = f"{arch}&weights={weights}"
    enc = load_encoder(spec)
    assert (enc.code_size, enc.patch_size, enc.mpp) == (width, 224, 0.5)
    assert enc.config.mean == pytest.approx((0.5, 0.5, 0.5))  # from the model's pretrained config

    slides = tmp_path / "slides"
    slides.mkdir()
    rows = ["slide,patient,score"]
    for i in range(6):
        write_slide(slides / f"s{i}.tif", (1344, 1344), 0.5, seed=20 + i)
        rows.append(f"s{i},p{i},{i % 3}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    r = runner.invoke(app, ["compress", str(slides), "-e", spec, "-o", str(tmp_path / "st"), "--workers", "0",
                            "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = open_store(tmp_path / "st" / "s0.zarr")
    assert s.code_size == width and s.meta.patch == 224 and s.has_tissue
    assert np.abs(s.load()[:, s.tissue]).sum() > 0

    train = ["train", "--compressed", str(tmp_path / "st"), "--labels", str(tmp_path / "labels.csv"), "--task",
             "regression", "--target", "score", "--model", "nic-cnn", "--folds", "2", "--epochs", "1", "--width",
             "8", "--batch-size", "4", "--out", str(tmp_path / "run")]  # fmt: skip
    r = runner.invoke(app, train)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["heatmap", "--model", str(tmp_path / "run"), "--compressed", str(tmp_path / "st"),
                            "--out", str(tmp_path / "maps"), "--slide", "s0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "maps" / "s0.png").is_file()
    r = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "report.html"), "--gallery", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.html").stat().st_size > 1000
