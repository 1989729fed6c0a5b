"""Per-cell evidence maps of a trained run on a compressed slide.

A map gives every tissue cell of the store's grid a number saying how much that cell
pushed the model's output up (positive) or down (negative); background cells are NaN.
It is computed on the grid, so a whole slide takes a few forward and backward passes of
the slide model, not a pass over the pixels.

Methods (``"auto"``: ``contribution`` for abmil, ``input-gradient`` for the others):

- ``input-gradient`` (any model): gradient x (code - training mean) summed over channels,
  a first-order share of each cell at the grid's full resolution (exact for meanpool's
  linear part);
- ``gradcam`` (nic-cnn): Grad-CAM on the last spatial layer, kept signed (evidence for a
  lower output is shown, not clipped away), resampled bilinearly to the crop's cells; only
  for a nic-cnn without a cell-ratio branch (``ratio_heads`` 0), whose share it would miss;
- ``contribution`` (abmil): each cell's exact share of the output, attention weight x the
  output layer applied to the cell's embedding (the shares sum to the output less its bias);
- ``attention`` (abmil): the attention weights alone (where the model looked, unsigned).

Why input x gradient by default for nic-cnn: on known answers it sat closer to the truth
than Grad-CAM (``benchmarks/heatmap_truth.py``; median per-slide AUC on the demo cohort of
seed 0: survival heat on tumour 0.998 vs 0.969, growth-pattern |heat| on the tumour rim
0.854 vs 0.802; planted spatial label 0.87 vs 0.84), because Grad-CAM's map comes from
the strided last layer and is blurred back up.

Every view the run's predictions average over is explained and averaged the same way:
each fold model, and each of the 8 dihedral variants (each view's map is rotated back to
the slide's orientation).  Slides larger than the model's crop are covered by windows of
the crop's size overlapping by half, averaged where they overlap.  Regression maps are in
the units of the transformed target (each fold's scaling applied): the target's own units
with ``target_transform`` "none", log units with "log", normal scores with "rank" (a run
decides "auto" once for its cohort, so every fold's map is in the same units).  Survival
maps are in standardised log-risk units, each fold's scale applied as in its predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from nic.errors import OptionError, check_choice
from nic.learn.data import SlideSource, dihedral, dihedral_inverse, sample_crop_origin
from nic.learn.run import Run
from nic.learn.slide_model import SlideModel

__all__ = ["METHODS", "Heatmap", "default_method", "output_names", "slide_heatmap", "window_origins"]

METHODS = ("auto", "gradcam", "contribution", "attention", "input-gradient")
_DEFAULT = {"nic-cnn": "input-gradient", "abmil": "contribution", "meanpool": "input-gradient"}
_ALLOWED = {"gradcam": ("nic-cnn",), "contribution": ("abmil",), "attention": ("abmil",)}


@dataclass
class Heatmap:
    """One map: ``values`` (H, W) float64 on the store's grid, NaN on background."""

    slide_id: str
    values: np.ndarray
    tissue: np.ndarray
    method: str
    output: str  #: which output it explains: prediction, probability, risk or prob_<class>
    signed: bool  #: False for attention weights (all >= 0)


def default_method(model: str, method: str = "auto") -> str:
    """The method for ``model``; :class:`OptionError` when ``method`` does not apply to it."""
    check_choice("method", method, METHODS)
    if method == "auto":
        return _DEFAULT.get(model, "input-gradient")
    if method in _ALLOWED and model not in _ALLOWED[method]:
        raise OptionError(
            f"`method` {method} needs a {' or '.join(_ALLOWED[method])} model; this run's is {model!r}: use another "
            "`method`, or auto"
        )
    return method


def output_names(run: Run) -> list[str]:
    """The outputs a map can explain: one per class for multiclass, else one."""
    task = run.task
    if task == "multiclass":
        return [f"prob_{c}" for c in run.models[0].classes or []]
    return [{"regression": "prediction", "binary": "probability", "survival": "risk"}[task]]


def window_origins(grid: tuple[int, int], crop: int, weights: np.ndarray) -> list[tuple[int, int]]:
    """Top-left cells of the windows that cover the grid: the centred window (as in
    prediction) when the grid fits in one crop, else windows overlapping by half."""
    h, w = grid
    if h <= crop and w <= crop:
        return [sample_crop_origin(weights, crop, None, center=(h // 2, w // 2))]

    def starts(n: int) -> list[int]:
        if n <= crop:
            return [-((crop - n) // 2)]
        s = list(range(0, n - crop + 1, max(1, crop // 2)))
        return s if s[-1] == n - crop else [*s, n - crop]

    return [(y, x) for y in starts(h) for x in starts(w)]


def _gradcam(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    acts: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        acts.append(out)

    handle = net.layers[-1].register_forward_hook(keep)
    try:
        out = net(x, mask)
        out[:, k].sum().backward()
    finally:
        handle.remove()
    a = acts[0]
    weights = a.grad.mean(dim=(2, 3), keepdim=True)  # type: ignore[union-attr]
    cam = (weights * a).sum(1, keepdim=True)  # (B, 1, h', w')
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _input_gradient(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    net(x, mask)[:, k].sum().backward()
    centred = x.detach() - net.code_mean[None, :, None, None]
    return (x.grad * centred).sum(1) * mask  # type: ignore[operator]


def _abmil(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, k: int, attention_only: bool) -> torch.Tensor:
    b, _, h, w = x.shape
    z = net.standardise(x, mask)
    emb = net.embed(z.flatten(2).transpose(1, 2))  # (B, N, width)
    a = net.attention(emb, mask.flatten(1))  # (B, N)
    if attention_only:
        return a.reshape(b, h, w)
    share = a * (emb @ net.out.weight[k])  # (B, N): sums to output k less the bias
    return share.reshape(b, h, w)


def _view_maps(model: SlideModel, x: torch.Tensor, mask: torch.Tensor, k: int, method: str) -> np.ndarray:
    net = model.net
    net.zero_grad(set_to_none=True)
    if method == "gradcam":
        m = _gradcam(net, x, mask, k)
    elif method == "input-gradient":
        m = _input_gradient(net, x, mask, k)
    else:
        with torch.no_grad():
            m = _abmil(net, x, mask, k, method == "attention")
    return m.detach().double().cpu().numpy()


def model_map(model: SlideModel, src: SlideSource, method: str, k: int = 0, variants: bool = True) -> np.ndarray:
    """(H, W) map of output ``k`` of one model over one store (NaN on background)."""
    net = model.net
    net.eval()
    dev = next(net.parameters()).device
    h, w = src.grid_shape
    crop = model.crop
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    ks = range(8) if variants else [0]
    for y0, x0 in window_origins((h, w), crop, src.weights):
        xs, ms = [], []
        for v in ks:
            f, m = src.crop(y0, x0, crop, v if src.variants == 8 else 0)
            xs.append(dihedral(f, v))
            ms.append(dihedral(m, v))
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).to(dev)
        mk = torch.from_numpy(np.ascontiguousarray(np.stack(ms))).to(dev)
        with torch.enable_grad():
            maps = _view_maps(model, x, mk, k, method)
        back = np.mean([dihedral_inverse(maps[i], v) for i, v in enumerate(ks)], axis=0)
        ya, yb, xa, xb = max(y0, 0), min(y0 + crop, h), max(x0, 0), min(x0 + crop, w)
        total[ya:yb, xa:xb] += back[ya - y0 : yb - y0, xa - x0 : xb - x0]
        count[ya:yb, xa:xb] += 1
    out = total / np.maximum(count, 1)
    if model.task == "regression" and method != "attention":
        out = out * model.target.std  # in the (transformed) target's units
    elif model.task == "survival" and method != "attention" and model.risk_scale is not None:
        out = out / model.risk_scale[1]  # in the fold's standardised log-risk units, as its predictions
    out[~src.tissue] = np.nan
    return out


def slide_heatmap(run: Run, src: SlideSource, method: str = "auto", output: str | None = None) -> Heatmap:
    """The map of ``output`` (default: the run's only output, or the first class) of
    ``run`` on ``src``, averaged over the run's fold models and dihedral variants."""
    model0 = run.models[0]
    method = default_method(model0.name, method)
    if method == "gradcam" and getattr(model0.spec, "ratio_heads", 0) > 0:
        # Grad-CAM sees only the convolutional path; the branch's share would be missing
        raise OptionError(
            "`method` gradcam explains only nic-cnn's convolutional path, and this run's nic-cnn also has a"
            " cell-ratio branch (ratio_heads > 0): use input-gradient (or auto)"
        )
    names = output_names(run)
    output = output or names[0]
    if output not in names:
        raise OptionError(f"`output` must be one of {', '.join(names)} for this run (got {output!r})")
    k = names.index(output) if run.task == "multiclass" else 0
    variants = bool(run.config.get("fit", {}).get("tta_variants", True))
    maps = [model_map(m, src, method, k, variants) for m in run.models]
    return Heatmap(src.slide_id, np.mean(maps, axis=0), src.tissue, method, output, method != "attention")


def heatmaps(
    run: Run, sources: Sequence[SlideSource], method: str = "auto", output: str | None = None
) -> list[Heatmap]:
    """:func:`slide_heatmap` for every source."""
    return [slide_heatmap(run, s, method, output) for s in sources]
