"""Batched encoding of uint8 patches on any device.

:class:`BatchEncoder` runs the encoder on uint8 patches end to end: the float conversion
happens inside the model call, on the device, and where the encoder allows it the 1/255
and the normalisation are folded into its first convolution
(:meth:`nic.encoders.Encoder.uint8_module`), so no float copy of a batch is ever made on
the host.  Patches come in three ways:

- :meth:`BatchEncoder.buffer` + :meth:`BatchEncoder.submit`: two input buffers of
  ``batch_size`` uint8 patches (N, P, P, 3) that the caller fills in place (pinned host
  memory on CUDA, so the copy to the device is asynchronous);
- :meth:`BatchEncoder.submit_array`: a uint8 array the caller already holds (a reader's
  shared-memory slot): encoded in place on a CPU, without a copy;
- :meth:`BatchEncoder.submit_tensor`: uint8 patches (N, 3, P, P) already on the device
  (decoded there, see :mod:`nic.compress._tiles`).

The model runs in inference mode, channels-last, with autocast on accelerators.  On CUDA
the codes of batch ``i`` are collected while batch ``i + 1`` is being prepared, so host
work overlaps device work.  On a CPU with ``threads`` > 1 (by default torch's intra-op
thread count), batches are encoded side by side, one per thread, each thread running
torch on one core, instead of one batch at a time on all of them: a single-threaded
forward never waits at a barrier for a core that a reader process (or another program)
has taken, so a busy machine costs only the cores taken.  On the 2-core development
machine under load from other jobs this encodes 1.8-2.5x the patches per second of one
batch on two intra-op threads, about 1.1x when the machine is idle (rows (a) and (a0) of
``benchmarks/bench_compress.py``; (a0) also lacks the fold).

Dihedral variants: variant ``k`` (0-7) is the code of ``dihedral(patch, k)``: a
left-right flip when ``k >= 4``, then ``k % 4`` quarter turns counter-clockwise
(``np.rot90`` over rows, columns), the order :func:`nic.learn.data.dihedral` uses for grids.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, get_args

import numpy as np

from nic._device import torch_device
from nic.dihedral import ORDER, dihedral, dihedral_torch
from nic.errors import check_choice, check_int

logger = logging.getLogger(__name__)

__all__ = ["BatchEncoder", "Precision", "DIHEDRAL_ORDER", "dihedral_patch"]

Precision = Literal["auto", "fp32", "fp16", "bf16"]

#: How variant k of a dihedral store was made (stored in the store's attributes).
DIHEDRAL_ORDER = ORDER


def dihedral_patch(patch: np.ndarray, k: int) -> np.ndarray:
    """Variant ``k`` (0-7) of uint8 patches (..., H, W, 3): see :mod:`nic.dihedral`."""
    return np.ascontiguousarray(dihedral(patch, k, axes=(-3, -2)))


def _dihedral_tensor(x: Any, k: int) -> Any:
    """Variant ``k`` of a batch (N, 3, H, W), channels-last."""
    import torch

    if k == 0:
        return x
    return dihedral_torch(x, k).contiguous(memory_format=torch.channels_last)


class BatchEncoder:
    """Runs an encoder on batches of uint8 patches; codes come back as float16.

    Use: fill ``buffer()[:n]`` (uint8 (batch_size, P, P, 3)) and call :meth:`submit` with
    the (n, 2) grid cells of those patches, or hand patches over with
    :meth:`submit_array` / :meth:`submit_tensor`; each yields the finished
    ``(codes, cells)`` pairs, codes float16 (variants, n, C).  :meth:`flush` yields what is
    still pending.  ``folded`` says whether the encoder's input scaling is folded into its
    first convolution.  ``device``: a torch device or its name, "auto" (the default) for
    CUDA when torch sees one, else the CPU.  ``threads``: batches encoded at once on a CPU,
    one per thread (see the module docstring; None: torch's thread count; accelerators
    always use 1).
    """

    def __init__(
        self,
        encoder: Any,
        batch_size: int,
        device: str | Any = "auto",
        dihedral: bool = False,
        precision: Precision = "auto",
        threads: int | None = None,
    ) -> None:
        import torch

        check_int("batch_size", batch_size, 1)
        check_choice("precision", precision, get_args(Precision))
        self.device = torch_device(device)
        self.encoder = encoder
        # the fused inference copy (nic-cnn folds its batch norms): same codes, ~1.5x on a CPU
        inference = encoder.for_inference()
        inference.module.to(self.device).to(memory_format=torch.channels_last).eval()
        self.amp_dtype = self._amp_dtype(precision)
        # the fold is probed at the precision the codes are computed in (half on accelerators)
        self.module, self.folded = inference.uint8_module(autocast=self.amp_dtype)
        self.batch_size = int(batch_size)
        self.variants = 8 if dihedral else 1
        p = int(encoder.patch_size)
        self.patch_size = p
        cpu = self.device.type == "cpu"
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads())) if cpu else 1
        pin = self.device.type == "cuda"
        n_buffers = self.threads + 1 if self.threads > 1 else 2  # one per batch in flight, one being filled
        self._inputs = [
            torch.empty((self.batch_size, p, p, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(n_buffers)
        ]
        self._views = [t.numpy() for t in self._inputs]
        self._current = 0
        self._free: deque[int] = deque(range(1, n_buffers))
        self._pending: tuple[Any, Any, np.ndarray] | None = None  # (host codes, event, cells)
        # CPU threads: batches in flight, in order: (future of the codes, input buffer or None, cells)
        self._inflight: deque[tuple[Future[Any], int | None, np.ndarray]] = deque()
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="nic-encode", initializer=torch.set_num_threads,
                               initargs=(1,))
            if self.threads > 1
            else None
        )  # fmt: skip

    def _amp_dtype(self, precision: Precision) -> Any:
        import torch

        if precision == "fp32":
            return None
        if precision == "fp16":
            return torch.float16
        if precision == "bf16":
            return torch.bfloat16
        # auto: half precision on accelerators; fp32 on CPU (bf16 autocast is far slower there)
        return torch.float16 if self.device.type in ("cuda", "mps") else None

    def reset(self) -> None:
        """Forget any pending batch (e.g. left by a slide that failed mid-way); call before each slide."""
        for future, _, _ in self._inflight:  # let batches still running finish with their buffers
            if not future.cancel():
                future.exception()
        self._inflight.clear()
        self._pending = None
        self._current = 0
        self._free = deque(range(1, len(self._inputs)))

    def buffer(self) -> np.ndarray:
        """The uint8 (batch_size, P, P, 3) array to fill with the next batch."""
        return self._views[self._current]

    def encode(self, x: Any) -> Any:
        """Codes (V, n, C) float16, on the device, of uint8 patches ``x`` (n, 3, P, P) on the device."""
        import torch

        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outs = [self.module(_dihedral_tensor(x, k)) for k in range(self.variants)]
        return torch.stack(outs).to(torch.float16)

    def _forward(self, n: int) -> Any:
        """Codes (V, n, C) float16, on the device, of the first ``n`` patches of :meth:`buffer`
        (call in inference mode)."""
        x = self._inputs[self._current][:n]
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
        # (N, H, W, 3) permuted to (N, 3, H, W) is already channels-last in memory.
        return self.encode(x.permute(0, 3, 1, 2))

    def submit(self, n: int, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encode the first ``n`` patches of :meth:`buffer`; yields finished results."""
        import torch

        if n == 0:
            return
        if self._pool is not None:
            buf = self._current
            self._launch(self._pool.submit(self._encode_host, self._inputs[buf][:n]), buf, cells)
            yield from self._settle()
            return
        with torch.inference_mode():
            out = self._forward(n)
            self._current ^= 1  # the caller fills the other buffer while this one is in flight
            yield from self._collect(out, cells)

    def submit_array(self, patches: np.ndarray, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encode uint8 ``patches`` (n, P, P, 3), n <= batch_size, that the caller holds.

        On a CPU with one thread they are read in place (no copy; the array may be reused as
        soon as the results have been taken); with threads, and on accelerators, they are
        copied into an input buffer (the batch outlives the call; on CUDA the buffer is pinned).
        """
        import torch

        n = len(patches)
        if n == 0:
            return
        if self.device.type != "cpu" or self._pool is not None:
            self.buffer()[:n] = patches
            yield from self.submit(n, cells)
            return
        with torch.inference_mode():
            yield from self._collect(self.encode(torch.from_numpy(patches).permute(0, 3, 1, 2)), cells)

    def submit_tensor(self, x: Any, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encode uint8 patches ``x`` (n, 3, P, P) already on the device; yields finished results."""
        import torch

        if len(x) == 0:
            return
        if self._pool is not None:
            self._launch(self._pool.submit(self._encode_tensor, x), None, cells)
            yield from self._settle()
            return
        with torch.inference_mode():
            yield from self._collect(self._encode_tensor_inner(x), cells)

    # -- CPU threads ---------------------------------------------------------------------------
    def _encode_host(self, x: Any) -> np.ndarray:
        """On an encoding thread: codes (V, n, C) float16 of host uint8 (n, P, P, 3)."""
        import torch

        with torch.inference_mode():
            return self.encode(x.permute(0, 3, 1, 2)).numpy()

    def _encode_tensor_inner(self, x: Any) -> Any:
        import torch

        return self.encode(x.contiguous(memory_format=torch.channels_last))

    def _encode_tensor(self, x: Any) -> np.ndarray:
        """On an encoding thread: codes (V, n, C) float16 of uint8 (n, 3, P, P)."""
        import torch

        with torch.inference_mode():
            return self._encode_tensor_inner(x).numpy()

    def _launch(self, future: Future[Any], buffer: int | None, cells: np.ndarray) -> None:
        self._inflight.append((future, buffer, cells.copy()))
        if buffer is not None:  # the next batch goes into a free buffer (one is freed by _settle)
            self._current = -1

    def _settle(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield the finished batches, in order; wait for the oldest while every buffer is in
        use or more batches than threads are in flight; then pick the buffer to fill next."""
        while self._inflight and (
            self._inflight[0][0].done() or len(self._inflight) > self.threads or (self._current < 0 and not self._free)
        ):
            future, buffer, cells = self._inflight.popleft()
            codes = future.result()
            if buffer is not None:
                self._free.append(buffer)
            yield codes, cells
        if self._current < 0:
            self._current = self._free.popleft()

    def _collect(self, out: Any, cells: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import torch

        if self.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            yield from self.flush()  # the previous batch, finished while this one was queued
            self._pending = (host, event, cells.copy())
        else:
            yield out.cpu().numpy(), cells.copy()

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield what is still pending: batches on CPU threads, the last batch on CUDA."""
        while self._inflight:
            future, buffer, cells = self._inflight.popleft()
            codes = future.result()
            if buffer is not None:
                self._free.append(buffer)
            yield codes, cells
        if self._pending is not None:
            host, event, cells = self._pending
            self._pending = None
            event.synchronize()
            yield host.numpy(), cells
