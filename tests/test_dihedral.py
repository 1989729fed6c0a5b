"""One dihedral order for patches, grids, maps and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic.dihedral import compose_rot_then_flip, dihedral, dihedral_inverse, dihedral_torch


def test_order_is_flip_then_quarter_turns() -> None:
    a = np.arange(6).reshape(2, 3)
    assert np.array_equal(dihedral(a, 1), np.rot90(a))
    assert np.array_equal(dihedral(a, 5), np.rot90(a[:, ::-1]))
    assert len({dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}) == 8


@pytest.mark.parametrize("k", range(8))
def test_numpy_torch_inverse_agree(k: int) -> None:
    a = np.random.default_rng(k).normal(size=(2, 3, 5, 5))
    np.testing.assert_array_equal(dihedral_torch(torch.from_numpy(a), k).numpy(), dihedral(a, k))
    np.testing.assert_array_equal(dihedral_inverse(dihedral(a, k), k), a)
    hwc = a.transpose(2, 3, 0, 1)  # other axes
    np.testing.assert_array_equal(dihedral(hwc, k, axes=(0, 1)).transpose(2, 3, 0, 1), dihedral(a, k))


@pytest.mark.parametrize(("q", "flip"), [(q, f) for q in range(4) for f in (False, True)])
def test_turn_then_flip_is_one_of_the_eight(q: int, flip: bool) -> None:
    a = np.arange(12).reshape(3, 4)
    want = np.rot90(a, q)
    want = want[:, ::-1] if flip else want
    np.testing.assert_array_equal(dihedral(a, compose_rot_then_flip(q, flip)), want)
