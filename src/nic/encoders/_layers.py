"""Small building blocks shared by the encoder builders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "NormalizedEncoder"]


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
