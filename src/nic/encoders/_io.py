"""Loading encoders from a spec, and the project's weight format.

The project's format is a safetensors file (the module's state dict) whose header
metadata holds ``{"nic_encoder": JSON}`` with the :class:`EncoderConfig`, the software
version and the weights' source; :func:`save_encoder` also writes that JSON beside it
(``<stem>.json``) for people to read.  Given a directory, the files are
``encoder.safetensors`` and ``encoder.json`` inside it.  When a safetensors file has no
embedded metadata (weights from elsewhere), the sidecar JSON is used.

Pickled checkpoints (.pt, .pth, .ckpt, .bin, .pkl) can run code when loaded; they are
refused unless the caller passes ``unsafe=True``.

An encoder built without weights (a registry name or ``timm:<model>`` without
``weights=``) is a random initialisation; :func:`require_weights` refuses it wherever
codes are the result (compression, probing) unless a random baseline is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from nic._device import torch_device
from nic._outputs import file_sha256
from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._registry import create_encoder, list_encoders, register_spec_kind, spec_kind, spec_kinds
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = ["load_encoder", "save_encoder", "file_sha256", "require_weights", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "nic_encoder"
_WEIGHTS_NAME = "encoder.safetensors"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_KERAS_SUFFIXES = (".h5", ".hdf5")


def require_weights(encoder: Encoder, spec: str | Path | None = None, random_init: bool = False) -> None:
    """Raise :class:`EncoderError` when ``encoder`` has no weights and ``random_init`` is False.

    ``spec`` is how the user named the encoder (default: its name); the message gives the
    ways to load weights and the switch for a deliberate random baseline.
    """
    if random_init or not encoder.random_init:
        return
    text = str(spec) if spec is not None else encoder.name
    example = f"{text}{'&' if '?' in text else '?'}weights=FILE.safetensors"
    raise EncoderError(
        f"encoder {text!r} has no weights (a random initialisation: its codes mean nothing and change on every "
        f"run); give weights ({example!r}, a folder written by save_encoder or nic train-encoder, or a Keras .h5), "
        "or pass `random_init=True` for a deliberate random baseline"
    )


def _state_sha256(module: Any) -> str:
    """Hex sha256 of a module's state dict (names, shapes, dtypes and bytes, sorted by name)."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().to("cpu").contiguous().view(-1)
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _parse_value(text: str) -> Any:
    """Query-string value: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def _split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name?key=value&...`` -> (name, {key: value})."""
    base, sep, query = spec.partition("?")
    if not sep:
        return spec, {}
    return base, {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}


def _version() -> str:
    import nic

    return str(getattr(nic, "__version__", ""))


def _weight_files(path: Path) -> tuple[Path, Path]:
    """(safetensors file, sidecar json) of a saved encoder file or directory."""
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / _WEIGHTS_NAME, path / "encoder.json"


# ----------------------------------------------------------------------------- saving


def save_encoder(encoder: Encoder, path: str | Path) -> Path:
    """Write ``encoder`` in the project's format and return the safetensors path.

    ``path`` ending in ``.safetensors`` writes that file and ``<stem>.json`` beside it;
    any other path is a directory that receives ``encoder.safetensors`` and
    ``encoder.json``.  Existing files are replaced.
    """
    from nic._outputs import save_safetensors, write_atomic

    if getattr(encoder.module, "inference_only", False):
        raise EncoderError(
            f"cannot save {encoder.name}: its module is the fused copy from for_inference(); save the encoder "
            "it came from"
        )
    path = Path(path)
    weights, sidecar = _weight_files(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    import torch

    tensors = {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in encoder.module.state_dict().items()
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "config": encoder.config.to_json(),
        "nic_version": _version(),
        "source": encoder.source or ({"sha256": encoder.checksum} if encoder.checksum else {}),
    }
    try:
        text = json.dumps(meta, sort_keys=True)
    except TypeError as e:
        raise EncoderError(
            f"cannot save {encoder.name}: its config is not JSON ({e}); give arch_args as numbers, strings or lists"
        ) from e
    tmp = weights.with_name(weights.name + ".tmp")
    save_safetensors(tensors, tmp, metadata={_META_KEY: text})
    tmp.replace(weights)
    write_atomic(sidecar, lambda f: f.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    logger.info("saved encoder %s to %s", encoder.name, weights)
    return weights


# ----------------------------------------------------------------------------- loading


def _read_meta(weights: Path, sidecar: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            embedded = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise EncoderError(f"{weights}: not a readable safetensors file ({e}); save it again with save_encoder") from e
    try:
        if embedded:
            meta = json.loads(embedded)
        elif sidecar.is_file():
            meta = json.loads(sidecar.read_text())
        else:
            raise EncoderError(
                f"{weights}: no encoder metadata (embedded or {sidecar.name}); use "
                f"'timm:<model>?weights={weights}' or a registry name with weights="
            )
    except json.JSONDecodeError as e:
        raise EncoderError(f"{weights}: encoder metadata is not valid JSON ({e})") from e
    if "config" not in meta or "architecture" not in meta.get("config", {}):
        raise EncoderError(f"{weights}: encoder metadata lacks config.architecture; save it again with save_encoder")
    return meta


def _read_state_dict(path: Path, unsafe: bool) -> dict[str, Any]:
    """Tensors of a .safetensors file, or (unsafe only) of a pickled checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise EncoderError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in _PICKLE_SUFFIXES:
        if not unsafe:
            raise EncoderError(
                f"{path}: pickled checkpoints can run code when loaded and are refused; convert it to .safetensors "
                f"(python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{path}', "
                "weights_only=True); save_file({k: v.contiguous().clone() "
                "for k, v in sd.get('state_dict', sd).items()}, "
                f"'{path.with_suffix('.safetensors')}')\") "
                "and give that file, or, if you trust it, load it from Python with unsafe=True"
            )
        import torch

        logger.warning("unpickling %s (unsafe=True)", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if hasattr(obj, "state_dict") and not isinstance(obj, dict):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise EncoderError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        return obj
    raise EncoderError(
        f"{path}: unknown weight format {path.suffix!r}; give .safetensors (or .pth/.pt with unsafe=True)"
    )


def _load_weights_into(encoder: Encoder, path: Path, unsafe: bool) -> None:
    """Load a plain state dict (timm or project keys) into ``encoder.module``."""
    import torch

    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    state = {k: v for k, v in _read_state_dict(path, unsafe).items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    module = encoder.module
    own = module.state_dict()
    # timm weights carry backbone keys; our timm module nests the backbone under ``body``.
    if not set(state) & set(own) and hasattr(module, "body"):
        state = {f"body.{k}": v for k, v in state.items()}
    dropped = sorted(k for k in state if k not in own)
    if dropped:
        logger.info("ignoring %d keys of %s not in the encoder (e.g. heads): %s", len(dropped), path, dropped[:5])
    state = {k: v for k, v in state.items() if k in own}
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise EncoderError(
            f"{path}: weights lack {len(missing)} of the encoder's tensors (e.g. {', '.join(missing[:3])}); "
            f"they are not weights for {encoder.name}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise EncoderError(
            f"{path}: tensor {k} has shape {tuple(state[k].shape)}, {encoder.name} needs {tuple(own[k].shape)}; "
            "check the architecture arguments"
        )
    module.load_state_dict(state, strict=True)
    encoder.checksum = file_sha256(path)
    encoder.source = {"format": path.suffix.lstrip("."), "file": path.name, "sha256": encoder.checksum}


def _load_saved(path: Path) -> Encoder:
    """An encoder saved by :func:`save_encoder` (directory or .safetensors file)."""
    weights, sidecar = _weight_files(path)
    if not weights.is_file():
        raise EncoderError(f"{path}: no {weights.name} inside; expected a directory written by save_encoder")
    meta = _read_meta(weights, sidecar)
    fmt = int(meta.get("format_version", 1))
    if fmt > FORMAT_VERSION:
        raise EncoderError(
            f"{weights}: format_version {fmt} is newer than this nic supports ({FORMAT_VERSION}); upgrade nic"
        )
    try:
        config = EncoderConfig.from_json(meta["config"])
    except TypeError as e:
        raise EncoderError(f"{weights}: bad config in metadata ({e})") from e
    encoder = _build(config)
    for field in ("code_size", "patch_size"):
        if getattr(encoder.config, field) != getattr(config, field):
            raise EncoderError(
                f"{weights}: metadata says {field}={getattr(config, field)} but {config.architecture} with "
                f"its arch_args builds {getattr(encoder.config, field)}; fix the metadata"
            )
    from safetensors.torch import load_file

    state = load_file(str(weights), device="cpu")
    try:
        encoder.module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise EncoderError(
            f"{weights}: weights do not fit {config.architecture} {config.arch_args}: {first[-1].strip()}"
        ) from e
    encoder.config = config
    encoder.checksum = file_sha256(weights)
    encoder.source = dict(meta.get("source") or {})
    return encoder


# ----------------------------------------------------------------------------- spec kinds
# Registered in the order load_encoder asks them: a "timm:" prefix first, then files that
# exist, then registry names (so a saved folder named like a builder is still the folder).


def _create(
    name: str, query: dict[str, Any], *, unsafe: bool, weights: Any, seed: int | None, arch_args: dict[str, Any]
) -> Encoder:
    """A registry encoder ``name`` built from query and keyword arguments, with ``weights`` loaded into it."""
    kwargs = {**query, **arch_args}
    file = weights if weights is not None else kwargs.pop("weights", None)
    kwargs.pop("weights", None)
    if seed is None:
        encoder = create_encoder(name, **kwargs)
    else:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            encoder = create_encoder(name, **kwargs)
    if file not in (None, ""):
        _load_weights_into(encoder, Path(str(file)).expanduser(), unsafe)
        if name == "timm" and ("mean" not in kwargs or "std" not in kwargs):
            c = encoder.config
            logger.warning(
                "%s: normalising with mean %s / std %s, timm's values for its own %s weights; if these weights "
                "were trained with others, pass them (e.g. ImageNet's, for UNI: "
                "mean=[0.485,0.456,0.406]&std=[0.229,0.224,0.225])",
                file, [round(v, 4) for v in c.mean], [round(v, 4) for v in c.std], kwargs.get("model_name"),
            )  # fmt: skip
    elif name == "timm" and bool(kwargs.get("pretrained")):
        encoder.checksum = _state_sha256(encoder.module)
        encoder.source = {"format": "timm-pretrained", "model": kwargs["model_name"], "sha256": encoder.checksum}
    elif seed is not None:
        encoder.source = {"init": "random", "seed": int(seed)}
    return encoder


@register_spec_kind("timm", form="timm:<model>[?weights=FILE]", claims=lambda text, path: text.startswith("timm:"))
def _timm_spec(text: str, path: Path, **opts: Any) -> Encoder:
    model, query = _split_spec(text[len("timm:") :])
    if not model:
        raise EncoderError("empty timm model name; write 'timm:<model>', e.g. 'timm:resnet18'")
    return _create("timm", {"model_name": model, **query}, **opts)


@register_spec_kind(
    "saved",
    form="a folder or .safetensors from save_encoder",
    claims=lambda text, path: path.is_dir() or (path.is_file() and path.suffix.lower() == ".safetensors"),
    fixed=True,
)
def _saved_spec(text: str, path: Path, **opts: Any) -> Encoder:
    return _load_saved(path)


@register_spec_kind(
    "keras",
    form="a Keras .h5 (published NIC weights)",
    claims=lambda text, path: path.is_file() and path.suffix.lower() in _KERAS_SUFFIXES,
    fixed=True,
)
def _keras_spec(text: str, path: Path, **opts: Any) -> Encoder:
    from nic.encoders._keras import load_keras_encoder

    return load_keras_encoder(path)


@register_spec_kind(
    "pickle",
    form="a .pt/.pth/.ckpt state dict with its JSON (unsafe=True, from Python)",
    claims=lambda text, path: path.is_file() and path.suffix.lower() in _PICKLE_SUFFIXES,
    fixed=True,
)
def _pickle_spec(text: str, path: Path, *, unsafe: bool, **opts: Any) -> Encoder:
    return _load_pickled(path, unsafe)


@register_spec_kind(
    "name",
    form="a registered name[?key=value&...]",
    claims=lambda text, path: not path.exists() and _split_spec(text)[0] in list_encoders(),
)
def _name_spec(text: str, path: Path, **opts: Any) -> Encoder:
    name, query = _split_spec(text)
    return _create(name, query, **opts)


def _unclaimed(text: str, path: Path) -> str:
    """The message for a spec no kind claims: an existing file of an unknown type, or an unknown name or path."""
    files = ", ".join(k.form for k in spec_kinds() if k.fixed)
    if path.exists():
        return f"{path}: unknown encoder file type {path.suffix.lower()!r}; give {files}"
    base = _split_spec(text)[0]
    looks_like_path = any(c in base for c in "/\\") or Path(base).suffix != ""
    what = f"no file at {path}" if looks_like_path else f"unknown encoder {base!r}"
    others = ", ".join(k.form for k in spec_kinds() if k.name != "name")
    return f"{what}; registered encoders: {', '.join(list_encoders())}; or {others}"


def load_encoder(
    spec: str | Path,
    device: Any = "cpu",
    *,
    unsafe: bool = False,
    weights: str | Path | None = None,
    seed: int | None = None,
    **arch_args: Any,
) -> Encoder:
    """Load an encoder from ``spec``; the result is in eval mode on ``device``.

    ``spec`` is one of the registered spec kinds (:func:`~nic.encoders.spec_kinds`; more
    can be added with :func:`~nic.encoders.register_spec_kind`), built in:

    - a registry name (``nic-cnn``; see :func:`list_encoders`), random init unless
      ``weights`` is given; ``name?key=value&...`` passes architecture arguments;
    - ``timm:<model>[?weights=FILE&patch_size=224&mpp=0.5&pretrained=false&...]``: a timm
      backbone with pooled features; nothing is downloaded unless ``pretrained=true``;
    - a Keras ``.h5`` file of the published NIC encoders;
    - a directory or ``.safetensors`` file written by :func:`save_encoder`;
    - a pickled checkpoint (.pt/.pth/.ckpt) with a sidecar JSON, only with ``unsafe=True``.

    ``weights`` (a .safetensors, or with ``unsafe`` a .pth/.pt state dict) loads into a
    registry or timm encoder; extra keyword arguments are architecture arguments (plus
    ``mean``, ``std``, ``mpp``).  ``seed`` seeds torch while a registry or timm encoder is
    built (the global random state is left as it was), so a random initialisation is
    reproducible; without weights it is recorded as ``source = {"init": "random", "seed": seed}``.
    ``timm:<model>?pretrained=true`` gets the sha256 of its downloaded weights as checksum.
    Errors are :class:`EncoderError` naming the fix.
    """
    device = torch_device(device)
    text = str(spec)
    path = Path(text).expanduser()
    kind = spec_kind(text)
    if kind is None:
        raise EncoderError(_unclaimed(text, path))
    if kind.fixed and (arch_args or weights is not None):
        extra = sorted(arch_args) + (["weights"] if weights is not None else [])
        raise EncoderError(f"{path}: a weight file fixes its architecture; drop the extra arguments {extra}")
    encoder = kind.load(text, path, unsafe=unsafe, weights=weights, seed=seed, arch_args=arch_args)
    encoder.module.eval()
    try:
        return encoder.to(device)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(f"cannot move the encoder to device {str(device)!r} ({first}); try `device=cpu`") from e


def _load_pickled(path: Path, unsafe: bool) -> Encoder:
    """A pickled state dict with a project sidecar JSON (``<stem>.json``); unsafe only."""
    if not unsafe:
        _read_state_dict(path, unsafe)  # raises the refusal
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise EncoderError(
            f"{path}: a pickled state dict says nothing about its architecture; add {sidecar.name} "
            "(as written by save_encoder) or use 'timm:<model>?weights=FILE' / load_encoder(name, weights=FILE)"
        )
    try:
        meta = json.loads(sidecar.read_text())
        config = EncoderConfig.from_json(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise EncoderError(f"{sidecar}: not encoder metadata ({e}); write it with save_encoder") from e
    encoder = _build(config)
    _load_weights_into(encoder, path, unsafe=True)
    encoder.config = config
    return encoder


def _build(config: EncoderConfig) -> Encoder:
    """A randomly initialised encoder of the architecture and settings that ``config`` names."""
    return create_encoder(
        config.architecture,
        mean=config.mean,
        std=config.std,
        mpp=config.mpp,
        encoder_name=config.name or None,
        **config.arch_args,
    )
