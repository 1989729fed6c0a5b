"""``mean-rgb``: the paper's floor, a patch's code is its mean colour (C = 3).

It has no weights by design, so it is never a random initialisation: its checksum is the
sha256 of its configuration (``"mean-rgb:" + JSON of its arguments``), the same on every
build, and compression and probes accept it without ``--random-init``.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._layers import Normalize
from nic.encoders._registry import register_encoder

__all__ = ["MeanRgb", "mean_rgb"]


class MeanRgb(nn.Module):
    """Float RGB (N, 3, P, P) -> (N, 3): the per-channel mean of ``(x - mean) / std``.

    With the default ``mean`` 0 and ``std`` 1 the code is the mean colour in [0, 1].
    """

    weightless = True  # nothing to learn or load

    def __init__(
        self, mean: tuple[float, float, float] = (0.0, 0.0, 0.0), std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x).mean(dim=(2, 3))


def config_checksum(config: EncoderConfig) -> str:
    """The fixed identity of a weightless encoder: sha256 of its architecture, arguments and normalisation."""
    text = json.dumps(
        {"architecture": config.architecture, "arch_args": config.arch_args, "mean": config.mean, "std": config.std},
        sort_keys=True,
    )
    return hashlib.sha256(f"{config.architecture}:{text}".encode()).hexdigest()


@register_encoder(
    "mean-rgb",
    description="mean colour of the patch (C = 3): the paper's baseline; no weights needed",
    tiny={"patch_size": 16},
)
def mean_rgb(
    patch_size: int = 128,
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
    std: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Encoder:
    """Mean RGB of each patch in [0, 1]: the paper's floor; weightless by design."""
    config = EncoderConfig(
        architecture="mean-rgb",
        code_size=3,
        patch_size=int(patch_size),
        mpp=0.5,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        arch_args={"patch_size": int(patch_size)},
    )
    checksum = config_checksum(config)
    return Encoder(
        MeanRgb(config.mean, config.std).eval(), config, checksum, {"weights": "none by design", "sha256": checksum}
    )
