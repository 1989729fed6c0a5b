"""Unsupervised encoders: slide patch sampling, the mean-rgb baseline, VAE / contrastive / BiGAN runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nic.encoder_training import SlidePairs, SlidePatches, SlidePatchSampler, slide_paths
from nic.errors import DataError, OptionError, OutputError

TINY = "nic-cnn?width=8&code_size=8&patch_size=32&depth=2"
RADIUS = 0.36  # of the image side: the tissue disc of a generated slide


def _slide(path: Path, seed: int, size: int = 384) -> Path:
    """A plain-image slide: white background, a textured pink disc of tissue in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (RADIUS * size) ** 2
    base = np.array([205, 110, 175]) if seed % 2 else np.array([165, 85, 195])
    tex = base + rng.normal(0, 30, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
    img[inside] = np.clip(tex[inside], 0, 255)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny models: one thread (two threads on a shared 2-core machine spin-wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(3):
        _slide(folder / f"s{i}.png", i)
    return folder


def _sampler(slides: Path, patch: int = 32) -> SlidePatchSampler:
    return SlidePatchSampler(slide_paths([slides], mpp=0.5), mpp=0.5, patch=patch, min_tissue=0.9)


# ----------------------------------------------------------------------------- sampling


def test_slide_paths_folder_csv_and_fallback_mpp(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "mpp"])
        w.writerow(["slides/s0.png", "0.25"])
        w.writerow([str(slides / "s1.png"), ""])
    found = slide_paths([slides, table], mpp=0.5)
    assert [s.path.name for s in found] == ["s0.png", "s1.png", "s2.png", "s0.png", "s1.png"]
    assert found[3].mpp == 0.25 and found[4].mpp is None and found[4].fallback_mpp == 0.5
    assert found[3].open().mpp == (0.25, 0.25) and found[0].open().mpp == (0.5, 0.5)
    with pytest.raises(DataError, match="no such slide"):
        slide_paths([tmp_path / "missing.svs"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match="no slide files inside"):  # nic.slide says what is a slide
        slide_paths([tmp_path / "empty"])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "simclr"}, "`method` must be one of vae, contrastive, bigan"),
        ({"slides": ()}, "learns from slides; give `slides`"),
        ({"batch_size": 1}, "`batch_size` must be an integer of at least 2"),
        ({"patches": 1}, "`patches` must be an integer of at least 2"),
        ({"lr": -1.0}, "`lr` must be a number greater than 0"),
        ({"min_tissue": 1.5}, r"`min_tissue` must be a number in \[0, 1\]"),
        ({"balance": "patients"}, "`balance` must be one of cells, slides"),
        ({"upsample": "bilinear"}, "`upsample` must be one of transposed, resize"),
        ({"instance_noise": -0.1}, "`instance_noise` must be a number"),
    ],
)
def test_unsupervised_config_checks_its_values(kw: dict, match: str) -> None:
    from nic.encoder_training import UnsupervisedConfig

    with pytest.raises(OptionError, match=match):
        UnsupervisedConfig(**{"method": "vae", "slides": ("s.svs",), **kw})
    cfg = UnsupervisedConfig(method="vae", slides=("s.svs",))
    assert (cfg.epochs, cfg.early_stopping_patience, cfg.batch_size) == (5, 4, 64)  # its own defaults, and shared


def test_sampler_is_seeded_and_patches_lie_in_tissue(slides: Path) -> None:
    sampler = _sampler(slides)
    s1, xy1 = sampler.patches(200, seed=3)
    s2, xy2 = sampler.patches(200, seed=3)
    s3, xy3 = sampler.patches(200, seed=4)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(xy1, xy2)
    assert not np.array_equal(xy1, xy3)
    assert set(s1) == {0, 1, 2}
    # Without jitter every patch is a whole tissue cell: entirely inside the disc here.
    s, xy = sampler.patches(300, seed=5, jitter=0.0)
    centre, radius = 384 / 2, RADIUS * 384
    corners = np.concatenate([xy + [dx, dy] for dx in (0, 32) for dy in (0, 32)])
    assert (np.hypot(corners[:, 0] - centre, corners[:, 1] - centre) <= radius + 8).all()
    patches = SlidePatches(sampler, 50, seed=1)
    x = torch.stack([patches[i] for i in range(len(patches))])
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert (x.float().mean((1, 2, 3)) < 235).all()  # tissue, not the white background


def test_neighbour_and_other_slide_pairs(slides: Path) -> None:
    sampler = _sampler(slides)
    s, a, b = sampler.neighbour_pairs(300, seed=0)
    d = np.abs(b - a)
    # exactly one patch width (32 px at 0.5 um/px = 32 level-0 px) along one axis, 0 along the other
    assert np.all(
        (np.isclose(d[:, 0], 32) & np.isclose(d[:, 1], 0)) | (np.isclose(d[:, 0], 0) & np.isclose(d[:, 1], 32))
    )
    g = sampler.grids[0]  # the three slides share one grid geometry
    for p in (a, b):
        cell = np.round((p - np.array(g.origin)) / np.array(g.step)).astype(int)  # jitter < 0.25 cell
        assert all(sampler.grids[k].tissue[r, c] for k, (c, r) in zip(s, cell))
    sa, _, sb, _ = sampler.other_slide_pairs(200, seed=0)
    assert (sa != sb).all()
    pairs = SlidePairs(sampler, 40, seed=0)
    assert pairs.label.sum() == 20 and len(pairs) == 40
    one = _sampler(slides)
    one.n_cells[1:] = 0
    with pytest.raises(DataError, match="at least two slides"):
        one.other_slide_pairs(5)


# ----------------------------------------------------------------------------- mean-rgb


def test_mean_rgb_codes_are_the_mean_colour_and_compress_without_random_init(slides: Path, tmp_path: Path) -> None:
    import zarr

    from nic.compress import compress_slide
    from nic.encoders import load_encoder, require_weights, save_encoder

    enc = load_encoder("mean-rgb")
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    np.testing.assert_allclose(enc.embed(patches), patches.mean((1, 2)) / 255.0, atol=1e-5)
    assert not enc.random_init and enc.checksum == load_encoder("mean-rgb").checksum
    require_weights(enc, "mean-rgb")  # weightless by design: accepted
    assert load_encoder("mean-rgb?patch_size=64").checksum != enc.checksum
    store = compress_slide(slides / "s0.png", "mean-rgb", tmp_path / "c", mpp=0.5, workers=0)
    g = zarr.open_group(str(store), mode="r")
    f = np.asarray(g["features"]).astype(np.float32)
    tissue = np.asarray(g["tissue"])
    assert f.shape[0] == 3 and tissue.any()
    img = np.asarray(Image.open(slides / "s0.png"))
    r, c = np.argwhere(tissue)[0]
    np.testing.assert_allclose(
        f[:, r, c], img[r * 128 : r * 128 + 128, c * 128 : c * 128 + 128].mean((0, 1)) / 255, atol=2e-3
    )
    save_encoder(enc, tmp_path / "mrgb")
    assert load_encoder(tmp_path / "mrgb").embed(patches[:1]).shape == (1, 3)


# ----------------------------------------------------------------------------- methods


def _val_curve(run: Path, key: str) -> list[float]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.parametrize(
    ("method", "upsample"), [("vae", "transposed"), ("contrastive", ""), ("bigan", "transposed"), ("bigan", "resize")]
)
def test_method_trains_exports_and_compresses(method: str, upsample: str, slides: Path, tmp_path: Path) -> None:
    from nic.compress import compress_slide
    from nic.encoder_training import UnsupervisedConfig, train_unsupervised
    from nic.encoders import load_encoder

    cfg = UnsupervisedConfig(
        method=method,
        slides=(str(slides),),
        slide_mpp=0.5,
        encoder=TINY,
        patches=96,
        val_patches=32,
        epochs=3,
        batch_size=16,
        lr=3e-3 if method != "bigan" else 1e-3,
        upsample=upsample or None,
        progress=False,
        seed=0,
    )
    run = tmp_path / "run"
    result = train_unsupervised(cfg, run)
    assert result.epochs >= 1 and (run / "preview.png").is_file() and (run / "previews" / "epoch_000.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["seconds_per_10k_patches"] > 0
    if method == "bigan":
        d = _val_curve(run, "train_d_loss")
        assert d and all(np.isfinite(d))
        rec = _val_curve(run, "val_recon")
        assert rec[-1] < rec[0]  # G(E(x)) moves towards x as E and G learn together
    else:
        val = _val_curve(run, "val_loss")
        assert val[-1] < val[0], val
    enc = load_encoder(run / "encoder")
    assert enc.name == method and enc.code_size == 8 and not enc.random_init
    assert enc.source["method"] == method
    store = compress_slide(slides / "s1.png", enc, tmp_path / "compressed", mpp=0.5, workers=0)
    assert (store / "zarr.json").is_file()
    with pytest.raises(OutputError, match="already holds training runs"):
        train_unsupervised(cfg, run)


def test_bigan_instance_noise_reaches_the_discriminator_and_fades_by_mid_run(
    slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nic.encoder_training._methods as methods
    from nic.encoder_training import UnsupervisedConfig, train_unsupervised

    seen: list[tuple[float, float]] = []  # per batch: the scheduled sd, the sd of (D's real image - the image)
    step = methods.BiganModule.training_step

    def recording_step(self, batch, batch_idx):
        target, forward = self._target, self.discriminator.forward
        batch_state: dict = {"clean": None, "recorded": False}

        def keep_target(x):
            batch_state["clean"] = target(x)
            return batch_state["clean"]

        def record_first_call(images, z):  # D's first call in a batch is on the real images
            if not batch_state["recorded"]:
                seen.append((self.noise_sd(), float((images - batch_state["clean"]).std())))
                batch_state["recorded"] = True
            return forward(images, z)

        self._target, self.discriminator.forward = keep_target, record_first_call
        try:
            return step(self, batch, batch_idx)
        finally:
            del self._target, self.discriminator.forward

    monkeypatch.setattr(methods.BiganModule, "training_step", recording_step)
    cfg = UnsupervisedConfig(
        method="bigan", slides=(str(slides),), slide_mpp=0.5, encoder=TINY, patches=64, val_patches=16, epochs=2,
        batch_size=16, progress=False, seed=0, instance_noise=0.2,
    )  # fmt: skip
    train_unsupervised(cfg, tmp_path / "run")
    assert [round(sd, 4) for sd, _ in seen] == [0.2, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0]  # 8 batches
    for sd, measured in seen:  # the real images D sees carry noise of that sd (none once it has faded)
        assert measured == pytest.approx(sd, abs=0.02) if sd > 0 else measured == 0.0


def test_upsampling_defaults_per_method_and_the_run_records_it() -> None:
    from torch import nn

    from nic.encoder_training import UnsupervisedConfig
    from nic.encoder_training._unsupervised import _module
    from nic.encoders import load_encoder

    def resizes(cfg: UnsupervisedConfig) -> bool:
        module = _module(cfg, load_encoder(TINY, seed=0))
        decoder = module.generator if cfg.method == "bigan" else module.decoder
        return any(isinstance(m, nn.Upsample) for m in decoder.modules())

    bigan, vae = (UnsupervisedConfig(method=m, slides=("s.svs",)) for m in ("bigan", "vae"))
    assert (bigan.upsampling, vae.upsampling) == ("resize", "transposed")
    assert bigan.to_json()["upsample"] == "resize" and vae.to_json()["upsample"] == "transposed"
    assert resizes(bigan) and not resizes(vae)
    chosen = UnsupervisedConfig(method="bigan", slides=("s.svs",), upsample="transposed")
    assert chosen.upsampling == "transposed" and not resizes(chosen)


@pytest.mark.parametrize("upsample", ["transposed", "resize"])
def test_decoder_sizes_and_the_checkerboard_of_a_stride_2_transposed_conv(upsample: str) -> None:
    from nic.encoder_training._methods import Decoder, _forward_sides

    torch.manual_seed(0)
    assert Decoder(8, 16, _forward_sides(64, 4), upsample).eval()(torch.randn(2, 8)).shape == (2, 3, 64, 64)
    dec = Decoder(8, 16, _forward_sides(31, 1), upsample).eval()  # one step: 15 -> 31
    with torch.no_grad():  # a constant first map: the same code in every cell
        dec.fc.weight.zero_()
        dec.fc.bias.fill_(1.0)
        for m in dec.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):  # every tap the same weight
                m.weight.fill_(0.01)
                m.bias.zero_()
        img = dec(torch.zeros(1, 8))[0, 0, 2:-2, 2:-2]  # away from the zero padding at the borders
    # 3x3 taps at stride 2: even and odd output pixels get different numbers of taps
    spread = float(img.max() - img.min())
    if upsample == "resize":
        assert spread < 1e-5
    else:
        assert spread > 1e-3 and not torch.allclose(img[0::2, 0::2].mean(), img[1::2, 1::2].mean())


def test_cli_train_encoder_methods(slides: Path, tmp_path: Path) -> None:
    from nic.cli import app

    runner = CliRunner()
    out = tmp_path / "vae"
    args = ["train-encoder", "--method", "vae", "--slides", str(slides), "--slide-mpp", "0.5", "--encoder", TINY]
    args += ["--patches", "32", "--val-patches", "16", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "preview:" in result.output and (out / "encoder" / "encoder.safetensors").is_file()
    bad = runner.invoke(app, ["train-encoder", "--method", "vae", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--slides" in bad.output
    bad = runner.invoke(app, ["train-encoder", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "--task" in bad.output
    bad = runner.invoke(
        app, ["train-encoder", "--method", "gan", "--slides", str(slides), "--out", str(tmp_path / "z")]
    )
    assert bad.exit_code == 2 and "vae" in bad.output


def test_demo_encoder_stage_trains_an_unsupervised_encoder(tmp_path: Path) -> None:
    from nic.demo import DemoConfig, _encoder
    from nic.encoders import load_encoder

    folder = tmp_path / "slides"
    folder.mkdir()
    slides = [str(_slide(folder / f"s{i}.png", i, size=768)) for i in range(2)]
    lines: list[str] = []
    cfg = DemoConfig(encoder_method="vae", unsupervised_patches=32, encoder_epochs=1)
    # plain PNG slides state no um/px: the demo's cohort is TIFF, here a CSV gives it
    table = tmp_path / "slides.csv"
    table.write_text("slide,mpp\n" + "".join(f"{s},0.5\n" for s in slides))
    result = _encoder(tmp_path / "demo", cfg, lines.append, [str(table)])
    assert load_encoder(result["encoder"]).name == "vae"
    assert any("preview" in line for line in lines)


def test_concat_encoders_codes_provenance_and_compression(slides: Path, tmp_path: Path, keras_dir: Path) -> None:
    import zarr

    from nic.cli import app
    from nic.compress import compress_slide
    from nic.encoders import concat_encoders, load_encoder
    from nic.errors import EncoderError

    bigan = keras_dir / "encoder_bigan.h5"
    parts = [load_encoder("mean-rgb"), load_encoder(bigan)]
    both = concat_encoders(parts)
    rng = np.random.default_rng(1)
    patches = rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    expected = np.concatenate([p.embed(patches) for p in parts], 1)
    np.testing.assert_allclose(both.embed(patches), expected, atol=1e-5)
    assert [p["codes"] for p in both.source["parts"]] == [[0, 3], [3, 131]]
    assert both.source["parts"][1]["checksum"] == parts[1].checksum
    with pytest.raises(EncoderError, match="no weights"):
        concat_encoders([parts[0], load_encoder("nic-cnn")])
    with pytest.raises(EncoderError, match="same patches"):
        concat_encoders([parts[0], load_encoder("mean-rgb?patch_size=64")])

    result = CliRunner().invoke(app, ["concat-encoders", "mean-rgb", str(bigan), "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    # an encoder already there is replaced only when asked
    again = ["concat-encoders", str(bigan), "mean-rgb", "--out", str(tmp_path / "both")]
    result = CliRunner().invoke(app, again)
    assert result.exit_code == 2 and "exists; pass --overwrite to replace it" in result.output, result.output
    assert load_encoder(tmp_path / "both").source["parts"][0]["name"] == "mean-rgb"
    assert CliRunner().invoke(app, [*again, "--overwrite"]).exit_code == 0
    assert load_encoder(tmp_path / "both").source["parts"][1]["name"] == "mean-rgb"
    result = CliRunner().invoke(app, ["concat-encoders", "mean-rgb", str(bigan), "--out", str(tmp_path / "both"),
                                      "--overwrite"])  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = load_encoder(tmp_path / "both")
    assert loaded.code_size == 131 and loaded.source["parts"][1]["name"] == parts[1].name
    np.testing.assert_allclose(loaded.embed(patches), expected, atol=1e-5)
    store = compress_slide(slides / "s0.png", tmp_path / "both", tmp_path / "c", mpp=0.5, workers=0)
    alone = compress_slide(slides / "s0.png", "mean-rgb", tmp_path / "c1", mpp=0.5, workers=0)
    f = np.asarray(zarr.open_group(str(store), mode="r")["features"])
    g = np.asarray(zarr.open_group(str(alone), mode="r")["features"])
    assert f.shape[0] == 131
    np.testing.assert_array_equal(f[:3], g)


def test_balance_slides_draws_small_slides_as_often_as_large_ones(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    _slide(folder / "big.png", 0, size=1024)
    _slide(folder / "small.png", 1, size=384)
    sources = slide_paths([folder], mpp=0.5)
    by_cells = SlidePatchSampler(sources, 0.5, 32, 0.9, balance="cells")
    by_slides = SlidePatchSampler(sources, 0.5, 32, 0.9, balance="slides")
    assert by_cells.n_cells[0] > 5 * by_cells.n_cells[1]
    share = [np.mean(smp.patches(2000, seed=0)[0] == 1) for smp in (by_cells, by_slides)]
    assert share[0] < 0.2 and 0.45 < share[1] < 0.55
    s, _, _ = by_slides.neighbour_pairs(2000, seed=0)
    assert 0.45 < np.mean(s == 1) < 0.55  # positives from the same mix of slides as negatives


def test_preview_grid_lays_tiles_out_like_a_plain_loop() -> None:
    """Rows of different lengths on white, each tile resized to ``size`` px, ``gap`` px apart
    (the one grid of :func:`nic.explain.image_grid`, checked against a brute-force loop)."""
    from nic.encoder_training._unsupervised import preview_grid

    g = torch.Generator().manual_seed(0)
    rows = [torch.rand(3, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)]
    size, gap = 16, 4
    want = np.full((2 * (size + gap) - gap, 3 * (size + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        big = r.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest-neighbour x2
        for j, t in enumerate((big.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)):
            want[i * (size + gap) : i * (size + gap) + size, j * (size + gap) : j * (size + gap) + size] = t
    np.testing.assert_array_equal(preview_grid(rows, size, gap), want)
