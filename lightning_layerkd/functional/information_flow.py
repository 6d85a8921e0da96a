"""Information-flow distillation, PKT losses (Passalis et al. 2020, eqs. 5-10).

Probabilistic knowledge transfer (PKT) between one student layer and one teacher layer matches
the conditional probabilities of eqs. 5-6, computed from a kernel over the samples of a batch,
with the Jeffreys divergence of eq. 8; the hybrid objective of eq. 7 adds the divergences of a
cosine kernel and a Student-t kernel. :func:`multi_layer_pkt_loss` is eq. 9 with the
critical-period weights of eq. 10 (:func:`critical_period_weights`). Measuring the information
flow of a network and matching layers by it (eqs. 1-4) is
:mod:`lightning_layerkd.functional.layer_matching`.

Notation: a batch of ``N`` samples, features ``(N, ...)`` flattened to ``(N, D)`` per sample;
student and teacher layers may have different ``D`` (only ``N`` must agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Kernel = Literal["cosine", "student_t"]
LossKernel = Literal["hybrid", "cosine", "student_t"]
Reduction = Literal["sum", "mean"]
KERNELS: tuple[str, ...] = ("cosine", "student_t")
LOSS_KERNELS: tuple[str, ...] = ("hybrid", "cosine", "student_t")
REDUCTIONS: tuple[str, ...] = ("sum", "mean")

#: Default of the ``eps`` guards (the value of the PKT papers).
EPS = 1e-7


def flatten_features(x: Tensor, name: str = "features") -> Tensor:
    """``(N, ...) -> (N, D)``, promoted to float32 unless already float32/float64."""
    if x.dim() == 0:
        raise ValueError(f"{name} need a batch dimension, got a scalar")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.reshape(x.shape[0], -1)


def _pair(a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    fa = flatten_features(a)
    if b is None:
        return fa, fa
    fb = flatten_features(b).to(fa.dtype)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(
            f"the kernel needs features of one dimension, got {fa.shape[1]} and {fb.shape[1]}"
        )
    return fa, fb


def _unit(x: Tensor) -> Tensor:
    # Rows scaled to unit norm; an exact zero row stays zero with a zero gradient (a clamped
    # norm, as in F.normalize, would give it a gradient of 1 / eps).
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    pos = norm > 0
    return torch.where(pos, x / torch.where(pos, norm, 1.0), 0.0)


def cosine_kernel(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Cosine kernel ``K_c(a, b) = (a^T b / (||a|| ||b||) + 1) / 2`` (section 3.1).

    Args:
        a: ``(N, ...)`` features, flattened per sample.
        b: ``(M, ...)`` features with the same per-sample size; defaults to ``a``.

    Returns:
        ``(N, M)`` kernel values in ``[0, 1]``. A zero vector has similarity 0 with everything,
        i.e. ``K = 1/2`` (its direction is undefined), and receives a zero gradient.
    """
    fa, fb = _pair(a, b)
    na = _unit(fa)
    nb = na if b is None else _unit(fb)
    s = (na @ nb.T).clamp(-1.0, 1.0)
    return 0.5 * (s + 1.0)


def student_t_kernel(a: Tensor, b: Tensor | None = None, d: float = 1.0) -> Tensor:
    """Student-t kernel ``K_T(a, b) = 1 / (1 + ||a - b||_2^d)`` (section 3.1, ``d = 1``).

    The paper's typeset formula shows ``||a - b||_2^2`` next to "where d is typically set to
    1"; we read the exponent as ``d`` (docs/design.md section 6), so the default is the plain
    Euclidean distance. Distances come from ``||a||^2 + ||b||^2 - 2 a^T b`` after centring both
    sets on the mean of ``a`` (translation invariant, less cancellation); a zero distance
    contributes a zero (sub)gradient instead of the ``inf`` of ``sqrt`` at 0.

    Returns:
        ``(N, M)`` kernel values in ``(0, 1]``.
    """
    if d <= 0:
        raise ValueError(f"student_t_kernel needs d > 0, got {d}")
    fa, fb = _pair(a, b)
    centre = fa.mean(dim=0, keepdim=True)
    fa = fa - centre
    fb = fa if b is None else fb - centre
    sq = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2.0 * (fa @ fb.T)
    sq = sq.clamp_min(0.0)
    if b is None:  # exact zeros on the diagonal of K(x, x)
        sq = sq * (1.0 - torch.eye(sq.shape[0], dtype=sq.dtype, device=sq.device))
    pos = sq > 0
    dist_d = torch.where(pos, torch.where(pos, sq, 1.0).pow(0.5 * d), 0.0)
    return 1.0 / (1.0 + dist_d)


def conditional_probabilities(
    features: Tensor, kernel: Kernel = "cosine", d: float = 1.0, eps: float = EPS
) -> Tensor:
    """PKT conditional probabilities ``p_{i|j}`` of eqs. 5-6.

    Eq. 5: ``p_{i|j} = K(x_i, x_j) / sum_{i != j} K(x_i, x_j)``: for each *conditioning*
    sample ``j`` a distribution over its neighbours ``i``, normalised over the neighbour index
    ``i`` with the self-pair excluded (``p_{j|j} = 0``).

    Layout: the result ``P`` has ``P[j, i] = p_{i|j}``, so **each row sums to one** (row ``j`` is
    the neighbour distribution of sample ``j``, the inner sum of eq. 8 reads
    ``P[i, :]`` as ``p_{.|i}``). Columns do not sum to one in general. Both kernels are
    symmetric, so dividing ``K`` by its row sums is exactly the paper's sum over ``i`` at fixed
    ``j``; ``P`` is the transpose of the matrix ``[p_{i|j}]_{i, j}``.

    Args:
        features: ``(N, ...)`` features, flattened per sample; ``N >= 2``.
        kernel: ``"cosine"`` (:func:`cosine_kernel`) or ``"student_t"``
            (:func:`student_t_kernel`).
        d: the Student-t exponent.
        eps: lower bound of the row sums (only matters when every other sample has kernel 0).

    Returns:
        ``(N, N)`` probabilities with a zero diagonal, in float32 (float64 if given).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    x = flatten_features(features)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"conditional probabilities need at least 2 samples, got {n}")
    k = cosine_kernel(x) if kernel == "cosine" else student_t_kernel(x, d=d)
    k = k * (1.0 - torch.eye(n, dtype=k.dtype, device=k.device))  # i != j
    return k / k.sum(dim=1, keepdim=True).clamp_min(eps)


def jeffreys_divergence(
    p: Tensor, q: Tensor, eps: float = EPS, reduction: Reduction = "sum"
) -> Tensor:
    """Jeffreys divergence of eq. 8: ``sum_i sum_{j != i} (p_{j|i} - q_{j|i}) (log p - log q)``.

    The symmetric KL, ``KL(p || q) + KL(q || p)``, summed over every pair of the batch. The
    logs are taken of ``p + eps`` and ``q + eps``, so exact zeros (the excluded diagonal, a
    cosine kernel of 0) are finite in value and gradient; entries with ``p == q`` contribute 0
    exactly, so the zero diagonals of eqs. 5-6 drop out as ``j != i`` asks.

    Args:
        p: ``(N, N)`` conditional probabilities (:func:`conditional_probabilities`), the teacher.
        q: the student's, of the same shape. The divergence is symmetric in ``p`` and ``q``.
        eps: added inside the logs; must be positive.
        reduction: ``"sum"`` over all pairs, as eq. 8 writes it (the paper samples it on
            batches of 64-128), or ``"mean"``: that sum divided by ``N``, the average Jeffreys
            divergence of one sample's neighbour distribution (independent of the batch size's
            scale).

    Returns:
        A scalar tensor.
    """
    if p.shape != q.shape:
        raise ValueError(
            f"jeffreys_divergence needs p and q of one shape, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"jeffreys_divergence needs eps > 0, got {eps}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    total = ((p - q) * (torch.log(p + eps) - torch.log(q + eps))).sum()
    if reduction == "mean":
        rows = p.numel() // p.shape[-1] if p.dim() > 0 else 1
        total = total / rows
    return total


def pkt_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    kernel: LossKernel = "hybrid",
    d: float = 1.0,
    eps: float = EPS,
    reduction: Reduction = "sum",
) -> Tensor:
    """PKT loss of one layer pair, the hybrid objective of eq. 7.

    ``L = D(P_c^t || P_c^s) + D(P_T^t || P_T^s)`` (eq. 7): the unweighted sum of the Jeffreys
    divergences (eq. 8) of the cosine-kernel and of the Student-t-kernel conditional
    probabilities (eqs. 5-6). ``kernel="cosine"`` or ``"student_t"`` keeps only that term (the
    single-kernel PKT). The cosine term is invariant to the scale of either feature set.

    Args:
        student_features: ``(N, ...)`` student features of one layer, flattened per sample.
        teacher_features: ``(N, ...)`` teacher features (any per-sample size). Not detached:
            pass them detached or computed under ``torch.no_grad()`` for a frozen teacher.
        kernel: ``"hybrid"`` (eq. 7), ``"cosine"`` or ``"student_t"``.
        d: the Student-t exponent.
        eps: the guard of :func:`conditional_probabilities` and :func:`jeffreys_divergence`.
        reduction: see :func:`jeffreys_divergence`.

    Returns:
        A scalar tensor, zero iff the conditional probabilities agree.
    """
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"kernel must be one of {LOSS_KERNELS}, got {kernel!r}")
    if student_features.shape[:1] != teacher_features.shape[:1]:
        raise ValueError(
            "pkt_loss needs the same number of samples, got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
        )
    kernels: tuple[Kernel, ...] = ("cosine", "student_t") if kernel == "hybrid" else (kernel,)
    total = student_features.new_zeros((), dtype=flatten_features(student_features).dtype)
    for k in kernels:
        p_t = conditional_probabilities(teacher_features, k, d, eps)
        p_s = conditional_probabilities(student_features, k, d, eps)
        total = total + jeffreys_divergence(p_t, p_s.to(p_t.dtype), eps, reduction)
    return total


def critical_period_weights(
    num_layers: int, epoch: int, alpha_init: float = 100.0, gamma: float = 0.7
) -> list[float]:
    """Critical-period weights of eq. 10: ``alpha_i = alpha_init * gamma^k``, 1 for the last.

    ``k`` is the current training epoch, counted from 0 (Lightning's ``current_epoch``), so the
    first epoch weighs the intermediate layers by ``alpha_init`` itself.

    Returns:
        ``num_layers`` weights, layer order; the last (the layer of the task at hand) is 1.
    """
    if num_layers < 1:
        raise ValueError(f"critical_period_weights needs num_layers >= 1, got {num_layers}")
    if epoch < 0:
        raise ValueError(f"critical_period_weights needs epoch >= 0, got {epoch}")
    alpha = float(alpha_init) * float(gamma) ** int(epoch)
    return [alpha] * (num_layers - 1) + [1.0]


def multi_layer_pkt_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    weights: Sequence[float],
    kernel: LossKernel = "hybrid",
    d: float = 1.0,
    eps: float = EPS,
    reduction: Reduction = "sum",
) -> Tensor:
    """Multi-layer loss of eq. 9: ``L = sum_i alpha_i L^(i,i)``, ``L^(i,i)`` from eq. 7.

    Layer ``i`` of the student is paired with layer ``i`` of the (auxiliary) teacher; the
    weights are typically :func:`critical_period_weights` (eq. 10).
    """
    if not (len(student_feats) == len(teacher_feats) == len(weights)):
        raise ValueError(
            "multi_layer_pkt_loss needs one weight per layer pair, got "
            f"{len(student_feats)} student, {len(teacher_feats)} teacher layers and "
            f"{len(weights)} weights"
        )
    if len(weights) == 0:
        raise ValueError("multi_layer_pkt_loss needs at least one layer pair")
    terms = [
        pkt_loss(s, t, kernel, d, eps, reduction)
        for s, t in zip(student_feats, teacher_feats, strict=True)
    ]
    return weighted_sum(terms, weights)


def weighted_sum(terms: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i alpha_i L_i``: eq. 9's combination of per-layer losses already computed."""
    total: Tensor | None = None
    for term, w in zip(terms, weights, strict=True):
        total = float(w) * term if total is None else total + float(w) * term
    if total is None:
        raise ValueError("eq. 9 needs at least one layer pair")
    return total
