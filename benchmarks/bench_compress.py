"""Compression throughput on a generated 40,000 x 40,000 px slide (ratios from one run).

    python benchmarks/bench_compress.py [--size 40000] [--threads 2] [--device cpu|cuda]
        [--workers auto|N] [--batch-size auto|N] [--decode auto|readers|device] [--repeat K]

Rows of the table:

(a) encoder only: the model call compression makes (:class:`nic.compress.BatchEncoder`:
    uint8 in, the float conversion and input scaling inside the model, folded into the
    first convolution where the encoder allows it) on random uint8 patches already in
    memory, same batch size and threads; measured before and after the other runs;
(a0) for reference, ``Encoder.embed`` of the fused encoder (float conversion and /255 in
    front of the model, no fold): what (a) was before the uint8 path;
(b) ``nic.compress_slides`` on the slide (``--repeat`` links to it, one cohort run), end
    to end (tissue mask, grid, reader processes or device decoding, encoding, zarr
    writes), with patches returned through shared memory, and (b') the same with pickled
    patch arrays; with ``--compare-decode`` also (b'') the other decode path (on CUDA:
    the readers when (b) decoded on the device).  A small slide is compressed first,
    untimed (its time is printed): the first compression in a process imports scipy,
    scikit-image and zarr (~1.5 s of CPU here), which a cohort pays once, so (b) is the
    rate of every slide after the first; ``--cold`` skips the warm-up;
(c) the naive loop peer tools use: OpenSlide ``read_region`` patch by patch, per-patch
    conversion to a float CHW array in [0, 1] (torchvision's ToTensor), the model in
    the default memory format, one batch encoded at a time, no overlap (on the first
    ``--naive-patches`` tissue patches, row-major).

Targets: (b) >= 0.85 x (a); (b) >= 1.5 x (c).  Also printed: the peak RSS of
the compressing process tree and seconds per gigapixel of tissue (level-0 pixels).

The slide is a tiled pyramidal JPEG TIFF at 0.25 um/px (level 0) with levels down to
~1,000 px, written from a pool of pre-compressed 256 px tiles (tissue: textured pink
tiles inside a few ellipses; background: white tiles), and cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TILE = 256


# -- the generated slide ------------------------------------------------------------------
def _ellipses(seed: int) -> list[tuple[float, float, float, float]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.3), rng.uniform(0.12, 0.3)) for _ in range(6)
    ]


def _tissue_at(fx: np.ndarray, fy: np.ndarray, shapes: list[tuple[float, float, float, float]]) -> np.ndarray:
    m = np.zeros(fx.shape, bool)
    for cy, cx, ry, rx in shapes:
        m |= ((fy - cy) / ry) ** 2 + ((fx - cx) / rx) ** 2 < 1
    return m


def _tile_pool(n: int, seed: int) -> tuple[list[bytes], bytes]:
    """``n`` JPEG tissue tiles and one white tile, compressed by tifffile as it writes them."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        noise = ndi.uniform_filter(rng.integers(0, 256, (TILE, TILE, 3)).astype(np.float32), (3, 3, 1))
        blobs = ndi.gaussian_filter(rng.random((TILE, TILE)).astype(np.float32), 6)
        nuclei = (blobs > np.quantile(blobs, 0.85))[..., None]
        base = np.where(nuclei, [110, 60, 160], [225, 140, 185]).astype(np.float32)
        tiles.append(np.clip(base + (noise - 128) * 0.6, 0, 255).astype(np.uint8))
    tiles.append(np.full((TILE, TILE, 3), 245, np.uint8))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pool.tif"
        strip = np.concatenate(tiles, axis=1)
        tifffile.imwrite(
            p, strip, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 90}, photometric="rgb"
        )
        with tifffile.TiffFile(p) as tif, open(p, "rb") as fh:
            page = tif.pages[0]
            raw = []
            for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(off)
                raw.append(fh.read(cnt))
    return raw[:-1], raw[-1]


def make_slide(path: Path, size: int, mpp: float, seed: int = 0) -> Path:
    """Write the benchmark slide (square, ``size`` px at ``mpp`` um/px) unless it exists."""
    import tifffile

    if path.exists():
        return path
    tissue_tiles, white = _tile_pool(48, seed)
    shapes = _ellipses(seed)
    rng = np.random.default_rng(seed + 1)
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level, side = 0, size
        while True:
            n = -(-side // TILE)
            centres = (np.arange(n) + 0.5) * TILE / side
            fx, fy = np.meshgrid(centres, centres)
            tissue = _tissue_at(fx, fy, shapes).ravel()
            picks = rng.integers(0, len(tissue_tiles), tissue.size)

            def tiles(tissue: np.ndarray = tissue, picks: np.ndarray = picks):  # row-major tile order
                for t, k in zip(tissue, picks, strict=True):
                    yield tissue_tiles[k] if t else white

            tw.write(
                tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                photometric="rgb", resolution=(1e4 / (mpp * 2**level),) * 2, resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
            )  # fmt: skip
            if side <= 1024:
                break
            level, side = level + 1, side // 2
    tmp.replace(path)
    return path


# -- measuring -------------------------------------------------------------------------------
def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in keep:
                keep.add(c)
                frontier.append(c)
    return sum(rss.get(p, 0) for p in keep)


class PeakRss:
    """Samples the RSS of this process tree every 0.5 s while active (scanning /proc
    more often costs a noticeable share of a 2-core machine)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self._stop.wait(0.5)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu(who: int = 0) -> float:
    """CPU seconds (user + system) of this process (``who=0``) or its reaped children (``-1``)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF if who == 0 else resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def encoder_only(runner, seconds: float) -> tuple[float, float]:
    """(a) patches/s of the pipeline's model call (``runner``, a BatchEncoder) on random uint8
    batches held in memory, and CPU s/patch."""
    rng = np.random.default_rng(0)
    p, batch = runner.patch_size, runner.batch_size
    patches = rng.integers(0, 256, (batch, p, p, 3), dtype=np.uint8)
    cells = np.zeros((batch, 2), np.int64)

    def once() -> None:
        for _ in runner.submit_array(patches, cells):
            pass

    for _ in range(3):
        once()
    n, t0, c0 = 0, time.perf_counter(), _cpu()
    while time.perf_counter() - t0 < seconds:
        once()
        n += batch
    for _ in runner.flush():
        pass
    return n / (time.perf_counter() - t0), (_cpu() - c0) / n


def embed_only(encoder, batch: int, seconds: float, device: str) -> tuple[float, float]:
    """(a0) patches/s of ``embed`` (float conversion and /255 in front of the model, no fold)."""
    rng = np.random.default_rng(0)
    p = encoder.patch_size
    patches = rng.integers(0, 256, (batch, p, p, 3), dtype=np.uint8)
    for _ in range(3):
        encoder.embed(patches)
    n, t0, c0 = 0, time.perf_counter(), _cpu()
    while time.perf_counter() - t0 < seconds:
        encoder.embed(patches)
        n += batch
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), (_cpu() - c0) / n


def naive(slide_path: Path, encoder, batch: int, limit: int, device: str) -> tuple[float, float, int]:
    """(c) the peers' loop over the first ``limit`` tissue cells: (patches/s, CPU s/patch, n)."""
    import openslide
    import torch

    import nic

    s = nic.open_slide(slide_path)
    grid = nic.patch_grid(s, mpp=encoder.mpp, patch=encoder.patch_size)
    pos = grid.positions()[:limit]
    slide_mpp = s.mpp[0]
    s.close()
    t0, c0 = time.perf_counter(), _cpu()
    osr = openslide.OpenSlide(str(slide_path))
    level = osr.get_best_level_for_downsample(encoder.mpp / slide_mpp + 1e-3)
    ds = osr.level_downsamples[level]
    read = round(encoder.patch_size * encoder.mpp / slide_mpp / ds)
    # peers' models are in the default (contiguous) memory format
    module = copy.deepcopy(encoder.module).to(memory_format=torch.contiguous_format).eval()
    buf: list = []
    with torch.inference_mode():
        for i, (x, y) in enumerate(pos):
            img = osr.read_region((int(x), int(y)), level, (read, read)).convert("RGB")
            if read != encoder.patch_size:
                img = img.resize((encoder.patch_size,) * 2)
            # what torchvision's ToTensor does (HWC uint8 -> contiguous CHW float in [0, 1]),
            # in numpy: per-patch torch ops with 2 threads stall on OpenMP barriers on a
            # loaded machine (~20 ms each), which would flatter the comparison
            buf.append(np.asarray(img).transpose(2, 0, 1).astype(np.float32) / 255.0)
            if len(buf) == batch or i == len(pos) - 1:
                module(torch.from_numpy(np.stack(buf)).to(device)).cpu()
                buf.clear()
    osr.close()
    return len(pos) / (time.perf_counter() - t0), (_cpu() - c0) / len(pos), len(pos)


def _auto(v: str) -> int | str:
    return v if v == "auto" else int(v)


def options(args: argparse.Namespace, transport: str = "shm", decode: str | None = None):
    from nic.compress import CompressOptions

    return CompressOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        overwrite=True,
        transport=transport,
        random_init=True,
        decode=decode or args.decode,
    )  # throughput only: a random encoder (the default nic-cnn) is fine


def full(slides: list[Path], encoder, out: Path, args: argparse.Namespace, transport: str, decode: str | None = None):
    """(b) compress the slides in one cohort run; returns timings, counts and peak RSS."""
    from nic.compress import compress_slides
    from nic.store import open_store

    opts = options(args, transport, decode)
    with PeakRss() as rss:
        t0, c0, k0 = time.perf_counter(), _cpu(), _cpu(-1)
        results = compress_slides(slides, encoder, out, opts)  # its readers are reaped at the end
        wall = time.perf_counter() - t0
        cpu_main, cpu_readers = _cpu() - c0, _cpu(-1) - k0
    bad = [r for r in results if r.status != "done"]
    if bad:
        raise SystemExit(f"compression failed: {bad[0].error}")
    stores = [open_store(r.store) for r in results]
    patches = sum(r.patches for r in results)
    encoding = sum(float(st.attrs["seconds"]) for st in stores)
    return {
        "wall": wall,
        "patches": patches,
        "rate": patches / wall,
        "steady": patches / encoding,
        "peak_rss": rss.peak,
        "cpu": (cpu_main + cpu_readers) / patches,
        "cpu_main": cpu_main,
        "cpu_readers": cpu_readers,
        "patch_level0": stores[0].attrs["patch_level0"],
    }


def links(slide: Path, k: int, folder: Path) -> list[Path]:
    """``k`` differently named links to ``slide`` (one store each), or the slide itself."""
    if k <= 1:
        return [slide]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(k):
        p = folder / f"{slide.stem}_{i}{slide.suffix}"
        if not p.exists():
            p.symlink_to(slide)
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000, help="slide side, level-0 px")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 um/px of the generated slide")
    ap.add_argument("--encoder", default="nic-cnn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch-size", type=_auto, default="auto", help="auto: from the cores and the device")
    ap.add_argument("--workers", type=_auto, default="auto", help="reader processes; auto: from the cores and device")
    ap.add_argument("--decode", choices=("auto", "readers", "device"), default="auto")
    ap.add_argument("--compare-decode", action="store_true", help="also (b''): the other decode path")
    ap.add_argument("--repeat", type=int, default=1, help="compress this many links to the slide in one run")
    ap.add_argument("--cold", action="store_true", help="no warm-up compression before (b)")
    ap.add_argument("--encoder-seconds", type=float, default=20.0)
    ap.add_argument("--naive-patches", type=int, default=2000, help="tissue patches for (c)")
    ap.add_argument("--no-pickle", action="store_true", help="skip (b'), the pickled-transport run")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nic-bench")
    args = ap.parse_args()

    import torch

    import nic

    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    slide = make_slide(args.cache / f"bench_{args.size}_{args.mpp:g}.tif", args.size, args.mpp)
    print(
        f"slide {slide} ({slide.stat().st_size / 2**20:.0f} MiB), ready in {time.perf_counter() - t0:.1f} s", flush=True
    )
    from nic.compress import BatchEncoder

    torch.manual_seed(0)
    encoder = nic.load_encoder(args.encoder, device=args.device)
    resolved = options(args).resolved(int(encoder.patch_size))
    args.workers, args.batch_size = resolved.workers, resolved.batch_size
    print(f"readers {args.workers}, batch {args.batch_size} ({os.cpu_count()} cores, {args.device})", flush=True)
    # compress_slide encodes with the fused inference copy, on uint8 with the input scaling
    # folded in; (a) runs that same model call, so the ratios measure the pipeline, not the model
    fused = encoder.for_inference()
    runner = BatchEncoder(encoder, args.batch_size, args.device)
    print(f"input scaling folded into the first convolution: {runner.folded}", flush=True)
    out = args.cache / "out"
    slides = links(slide, args.repeat, args.cache / "links")
    baseline_rss = _tree_rss(os.getpid())

    # (a) is measured before and after the other runs and averaged: the machine may be
    # shared, and its load may drift during the run
    a1, a1_cpu = encoder_only(runner, args.encoder_seconds / 2)
    print(f"(a) encoder only: {a1:,.1f} patches/s", flush=True)
    a0, a0_cpu = embed_only(fused, args.batch_size, args.encoder_seconds / 4, args.device)
    print(f"(a0) embed, float input, no fold: {a0:,.1f} patches/s", flush=True)
    if not args.cold:
        small = make_slide(args.cache / f"bench_4096_{args.mpp:g}.tif", 4096, args.mpp)
        w = full([small], encoder, args.cache / "warm", args, "shm")
        shutil.rmtree(args.cache / "warm", ignore_errors=True)
        print(f"warm-up: {w['patches']} patches of a 4096 px slide in {w['wall']:.1f} s (first use, untimed)")
    b = full(slides, encoder, out, args, "shm")
    print(f"(b) compress_slides (shm): {b['rate']:,.1f} patches/s end to end, {b['patches']} patches", flush=True)
    b2 = None if args.no_pickle else full(slides, encoder, out, args, "pickle")
    if b2:
        print(f"(b') compress_slides (pickle): {b2['rate']:,.1f} patches/s", flush=True)
    on_device = args.decode == "device" or (args.decode == "auto" and args.device.startswith("cuda"))
    other = "readers" if on_device else "device"
    b3 = full(slides, encoder, out, args, "shm", decode=other) if args.compare_decode else None
    if b3:
        print(f"(b'') compress_slides, decode={other}: {b3['rate']:,.1f} patches/s", flush=True)
    c, c_cpu, nc = naive(slide, fused, args.batch_size, args.naive_patches, args.device)
    print(f"(c) naive loop: {c:,.1f} patches/s on {nc} patches", flush=True)
    a2, a2_cpu = encoder_only(runner, args.encoder_seconds / 2)
    print(f"(a) encoder only, again: {a2:,.1f} patches/s", flush=True)
    a, a_cpu = (a1 + a2) / 2, (a1_cpu + a2_cpu) / 2
    shutil.rmtree(out, ignore_errors=True)

    px = b["patch_level0"][0] * b["patch_level0"][1]
    gpx = b["patches"] * px / 1e9

    def row(name: str, rate: float, cpu: float) -> tuple[str, ...]:
        return (name, f"{rate:,.1f}", f"{rate / a:.2f}", f"{rate / c:.2f}", f"{cpu * 1e3:.2f}", f"{a_cpu / cpu:.2f}")

    rows = [
        row(f"(a) encoder only, random uint8 in memory (mean of {a1:,.1f}, {a2:,.1f})", a, a_cpu),
        row("(a0) embed, float input, no fold (reference)", a0, a0_cpu),
        row(f"(b) compress_slides, shm, decode={args.decode}, end to end", b["rate"], b["cpu"]),
        row("(b) same, steady state (after grid/mask)", b["steady"], b["cpu"]),
    ]
    if b2:
        rows.append(row("(b') compress_slides, pickle, end to end", b2["rate"], b2["cpu"]))
    if b3:
        rows.append(row(f"(b'') compress_slides, decode={other}, end to end", b3["rate"], b3["cpu"]))
        rows.append(row("(b'') same, steady state", b3["steady"], b3["cpu"]))
    rows.append(row("(c) naive OpenSlide loop", c, c_cpu))
    print()
    print(
        f"slide {args.size} x {args.size} px at {args.mpp:g} um/px, encoder {encoder.name} "
        f"({encoder.patch_size} px at {encoder.mpp:g} um/px), batch {args.batch_size}, "
        f"{args.threads} torch threads, {args.workers} reader processes, device {args.device}; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    head = ("", "patches/s", "x (a)", "x (c)", "CPU ms/patch", "CPU eff. vs (a)")
    w = max(len(r[0]) for r in rows)
    print(f"{head[0]:{w}}  " + "  ".join(f"{h:>{max(len(h), 9)}}" for h in head[1:]))
    for r in rows:
        print(f"{r[0]:{w}}  " + "  ".join(f"{v:>{max(len(h), 9)}}" for v, h in zip(r[1:], head[1:], strict=True)))
    print(
        f"(b) CPU: {b['cpu_main']:.1f} s in the encoding process, {b['cpu_readers']:.1f} s in the reader processes "
        "(start-up included); CPU ms/patch and its ratio do not depend on what else the machine runs"
    )
    print(
        f"tissue: {b['patches']} patches = {gpx:.3f} gigapixels at level 0; (b) took {b['wall']:.1f} s "
        f"= {b['wall'] / gpx:.1f} s per gigapixel of tissue"
    )
    print(
        f"peak RSS of the compressing process tree: {b['peak_rss'] / 2**20:,.0f} MiB "
        f"(before: {baseline_rss / 2**20:,.0f} MiB with the model loaded)"
    )
    ok_a = b["rate"] >= 0.85 * a
    ok_c = b["rate"] >= 1.5 * c
    print(
        f"targets: (b) >= 0.85 x (a): {'met' if ok_a else 'NOT met'}; (b) >= 1.5 x (c): {'met' if ok_c else 'NOT met'}"
        f"; (b) / (a0) = {b['rate'] / a0:.2f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
