"""The one registry shape (nic._registry) behind encoders, encoder spec kinds and slide models,
and command-line help that reads its names from the registries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nic._registry import Registry
from nic.encoders import Encoder, create_encoder, list_encoders, load_encoder, register_spec_kind, spec_kinds
from nic.errors import DataError, EncoderError, OptionError
from nic.learn import list_models


def test_registry_duplicates_lookups_and_order() -> None:
    reg: Registry[int] = Registry("widget", DataError)
    assert reg.register("b", 2) == 2
    reg.decorator("a")(1)
    reg.register("b", 2)  # the same value again (a module imported twice): fine
    with pytest.raises(DataError, match="widget name 'b' is already registered"):
        reg.register("b", 3)
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.items() == [("b", 2), ("a", 1)]  # registration order, for dispatch
    assert reg.get("a") == 1 and "a" in reg and "c" not in reg
    with pytest.raises(DataError) as info:
        reg.get("c")
    assert str(info.value) == "unknown widget 'c'; registered: a, b" and "\n" not in str(info.value)
    named: Registry[int] = Registry("widget", OptionError, param="widget")
    named.register("x", 0)
    with pytest.raises(OptionError, match=r"^`widget` must be one of x \(got 'y'\)$"):
        named.get("y")
    reg.unregister("a")
    reg.unregister("a")  # absent: nothing to do
    assert reg.names() == ["b"]
    with pytest.raises(ValueError):
        reg.register("", 0)


def test_builtin_spec_kinds_in_dispatch_order() -> None:
    assert [k.name for k in spec_kinds()] == ["timm", "saved", "keras", "pickle", "name"]
    assert [k.name for k in spec_kinds() if k.fixed] == ["saved", "keras", "pickle"]


def test_a_registered_spec_kind_is_dispatched_to(tmp_path: Path) -> None:
    """A plug-in kind (here ``tiny:<code size>``) claims its specs; the others still work."""
    from nic.encoders import _registry

    calls: list[tuple[str, dict]] = []

    @register_spec_kind("tiny", form="tiny:<code size>", claims=lambda text, path: text.startswith("tiny:"))
    def _tiny(text: str, path: Path, **opts: object) -> Encoder:
        calls.append((text, dict(opts)))
        return create_encoder("nic-cnn", code_size=int(text[5:]), width=4, depth=1, patch_size=16)

    try:
        assert load_encoder("tiny:5", seed=3).code_size == 5
        assert calls[0][0] == "tiny:5" and calls[0][1]["seed"] == 3
        assert load_encoder("nic-cnn?code_size=7&width=4&depth=1&patch_size=16").code_size == 7
        with pytest.raises(EncoderError) as info:  # the error lists every kind's form, from the registry
            load_encoder("no-such-encoder")
        assert "tiny:<code size>" in str(info.value) and "timm:<model>" in str(info.value)
        with pytest.raises(EncoderError, match="already registered"):
            register_spec_kind("tiny", form="x", claims=lambda text, path: False)(_tiny)
    finally:
        _registry._SPEC_KINDS.unregister("tiny")
    with pytest.raises(EncoderError, match="unknown encoder 'tiny:5'"):
        load_encoder("tiny:5")


def test_weight_files_refuse_architecture_arguments(tmp_path: Path) -> None:
    from nic.encoders import save_encoder

    folder = tmp_path / "enc"
    save_encoder(create_encoder("mean-rgb"), folder)
    assert load_encoder(folder).code_size == 3
    with pytest.raises(EncoderError, match=r"fixes its architecture; drop the extra arguments \['code_size'\]"):
        load_encoder(folder, code_size=4)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EncoderError, match=r"unknown encoder file type '\.txt'; give a folder or \.safetensors"):
        load_encoder(tmp_path / "notes.txt")


def test_cli_help_lists_the_registries() -> None:
    from nic.cli import app
    from nic.explain._heatmap import METHODS
    from nic.learn.models import POOLS

    runner = CliRunner()

    def flat(args: list[str]) -> str:  # help text without the panels' borders and line wraps
        return re.sub(r"[\s│]+", " ", runner.invoke(app, args).output)

    text = flat(["train", "--help"])
    assert f"Slide model: {', '.join(list_models())}." in text
    assert f"global pooling: {', '.join(POOLS)}." in text
    assert "{names:" not in text
    text = flat(["heatmap", "--help"])
    assert ", ".join(METHODS) in text
    listing = runner.invoke(app, ["encoders", "list"]).output
    assert all(name in listing for name in list_encoders())
    assert all(k.form.replace("`unsafe=True`", "--unsafe") in listing for k in spec_kinds() if k.name != "name")


def test_top_level_help_imports_no_registry() -> None:
    """The help slots are filled only when a command's help is shown: ``nic --help`` stays light."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom nic.cli import app\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'nic.learn.models', 'nic.encoders') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
