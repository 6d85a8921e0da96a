"""Jensen-Shannon divergence between map distributions (Kokane et al. 2024, eqs. 8-10)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LN2", "js_divergence", "kl_divergence"]

#: The upper bound of the natural-log JSD with equal weights.
LN2 = math.log(2.0)


def _safe_log(x: Tensor) -> Tensor:
    # log(x) where x > 0 and 0 elsewhere; the mask keeps the backward finite at exact zeros.
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)))


def kl_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """``KL(p || q) = sum p log(p / q)`` along ``dim``, with ``0 log 0 = 0``.

    ``q`` must be positive wherever ``p`` is (true for the mixture of eq. 10).
    """
    return (p * (_safe_log(p) - _safe_log(q))).sum(dim)


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Jensen-Shannon divergence with equal weights, natural log (eqs. 8-10).

    ``M = (p + q) / 2`` (eq. 10, beta_1 = beta_2 = 1/2) and
    ``JSD = KL(p || M) / 2 + KL(q || M) / 2`` (eq. 9), reduced along ``dim``.
    Symmetric, zero iff ``p == q``, and in ``[0, ln 2]``. Exact zeros in ``p`` or ``q`` are
    handled (``0 log 0 = 0``) with a finite backward.

    Args:
        p: probabilities (non-negative, summing to one along ``dim``).
        q: probabilities of the same shape.
        dim: the dimension the distributions live on; the others are batch dimensions.

    Returns:
        The divergence per distribution, i.e. ``p`` with ``dim`` reduced away.

    Example:
        >>> p = torch.tensor([1.0, 0.0]); q = torch.tensor([0.0, 1.0])
        >>> round(float(js_divergence(p, q)), 6) == round(LN2, 6)
        True
    """
    if p.shape != q.shape:
        raise ValueError(
            f"js_divergence needs p and q of the same shape, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}; pool or reshape the maps to a common support first."
        )
    m = 0.5 * (p + q)  # eq. 10
    return 0.5 * kl_divergence(p, m, dim) + 0.5 * kl_divergence(q, m, dim)  # eq. 9
