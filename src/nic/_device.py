"""The torch device a user asked for, checked the same way by every command."""

from __future__ import annotations

from typing import Any

from nic.errors import NicError


def torch_device(device: Any, error: type[NicError]) -> Any:
    """``device`` (a name or a ``torch.device``) as a ``torch.device``; raises ``error``
    with a one-line fix when torch does not know it or it is CUDA without a CUDA device."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise error(f"bad --device {device!r} ({e}); use cpu, cuda, cuda:0 or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"--device {str(dev)!r} asked for, but torch sees no CUDA device; use --device cpu")
    return dev
