"""nic: Neural Image Compression for gigapixel pathology slides.

Modules, data flowing down:

- ``nic.slide``     open any whole-slide image; read regions at a target um/px
- ``nic.tissue``    low-resolution tissue masks
- ``nic.grid``      the patch grid at a target um/px, with tissue fractions
- ``nic.encoders``  the encoder registry (NIC CNN, timm, published Keras weights), weights I/O
- ``nic.dihedral``  the 8 rotations/flips of the square, in one order for patches, grids and maps
- ``nic.metrics``   AUC, c-index, Spearman, accuracy ... as pure numpy functions, one definition for every layer
- ``nic.store``     the compressed-slide format (zarr): one group per slide
- ``nic.compress``  slide -> compressed slide: parallel reading, batched encoding, resumable; cohorts on Dask
- ``nic.audit``     a cohort's readability, um/px, magnification and pyramid, before compressing
- ``nic.bags``      feature bags of TRIDENT, CLAM and STAMP to and from stores
- ``nic.patches``   labelled patch datasets, nuclei annotations, colour augmentation
- ``nic.encoder_training``  encoder training (multitask; VAE, contrastive, BiGAN on slides), linear probe
- ``nic.learn``     slide-level models, losses, metrics and cross-validation on stores
- ``nic.explain``   where the evidence lies: heatmaps on the slide, the run report, tissue/code pictures
- ``nic.synth``     generated slides, cohorts and patch datasets for demos, tests, benchmarks
- ``nic.demo``      the whole pipeline on a generated cohort
- ``nic.cli``       the ``nic`` command, thin over the library

Heavy modules are imported on first use, so ``import nic`` and ``nic --help`` stay fast.
"""

from __future__ import annotations

from nic._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "open_slide": "nic.slide",
    "Slide": "nic.slide",
    "tissue_mask": "nic.tissue",
    "patch_grid": "nic.grid",
    "PatchGrid": "nic.grid",
    "NicError": "nic.errors",
    "load_encoder": "nic.encoders",
    "save_encoder": "nic.encoders",
    "create_encoder": "nic.encoders",
    "list_encoders": "nic.encoders",
    "Encoder": "nic.encoders",
    "compress_slide": "nic.compress",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_attributes("nic", _LAZY, globals(), __all__)
