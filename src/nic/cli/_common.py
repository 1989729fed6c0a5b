"""Shared bits of the command line: the run state, nic's log lines and small option helpers."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

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
