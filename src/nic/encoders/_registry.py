"""The encoder registry and its one factory, :func:`create_encoder` (timm-style).

A *builder* is a function registered under a name with :func:`register_encoder`.  It takes
its architecture keyword arguments (recorded in ``EncoderConfig.arch_args`` so the
encoder can be rebuilt from saved metadata) plus the optional keywords ``mean`` and
``std`` (per-channel RGB normalisation of inputs in [0, 1]; ``None`` means the builder's
default), and returns an :class:`~nic.encoders.Encoder` whose ``module`` normalises
inside.  Each entry may also carry ``tiny`` arguments: a configuration small enough to
run a forward and backward pass in milliseconds, used by the registry contract tests.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nic.encoders._base import Encoder
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = ["register_encoder", "create_encoder", "list_encoders", "encoder_entry", "RegistryEntry"]

Builder = Callable[..., Encoder]


@dataclass(frozen=True)
class RegistryEntry:
    """One registered builder: its name, function, one-line description and tiny arguments."""

    name: str
    builder: Builder
    description: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, RegistryEntry] = {}


def register_encoder(
    name: str, *, description: str = "", tiny: dict[str, Any] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name``.

    ``description`` is shown by ``nic encoders``; it defaults to the first line of the
    builder's docstring.  ``tiny`` holds keyword arguments for a very small instance
    (contract tests).  Registering a name twice raises :class:`EncoderError`.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise EncoderError(f"encoder name {name!r} is already registered; pick another name")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RegistryEntry(name, builder, description or (doc[0] if doc else ""), dict(tiny or {}))
        return builder

    return decorator


def _ensure_builtins() -> None:
    # The built-in builders register themselves when their modules are imported.
    from nic.encoders import _concat, _mean_rgb, _nic_cnn, _timm  # noqa: F401


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def encoder_entry(name: str) -> RegistryEntry:
    """The registry entry of ``name``; :class:`EncoderError` listing the names if unknown."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EncoderError(
            f"unknown encoder {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
            "(or 'timm:<model>', a Keras .h5 file, or a saved encoder path)"
        ) from None


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
