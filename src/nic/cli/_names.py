"""Option help that lists the names a registry holds, filled in when the help is shown.

An option's help may hold ``{names:MODULE:ATTR}``: ``ATTR`` of ``MODULE`` is a function
returning names (``list_models``) or a sequence of them (``POOLS``).  Commands made with
``cls=NamesCommand`` replace the slot with the names, comma-separated, only when their
help is printed, so ``nic --help`` imports no registry (and no torch), and the help can
never list a name the library does not know.  Unknown values are refused by the library,
whose one-line error lists the same names.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from typer.core import TyperCommand

__all__ = ["NamesCommand", "fill_names", "names_of"]

_SLOT = re.compile(r"\{names:([\w.]+):(\w+)\}")


def names_of(module: str, attr: str) -> list[str]:
    """The names ``attr`` of ``module`` holds or returns."""
    value = getattr(importlib.import_module(module), attr)
    return [str(v) for v in (value() if callable(value) else value)]


def fill_names(text: str) -> str:
    """``text`` with every ``{names:MODULE:ATTR}`` slot replaced by those names, comma-separated."""
    return _SLOT.sub(lambda m: ", ".join(names_of(m.group(1), m.group(2))), text)


class NamesCommand(TyperCommand):
    """A command whose options' help slots are filled from the registries when help is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            text = getattr(param, "help", None)
            if text and "{names:" in text:
                param.help = fill_names(text)  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)
