"""``timm``: any timm backbone as a patch encoder (pooled features, ``num_classes=0``).

Spec form: ``timm:<model>[?key=value&...]``; the code length is the length of what the
model returns for one patch (measured once with a dummy forward pass: a model's
``num_features`` is the width before any pre-logits head, e.g. 576 for MobileNetV3-Small
whose pooled output after its conv head has 1,024); mean/std come from timm's
pretrained config (ImageNet defaults for most models); the patch size from
``patch_size``, else ``img_size``, else the model's default input size, else 224 px.
Foundation encoders (ViT-class, e.g. ``timm:vit_large_patch16_224?weights=FILE&init_values=1e-5``
for UNI) take their 224 px patch from the same config, 0.5 um/px unless ``mpp=`` says
otherwise; their mean/std must be given (``mean=[..]&std=[..]``) where they differ from
timm's for its own weights (``load_encoder`` warns when local weights come without them).
Random initialisation unless ``pretrained=True`` is asked for explicitly (timm then
downloads); local weights are loaded by :func:`nic.encoders.load_encoder` (``weights=``).
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch

from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._layers import NormalizedEncoder
from nic.encoders._registry import register_encoder
from nic.errors import EncoderError

logger = logging.getLogger(__name__)

__all__ = ["timm_encoder"]


def _create_backbone(
    model_name: str, pretrained: bool, patch_size: int | None, kwargs: dict[str, Any]
) -> torch.nn.Module:
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models('*pattern*')"
        raise EncoderError(f"unknown timm model {model_name!r}{hint}")
    if pretrained:
        logger.warning("timm:%s with pretrained=True downloads weights from the model hub", model_name)
    base = dict(kwargs, pretrained=pretrained, num_classes=0)
    if patch_size is not None and "img_size" not in kwargs:
        # Models with a fixed token grid (ViT & co.) need img_size; CNNs reject it.
        try:
            return timm.create_model(model_name, img_size=patch_size, **base)
        except TypeError:
            pass
    try:
        return timm.create_model(model_name, **base)
    except TypeError as e:
        raise EncoderError(f"timm model {model_name!r} rejected its arguments {sorted(kwargs)}: {e}") from e


def _output_width(backbone: torch.nn.Module, model_name: str, patch_size: int) -> int:
    """Length of the pooled code ``backbone`` returns for one ``patch_size`` patch.

    Measured with one forward pass in eval mode (the training mode is restored), since
    ``num_features`` undercounts models with a head before the classifier (MobileNetV3's
    conv head, ``head_hidden_size``).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, patch_size, patch_size))
    except (RuntimeError, AssertionError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EncoderError(
            f"timm:{model_name} cannot encode {patch_size} px patches ({first}); give a patch_size it accepts, "
            f"e.g. 'timm:{model_name}?patch_size=224'"
        ) from e
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] <= 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(
            f"timm:{model_name} returns {shape} for a patch, not one pooled code (1, C); it cannot serve as a "
            "patch encoder"
        )
    return int(out.shape[1])


@register_encoder(
    "timm",
    description="any timm backbone, pooled features; spec 'timm:<model>[?weights=FILE&patch_size=224&mpp=0.5]'",
    tiny={"model_name": "test_resnet", "patch_size": 32},
)
def timm_encoder(
    model_name: str,
    patch_size: int | None = None,
    pretrained: bool = False,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    **model_kwargs: Any,
) -> Encoder:
    """A timm backbone with ``num_classes=0``: RGB in [0, 1] (N, 3, P, P) -> (N, C), C as returned."""
    backbone = _create_backbone(model_name, bool(pretrained), patch_size, model_kwargs)
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    if patch_size is None:
        img_size = model_kwargs.get("img_size")
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[-1]
        input_size = cfg.get("input_size") or (3, 224, 224)
        patch_size = int(img_size or input_size[-1])
    mean = tuple(float(v) for v in (mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))))
    std = tuple(float(v) for v in (std if std is not None else cfg.get("std", (0.229, 0.224, 0.225))))
    if len(mean) != 3 or len(std) != 3:
        raise EncoderError(f"timm:{model_name} needs 3-channel mean/std, got {mean} / {std}")
    num_features = _output_width(backbone, model_name, int(patch_size))
    module = NormalizedEncoder(backbone, mean, std, num_features)
    module = module.to(memory_format=torch.channels_last).eval()
    arch_args = {"model_name": model_name, "patch_size": int(patch_size), **model_kwargs}
    config = EncoderConfig(
        architecture="timm",
        code_size=num_features,
        patch_size=int(patch_size),
        mpp=0.5,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        arch_args=arch_args,
        name=f"timm:{model_name}",
    )
    return Encoder(module, config)
