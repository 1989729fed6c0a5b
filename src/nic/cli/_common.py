"""Shared bits of the command line: the run state, nic's log lines, error lines and options.

- :func:`flag`: the flag of a library parameter (``batch_size`` -> ``--batch-size``), the
  one place where parameter names become flags, for options and for error messages alike;
- :func:`cli_message` / :func:`with_flags`: an error's message or a warning with flags for
  the parameters it names;
- :func:`config_option`: a typer option whose default is read from a library config
  class, so the command line cannot drift from the library.
"""

from __future__ import annotations

import ast
import functools
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer


@dataclass
class _State:
    debug: bool = False
    verbose: bool = False


state = _State()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (test runners swap it per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _LineFormatter(logging.Formatter):
    """``warning: message`` (or with ``verbose``: ``INFO nic.module: message``)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s")
        self.verbose = verbose

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = with_flags(record.message)  # warnings give advice in parameter names too
        if self.verbose:
            return super().formatMessage(record)
        return f"{record.levelname.lower()}: {record.message}"


def setup_logging(verbose: bool) -> None:
    """Show nic's own log lines on stderr, one line each.

    Warnings always (``warning: message``); with ``verbose`` also INFO, as ``INFO
    nic.module: message``.  Only the ``nic`` logger gets a handler; the root logger and
    other libraries' loggers are left as they are.
    """
    log = logging.getLogger("nic")
    for h in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(_LineFormatter(verbose))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.NOTSET)


MppOption = typer.Option(
    None,
    "--mpp",
    help="um/px of the slide's level 0, between 0.05 and 100 (40x: about 0.25, 20x: 0.5); overrides the file "
    "(needed when the file has none).",
)


# -- parameter names and flags ------------------------------------------------------------------

#: Library parameters whose flag is not the parameter's own name.
_FLAGS = {
    "num_workers": "--workers", "early_stopping_patience": "--patience", "out_dir": "--out", "n_slides": "--slides",
    "fmt": "--format", "patches_dir": "--patches", "tasks": "--task",
}  # fmt: skip

#: A parameter named in an error message: `name` or `name=value` (see :mod:`nic.errors`).
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`\s]*))?`")


def flag(name: str) -> str:
    """The command-line flag of the library parameter ``name``: ``--`` and the name with
    hyphens (``batch_size`` -> ``--batch-size``), or the flag in :data:`_FLAGS`."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def with_flags(text: str) -> str:
    """``text`` with each parameter it names as the flag that sets it:
    `` `lr` `` -> ``--lr``, `` `overwrite=True` `` -> ``--overwrite``,
    `` `device=cpu` `` -> ``--device cpu``.  A command's positional argument is named by
    its metavar in upper case (`` `OUT` `` -> ``OUT``): it has no flag."""

    def sub(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name.isupper() and value is None:
            return name
        if value is None or value == "True":
            return flag(name)
        return f"{flag(name)} {value}"

    return _PARAM.sub(sub, text)


def set_torch_threads(n: int | None) -> None:
    """``--threads``: torch's CPU threads ``n`` (an integer of at least 1), or torch's own
    default for None."""
    if n is None:
        return
    import torch

    from nic.errors import check_int

    check_int("threads", n, 1)
    torch.set_num_threads(n)


def cli_message(error: BaseException) -> str:
    """An error's message as the command line prints it: :func:`with_flags` of ``str(error)``."""
    return with_flags(str(error))


# -- option defaults from the library -----------------------------------------------------------


@functools.cache
def _field_defaults(module: str, cls: str) -> dict[str, Any]:
    """The literal defaults of the dataclass ``cls`` in ``module`` (and of its base classes
    in that module), read from the source: importing the module would pull torch into
    ``nic --help``."""
    import nic

    path = Path(nic.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    classes = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}

    def defaults(name: str) -> dict[str, Any]:
        node = classes[name]
        out: dict[str, Any] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(defaults(base.id))
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None):
                continue
            name, value = stmt.target.id, stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
                value = next((k.value for k in value.keywords if k.arg == "default"), None)  # type: ignore[assignment]
            try:
                out[name] = ast.literal_eval(value)  # type: ignore[arg-type]
            except ValueError:  # a factory or an expression: not offered as a default
                out.pop(name, None)
        return out

    return defaults(cls)


def library_default(config: str, name: str) -> Any:
    """The default of field ``name`` of ``config`` (``"module:Class"``, a dataclass whose
    default is a literal), e.g. ``library_default("nic.learn.train:FitConfig", "lr")``."""
    module, cls = config.split(":")
    found = _field_defaults(module, cls)
    if name not in found:
        raise KeyError(f"{config} has no field {name!r} with a literal default")
    return found[name]


def config_option(config: str, name: str, help: str, *decls: str) -> Any:
    """A typer option for field ``name`` of ``config``: its default is the library's
    (:func:`library_default`), its flag :func:`flag` (``decls`` adds short forms)."""
    return typer.Option(library_default(config, name), flag(name), *decls, help=help)
