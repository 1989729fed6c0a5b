"""``nic audit``: flags on the shared real slides and on generated slides made to be wrong
(96-dpi tags, odd downsamples, um/px against objective power, no pyramid, no tissue,
unreadable), the exit code, and the CSV that ``nic compress`` reads back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from nic.audit import AuditOptions, audit_slide, audit_slides
from nic.cli import app
from nic.compress import collect_slides
from tests.test_compress import make_rgb, write_slide

FAST = AuditOptions(tissue=False)


def _tiff(path: Path, rgb: np.ndarray, downsamples=(1,), resolution=None, description=None) -> Path:
    """A tiled JPEG TIFF with the given level downsamples; ``resolution`` = (value, unit)."""
    kw = {} if resolution is None else {"resolution": (resolution[0],) * 2, "resolutionunit": resolution[1]}
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate(downsamples):
            h, w = rgb.shape[0] // d, rgb.shape[1] // d
            lv = rgb[: h * d : d, : w * d : d]
            extra = {"description": description, "metadata": None} if description and i == 0 else {}
            tw.write(np.ascontiguousarray(lv), tile=(256, 256), compression="jpeg", photometric="rgb",
                     subfiletype=1 if i else 0, **kw, **extra)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def odd_slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audit")
    rgb = make_rgb(2304, 2304, 3)
    aperio = "Aperio Image Library v12.0.15\r\n2304x2304 [0,0 2304x2304] (256x256) JPEG/RGB Q=70|AppMag = {}|MPP = 0.5"
    bad = d / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    return {
        "good": write_slide(d / "good.tif", (1536, 1280), 0.5, seed=2),
        "dpi96": _tiff(d / "dpi96.tif", rgb, (1, 2, 4), resolution=(96, "INCH")),
        "odd": _tiff(d / "odd.tif", rgb, (1, 3, 9), resolution=(1e4 / 0.25, "CENTIMETER")),
        "power": _tiff(d / "power.svs", rgb, description=aperio.format(40)),
        "power_ok": _tiff(d / "power_ok.svs", rgb, description=aperio.format(20)),
        "flat": _tiff(d / "flat.tif", np.full((512, 10240, 3), 245, np.uint8), resolution=(1e4 / 0.5, "CENTIMETER")),
        "broken": bad,
    }


def test_shared_slides(shared: Path, wsi_dir: Path) -> None:
    rows = {Path(r.slide).name: r for r in audit_slides([wsi_dir])}
    cmu = rows["CMU-1-Small-Region.svs"]
    assert cmu.readable and not cmu.flags and not cmu.would_fail
    assert (cmu.vendor, cmu.width, cmu.height, cmu.levels, cmu.objective_power) == ("aperio", 2220, 2967, 1, 20.0)
    assert cmu.mpp_x == pytest.approx(0.499) and cmu.mpp_source == "aperio metadata" and cmu.level_near_encoder
    assert 150 <= cmu.tissue_patches <= 200 and cmu.est_seconds is not None

    crop = rows["CropBreastSlide_pyramid.tiff"]
    assert crop.readable and crop.would_fail and crop.mpp_x is None and crop.levels == 6
    assert crop.flags == ["um/px missing: the file holds a 96-dpi image-software default"]

    dcm = rows["camelyon_lowres_wsi.dcm"]
    assert dcm.vendor == "dicom" and dcm.mpp_x == pytest.approx(28.97, abs=0.01) and dcm.would_fail
    assert len(dcm.flags) == 1 and "coarser than the encoder's 0.5 um/px" in dcm.flags[0]


def test_generated_slides_are_flagged(odd_slides: dict[str, Path]) -> None:
    r = {k: audit_slide(p, FAST) for k, p in odd_slides.items()}
    assert not r["good"].flags and r["good"].levels == 2
    assert r["dpi96"].would_fail and "96-dpi" in r["dpi96"].flags[0]
    assert not r["odd"].would_fail and r["odd"].downsamples == "1;3;9"
    assert r["odd"].flags == ["non-standard downsamples (1;3;9): not powers of two", "no level near 0.5 um/px: "
                              "reads level 0 (0.25 um/px) and resamples"]  # fmt: skip
    assert r["power"].objective_power == 40 and not r["power"].would_fail
    assert r["power"].flags == ["um/px 0.5 disagrees with objective power 40x (expects about 0.25)"]
    assert not r["power_ok"].flags
    assert r["flat"].flags[0].startswith("no pyramid (one level of 10240 x 512 px)")
    assert not r["broken"].readable and r["broken"].flags == ["unreadable"] and "broken.svs" in r["broken"].error
    # the tissue estimate: a blank slide would compress to nothing
    flat = audit_slide(odd_slides["flat"])
    assert flat.tissue_patches == 0 and flat.would_fail and "no tissue found" in flat.flags


def test_cli_exit_code_csv_and_html(odd_slides: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", str(odd_slides["good"]), str(odd_slides["power"]), "-o", str(tmp_path / "a.csv")])
    assert ok.exit_code == 0, ok.output
    assert collect_slides([tmp_path / "a.csv"]) == [odd_slides["good"].resolve(), odd_slides["power"].resolve()]
    text = (tmp_path / "a.csv").read_text()
    assert text.startswith("slide,readable,error,vendor") and "objective power 40x" in text

    bad = runner.invoke(app, ["audit", str(odd_slides["good"]), str(odd_slides["dpi96"]), "--no-tissue",
                              "-o", str(tmp_path / "a.html")])  # fmt: skip
    assert bad.exit_code == 1 and "1 would fail" in bad.output
    assert "96-dpi" in (tmp_path / "a.html").read_text()
    wrong = runner.invoke(app, ["audit", str(odd_slides["good"]), "-o", str(tmp_path / "a.txt")])
    assert wrong.exit_code == 2 and ".csv or .html" in wrong.stderr


def test_encoder_sets_grid_and_speed(
    odd_slides: dict[str, Path], tmp_path: Path, shared: Path, keras_dir: Path
) -> None:
    """--encoder: its um/px and patch size lay the grid; its measured speed gives the time."""
    out = tmp_path / "a.csv"
    r = CliRunner().invoke(
        app, ["audit", str(odd_slides["good"]), "-e", str(keras_dir / "encoder_bigan.h5"), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    import csv

    [row] = list(csv.DictReader(out.open()))
    default = audit_slide(odd_slides["good"])
    assert int(row["tissue_patches"]) == default.tissue_patches > 0 and float(row["encoder_mpp"]) == 0.5
    assert 0 < float(row["est_seconds"]) < 60
    big = audit_slide(odd_slides["good"], AuditOptions(mpp=0.5, patch=256))
    assert big.tissue_patches < default.tissue_patches


def test_any_failure_is_that_slides_row(odd_slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that is not a SlideError (a codec, memory, a bug) marks that slide, not the
    whole audit; an interrupt still stops it."""
    import nic.grid
    import nic.slide

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("cannot allocate 3 GiB")

    monkeypatch.setattr(nic.grid, "patch_grid", no_memory)
    [good, power] = audit_slides([odd_slides["good"], odd_slides["power"]], AuditOptions())
    assert good.readable and good.would_fail and good.flags == ["unreadable pixels"]
    assert good.error == f"{odd_slides['good']}: MemoryError: cannot allocate 3 GiB" and power.would_fail

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("unexpected tag")

    monkeypatch.setattr(nic.slide, "open_slide", broken)
    row = audit_slide(odd_slides["good"], FAST)
    assert not row.readable and row.flags == ["unreadable"] and "ValueError: unexpected tag" in row.error

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(nic.slide, "open_slide", interrupted)
    with pytest.raises(KeyboardInterrupt):
        audit_slide(odd_slides["good"], FAST)


def test_nearest_level_of_non_square_pixels_is_the_level_read(tmp_path: Path) -> None:
    """0.25 x 0.5 um/px: level 1 is 0.5 um/px in x but 1.0 in y, so at 0.5 um/px level 0 is
    read, and the audit names that level, at its coarser axis's um/px."""
    from nic.slide import open_slide

    p = tmp_path / "aniso.tif"
    rgb = make_rgb(1024, 512, 5)
    with tifffile.TiffWriter(p) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", resolution=(4e4, 2e4), resolutionunit="CENTIMETER")
        tw.write(np.ascontiguousarray(rgb[::2, ::2]), tile=(256, 256), photometric="rgb", subfiletype=1)
    row = audit_slide(p, FAST)
    with open_slide(p) as s:
        assert s.best_level(0.5) == 0
    assert (row.nearest_level, row.nearest_level_mpp, row.level_near_encoder) == (0, 0.5, True)
    assert "anisotropic pixels (0.25 x 0.5 um/px)" in row.flags and not row.would_fail


def test_out_is_refused_before_the_audit_unless_overwrite(odd_slides: dict[str, Path], tmp_path: Path) -> None:
    """`nic audit list.csv --out list.csv` once replaced the user's slide list without a word."""
    runner = CliRunner()
    listing = tmp_path / "list.csv"
    listing.write_text(f"slide,mpp\n{odd_slides['good']},0.5\n")
    kept = listing.read_text()
    r = runner.invoke(app, ["audit", str(listing), "--no-tissue", "-o", str(listing)])
    refusal = f"error: {listing}: exists; pass --overwrite to replace it, or choose another --out\n"
    assert r.exit_code == 2 and r.stderr == refusal
    assert listing.read_text() == kept
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    r = runner.invoke(app, ["audit", str(listing), "--no-tissue", "-o", str(afile / "a.csv")])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {afile / 'a.csv'}: {afile} is a file, not a folder")
    assert len(r.stderr.splitlines()) == 1
    r = runner.invoke(app, ["audit", str(listing), "--no-tissue", "-o", str(listing), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert listing.read_text().startswith("slide,readable,error")
