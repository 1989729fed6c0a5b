"""The torch device a user asked for, checked the same way wherever a device is used.

``"auto"`` is the default of every command: the first CUDA device when torch sees one,
else the CPU.  A bad name or CUDA without a CUDA device is an :class:`OptionError`,
whoever asked.
"""

from __future__ import annotations

from typing import Any

from nic.errors import OptionError

#: What a ``device`` parameter takes.
DEVICE_HELP = "auto (cuda when torch sees one, else cpu), cpu, cuda, cuda:1, mps"


def torch_device(device: Any = "auto", _unused: object = None) -> Any:
    """``device`` (``"auto"``, a name or a ``torch.device``) as a ``torch.device``.

    Raises :class:`OptionError` (one line, with the fix) when torch does not know the name
    or it is CUDA without a CUDA device.  (The second argument, the error class callers
    once chose, is ignored: the fault has one class.)
    """
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"`device` {device!r} is not a torch device ({e}); use {DEVICE_HELP}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"`device` {str(dev)!r} asked for, but torch sees no CUDA device; use `device=cpu`")
    return dev
