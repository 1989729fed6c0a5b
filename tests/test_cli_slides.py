"""`nic info` and `nic tissue` through typer's runner, bad input included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from nic.cli import app

runner = CliRunner()


def test_help_on_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [c for c in app.registered_commands]
    assert commands
    for c in commands:
        name = c.name or c.callback.__name__
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, name
        assert "Usage" in r.output
    for group in app.registered_groups:
        r = runner.invoke(app, [group.name, "--help"])
        assert r.exit_code == 0, group.name


def test_info_json_reports_svs(shared, wsi_dir: Path):
    r = runner.invoke(app, ["info", str(wsi_dir / "CMU-1-Small-Region.svs"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["width"], d["height"]) == (2220, 2967)
    assert d["mpp_x"] == 0.499 and d["vendor"] == "aperio"


def test_info_refuses_unknown_mpp_then_accepts_flag(shared, wsi_dir: Path):
    path = str(wsi_dir / "CropBreastSlide_pyramid.tiff")
    r = runner.invoke(app, ["info", path])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "CropBreastSlide_pyramid.tiff" in lines[0] and "--mpp" in lines[0]
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["info", path, "--mpp", "0.5", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["mpp_x"] == 0.5


def test_bad_paths_exit_2_with_one_line(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.touch()
    for arg in [tmp_path / "missing.svs", tmp_path, empty]:
        r = runner.invoke(app, ["info", str(arg)])
        assert r.exit_code == 2, arg
        assert len(r.stderr.strip().splitlines()) == 1 and str(arg) in r.stderr


def test_debug_shows_the_exception(tmp_path):
    r = runner.invoke(app, ["--debug", "info", str(tmp_path / "missing.svs")])
    assert r.exit_code != 0 and r.exception is not None


def test_tissue_writes_mask_and_overlay(shared, tmp_path, wsi_dir: Path):
    out = tmp_path / "sub" / "mask.png"
    r = runner.invoke(app, ["tissue", str(wsi_dir / "CMU-1-Small-Region.svs"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(out))
    overlay = np.asarray(Image.open(tmp_path / "sub" / "mask_overlay.png"))
    assert mask.shape == (370 // 2, 276 // 2) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape[0] == mask.shape[0] and overlay.shape[1] > 2 * mask.shape[1]
    assert "% tissue" in r.output


def test_tissue_refuses_a_mask_mpp_that_is_not_a_positive_number(tmp_path):
    slide = tmp_path / "crop.png"
    Image.fromarray(np.full((40, 60, 3), 245, np.uint8)).save(slide)
    for value in ("nan", "inf", "0", "-3"):
        r = runner.invoke(
            app, ["tissue", str(slide), "--mpp", "0.5", "--mask-mpp", value, "-o", str(tmp_path / "m.png")]
        )
        assert r.exit_code == 2, (value, r.output)
        assert r.stderr.strip() == f"error: --mask-mpp must be a number greater than 0 (got {float(value)!r})"
    assert not (tmp_path / "m.png").exists()


def test_tissue_refuses_existing_outputs_and_files_in_the_way(tmp_path):
    slide = tmp_path / "crop.png"
    Image.fromarray(np.full((40, 60, 3), 245, np.uint8)).save(slide)
    base = ["tissue", str(slide), "--mpp", "0.5", "--mask-mpp", "4"]
    mask, overlay = tmp_path / "m.png", tmp_path / "m_overlay.png"
    overlay.write_text("KEEP")  # the overlay alone is enough to refuse: both are written
    r = runner.invoke(app, [*base, "-o", str(mask)])
    refusal = f"error: {overlay}: exists; pass --overwrite to replace it, or choose another --out\n"
    assert r.exit_code == 2 and r.stderr == refusal
    assert overlay.read_text() == "KEEP" and not mask.exists()
    r = runner.invoke(app, [*base, "-o", str(mask), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Image.open(overlay).size[0] > 0 and Image.open(mask).size[0] > 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    in_the_way = [(afile / "m.png", f"{afile} is a file, not a folder"), (tmp_path, "is a folder; --out is the file")]
    for out, want in in_the_way:
        r = runner.invoke(app, [*base, "-o", str(out)])
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and want in r.stderr, r.output


def test_show_refuses_an_existing_picture_unless_overwrite(tmp_path):
    from nic.synth import make_planted_cohort

    planted = make_planted_cohort(tmp_path / "c", 2, grid=(6, 6), code_size=4, slides_per_patient=(1, 1), n_pairs=1)
    store = sorted(planted.stores.glob("*.zarr"))[0]
    pic = tmp_path / "show.png"
    pic.write_text("KEEP")
    r = runner.invoke(app, ["show", str(store), "--out", str(pic)])
    refusal = f"error: {pic}: exists; pass --overwrite to replace it, or choose another --out\n"
    assert r.exit_code == 2 and r.stderr == refusal
    assert pic.read_text() == "KEEP"
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = runner.invoke(app, ["show", str(store), "--out", str(afile / "x.png")])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {afile / 'x.png'}: {afile} is a file, not a folder")
    r = runner.invoke(app, ["show", str(store), "--out", str(pic), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Image.open(pic).size[0] > 0
