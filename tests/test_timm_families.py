"""The encoder contract over one small model of each common timm family, random weights
saved to a file and loaded with ``timm:<name>?weights=FILE``, and the code size taken from
what the model returns (MobileNetV3's pooled output after its conv head is 1,024 wide,
not its ``num_features`` 576)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nic.encoders import load_encoder, save_encoder

# (family, spec, code size): small configurations so each runs in about a second on 2 cores.
FAMILIES = [
    ("resnet", "timm:resnet18?patch_size=64", 512),
    ("efficientnet", "timm:efficientnet_b0?patch_size=64", 1280),
    ("mobilenetv3", "timm:mobilenetv3_small_100?patch_size=64", 1024),
    ("convnext", "timm:convnext_atto?patch_size=64", 320),
    ("vit", "timm:vit_tiny_patch16_224?patch_size=32", 192),
    (
        "swin",
        "timm:swin_tiny_patch4_window7_224?patch_size=64&window_size=2&embed_dim=32"
        "&depths=[1,1,1,1]&num_heads=[1,2,4,8]",
        256,
    ),
]


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("family", "spec", "code_size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_timm_family_contract(family: str, spec: str, code_size: int, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = load_encoder(spec)
    p = encoder.patch_size
    assert encoder.code_size == code_size, family
    module = encoder.module.train()
    x = torch.rand(2, 3, p, p).contiguous(memory_format=torch.channels_last)
    out = module(x)
    assert out.shape == (2, code_size) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(q.grad is not None for q in module.parameters() if q.requires_grad)

    # random weights saved as a plain timm state dict, then loaded the way foundation weights are
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.module.body.state_dict().items()}, str(weights))
    loaded = load_encoder(f"{spec}&weights={weights}")
    patches = _patches(3, p)
    codes = loaded.embed(patches)
    assert codes.shape == (3, code_size) and np.isfinite(codes).all()
    np.testing.assert_allclose(codes, encoder.embed(patches), atol=1e-5)
    assert not loaded.random_init and loaded.code_size == code_size
    # and rebuilt from the project's own format
    save_encoder(loaded, tmp_path / "saved")
    np.testing.assert_allclose(load_encoder(tmp_path / "saved").embed(patches), codes, atol=1e-6)


def test_mobilenetv3_compresses(tmp_path: Path) -> None:
    """A 1,024-wide pooled code once went into a store sized for num_features (576)."""
    from safetensors.torch import save_file

    from nic.compress import compress_slide
    from nic.store import open_store
    from tests.test_compress import write_slide

    torch.manual_seed(0)
    spec = "timm:mobilenetv3_small_100?patch_size=64"
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in load_encoder(spec).module.body.state_dict().items()}, str(weights))
    slide = write_slide(tmp_path / "s.tif", (768, 512), 0.5, seed=5)
    store = compress_slide(slide, f"{spec}&weights={weights}", tmp_path / "out", workers=0)
    s = open_store(store)
    assert s.code_size == 1024 and s.meta.code_size == 1024 and s.has_tissue
    assert np.isfinite(s.load()).all() and np.abs(s.load()[:, s.tissue]).sum() > 0
