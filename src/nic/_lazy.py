"""Lazy package attributes: ``import nic`` (and ``nic.encoder_training``) stays light.

A package lists ``name -> module`` and gets a module ``__getattr__`` that imports the
module on first use of the name (torch, zarr and friends load only when needed) and
caches the value in the package namespace, plus a ``__dir__`` listing the names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, table: dict[str, str], namespace: dict[str, Any], names: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose attribute ``name`` lives in the module
    ``table[name]``; ``namespace`` is the package's ``globals()``, ``names`` its ``__all__``."""

    def getattr_(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return names

    return getattr_, dir_
