"""Attention transfer (Zagoruyko & Komodakis 2017, eq. 2) against float64 values computed
by NumPy and SciPy, not by the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cosine

from lightning_layerkd.functional.attention_transfer import (
    attention_sum,
    attention_transfer_divergence,
)


def features(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def paper_formula(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Eq. 2 sample by sample with loops: Q = vec(sum_c A_c^2), || Q_S/|Q_S| - Q_T/|Q_T| ||^2
    over the map's size."""
    out = []
    for s, t in zip(student, teacher, strict=True):
        q_s = sum(s[c] ** 2 for c in range(s.shape[0])).ravel()
        q_t = sum(t[c] ** 2 for c in range(t.shape[0])).ravel()
        diff = q_s / np.sqrt((q_s**2).sum()) - q_t / np.sqrt((q_t**2).sum())
        out.append((diff**2).sum() / q_s.size)
    return np.array(out)


def test_divergence_is_the_papers_formula_for_p_2_with_other_channel_counts():
    s, t = features(3, 4, 5, 6, seed=0), features(3, 7, 5, 6, seed=1)
    got = attention_transfer_divergence(s, t).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, paper_formula(s.numpy(), t.numpy()), rtol=1e-12)


def test_divergence_is_twice_the_cosine_distance_of_the_maps_over_their_size():
    # || a/|a| - b/|b| ||^2 = 2 (1 - cos(a, b)): an independent route through SciPy
    s, t = features(4, 3, 4, 4, seed=2), features(4, 5, 4, 4, seed=3)
    got = attention_transfer_divergence(s, t).numpy()
    q_s = (s.numpy() ** 2).sum(1).reshape(4, -1)
    q_t = (t.numpy() ** 2).sum(1).reshape(4, -1)
    want = [2 * cosine(a, b) / 16 for a, b in zip(q_s, q_t, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_larger_teacher_map_is_average_pooled_before_normalising():
    s, t = features(2, 3, 2, 3, seed=4), features(2, 3, 4, 6, seed=5)
    a_t = (t.numpy() ** 2).sum(1)
    pooled = a_t.reshape(2, 2, 2, 3, 2).mean(axis=(2, 4))  # 2x2 blocks: adaptive pooling 4x6->2x3
    q_s = (s.numpy() ** 2).sum(1).reshape(2, -1)
    q_t = pooled.reshape(2, -1)
    want = [2 * cosine(a, b) / 6 for a, b in zip(q_s, q_t, strict=True)]
    np.testing.assert_allclose(attention_transfer_divergence(s, t).numpy(), want, rtol=1e-12)


def test_exponent_p_and_scale_invariance():
    s = features(2, 3, 3, 3, seed=6)
    np.testing.assert_allclose(
        attention_sum(s, p=3).numpy(), (np.abs(s.numpy()) ** 3).sum(1), rtol=1e-14
    )
    # normalised maps: a feature and 5 times it have distance 0; zero only for proportional maps
    assert attention_transfer_divergence(s, 5 * s).abs().max() < 1e-15
    t = features(2, 3, 3, 3, seed=7)
    assert (attention_transfer_divergence(s, t) > 1e-3).all()


def test_gradient_reaches_the_student_only_and_matches_finite_differences():
    s = features(2, 2, 3, 3, seed=8).requires_grad_()
    t = features(2, 3, 3, 3, seed=9)
    assert torch.autograd.gradcheck(lambda a: attention_transfer_divergence(a, t), (s,))
    t.requires_grad_()
    attention_transfer_divergence(s, t.detach()).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_bad_exponent_is_refused_by_name():
    with pytest.raises(ValueError, match="p must be positive"):
        attention_transfer_divergence(features(1, 1, 2, 2, seed=0), features(1, 1, 2, 2, seed=1), 0)
