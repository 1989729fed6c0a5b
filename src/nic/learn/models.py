"""Slide-level networks over compressed grids, in a registry.

Every model maps ``x`` (B, C, H, W) float codes and ``mask`` (B, H, W) bool tissue to
(B, n_outputs) raw outputs (regression value, logits, or Cox log-risk).

- ``nic-cnn``: the reference CNN (TPAMI 2019) with mask-aware global pooling, plus a
  cell-ratio branch for counts (:class:`CellRatio`);
- ``meanpool``: mean of the tissue codes, then an MLP (ignores the layout);
- ``abmil``: gated attention pooling over the tissue codes (Ilse et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nic._registry import Registry
from nic.errors import DataError, OptionError

__all__ = [
    "nic_cnn_strides",
    "ModelSpec",
    "register_model",
    "create_model",
    "list_models",
    "CellRatio",
    "NicSlideCNN",
    "MeanPool",
    "ABMIL",
]

#: builders ``ModelSpec -> nn.Module`` by model name; an unknown name is an OptionError naming ``model``
_MODELS: Registry[Callable[[ModelSpec], nn.Module]] = Registry("slide model", OptionError, param="model")

#: nic-cnn's global pooling choices
POOLS = ("maxmean", "max", "mean", "attention")


@dataclass(frozen=True)
class ModelSpec:
    """What a builder needs: code size in, outputs, width, dropout, pooling (nic-cnn)."""

    in_channels: int
    n_outputs: int = 1
    width: int = 128
    dropout: float = 0.0
    pool: str = "maxmean"
    input_size: int | None = None  #: crop side in cells; sets how many nic-cnn layers stride
    stem: bool = True  #: nic-cnn: a 1x1 conv + BN + LeakyReLU per cell before the 8 reference layers
    #: nic-cnn: channels of the cell-ratio branch (:class:`CellRatio`); 0: none, the reference
    #: network (and what model.json files written before the branch existed describe)
    ratio_heads: int = 0
    #: nic-cnn: copies of the cell-ratio branch, trained one after the other, whose outputs
    #: are averaged (weights in the ``ratio_weights`` buffer); 1: one branch
    ratio_branches: int = 1


def register_model(name: str) -> Callable[[Callable[[ModelSpec], nn.Module]], Callable[[ModelSpec], nn.Module]]:
    """Decorator adding a builder ``ModelSpec -> nn.Module`` (a function or a model class) under
    ``name``; a name already taken by another builder is an :class:`~nic.errors.OptionError`."""
    return _MODELS.decorator(name)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return _MODELS.names()


def create_model(name: str, spec: ModelSpec) -> nn.Module:
    """Build a registered model; an unknown name is an :class:`~nic.errors.OptionError` listing the registry."""
    return _MODELS.get(name)(spec)


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """v (B, C, N), m (B, N) float -> (B, C); all-background samples use every position."""
    empty = m.sum(1, keepdim=True) == 0
    m = torch.where(empty, torch.ones_like(m), m)
    return (v * m[:, None]).sum(-1) / m.sum(-1)[:, None]


def _masked_max(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    empty = m.sum(1, keepdim=True) == 0
    keep = (m > 0) | empty
    return v.masked_fill(~keep[:, None], float("-inf")).amax(-1)


class SlideNet(nn.Module):
    """Base of the slide models: tissue codes are standardised per channel with the fit
    cohort's statistics (buffers saved with the weights); background cells stay 0."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.register_buffer("code_mean", torch.zeros(in_channels))
        self.register_buffer("code_std", torch.ones(in_channels))

    def zero_last_layer(self, layer: nn.Linear) -> None:
        """Start from output 0 (the mean target, even odds, log-risk 0): zeroed weights and bias."""
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

    def set_code_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-channel mean and standard deviation of the training tissue codes."""
        self.code_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.code_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def standardise(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = (x - self.code_mean[:, None, None]) / self.code_std[:, None, None]
        return z * mask[:, None].to(z.dtype)


class _GatedAttention(nn.Module):
    """Gated attention weights over positions (Ilse et al. 2018): softmax over tissue of
    ``w^T (tanh(V h) * sigmoid(U h))``; h (B, N, C), mask (B, N) bool -> (B, N)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.v = nn.Linear(width, width // 2)
        self.u = nn.Linear(width, width // 2)
        self.w = nn.Linear(width // 2, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        m = mask | (mask.sum(1, keepdim=True) == 0)  # all-background: every position
        return torch.softmax(a.masked_fill(~m, float("-inf")), dim=1)


class CellRatio(nn.Module):
    """Per-cell evidence over a per-cell gate, as a log ratio: "mitoses per tumour cell".

    Two small per-cell MLPs (1x1 convolutions, ``hidden`` units) on the standardised codes
    give, for each of ``heads`` channels k, an evidence ``e_k = softplus(.) >= 0`` and a
    gate ``g_k = sigmoid(.)`` (0 on background); the output is
    ``log(sum g_k e_k / (sum g_k + 1) + 0.01)`` per channel (B, heads).  A ratio of two
    sparse counts is what a global max or mean over convolved features does not compute:
    the 3x3 layers blur a one-cell signal into its neighbours before any pooling.  The +1
    keeps slides with almost no gated cells finite and close to 0 evidence.
    """

    def __init__(self, in_channels: int, heads: int, hidden: int = 32) -> None:
        super().__init__()
        self.evidence = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, heads, 1))
        self.gate = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, heads, 1))

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z (B, C, H, W) standardised codes, mask (B, H, W) -> (B, heads)."""
        e = F.softplus(self.evidence(z))
        g = torch.sigmoid(self.gate(z)) * mask[:, None].to(z.dtype)
        return torch.log((g * e).sum((2, 3)) / (g.sum((2, 3)) + 1.0) + 0.01)

    def reset(self, generator: torch.Generator) -> None:
        """Fresh weights drawn as PyTorch initialises a convolution, from ``generator``."""
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
            _reset_linear(conv, generator)


def _one_branch_state(state: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Weights saved before the ratio branch had copies (``ratio.evidence...``,
    ``ratio_out.weight``) load as copy 0 of one, with weight 1."""
    legacy = False
    for key in [k for k in state if k.startswith((prefix + "ratio.", prefix + "ratio_out."))]:
        head, rest = key[len(prefix) :].split(".", 1)
        if not rest.split(".", 1)[0].isdigit():
            state[f"{prefix}{head}.0.{rest}"] = state.pop(key)
            legacy = True
    if legacy:
        state.setdefault(f"{prefix}ratio_weights", torch.ones(1))


def _reset_linear(layer: nn.Conv2d | nn.Linear, generator: torch.Generator) -> None:
    """Weights and bias uniform in +-1/sqrt(fan_in), PyTorch's default for these layers."""
    bound = 1 / math.sqrt(layer.weight[0].numel())
    with torch.no_grad():
        for t in (layer.weight, layer.bias):
            t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=generator))


class _SepConv(nn.Module):
    """Depthwise 3x3 (stride s) + pointwise 1x1 -> BN -> LeakyReLU -> channel dropout."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.depth = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.point = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout2d(dropout)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.point(self.depth(x)))))


def nic_cnn_strides(input_size: int | None) -> tuple[int, ...]:
    """Strides of the 8 nic-cnn layers for a crop of ``input_size`` cells.

    The reference (crop 400) halves the map in layers 1-6 (ending at ~6 x 6).  Smaller
    crops stride in fewer (leading) layers: ``n = clip(round(6 * log2(size / 16) /
    log2(400 / 16)), 0, 6)``, i.e. no striding at 16 cells, 3 at 64, 6 from 400 on.  On
    16-cell planted grids even one stride-2 first layer lost the cell-scale spatial label
    (AUC ~0.5 versus ~0.98 without).  ``None`` gives the reference strides.
    """
    if input_size is None:
        n = 6
    else:
        n = int(np.clip(np.round(6 * np.log2(max(input_size, 1) / 16) / np.log2(400 / 16)), 0, 6))
    return tuple([2] * n + [1] * (8 - n))


class NicSlideCNN(SlideNet):
    """A per-cell 1x1 embedding (``spec.stem``), 8 depthwise-separable conv layers (stride 2
    in the first ones, see :func:`nic_cnn_strides`), mask-aware global pooling, dense head:
    the convolutional path, which sees layout.  With ``spec.ratio_heads`` > 0 a
    :class:`CellRatio` branch on the codes adds a linear map of its log ratios to the output.

    The tissue mask is max-pooled alongside the features so the pooling only sees
    positions whose receptive field touches tissue; any grid size >= 1 works.

    Training in stages (:attr:`stages`, :meth:`set_stage`, used by ``fit_model``): first the
    ratio branch alone (the convolutional path's output is left out), then the
    convolutional path on what the branch leaves, with the branch frozen.  Trained jointly,
    the convolutional path fitted the training slides faster and its early stopping ended
    training before the branch had learnt (proliferation Spearman 0.80-0.82 on two tuning
    cohorts; in stages 0.92-0.93, see the README's learning section).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.in_channels)
        if spec.pool not in POOLS:
            raise DataError(f"unknown pooling {spec.pool!r}; expected {', '.join(POOLS)}")
        w = spec.width
        strides = nic_cnn_strides(spec.input_size)
        chans = [spec.in_channels] + [w] * len(strides)
        self.stem = None
        if spec.stem:
            # a per-cell embedding before the layers that mix neighbours: a one-cell signal
            # (a mitosis) gets a nonlinearity of its own before it is blurred; Spearman of
            # proliferation on two development cohorts 0.77 -> 0.84 and 0.68 -> 0.80
            self.stem = nn.Sequential(
                nn.Conv2d(spec.in_channels, w, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)
            )
            chans[0] = w
        self.layers = nn.ModuleList(_SepConv(a, b, s, spec.dropout) for a, b, s in zip(chans[:-1], chans[1:], strides))
        self.pool = spec.pool
        feat = 2 * w if spec.pool == "maxmean" else w
        self.attention = _GatedAttention(w) if spec.pool == "attention" else None
        # no batch norm in the dense head (the reference has one): at batch 16 its running
        # statistics lag the training batches, and eval-mode outputs of regression models
        # lost the ranking the training batches had (train Spearman 0.16 vs 0.83 without)
        self.head = nn.Sequential(nn.Linear(feat, w), nn.LeakyReLU(0.2), nn.Linear(w, spec.n_outputs))
        self.zero_last_layer(self.head[-1])
        # the cell-ratio branch (its copies, averaged): a ModuleList of CellRatio and one of
        # their output layers; empty without a branch
        n_branches = spec.ratio_branches if spec.ratio_heads > 0 else 0
        if spec.ratio_heads > 0 and spec.ratio_branches < 1:
            raise DataError(f"`ratio_branches` must be at least 1, got {spec.ratio_branches}")
        self.ratio, self.ratio_out = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_branches):
            self.ratio.append(CellRatio(spec.in_channels, spec.ratio_heads))
            # not zeroed like the head: with a zero output layer the branch gets no gradient,
            # and its near-constant initial ratios barely move that layer (starts sat on their
            # first plateau until early stopping ended them)
            self.ratio_out.append(nn.Linear(spec.ratio_heads, spec.n_outputs))
            nn.init.zeros_(self.ratio_out[-1].bias)
        self.register_buffer("ratio_weights", torch.full((n_branches,), 1.0 / n_branches) if n_branches else None)
        self.stage = "all"
        self.branch: int | None = None  #: in the ratio stage, the one copy that trains (None: all, averaged)
        self._register_load_state_dict_pre_hook(_one_branch_state)

    @property
    def stages(self) -> tuple[str, ...]:
        """Training stages in order: ("ratio", "conv") with the ratio branch, else ("all",)."""
        return ("ratio", "conv") if len(self.ratio) else ("all",)

    def _ratio_parameters(self, branch: int | None = None) -> set[int]:
        mods = [m for i, pair in enumerate(zip(self.ratio, self.ratio_out)) if branch in (None, i) for m in pair]
        return {id(p) for mod in mods for p in mod.parameters()}

    def set_stage(self, stage: str, branch: int | None = 0) -> None:
        """Train only the ratio branch ("ratio": copy ``branch`` alone, its output the
        network's; None: every copy, averaged; the convolutional path's output left out),
        only the convolutional path ("conv"), or everything ("all"; also for inference)."""
        if stage not in ("ratio", "conv", "all") or (stage != "all" and not len(self.ratio)):
            raise OptionError(f"`stage` {stage!r} is not one of this network's stages {', '.join(self.stages)}")
        if stage == "ratio" and branch is not None and not 0 <= branch < len(self.ratio):
            raise OptionError(f"`branch` {branch} is not a copy of the ratio branch (0-{len(self.ratio) - 1})")
        ratio = self._ratio_parameters(branch if stage == "ratio" else None)
        for p in self.parameters():
            p.requires_grad_(stage == "all" or (id(p) in ratio) == (stage == "ratio"))
        self.stage = stage
        self.branch = branch if stage == "ratio" else None

    def restart_stage(self, stage: str, generator: torch.Generator, branch: int = 0) -> None:
        """Fresh weights for copy ``branch`` of the ratio branch and its output layer (bias 0),
        drawn from ``generator``, for another start of the ratio stage."""
        if stage != "ratio" or not len(self.ratio):
            raise OptionError(f"only the ratio stage restarts; got `stage` {stage!r}")
        self.ratio[branch].reset(generator)
        _reset_linear(self.ratio_out[branch], generator)
        nn.init.zeros_(self.ratio_out[branch].bias)

    def ratio_output(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ratio branch's output on standardised codes: the weighted mean of its copies
        (only the training copy in the ratio stage with a ``branch``)."""
        if self.stage == "ratio" and self.branch is not None:
            return self.ratio_out[self.branch](self.ratio[self.branch](z, mask))
        outs = [w * out(r(z, mask)) for w, r, out in zip(self.ratio_weights, self.ratio, self.ratio_out) if w != 0]
        return torch.stack(outs).sum(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.standardise(x, mask)
        if not len(self.ratio):
            return self._conv_path(x, mask)
        r = self.ratio_output(x, mask)
        return r if self.stage == "ratio" else r + self._conv_path(x, mask)

    def _conv_path(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Standardised codes -> the convolutional path's output."""
        m = mask[:, None].float()
        if self.stem is not None:
            x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
            if layer.stride > 1:
                m = F.max_pool2d(m, 3, layer.stride, 1)
        v, mm = x.flatten(2), m.flatten(1)
        if self.attention is not None:
            a = self.attention(v.transpose(1, 2), mm > 0)
            z = (v * a[:, None]).sum(-1)
        elif self.pool == "max":
            z = _masked_max(v, mm)
        elif self.pool == "mean":
            z = _masked_mean(v, mm)
        else:
            z = torch.cat([_masked_max(v, mm), _masked_mean(v, mm)], 1)
        return self.head(z)


class MeanPool(SlideNet):
    """Mean of the tissue codes -> Linear/LeakyReLU/Dropout -> Linear."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.in_channels)
        w = spec.width
        self.mlp = nn.Sequential(
            nn.Linear(spec.in_channels, w), nn.LeakyReLU(0.2), nn.Dropout(spec.dropout), nn.Linear(w, spec.n_outputs)
        )
        self.zero_last_layer(self.mlp[-1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.standardise(x, mask)
        return self.mlp(_masked_mean(x.flatten(2), mask.flatten(1).float()))


class ABMIL(SlideNet):
    """Gated attention MIL: h = ReLU(W x); a = softmax_tissue(w^T (tanh(V h) * sigmoid(U h))); out = f(sum a h)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.in_channels)
        w = spec.width
        self.embed = nn.Sequential(nn.Linear(spec.in_channels, w), nn.ReLU(), nn.Dropout(spec.dropout))
        self.attention = _GatedAttention(w)
        self.out = nn.Linear(w, spec.n_outputs)
        self.zero_last_layer(self.out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.standardise(x, mask)
        h = self.embed(x.flatten(2).transpose(1, 2))  # (B, N, w)
        a = self.attention(h, mask.flatten(1))  # (B, N)
        return self.out((a[..., None] * h).sum(1))


register_model("nic-cnn")(NicSlideCNN)
register_model("meanpool")(MeanPool)
register_model("abmil")(ABMIL)
