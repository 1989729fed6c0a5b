"""One exception base for every error a user can fix.

Each message says which file or field is wrong, what was found and what to do.  The
command line prints ``str(error)`` on one line and exits with code 2.
"""

from __future__ import annotations

__all__ = ["NicError", "SlideError", "MppError", "EncoderError", "StoreError", "DataError"]


class NicError(Exception):
    """Base of the errors nic raises for bad input; the message is meant for a user."""


class SlideError(NicError):
    """A slide cannot be opened or read."""


class MppError(SlideError):
    """A slide's pixel size (um/px) is unknown or implausible."""


class EncoderError(NicError):
    """An encoder spec, weight file or configuration is wrong."""


class StoreError(NicError):
    """A compressed-slide store is missing, unfinished or inconsistent."""


class DataError(NicError):
    """A labels table, patch dataset or cohort folder is wrong."""
