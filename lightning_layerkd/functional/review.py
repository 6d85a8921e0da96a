"""Knowledge review (Chen et al., CVPR 2021): the hierarchical context loss (HCL, their
section 3.3), which compares a fused student feature with a teacher feature at several levels
of a spatial pyramid."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

#: the pyramid's pooled sizes below the full map (Chen et al.: 4x4, 2x2, 1x1)
PYRAMID = (4, 2, 1)


def hierarchical_context_loss(
    student: Tensor, teacher: Tensor, levels: Sequence[int] = PYRAMID
) -> Tensor:
    """Per sample, HCL: ``sum_k w_k MSE(pool_k(F_S), pool_k(F_T)) / sum_k w_k`` over the full
    ``H x W`` map (``k = 0``) and each pyramid level ``l x l`` smaller than it, average-pooled,
    with weights halving level by level (``w_k = 2^-k``); the mean squared error is over the
    ``C l l`` entries of each sample.

    Args:
        student, teacher: ``(B, C, H, W)`` features of one shape.
        levels: the pooled sizes, from the largest down.

    Returns:
        ``(B,)`` non-negative losses.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"HCL compares features of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    total = (student - teacher).square().flatten(1).mean(dim=1)
    weight, weights = 1.0, 1.0
    for size in levels:
        if size >= min(student.shape[2:]):
            continue
        weight /= 2
        s = F.adaptive_avg_pool2d(student, size)
        t = F.adaptive_avg_pool2d(teacher, size)
        total = total + weight * (s - t).square().flatten(1).mean(dim=1)
        weights += weight
    return total / weights
