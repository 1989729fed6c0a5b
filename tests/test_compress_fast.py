"""The fast compression path: uint8 patches end to end, the input scaling folded into the
first convolution, the reader and batch-size rule, JPEG tiles decoded on the device.

The device tile path runs here on the CPU (torchvision's libjpeg-turbo) and is checked
against the reader path pixel for pixel; the tests marked ``gpu`` check it with nvJPEG
where CUDA is present.  Stores made by the new path equal those of the old one (the
plain float model behind the readers) on the shared slides.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import nic
import nic.errors
from nic.compress import CompressOptions, compress_slides
from nic.compress._encode import BatchEncoder
from nic.compress._pipeline import auto_settings, plan_slide
from nic.compress._tiles import (
    PROBE_MEAN_TOLERANCE,
    DeviceTiles,
    block_mean,
    cut_patches,
    decode_tiles,
    jpeg_level,
    open_device_tiles,
)
from nic.compress._workers import read_patches
from nic.encoders import Encoder, EncoderConfig, create_encoder, encoder_entry, list_encoders
from nic.encoders._layers import FoldedInputConv, NormalizedEncoder, Uint8Input, sum_pool_uint8
from nic.store import open_store
from tests.test_compress import write_slide

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch sees none)")
BREAST = "CropBreastSlide_pyramid.tiff"  # generic TIFF, JPEG tiles with shared tables, no trusted mpp
CMU = "CMU-1-Small-Region.svs"  # Aperio: RGB-coded JPEG tiles


def _uint8(n: int, p: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 patches (n, 3, p, p), channels-last, as the pipeline hands them over."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, p, p, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)


# -- folding the input scaling into the first convolution ------------------------------------


@pytest.mark.parametrize(
    ("padding", "kernel", "stride", "mode"),
    [(3, 7, 2, "zeros"), (1, 3, 1, "zeros"), ("same", 3, 1, "zeros"), (1, 3, 2, "zeros"), (0, 16, 16, "zeros"),
     (2, 5, 2, "reflect")],
)  # fmt: skip
def test_folded_conv_equals_the_affine_then_the_conv_at_the_borders_too(padding, kernel, stride, mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, kernel, stride=stride, padding=padding, padding_mode=mode).double()
    scale = torch.tensor([1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)], dtype=torch.float64)
    shift = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], dtype=torch.float64)
    folded = FoldedInputConv(copy.deepcopy(conv).float(), scale, shift)
    x = torch.randint(0, 256, (2, 3, 37, 41)).double()
    want = conv(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    got = folded(x.float()).double()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4 * (1 + want.abs().max())
    # the weights and bias alone are exact away from the zero padding, and wrong next to it
    naive = folded.conv(x.float()).double()
    zero_padded = mode == "zeros" and padding != 0
    assert ((naive - want).abs().max() > 0.1) == zero_padded
    if zero_padded:
        assert (naive - want)[..., 3:-3, 3:-3].abs().max() < 1e-4 * (1 + want.abs().max())


def test_sum_pool_uint8_is_the_average_pool_times_k_squared():
    x = torch.randint(0, 256, (2, 3, 13, 18), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    for k in (1, 2, 3, 4):
        got = sum_pool_uint8(x, k)
        want = nn.functional.avg_pool2d(x.double(), k) * k * k
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)
    torch.testing.assert_close(sum_pool_uint8(x.contiguous(), 2), sum_pool_uint8(x, 2))  # any memory format


@pytest.mark.parametrize("name", list_encoders())
def test_uint8_module_gives_the_codes_of_the_float_module(name):
    """Every registered encoder (tiny configuration): the uint8 form equals ``module(x / 255)``
    of the trainable encoder; the ones whose first layer can take the scaling fold it."""
    torch.manual_seed(0)
    encoder = create_encoder(name, **encoder_entry(name).tiny)
    module, folded = encoder.for_inference().uint8_module()
    x = _uint8(3, encoder.patch_size)
    with torch.inference_mode():
        want = encoder.module.eval()(x.float() / 255)
        got = module(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if name in ("nic-cnn", "timm"):
        assert folded, type(module).__name__
    if name in ("mean-rgb", "concat"):  # a mean colour has no convolution to fold into
        assert not folded and isinstance(module, Uint8Input) and module.scale


@pytest.mark.parametrize("spec", ["timm:test_resnet?patch_size=64", "timm:test_vit?patch_size=64"])
def test_timm_first_conv_is_folded_with_its_padding(spec):
    """test_resnet's stem pads (the border terms are needed), test_vit's patch embedding does not."""
    encoder = nic.load_encoder(spec, seed=0)
    module, folded = encoder.for_inference().uint8_module()
    assert folded and isinstance(module, Uint8Input) and not module.scale
    convs = [m for m in module.modules() if isinstance(m, FoldedInputConv)]
    assert len(convs) == 1
    x = _uint8(2, encoder.patch_size, seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), encoder.module(x.float() / 255), rtol=1e-4, atol=1e-5)
    assert bool(convs[0]._borders) and any(convs[0]._borders.values()) == ("resnet" in spec)
    # the fold shares the encoder's weights and leaves its module as it was
    assert not any(isinstance(m, FoldedInputConv) for m in encoder.module.modules())


TIMM_TEST_MODELS = [
    "test_byobnet", "test_coatnet", "test_convnext", "test_efficientnet", "test_efficientnet_gn", "test_mambaout",
    "test_maxvit", "test_nfnet", "test_resnet", "test_vit", "test_vit_relpos",
]  # fmt: skip


@pytest.mark.parametrize("model", TIMM_TEST_MODELS)
def test_timm_families_uint8_form(model):
    """timm's tiny models of each family: folded into the stem where the stem is a plain
    convolution, left alone where it is not (nfnet's weight-standardised convolution)."""
    encoder = nic.load_encoder(f"timm:{model}?patch_size=64", seed=0)
    module, folded = encoder.for_inference().uint8_module()
    assert folded == (model != "test_nfnet")
    x = _uint8(2, 64, seed=4)
    with torch.inference_mode():
        want = encoder.module(x.float() / 255)
        torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-5 * (1 + float(want.abs().max())))


def test_published_keras_encoder_folded(keras_dir):
    encoder = nic.load_encoder(keras_dir / "encoder_multitask-4.h5")
    module, folded = encoder.for_inference().uint8_module()
    assert folded and type(module).__name__ == "Uint8NicPatchEncoder"
    x = _uint8(4, 128, seed=2)
    with torch.inference_mode():
        want = encoder.module(x.float() / 255)
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_fold_is_probed_at_the_precision_the_codes_are_computed_in(keras_dir, monkeypatch):
    """Under autocast the fold is checked again; a fold that half precision spoils is dropped."""
    from nic.encoders import _layers

    encoder = nic.load_encoder(keras_dir / "encoder_multitask-4.h5").for_inference()
    assert encoder.uint8_module(autocast=torch.bfloat16)[1]  # the published encoder folds well in bfloat16
    real = _layers.uint8_form

    def spoiled_in_low_precision(module):  # exact in float32, off by 5% of the scale under autocast
        folded = real(module)

        class Spoiled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = folded

            def forward(self, x):
                out = self.inner(x)
                return out * 1.05 if torch.is_autocast_enabled(x.device.type) else out

        return Spoiled()

    monkeypatch.setattr(_layers, "uint8_form", spoiled_in_low_precision)
    assert encoder.uint8_module()[1]  # float32 only: the probe cannot see it
    assert not encoder.uint8_module(autocast=torch.bfloat16)[1]


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.square()


class _SquaringBody(nn.Sequential):
    """A body whose named first convolution is not the first layer to see the image: it
    sees x**2, so an affine map of x cannot be folded into it."""

    pretrained_cfg = {"first_conv": "1"}


def test_a_fold_that_changes_the_codes_is_dropped(caplog):
    torch.manual_seed(0)
    body = _SquaringBody(_Square(), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    module = NormalizedEncoder(body, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4).eval()
    encoder = Encoder(module, EncoderConfig("test", code_size=4, patch_size=16))
    got, folded = encoder.uint8_module()
    assert not folded and isinstance(got, Uint8Input) and got.scale
    assert "gives other codes" in caplog.text
    x = _uint8(2, 16)
    with torch.inference_mode():
        torch.testing.assert_close(got(x), module(x.float() / 255))


# -- readers and batch size -------------------------------------------------------------------


def test_auto_settings_rule():
    assert auto_settings(2, "cpu", 128) == (1, 64)  # one reader: two would take a core from the encoder
    assert auto_settings(8, "cpu", 224) == (1, 32)
    assert auto_settings(4, "cpu", 128) == (1, 64)
    assert auto_settings(16, "cpu", 128) == (2, 16)  # one batch per core in flight: ~256 patches in all
    assert auto_settings(12, "cpu", 128) == (1, 16)
    assert auto_settings(1, "cpu", 128) == (1, 64)
    assert auto_settings(16, "cuda", 128) == (15, 1024)  # the GPU machine: every core but one decodes
    assert auto_settings(16, "cuda", 224) == (15, 256)
    assert auto_settings(16, "cuda", 256) == (15, 256)
    assert auto_settings(16, "mps", 512) == (15, 64)
    assert auto_settings(2, "cuda", 128) == (1, 1024)
    assert auto_settings(1, "cuda", 2048) == (1, 32)
    assert auto_settings(128, "cuda", 128) == (32, 1024)


def test_auto_options_resolve_and_explicit_ones_stay():
    opts = CompressOptions()
    assert opts.workers == opts.batch_size == "auto" and opts.decode == "auto"
    assert (opts.resolved(128, cpus=2).workers, opts.resolved(128, cpus=2).batch_size) == (1, 64)
    assert (opts.resolved(128, cpus=32).workers, opts.resolved(128, cpus=32).batch_size) == (4, 16)
    mixed = CompressOptions(workers=3).resolved(128, cpus=2)
    assert (mixed.workers, mixed.batch_size) == (3, 64)
    fixed = CompressOptions(workers=0, batch_size=8)
    assert fixed.resolved(128) is fixed
    for bad, want in (
        ({"workers": -1}, "`workers` must be auto or an integer of at least 0 (got -1)"),
        ({"workers": "many"}, "`workers` must be auto or an integer of at least 0 (got 'many')"),
        ({"batch_size": 0}, "`batch_size` must be auto or an integer of at least 1 (got 0)"),
        ({"batch_size": 8.0}, "`batch_size` must be auto or an integer of at least 1 (got 8.0)"),
        ({"decode": "gpu"}, "`decode` must be one of auto, readers, device (got 'gpu')"),
        ({"min_tissue": 1.5}, "`min_tissue` must be a number in [0, 1] (got 1.5)"),
        ({"busy_wait": -1.0}, "`busy_wait` must be a number of at least 0 (got -1.0)"),
        ({"precision": "fp8"}, "`precision` must be one of auto, fp32, fp16, bf16 (got 'fp8')"),
    ):
        with pytest.raises(nic.errors.OptionError) as info:
            CompressOptions(**bad)
        assert str(info.value) == want


def test_cli_compress_options_come_from_compress_options(slides_for_fast, tmp_path, caplog):
    """Defaults read from :class:`CompressOptions`; auto|N values parsed, bad ones refused in
    one line before any slide; the values given reach the run."""
    import inspect

    from typer.testing import CliRunner

    from nic.cli import app
    from nic.cli._compress import compress

    params, lib = inspect.signature(compress).parameters, CompressOptions()
    for name in ("workers", "batch_size", "decode", "device", "dihedral", "overwrite", "min_tissue", "random_init",
                 "seed"):  # fmt: skip
        assert params[name].default.default == getattr(lib, name), name
    assert params["wait_busy"].default.default == lib.busy_wait
    assert (lib.workers, lib.batch_size, lib.decode, lib.device) == ("auto", "auto", "auto", "auto")

    out = tmp_path / "out"
    base = ["compress", str(slides_for_fast), "--encoder", "mean-rgb", "--out", str(out), "--device", "cpu"]
    for extra, want in (
        (["--workers", "abc"], "--workers must be auto or an integer of at least 0 (got 'abc')"),
        (["--workers", "-1"], "--workers must be auto or an integer of at least 0 (got -1)"),
        (["--batch-size", "2.5"], "--batch-size must be auto or an integer of at least 1 (got '2.5')"),
        (["--decode", "gpu"], "--decode must be one of auto, readers, device (got 'gpu')"),
        (["--min-tissue", "2"], "--min-tissue must be a number in [0, 1] (got 2.0)"),
    ):
        res = CliRunner().invoke(app, [*base, *extra])
        assert (res.exit_code, res.output) == (2, f"error: {want}\n"), extra
    assert not out.exists()

    for decode, on_device in (("device", True), ("readers", False)):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="nic.compress._tiles"):
            res = CliRunner().invoke(
                app, [*base, "--workers", "0", "--batch-size", "16", "--decode", decode, "--overwrite"]
            )
        assert res.exit_code == 0 and " done " in res.output, res.output
        assert ("JPEG tiles decoded on cpu" in caplog.text) == on_device, caplog.text


# -- JPEG tiles decoded by torchvision, assembled on tensors ------------------------------------


def test_torchvision_decodes_the_tiles_as_the_slide_reader(wsi_dir, tmp_path):
    """Batched ``decode_jpeg`` (CPU) of raw tiles, shared JPEG tables put in front, equals
    tifffile's decoder, which the slide reader uses."""
    import tifffile

    generated = write_slide(tmp_path / "g.tif", (1100, 700), 0.5, seed=5)  # each tile carries its tables
    for path in (wsi_dir / BREAST, generated):
        with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
            page = tif.pages[0]
            tables = page.jpegtables or b""
            idx = [i for i, n in enumerate(page.databytecounts) if n][:12]
            raws, want = [], []
            for i in idx:
                fh.seek(page.dataoffsets[i])
                data = fh.read(page.databytecounts[i])
                raws.append(torch.frombuffer(bytearray(tables[:-2] + data[2:] if tables else data), dtype=torch.uint8))
                want.append(page.decode(data, i, jpegtables=page.jpegtables)[0].reshape(page.tilelength, -1, 3))
        got = decode_tiles(raws, "cpu")
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.permute(1, 2, 0).numpy(), w[..., :3])


def test_block_mean_rounds_as_the_cpu_path():
    from nic.slide._slide import _block_mean

    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 5, 8):
        src = rng.integers(0, 256, (k * 7 + 1, k * 9 + 2, 3), dtype=np.uint8)
        got = block_mean(torch.from_numpy(src).permute(2, 0, 1), k).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, _block_mean(src, k), err_msg=f"k={k}")


def test_cut_patches_matches_numpy_slicing():
    region = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    for offsets in ([[0, 0], [8, 30], [24, 54]], [[32, 64], [0, 16], [16, 0], [0, 0]]):  # anywhere; on the grid
        off = np.array(offsets)
        got = cut_patches(region, off, 16)
        assert got.is_contiguous(memory_format=torch.channels_last)
        want = np.stack([region.numpy()[:, y : y + 16, x : x + 16] for y, x in off])
        np.testing.assert_array_equal(got.numpy(), want)


def test_device_tiles_read_outside_the_level_as_white(wsi_dir):
    """A rectangle hanging over the level's top-left and bottom-right edges, as read_region reads it."""
    from nic.compress._workers import ReadTask

    with nic.open_slide(wsi_dir / BREAST, mpp=0.5) as slide, DeviceTiles(slide, jpeg_level(slide, 0.5), "cpu") as t:
        w, h = slide.dimensions
        for loc in ((-100, -60), (w - 500, h - 300)):
            offsets = np.array([(y, x) for y in (0, 200) for x in (0, 200, 400)])
            task = ReadTask(0, str(slide.path), None, loc, (600, 400), 0.5, 200, offsets, offsets // 200)
            [(_, got)] = list(t.stream([task]))
            want = slide.read_region(loc, (600, 400), 0.5)
            for (y, x), patch in zip(offsets, got.permute(0, 2, 3, 1).numpy()):
                np.testing.assert_array_equal(patch, want[y : y + 200, x : x + 200])
            assert (want == 255).all(axis=2).any()  # it did reach outside


def _device_vs_reader(slide, mpp: float, device: str = "cpu") -> tuple[set[str], float, int]:
    """(how the tasks were read, mean, max) absolute difference between the device path's
    patches and the readers', over every task of the slide's grid."""
    plan = plan_slide(slide, 128, mpp, slide_mpp=None)
    level = jpeg_level(slide, mpp)
    assert level is not None
    diffs, modes = [], set()
    with DeviceTiles(slide, level, device) as tiles:
        modes = {r.mode for t in plan.tasks for r in tiles.reads(t)}
        for task, got in tiles.stream(plan.tasks):
            assert got.dtype == torch.uint8 and tuple(got.shape) == (task.n, 3, 128, 128)
            want = read_patches(task, slide=slide)
            diffs.append(np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - want.astype(np.int16)))
    assert diffs, "no tissue"
    d = np.concatenate([x.reshape(-1) for x in diffs])
    return modes, float(d.mean()), int(d.max())


@pytest.mark.parametrize(
    ("slide_mpp", "how"),
    [(0.5, "crop"), (0.25, "area"), (0.3, "area")],  # 0.25: level 1 is 1016 px of 2033, a downsample of 2.001
)
def test_device_tiles_on_cpu_equal_the_reader_path(wsi_dir, slide_mpp, how):
    """Every patch of the grid at 0.5 um/px, edge tiles included."""
    with nic.open_slide(wsi_dir / BREAST, mpp=slide_mpp) as slide:
        modes, mean, worst = _device_vs_reader(slide, 0.5)
    assert modes == {how}
    if how == "area":  # dense float32 matrices against sparse ones: a rounding may flip
        assert worst <= 1 and mean < 1e-3, (worst, mean)
    else:
        assert worst == 0


def test_device_tiles_block_mean_from_a_level_without_pyramid(tmp_path):
    """A single-level slide at 0.25 um/px read at 0.5: 2 x 2 block means of level 0."""
    import tifffile

    rgb = tifffile.imread(write_slide(tmp_path / "p.tif", (1500, 1100), 0.25, seed=6), key=0)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")  # fmt: skip
    with nic.open_slide(flat) as slide:
        assert len(slide.levels) == 1
        modes, mean, worst = _device_vs_reader(slide, 0.5)
    assert modes == {"block"} and worst == 0


def test_aperio_rgb_jpeg_is_left_to_the_readers(wsi_dir):
    """CMU's tiles are JPEG through the fast path, but RGB-coded (tifffile decodes them with a
    colour-space override): the probe sees the difference and the readers decode them."""
    with nic.open_slide(wsi_dir / CMU) as slide:
        assert jpeg_level(slide, 0.5) is not None
        plan = plan_slide(slide, 128, 0.5)
        assert open_device_tiles(slide, plan.tasks, 0.5, "cpu") is None
    with nic.open_slide(wsi_dir / BREAST, mpp=0.25) as slide:
        plan = plan_slide(slide, 128, 0.5)
        tiles = open_device_tiles(slide, plan.tasks, 0.5, "cpu")
        assert tiles is not None
        tiles.close()


def test_openslide_and_plain_images_have_no_device_tiles(wsi_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "p.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(png)
    with nic.open_slide(png, mpp=0.5) as slide:
        assert jpeg_level(slide, 0.5) is None
    with nic.open_slide(wsi_dir / CMU, backend="openslide") as slide:
        assert jpeg_level(slide, 0.5) is None


def test_a_damaged_tile_fails_its_slide_on_the_device_path_too(tmp_path, encoder_seed0):
    from tests.test_compress import _damaged_copy

    good = write_slide(tmp_path / "good.tif", (1536, 1280), 0.5, seed=2)
    bad = _damaged_copy(good, tmp_path / "damaged.tif")
    opts = CompressOptions(workers=0, decode="device", random_init=True)
    results = compress_slides([bad, good], encoder_seed0, tmp_path / "out", opts, skip_errors=True)
    assert [r.status for r in results] == ["failed", "done"]
    assert "damaged.tif" in results[0].error and isinstance(results[0].exception, nic.errors.SlideError)


def test_tiles_the_device_decoder_refuses_are_decoded_on_the_cpu(tmp_path, encoder_seed0, monkeypatch, caplog):
    """nvJPEG refuses some JPEG variants libjpeg-turbo reads: such a batch falls back to the
    CPU decoder and the store is the same, instead of failing the slide as damaged."""
    import nic.compress._tiles as tiles_mod

    slide = write_slide(tmp_path / "s.tif", (1536, 1280), 0.5, seed=2)
    opts = CompressOptions(workers=0, decode="device", random_init=True)
    compress_slides([slide], encoder_seed0, tmp_path / "ref", opts)
    real, calls = tiles_mod.decode_tiles, []

    def refusing(data, device):
        calls.append(str(device))
        if len(calls) == 1:  # the first batch: as nvJPEG refusing a variant
            raise RuntimeError("nvjpegDecode failed: JPEG variant not supported")
        return real(data, device)

    monkeypatch.setattr(tiles_mod, "decode_tiles", refusing)
    with caplog.at_level("WARNING", logger="nic.compress._tiles"):
        results = compress_slides([slide], encoder_seed0, tmp_path / "out", opts)
    assert [r.status for r in results] == ["done"] and len(calls) > 2
    assert "decoded on the CPU" in caplog.text
    got = zarr.open_group(str(tmp_path / "out" / "s.zarr"), mode="r")["features"][:]
    np.testing.assert_array_equal(got, zarr.open_group(str(tmp_path / "ref" / "s.zarr"), mode="r")["features"][:])


# -- stores: the new path against the old one ----------------------------------------------------


@pytest.fixture(scope="module")
def keras_encoder(keras_dir):
    return nic.load_encoder(keras_dir / "encoder_multitask-4.h5")


def _store(slide: Path, encoder, out: Path, **opts):
    """The store of ``slide``; on the CPU unless ``opts`` names a device (the paths compared
    here are compared in fp32)."""
    [r] = compress_slides([slide], encoder, out, CompressOptions(**{"device": "cpu", **opts}))
    assert r.status == "done", r.error
    return open_store(r.store)


def _assert_same_store(a, b, atol: float = 2e-3):
    assert a.grid_shape == b.grid_shape
    np.testing.assert_array_equal(a.tissue, b.tissue)
    for key in ("origin", "step", "n_tissue", "mpp", "patch", "encoder_checksum"):
        assert a.attrs[key] == b.attrs[key], key
    fa, fb = a.load().astype(np.float32), b.load().astype(np.float32)
    assert np.all(fa[:, ~a.tissue] == 0) and np.all(fb[:, ~b.tissue] == 0)
    np.testing.assert_allclose(fa, fb, rtol=2e-3, atol=atol)


@pytest.mark.parametrize(("name", "mpp"), [(BREAST, 0.25), (CMU, None)])
def test_new_path_stores_equal_the_old_paths(wsi_dir, keras_encoder, tmp_path, monkeypatch, caplog, name, mpp):
    """Old: the float model (x / 255 in front, no fold) over patches copied into the batch
    buffer by the readers.  New: the folded uint8 model, auto readers and batch size,
    whole batches read in place; and the tiles decoded in the encoding process
    (``decode="device"`` on the CPU; CMU falls back to the readers)."""
    slide = wsi_dir / name
    new = _store(slide, keras_encoder, tmp_path / "new", mpp=mpp)
    with caplog.at_level(logging.DEBUG, logger="nic.compress._tiles"):
        device = _store(slide, keras_encoder, tmp_path / "device", mpp=mpp, decode="device", batch_size=48)
    used = "JPEG tiles decoded on cpu" in caplog.text
    assert used == (name == BREAST), caplog.text
    with monkeypatch.context() as m:
        m.setattr(
            Encoder, "uint8_module", lambda self, check=True, autocast=None: (Uint8Input(self.module).eval(), False)
        )
        m.setattr(BatchEncoder, "submit_array", _copying_submit_array)
        old = _store(slide, keras_encoder, tmp_path / "old", mpp=mpp, workers=1, batch_size=64, decode="readers")
    assert new.attrs["n_tissue"] > 20
    _assert_same_store(new, old)
    _assert_same_store(device, old)


def _copying_submit_array(self, patches, cells):
    """The old way: every batch copied into the runner's input buffer first."""
    self.buffer()[: len(patches)] = patches
    yield from self.submit(len(patches), cells)


class _Deferred(BatchEncoder):
    """Keeps each batch's codes pending until the next one, as on CUDA, on every input path."""

    def _collect(self, out, cells):
        yield from self.flush()
        self._pending = (out.clone(), _Done(), cells.copy())


class _Done:
    def synchronize(self) -> None:
        pass


def test_pending_batches_from_every_input_path_land_in_their_cells(
    slides_for_fast, encoder_seed0, tmp_path, monkeypatch
):
    from nic.compress import _cohort

    runs = {}
    for name, opts in {
        "plain": {"workers": 0, "decode": "readers", "batch_size": 16},
        "shm": {"workers": 1, "decode": "readers", "batch_size": 16},
        "device": {"workers": 0, "decode": "device", "batch_size": 16},
    }.items():
        with monkeypatch.context() as m:
            if name != "plain":
                m.setattr(_cohort, "BatchEncoder", _Deferred)
            runs[name] = _store(slides_for_fast, encoder_seed0, tmp_path / name, random_init=True, **opts)
    _assert_same_store(runs["shm"], runs["plain"])
    _assert_same_store(runs["device"], runs["plain"])


def test_batch_encoder_threads_encode_every_batch_once_and_right(encoder_seed0):
    """Batches from the three inputs, one per thread and in flight together, each patch in
    its own buffer: every cell gets the code of its own patch (the model on x / 255)."""
    patches = _uint8(44, 128, seed=3).permute(0, 2, 3, 1).contiguous().numpy()
    with torch.inference_mode():
        want = encoder_seed0.module.eval()(torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255).numpy()

    def run(runner: BatchEncoder) -> dict[int, np.ndarray]:
        got: dict[int, np.ndarray] = {}

        def take(results) -> None:
            for codes, cells in results:
                assert codes.shape[:2] == (1, len(cells))
                for cell, code in zip(cells[:, 0].tolist(), codes[0]):
                    assert cell not in got
                    got[cell] = code

        for i, lo in enumerate(range(0, 44, 8)):
            chunk = patches[lo : lo + 8]
            cells = np.stack([np.arange(lo, lo + len(chunk)), np.zeros(len(chunk), int)], axis=1)
            if i % 3 == 0:
                take(runner.submit_array(chunk, cells))
            elif i % 3 == 1:
                runner.buffer()[: len(chunk)] = chunk
                take(runner.submit(len(chunk), cells))
            else:
                take(runner.submit_tensor(torch.from_numpy(chunk).permute(0, 3, 1, 2), cells))
        take(runner.flush())
        return got

    for threads in (1, 3):
        runner = BatchEncoder(encoder_seed0, 8, "cpu", threads=threads)  # threads are a CPU matter
        assert runner.threads == threads and runner.folded
        got = run(runner)
        assert sorted(got) == list(range(44))
        np.testing.assert_allclose(np.stack([got[i] for i in range(44)]), want, rtol=2e-3, atol=2e-3)
        # a slide that fails mid-way leaves nothing behind for the next one
        list(runner.submit_array(patches[:8], np.zeros((8, 2), int)))
        runner.reset()
        assert list(runner.flush()) == []


@pytest.fixture(scope="module")
def slides_for_fast(tmp_path_factory) -> Path:
    return write_slide(tmp_path_factory.mktemp("fast") / "s.tif", (2048, 1536), 0.25, seed=7)


@pytest.fixture(scope="module")
def encoder_seed0():
    return nic.load_encoder("nic-cnn", seed=0)


# -- on a CUDA device ------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("slide_mpp", "grid_mpp"), [(0.25, 0.5), (0.5, 0.5), (0.3, 0.5)])
def test_nvjpeg_tiles_equal_the_reader_path_within_decoder_tolerance(wsi_dir, slide_mpp, grid_mpp):
    """nvJPEG and libjpeg-turbo may differ by a few grey levels (IDCT, chroma upsampling)."""
    with nic.open_slide(wsi_dir / BREAST, mpp=slide_mpp) as slide:
        modes, mean, worst = _device_vs_reader(slide, grid_mpp, device="cuda")
    print(f"nvJPEG against libjpeg-turbo, {modes}: mean {mean:.3f}, max {worst} grey levels")
    assert mean <= PROBE_MEAN_TOLERANCE and worst <= 64, (modes, mean, worst)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decoded_store_equals_the_cpu_store(wsi_dir, keras_encoder, tmp_path, caplog):
    breast = wsi_dir / BREAST
    cpu = _store(breast, keras_encoder, tmp_path / "cpu", mpp=0.25, device="cpu")
    with caplog.at_level(logging.DEBUG, logger="nic.compress._tiles"):
        gpu = _store(breast, keras_encoder, tmp_path / "gpu", mpp=0.25, device="cuda", precision="fp32")  # auto
    assert "JPEG tiles decoded on cuda" in caplog.text, caplog.text
    readers = _store(breast, keras_encoder, tmp_path / "rd", mpp=0.25, device="cuda", decode="readers")
    # codes of patches a grey level or two apart (nvJPEG), and TF32 / fp16 arithmetic: close, not equal
    for other in (gpu, readers):
        assert other.grid_shape == cpu.grid_shape and other.attrs["n_tissue"] == cpu.attrs["n_tissue"]
        np.testing.assert_array_equal(other.tissue, cpu.tissue)
        fa, fb = other.load()[:, cpu.tissue].astype(np.float32), cpu.load()[:, cpu.tissue].astype(np.float32)
        assert np.abs(fa - fb).max() <= 0.05 * np.abs(fb).max()
        assert np.corrcoef(fa.ravel(), fb.ravel())[0, 1] > 0.999
