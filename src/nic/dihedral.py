"""The 8 rotations and flips of the square (the dihedral group), in one order for all of nic.

Transform ``k`` (0-7): a left-right flip (the column axis reversed) when ``k >= 4``, then
``k % 4`` quarter turns counter-clockwise (``np.rot90``) over the (rows, cols) axes.  The
same ``k`` means the same transform for patches (compression's 8 variants), compressed
grids (training views and test-time averaging), heatmaps (maps rotated back) and
augmentation.  Every function moves values exactly; nothing is interpolated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ORDER", "dihedral", "dihedral_inverse", "dihedral_torch", "compose_rot_then_flip"]

#: the order, as recorded in dihedral stores (``variant_order``)
ORDER = "k in 0..7: left-right flip if k >= 4, then np.rot90(patch, k % 4) over (rows, cols)"


def _check(k: int) -> None:
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be 0..7, got {k}")


def dihedral(a: np.ndarray, k: int, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Transform ``k`` of ``a`` over ``axes`` (rows, cols); a view where numpy allows."""
    _check(k)
    if k >= 4:
        a = np.flip(a, axis=axes[1])
    return np.rot90(a, k % 4, axes=axes)


def dihedral_inverse(a: np.ndarray, k: int, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Undo :func:`dihedral`: ``dihedral_inverse(dihedral(a, k), k) == a``."""
    _check(k)
    a = np.rot90(a, -(k % 4), axes=axes)
    return np.flip(a, axis=axes[1]) if k >= 4 else a


def dihedral_torch(x: Any, k: int, dims: tuple[int, int] = (-2, -1)) -> Any:
    """:func:`dihedral` of a torch tensor over ``dims``."""
    import torch

    _check(k)
    if k >= 4:
        x = x.flip(dims[1])
    return torch.rot90(x, k % 4, dims=dims) if k % 4 else x


def compose_rot_then_flip(quarter_turns: int, flip: bool) -> int:
    """The ``k`` of "``quarter_turns`` turns counter-clockwise, then a left-right flip":
    flipping after turning equals turning the other way after flipping."""
    q = quarter_turns % 4
    return 4 + (-q) % 4 if flip else q
