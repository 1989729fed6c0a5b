"""One exception base for every error a user can fix, and one class per kind of fault.

Each message says which file or parameter is wrong, what was found and what to do.  The
class names the fault, never the caller: a bad ``device`` is an :class:`OptionError`
whether ``nic train``, ``nic compress`` or :func:`nic.load_encoder` was given it.

- :class:`OptionError`: a parameter's value cannot be used (out of range, unknown name,
  a device torch does not have, two options that exclude each other);
- :class:`DataError`: input data is wrong (a labels table, a patch dataset, a cohort folder,
  a saved run);
- :class:`OutputError`: an output cannot be written (it exists and is not to be replaced,
  it is not a folder nic wrote, its folder is read-only);
- :class:`SlideError` (:class:`MppError`), :class:`EncoderError`, :class:`StoreError`: a
  slide, an encoder or a compressed-slide store is wrong.

Messages name parameters by their Python names in backticks (`` `batch_size` ``, or
`` `overwrite=True` `` for a value to pass), so they read right from Python; the command
line prints the same message with its flags instead (``--batch-size``, ``--overwrite``)
on one line and exits with code 2 (:func:`nic.cli._common.cli_message`).
"""

from __future__ import annotations

from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

__all__ = [
    "NicError",
    "OptionError",
    "DataError",
    "OutputError",
    "SlideError",
    "MppError",
    "EncoderError",
    "StoreError",
    "check_int",
    "check_number",
    "check_choice",
]


class NicError(Exception):
    """Base of the errors nic raises for bad input; the message is meant for a user."""


class OptionError(NicError):
    """A parameter's value cannot be used; the message starts from the parameter's name."""


class DataError(NicError):
    """A labels table, patch dataset, cohort folder or saved run is wrong."""


class OutputError(NicError):
    """An output cannot be written: it exists (and is not to be replaced), it is not
    something nic wrote, or its folder does not accept new files."""


class SlideError(NicError):
    """A slide cannot be opened or read."""


class MppError(SlideError):
    """A slide's pixel size (um/px) is unknown or implausible."""


class EncoderError(NicError):
    """An encoder spec, weight file or configuration is wrong."""


class StoreError(NicError):
    """A compressed-slide store is missing, unfinished or inconsistent."""


# -- the checks every config makes, with one wording -------------------------------------------


def check_int(param: str, value: Any, lowest: int, highest: int | None = None) -> None:
    """:class:`OptionError` unless ``value`` is an integer in [``lowest``, ``highest``]."""
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= lowest
    if ok and (highest is None or value <= highest):  # type: ignore[operator]
        return
    want = f"of at least {lowest}" if highest is None else f"between {lowest} and {highest}"
    raise OptionError(f"`{param}` must be an integer {want} (got {value!r})")


def check_number(param: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:  # fmt: skip
    """:class:`OptionError` unless ``value`` is a real number between ``low`` and ``high``
    (each end excluded when ``*_open``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and value == value  # NaN fails
    if ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return
    if high == float("inf"):
        want = f"greater than {low:g}" if low_open else f"of at least {low:g}"
    else:
        want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise OptionError(f"`{param}` must be a number {want} (got {value!r})")


def check_choice(param: str, value: Any, choices: Collection[str]) -> None:
    """:class:`OptionError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise OptionError(f"`{param}` must be one of {', '.join(choices)} (got {value!r})")
