"""``nic encoders``: list the registry, describe an encoder, convert the published Keras weights."""

from __future__ import annotations

from pathlib import Path

import typer

encoders_app = typer.Typer(
    name="encoders",
    help="Patch encoders: list the registry, describe one, import Keras weights.",
    invoke_without_command=True,
    add_completion=False,
)


@encoders_app.callback()
def _encoders(ctx: typer.Context) -> None:
    """Patch encoders: list the registry, describe one, import Keras weights."""
    if ctx.invoked_subcommand is None:
        list_cmd()


@encoders_app.command("list")
def list_cmd() -> None:
    """Print the registered encoders and the other kinds of spec --encoder accepts."""
    from rich.console import Console
    from rich.table import Table

    from nic.cli._common import with_flags
    from nic.encoders import encoder_entry, list_encoders, spec_kinds

    table = Table("name", "description", box=None, header_style="bold")
    for name in list_encoders():
        table.add_row(name, encoder_entry(name).description)
    console = Console(width=200)
    console.print(table)
    others = [with_flags(k.form) for k in spec_kinds() if k.name != "name"]
    console.print(f"Other specs: {'; '.join(others)}.", markup=False)


@encoders_app.command("info")
def info_cmd(
    spec: str = typer.Argument(..., help="Encoder spec: a registered name or another kind ('nic encoders list')."),
    unsafe: bool = typer.Option(False, "--unsafe", help="Allow pickled checkpoints (they can run code)."),
) -> None:
    """Describe an encoder: architecture, code size, input patch size and um/px, checksum."""
    import json

    from nic.encoders import load_encoder

    encoder = load_encoder(spec, unsafe=unsafe)
    params = sum(p.numel() for p in encoder.module.parameters())
    info = {
        "name": encoder.name,
        **encoder.config.to_json(),
        "parameters": params,
        "checksum": encoder.checksum,
        "source": encoder.source,
    }
    typer.echo(json.dumps(info, indent=2))


@encoders_app.command("import-keras")
def import_keras_cmd(
    src: Path = typer.Argument(..., help="Keras .h5 file of a NIC encoder."),
    out: Path = typer.Argument(..., help="Output: a directory, or a file ending in .safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Convert published NIC Keras weights to the project's format (safetensors + JSON)."""
    from nic._outputs import check_new_file
    from nic.encoders import load_keras_encoder, save_encoder
    from nic.errors import EncoderError

    if not src.is_file():
        raise EncoderError(f"{src}: no such file; give the path of a Keras .h5 encoder")
    target = out if out.suffix == ".safetensors" else out / "encoder.safetensors"
    check_new_file(target, overwrite, param="OUT")  # positional: named OUT, not a flag
    encoder = load_keras_encoder(src)
    written = save_encoder(encoder, out)
    typer.echo(f"{encoder.name}: code {encoder.code_size}, {encoder.patch_size} px at {encoder.mpp} um/px -> {written}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(encoders_app, name="encoders")
