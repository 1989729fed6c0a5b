"""`nic demo` end to end on a tiny cohort, through the CLI runner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from nic.cli import app

runner = CliRunner()


def test_demo_runs_every_stage_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--slides", "4", "--size", "4096", "--seed", "3"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert len(stages["cohort"]["slides"]) == 4
    assert stages["grid"]["grid_shape"] == [32, 32]
    assert (out / "tissue_overlay.png").is_file()
    assert "summary:" in r.output
    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.stderr
