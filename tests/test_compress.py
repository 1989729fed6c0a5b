"""Compression: grid alignment, background, dihedral variants, interruption and resume,
locks, the command line, the real CMU slide.

Slides are generated here as small tiled pyramidal JPEG TIFFs (pink textured ellipses
on white); the encoder is ``nic-cnn`` with a fixed random initialisation, saved once so
that subprocesses load the very same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import nic
from nic.cli import app
from nic.compress import (
    CompressOptions,
    SlideLock,
    collect_slides,
    compress_slide,
    compress_slides,
    dihedral_patch,
)
from nic.errors import MppError, StoreError
from nic.store import is_complete, open_store, store_path

# -- fixtures -----------------------------------------------------------------------------


def make_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3): textured pink ellipses (tissue) on near-white glass."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    ch, cw = -(-h // 16), -(-w // 16)
    yy, xx = np.mgrid[0:ch, 0:cw] / np.array([ch, cw])[:, None, None]
    m = np.zeros((ch, cw), bool)
    for _ in range(4):
        cy, cx, ry, rx = rng.uniform(0.25, 0.75, 2).tolist() + rng.uniform(0.12, 0.3, 2).tolist()
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    tex = ndi.uniform_filter(rng.integers(0, 256, (509, 509, 3)).astype(np.float32), (5, 5, 1))
    tex = np.clip(np.array([200, 110, 170], np.float32) + (tex - 128) * 0.9, 0, 255).astype(np.uint8)
    t = np.tile(tex, (-(-h // 509), -(-w // 509), 1))[:h, :w]
    big = np.repeat(np.repeat(m, 16, 0), 16, 1)[:h, :w]
    return np.where(big[..., None], t, np.uint8(245))


def write_slide(path: Path, size: tuple[int, int], mpp: float, seed: int = 0) -> Path:
    """A tiled (256 px) JPEG pyramid with halving levels down to <= 1024 px; ``size`` is (w, h)."""
    import tifffile

    lv = make_rgb(size[0], size[1], seed)
    with tifffile.TiffWriter(path) as tw:
        i = 0
        while True:
            tw.write(
                lv, tile=(256, 256), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
            )  # fmt: skip
            if max(lv.shape[:2]) <= 1024:
                break
            h2, w2 = lv.shape[0] // 2, lv.shape[1] // 2
            lv = lv[: 2 * h2, : 2 * w2].reshape(h2, 2, w2, 2, 3).mean((1, 3)).round().astype(np.uint8)
            i += 1
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Read-only generated slides: ``a`` (0.25 um/px, read from its 2x level), ``b`` and ``c``
    (0.5 um/px), ``big`` (0.5 um/px, ~500 tissue patches) for the interruption tests."""
    d = tmp_path_factory.mktemp("slides")
    return {
        "a": write_slide(d / "a.tif", (3072, 2560), 0.25, seed=1),
        "b": write_slide(d / "b.tif", (1536, 1280), 0.5, seed=2),
        "c": write_slide(d / "c.tif", (1280, 1536), 0.5, seed=3),
        "big": write_slide(d / "big.tif", (4096, 4096), 0.5, seed=4),
    }


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return nic.load_encoder(encoder_dir)


def _positions(attrs: dict, cells: np.ndarray) -> np.ndarray:
    """Level-0 (x, y) of cells (N, 2) (row, col) from a store's origin and step."""
    ox, oy = attrs["origin"]
    sx, sy = attrs["step"]
    return np.stack([ox + cells[:, 1] * sx, oy + cells[:, 0] * sy], axis=1)


def _sample(tissue: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    cells = np.argwhere(tissue)
    rng = np.random.default_rng(seed)
    return cells[rng.choice(len(cells), size=min(n, len(cells)), replace=False)]


def _shm_segments() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _features(store: Path) -> np.ndarray:
    return np.asarray(open_store(store).features[...])


# -- the store a slide gives ------------------------------------------------------------------


def test_codes_sit_at_their_cells_and_background_is_zero(slides, encoder, tmp_path):
    # on the CPU, as the fp32 reference below (a CUDA device would autocast to fp16)
    store = compress_slide(slides["a"], encoder, tmp_path, workers=2, device="cpu")
    s = open_store(store)
    with nic.open_slide(slides["a"]) as slide:
        grid = nic.patch_grid(slide, mpp=0.5, patch=128)
        assert s.grid_shape == grid.shape == (10, 12)
        np.testing.assert_array_equal(s.tissue, grid.tissue)
        assert 20 < s.tissue.sum() < s.tissue.size - 20
        cells = _sample(s.tissue, 24)
        pos = _positions(s.attrs, cells)
        np.testing.assert_allclose(
            pos, grid.positions()[[np.flatnonzero((np.argwhere(grid.tissue) == c).all(1))[0] for c in cells]]
        )
        patches = np.stack([slide.read_region(tuple(p), (128, 128), 0.5) for p in pos])
    want = encoder.embed(patches)
    got = s.features[...][:, cells[:, 0], cells[:, 1]].T.astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    feats = s.load()
    assert np.all(feats[:, ~s.tissue] == 0)
    assert np.all(np.abs(feats[:, s.tissue]).sum(0) > 0)
    a = s.attrs
    assert a["complete"] is True and a["patches"] == s.tissue.sum()
    assert a["mpp"] == 0.5 and a["patch"] == a["stride"] == 128 and a["origin"] == [0.0, 0.0]
    assert a["step"] == [256.0, 256.0] and a["slide_mpp"] == [0.25, 0.25]
    assert a["slide_path"] == str(slides["a"].resolve()) and a["slide_size_bytes"] == slides["a"].stat().st_size
    assert a["slide_checksum_method"] == "sha256" and len(a["slide_checksum"]) == 64
    assert a["encoder_checksum"] == encoder.checksum and a["encoder_name"] == encoder.name
    assert a["nic_version"] == nic.__version__ and a["variants"] == 1


def test_readers_and_transports_agree(slides, encoder, tmp_path):
    """In-process reading, pickled and shared-memory transports give identical stores."""
    runs = {}
    for name, opts in {
        "inproc": CompressOptions(workers=0),
        "pickle": CompressOptions(workers=1, transport="pickle", batch_size=16),
        "shm": CompressOptions(workers=2, transport="shm", batch_size=16),
    }.items():
        [r] = compress_slides([slides["b"]], encoder, tmp_path / name, opts)
        assert r.status == "done" and r.patches > 0
        runs[name] = _features(r.store)
    np.testing.assert_allclose(runs["pickle"], runs["inproc"], atol=1e-3)
    np.testing.assert_array_equal(runs["pickle"], runs["shm"])


def test_dihedral_variants_are_codes_of_rotated_patches(slides, encoder, tmp_path):
    plain = compress_slide(slides["b"], encoder, tmp_path / "plain", workers=0, device="cpu")  # as the reference
    store = compress_slide(slides["b"], encoder, tmp_path / "d8", workers=0, device="cpu", dihedral=True)
    s = open_store(store)
    assert s.features.shape[:2] == (8, encoder.code_size) and s.variants == 8
    assert "flip" in s.attrs["variant_order"]
    feats = s.load(None)
    np.testing.assert_array_equal(feats[0], _features(plain).astype(np.float32))
    assert np.all(feats[:, :, ~s.tissue] == 0)
    cells = _sample(s.tissue, 6, seed=1)
    with nic.open_slide(slides["b"]) as slide:
        patches = np.stack([slide.read_region(tuple(p), (128, 128), 0.5) for p in _positions(s.attrs, cells)])
    for k in range(8):
        want = encoder.embed(dihedral_patch(patches, k))
        got = feats[k][:, cells[:, 0], cells[:, 1]].T
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=f"variant {k}")
    # the variants really differ (the encoder is not rotation invariant)
    assert not np.allclose(feats[0][:, s.tissue], feats[1][:, s.tissue], atol=1e-2)


def test_dihedral_order_matches_the_grid_transform_of_learning():
    from nic.learn.data import dihedral

    p = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for k in range(8):
        want = dihedral(p.transpose(2, 0, 1), k).transpose(1, 2, 0)
        np.testing.assert_array_equal(dihedral_patch(p, k), want)


def test_slide_much_coarser_than_the_encoder_is_refused(shared, encoder, tmp_path, wsi_dir: Path):
    dcm = wsi_dir / "camelyon_lowres_wsi.dcm"
    with pytest.raises(MppError, match=r"camelyon_lowres_wsi\.dcm: scanned at 28\.\d+ um/px"):
        compress_slide(dcm, encoder, tmp_path, workers=0)
    assert not any(tmp_path.iterdir())


def test_complete_store_is_kept_and_overwrite_redoes_it(slides, encoder, tmp_path):
    store = compress_slide(slides["b"], encoder, tmp_path, workers=0)
    stamp = open_store(store).attrs["created"], (store / "zarr.json").stat().st_mtime_ns
    assert compress_slide(slides["b"], encoder, tmp_path, workers=0) == store
    assert (open_store(store).attrs["created"], (store / "zarr.json").stat().st_mtime_ns) == stamp
    # a complete store made another way is not silently kept ...
    with pytest.raises(StoreError, match="made differently.*variants"):
        compress_slide(slides["b"], encoder, tmp_path, workers=0, dihedral=True)
    # ... and --overwrite redoes it
    compress_slide(slides["b"], encoder, tmp_path, workers=0, dihedral=True, overwrite=True)
    assert open_store(store).variants == 8


def test_same_weights_with_other_settings_are_another_encoder(slides, encoder_dir, tmp_path):
    """The same weights with another normalisation give other codes: a complete store made
    with one is not kept for the other, and a folder holding both is not one training set."""
    from nic.store import EncoderIdentity, check_same_encoder

    w = encoder_dir / "encoder.safetensors"
    plain = nic.load_encoder("nic-cnn", weights=w)
    store = compress_slide(slides["b"], plain, tmp_path, workers=0)
    assert compress_slide(slides["b"], nic.load_encoder("nic-cnn", weights=w), tmp_path, workers=0) == store
    other = nic.load_encoder("nic-cnn", weights=w, mean=(0.6, 0.5, 0.5))
    assert other.checksum == plain.checksum
    with pytest.raises(StoreError, match=r"made differently \(encoder settings mean \[0\.5, 0\.5, 0\.5\] \(this run: "):
        compress_slide(slides["b"], other, tmp_path, workers=0)
    compress_slide(slides["c"], other, tmp_path, workers=0)
    stores = [open_store(p) for p in sorted(tmp_path.glob("*.zarr"))]
    with pytest.raises(StoreError, match=r"another encoder or settings.*: settings sha256"):
        check_same_encoder(stores, tmp_path)
    # identities recorded before settings were (runs of older versions) still match
    ident = stores[0].encoder
    assert ident.settings and EncoderIdentity(**{**ident.to_json(), "settings": None}).diff(ident) == []


def test_codes_beyond_float16_fail_the_slide_instead_of_storing_inf(slides, tmp_path):
    """float16 holds |x| <= 65504: an encoder whose codes are larger (here mean colour / 1e-6)
    fails the slide with a message, and no complete store of infinities is left."""
    from nic.errors import EncoderError

    huge = nic.load_encoder("mean-rgb", std=(1e-6,) * 3)
    with pytest.raises(EncoderError, match=r"NaN or beyond float16's range .* e\.g\. cell \(\d+, \d+\); .*fp32"):
        compress_slide(slides["b"], huge, tmp_path, workers=0)
    assert not is_complete(store_path(tmp_path, "b"))


# -- interruption, resume, locks ----------------------------------------------------------------


def test_keyboard_interrupt_leaves_an_unfinished_store_and_rerun_equals_clean(slides, encoder, tmp_path, monkeypatch):
    from nic.compress import _pipeline, _workers

    clean = _features(compress_slide(slides["b"], encoder, tmp_path / "clean", workers=0))
    segments: list[str] = []
    init = _workers.ReaderPool.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        segments.extend(shm.name.lstrip("/") for shm in self._shms)

    def interrupt(self, codes, cells):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_pipeline._Blocks, "add", interrupt)
        m.setattr(_workers.ReaderPool, "__init__", record)
        with pytest.raises(KeyboardInterrupt):
            compress_slide(slides["b"], encoder, tmp_path / "out", workers=2)
    store = store_path(tmp_path / "out", "b")
    assert store.exists() and not is_complete(store)
    assert not store.with_name("b.zarr.lock").exists()
    assert segments and not set(segments) & _shm_segments()  # the shared-memory slots were freed
    with pytest.raises(StoreError, match="unfinished"):
        open_store(store)
    assert compress_slide(slides["b"], encoder, tmp_path / "out", workers=2) == store
    np.testing.assert_allclose(_features(store), clean, atol=1e-3)


def test_an_interrupted_overwrite_keeps_the_old_store(slides, encoder, tmp_path, monkeypatch):
    """`overwrite` replaces a complete store only with a whole one: interrupted, the old
    store is still there, complete and intact; finished, the new one takes its place."""
    from nic.compress import _pipeline
    from nic.store import verify_store

    store = compress_slide(slides["b"], encoder, tmp_path, workers=0)
    before, created = _features(store), open_store(store).attrs["created"]

    def interrupt(self, codes, cells):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_pipeline._Blocks, "add", interrupt)
        with pytest.raises(KeyboardInterrupt):
            compress_slide(slides["b"], encoder, tmp_path, workers=0, overwrite=True, min_tissue=0.3)
    assert is_complete(store) and open_store(store).attrs["created"] == created
    assert verify_store(store, deep=True) == [] and np.array_equal(_features(store), before)
    assert [p.name for p in tmp_path.iterdir()] == ["b.zarr"]  # no staged leftovers
    compress_slide(slides["b"], encoder, tmp_path, workers=0, overwrite=True, min_tissue=0.3)
    assert open_store(store).meta.min_tissue == 0.3 and verify_store(store, deep=True) == []
    assert [p.name for p in tmp_path.iterdir()] == ["b.zarr"]


_RUN = """
import json, sys
def main():
    import torch
    torch.set_num_threads(1)
    from nic.compress import CompressOptions, compress_slides
    opts = CompressOptions(workers=int(sys.argv[4]))
    rs = compress_slides(sys.argv[1].split(","), sys.argv[2], sys.argv[3], opts)
    print(json.dumps({r.slide.name: r.status for r in rs}))
if __name__ == "__main__":
    main()
"""


def _spawn(script: Path, slides: list[Path], encoder_dir: Path, out: Path, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), ",".join(map(str, slides)), str(encoder_dir), str(out), str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_killed_run_resumes_to_the_clean_result(slides, encoder_dir, encoder, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_RUN))
    out = tmp_path / "out"
    store = store_path(out, "big")
    proc = _spawn(script, [slides["big"]], encoder_dir, out, workers=1)
    deadline = time.monotonic() + 120
    while not (store / "features" / "zarr.json").exists():  # encoding has started
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "compression did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    children = _children(proc.pid)
    assert children  # the reader process (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while any(_alive(c) for c in children):  # orphaned readers notice and exit
        assert time.monotonic() < deadline, f"reader processes {children} outlived their parent"
        time.sleep(0.1)
    assert not is_complete(store)
    lock = store.with_name("big.zarr.lock")
    assert lock.exists() and f"pid {proc.pid}" in lock.read_text()  # left behind by the dead process
    # the rerun takes the dead process's lock over and rebuilds the store
    [r] = compress_slides([slides["big"]], encoder, out, CompressOptions(workers=2))
    assert r.status == "done" and is_complete(store) and not lock.exists()
    [c] = compress_slides([slides["big"]], encoder, tmp_path / "clean", CompressOptions(workers=0))
    np.testing.assert_allclose(_features(store), _features(c.store), atol=1e-3)
    np.testing.assert_array_equal(open_store(store).tissue, open_store(c.store).tissue)


def test_lock_is_exclusive_and_freed(tmp_path):
    store = tmp_path / "s.zarr"
    first, second = SlideLock(store), SlideLock(store)
    assert first.acquire()
    assert f"pid {os.getpid()}" in first.holder()
    assert not second.acquire()
    first.release()
    assert not first.path.exists()
    assert second.acquire()
    second.release()


def test_busy_slide_is_left_to_its_holder(slides, encoder, tmp_path):
    with SlideLock(store_path(tmp_path, "b")) as lock:
        assert lock.acquire()
        [r] = compress_slides([slides["b"]], encoder, tmp_path, CompressOptions(workers=0, busy_wait=0))
        assert r.status == "busy" and f"pid {os.getpid()}" in r.error
        with pytest.raises(StoreError, match="another process"):
            compress_slide(slides["b"], encoder, tmp_path, workers=0, busy_wait=0)
    assert not store_path(tmp_path, "b").exists()


def test_two_processes_share_one_output_folder(slides, encoder_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_RUN))
    out = tmp_path / "out"
    todo = [slides["b"], slides["c"]]
    procs = [_spawn(script, todo, encoder_dir, out, workers=0), _spawn(script, todo[::-1], encoder_dir, out, workers=0)]
    statuses = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        statuses.append(json.loads(stdout.strip().splitlines()[-1]))
    for s in todo:
        assert is_complete(store_path(out, s.stem))
        got = sorted(st[s.name] for st in statuses)
        assert got.count("done") == 1 and set(got) <= {"done", "skipped", "busy"}, got
    assert not list(out.glob("*.lock"))


# -- command line ------------------------------------------------------------------------------


def test_cli_skip_errors_and_exit_codes(shared, slides, encoder_dir, tmp_path, wsi_dir: Path):
    runner = CliRunner()
    bad = wsi_dir / "camelyon_lowres_wsi.dcm"
    args = ["compress", str(slides["b"]), str(bad), str(slides["c"]), "--encoder", str(encoder_dir), "--workers", "0"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o1")])
    assert res.exit_code == 1, res.output
    assert "not run" in res.output and "camelyon_lowres_wsi.dcm: scanned at" in res.output
    assert is_complete(store_path(tmp_path / "o1", "b")) and not store_path(tmp_path / "o1", "c").exists()

    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o2"), "--skip-errors"])
    assert res.exit_code == 1, res.output
    assert is_complete(store_path(tmp_path / "o2", "c")) and "1 of 3 slide(s) failed" in res.output
    assert not store_path(tmp_path / "o2", "camelyon_lowres_wsi").exists()

    # a rerun skips what is complete; all good -> exit 0
    res = runner.invoke(app, ["compress", str(slides["b"]), str(slides["c"]), "--encoder", str(encoder_dir),
                              "--out", str(tmp_path / "o2"), "--workers", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.count("skipped") == 2


def test_cli_slides_from_a_csv_and_a_folder(slides, encoder_dir, tmp_path):
    table = tmp_path / "cohort.csv"
    table.write_text(f"patient,slide\np1,{slides['b']}\np2,{os.path.relpath(slides['c'], tmp_path)}\n")
    assert collect_slides([table]) == [slides["b"], tmp_path / os.path.relpath(slides["c"], tmp_path)]
    assert [p.name for p in collect_slides([slides["a"].parent])] == ["a.tif", "b.tif", "big.tif", "c.tif"]
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(table),
            "--encoder",
            str(encoder_dir),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert is_complete(store_path(tmp_path / "o", "b")) and is_complete(store_path(tmp_path / "o", "c"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    res = CliRunner().invoke(app, ["compress", str(bad), "--encoder", "nic-cnn", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no 'slide' or 'path' column" in res.output


def test_cli_show(slides, encoder, tmp_path):
    from PIL import Image

    from nic.explain import pca_rgb

    store = compress_slide(slides["b"], encoder, tmp_path, workers=0)
    res = CliRunner().invoke(app, ["show", str(store), "--out", str(tmp_path / "pic.png")])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "pic.png") as im:
        w, h = im.size
    s = open_store(store)
    gh, gw = s.grid_shape
    f = min(32, 1024 // max(gh, gw))
    assert h >= gh * f and w > 2 * gw * f  # thumbnail beside the codes, same scale
    pic = pca_rgb(s.load(), s.tissue)
    assert np.all(pic[~s.tissue] == 255) and pic[s.tissue].std() > 10
    res = CliRunner().invoke(app, ["show", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "no such compressed slide" in res.output


def test_cmu_slide_with_the_published_keras_encoder(shared, tmp_path, keras_dir: Path, wsi_dir: Path):
    h5 = keras_dir / "encoder_multitask-4.h5"
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    args = ["compress", str(slide), "--encoder", str(h5), "--out", str(tmp_path), "--device", "cpu"]  # as embed
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = open_store(store_path(tmp_path, "CMU-1-Small-Region"))
    assert s.grid_shape == (23, 17) and s.code_size == 128
    assert s.attrs["mpp"] == 0.5 and s.attrs["encoder_name"] == "encoder_multitask-4"
    assert s.attrs["slide_mpp"] == [0.499, 0.499]
    enc = nic.load_encoder(h5)
    cells = _sample(s.tissue, 8, seed=2)
    with nic.open_slide(slide) as sl:
        patches = np.stack([sl.read_region(tuple(p), (128, 128), 0.5) for p in _positions(s.attrs, cells)])
    got = s.features[...][:, cells[:, 0], cells[:, 1]].T.astype(np.float32)
    # strips and single patches are area-resampled separately (0.499 -> 0.5 um/px): a pixel
    # may differ by one grey level, so allow a little more than float16 rounding
    np.testing.assert_allclose(got, enc.embed(patches), rtol=1e-2, atol=1e-2)
    assert np.all(s.load()[:, ~s.tissue] == 0)


_RSS = """
import json, sys
def main():
    import torch
    torch.set_num_threads(2)
    from nic.compress import CompressOptions, compress_slides
    [r] = compress_slides([sys.argv[1]], sys.argv[2], sys.argv[3], CompressOptions(workers=2))
    print(json.dumps({"status": r.status, "patches": r.patches}))
if __name__ == "__main__":
    main()
"""


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        todo += _children(pid)
    return total


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_slide_size(encoder_dir, tmp_path):
    """Streaming: a slide with 16x the area (and ~10x the patches) peaks at about the same
    RSS (the compressing process and its readers, sampled every 50 ms)."""
    script = tmp_path / "rss.py"
    script.write_text(textwrap.dedent(_RSS))
    peaks, results = {}, {}
    for side in (2048, 8192):
        slide = write_slide(tmp_path / f"s{side}.tif", (side, side), 0.5, seed=side)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(slide), str(encoder_dir), str(tmp_path / f"o{side}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        results[side] = json.loads(stdout.strip().splitlines()[-1])
        peaks[side] = peak / 2**20
        assert results[side]["status"] == "done"
    assert results[8192]["patches"] > 10 * results[2048]["patches"]
    assert peaks[8192] - peaks[2048] < 150, f"peak RSS {peaks[2048]:.0f} MiB -> {peaks[8192]:.0f} MiB for 16x the slide"


def _damaged_copy(src, dst):
    """Copy ``src`` to ``dst`` with the bytes of a tissue tile in the middle of level 0 zeroed."""
    import shutil

    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        index = (page.imagelength // 256 // 2) * (-(-page.imagewidth // 256)) + (page.imagewidth // 256 // 2)
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with open(dst, "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\x00" * (count - 2))
    return dst


def test_a_slide_failing_mid_read_does_not_stop_the_cohort(slides, encoder, tmp_path):
    """A damaged tile fails its slide in a reader process; the next slide still compresses."""
    bad = _damaged_copy(slides["b"], tmp_path / "damaged.tif")
    results = compress_slides(
        [bad, slides["c"]], encoder, tmp_path / "out", CompressOptions(workers=1), skip_errors=True
    )
    assert [r.status for r in results] == ["failed", "done"]
    assert "damaged.tif" in results[0].error
    assert not is_complete(results[0].store) and is_complete(results[1].store)


# -- resume checks, runner reset, shm clean-up, busy exit code ---------------------------------


def test_complete_store_of_another_slide_file_or_settings_is_not_kept(slides, encoder, tmp_path):
    import shutil

    src = tmp_path / "in" / "b.tif"
    src.parent.mkdir()
    shutil.copy(slides["b"], src)
    out = tmp_path / "out"
    store = compress_slide(src, encoder, out, workers=0, mpp=0.5)
    assert compress_slide(src, encoder, out, workers=0, mpp=0.5) == store  # same everything: kept
    with pytest.raises(StoreError, match=r"made differently.*min_tissue 0\.1 \(this run: 0\.3\)"):
        compress_slide(src, encoder, out, workers=0, mpp=0.5, min_tissue=0.3)
    with pytest.raises(StoreError, match=r"made differently.*slide_mpp \[0\.5, 0\.5\] \(this run: \[0\.45, 0\.45\]\)"):
        compress_slide(src, encoder, out, workers=0, mpp=0.45)
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    src.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="made differently.*slide_checksum") as info:
        compress_slide(src, encoder, out, workers=0, mpp=0.5)
    assert "slide_size_bytes" not in str(info.value)
    with open(src, "ab") as f:  # another size
        f.write(b"\0" * 10)
    with pytest.raises(StoreError, match="made differently.*slide_size_bytes"):
        compress_slide(src, encoder, out, workers=0, mpp=0.5)


def test_random_init_encoder_never_matches_a_complete_store(slides, tmp_path):
    import torch

    torch.manual_seed(0)
    enc = nic.create_encoder("nic-cnn")  # no weights: checksum ""
    assert enc.checksum == ""
    compress_slide(slides["b"], enc, tmp_path, workers=0, random_init=True)
    with pytest.raises(StoreError, match="random-initialised encoder.*`overwrite=True` or use saved weights"):
        compress_slide(slides["b"], enc, tmp_path, workers=0, random_init=True)


class _Event:
    def synchronize(self) -> None:
        pass


def _deferred_encoder():
    """A BatchEncoder that keeps the last batch pending, as it does on CUDA."""
    from nic.compress._encode import BatchEncoder

    class Deferred(BatchEncoder):
        def submit(self, n, cells):
            import torch

            if n == 0:
                return
            with torch.inference_mode():
                out = self._forward(n).clone()
            yield from self.flush()
            self._pending = (out, _Event(), cells.copy())
            self._current ^= 1

    return Deferred


def test_a_failed_slide_leaves_no_pending_batch_for_the_next(slides, encoder, tmp_path, monkeypatch):
    """A slide failing with a batch pending (CUDA) must not put its codes into the next store."""
    from nic.compress import _cohort

    monkeypatch.setattr(_cohort, "BatchEncoder", _deferred_encoder())
    bad = _damaged_copy(slides["b"], tmp_path / "damaged.tif")
    opts = CompressOptions(workers=0, batch_size=8)
    results = compress_slides([bad, slides["c"]], encoder, tmp_path / "out", opts, skip_errors=True)
    assert [r.status for r in results] == ["failed", "done"], [r.error for r in results]
    [clean] = compress_slides([slides["c"]], encoder, tmp_path / "clean", opts)
    np.testing.assert_array_equal(_features(results[1].store), _features(clean.store))


def test_reader_pool_frees_slots_when_creating_them_fails(monkeypatch):
    from multiprocessing import shared_memory

    from nic.compress._workers import ReaderPool

    real = shared_memory.SharedMemory
    made: list[str] = []

    def flaky(*args, **kwargs):
        if len(made) == 2:
            raise OSError("no space left on /dev/shm")
        shm = real(*args, **kwargs)
        made.append(shm.name.lstrip("/"))
        return shm

    monkeypatch.setattr(shared_memory, "SharedMemory", flaky)
    with pytest.raises(OSError, match="no space"):
        ReaderPool(1, 16, 4, 4, "shm")
    assert len(made) == 2 and not set(made) & _shm_segments()


def test_cli_busy_slides_give_exit_code_1(slides, encoder_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with SlideLock(store_path(out, "b")) as lock:
        assert lock.acquire()
        res = CliRunner().invoke(app, ["compress", str(slides["b"]), str(slides["c"]), "--encoder", str(encoder_dir),
                                       "--out", str(out), "--workers", "0", "--wait-busy", "0"])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "1 of 2 slide(s) busy (locked by another process): b.tif" in res.output
    assert is_complete(store_path(out, "c")) and not is_complete(store_path(out, "b"))
