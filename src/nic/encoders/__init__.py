"""Patch encoders: uint8 RGB patches in, fixed-length codes out.

- ``_base``      :class:`Encoder` (module + config + checksum) and :class:`EncoderConfig`
- ``_registry``  :func:`register_encoder`, :func:`create_encoder`, :func:`list_encoders`, and the
  kinds of spec :func:`load_encoder` accepts (:func:`register_spec_kind`)
- ``_nic_cnn``   ``nic-cnn``, :class:`NicPatchEncoder`, the architecture of the published NIC encoders
- ``_timm``      ``timm``: any timm backbone (``timm:<model>`` specs)
- ``_keras``     import of the published Keras .h5 weights with h5py
- ``_mean_rgb``  ``mean-rgb``: the mean colour of the patch (the papers' floor; no weights by design)
- ``_concat``    one encoder whose code is several encoders' codes side by side
- ``_io``        :func:`load_encoder` (any spec) and :func:`save_encoder` (safetensors + JSON)
- ``_layers``    input normalisation inside the module (:class:`NormalizedEncoder` for new builders)

``load_encoder`` returns a trainable module; for embedding many patches call
``encoder.for_inference()`` once (nic-cnn then folds its batch norms, about 1.5x faster on CPU).
"""

from __future__ import annotations

# Importing the built-in modules registers their builders and spec kinds: the registry is
# complete whenever anything in nic.encoders has been imported.
from nic.encoders import _concat, _mean_rgb, _timm  # noqa: F401
from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._concat import concat_encoders
from nic.encoders._io import load_encoder, require_weights, save_encoder
from nic.encoders._keras import load_keras_encoder, read_keras_h5
from nic.encoders._layers import NormalizedEncoder
from nic.encoders._nic_cnn import NicPatchEncoder
from nic.encoders._registry import (
    SpecKind,
    create_encoder,
    encoder_entry,
    list_encoders,
    register_encoder,
    register_spec_kind,
    spec_kinds,
)

__all__ = [
    "Encoder",
    "EncoderConfig",
    "NicPatchEncoder",
    "NormalizedEncoder",
    "SpecKind",
    "concat_encoders",
    "create_encoder",
    "encoder_entry",
    "list_encoders",
    "load_encoder",
    "load_keras_encoder",
    "read_keras_h5",
    "register_encoder",
    "register_spec_kind",
    "require_weights",
    "save_encoder",
    "spec_kinds",
]
