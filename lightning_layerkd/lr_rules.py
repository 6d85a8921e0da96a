"""The learning-rate rules of :class:`~lightning_layerkd.LayerwiseLRCallback` as pure functions
(Kokane et al. 2024, eqs. 11-12): the paper's literal rule and the scale-free relative rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["PAPER_OPTIONS", "RELATIVE_OPTIONS", "RULES", "Rule", "paper_rate", "relative_factors"]

Rule = Literal["relative", "paper"]
RULES: tuple[str, ...] = ("relative", "paper")
#: Options of ``rule="paper"`` only, with their defaults (another value with "relative" is an
#: error, since it would be ignored).
PAPER_OPTIONS: dict[str, Any] = {
    "eps": 1e-8,
    "eta_init": 0.0,
    "reduction": "sum",
    "min_lr": 0.0,
    "max_lr": None,
}
#: Options of ``rule="relative"`` only, with their defaults.
RELATIVE_OPTIONS: dict[str, Any] = {"power": -0.5, "max_factor": 4.0, "noise_floor": 1e-6}


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
