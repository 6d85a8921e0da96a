"""Divergences: the Jensen-Shannon divergence between map distributions (Kokane et al. 2024,
eqs. 8-10) and logit distillation's temperature-scaled KL (Hinton et al. 2015).

:func:`js_divergence` is the reference, for any two distributions. :func:`map_js_divergences`
is what the map methods train with: every crucial layer's maps made distributions and compared
in one fused autograd function with a hand-written backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_layerkd.functional.logit_losses import soften
from lightning_layerkd.functional.maps import at_least_float32

#: The upper bound of the natural-log JSD with equal weights.
LN2 = math.log(2.0)


def _safe_log(x: Tensor) -> Tensor:
    # log(x) where x > 0 and 0 elsewhere; the mask keeps the backward finite at exact zeros.
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)))


def _log_one_plus(r: Tensor, one_plus_r: Tensor) -> Tensor:
    """``log(1 + r)`` for ``r`` in ``[-1, 1]``, given ``1 + r`` computed directly: ``log1p(r)``
    near 0 (accurate for nearly equal maps), ``log(1 + r)`` elsewhere (accurate where ``r``
    rounds to -1 for a tiny ``p``), 0 at ``1 + r = 0`` (the term it multiplies is then 0).
    Both branches get safe inputs, so the backward stays finite."""
    near = r > -0.5
    log1p = torch.log1p(torch.where(near, r, torch.zeros_like(r)))
    far = torch.where(near | (one_plus_r <= 0), torch.ones_like(one_plus_r), one_plus_r)
    return torch.where(near, log1p, torch.log(far))


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
    handled (``0 log 0 = 0``) with a finite backward. Computed per element as
    ``(p log1p(r) + q log1p(-r)) / 2`` with ``r = (p - q) / (p + q)``, a form whose terms are
    never negative, so nearly equal maps give a small non-negative value in float32 too.

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
    # Eqs. 9-10 with M = (p + q) / 2 rewritten per element: KL(p || M) has the terms
    # p log(2p / (p + q)) = p log1p(r) with r = (p - q) / (p + q), and KL(q || M) has
    # q log1p(-r). Each pair p log1p(r) + q log1p(-r) = (p + q) / 2 * f(r) with f convex and
    # f(0) = 0, so it is >= 0; the textbook form sums signed terms whose rounding leaves nearly
    # equal maps below 0 in float32. Rounding can still leave a pair at -1e-15: clamped.
    total = p + q
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    r = (p - q) / safe_total
    p_term = p * _log_one_plus(r, 2 * p / safe_total)
    q_term = q * _log_one_plus(-r, 2 * q / safe_total)
    return (0.5 * (p_term + q_term).clamp_min(0.0)).sum(dim)  # eq. 9, >= 0 by construction


#: ``eps`` of :func:`~lightning_layerkd.functional.maps.to_distribution`, the relative floor of a
#: map.
MAP_EPS = 1e-8
_TINY = torch.finfo(torch.float32).tiny


def map_js_divergences(
    student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = MAP_EPS
) -> Tensor:
    """Per layer ``j`` and row ``i``, ``JSD(to_distribution(student[j])_i,
    to_distribution(teacher[j])_i)`` (eqs. 8-10 on the maps of section 3): ``(N, L)``.

    The same values as :func:`js_divergence` of
    :func:`~lightning_layerkd.functional.maps.to_distribution` (to float rounding) and the same
    gradients, in one autograd node for all layers: about 15 ops per layer forward and
    backward where the composition of differentiable ops runs some 150 (every ``where`` that
    keeps a log finite costs its own backward). The backward is written out: with ``p`` the
    student's distribution, ``dJSD/dp = log(2p / (p + q)) / 2``, then through the
    normalisation ``p = (m + d) / Z``. It is not differentiable again.

    Args:
        student: per layer, non-negative maps ``(N, K_j)``; rows are samples (or one row for
            a per-batch weight map), ``N`` the same for every layer.
        teacher: maps of the same shapes, usually constants (they get a gradient when they
            require one).
        eps: the relative floor ``d = eps * mean(m) + tiny`` of ``to_distribution``.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"map_js_divergences needs one teacher map per student map and at least one, got "
            f"{len(student)} student and {len(teacher)} teacher maps"
        )
    rows = student[0].shape[0] if student[0].dim() == 2 else -1
    for j, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.dim() != 2 or s.shape != t.shape or s.shape[0] != rows:
            raise ValueError(
                f"map_js_divergences needs (N, K_j) maps of the same shape for student and "
                f"teacher and one N for every layer; layer {j} has student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}, layer 0 has N={rows}"
            )
    out: Tensor = _MapJSD.apply(eps, len(student), *student, *teacher)
    return out


class _MapJSD(torch.autograd.Function):
    """The fused normalisation and JSD of :func:`map_js_divergences`."""

    @staticmethod
    def forward(ctx: Any, eps: float, layers: int, *maps: Tensor) -> Tensor:
        rows = maps[0].shape[0]
        sizes = [m.shape[1] for m in maps[:layers]]
        parts, norms = [], []
        for s, t, size in zip(maps[:layers], maps[layers:], sizes, strict=True):
            m = at_least_float32(torch.cat((s, t)))  # (2N, K): student rows, then teacher rows
            total = m.sum(dim=1, keepdim=True)
            d = total * (eps / size) + _TINY  # eps * mean(m) + tiny (section 3)
            z = torch.add(total, d, alpha=size)  # sum(m + d)
            parts.append((m + d) / z)
            norms.append(z)
        p, q = torch.cat(parts, dim=1).chunk(2)
        pq = p + q  # > 0: every entry of a distribution is at least eps / K-ish
        r = (p - q) / pq
        # log(2p / (p + q)) = log1p(r), accurate near r = 0 (nearly equal maps); where r rounds
        # to -1 (p tiny next to q), log(2p / (p + q)) directly. Likewise for q with -r.
        log_p = torch.where(r > -0.5, torch.log1p(r), torch.log(p * 2 / pq))
        log_q = torch.where(r < 0.5, torch.log1p(-r), torch.log(q * 2 / pq))
        # eq. 9 per entry: (p log(p / M) + q log(q / M)) / 2 with M = (p + q) / 2 (eq. 10),
        # >= 0 in exact arithmetic; rounding may leave -1e-15, clamped
        terms = (p * log_p + q * log_q).clamp_min_(0.0).split(sizes, dim=1)
        jsd = torch.stack([term.sum(dim=1) for term in terms], dim=1).mul_(0.5)
        ctx.layers, ctx.eps, ctx.sizes, ctx.rows = layers, eps, sizes, rows
        ctx.save_for_backward(p, q, log_p, log_q, *norms)
        return jsd

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        p, q, log_p, log_q, *norms = ctx.saved_tensors
        layers, rows, sizes = ctx.layers, ctx.rows, ctx.sizes
        half = (grad * 0.5).split(1, dim=1)  # dJSD/dp = log(2p / (p + q)) / 2
        grads: list[Tensor | None] = [None] * (2 * layers)
        for side, (dist, logs) in enumerate(((p, log_p), (q, log_q))):
            if not any(ctx.needs_input_grad[2 + side * layers : 2 + (side + 1) * layers]):
                continue
            for j, (pj, lj, gj) in enumerate(
                zip(dist.split(sizes, dim=1), logs.split(sizes, dim=1), half, strict=True)
            ):
                z = norms[j].narrow(0, side * rows, rows)
                g_p = lj * gj
                # p = (m + d) / z with z = sum(m + d): d(m + d) = (g_p - <g_p, p>) / z ...
                g_shift = (g_p - (g_p * pj).sum(dim=1, keepdim=True)) / z
                # ... and d = eps * mean(m) adds eps / K * sum of that to every entry
                g_m = g_shift + g_shift.sum(dim=1, keepdim=True) * (ctx.eps / sizes[j])
                source = ctx.needs_input_grad[2 + side * layers + j]
                grads[side * layers + j] = g_m if source else None
        return (None, None, *grads)


def logit_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    *,
    task: str = "multiclass",
    reduction: str = "mean",
    standardize: bool = False,
) -> Tensor:
    """Logit distillation (Hinton et al. 2015, section 2): ``T^2 KL(p_T || p_S)`` with
    ``p = softmax(z / T)``; the ``T^2`` keeps its gradient's scale independent of ``T``.
    ``standardize``: Sun et al. 2024's ``p = softmax(Z(z; T))``, the logits z-scored per sample
    first (:func:`~lightning_layerkd.functional.logit_losses.standardize_logits`; multi-class
    only).

    ``task="multilabel"`` treats each label as its own two-class softmax (a sigmoid):
    ``T^2 mean_k KL(Bernoulli(sigmoid(z_T,k / T)) || Bernoulli(sigmoid(z_S,k / T)))``.
    ``reduction``: ``"mean"`` over samples or ``"none"`` (one value per sample). Computed in
    float32 at least; the teacher's logits are constants.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if standardize and task != "multiclass":
        raise ValueError(
            f"standardize=True needs task='multiclass' (one softmax over the classes), got {task!r}"
        )
    s = soften(student_logits, temperature, standardize=standardize)
    t = soften(teacher_logits.detach(), temperature, standardize=standardize)
    if task == "multiclass":
        log_p_t, log_p_s = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
        per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    elif task == "multilabel":
        # KL between Bernoullis: q log(q/p) + (1-q) log((1-q)/(1-p)), with log-sigmoids
        q = torch.sigmoid(t)
        kl = q * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - q) * (
            F.logsigmoid(-t) - F.logsigmoid(-s)
        )
        per_sample = kl.mean(dim=-1)
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    loss = temperature**2 * per_sample
    return loss.mean() if reduction == "mean" else loss
