"""Batched colour and geometry augmentation of patches, in torch, on any device.

Every function takes float RGB in [0, 1], shape (N, 3, H, W), and draws one random
setting per sample from a ``torch.Generator`` (so a batch is augmented in a few tensor
operations, never in a Python loop over samples).  :class:`AugmentConfig` holds the
ranges at strength 1; ``strength`` scales all of them linearly and ``strength == 0``
returns the input unchanged (flips and 90-degree rotations included).

Operations, in the order :func:`augment` applies them:

- flips and 90-degree rotations (the 8 symmetries of the square; exact pixel moves);
- small scale jitter (zoom in [1 - s, 1 + s], bilinear, reflected border);
- HED stain jitter (Tellez et al. 2018): optical densities of haematoxylin, eosin and DAB
  (Ruifrok & Johnston deconvolution, the matrices of ``skimage.color.rgb2hed``) are
  scaled by ``1 + U(-a, a)`` and shifted by ``U(-b, b)`` per sample and stain;
- brightness (multiplicative), contrast (around the mean grey), saturation (towards grey),
  hue (rotation of the chroma plane in YIQ);
- Gaussian blur (a sample is blurred with probability ``blur_p``, sigma in pixels);
- additive Gaussian noise (probability ``noise_p``, std drawn per sample).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from nic.dihedral import compose_rot_then_flip, dihedral_torch
from nic.errors import check_number

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentConfig",
    "ColorAugment",
    "augment",
    "dihedral",
    "rgb_to_hed",
    "hed_to_rgb",
    "hed_jitter",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "scale_jitter",
    "gaussian_blur",
    "add_noise",
]

# Ruifrok & Johnston stain vectors, exactly those of skimage.color (rgb_from_hed, hed_from_rgb).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_EPS = 1e-6
_LOG_ADJUST = math.log(_EPS)  # skimage scales optical densities by 1 / log(1e-6)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of every augmentation at strength 1 (``strength`` multiplies them all).

    ``hed_scale``/``hed_shift``: stain scale ``1 + U(-a, a)`` and shift ``U(-b, b)`` (in
    skimage's normalised optical density); ``brightness``, ``contrast``, ``saturation``:
    factor ``1 + U(-r, r)``; ``hue``: rotation ``U(-h, h)`` in turns (1 = 360 degrees);
    ``scale``: zoom ``1 + U(-s, s)``; ``blur_sigma``: max sigma in pixels, applied with
    probability ``blur_p`` (sigma is one of 1/4, 2/4, 3/4, 4/4 of the maximum); ``noise``: max std of
    additive noise (intensity units), applied with probability ``noise_p``;
    ``flips``/``rot90``: random flips and quarter turns (when ``strength > 0``).
    """

    strength: float = 1.0
    hed_scale: float = 0.1
    hed_shift: float = 0.02
    brightness: float = 0.2
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.04
    scale: float = 0.1
    blur_sigma: float = 1.0
    blur_p: float = 0.3
    noise: float = 0.03
    noise_p: float = 0.5
    flips: bool = True
    rot90: bool = True

    def __post_init__(self) -> None:
        check_number("strength", self.strength, 0, math.inf)

    def with_strength(self, strength: float) -> AugmentConfig:
        """The same ranges at another strength."""
        return replace(self, strength=float(strength))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(n,) uniform samples in [low, high) with ``like``'s dtype and device."""
    u = torch.rand(n, generator=generator, device=_gen_device(generator, like), dtype=torch.float32)
    return (low + (high - low) * u).to(like.device, like.dtype)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"augmentations take float RGB batches (N, 3, H, W) in [0, 1], got {tuple(x.shape)} {x.dtype}")


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB (N, 3, H, W)."""
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# ----------------------------------------------------------------------------- geometry


def dihedral(x: torch.Tensor, k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Apply per-sample quarter turns ``k`` (N,) in {0..3} then horizontal flips ``flip`` (N,) bool.

    Square images only (H == W); pixels are moved, never interpolated.  One view per
    sample, stacked once: on a CPU this is ~10x faster than masked whole-batch rotations.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"90-degree rotations need square patches, got {tuple(x.shape[-2:])}")
    out = [dihedral_torch(xi, compose_rot_then_flip(q, fl)) for xi, q, fl in zip(x, k.tolist(), flip.tolist())]
    return torch.stack(out) if out else x.clone()


def scale_jitter(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Zoom each sample by ``zoom`` (N,) about its centre (>1 magnifies); same output size.

    Bilinear sampling with a reflected border, so no black corners appear.
    """
    inv = 1.0 / zoom.to(x.device, x.dtype)
    m = torch.zeros(x.shape[0], 2, 2, device=x.device, dtype=x.dtype)
    m[:, 0, 0] = inv
    m[:, 1, 1] = inv
    return F.grid_sample(
        x, _linear_grid(m, x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="reflection", align_corners=False
    )


# ----------------------------------------------------------------------------- stains


def rgb_to_hed(x: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """RGB in [0, 1] (N, 3, H, W) -> H, E, D stain densities (N, 3, H, W).

    Matches ``skimage.color.rgb2hed`` (channels first); ``clip=False`` keeps negative
    densities so that :func:`hed_to_rgb` inverts it exactly.
    """
    m = _HED_FROM_RGB.to(x.device, x.dtype)
    od = torch.log(x.clamp_min(_EPS)) / _LOG_ADJUST
    hed = torch.einsum("nchw,cd->ndhw", od, m)
    return hed.clamp_min(0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """H, E, D stain densities (N, 3, H, W) -> RGB in [0, 1]; matches ``skimage.color.hed2rgb``."""
    m = _RGB_FROM_HED.to(hed.device, hed.dtype)
    log_rgb = torch.einsum("nchw,cd->ndhw", hed, m) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale stain densities by ``alpha`` (N, 3) and shift them by ``beta`` (N, 3)."""
    hed = rgb_to_hed(x, clip=False)
    hed = hed * alpha.to(x).view(-1, 3, 1, 1) + beta.to(x).view(-1, 3, 1, 1)
    return hed_to_rgb(hed)


# ----------------------------------------------------------------------------- colour


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply intensities by ``factor`` (N,)."""
    return x * factor.to(x).view(-1, 1, 1, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale deviations from each sample's mean grey by ``factor`` (N,)."""
    mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    return mean + (x - mean) * factor.to(x).view(-1, 1, 1, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale deviations from each pixel's grey by ``factor`` (N,) (0 = greyscale)."""
    g = _grey(x)
    return g + (x - g) * factor.to(x).view(-1, 1, 1, 1)


_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def adjust_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` (N,) of a full circle, as a rotation of the YIQ chroma plane.

    One linear 3x3 colour map per sample: RGB -> YIQ -> rotate (I, Q) -> RGB.
    """
    angle = turns.to(torch.float64).cpu() * (2 * math.pi)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    maps = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ  # (N, 3, 3) acting on RGB column vectors
    return torch.einsum("ndc,nchw->ndhw", maps.to(x.device, x.dtype), x)


# ----------------------------------------------------------------------------- blur, noise


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample with its own Gaussian ``sigma`` (N,) in pixels (<= 0: unchanged).

    Separable convolution with a reflected border, kernel truncated at 2 sigma; samples
    that share a sigma are blurred together (far faster on a CPU than one grouped
    convolution with a kernel per sample).
    """
    n, c, h, w = x.shape
    out = x.clone()
    sig = sigma.detach().to("cpu", torch.float64)
    for value in torch.unique(sig):
        v = float(value)
        if v <= 0:
            continue
        idx = (sig == value).nonzero().flatten().to(x.device)
        radius = max(1, int(math.ceil(2 * v)))  # truncated at 2 sigma (95% of the mass)
        if radius >= min(h, w):
            radius = min(h, w) - 1
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / v) ** 2)
        k = (k / k.sum()).tolist()
        p = F.pad(x[idx], (radius, radius, radius, radius), mode="reflect")
        # separable, as shifted multiply-adds (4x faster than conv2d for these small kernels)
        y = p[..., :, 0:w] * k[0]
        for i in range(1, len(k)):
            y.add_(p[..., :, i : i + w], alpha=k[i])
        z = y[..., 0:h, :] * k[0]
        for i in range(1, len(k)):
            z.add_(y[..., i : i + h, :], alpha=k[i])
        out[idx] = z
    return out


def add_noise(x: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add Gaussian noise with per-sample ``std`` (N,) in intensity units."""
    noise = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x), dtype=torch.float32)
    return x + noise.to(x.device, x.dtype) * std.to(x).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- fused forms


def _dihedral_matrices(k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) maps of output to input normalised coordinates for :func:`dihedral`."""
    # torch.rot90(x, 1, dims=(-2, -1)) turns counter-clockwise: out[i, j] = in[j, W-1-i].
    c = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[k.cpu()]
    s = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[k.cpu()]
    m = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (N, 2, 2) on (x, y)
    f = torch.where(flip.cpu(), -1.0, 1.0).to(torch.float64)
    m[:, :, 0] = m[:, :, 0] * f[:, None]  # flip the output's x before rotating back
    return m


def _geometry(x: torch.Tensor, k: torch.Tensor, flip: torch.Tensor, zoom: torch.Tensor | None) -> torch.Tensor:
    """Quarter turns, flips and (optional) zoom in one pass.

    Without zoom the pixels are moved exactly (:func:`dihedral`);
    with zoom one bilinear ``grid_sample`` does all three.
    """
    if zoom is None:
        return dihedral(x, k, flip)
    m = (_dihedral_matrices(k, flip) / zoom.to(torch.float64).cpu().view(-1, 1, 1)).to(x.device, x.dtype)
    return F.grid_sample(
        x, _linear_grid(m, x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _linear_grid(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid`` for linear maps ``m`` (N, 2, 2) without translation (align_corners=False).

    Broadcast multiply-adds instead of affine_grid's batched matmul with an inner size of 3.
    """
    xs = ((torch.arange(w, device=m.device, dtype=m.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=m.device, dtype=m.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    gx = m[:, 0, 0].view(-1, 1, 1) * xs + m[:, 0, 1].view(-1, 1, 1) * ys
    gy = m[:, 1, 0].view(-1, 1, 1) * xs + m[:, 1, 1].view(-1, 1, 1) * ys
    return torch.stack([gx, gy], -1)


def _hed_affine(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """:func:`hed_jitter` as one per-sample 3x3 map of optical densities (log, bmm, exp)."""
    n, c, h, w = x.shape
    m_in = _HED_FROM_RGB.to(x.device, torch.float64)  # od (row) @ m_in = hed
    m_out = _RGB_FROM_HED.to(x.device, torch.float64)  # hed @ m_out = od
    a = alpha.to(x.device, torch.float64)
    # od' = od @ (m_in diag(a) m_out) + beta @ m_out, as column maps: A = (...)^T
    maps = torch.einsum("ij,nj,jk->nki", m_in, a, m_out)  # (N, 3, 3), acting on column od
    bias = (beta.to(x.device, torch.float64) @ m_out) * _LOG_ADJUST  # in log-intensity units
    logx = torch.log(x.clamp_min(_EPS))
    return torch.exp_(_apply_3x3(logx, maps.to(x.dtype), bias.to(x.dtype)))


def _apply_3x3(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample affine colour map: out[n, i] = sum_j a[n, i, j] x[n, j] + t[n, i].

    ``x`` (N, 3, H, W), ``a`` (N, 3, 3), ``t`` (N, 3); three fused multiply-adds over the
    image, much faster on a CPU than a batched matmul with an inner size of 3.
    """
    y = a[:, :, 0, None, None] * x[:, 0:1] + t[:, :, None, None]
    y.addcmul_(a[:, :, 1, None, None], x[:, 1:2])
    return y.addcmul_(a[:, :, 2, None, None], x[:, 2:3])


def _colour_affine(
    x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor, turns: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue (in that order) as one affine colour map per sample.

    Equal to the four ``adjust_*`` functions applied one after another (all are affine in
    RGB; contrast's mean grey is carried through the composition).
    """
    n, c, h, w = x.shape
    dd = torch.float64
    wv = torch.tensor(_GREY, dtype=dd)
    eye = torch.eye(3, dtype=dd).expand(n, 3, 3)
    ones = torch.ones(3, dtype=dd)
    m0 = x.mean(dim=(-2, -1)).to("cpu", dd)  # (N, 3) mean colour
    b, ct, s = (v.to("cpu", dd).view(-1, 1, 1) for v in (brightness, contrast, saturation))
    a = b * eye
    t = torch.zeros(n, 3, dtype=dd)
    mu = (torch.einsum("nij,nj->ni", a, m0) + t) @ wv  # (N,) mean grey after brightness
    a = ct * a
    t = ct[:, :, 0] * t + ((1 - ct[:, 0, 0]) * mu)[:, None] * ones
    sat = s * eye + (1 - s) * torch.outer(ones, wv)
    a, t = sat @ a, torch.einsum("nij,nj->ni", sat, t)
    angle = turns.to("cpu", dd) * (2 * math.pi)
    rot = torch.zeros(n, 3, 3, dtype=dd)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    hue = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    a, t = hue @ a, torch.einsum("nij,nj->ni", hue, t)
    return _apply_3x3(x, a.to(x.device, x.dtype), t.to(x.device, x.dtype))


# ----------------------------------------------------------------------------- all together


def augment(
    x: torch.Tensor, config: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a batch: float RGB (N, 3, H, W) in [0, 1] -> same shape, clipped to [0, 1].

    Draws one setting per sample from ``generator`` (which must live on ``x``'s device,
    or be ``None`` for the global generator).  ``config.strength == 0`` returns ``x``.
    The operations are fused (one resampling, one stain map, one colour map) but equal
    the individual functions of this module applied in the order of the module docstring.
    """
    _check(x)
    s = float(config.strength)  # at least 0: checked when the config was made
    if s == 0 or x.shape[0] == 0:
        return x
    n = x.shape[0]
    gd = _gen_device(generator, x)
    k = (
        torch.randint(0, 4, (n,), generator=generator, device=gd)
        if config.rot90
        else torch.zeros(n, dtype=torch.long, device=gd)
    )
    flip = (
        torch.rand(n, generator=generator, device=gd) < 0.5
        if config.flips
        else torch.zeros(n, dtype=torch.bool, device=gd)
    )
    zoom = None
    if config.scale > 0:
        a = min(config.scale * s, 0.9)
        zoom = _uniform(n, 1 - a, 1 + a, x, generator)
    out = x
    if config.rot90 or config.flips or zoom is not None:
        if x.shape[-1] != x.shape[-2] and config.rot90:
            raise ValueError(f"90-degree rotations need square patches, got {tuple(x.shape[-2:])}")
        out = _geometry(out, k.cpu(), flip.cpu(), zoom)
    if config.hed_scale > 0 or config.hed_shift > 0:
        a, b = config.hed_scale * s, config.hed_shift * s
        alpha = _uniform(3 * n, 1 - a, 1 + a, out, generator).view(n, 3)
        beta = _uniform(3 * n, -b, b, out, generator).view(n, 3)
        out = _hed_affine(out, alpha, beta)
    ones = torch.ones(n)
    r = (min(config.brightness * s, 0.95), min(config.contrast * s, 0.95), min(config.saturation * s, 1.0))
    br, ct, sa = (_uniform(n, 1 - v, 1 + v, out, generator) if v > 0 else ones for v in r)
    hue = _uniform(n, -config.hue * s, config.hue * s, out, generator) if config.hue > 0 else torch.zeros(n)
    out = _colour_affine(out, br, ct, sa, hue).clamp_(0, 1)
    if config.blur_sigma > 0 and config.blur_p > 0:
        # Four sigma levels (1/4 .. 4/4 of the maximum) keep the blur to four convolutions.
        level = torch.randint(1, 5, (n,), generator=generator, device=gd).cpu().to(torch.float64)
        on = (torch.rand(n, generator=generator, device=gd) < config.blur_p).cpu()
        sigma = torch.where(on, level / 4 * config.blur_sigma * s, torch.zeros(n, dtype=torch.float64))
        if bool(on.any()):
            out = gaussian_blur(out, sigma)
    if config.noise > 0 and config.noise_p > 0:
        on = (torch.rand(n, generator=generator, device=gd) < config.noise_p).cpu()
        std = _uniform(n, 0, config.noise * s, out, generator)
        if bool(on.any()):
            idx = on.nonzero().flatten().to(out.device)
            out[idx] = add_noise(out[idx], std[idx.to(std.device)], generator)
    return out.clamp_(0, 1)


class ColorAugment(torch.nn.Module):
    """:func:`augment` as a module: active in training mode, identity in eval mode.

    Holds its own generator (seeded by ``seed``) on the CPU; samples draw their settings
    there and the pixel work runs on ``x``'s device.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(int(self.seed))
        return self._generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return augment(x, self.config, self._gen(x.device))

    def extra_repr(self) -> str:
        return f"strength={self.config.strength}"
