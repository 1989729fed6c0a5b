"""The encoder registry and its one factory, :func:`create_encoder` (timm-style), and the
registry of the kinds of encoder spec that :func:`~nic.encoders.load_encoder` accepts.

A *builder* is a function registered under a name with :func:`register_encoder`.  It takes
its architecture keyword arguments (recorded in ``EncoderConfig.arch_args`` so the
encoder can be rebuilt from saved metadata) plus the optional keywords ``mean`` and
``std`` (per-channel RGB normalisation of inputs in [0, 1]; ``None`` means the builder's
default), and returns an :class:`~nic.encoders.Encoder` whose ``module`` normalises
inside.  Each entry may also carry ``tiny`` arguments: a configuration small enough to
run a forward and backward pass in milliseconds, used by the registry contract tests.
The built-in builders register themselves when :mod:`nic.encoders` imports their modules.

A *spec kind* (:func:`register_spec_kind`) is one way of naming an encoder: a registry
name, ``timm:<model>``, a saved encoder, a Keras file ...  Each says which specs it claims
and how it loads them; :func:`spec_kind` asks them in the order they were registered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nic._registry import Registry
from nic.encoders._base import Encoder
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = [
    "register_encoder",
    "create_encoder",
    "list_encoders",
    "encoder_entry",
    "RegistryEntry",
    "SpecKind",
    "register_spec_kind",
    "spec_kind",
    "spec_kinds",
]

Builder = Callable[..., Encoder]
#: ``load(text, path, *, unsafe, weights, seed, arch_args) -> Encoder`` of one spec kind
Loader = Callable[..., Encoder]


@dataclass(frozen=True)
class RegistryEntry:
    """One registered builder: its name, function, one-line description and tiny arguments."""

    name: str
    builder: Builder
    description: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpecKind:
    """One kind of encoder spec.

    ``form``: how users write it, for listings and messages; ``claims(text, path)``: whether
    a spec is of this kind (``path`` is the spec as a user path); ``load``: see
    :data:`Loader`; ``fixed``: the spec fixes the architecture and weights (a weight file),
    so architecture arguments and ``weights=`` are refused.
    """

    name: str
    form: str
    claims: Callable[[str, Path], bool]
    load: Loader
    fixed: bool = False


_ENCODERS: Registry[RegistryEntry] = Registry("encoder", EncoderError)
_SPEC_KINDS: Registry[SpecKind] = Registry("encoder spec kind", EncoderError)


def register_encoder(
    name: str, *, description: str = "", tiny: dict[str, Any] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name``.

    ``description`` is shown by ``nic encoders``; it defaults to the first line of the
    builder's docstring.  ``tiny`` holds keyword arguments for a very small instance
    (contract tests).  Registering a name twice raises :class:`EncoderError`.
    """

    def decorator(builder: Builder) -> Builder:
        doc = (builder.__doc__ or "").strip().splitlines()
        _ENCODERS.register(name, RegistryEntry(name, builder, description or (doc[0] if doc else ""), dict(tiny or {})))
        return builder

    return decorator


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return _ENCODERS.names()


def encoder_entry(name: str) -> RegistryEntry:
    """The registry entry of ``name``; :class:`EncoderError` listing the names if unknown."""
    if name not in _ENCODERS:
        others = [k.form for k in spec_kinds() if k.name != "name"]
        raise EncoderError(_ENCODERS.unknown(name, f" (or {', '.join(others)})" if others else ""))
    return _ENCODERS.get(name)


def register_spec_kind(
    name: str, *, form: str, claims: Callable[[str, Path], bool], fixed: bool = False
) -> Callable[[Loader], Loader]:
    """Decorator that registers a loader as the spec kind ``name`` (see :class:`SpecKind`).

    Kinds are asked in registration order, so a kind registered later only sees the
    specs that no earlier kind claimed.
    """

    def decorator(load: Loader) -> Loader:
        _SPEC_KINDS.register(name, SpecKind(name, form, claims, load, fixed))
        return load

    return decorator


def spec_kinds() -> list[SpecKind]:
    """The registered spec kinds, in the order they are asked."""
    return [k for _, k in _SPEC_KINDS.items()]


def spec_kind(text: str) -> SpecKind | None:
    """The first registered kind that claims the spec ``text``, or ``None``."""
    path = Path(text).expanduser()
    return next((k for k in spec_kinds() if k.claims(text, path)), None)


def create_encoder(
    name: str,
    *,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    mpp: float | None = None,
    encoder_name: str | None = None,
    **arch_args: Any,
) -> Encoder:
    """Build the registered encoder ``name`` with random weights.

    ``arch_args`` go to the builder (and are recorded in the config); ``mean``/``std``
    override the builder's input normalisation (RGB in [0, 1]); ``mpp`` (um/px) and
    ``encoder_name`` override the recorded input pixel size and display name.
    """
    entry = encoder_entry(name)
    kwargs = dict(arch_args)
    if mean is not None:
        kwargs["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        kwargs["std"] = tuple(float(v) for v in std)
    try:
        encoder = entry.builder(**kwargs)
    except TypeError as e:
        raise EncoderError(f"encoder {name!r} rejected its arguments {sorted(kwargs)}: {e}") from e
    changes: dict[str, Any] = {}
    if mpp is not None:
        if not mpp > 0:
            raise EncoderError(f"mpp must be a positive pixel size in um/px, got {mpp!r}")
        changes["mpp"] = float(mpp)
    if encoder_name:
        changes["name"] = encoder_name
    if not encoder.config.name and not encoder_name:
        changes["name"] = name
    if changes:
        encoder.config = dataclasses.replace(encoder.config, **changes)
    logger.debug("created encoder %s with %s", name, arch_args)
    return encoder
