"""``concat``: several encoders side by side; a patch's code is their codes concatenated.

Built from encoders with :func:`concat_encoders` (same patch size and um/px), saved and
loaded like any encoder: the config lists every part's own config (so each part is rebuilt
with its architecture and normalisation), the weights hold each part's tensors under
``parts.<i>.``, and ``source["parts"]`` records each part's name, code range, checksum and
source (the provenance of every slice of the code).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._registry import create_encoder, register_encoder
from nic.errors import EncoderError

__all__ = ["ConcatModule", "concat_encoders"]


class ConcatModule(nn.Module):
    """Float RGB (N, 3, P, P) -> (N, sum of the parts' code sizes): each part's code, in order."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], 1)

    def fused_for_inference(self) -> nn.Module:
        """Each part's fused inference copy, where it has one."""
        fused = [
            p.fused_for_inference() if callable(getattr(p, "fused_for_inference", None)) else p for p in self.parts
        ]
        module = ConcatModule(fused).eval()
        module.inference_only = True  # type: ignore[assignment]  # save_encoder refuses it
        return module

    def fold_uint8_input(self) -> nn.Module | None:
        """Each part on uint8 RGB, in its folded form where it has one (see
        :func:`nic.encoders._layers.uint8_form`); None when no part has one."""
        from nic.encoders._layers import Uint8Input, uint8_form

        parts = [uint8_form(p) for p in self.parts]
        if all(isinstance(p, Uint8Input) and p.scale for p in parts):
            return None
        module = ConcatModule(parts).eval()
        module.inference_only = True  # type: ignore[assignment]
        return module


@register_encoder(
    "concat",
    description="several encoders side by side, codes concatenated (build one with nic concat-encoders)",
    tiny={"parts": [{"architecture": "mean-rgb", "code_size": 3, "patch_size": 16}] * 2},
)
def concat(
    parts: list[dict[str, Any]],
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Encoder:
    """Encoders side by side, codes concatenated (``parts``: each part's EncoderConfig as JSON)."""
    if not parts:
        raise EncoderError("concat needs at least one part")
    built = []
    for d in parts:
        cfg = EncoderConfig.from_json({"code_size": 0, **d})
        enc = create_encoder(
            cfg.architecture, mean=cfg.mean, std=cfg.std, mpp=cfg.mpp, encoder_name=cfg.name or None, **cfg.arch_args
        )
        built.append(enc)
    first = built[0]
    for enc in built[1:]:
        if enc.patch_size != first.patch_size or abs(enc.mpp - first.mpp) > 1e-9:
            raise EncoderError(
                f"concatenated encoders must read the same patches: {first.name} takes {first.patch_size} px at "
                f"{first.mpp} um/px, {enc.name} {enc.patch_size} px at {enc.mpp} um/px"
            )
    config = EncoderConfig(
        architecture="concat",
        code_size=sum(e.code_size for e in built),
        patch_size=first.patch_size,
        mpp=first.mpp,
        mean=(0.0, 0.0, 0.0),  # each part normalises its own input; nothing happens at this level
        std=(1.0, 1.0, 1.0),
        arch_args={"parts": [e.config.to_json() for e in built]},
        name="+".join(e.name for e in built),
    )
    return Encoder(ConcatModule([e.module for e in built]), config)


def concat_encoders(encoders: list[Encoder]) -> Encoder:
    """One encoder whose code is the codes of ``encoders`` concatenated, in order.

    The parts keep their weights; ``checksum`` is the sha256 of the parts' checksums and
    ``source["parts"]`` names each part, its code range ``[start, stop)``, checksum and
    source.  An encoder without weights is refused (:class:`EncoderError`).
    """
    for e in encoders:
        if e.random_init:
            raise EncoderError(f"{e.name} has no weights; concatenate encoders with weights (or mean-rgb)")
    out = concat([e.config.to_json() for e in encoders])
    out.module = ConcatModule([e.module for e in encoders])
    start, parts = 0, []
    for e in encoders:
        parts.append(
            {"name": e.name, "codes": [start, start + e.code_size], "checksum": e.checksum, "source": e.source}
        )
        start += e.code_size
    out.checksum = hashlib.sha256("+".join(e.checksum for e in encoders).encode()).hexdigest()
    out.source = {"format": "concat", "parts": parts, "sha256": out.checksum}
    return out
