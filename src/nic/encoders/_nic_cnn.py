"""``nic-cnn``: the patch encoder architecture of the published NIC weights.

Input 128 x 128 RGB at 0.5 um/px, average-pooled 2 x 2 to 64 x 64 and scaled to [-1, 1];
``depth`` blocks of [Conv 3x3, ``width`` filters, stride 2, 'valid' padding ->
LeakyReLU(0.2) -> BatchNorm(eps 1e-3, Keras momentum 0.8 = torch momentum 0.2)];
flatten in Keras's channels-last order (so Keras Dense kernels load unchanged); Dense
``code_size``, linear.  With the defaults the flattened map is 3 x 3 x 128 = 1152.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._layers import Normalize, sum_pool_uint8
from nic.encoders._registry import register_encoder
from nic.errors import EncoderError

__all__ = ["NicPatchEncoder", "FusedNicPatchEncoder", "Uint8NicPatchEncoder", "nic_cnn"]


def _valid_out(size: int, kernel: int = 3, stride: int = 2) -> int:
    """Output length of a 'valid' convolution along one axis (pixels)."""
    return (size - kernel) // stride + 1


class NicPatchEncoder(nn.Module):
    """The NIC patch encoder: float RGB in [0, 1] (N, 3, P, P) -> codes (N, code_size).

    Registered as the encoder ``nic-cnn``; the slide-level model of the same registered
    name is :class:`nic.learn.models.NicSlideCNN`.

    ``pool`` is the input average-pooling factor (2 in the reference: 128 px -> 64 px);
    ``mean``/``std`` normalise after pooling ((x - 0.5) / 0.5 maps [0, 1] to [-1, 1]).
    """

    def __init__(
        self,
        code_size: int = 128,
        width: int = 128,
        depth: int = 4,
        patch_size: int = 128,
        pool: int = 2,
        negative_slope: float = 0.2,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.2,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        if patch_size % pool:
            raise EncoderError(f"nic-cnn patch_size {patch_size} is not a multiple of pool {pool}; change either")
        side = patch_size // pool
        for _ in range(depth):
            side = _valid_out(side)
        if side < 1:
            raise EncoderError(
                f"nic-cnn patch_size {patch_size} is too small for pool {pool} and depth {depth}; "
                "use a larger patch_size or a smaller depth"
            )
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.normalize = Normalize(mean, std)
        blocks = []
        in_chans = 3
        for _ in range(depth):
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv2d(in_chans, width, kernel_size=3, stride=2, padding=0),
                        act=nn.LeakyReLU(negative_slope),
                        bn=nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum),
                    )
                )
            )
            in_chans = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_shape = (width, side, side)  # (C, H, W) before the flatten
        self.head = nn.Linear(width * side * side, code_size)
        self.num_features = int(code_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, P, P) in [0, 1] -> feature map (N, width, s, s) before the flatten."""
        return self.blocks(self.normalize(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        # Keras flattens channels-last: (N, H, W, C) order.
        return self.head(f.permute(0, 2, 3, 1).flatten(1))

    def fused_for_inference(self) -> FusedNicPatchEncoder:
        """A frozen copy for inference with the normalisation and batch norms folded in."""
        return FusedNicPatchEncoder(self)


class FusedNicPatchEncoder(nn.Module):
    """Inference-only :class:`NicPatchEncoder` (same input and output, about 1e-6 apart).

    'valid' convolutions see no zero padding, so a per-channel affine map in front of a
    convolution or of the dense layer folds exactly into its weights: the input
    normalisation into the first convolution, each batch norm (eval statistics, after the
    LeakyReLU) into the next convolution, the last one into the dense layer.  This removes
    the elementwise passes that take about a quarter of the time on a CPU.  Not trainable.
    """

    inference_only = True  # save_encoder refuses it: save the trainable encoder instead

    def __init__(self, src: NicPatchEncoder) -> None:
        super().__init__()
        self.pool = copy.deepcopy(src.pool)
        self.feature_shape = src.feature_shape
        self.num_features = src.num_features
        first = src.blocks[0]
        self.act = nn.LeakyReLU(first.act.negative_slope, inplace=True)
        scale = src.normalize.inv_std.flatten().double()
        shift = -src.normalize.mean.flatten().double() * scale
        convs = []
        for block in src.blocks:
            conv = block.conv
            w = conv.weight.detach().double()
            b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=2, padding=0).to(w.device)
            fused.weight.data = (w * scale.view(1, -1, 1, 1)).float()
            fused.bias.data = (b + (w.sum(dim=(2, 3)) * shift.view(1, -1)).sum(dim=1)).float()
            convs.append(fused)
            bn = block.bn
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.detach().double() - bn.running_mean.double() * scale
        self.convs = nn.ModuleList(convs)
        head = src.head
        w = head.weight.detach().double()  # (code, H*W*C) in channels-last order: channel = k % C
        reps = w.shape[1] // scale.numel()
        self.head = nn.Linear(head.in_features, head.out_features).to(w.device)
        self.head.weight.data = (w * scale.repeat(reps).view(1, -1)).float()
        self.head.bias.data = (head.bias.detach().double() + w @ shift.repeat(reps)).float()
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.permute(0, 2, 3, 1).flatten(1))

    def fold_uint8_input(self) -> Uint8NicPatchEncoder:
        """This encoder on uint8 RGB (N, 3, P, P), the 1/255 folded into the first convolution."""
        return Uint8NicPatchEncoder(self)


class Uint8NicPatchEncoder(nn.Module):
    """:class:`FusedNicPatchEncoder` on uint8 RGB (N, 3, P, P), channels-last; same codes to ~1e-6.

    The average pool is linear and the first convolution 'valid', so ``conv(pool(x / 255))``
    is ``conv'(sum_pool(x))`` with the weights divided by ``255 * pool**2``: the pool is
    summed on the integers (:func:`~nic.encoders._layers.sum_pool_uint8`) and converted to
    float once, a quarter of the pixels.  Shares the other layers with the fused encoder.
    """

    inference_only = True

    def __init__(self, src: FusedNicPatchEncoder) -> None:
        super().__init__()
        pool = src.pool.kernel_size if isinstance(src.pool, nn.AvgPool2d) else 1
        self.k = int(pool[0] if isinstance(pool, tuple) else pool)
        first = src.convs[0]
        self.first = copy.deepcopy(first)
        self.first.weight.data = (first.weight.detach().double() / (255.0 * self.k * self.k)).float()
        self.first.weight.data = self.first.weight.data.contiguous(memory_format=torch.channels_last)
        self.convs = nn.ModuleList(list(src.convs)[1:])
        self.act, self.head = src.act, src.head
        self.feature_shape, self.num_features = src.feature_shape, src.num_features
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.first(sum_pool_uint8(x, self.k)))
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.permute(0, 2, 3, 1).flatten(1))


@register_encoder(
    "nic-cnn",
    description="NIC encoder (Tellez et al.): 128 px at 0.5 um/px, 4 strided convs, code 128; random init",
    tiny={"code_size": 8, "width": 4, "depth": 2, "patch_size": 32},
)
def nic_cnn(
    code_size: int = 128,
    width: int = 128,
    depth: int = 4,
    patch_size: int = 128,
    pool: int = 2,
    negative_slope: float = 0.2,
    bn_eps: float = 1e-3,
    bn_momentum: float = 0.2,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> Encoder:
    """The NIC encoder architecture, randomly initialised (published weights: load the .h5)."""
    arch_args = {
        "code_size": int(code_size),
        "width": int(width),
        "depth": int(depth),
        "patch_size": int(patch_size),
        "pool": int(pool),
        "negative_slope": float(negative_slope),
        "bn_eps": float(bn_eps),
        "bn_momentum": float(bn_momentum),
    }
    module = NicPatchEncoder(**arch_args, mean=mean, std=std)
    module = module.to(memory_format=torch.channels_last).eval()
    config = EncoderConfig(
        architecture="nic-cnn",
        code_size=int(code_size),
        patch_size=int(patch_size),
        mpp=0.5,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        arch_args=arch_args,
    )
    return Encoder(module, config)
