"""Synthetic slides, cohorts and patch datasets for demos, tests and benchmarks.

- ``make_cohort`` / ``plan_cohort``: procedural H&E-like slides (pyramidal JPEG TIFF at
  0.5 um/px) with patient labels whose truth comes from what was drawn
- ``make_patch_datasets``: labelled 128-px patches (tissue type, nuclei density, mitosis)
- ``make_mosaic_cohort``: slides tiled from real labelled tiles, labelled by arrangement
- ``make_planted_cohort``: compressed slides (stores) with planted signals, for the
  slide-level learning tests and benchmarks
- ``write_pyramid`` / ``TileLibrary``: the pyramidal TIFF writer that reuses encoded tiles
- ``draw_tile`` / ``CLASSES``: the procedural textures
"""

from nic.synth._cohort import Cohort, CohortConfig, SlidePlan, make_cohort, plan_cohort
from nic.synth._layout import rim_contact
from nic.synth._mosaic import MosaicConfig, make_mosaic_cohort, tumour_contact
from nic.synth._patches import PatchDatasets, make_patch_datasets
from nic.synth._planted import PlantedCohort, make_planted_cohort
from nic.synth._textures import CLASSES, TISSUE_CLASSES, Drawing, Stain, draw_tile, random_stain
from nic.synth._tiff import TileLibrary, write_pyramid

__all__ = [
    "CLASSES",
    "TISSUE_CLASSES",
    "Cohort",
    "CohortConfig",
    "Drawing",
    "MosaicConfig",
    "PatchDatasets",
    "PlantedCohort",
    "SlidePlan",
    "Stain",
    "TileLibrary",
    "draw_tile",
    "make_cohort",
    "make_mosaic_cohort",
    "make_patch_datasets",
    "make_planted_cohort",
    "plan_cohort",
    "random_stain",
    "rim_contact",
    "tumour_contact",
    "write_pyramid",
]
