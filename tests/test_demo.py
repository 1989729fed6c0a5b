"""`nic demo` end to end on a tiny cohort."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from nic.cli import app
from nic.demo import DemoConfig, run_demo

runner = CliRunner()


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    cfg = DemoConfig(
        slides=10, size=4096, seed=3, patches_per_class=16, encoder_epochs=1, slide_epochs=2, folds=2, workers=1
    )
    summary = run_demo(out, cfg, say=lines.append)
    stages = summary["stages"]
    assert list(stages) == ["cohort", "inspect", "grid", "encoder", "compress", "learn", "explain"]
    assert len(stages["cohort"]["slides"]) == 10
    assert stages["grid"]["grid_shape"] == [32, 32]
    assert (out / "tissue_overlay.png").is_file() and (out / "compressed_slide.png").is_file()
    assert len(stages["compress"]["stores"]) == 10
    assert set(stages["learn"]) - {"seconds"} == {"proliferation", "growth_pattern", "survival"}
    assert "spearman" in stages["learn"]["proliferation"] and "c_index" in stages["learn"]["survival"]
    for task in ("proliferation", "growth_pattern", "survival"):
        assert (out / "runs" / task / "metrics.json").is_file()
    for task in ("proliferation", "growth_pattern", "survival"):
        report = (out / "reports" / f"{task}.html").read_text()
        assert "<h2>Metrics</h2>" in report and "<h2>Heatmaps</h2>" in report and "data:image/png;base64" in report
        assert len(list((out / "heatmaps" / task).glob("*.heatmap.tiff"))) == 2
    assert "Kaplan-Meier" in (out / "reports" / "survival.html").read_text()
    assert json.loads((out / "summary.json").read_text())["stages"]["grid"]["grid_shape"] == [32, 32]
    assert any("summary:" in line for line in lines)


def test_demo_refuses_a_folder_with_results(tmp_path):
    (tmp_path / "old.txt").write_text("results\\n")
    r = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert r.exit_code == 2 and f"error: {tmp_path}: already holds files; choose another --out" in r.stderr


def test_demo_refuses_an_unknown_encoder_method(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--encoder-method", "simclr"])
    assert r.exit_code == 2
    assert r.stderr == "error: --encoder-method must be one of multitask, vae, contrastive, bigan (got 'simclr')\n"
    assert not (tmp_path / "d").exists()


def test_demo_checks_its_cohort_against_the_folds_before_any_work(tmp_path):
    """--slides 2 once ran ~40 s, then failed at the learn stage and left a partial demo."""
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--slides", "2"])
    assert r.exit_code == 2 and r.stderr == (
        "error: --slides 2: a cohort of 2 patients; the demo's 3-fold cross-validation needs at least 9 (3 per "
        "fold), both growth patterns and 2 deaths: use --slides of at least 10\n"
    )
    assert not (tmp_path / "d").exists()


def test_a_failed_demo_removes_what_it_wrote_and_a_killed_one_is_cleared(tmp_path, monkeypatch):
    import subprocess
    import sys

    import pytest

    import nic.demo as demo
    from nic.errors import DataError

    def fail(out, config, say):
        (out / "cohort").mkdir()
        (out / "cohort" / "labels.csv").write_text("slide\n")
        raise DataError("a stage failed")

    monkeypatch.setattr(demo, "_cohort", fail)
    lines: list[str] = []
    with pytest.raises(DataError):
        run_demo(tmp_path / "new", DemoConfig(slides=10), say=lines.append)
    assert not (tmp_path / "new").exists() and lines[-1] == f"the unfinished demo was removed: {tmp_path / 'new'}"
    (tmp_path / "empty").mkdir()  # an empty folder given: emptied again, kept
    with pytest.raises(DataError):
        run_demo(tmp_path / "empty", DemoConfig(slides=10), say=lines.append)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())

    # a demo killed half-way (its process gone) leaves a folder the next demo clears
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / "killed"
    (left / "cohort").mkdir(parents=True)
    (left / ".nic-partial").write_text(f"{dead.pid}\n")
    monkeypatch.setattr(demo, "_run_stages", lambda out, config, say: {"out": str(out)})
    run_demo(left, DemoConfig(slides=10), say=lines.append)
    assert sorted(p.name for p in left.iterdir()) == []  # the leftover gone, the (stubbed) demo finished
