"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the distance between L2-normalised
activation-based attention maps of a student and a teacher layer (their eq. 2).

``Q = vec(sum_c |A_c|^p)`` (their eq. 1's ``F_sum^p``, ``p = 2``) is normalised per sample,
``Q / ||Q||_2``, and compared by the squared L2 distance divided by the map's size: the
authors' implementation of eq. 2, whose ``beta`` they state "divided by the number of elements
in attention map and batch size" (docs/design.md section 11).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_layerkd.functional.maps import at_least_float32, feature_grid, match_maps


def attention_sum(features: Tensor, p: float = 2.0, layer: str = "") -> Tensor:
    """``F_sum^p(A) = sum_c |A_c|^p`` (Zagoruyko & Komodakis eq. 1 and section 3.1):
    ``(B, H, W)``, float32 or wider (half precision is upcast)."""
    grid = at_least_float32(feature_grid(features, layer))
    return grid.square().sum(dim=1) if p == 2 else grid.abs().pow(p).sum(dim=1)


def attention_transfer_divergence(
    student: Tensor, teacher: Tensor, p: float = 2.0, layer: str = ""
) -> Tensor:
    """Per sample, ``|| Q_S / ||Q_S||_2 - Q_T / ||Q_T||_2 ||_2^2 / (H W)`` (Zagoruyko &
    Komodakis eq. 2, squared as in their implementation, averaged over the map's ``H W``
    entries).

    Args:
        student, teacher: ``(B, C, H, W)`` features (or ``(B, N, C)`` tokens on a grid); the
            channel counts may differ, and a larger map is average-pooled to the smaller size
            before normalising.
        p: the exponent of ``sum_c |A_c|^p`` (2 in the paper's experiments).
        layer: the layer's name, for errors.

    Returns:
        ``(B,)`` non-negative divergences, at most ``4 / (H W)``.
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    a_s, a_t = match_maps(attention_sum(student, p, layer), attention_sum(teacher, p, layer))
    q_s, q_t = F.normalize(a_s, dim=1), F.normalize(a_t, dim=1)
    return (q_s - q_t).square().mean(dim=1)
