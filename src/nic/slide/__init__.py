"""Slide access: open any whole-slide image and read regions at a target um/px; which files
count as slides when a folder is searched (:func:`is_slide_file`); the slides a list of
files, folders and CSV tables names (:func:`list_slides`)."""

from nic.slide._inputs import list_slides
from nic.slide._readers import Level
from nic.slide._slide import PLAIN_IMAGE_SUFFIXES, SLIDE_SUFFIXES, Slide, is_slide_file, open_slide

__all__ = ["Level", "PLAIN_IMAGE_SUFFIXES", "SLIDE_SUFFIXES", "Slide", "is_slide_file", "list_slides", "open_slide"]
