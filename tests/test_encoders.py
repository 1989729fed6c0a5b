"""nic.encoders: Keras port against Keras's own outputs and a numpy re-implementation,
weight formats, the pickle policy, a contract over the whole registry, and the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nic.encoders import (
    Encoder,
    create_encoder,
    encoder_entry,
    list_encoders,
    load_encoder,
    register_encoder,
    save_encoder,
)
from nic.errors import EncoderError, OptionError

KERAS_FILES = ["encoder_multitask-4.h5", "encoder_bigan.h5"]


def file_sha256(path: Path) -> str:
    """The checksum an encoder loaded from ``path`` must carry: sha256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def example(shared: Path, keras_dir: Path) -> np.ndarray:
    """example_128.jpg as uint8 (1, 128, 128, 3)."""
    from PIL import Image

    with Image.open(keras_dir / "example_128.jpg") as im:
        return np.array(im.convert("RGB"))[None]


@pytest.fixture(scope="module")
def reference(shared: Path, keras_dir: Path) -> dict:
    return json.loads((keras_dir / "reference_codes_example_128.json").read_text())


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- Keras port


@pytest.mark.parametrize("filename", KERAS_FILES)
def test_keras_port_reproduces_keras(filename: str, example: np.ndarray, reference: dict, keras_dir: Path) -> None:
    encoder = load_encoder(keras_dir / filename)
    codes = encoder.embed(example)
    expected = np.asarray(reference[filename], dtype=np.float32)
    assert codes.shape == (1, 128) and codes.dtype == np.float32
    assert np.abs(codes[0] - expected).max() <= 1e-5
    assert (encoder.code_size, encoder.patch_size, encoder.mpp) == (128, 128, 0.5)
    assert encoder.name == Path(filename).stem
    assert encoder.checksum == file_sha256(keras_dir / filename)
    assert encoder.source["format"] == "keras-h5" and encoder.source["sha256"] == encoder.checksum


def _np_conv_valid_s2(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv2D 3x3, stride 2, 'valid', channels-last: (H, W, C) x (3, 3, C, O) -> (H', W', O)."""
    h, w = (x.shape[0] - 3) // 2 + 1, (x.shape[1] - 3) // 2 + 1
    out = np.zeros((h, w, kernel.shape[3]), np.float64)
    for i in range(3):
        for j in range(3):
            out += x[i : i + 2 * h : 2, j : j + 2 * w : 2, :] @ kernel[i, j]
    return out + bias


def test_fused_inference_module_matches(example: np.ndarray, reference: dict, tmp_path: Path, keras_dir: Path) -> None:
    """nic-cnn's inference copy (normalisation and batch norms folded) gives the same codes."""
    encoder = load_encoder(keras_dir / "encoder_bigan.h5")
    fast = encoder.for_inference()
    assert type(fast.module).__name__ == "FusedNicPatchEncoder" and fast.checksum == encoder.checksum
    assert not any(p.requires_grad for p in fast.module.parameters())
    assert np.abs(fast.embed(example)[0] - np.asarray(reference["encoder_bigan.h5"])).max() <= 1e-5
    patches = _patches(16, 128)
    np.testing.assert_allclose(fast.embed(patches), encoder.embed(patches), atol=5e-5)
    assert encoder.module.training is False and any(p.requires_grad for p in encoder.module.parameters())
    with pytest.raises(EncoderError, match="for_inference"):
        save_encoder(fast, tmp_path / "fused")


@pytest.mark.gpu
def test_keras_port_on_gpu(example: np.ndarray, reference: dict, keras_dir: Path) -> None:
    """Full float32 convolutions reproduce Keras to 1e-4; cuDNN's default TF32 (10-bit
    mantissa, on by default in torch) to 2e-3 (9e-4 seen on an H200)."""
    encoder = load_encoder(keras_dir / "encoder_multitask-4.h5", device="cuda")
    ref = np.asarray(reference["encoder_multitask-4.h5"])
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32, tol in ((False, 1e-4), (True, 2e-3)):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            for model in (encoder, encoder.for_inference()):
                assert np.abs(model.embed(example)[0] - ref).max() <= tol, (tf32, tol)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_keras_port_by_hand(example: np.ndarray, reference: dict, keras_dir: Path) -> None:
    """A numpy forward pass straight from the h5 arrays (float64, channels-last, as Keras
    computes it) against the torch module layer by layer: a transposed kernel, a wrong
    flatten order or a wrong batch-norm epsilon each fail here."""
    import h5py

    encoder = load_encoder(keras_dir / "encoder_multitask-4.h5")
    captured: list[torch.Tensor] = []
    hooks = [encoder.module.blocks[0].conv.register_forward_hook(lambda m, i, o: captured.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in encoder.module.blocks]
    try:
        codes = encoder.embed(example)[0]
    finally:
        for h in hooks:
            h.remove()
    torch_maps = [t[0].permute(1, 2, 0).numpy() for t in captured]  # (H, W, C)

    with h5py.File(keras_dir / "encoder_multitask-4.h5", "r") as f:
        w = f["model_weights"]
        x = example[0].astype(np.float64) / 255 * 2 - 1  # the reference preprocessing
        x = x.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))  # 2 x 2 average pool -> (64, 64, 3)
        for i in range(1, 5):
            conv = w[f"conv2d_{i}/conv2d_{i}"]
            x = _np_conv_valid_s2(x, conv["kernel:0"][()], conv["bias:0"][()])
            if i == 1:
                np.testing.assert_allclose(torch_maps[0], x, atol=1e-5)  # first conv, before activation
            x = np.where(x > 0, x, 0.2 * x)
            bn = w[f"batch_normalization_{i}/batch_normalization_{i}"]
            x = (x - bn["moving_mean:0"][()]) / np.sqrt(bn["moving_variance:0"][()] + 1e-3)
            x = x * bn["gamma:0"][()] + bn["beta:0"][()]
            np.testing.assert_allclose(torch_maps[i], x, atol=1e-4 * max(1.0, np.abs(x).max()))
        assert x.shape == (3, 3, 128)
        dense = w["encoded/encoded"]
        kernel, bias = dense["kernel:0"][()], dense["bias:0"][()]
        by_hand = x.reshape(-1) @ kernel + bias  # Keras flattens channels-last: H, W, C
        channels_first = x.transpose(2, 0, 1).reshape(-1) @ kernel + bias

    np.testing.assert_allclose(codes, by_hand, atol=1e-5)
    np.testing.assert_allclose(by_hand, reference["encoder_multitask-4.h5"], atol=1e-5)
    assert np.abs(channels_first - by_hand).max() > 0.1  # the check can tell the orders apart


def test_keras_rejects_other_files(tmp_path: Path) -> None:
    import h5py

    not_h5 = tmp_path / "fake.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(EncoderError, match="fake.h5"):
        load_encoder(not_h5)

    other = tmp_path / "other.h5"
    config = {
        "class_name": "Sequential",
        "config": [{"class_name": "Dense", "config": {"name": "dense_1", "units": 4, "batch_input_shape": [None, 8]}}],
    }
    with h5py.File(other, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.create_group("model_weights").attrs["layer_names"] = np.array([b"dense_1"])
        f["model_weights"].create_group("dense_1").attrs["weight_names"] = np.array([], dtype="S1")
    with pytest.raises(EncoderError, match="not a NIC encoder|unexpected layer"):
        load_encoder(other)


# ----------------------------------------------------------------------------- formats


def test_import_keras_cli_round_trip(tmp_path: Path, example: np.ndarray, keras_dir: Path) -> None:
    from nic.cli import app

    src = keras_dir / "encoder_multitask-4.h5"
    out = tmp_path / "multitask"
    result = CliRunner().invoke(app, ["encoders", "import-keras", str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "encoder.safetensors").is_file() and (out / "encoder.json").is_file()

    original, converted = load_encoder(src), load_encoder(out)
    np.testing.assert_array_equal(converted.embed(example), original.embed(example))
    assert converted.config == original.config
    assert converted.checksum == file_sha256(out / "encoder.safetensors")
    assert converted.source["sha256"] == original.checksum and converted.source["file"] == src.name

    again = CliRunner().invoke(app, ["encoders", "import-keras", str(src), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("as_file", [False, True], ids=["directory", "safetensors-file"])
def test_save_load_round_trip(tmp_path: Path, as_file: bool) -> None:
    torch.manual_seed(0)
    encoder = create_encoder("nic-cnn", code_size=32, width=16, mpp=0.25)
    encoder.module.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        encoder.module(torch.rand(8, 3, 128, 128).contiguous(memory_format=torch.channels_last))
    target = tmp_path / ("enc.safetensors" if as_file else "enc")
    written = save_encoder(encoder, target)
    loaded = load_encoder(target)

    patches = _patches(5, 128)
    np.testing.assert_array_equal(loaded.embed(patches), encoder.embed(patches))
    assert loaded.config == encoder.config and loaded.mpp == 0.25 and loaded.code_size == 32
    assert loaded.checksum == file_sha256(written)
    meta = json.loads(written.with_suffix(".json").read_text())
    assert meta["config"]["arch_args"]["width"] == 16 and meta["nic_version"]


def test_saved_metadata_is_checked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(EncoderError, match="no encoder metadata"):
        load_encoder(bare)
    # Weights that do not fit the recorded architecture.
    save_encoder(create_encoder("nic-cnn", width=8), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "encoder.json").read_text())
    meta["config"]["arch_args"]["width"] = 16
    meta["config"]["name"] = "edited"
    (tmp_path / "a" / "encoder.json").write_text(json.dumps(meta))
    # The embedded metadata wins over an edited sidecar; rewrite the weights without it.
    from safetensors.torch import load_file

    save_file(load_file(str(tmp_path / "a" / "encoder.safetensors")), str(tmp_path / "a" / "encoder.safetensors"))
    with pytest.raises(EncoderError, match="do not fit"):
        load_encoder(tmp_path / "a")


def test_timm_weights_and_pickle_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = load_encoder("timm:test_resnet?patch_size=32")
    assert source.config.architecture == "timm" and source.code_size == source.module.num_features
    backbone = {k: v.contiguous() for k, v in source.module.body.state_dict().items()}  # timm's own keys
    save_file(backbone, str(tmp_path / "w.safetensors"))
    torch.save(backbone, tmp_path / "w.pth")
    patches = _patches(3, 32)
    expected = source.embed(patches)

    with caplog.at_level(logging.WARNING, logger="nic"):
        from_query = load_encoder(f"timm:test_resnet?patch_size=32&weights={tmp_path / 'w.safetensors'}")
    # local weights without their mean/std: normalised with timm's own, said aloud
    assert "w.safetensors: normalising with mean [0.5, 0.5, 0.5] / std [0.5, 0.5, 0.5], timm's values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nic"):
        from_kwarg = load_encoder(
            "timm:test_resnet", weights=tmp_path / "w.safetensors", patch_size=32, mean=source.config.mean,
            std=source.config.std,
        )  # fmt: skip
    assert "normalising" not in caplog.text
    np.testing.assert_array_equal(from_query.embed(patches), expected)
    np.testing.assert_array_equal(from_kwarg.embed(patches), expected)
    assert from_query.checksum == file_sha256(tmp_path / "w.safetensors")

    with pytest.raises(EncoderError, match="unsafe"):
        load_encoder("timm:test_resnet?patch_size=32", weights=tmp_path / "w.pth")
    trusted = load_encoder("timm:test_resnet?patch_size=32", weights=tmp_path / "w.pth", unsafe=True)
    np.testing.assert_array_equal(trusted.embed(patches), expected)

    # A pickled checkpoint given as the spec itself is refused the same way.
    torch.save(source.module.state_dict(), tmp_path / "model.pt")
    with pytest.raises(EncoderError, match="unsafe"):
        load_encoder(tmp_path / "model.pt")

    # Saved in the project's format, a timm encoder rebuilds from its metadata alone.
    save_encoder(source, tmp_path / "timm-enc")
    np.testing.assert_array_equal(load_encoder(tmp_path / "timm-enc").embed(patches), expected)
    # A trusted pickled state dict with the project's JSON beside it loads as well.
    (tmp_path / "model.json").write_text((tmp_path / "timm-enc" / "encoder.json").read_text())
    np.testing.assert_array_equal(load_encoder(tmp_path / "model.pt", unsafe=True).embed(patches), expected)


def test_timm_config_and_vit_at_small_size() -> None:
    vit = load_encoder("timm:test_vit?patch_size=32")
    assert vit.patch_size == 32 and vit.code_size == vit.module.num_features
    assert vit.embed(_patches(2, 32)).shape == (2, vit.code_size)
    resnet = create_encoder("timm", model_name="resnet18")
    assert resnet.patch_size == 224 and resnet.code_size == 512
    assert resnet.config.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(EncoderError, match="resnet18"):
        load_encoder("timm:resnet1")


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list_encoders())
def test_registry_contract(name: str) -> None:
    """Every registered encoder, in its tiny configuration: forward, shape, dtype, no NaN,
    backward reaches every parameter, and embed agrees with the module."""
    torch.manual_seed(0)
    encoder = create_encoder(name, **encoder_entry(name).tiny)
    assert isinstance(encoder, Encoder) and encoder.config.architecture
    p, c = encoder.patch_size, encoder.code_size
    module = encoder.module.train()
    x = torch.rand(2, 3, p, p).contiguous(memory_format=torch.channels_last)
    out = module(x)
    assert out.shape == (2, c) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if any(w.requires_grad for w in module.parameters()):  # weightless encoders (mean-rgb) have none
        out.square().mean().backward()
    for pname, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    codes = encoder.embed(_patches(3, p))
    assert codes.shape == (3, c) and codes.dtype == np.float32 and np.isfinite(codes).all()
    fast = encoder.for_inference()
    assert fast.config == encoder.config
    np.testing.assert_allclose(fast.embed(_patches(3, p)), encoder.embed(_patches(3, p)), atol=1e-4)
    # The config alone rebuilds the same architecture.
    rebuilt = create_encoder(encoder.config.architecture, **encoder.config.arch_args)
    assert rebuilt.module.state_dict().keys() == module.state_dict().keys()


def test_nic_cnn_reference_shape() -> None:
    encoder = create_encoder("nic-cnn")
    assert encoder.module.feature_shape == (128, 3, 3) and encoder.module.head.in_features == 1152
    assert encoder.module.blocks[0].bn.eps == 1e-3 and encoder.module.blocks[0].bn.momentum == pytest.approx(0.2)
    with pytest.raises(EncoderError, match="too small"):
        create_encoder("nic-cnn", patch_size=8)


@pytest.mark.parametrize("spec", ["no-such-encoder", "timm", "nic-cnnn?code_size=3"])
def test_bad_spec_lists_registered_names(spec: str) -> None:
    with pytest.raises(EncoderError) as info:
        load_encoder(spec)
    if spec != "timm":  # 'timm' alone is registered but needs a model name
        for name in list_encoders():
            assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_path_and_bad_device(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="no file at"):
        load_encoder(tmp_path / "missing.h5")
    with pytest.raises(OptionError, match="`device` 'warp-drive' is not a torch device"):
        load_encoder("nic-cnn", device="warp-drive")


def test_register_encoder_adds_to_registry() -> None:
    from nic.encoders import _registry

    @register_encoder("test-linear", tiny={"code_size": 4})
    def _linear(code_size: int = 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Encoder:
        """A test encoder."""
        from nic.encoders import EncoderConfig, NormalizedEncoder

        body = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, code_size))
        config = EncoderConfig("test-linear", code_size, 16, arch_args={"code_size": code_size})
        return Encoder(NormalizedEncoder(body, mean, std, code_size), config)

    try:
        assert "test-linear" in list_encoders()
        assert load_encoder("test-linear?code_size=5").code_size == 5
        with pytest.raises(EncoderError, match="already registered"):
            register_encoder("test-linear")(lambda: None)
        with pytest.raises(EncoderError, match="test-linear"):
            load_encoder("nope")
    finally:
        _registry._ENCODERS.unregister("test-linear")


# ----------------------------------------------------------------------------- CLI


def test_cli_list_and_info(keras_dir: Path) -> None:
    from nic.cli import app

    runner = CliRunner()
    for args in (["encoders"], ["encoders", "list"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        for name in list_encoders():
            assert name in result.output
    result = runner.invoke(app, ["encoders", "info", str(keras_dir / "encoder_bigan.h5")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["code_size"] == 128 and info["checksum"] == file_sha256(keras_dir / "encoder_bigan.h5")

    bad = runner.invoke(app, ["encoders", "info", "no-such-encoder"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: unknown encoder") and len(bad.output.strip().splitlines()) == 1


def test_cuda_device_without_cuda_is_an_option_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault has one class whoever meets it: loading an encoder, training, compressing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="no CUDA device; use `device=cpu`") as info:
        load_encoder("nic-cnn", device="cuda")
    assert "\n" not in str(info.value)
    assert load_encoder("nic-cnn", device="auto").device == torch.device("cpu")


def test_failed_move_to_device_is_an_encoder_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, device):
        raise RuntimeError("device-side failure\nmore detail")

    monkeypatch.setattr(Encoder, "to", broken)
    with pytest.raises(EncoderError, match=r"device 'cpu' \(device-side failure\); try `device=cpu`") as info:
        load_encoder("nic-cnn", device="cpu")
    assert "\n" not in str(info.value)
