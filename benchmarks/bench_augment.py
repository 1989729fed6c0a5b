"""Is augmentation the bottleneck of encoder training?  Augmentation alone against the
forward + backward pass of nic-cnn on the same batch, and training patches/s.

Times (median of ``--repeats`` round-robin rounds after a warm-up), batch of ``--batch`` 128 px patches,
``--threads`` torch threads, fp32 on the CPU:

- ``augment``: :func:`nic.patches.augment.augment` at strength 1 (all operations), and
  its parts (geometry, HED, colour map, blur, noise);
- ``fwd+bwd``: nic-cnn forward, masked loss of two linear heads, backward, Adam step;
- ``train step``: uint8 batch -> float -> augment -> fwd+bwd (what one training step does,
  minus data loading from the in-memory cache).

Usage: ``python benchmarks/bench_augment.py --threads 2 --batch 64``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description="augmentation vs forward+backward of nic-cnn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from nic.encoder_training import MultitaskModule, TaskHead
    from nic.encoders import create_encoder
    from nic.patches import augment as A

    n, p = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, p, p), dtype=torch.uint8, generator=g)
    x = images.float() / 255
    cfg = A.AugmentConfig()

    enc = create_encoder("nic-cnn")
    heads = [TaskHead("a", "class", 3), TaskHead("b", "regr", 1)]
    module = MultitaskModule(enc.module.train(), enc.code_size, heads, augment=cfg, seed=0).train()
    opt = torch.optim.Adam(module.parameters(), 1e-3)
    task = torch.arange(n) % 2
    targets = torch.where(task == 0, (torch.arange(n) % 3).float(), torch.randn(n, generator=g))

    from nic.encoder_training import masked_multitask_loss

    def fwd_bwd(inp: torch.Tensor) -> None:
        outs = module(inp)
        loss, _ = masked_multitask_loss(outs, targets, task, module.kinds)
        opt.zero_grad()
        loss.backward()
        opt.step()

    k = torch.randint(0, 4, (n,), generator=g)
    f = torch.rand(n, generator=g) < 0.5
    zoom = 0.9 + 0.2 * torch.rand(n, generator=g)
    ones = torch.ones(n)
    alpha, beta = 1 + 0.1 * torch.randn(n, 3, generator=g), 0.02 * torch.randn(n, 3, generator=g)
    sig = torch.where(
        torch.rand(n, generator=g) < 0.3, 0.25 * torch.randint(1, 5, (n,), generator=g), torch.zeros(n)
    ).double()
    rows = {
        "augment (strength 1, all ops)": lambda: A.augment(x, cfg, g),
        "  geometry: flips/rot90 + zoom (grid_sample)": lambda: A._geometry(x, k, f, zoom),
        "  geometry: flips/rot90 only (exact)": lambda: A._geometry(x, k, f, None),
        "  HED jitter (fused)": lambda: A._hed_affine(x, alpha, beta),
        "  brightness/contrast/saturation/hue (fused)": lambda: A._colour_affine(
            x, 1.1 * ones, 0.9 * ones, 1.2 * ones, 0.02 * ones
        ),
        "  blur (30% of samples)": lambda: A.gaussian_blur(x, sig),
        "  noise (all samples)": lambda: A.add_noise(x, 0.02 * ones, g),
        "nic-cnn forward+backward+Adam": lambda: fwd_bwd(x),
        "train step (uint8 -> augment -> fwd+bwd)": lambda: fwd_bwd(A.augment(images.float().div_(255), cfg, g)),
    }
    print(f"batch {n} x {p} px, {args.threads} threads, fp32, median of {args.repeats}")
    print(f"{'what':48s} {'ms/batch':>9s} {'patches/s':>10s}")
    # Round-robin: every repeat times each row once, so load from other processes on a
    # shared machine hits all rows alike; the median of each row is reported.
    for fn in rows.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    results = {}
    for name in rows:
        t = statistics.median(times[name])
        results[name] = t
        print(f"{name:48s} {1000 * t:9.1f} {n / t:10.0f}")
    ratio = results["augment (strength 1, all ops)"] / results["nic-cnn forward+backward+Adam"]
    print(f"augmentation / (forward+backward) = {ratio:.2f}")


if __name__ == "__main__":
    main()
