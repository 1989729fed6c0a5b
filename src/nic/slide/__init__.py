"""Slide access: open any whole-slide image and read regions at a target um/px."""

from nic.slide._readers import Level
from nic.slide._slide import PLAIN_IMAGE_SUFFIXES, Slide, open_slide

__all__ = ["Level", "PLAIN_IMAGE_SUFFIXES", "Slide", "open_slide"]
