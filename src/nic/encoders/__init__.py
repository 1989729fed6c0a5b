"""Patch encoders: uint8 RGB patches in, fixed-length codes out.

- ``_base``      :class:`Encoder` (module + config + checksum) and :class:`EncoderConfig`
- ``_registry``  :func:`register_encoder`, :func:`create_encoder`, :func:`list_encoders`
- ``_nic_cnn``   ``nic-cnn``, the architecture of the published NIC encoders
- ``_timm``      ``timm``: any timm backbone (``timm:<model>`` specs)
- ``_keras``     import of the published Keras .h5 weights with h5py
- ``_mean_rgb``  ``mean-rgb``: the mean colour of the patch (the papers' floor; no weights by design)
- ``_concat``    one encoder whose code is several encoders' codes side by side
- ``_io``        :func:`load_encoder` (any spec) and :func:`save_encoder` (safetensors + JSON)
- ``_layers``    input normalisation inside the module

``load_encoder`` returns a trainable module; for embedding many patches call
``encoder.for_inference()`` once (nic-cnn then folds its batch norms, about 1.5x faster on CPU).
"""

from __future__ import annotations

from nic.encoders._base import Encoder, EncoderConfig
from nic.encoders._io import load_encoder, save_encoder
from nic.encoders._keras import load_keras_encoder, read_keras_h5
from nic.encoders._nic_cnn import NicCnn
from nic.encoders._registry import create_encoder, encoder_entry, list_encoders, register_encoder

__all__ = [
    "Encoder",
    "EncoderConfig",
    "NicCnn",
    "create_encoder",
    "encoder_entry",
    "list_encoders",
    "load_encoder",
    "load_keras_encoder",
    "read_keras_h5",
    "register_encoder",
    "save_encoder",
]
