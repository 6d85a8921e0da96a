"""Contrastive representation distillation (Tian et al., ICLR 2020): the NCE critic between
student and teacher embeddings (their eqs. 18-20) and the momentum update of a memory bank of
embeddings of the training set (their section 4, "memory buffer").

``h(T, S) = exp(g_T(t)' g_S(s) / tau) / (exp(g_T(t)' g_S(s) / tau) + N / M)`` (eq. 19, ``N``
negatives, ``M`` training samples) and, per sample, ``-log h(t_i, s_i) - sum_{k=1..N} log(1 -
h(t_{n_k}, s_i))`` (eq. 18 with the expectation over negatives written as the sum over ``N``
draws), the positive being the teacher's embedding of the same sample and the negatives the
memory bank's teacher embeddings of ``N`` random training samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def crd_loss(
    student: Tensor, positive: Tensor, negatives: Tensor, tau: float, num_samples: int
) -> Tensor:
    """Per sample, eq. 18's ``-log h(t_i, s_i) - sum_k log(1 - h(t_{n_k}, s_i))`` with eq. 19's
    ``h = e / (e + N / M)``, ``e = exp(t' s / tau)``.

    Args:
        student: the student's embeddings ``g_S(s_i)``, ``(B, d)`` (unit vectors).
        positive: the teacher's embeddings of the same samples ``g_T(t_i)``, ``(B, d)``.
        negatives: ``N`` teacher embeddings of other samples per sample, ``(B, N, d)``.
        tau: the temperature.
        num_samples: ``M``, the size of the training set (of the memory bank).

    Returns:
        ``(B,)`` non-negative losses.
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    z_pos = (student * positive).sum(dim=1) / tau
    z_neg = torch.einsum("bd,bnd->bn", student, negatives) / tau
    return crd_loss_from_logits(z_pos, z_neg, num_samples)


def crd_loss_from_logits(z_pos: Tensor, z_neg: Tensor, num_samples: int) -> Tensor:
    """:func:`crd_loss` from the critic's logits ``z = t' s / tau``: the positives' ``(B,)`` and
    the negatives' ``(B, N)``. ``log h`` and ``log(1 - h)`` are ``z - logaddexp(z, log(N/M))``
    and ``log(N/M) - logaddexp(z, log(N/M))``: no overflow of ``exp(z)`` at small ``tau``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    n = z_neg.shape[1]
    log_noise = torch.tensor(math.log(n / num_samples), dtype=z_pos.dtype, device=z_pos.device)
    log_h_pos = z_pos - torch.logaddexp(z_pos, log_noise)
    log_1m_h_neg = log_noise - torch.logaddexp(z_neg, log_noise)
    return -log_h_pos - log_1m_h_neg.sum(dim=1)


def momentum_update(bank_rows: Tensor, embeddings: Tensor, momentum: float) -> Tensor:
    """The memory bank's new rows: ``normalize(m v_i + (1 - m) f_i)`` (Tian et al. section 4,
    after Wu et al. 2018), ``v_i`` the stored rows and ``f_i`` the batch's embeddings."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    return F.normalize(momentum * bank_rows + (1 - momentum) * embeddings, dim=1)
