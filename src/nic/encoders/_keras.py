"""Import of the published NIC Keras encoders (.h5, Keras 2.x) with h5py; no TensorFlow.

The file's ``model_config`` attribute gives the layer sequence (a functional model or a
model wrapping a Sequential); ``model_weights/<layer group>`` holds the arrays, named by
each group's ``weight_names`` attribute.  Supported: the NIC architecture, i.e. n x
[Conv2D 3x3 stride 2 'valid' -> LeakyReLU -> BatchNormalization] -> Flatten -> Dense
(linear).  Conversions: conv kernels HWIO -> OIHW; dense kernels (in, out) -> (out, in),
rows in Keras's channels-last flatten order (kept by :class:`NicPatchEncoder`'s flatten).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nic.encoders._base import Encoder
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = ["read_keras_h5", "load_keras_encoder", "KERAS_SUFFIXES"]

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras.h5")
_POOL = 2  # the NIC preprocessing average-pools 2 x 2 before the network (not in the .h5)


def _flatten_layers(layer: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(class_name, config) of the leaf layers of a Keras model config, in order."""
    cls = layer.get("class_name", "")
    cfg = layer.get("config", {})
    if cls in ("Model", "Functional", "Sequential"):
        layers = cfg if isinstance(cfg, list) else cfg.get("layers", [])  # Keras < 2.2.3: a list
        for sub in layers:
            yield from _flatten_layers(sub)
    else:
        yield cls, cfg


def _decode(v: Any) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _read_weights(root: Any, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight name ('kernel', 'bias', 'gamma', ...): array} from an h5 group."""
    if "layer_names" not in root.attrs:
        raise EncoderError(f"{path}: no 'layer_names' attribute; not a Keras 2 weight file")
    out: dict[str, dict[str, np.ndarray]] = {}
    for group_name in (_decode(n) for n in root.attrs["layer_names"]):
        group = root[group_name]
        for wn in (_decode(n) for n in group.attrs.get("weight_names", [])):
            layer, _, param = wn.rpartition("/")
            layer = layer.rpartition("/")[2]
            out.setdefault(layer, {})[param.split(":")[0]] = np.asarray(group[wn], dtype=np.float32)
    return out


def _expect(path: Path, layer: str, field: str, value: Any, wanted: Any) -> None:
    if value != wanted:
        raise EncoderError(
            f"{path}: layer {layer!r} has {field}={value!r}, the NIC architecture needs {wanted!r}; "
            "only NIC encoders can be imported from Keras"
        )


def read_keras_h5(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Read a NIC Keras encoder.

    Returns ``(arch_args, state_dict, info)``: ``arch_args`` for the ``nic-cnn`` builder,
    the torch state dict as float32 numpy arrays (conv weights (O, I, 3, 3), dense
    (code_size, H*W*C)), and ``info`` (keras_version, backend, layer names).
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EncoderError(f"{path}: cannot be read as HDF5 ({e}); give a Keras .h5 file") from e
    with f:
        if "model_config" not in f.attrs:
            raise EncoderError(
                f"{path}: no 'model_config' attribute (a weights-only file); save the full Keras model "
                "(model.save) so the architecture can be checked"
            )
        config = json.loads(_decode(f.attrs["model_config"]))
        weights = _read_weights(f["model_weights"] if "model_weights" in f else f, path)
        info = {
            "keras_version": _decode(f.attrs.get("keras_version", "")),
            "backend": _decode(f.attrs.get("backend", "")),
        }

    layers = list(_flatten_layers(config))
    input_shape = None
    convs: list[dict[str, Any]] = []
    blocks: list[list[tuple[str, dict[str, Any]]]] = []
    dense = None
    seen_flatten = False
    for cls, cfg in layers:
        name = cfg.get("name", "?")
        if input_shape is None and cfg.get("batch_input_shape"):
            input_shape = list(cfg["batch_input_shape"])[1:]
        if cls == "InputLayer":
            continue
        if cls == "Flatten":
            seen_flatten = True
        elif cls == "Dense" and seen_flatten and dense is None:
            dense = cfg
        elif cls == "Conv2D" and not seen_flatten:
            blocks.append([(cls, cfg)])
            convs.append(cfg)
        elif cls in ("LeakyReLU", "BatchNormalization") and blocks and not seen_flatten:
            blocks[-1].append((cls, cfg))
        else:
            raise EncoderError(
                f"{path}: unexpected layer {cls} {name!r}; the NIC architecture is "
                "n x [Conv2D -> LeakyReLU -> BatchNormalization] -> Flatten -> Dense"
            )
    if not blocks or dense is None:
        raise EncoderError(f"{path}: no Conv2D blocks followed by Flatten -> Dense; not a NIC encoder")
    if input_shape is None or len(input_shape) != 3 or input_shape[0] != input_shape[1] or input_shape[2] != 3:
        raise EncoderError(f"{path}: input shape {input_shape} is not square channels-last RGB (S, S, 3)")

    state: dict[str, np.ndarray] = {}
    width = int(convs[0]["filters"])
    slope = eps = momentum = None
    for i, block in enumerate(blocks):
        kinds = [c for c, _ in block]
        if kinds != ["Conv2D", "LeakyReLU", "BatchNormalization"]:
            raise EncoderError(
                f"{path}: block {i + 1} is {' -> '.join(kinds)}; NIC needs Conv2D -> LeakyReLU -> BatchNormalization"
            )
        (_, conv), (_, act), (_, bn) = block
        cname, bname = conv["name"], bn["name"]
        _expect(path, cname, "filters", int(conv["filters"]), width)
        _expect(path, cname, "kernel_size", list(conv["kernel_size"]), [3, 3])
        _expect(path, cname, "strides", list(conv["strides"]), [2, 2])
        _expect(path, cname, "padding", conv["padding"], "valid")
        _expect(path, cname, "data_format", conv.get("data_format", "channels_last"), "channels_last")
        _expect(path, cname, "dilation_rate", list(conv.get("dilation_rate", [1, 1])), [1, 1])
        _expect(path, cname, "activation", conv.get("activation", "linear"), "linear")
        axis = bn.get("axis", -1)
        _expect(path, bname, "axis", -1 if axis in (-1, 3, [3], [-1]) else axis, -1)
        layer_slope = round(float(act.get("alpha", act.get("negative_slope", 0.3))), 6)
        layer_eps = float(bn.get("epsilon", 1e-3))
        layer_momentum = round(1.0 - float(bn.get("momentum", 0.99)), 6)
        if slope is None:
            slope, eps, momentum = layer_slope, layer_eps, layer_momentum
        _expect(path, act["name"], "alpha", layer_slope, slope)
        _expect(path, bname, "epsilon", layer_eps, eps)

        w = weights.get(cname, {})
        if "kernel" not in w:
            raise EncoderError(f"{path}: no weights for layer {cname!r} in model_weights; the file is incomplete")
        kernel = w["kernel"]  # (3, 3, in, out)
        state[f"blocks.{i}.conv.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        state[f"blocks.{i}.conv.bias"] = w.get("bias", np.zeros(width, np.float32))
        b = weights.get(bname, {})
        if "moving_mean" not in b or "moving_variance" not in b:
            raise EncoderError(f"{path}: batch norm {bname!r} lacks moving_mean/moving_variance; file incomplete")
        state[f"blocks.{i}.bn.weight"] = b.get("gamma", np.ones(width, np.float32))
        state[f"blocks.{i}.bn.bias"] = b.get("beta", np.zeros(width, np.float32))
        state[f"blocks.{i}.bn.running_mean"] = b["moving_mean"]
        state[f"blocks.{i}.bn.running_var"] = b["moving_variance"]
        state[f"blocks.{i}.bn.num_batches_tracked"] = np.zeros((), np.int64)

    dname = dense["name"]
    _expect(path, dname, "activation", dense.get("activation", "linear"), "linear")
    d = weights.get(dname, {})
    if "kernel" not in d:
        raise EncoderError(f"{path}: no weights for layer {dname!r} in model_weights; the file is incomplete")
    state["head.weight"] = np.ascontiguousarray(d["kernel"].T)  # (in, out) -> (out, in)
    code_size = int(dense["units"])
    state["head.bias"] = d.get("bias", np.zeros(code_size, np.float32))

    arch_args = {
        "code_size": code_size,
        "width": width,
        "depth": len(blocks),
        "patch_size": int(input_shape[0]) * _POOL,
        "pool": _POOL,
        "negative_slope": slope,
        "bn_eps": eps,
        "bn_momentum": momentum,
    }
    info["layers"] = [cfg.get("name", "") for _, cfg in layers]
    return arch_args, state, info


def load_keras_encoder(path: str | Path) -> Encoder:
    """A ``nic-cnn`` :class:`Encoder` with the weights of a NIC Keras .h5 file.

    Input 128 px at 0.5 um/px (the files' 64 px input after the 2 x 2 average pool of the
    NIC preprocessing); ``name`` is the file stem, ``checksum`` the file's sha256.
    """
    import dataclasses

    import torch

    from nic.encoders._io import file_sha256
    from nic.encoders._registry import create_encoder

    path = Path(path)
    arch_args, state, info = read_keras_h5(path)
    encoder = create_encoder("nic-cnn", **arch_args)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    missing, unexpected = encoder.module.load_state_dict(tensors, strict=False)
    if missing or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"Keras mapping mismatch: missing {missing}, unexpected {unexpected}")
    checksum = file_sha256(path)
    encoder.config = dataclasses.replace(encoder.config, name=path.stem.removesuffix(".keras"))
    encoder.checksum = checksum
    encoder.source = {
        "format": "keras-h5",
        "file": path.name,
        "sha256": checksum,
        "keras_version": info["keras_version"],
    }
    encoder.module.eval()
    logger.info("loaded Keras encoder %s (%s)", path.name, checksum[:12])
    return encoder
