"""Known answers for the batched augmentation: identities, exact symmetries, skimage's HED."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic.patches.augment import (
    AugmentConfig,
    ColorAugment,
    _colour_affine,
    _geometry,
    _hed_affine,
    add_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment,
    dihedral,
    gaussian_blur,
    hed_jitter,
    hed_to_rgb,
    rgb_to_hed,
)


def _batch(n: int = 8, size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype)


def test_strength_zero_is_identity() -> None:
    x = _batch()
    assert augment(x, AugmentConfig(strength=0)) is x
    assert torch.equal(augment(x, AugmentConfig().with_strength(0.0)), x)


def test_eval_mode_module_is_identity_and_training_changes() -> None:
    x = _batch()
    aug = ColorAugment(AugmentConfig(), seed=1)
    aug.eval()
    assert torch.equal(aug(x), x)
    aug.train()
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_seeded_augmentation_is_reproducible_and_varies_per_sample() -> None:
    x = _batch(1).expand(6, -1, -1, -1).contiguous()
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(3))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # the same patch six times gets six different settings
    assert len({round(float(v), 5) for v in a.mean(dim=(1, 2, 3))}) == 6


def test_negative_strength_and_bad_input_raise() -> None:
    from nic.errors import OptionError

    with pytest.raises(OptionError, match=r"^`strength` must be a number of at least 0 \(got -1\)$"):
        AugmentConfig(strength=-1)
    with pytest.raises(OptionError, match="`strength`"):
        AugmentConfig().with_strength(-0.5)
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_matches_numpy_exactly(k: int, flip: bool) -> None:
    x = _batch(3, 9)
    kk = torch.full((3,), k)
    ff = torch.full((3,), flip)
    expected = np.rot90(x.numpy(), k, axes=(2, 3))
    if flip:
        expected = expected[..., ::-1]
    assert np.array_equal(dihedral(x, kk, ff).numpy(), expected)
    # the fused path without zoom moves pixels exactly too, and with zoom 1 nearly so
    assert torch.equal(_geometry(x, kk, ff, None), dihedral(x, kk, ff))
    assert torch.allclose(_geometry(x, kk, ff, torch.ones(3)), dihedral(x, kk, ff), atol=1e-5)


def test_dihedral_mixed_batch_and_inverse() -> None:
    x = _batch(8, 12)
    k = torch.arange(8) % 4
    f = torch.arange(8) >= 4
    y = dihedral(x, k, f)
    for i in range(8):
        assert torch.equal(y[i : i + 1], dihedral(x[i : i + 1], k[i : i + 1], f[i : i + 1]))
    # undo: flip back, then turn the rest of the way round
    back = dihedral(dihedral(y, torch.zeros(8, dtype=torch.long), f), (4 - k) % 4, torch.zeros(8, dtype=torch.bool))
    assert torch.equal(back, x)


def test_hed_matches_skimage() -> None:
    from skimage.color import hed2rgb, rgb2hed

    x = _batch(4, 8, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # black pixel: the 1e-6 floor
    x[1, :, 0, 0] = 1.0  # white pixel
    ref = rgb2hed(x.permute(0, 2, 3, 1).numpy())
    hed = rgb_to_hed(x)
    np.testing.assert_allclose(hed.permute(0, 2, 3, 1).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(hed_to_rgb(hed).permute(0, 2, 3, 1).numpy(), hed2rgb(ref), atol=1e-12)
    # without the clip at zero the round trip is exact
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(x, clip=False)), x.clamp_min(1e-6), atol=1e-12, rtol=0)


def test_hed_jitter_identity_and_fused_form() -> None:
    x = _batch(5, 8).clamp(0.02, 1)
    torch.testing.assert_close(hed_jitter(x, torch.ones(5, 3), torch.zeros(5, 3)), x, atol=2e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    alpha = 0.8 + 0.4 * torch.rand(5, 3, generator=g)
    beta = 0.1 * torch.rand(5, 3, generator=g) - 0.05
    torch.testing.assert_close(_hed_affine(x, alpha, beta).clamp(0, 1), hed_jitter(x, alpha, beta), atol=2e-5, rtol=0)
    # more haematoxylin darkens the image
    more_h = torch.tensor([[1.5, 1.0, 1.0]]).expand(5, 3)
    assert float(hed_jitter(x, more_h, torch.zeros(5, 3)).mean()) < float(x.mean())


def test_colour_adjustments_known_answers() -> None:
    x = _batch(4, 8)
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert torch.equal(adjust_brightness(x, ones), x)
    torch.testing.assert_close(adjust_brightness(x, 0.5 * ones), 0.5 * x)
    torch.testing.assert_close(adjust_contrast(x, ones), x)
    flat = adjust_contrast(x, zeros)  # every pixel becomes the mean grey
    assert float(flat.std(dim=(1, 2, 3)).max()) < 1e-6
    grey = adjust_saturation(x, zeros)
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    torch.testing.assert_close(grey[:, 1], grey[:, 2])
    torch.testing.assert_close(adjust_hue(x, zeros), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, ones), x, atol=1e-5, rtol=0)  # a full turn
    # hue rotation keeps luma
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((adjust_hue(x, 0.3 * ones) * w).sum(1), (x * w).sum(1), atol=1e-5, rtol=0)


def test_fused_colour_map_equals_sequential_functions() -> None:
    x = _batch(6, 8)
    g = torch.Generator().manual_seed(2)
    b, c, s = (0.6 + 0.8 * torch.rand(6, generator=g) for _ in range(3))
    h = torch.rand(6, generator=g) - 0.5
    ref = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, b), c), s), h)
    torch.testing.assert_close(_colour_affine(x, b, c, s, h), ref, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    x = _batch(3, 20, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])
    for i in (1, 2):
        # torch 'reflect' padding is scipy's 'mirror'; the kernel is truncated at 2 sigma
        ref = gaussian_filter(x[i].numpy(), sigma=(0, float(sigma[i]), float(sigma[i])), mode="mirror", truncate=2.0)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-12)
    const = torch.full((2, 3, 10, 10), 0.4)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.7, 1.3])), const)


def test_noise_std() -> None:
    x = torch.full((2, 3, 64, 64), 0.5)
    y = add_noise(x, torch.tensor([0.0, 0.05]), torch.Generator().manual_seed(0))
    assert torch.equal(y[0], x[0])
    assert abs(float((y[1] - x[1]).std()) - 0.05) < 0.003


def test_augment_range_and_shape_at_high_strength() -> None:
    x = _batch(16, 32)
    y = augment(x, AugmentConfig(strength=3.0), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1 and torch.isfinite(y).all()


def test_geometry_only_config_is_a_pixel_permutation() -> None:
    x = _batch(8, 16)
    cfg = AugmentConfig(
        hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0, hue=0, scale=0, blur_p=0, noise=0
    )
    y = augment(x, cfg, torch.Generator().manual_seed(0))
    for i in range(8):
        assert torch.equal(y[i].flatten().sort().values, x[i].flatten().sort().values)


def test_scale_jitter_identity_and_grid_matches_affine_grid() -> None:
    import torch.nn.functional as F

    from nic.patches.augment import _linear_grid, scale_jitter

    x = _batch(4, 16)
    assert torch.equal(scale_jitter(x, torch.ones(4)), x)
    m = torch.randn(4, 2, 2)
    theta = torch.cat([m, torch.zeros(4, 2, 1)], 2)
    ref = F.affine_grid(theta, [4, 3, 12, 16], align_corners=False)
    torch.testing.assert_close(_linear_grid(m, 12, 16), ref, atol=1e-6, rtol=0)
    # zoom 2 magnifies: the centre 8 x 8 fills the patch, so there is less variation
    z = scale_jitter(x, torch.full((4,), 2.0))
    assert float(z.std()) < float(x.std())
