"""The torch devices a user asked for, checked the same way wherever a device is used.

``"auto"`` is the default of every command: the first CUDA device when torch sees one,
else the CPU.  A bad name or CUDA without a CUDA device is an :class:`OptionError`,
whoever asked.  :func:`parse_devices` and :func:`check_devices` read and check the
device lists of the commands that run one worker per device (``nic compress --devices``,
``nic train --devices``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nic.errors import OptionError

#: What a ``device`` parameter takes.
DEVICE_HELP = "auto (cuda when torch sees one, else cpu), cpu, cuda, cuda:1, mps"


def torch_device(device: Any = "auto") -> Any:
    """``device`` (``"auto"``, a name or a ``torch.device``) as a ``torch.device``.

    Raises :class:`OptionError` (one line, with the fix) when torch does not know the name
    or it is CUDA without a CUDA device.
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


def parse_devices(text: str | Sequence[str]) -> tuple[str, ...]:
    """One torch device per worker from ``"0,1"`` (cuda:0, cuda:1), ``"cpu,cpu"``,
    ``"cuda:0,cuda:1"`` or a sequence of such names.  A device may repeat (two workers
    sharing one GPU).  Only the spelling is checked here; :func:`check_devices` asks torch."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not s for s in items):
        raise OptionError(f"`devices` {text!r} has an empty entry; give a comma-separated list such as 0,1 or cpu,cpu")
    return tuple(f"cuda:{s}" if s.isdigit() else s for s in items)


def check_devices(devices: Sequence[str]) -> None:
    """Refuse devices torch does not have here: a name it does not know, CUDA without a
    CUDA device, or a CUDA index past the last device (one line, with the fix)."""
    import torch

    cuda = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise OptionError(
                f"`devices` entry {d!r} is not a torch device ({e}); use 0,1 (CUDA indices) or cpu,cpu"
            ) from e
        if dev.type == "cuda":
            cuda.append(dev)
        else:
            torch_device(dev)
    if not cuda:
        return
    names = ", ".join(str(d) for d in cuda)
    if not torch.cuda.is_available():
        raise OptionError(
            f"`devices` asks for {names}, but torch sees no CUDA device here; use `device=cpu` "
            "(or `devices` cpu,cpu for CPU workers)"
        )
    n = torch.cuda.device_count()
    past = [str(d) for d in cuda if (d.index or 0) >= n]
    if past:
        raise OptionError(
            f"`devices` asks for {', '.join(past)}, but torch sees {n} CUDA device(s) (indices 0-{n - 1}); "
            "give indices below that"
        )
