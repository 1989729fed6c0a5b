"""The ``nic`` command: one thin command per verb over the library.

Each ``_*.py`` module here adds its commands to :data:`app` through ``register(app)``;
heavy imports stay inside the command functions so ``nic --help`` is fast.  Errors a
user can fix (:class:`nic.errors.NicError`) print as one line on stderr, with flags for
the parameters they name (:func:`nic.cli._common.cli_message`), and exit with code 2;
``--debug`` shows the traceback instead.  nic's warnings print as one line each
on stderr; ``-v/--verbose`` adds its INFO lines.
"""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from nic.cli import _audit, _compress, _demo, _encoders, _explain, _features, _learn, _slides, _synth, _train_encoder
from nic.cli._common import cli_message, setup_logging, state


class _Group(TyperGroup):
    """Turns errors a user can fix into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> object:
        from nic.errors import NicError

        try:
            return super().invoke(ctx)
        except NicError as e:
            if state.debug:
                raise
            click.echo(f"error: {cli_message(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if state.debug:
                raise
            click.echo("interrupted", err=True)
            ctx.exit(130)


app = typer.Typer(
    name="nic",
    cls=_Group,
    help="Neural Image Compression for gigapixel pathology slides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show nic's progress messages (INFO log lines) on stderr."
    ),
) -> None:
    state.debug, state.verbose = debug, verbose
    setup_logging(verbose)


for _module in (_slides, _synth, _encoders, _compress, _train_encoder, _learn, _explain, _demo, _features, _audit):
    _module.register(app)


def main() -> None:
    """Entry point of the console script."""
    app()
