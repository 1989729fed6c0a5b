"""Small building blocks shared by the encoder builders, and the uint8 input forms of
encoders (:class:`Uint8Input`, :class:`FoldedInputConv`, :func:`sum_pool_uint8`)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "FoldedInputConv", "Normalize", "NormalizedEncoder", "Uint8Input", "shallow_copy", "sum_pool_uint8", "uint8_form",
]  # fmt: skip


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for RGB ``x`` in [0, 1] of shape (N, 3, H, W).

    ``mean`` and ``std`` are non-persistent buffers: they come from the encoder's config,
    never from a weight file, so the two can never disagree.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have one value per channel and std > 0, got {mean} / {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        inv_std = 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={(1 / self.inv_std).flatten().tolist()}"


class NormalizedEncoder(nn.Module):
    """``body(normalize(x))``: float RGB in [0, 1] (N, 3, P, P) -> codes (N, num_features).

    ``num_features`` is the code length, as in timm, so heads and probes can size themselves.
    """

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float], num_features: int) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def fold_uint8_input(self) -> nn.Module | None:
        """This encoder on uint8 RGB (N, 3, P, P), with the 1/255 and the normalisation folded
        into the body's first convolution; None when the body does not name one.

        The first convolution is the one timm names in ``pretrained_cfg["first_conv"]`` (the
        layer that sees the image), taken only when it is a plain ``nn.Conv2d`` of 3 input
        channels without groups (timm's ``Conv2dSame`` pads inside its forward, so it is left
        alone).  The copy shares every tensor with this module but that convolution's.
        """
        first = (getattr(self.body, "pretrained_cfg", None) or {}).get("first_conv")
        if not isinstance(first, str):
            return None
        try:
            conv = self.body.get_submodule(first)
        except AttributeError:
            return None
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.in_channels != 3:
            return None
        inv_std = self.normalize.inv_std.flatten()
        body = shallow_copy(self.body)
        body.set_submodule(first, FoldedInputConv(conv, inv_std / 255.0, -self.normalize.mean.flatten() * inv_std))
        return Uint8Input(body, scale=False)


def uint8_form(module: nn.Module) -> nn.Module:
    """``module`` (float RGB in [0, 1]) as a module of uint8 RGB (N, 3, P, P): its own
    ``fold_uint8_input()`` where it has one that applies, else :class:`Uint8Input`."""
    fold = getattr(module, "fold_uint8_input", None)
    folded = fold() if callable(fold) else None
    return folded if folded is not None else Uint8Input(module)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its parameters and buffers (so replacing a
    submodule of the copy leaves ``module`` as it is, without doubling its memory)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


class Uint8Input(nn.Module):
    """``module`` on uint8 RGB (N, 3, P, P): converted to float where the module runs (on
    the device), and divided by 255 unless ``scale`` is False (``module`` then takes 0-255
    itself, its input scaling folded into its first layer)."""

    def __init__(self, module: nn.Module, scale: bool = True) -> None:
        super().__init__()
        self.module = module
        self.scale = scale
        self.num_features = getattr(module, "num_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # keeps the memory format: channels-last stays channels-last
        return self.module(x.div_(255.0) if self.scale else x)


def sum_pool_uint8(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of the k x k blocks of uint8 (N, C, H, W) as float (N, C, H // k, W // k), channels-last.

    The sums are integers, exact in int16 (k = 2) or int32, so ``sum / k**2`` is the average
    pool of the image; converting once after summing is 4-5x cheaper on a CPU than
    ``avg_pool2d`` of the float image, whose channels-last kernel handles 3 channels poorly.
    """
    if k == 1:
        return x.float()
    n, c, h, w = x.shape
    h, w = h // k, w // k
    v = x.permute(0, 2, 3, 1)[:, : h * k, : w * k].contiguous()  # NHWC; a view for channels-last input
    if k == 2:
        v = v.view(n, h, 2, w, 2 * c)
        pairs = v[:, :, 0].to(torch.int16) + v[:, :, 1]  # (N, h, w, 2C): rows summed
        s = pairs[..., :c] + pairs[..., c:]
    else:
        s = v.view(n, h, k, w, k, c).sum(dim=(2, 4), dtype=torch.int32)
    return s.float().permute(0, 3, 1, 2)


class FoldedInputConv(nn.Module):
    """``conv(x * scale + shift)`` (per input channel) as one convolution of ``x``.

    The weights take ``scale`` and the bias the sum of the weights times ``shift``: exact
    wherever the kernel lies on the image.  Where it reaches into zero padding, the
    unfolded convolution padded zeros *after* the affine map (raw values of
    ``-shift / scale``) while this one pads raw zeros; the difference does not depend on
    ``x``, so it is computed once per input size (float64, from the original weights) and
    added to the output's border rows and columns, the only place it is not zero.  With
    'valid' padding, or a padding mode that copies pixels (reflect, replicate, circular),
    there is nothing to add.  ``conv`` must have ``groups == 1``.
    """

    def __init__(self, conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"FoldedInputConv needs a convolution without groups, got groups={conv.groups}")
        w = conv.weight.detach().double()
        s = scale.detach().double().to(w.device).view(1, -1, 1, 1)
        t = shift.detach().double().to(w.device).view(1, -1, 1, 1)
        b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
        dtype = conv.weight.dtype
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=True, padding_mode=conv.padding_mode, device=w.device, dtype=dtype,
        )  # fmt: skip
        self.conv.weight.data = (w * s).to(dtype).contiguous(memory_format=torch.channels_last)
        self.conv.bias.data = (b + (w * t).sum(dim=(1, 2, 3))).to(dtype)
        self.conv.requires_grad_(False)
        # what the border terms are computed from: original weights, bias and shift, float64 on the CPU
        self._original = (w.cpu(), b.cpu(), t.flatten().cpu(), (b + (w * t).sum(dim=(1, 2, 3))).cpu())
        self._borders: dict[tuple[Any, ...], list[tuple[slice, slice, torch.Tensor]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for rows, cols, delta in self._border_terms(x.shape[-2], x.shape[-1], y.device, y.dtype):
            y[:, :, rows, cols] += delta
        return y

    def _border_terms(self, h: int, w: int, device: Any, dtype: Any) -> list[tuple[slice, slice, torch.Tensor]]:
        """(rows, cols, delta) strips to add to the output of an (h, w) input."""
        key = (h, w, device, dtype)
        terms = self._borders.get(key)
        if terms is not None:
            return terms
        terms = []
        if self.conv.padding_mode == "zeros":
            weight, bias, shift, folded_bias = self._original
            image = shift.view(1, -1, 1, 1).expand(1, -1, h, w)  # the image of raw zeros, after the affine map
            c = self.conv
            full = F.conv2d(image, weight, bias, c.stride, c.padding, c.dilation)[0]  # what the unfolded conv gives
            delta = full - folded_bias.view(-1, 1, 1)  # (C_out, Ho, Wo): zero where the kernel sees only image
            nonzero = delta.abs().amax(dim=0) > 1e-9 * (1.0 + float(delta.abs().max()))
            if bool(nonzero.any()):
                terms = [(r, cl, delta[:, r, cl].to(device=device, dtype=dtype)) for r, cl in _frame(nonzero)]
        self._borders[key] = terms
        return terms


def _frame(nonzero: torch.Tensor) -> list[tuple[slice, slice]]:
    """(rows, cols) slices covering the True cells of ``nonzero`` (Ho, Wo): the border frame
    (top and bottom rows, then the left and right columns between them) when the True
    cells lie in it, else the whole map."""
    ho, wo = nonzero.shape

    def run(v: torch.Tensor) -> int:  # length of the leading run of True
        off = (~v).nonzero()
        return int(off[0]) if len(off) else len(v)

    mid_col, mid_row = nonzero[:, wo // 2], nonzero[ho // 2, :]
    top, bottom = run(mid_col), run(mid_col.flip(0))
    left, right = run(mid_row), run(mid_row.flip(0))
    if top + bottom >= ho or left + right >= wo:
        return [(slice(None), slice(None))]
    inner = nonzero[top : ho - bottom, left : wo - right]
    if bool(inner.any()):
        return [(slice(None), slice(None))]
    strips = [(slice(0, top), slice(0, wo)), (slice(ho - bottom, ho), slice(0, wo)),
              (slice(top, ho - bottom), slice(0, left)), (slice(top, ho - bottom), slice(wo - right, wo))]  # fmt: skip
    return [(r, c) for r, c in strips if r.stop > r.start and c.stop > c.start]
