"""Encoder-only throughput: random uint8 patches already in memory -> codes.

This is the ceiling that compression is measured against (the target: compression should
reach at least 0.85x of it with the same threads and batch size).

    python benchmarks/bench_encoders.py                       # nic-cnn, batch 64, 2 threads
    python benchmarks/bench_encoders.py --encoder timm:resnet18?patch_size=128 --seconds 20

Prints one JSON line per encoder, patches/s of:
- ``embed``: ``encoder.for_inference().embed`` (uint8 in, the uint8 -> float conversion
  included; nic-cnn with its batch norms folded) -- what compression should use;
- ``embed_unfused``: ``encoder.embed`` on the trainable module;
- ``module``: the fused module alone on float input already channels-last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def _rate(fn, n_per_call: int, seconds: float, warmup: int = 3) -> float:
    """Calls per second of ``fn`` over at least ``seconds`` s, times ``n_per_call``."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * n_per_call / elapsed


def bench(spec: str, batch: int, threads: int, seconds: float, device: str) -> dict:
    from nic.encoders import load_encoder

    torch.set_num_threads(threads)
    trainable = load_encoder(spec, device=device)
    encoder = trainable.for_inference()
    p = encoder.patch_size
    patches = np.random.default_rng(0).integers(0, 256, (batch, p, p, 3), dtype=np.uint8)
    x = torch.rand(batch, 3, p, p, device=device).contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def embed() -> None:
        encoder.embed(patches)

    def embed_unfused() -> None:
        trainable.embed(patches)

    def module_only() -> None:
        with torch.inference_mode():
            encoder.module(x)
        sync()

    return {
        "encoder": spec,
        "patch_size": p,
        "code_size": encoder.code_size,
        "batch": batch,
        "threads": threads,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "embed_patches_per_s": round(_rate(embed, batch, seconds), 1),
        "embed_unfused_patches_per_s": round(_rate(embed_unfused, batch, seconds), 1),
        "module_patches_per_s": round(_rate(module_only, batch, seconds), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", action="append", help="encoder spec (repeatable); default nic-cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per encoder and mode")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    for spec in args.encoder or ["nic-cnn"]:
        print(json.dumps(bench(spec, args.batch, args.threads, args.seconds, args.device)))


if __name__ == "__main__":
    main()
