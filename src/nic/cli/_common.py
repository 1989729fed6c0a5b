"""Shared bits of the command line: the run state and small option helpers."""

from __future__ import annotations

from dataclasses import dataclass

import typer


@dataclass
class _State:
    debug: bool = False


state = _State()


MppOption = typer.Option(
    None,
    "--mpp",
    help="um/px of the slide's level 0; overrides the file (needed when the file has none).",
)
