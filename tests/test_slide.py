"""Slide access on the real slides in ../shared/data/wsi and on small files made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

import nic
from nic.errors import MppError, SlideError
from nic.slide._mpp import mpp_from_resolution


@pytest.fixture
def svs(wsi_dir):
    return wsi_dir / "CMU-1-Small-Region.svs"


@pytest.fixture
def pyramid(wsi_dir):
    return wsi_dir / "CropBreastSlide_pyramid.tiff"


@pytest.fixture
def dicom(wsi_dir):
    return wsi_dir / "camelyon_lowres_wsi.dcm"


def test_svs_metadata(shared, svs: Path):
    with nic.open_slide(svs) as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.vendor == "aperio"
        assert s.backend == "tiff"
        assert s.mpp_source == "aperio metadata"


def test_bogus_96_dpi_is_refused_and_user_mpp_wins(shared, pyramid: Path):
    with pytest.raises(MppError, match=r"CropBreastSlide_pyramid.tiff.*96 dpi.*`mpp`"):
        nic.open_slide(pyramid)
    with nic.open_slide(pyramid, mpp=0.5) as s:
        assert s.mpp == (0.5, 0.5)
        assert len(s.levels) == 6
        assert s.levels[1].downsample == pytest.approx(2.0, abs=0.01)


def test_dicom_opens_through_openslide(shared, dicom: Path):
    with nic.open_slide(dicom) as s:
        assert s.vendor == "dicom"
        assert s.dimensions == (1152, 700)
        assert s.mpp[0] == pytest.approx(28.969, abs=1e-3)
        region = s.read_region((100, 100), (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


@pytest.mark.parametrize("name,mpp", [("CMU-1-Small-Region.svs", None), ("CropBreastSlide_pyramid.tiff", 0.5)])
def test_fast_path_matches_openslide(wsi_dir, name, mpp):
    path = wsi_dir / name
    fast = nic.open_slide(path, mpp=mpp)
    ref = nic.open_slide(path, mpp=mpp, backend="openslide")
    assert fast.backend == "tiff" and ref.backend == "openslide"
    for level, lv in enumerate(fast.levels):
        a = fast._reader.read(level, 0, 0, lv.width, lv.height).astype(int)
        b = ref._reader.read(level, 0, 0, lv.width, lv.height).astype(int)
        assert np.abs(a - b).mean() < 1.0, level
    # an unaligned region that runs off the slide: same pixels, white outside
    w, h = fast.dimensions
    a = fast.read_region((w - 100, 37), (300, 200))
    b = ref.read_region((w - 100, 37), (300, 200))
    assert np.abs(a.astype(int) - b).mean() < 1.0
    assert (a[:, 120:] == 255).all()
    fast.close()
    ref.close()


def test_read_region_resamples_by_area(shared, pyramid: Path):
    with nic.open_slide(pyramid, mpp=0.5) as s:
        full = s.read_region((0, 0), (400, 400)).astype(np.float64)
        half = s.read_region((0, 0), (200, 200), mpp=1.0)
        # level 1 is the scanner's own 2x downsample, so compare loosely to the block mean
        block = full.reshape(200, 2, 200, 2, 3).mean(axis=(1, 3))
        assert np.abs(half - block).mean() < 6
        assert s.best_level(1.0) == 1 and s.best_level(0.9) == 0 and s.best_level(100) == 5
        # a non-integer factor from level 0: each output pixel is the mean of its box
        small = s.read_region((10, 20), (10, 10), mpp=0.75)
        ref = np.empty((10, 10, 3))
        for i in range(10):
            for j in range(10):
                y0, x0 = 20 + 1.5 * i, 10 + 1.5 * j
                # weights of the 1.5 x 1.5 box over level-0 pixels
                wy = _weights(y0, 1.5)
                wx = _weights(x0, 1.5)
                region = s.read_region((int(x0), int(y0)), (2, 2)).astype(np.float64)
                ref[i, j] = np.einsum("i,j,ijc->c", wy, wx, region) / (1.5 * 1.5)
        assert np.abs(small - ref).max() <= 1.0


def _weights(start: float, length: float) -> np.ndarray:
    """Overlap of [start, start+length) with the two pixels [floor(start), +1), [+1, +2)."""
    p = np.floor(start)
    return np.array([min(p + 1, start + length) - start, max(0.0, start + length - (p + 1))])


def test_thumbnail_in_strips_equals_one_read(shared, monkeypatch, svs: Path):
    import nic.slide._slide as slide_mod

    with nic.open_slide(svs) as s:
        whole = s.thumbnail(4.0)
        monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 50_000)
        strips = s.thumbnail(4.0)
    assert whole.shape == (370, 276, 3)  # floor(2220 * 0.499 / 4)
    assert np.array_equal(whole, strips)


def test_plain_image_and_strip_tiff(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    png = tmp_path / "crop.png"
    Image.fromarray(rgb).save(png)
    with pytest.raises(MppError, match="crop.png.*`mpp`"):
        nic.open_slide(png)
    with nic.open_slide(png, mpp=0.5) as s:
        assert s.dimensions == (80, 60)
        assert np.array_equal(s.read_region((0, 0), (80, 60)), rgb)
    tif = tmp_path / "strip.tif"
    tifffile.imwrite(tif, rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with nic.open_slide(tif) as s:
        assert s.mpp == pytest.approx((0.5, 0.5))
        assert np.array_equal(s.read_region((0, 0), (80, 60)), rgb)


def test_ome_tiff_pyramid_read_by_tile_path(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (512, 768, 3), dtype=np.uint8)
    p = tmp_path / "s.ome.tiff"
    with tifffile.TiffWriter(p, ome=True) as tw:
        meta = {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "axes": "YXS"}
        tw.write(rgb, tile=(256, 256), subifds=1, metadata=meta, photometric="rgb")
        tw.write(rgb[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb")
    with nic.open_slide(p) as s:
        assert s.backend == "tiff" and s.vendor == "ome-tiff"
        assert s.mpp == pytest.approx((0.25, 0.25))
        assert len(s.levels) == 2
        assert np.array_equal(s.read_region((100, 50), (300, 200)), rgb[50:250, 100:400])


@pytest.mark.parametrize(
    "value,unit,expected",
    [
        (20000, 3, 0.5),
        (40000, "CENTIMETER", 0.25),
        (96, 2, None),
        (72, 3, None),
        (37.795275, 3, None),
        (1e9, 3, None),
        (5000, 1, None),
    ],
)
def test_resolution_tag_rules(value, unit, expected):
    mpp, reason = mpp_from_resolution(value, unit)
    assert mpp == (pytest.approx(expected) if expected else None), reason


def test_bad_files(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        nic.open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="is a directory"):
        nic.open_slide(tmp_path)
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(SlideError, match="empty"):
        nic.open_slide(empty)
    text = tmp_path / "notes.svs"
    text.write_text("not a slide at all\n" * 20)
    with pytest.raises(SlideError, match="not a slide"):
        nic.open_slide(text)


def test_truncated_slide_is_refused(shared, tmp_path, svs: Path):
    data = svs.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="cut.svs.*truncated"):
        s = nic.open_slide(cut)
        s.read_region((0, 0), (2220, 2967))


def test_tile_data_cut_off_is_refused(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    p = tmp_path / "short.tiff"
    tifffile.imwrite(
        p, rgb, tile=(256, 256), compression="jpeg", resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    data = p.read_bytes()
    # keep the header and IFD (tifffile writes them first) but lose the last tile's bytes
    p.write_bytes(data[:-2000])
    with pytest.raises(SlideError, match="short.tiff.*truncated"):
        nic.open_slide(p)


def test_block_mean_is_the_rounded_mean_of_each_block():
    from nic.slide._slide import _block_mean

    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for k in (2, 3, 16):
        got = _block_mean(src, k)
        h, w = 48 // k, 64 // k
        want = src[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))
        assert got.shape == (h, w, 3)
        # exact rounding for powers of two; PIL's fixed-point division may be off by
        # a fraction more for other k, never by a whole grey level
        assert np.abs(got - want).max() <= (0.5 + 1e-9 if k in (2, 16) else 0.6), k


# -- the slides a list of files, folders and CSVs names ---------------------------------------------


def test_list_slides_reads_files_folders_and_csvs(tmp_path):
    """One reading for compression (not strict) and slide sampling (strict): folders give
    their visible slide files sorted by name, CSV paths are taken from the CSV's folder."""
    from nic.errors import DataError
    from nic.slide import list_slides

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("b.svs", "a.TIF", ".hidden.svs", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.svs").mkdir()  # a folder with a slide suffix is not a slide
    table = tmp_path / "cohort.csv"
    table.write_text(" Slide ,MPP\nslides/b.svs,0.25\n,0.5\n~/elsewhere/c.svs,\n/abs/d.svs,0.5\n")
    found = list_slides([folder, table, tmp_path / "missing.svs"])
    home = Path("~/elsewhere/c.svs").expanduser()
    assert found == [
        (folder / "a.TIF", None), (folder / "b.svs", None),  # the folder, sorted, hidden file and folder left out
        (tmp_path / "slides" / "b.svs", None), (home, None), (Path("/abs/d.svs"), None),  # the CSV, empty row skipped
        (tmp_path / "missing.svs", None),  # not strict: kept, to fail as that slide's result
    ]  # fmt: skip
    with_mpp = list_slides([table], mpp_column=True)
    assert [m for _, m in with_mpp] == [0.25, None, 0.5]

    with pytest.raises(DataError, match=r"missing\.svs: no such slide, folder or CSV"):
        list_slides([folder, tmp_path / "missing.svs"], strict=True)
    (tmp_path / "empty").mkdir()
    assert list_slides([tmp_path / "empty"]) == []
    with pytest.raises(DataError, match=r"empty: no slide files inside \(looked for \.svs"):
        list_slides([tmp_path / "empty"], strict=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na.svs,0.5\nb.svs,fast\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: mpp 'fast' is not a positive number"):
        list_slides([bad], mpp_column=True)
    assert [p.name for p, _ in list_slides([bad])] == ["a.svs", "b.svs"]  # the column is read only when asked
    (tmp_path / "nocol.csv").write_text("file\na.svs\n")
    with pytest.raises(DataError, match=r"nocol\.csv: no 'slide' or 'path' column \(columns: \['file'\]\)"):
        list_slides([tmp_path / "nocol.csv"])


def test_csv_with_a_utf8_bom_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the first column's name."""
    from nic.slide import list_slides

    table = tmp_path / "excel.csv"
    table.write_bytes(b"\xef\xbb\xbfslide,mpp\na.svs,0.25\n")
    assert list_slides([table], mpp_column=True) == [(tmp_path / "a.svs", 0.25)]


# -- pixels the fast path and the plain-image path must not get wrong -------------------------------


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """Smooth pink and purple shades on white: lossy codecs keep them to a grey level or two."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    tissue = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.12
    rgb = np.stack([200 - 60 * xx, 90 + 50 * yy, 170 + 20 * xx * yy], axis=-1)
    return np.where(tissue[..., None], rgb, 245).round().astype(np.uint8)


def _to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr, as JPEG and TIFF's default YCbCr coefficients define it."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def test_ycbcr_tiles_are_read_in_rgb(tmp_path):
    """Photometric YCbCr with deflate, and Aperio's JPEG 2000 YCbCr (compression 33003), decode
    to Y, Cb, Cr samples: those levels go to OpenSlide, which converts them; YCbCr in JPEG
    tiles (converted by the JPEG decoder) stays on the fast path."""
    import imagecodecs

    rgb = _smooth_rgb(512, 512)
    deflate = tmp_path / "ycbcr_deflate.tif"
    tifffile.imwrite(deflate, _to_ycbcr(rgb), tile=(256, 256), photometric="ycbcr", subsampling=(1, 1),
                     compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    j2k = tmp_path / "aperio_j2k.svs"
    ycc = _to_ycbcr(rgb)
    tiles = [imagecodecs.jpeg2k_encode(np.ascontiguousarray(ycc[i : i + 256, j : j + 256]), level=95,
                                       codecformat="j2k", mct=False)
             for i in (0, 256) for j in (0, 256)]  # fmt: skip
    desc = "Aperio Image Library v10.0.50\r\n512x512 [0,0 512x512] (256x256) J2K/YUV16 Q=70|AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(j2k) as tw:
        tw.write(iter(tiles), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                 compression=33003, description=desc, metadata=None)  # fmt: skip
    jpeg = tmp_path / "ycbcr_jpeg.tif"
    tifffile.imwrite(jpeg, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",  # stored as YCbCr
                     compressionargs={"level": 95, "outcolorspace": "ycbcr"}, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # fmt: skip
    assert tifffile.TiffFile(jpeg).pages[0].photometric == 6
    for path, backend in ((deflate, "openslide"), (j2k, "openslide"), (jpeg, "tiff")):
        with nic.open_slide(path) as s:
            assert s.backend == backend, path.name
            got = s.read_region((0, 0), (512, 512)).astype(int)
        assert np.abs(got - rgb).mean() < 1.5, path.name


def test_ycbcr_tiles_without_openslide_are_refused(tmp_path):
    """An OME-TIFF (not for OpenSlide) of YCbCr deflate tiles: a clear error, not YCbCr as RGB."""
    p = tmp_path / "ycbcr.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(_to_ycbcr(_smooth_rgb(256, 256)), tile=(256, 256), photometric="ycbcr", subsampling=(1, 1),
                 compression="zlib", metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "axes": "YXS"})  # fmt: skip
    with pytest.raises(SlideError, match=r"ycbcr\.ome\.tif: its pixels are YCbCr \(ADOBE_DEFLATE.*RGB"):
        nic.open_slide(p)


def _pyramid(path: Path, pixels: np.ndarray, mpp: tuple[float, float], levels: int = 2, **kw) -> Path:
    """A tiled (256 px) TIFF pyramid of halving levels, level 0 at ``mpp`` (x, y) um/px."""
    with tifffile.TiffWriter(path) as tw:
        lv = pixels
        for i in range(levels):
            res = {"resolution": (1e4 / mpp[0], 1e4 / mpp[1]), "resolutionunit": "CENTIMETER"} if i == 0 else {}
            tw.write(lv, tile=(256, 256), subfiletype=1 if i else 0, **res, **kw)
            lv = np.ascontiguousarray(lv[::2, ::2])
    return path


def test_non_square_pixels_read_a_level_fine_enough_on_both_axes(tmp_path):
    """0.25 x 0.5 um/px: at 0.5 um/px level 1 would be 1.0 um/px in y, so level 0 is read."""
    rgb = np.full((512, 1024, 3), 230, np.uint8)
    rgb[1::2] = (120, 40, 150)  # rows 0.5 um apart alternate
    p = _pyramid(tmp_path / "aniso.tif", rgb, mpp=(0.25, 0.5), photometric="rgb")
    with nic.open_slide(p) as s:
        assert s.mpp == pytest.approx((0.25, 0.5))
        assert s.best_level(0.5) == 0 and s.best_level(1.0) == 1
        got = s.read_region((0, 0), (64, 64), mpp=0.5)
    assert np.array_equal(got, rgb[:64, :128].reshape(64, 64, 2, 3).mean(axis=2).astype(np.uint8))


@pytest.mark.parametrize("alpha", ["unassalpha", "assocalpha"])
def test_tiled_rgba_tiff_is_composed_over_white(tmp_path, alpha):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (512, 512, 1)).astype(np.uint8)
    colour = rng.integers(0, 256, (512, 512, 3))
    if alpha == "assocalpha":  # premultiplied: colour scaled by alpha
        colour = colour * a // 255
    rgba = np.concatenate([colour.astype(np.uint8), a], axis=-1)
    rgba[:64] = 0  # transparent black
    p = _pyramid(tmp_path / "rgba.tif", rgba, mpp=(0.5, 0.5), photometric="rgb", extrasamples=(alpha,))
    with nic.open_slide(p) as fast, nic.open_slide(p, backend="openslide") as ref:
        assert fast.backend == "tiff"
        got, want = fast.read_region((0, 0), (512, 512)), ref.read_region((0, 0), (512, 512))
    assert (got[:64] == 255).all()
    assert np.abs(got.astype(int) - want).max() <= 1


def test_16_bit_png_is_refused_like_a_16_bit_tiff(tmp_path):
    from PIL import Image

    grey = np.tile(np.linspace(40, 240, 64), (16, 1)).astype(np.uint16) * 257
    png, tif = tmp_path / "g16.png", tmp_path / "g16.tif"
    Image.fromarray(grey).save(png)
    tifffile.imwrite(tif, grey, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    for p in (png, tif):
        with pytest.raises(SlideError, match=rf"{p.name}: pixels are uint16, nic reads 8-bit RGB"):
            nic.open_slide(p, mpp=0.5)


def test_size_limits_are_nics_own(tmp_path, monkeypatch):
    """A plain image over PIL's decompression-bomb limit but under nic's opens (and PIL's
    limit is left as it was); over nic's limit, a plain image or a strip TIFF is refused by
    size before it is decoded."""
    import PIL.Image

    import nic.slide._slide as slide_mod

    rgb = np.random.default_rng(4).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    png, tif = tmp_path / "big.png", tmp_path / "big.tif"
    PIL.Image.fromarray(rgb).save(png)
    tifffile.imwrite(tif, rgb, rowsperstrip=10, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 12,000 px: a "bomb" to PIL
    with nic.open_slide(png, mpp=0.5) as s:
        assert np.array_equal(s.read_region((0, 0), (120, 100)), rgb)
    assert PIL.Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(slide_mod, "MAX_PLAIN_PIXELS", 10_000)
    with pytest.raises(SlideError, match=r"big\.png: a plain image of 120x100 px is too large.*tiled pyramidal"):
        nic.open_slide(png, mpp=0.5)
    with pytest.raises(SlideError, match=r"big\.tif: a TIFF image of 120x100 px stored in strips, too large"):
        nic.open_slide(tif)
