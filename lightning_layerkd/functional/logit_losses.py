"""Logit losses beyond Hinton et al.'s KL: decoupled KD (Zhao et al., CVPR 2022), DIST (Huang et
al., NeurIPS 2022) and logit standardization (Sun et al., CVPR 2024), docs/design.md section 10.

Every loss here is scaled by ``T^2`` like Hinton et al.'s, computed in float32 at least, and
treats the teacher's logits as constants. All are for single-label (multi-class) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Added to the standard deviation in :func:`standardize_logits` (constant logits stay finite).
STD_EPS = 1e-7
#: The smallest product of norms in :func:`pearson_distance` (a constant vector correlates 0).
PEARSON_EPS = 1e-8


def _check(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, K)"
        )


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def standardize_logits(logits: Tensor, eps: float = STD_EPS) -> Tensor:
    """Logit standardization (Sun et al. 2024: their ``Z`` without its ``tau``): per sample,
    ``(z - mean(z)) / (std(z) + eps)`` over the classes, with the population standard deviation
    ``sqrt(mean((z - mean(z))^2))`` of the paper (their code uses Bessel's correction, a constant
    factor ``sqrt(K / (K - 1))`` that a temperature absorbs). ``Z(z; tau)`` of the paper is this
    divided by the base temperature ``tau``, which the losses below do. Invariant to adding a
    constant to a sample's logits and to multiplying them by a positive constant."""
    centred = logits - logits.mean(dim=-1, keepdim=True)
    # the norm's backward is 0, not NaN, at constant logits (sqrt's is not)
    std = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / logits.shape[-1] ** 0.5
    return centred / (std + eps)


def soften(logits: Tensor, temperature: float, *, standardize: bool = False) -> Tensor:
    """``z / T``, or ``Z(z; T)`` of Sun et al. with ``standardize``: the argument of the
    temperature softmax, in float32 at least."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (standardize_logits(z) if standardize else z) / temperature


def decoupled_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """TCKD and NCKD of decoupled KD (Zhao et al. 2022, eqs. 1-7), each times ``T^2``.

    With ``p = softmax(z / T)`` (eq. 1) and ``t`` the target class: ``b = [p_t, 1 - p_t]``
    (eq. 2) and ``p_hat`` the softmax over the non-target classes alone (eq. 3).
    ``TCKD = KL(b^T || b^S)``, ``NCKD = KL(p_hat^T || p_hat^S)``, so that Hinton's
    ``KD = TCKD + (1 - p_t^T) NCKD`` (eqs. 4-7). ``p_hat`` is the exact softmax of the other
    logits (their code subtracts 1000 from the target logit instead). ``standardize``: Sun et
    al.'s ``Z(z; T)`` in place of ``z / T``. ``reduction``: ``"mean"`` over samples or
    ``"none"``.
    """
    _check(student_logits, teacher_logits, temperature)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError("decoupled KD needs at least 2 classes (a target and a non-target)")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(
            f"decoupled KD needs one class index per sample, shape ({student_logits.shape[0]},); "
            f"got targets of shape {tuple(target.shape)}"
        )
    s = soften(student_logits, temperature, standardize=standardize)
    t = soften(teacher_logits.detach(), temperature, standardize=standardize)
    is_target = F.one_hot(target.long(), num_classes).bool()

    def binary_and_rest(z: Tensor) -> tuple[Tensor, Tensor]:
        """``log b`` (B, 2) and ``log p_hat`` (B, K - 1) from the softened logits."""
        log_all = torch.logsumexp(z, dim=-1, keepdim=True)
        rest = z[~is_target].view(z.shape[0], num_classes - 1)
        log_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
        log_b = torch.cat([z[is_target].unsqueeze(-1), log_rest], dim=-1) - log_all
        return log_b, rest - log_rest

    log_b_s, log_hat_s = binary_and_rest(s)
    log_b_t, log_hat_t = binary_and_rest(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=-1)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).sum(dim=-1)
    scale = temperature**2
    return _reduce(scale * tckd, reduction), _reduce(scale * nckd, reduction)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, eq. 8): ``alpha TCKD + beta NCKD``, times ``T^2``, the mean
    over samples (:func:`decoupled_kd_terms`). The warm-up of its weight is the method's."""
    tckd, nckd = decoupled_kd_terms(
        student_logits, teacher_logits, target, temperature, standardize=standardize
    )
    return alpha * tckd + beta * nckd


def pearson_distance(a: Tensor, b: Tensor, dim: int = -1, eps: float = PEARSON_EPS) -> Tensor:
    """``1 - rho_p(a, b)`` along ``dim`` (Huang et al. 2022: their distance ``d_p``): ``rho_p`` is
    Pearson's correlation, the cosine of the centred vectors, the product of norms clamped at
    ``eps`` (a constant vector correlates 0). In ``[0, 2]``; invariant to ``a -> m a + n`` with
    ``m > 0`` (the property DIST rests on), likewise for ``b``."""
    a_c = a - a.mean(dim=dim, keepdim=True)
    b_c = b - b.mean(dim=dim, keepdim=True)
    norms = torch.linalg.vector_norm(a_c, dim=dim) * torch.linalg.vector_norm(b_c, dim=dim)
    return 1 - (a_c * b_c).sum(dim=dim) / norms.clamp_min(eps)


def dist_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> tuple[Tensor, Tensor]:
    """DIST's inter- and intra-class relation losses (Huang et al. 2022), each
    times ``T^2``: with ``Y = softmax(z / T)`` of shape ``(B, K)``, inter is the mean over samples
    of ``1 - rho_p(Y_i,:^S, Y_i,:^T)`` (over the classes), intra the mean over classes of
    ``1 - rho_p(Y_:,j^S, Y_:,j^T)`` (over the batch). ``standardize``: ``Z(z; T)`` in place of
    ``z / T``."""
    _check(student_logits, teacher_logits, temperature)
    y_s = soften(student_logits, temperature, standardize=standardize).softmax(dim=-1)
    y_t = soften(teacher_logits.detach(), temperature, standardize=standardize).softmax(dim=-1)
    scale = temperature**2
    inter = pearson_distance(y_s, y_t, dim=1).mean()
    intra = pearson_distance(y_s, y_t, dim=0).mean()
    return scale * inter, scale * intra


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 2.0,
    gamma: float = 2.0,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> Tensor:
    """DIST (Huang et al. 2022, the total loss without its cross-entropy): ``beta L_inter + gamma
    L_intra`` (:func:`dist_terms`)."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature, standardize=standardize)
    return beta * inter + gamma * intra
