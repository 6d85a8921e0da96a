"""Attention, Jacobian and Hessian maps as distributions (Kokane et al. 2024, eqs. 2, 4, 6).

Pure tensor functions: the attention map (eq. 2), the score a derivative map differentiates
and its curvature, normalisation into distributions (docs/design.md section 3) and bringing two
networks' maps onto one support. The derivative maps themselves (eqs. 4 and 6) are computed by
:mod:`lightning_layerkd.functional.derivatives`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_layerkd._common import Task

Wrt = Literal["weight", "activation"]
WeightAlignment = Literal["sorted", "index"]
WRTS: tuple[str, ...] = ("weight", "activation")
WEIGHT_ALIGNMENTS: tuple[str, ...] = ("sorted", "index")


def feature_grid(
    features: Tensor, layer: str = "", layout: tuple[int, int, int] | None = None
) -> Tensor:
    """Features as ``(B, C, H, W)``: CNN features as they are; transformer tokens ``(B, N, C)``
    on their patch grid with the leading class/register tokens dropped: by the model's
    ``layout`` (:func:`~lightning_layerkd.layers.tokens.token_layout`) when it fits ``N``, else
    ``N = P + S * S`` with ``S = floor(sqrt(N))`` and ``P <= 16``. Anything else is an error
    naming ``layer``: a map never silently sums a layer's features into one number per sample."""
    if features.dim() == 4:
        return features
    if features.dim() == 3:
        batch, tokens, channels = features.shape
        side = math.isqrt(tokens)
        prefix, height, width = tokens - side * side, side, side
        if layout is not None and layout[0] + layout[1] * layout[2] == tokens:
            prefix, height, width = layout
        if height >= 2 and width >= 2 and prefix <= 16:
            grid = features[:, prefix:, :].transpose(1, 2)
            return grid.reshape(batch, channels, height, width)
        raise ValueError(
            f"layer '{layer}' outputs {tuple(features.shape)}: read as (B, N, C) tokens, "
            f"N={tokens} is not a patch grid plus at most 16 class/register tokens; use a square "
            "input (H = W) or a layer with (B, C, H, W) features"
        )
    raise ValueError(
        f"layer '{layer}' outputs {tuple(features.shape)}; maps need (B, C, H, W) features or "
        "(B, N, C) transformer tokens on a patch grid"
    )


def attention_map(
    features: Tensor, p: float = 2.0, layer: str = "", layout: tuple[int, int, int] | None = None
) -> Tensor:
    """Activation-based attention ``a(F) = sum_c |F_c|^p`` (eq. 2; Zagoruyko & Komodakis 2017).

    Args:
        features: ``(B, C, H, W)`` feature maps, or ``(B, N, C)`` tokens (:func:`feature_grid`).
        p: the exponent (2 in the paper).
        layer: the layer's name, for errors.
        layout: a transformer's token layout
            (:func:`~lightning_layerkd.layers.tokens.token_layout`).

    Returns:
        ``(B, H, W)`` non-negative maps, in float32.
    """
    grid = feature_grid(features, layer, layout)
    grid = grid if grid.dtype == torch.float32 else grid.float()  # a no-op .float() is an op
    return grid.square().sum(dim=1) if p == 2 else grid.abs().pow(p).sum(dim=1)


def channel_sum(m: Tensor, layer: str = "", layout: tuple[int, int, int] | None = None) -> Tensor:
    """``sum_c m_c`` per pixel of a per-feature map shaped like the features (a squared or
    probed derivative, eqs. 4 and 6): ``(B, H, W)``, tokens on their patch grid."""
    return feature_grid(m, layer, layout).sum(dim=1)


def to_distribution(m: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise non-negative maps into distributions ``p = (m + d) / sum(m + d)`` (section 3).

    Every dimension after the first is flattened into the support, so ``(B, H, W)`` maps give
    ``B`` distributions over ``H * W``. ``d = eps * mean(m) + tiny`` is relative to the map's
    mass, so the result does not depend on the scale of ``m`` (tiny Hessian maps are not washed
    out) and an all-zero map becomes uniform. Computed in float32 even under mixed precision.
    """
    if m.dim() < 2:
        raise ValueError(f"to_distribution needs a batch dimension, got shape {tuple(m.shape)}")
    flat = m.float().flatten(1)
    d = eps * flat.mean(dim=1, keepdim=True) + torch.finfo(torch.float32).tiny
    shifted = flat + d
    return shifted / shifted.sum(dim=1, keepdim=True)


def match_maps(
    student: Tensor, teacher: Tensor, weight_alignment: WeightAlignment = "sorted"
) -> tuple[Tensor, Tensor]:
    """Bring a student map and a teacher map onto one support (docs/design.md section 3).

    Per-sample ``(B, H, W)`` maps: adaptive average pooling of the larger map to the smaller
    spatial size (pixels correspond between any two networks).

    Weight maps (the shape of a convolution weight, one per batch) are reduced to one energy per
    output channel. Channel ``k`` of the teacher has nothing to do with channel ``k`` of the
    student (permuting a network's hidden channels leaves its function unchanged but permutes
    its weight maps), so ``weight_alignment="sorted"`` compares the energies sorted in
    decreasing order, which is invariant to any permutation of input or output channels;
    ``"index"`` compares channel ``k`` with channel ``k`` (the full map when the shapes agree).
    Either way, different channel counts are adaptively pooled to the smaller one.
    Returns ``(B, K)`` or ``(1, K)`` non-negative maps.
    """
    if student.dim() == 3 and teacher.dim() == 3:
        if student.shape[1:] == teacher.shape[1:]:
            return student.flatten(1), teacher.flatten(1)
        size = (min(student.shape[1], teacher.shape[1]), min(student.shape[2], teacher.shape[2]))
        return (
            F.adaptive_avg_pool2d(student.unsqueeze(1), size).squeeze(1).flatten(1),
            F.adaptive_avg_pool2d(teacher.unsqueeze(1), size).squeeze(1).flatten(1),
        )
    if weight_alignment not in WEIGHT_ALIGNMENTS:
        raise ValueError(
            f"weight_alignment must be one of {list(WEIGHT_ALIGNMENTS)}, got {weight_alignment!r}"
        )
    if weight_alignment == "index" and student.shape == teacher.shape:
        return student.reshape(1, -1), teacher.reshape(1, -1)
    per_channel = tuple(range(1, student.dim()))
    s = student.sum(dim=per_channel) if per_channel else student
    t = teacher.sum(dim=tuple(range(1, teacher.dim()))) if teacher.dim() > 1 else teacher
    if weight_alignment == "sorted":
        s = s.sort(descending=True).values
        t = t.sort(descending=True).values
    if s.numel() == t.numel():
        return s.view(1, -1), t.view(1, -1)
    channels = min(s.numel(), t.numel())
    return (
        F.adaptive_avg_pool1d(s.view(1, 1, -1), channels).view(1, -1),
        F.adaptive_avg_pool1d(t.view(1, 1, -1), channels).view(1, -1),
    )


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 or wider: half precision is upcast, float64 stays float64."""
    if t.dtype in (torch.float32, torch.float64):  # no op at all (each is one per step)
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32))


def score(logits: Tensor, target: Tensor, task: Task = "multiclass") -> Tensor:
    """``s_i``, the per-sample scalar a derivative map differentiates (docs/design.md section 1).

    Multi-class: ``log_softmax(z_i)[y_i]`` with ``target`` the class indices. Multi-label:
    ``sum_k y_ik log sigmoid(z_ik)`` over the positive labels, ``target`` a 0/1 matrix.
    """
    z = at_least_float32(logits)
    if task == "multiclass":
        return torch.log_softmax(z, dim=-1).gather(1, target.long().view(-1, 1)).squeeze(1)
    return (F.logsigmoid(z) * target.to(z.dtype)).sum(dim=-1)


def score_curvature(logits: Tensor, u: Tensor, target: Tensor, task: Task) -> Tensor:
    """``H_z u`` with ``H_z = -d^2 s / dz^2`` per sample (positive semi-definite)."""
    z = at_least_float32(logits)
    u = u.to(z.dtype)
    if task == "multiclass":
        p = torch.softmax(z, dim=-1)
        return p * u - p * (p * u).sum(dim=-1, keepdim=True)  # (diag(p) - p p^T) u
    sig = torch.sigmoid(z)
    return sig * (1 - sig) * u * target.to(z.dtype)


def default_target(logits: Tensor, task: Task) -> Tensor:
    """The label-free target: the arg-max class, or the labels with positive logits."""
    if task == "multiclass":
        return logits.argmax(dim=-1)
    return (logits > 0).to(logits.dtype)
