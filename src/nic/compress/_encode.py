"""Batched encoding of uint8 patches on any device.

:class:`BatchEncoder` owns two input buffers of ``batch_size`` uint8 patches
(N, P, P, 3) that the caller fills in place (pinned host memory on CUDA, so the copy to
the device is asynchronous), and runs the encoder's module on them in inference mode,
channels-last, with autocast on accelerators.  On CUDA the codes of batch ``i`` are
collected while batch ``i + 1`` is being filled, so host work overlaps device work.

Dihedral variants: variant ``k`` (0-7) is the code of ``dihedral(patch, k)``: a
left-right flip when ``k >= 4``, then ``k % 4`` quarter turns counter-clockwise
(``np.rot90`` over rows, columns), the order :func:`nic.learn.data.dihedral` uses for grids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from nic._device import torch_device
from nic.dihedral import ORDER, dihedral, dihedral_torch
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = ["BatchEncoder", "Precision", "DIHEDRAL_ORDER", "dihedral_patch"]

Precision = Literal["auto", "fp32", "fp16", "bf16"]

#: How variant k of a dihedral store was made (stored in the store's attributes).
DIHEDRAL_ORDER = ORDER


def dihedral_patch(patch: np.ndarray, k: int) -> np.ndarray:
    """Variant ``k`` (0-7) of uint8 patches (..., H, W, 3): see :mod:`nic.dihedral`."""
    return np.ascontiguousarray(dihedral(patch, k, axes=(-3, -2)))


def _dihedral_tensor(x: Any, k: int) -> Any:
    """Variant ``k`` of a float batch (N, 3, H, W), channels-last."""
    import torch

    if k == 0:
        return x
    return dihedral_torch(x, k).contiguous(memory_format=torch.channels_last)


class BatchEncoder:
    """Runs ``encoder.module`` on batches of uint8 patches; codes come back as float16.

    Use: fill ``buffer()[:n]`` (uint8 (batch_size, P, P, 3)), call :meth:`submit` with the
    (n, 2) grid cells of those patches; it yields the finished ``(codes, cells)`` pairs,
    codes float16 (variants, n, C).  :meth:`flush` yields what is still pending.
    """

    def __init__(
        self,
        encoder: Any,
        batch_size: int,
        device: str | Any = "cpu",
        dihedral: bool = False,
        precision: Precision = "auto",
    ) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch_device(device, EncoderError)
        self.encoder = encoder
        # the fused inference copy (nic-cnn folds its batch norms): same codes, ~1.5x on a CPU
        module = encoder.for_inference().module
        self.module = module.to(self.device).to(memory_format=torch.channels_last).eval()
        self.batch_size = int(batch_size)
        self.variants = 8 if dihedral else 1
        self.amp_dtype = self._amp_dtype(precision)
        p = int(encoder.patch_size)
        pin = self.device.type == "cuda"
        self._inputs = [torch.empty((self.batch_size, p, p, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._views = [t.numpy() for t in self._inputs]
        self._current = 0
        self._pending: tuple[Any, Any, np.ndarray] | None = None  # (host codes, event, cells)

    def _amp_dtype(self, precision: Precision) -> Any:
        import torch

        if precision == "fp32":
            return None
        if precision == "fp16":
            return torch.float16
        if precision == "bf16":
            return torch.bfloat16
        if precision != "auto":
            raise EncoderError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        # auto: half precision on accelerators; fp32 on CPU (bf16 autocast is far slower there)
        return torch.float16 if self.device.type in ("cuda", "mps") else None

    def reset(self) -> None:
        """Forget any pending batch (e.g. left by a slide that failed mid-way); call before each slide."""
        self._pending = None
        self._current = 0

    def buffer(self) -> np.ndarray:
        """The uint8 (batch_size, P, P, 3) array to fill with the next batch."""
        return self._views[self._current]

    def _forward(self, n: int) -> Any:
        import torch

        x = self._inputs[self._current][:n]
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
        # (N, H, W, 3) permuted to (N, 3, H, W) is already channels-last in memory.
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outs = [self.module(_dihedral_tensor(x, k)) for k in range(self.variants)]
        return torch.stack(outs).to(torch.float16)  # (V, n, C)

    def submit(self, n: int, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encode the first ``n`` patches of :meth:`buffer`; yields finished results."""
        import torch

        if n == 0:
            return
        with torch.inference_mode():
            out = self._forward(n)
            if self.device.type == "cuda":
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                yield from self.flush()  # the previous batch, finished while this one was queued
                self._pending = (host, event, cells.copy())
            else:
                yield out.cpu().numpy(), cells.copy()
        self._current ^= 1

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield the pending result, if any (CUDA only; on CPU nothing is ever pending)."""
        if self._pending is not None:
            host, event, cells = self._pending
            self._pending = None
            event.synchronize()
            yield host.numpy(), cells
