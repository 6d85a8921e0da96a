"""The learning-rate rules of :class:`~lightning_layerkd.LayerwiseLRCallback` as pure functions
(Kokane et al. 2024, eqs. 3, 11-12): the paper's literal rule and the scale-free relative rule,
from an interval's per-layer divergences to each layer's factor. The checks of their options
and inputs are in :mod:`lightning_layerkd.layerwise_lr._checks`; the param groups the factors
rescale in :mod:`lightning_layerkd.param_groups`. Nothing here depends on Lightning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lightning_layerkd.functional.divergence import LN2

Rule = Literal["relative", "paper"]
RULES: tuple[str, ...] = ("relative", "paper")
#: What the factors scale: each crucial layer's learning rate or its weight in the map loss.
Target = Literal["lr", "map_weight"]
TARGETS: tuple[str, ...] = ("lr", "map_weight")


def relative_step(
    totals: Mapping[str, tuple[float, float]],
    eta: dict[str, float],
    updates: dict[str, int],
    reference: dict[str, float],
    *,
    gamma: float,
    noise: float,
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Steps 1-2 of ``rule="relative"`` for one interval from each layer's ``(sum, count)`` of
    per-sample divergences: ``D_j = sum / count / ln 2``; for a layer with signal (see
    :func:`no_signal_reason`, ``noise`` is the noise floor) eq. 12 into ``eta``, one more update
    into ``updates``, the bias-corrected ``eta_hat_j = eta_j / (1 - gamma ** t)`` and, at the
    layer's first update, ``reference[j] = eta_hat_j`` (the three dicts changed in place).

    Returns ``(D, eta_hat, {layer: why it has no signal})``."""
    divergence: dict[str, float] = {}
    eta_hat: dict[str, float] = {}
    silent: dict[str, str] = {}
    for name, (acc, count) in totals.items():
        d = divergence[name] = acc / count / LN2 if count else math.nan  # step 1
        why = no_signal_reason(d, noise)
        if why is not None:
            silent[name] = why
            continue
        eta[name] = gamma * eta.get(name, 0.0) + (1 - gamma) * d  # eq. 12
        updates[name] = updates.get(name, 0) + 1
        eta_hat[name] = eta[name] / (1 - gamma ** updates[name])  # step 2: bias correction
        reference.setdefault(name, eta_hat[name])
    return divergence, eta_hat, silent


def relative_factors(
    eta_hat: Mapping[str, float],
    *,
    power: float = -0.5,
    max_factor: float = 4.0,
    reference: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The factors of ``rule="relative"`` from bias-corrected ``eta_hat`` (eqs. 11-12 made
    scale-free): ``r_j = eta_hat_j / geometric_mean_k(eta_hat_k)`` and
    ``factor_j = clip(r_j ** power, 1 / max_factor, max_factor)``.

    With a single layer the geometric mean is the layer itself; ``r`` is then measured against
    ``reference[j]``, its ``eta_hat`` at its first update. Every ``eta_hat`` must be positive.
    """
    if not eta_hat:
        return {}
    if len(eta_hat) == 1:
        ((name, value),) = eta_hat.items()
        ratios = {name: value / (reference or {}).get(name, value)}
    else:
        log_mean = sum(math.log(v) for v in eta_hat.values()) / len(eta_hat)
        ratios = {name: math.exp(math.log(v) - log_mean) for name, v in eta_hat.items()}
    return {
        name: min(max(r**power, 1.0 / max_factor), max_factor)  # eq. 11, relative and clipped
        for name, r in ratios.items()
    }


def paper_rate(
    alpha: float, eta: float, *, eps: float = 1e-8, min_lr: float = 0.0, max_lr: float | None = None
) -> float:
    """Eq. 11 as written: ``alpha / sqrt(eta + eps)``, clamped to ``[min_lr, max_lr]``."""
    new_alpha = max(alpha / math.sqrt(eta + eps), min_lr)  # eq. 11
    return new_alpha if max_lr is None else min(new_alpha, max_lr)


def paper_divergence(acc: float, count: float, epochs: int, reduction: str) -> float:
    """``A_j`` of ``rule="paper"`` from an interval's summed per-sample divergences ``acc`` over
    ``count`` samples and ``epochs`` epochs: the per-epoch sum (``"sum"``, eq. 3) or the mean."""
    if reduction == "sum":
        return acc / epochs  # eq. 3: sum over the training set
    return acc / count if count else math.nan


def no_signal_reason(divergence: float, noise_floor: float) -> str | None:
    """Why ``rule="relative"`` leaves a layer at factor 1, or ``None`` if its divergence counts."""
    if not math.isfinite(divergence):
        return "not finite"
    if divergence < noise_floor:
        return f"below noise_floor={noise_floor:g}"
    return None


def steps_per_epoch(batches: Any, accumulate_grad_batches: int) -> int | None:
    """Optimizer steps in an epoch of ``batches`` training batches, ``None`` when unknown."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches <= 0:
        return None
    return math.ceil(batches / max(1, accumulate_grad_batches))


def multipliers_in_force(
    rule: str, factor: Mapping[str, float], history: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Each layer's multiplier now in force on top of its scheduler's rate: its factor
    (``rule="relative"``), or the product of all its updates' factors (``"paper"`` compounds)."""
    if rule != "paper":
        return dict(factor)
    product: dict[str, float] = {}
    for record in history:
        for name, update in record.items():
            if name != "epoch":
                product[name] = product.get(name, 1.0) * update["factor"]
    return product
