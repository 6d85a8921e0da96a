"""ReviewKD's hierarchical context loss (Chen et al. 2021, section 3.3) by hand with NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_layerkd.functional.review import hierarchical_context_loss


def blocks(a: np.ndarray, size: int) -> np.ndarray:
    """Average over ``size x size`` blocks of equal size (adaptive pooling when it divides)."""
    b, c, h, w = a.shape
    return a.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def test_hcl_on_a_4x4_map_is_the_weighted_pyramid_by_hand():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    a, b = s.numpy(), t.numpy()

    def mse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)

    # levels: the 4x4 map (weight 1), 2x2 (1/2), 1x1 (1/4); 4x4 pooled is the map itself: skipped
    want = (
        mse(a, b) + 0.5 * mse(blocks(a, 2), blocks(b, 2)) + 0.25 * mse(blocks(a, 1), blocks(b, 1))
    ) / 1.75
    got = hierarchical_context_loss(s, t)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)


def test_hcl_on_an_8x8_map_uses_every_level_and_is_zero_for_equal_maps():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    a, b = s.numpy(), t.numpy()
    terms = [((a - b) ** 2).reshape(2, -1).mean(1)]
    terms += [((blocks(a, k) - blocks(b, k)) ** 2).reshape(2, -1).mean(1) for k in (4, 2, 1)]
    weights = [1, 0.5, 0.25, 0.125]
    want = sum(w * x for w, x in zip(weights, terms, strict=True)) / sum(weights)
    np.testing.assert_allclose(hierarchical_context_loss(s, t).numpy(), want, rtol=1e-13)
    assert hierarchical_context_loss(s, s).abs().max() == 0


def test_hcl_refuses_shapes_that_differ():
    with pytest.raises(ValueError, match="HCL compares features of one shape"):
        hierarchical_context_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
