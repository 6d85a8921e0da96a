"""The learning-rate rules of :class:`~lightning_layerkd.LayerwiseLRCallback` as pure functions
(Kokane et al. 2024, eqs. 11-12): the paper's literal rule and the scale-free relative rule,
the validation of their options, the reading of ``training_step``'s per-layer divergences, and
the rescaling of named optimizer param groups (with their schedulers' anchors) that applies
them. Nothing here depends on Lightning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from torch.optim import Optimizer

__all__ = [
    "PAPER_OPTIONS",
    "RELATIVE_OPTIONS",
    "RULES",
    "Rule",
    "check_rule_options",
    "first_group_lrs",
    "layer_divergences",
    "named_param_groups",
    "no_signal_reason",
    "paper_divergence",
    "paper_rate",
    "relative_factors",
    "scale_param_group",
]

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


def check_rule_options(
    *,
    every_n_epochs: int,
    gamma: float,
    rule: str,
    power: float,
    max_factor: float,
    noise_floor: float,
    eps: float,
    eta_init: float,
    reduction: str,
    min_lr: float,
    max_lr: float | None,
) -> None:
    """Validate the options of :class:`~lightning_layerkd.LayerwiseLRCallback`.

    Raises:
        ValueError: an option out of range, or an option of the other rule given a value other
            than its default (it would be ignored).
    """
    if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie in (0, 1) (eq. 12), got {gamma}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if not math.isfinite(power):
        raise ValueError(f"power must be a finite number, got {power}")
    if not max_factor >= 1.0:
        raise ValueError(
            f"max_factor must be at least 1 (factors lie in [1/m, m]), got {max_factor}"
        )
    if not noise_floor >= 0.0:
        raise ValueError(f"noise_floor must be non-negative, got {noise_floor}")
    if eps <= 0:
        raise ValueError(f"eps must be positive (eq. 11), got {eps}")
    if eta_init < 0:
        raise ValueError(f"eta_init must be non-negative, got {eta_init}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if min_lr < 0 or (max_lr is not None and max_lr < min_lr):
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    given = dict(eps=eps, eta_init=eta_init, reduction=reduction, min_lr=min_lr, max_lr=max_lr)
    given_relative = dict(power=power, max_factor=max_factor, noise_floor=noise_floor)
    other, other_rule = (given, "paper") if rule == "relative" else (given_relative, "relative")
    defaults = PAPER_OPTIONS if rule == "relative" else RELATIVE_OPTIONS
    unused = sorted(k for k, v in other.items() if v != defaults[k])
    if unused:
        raise ValueError(
            f"{unused} only apply to rule={other_rule!r}, but rule={rule!r}; pass "
            f"rule={other_rule!r} or leave them out"
        )


def layer_divergences(outputs: Any) -> Mapping[str, Any]:
    """The ``"layer_divergence"`` mapping of a ``training_step`` result, ``{}`` for a skipped
    batch (``None`` or an empty dict); anything else without that mapping, or a divergence that
    is not one value per sample, is an error."""
    if outputs is None or (isinstance(outputs, Mapping) and not outputs):
        return {}  # training_step returned None: the batch contributes nothing
    divergences = outputs.get("layer_divergence") if isinstance(outputs, Mapping) else None
    if not isinstance(divergences, Mapping):
        received = list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            "LayerwiseLRCallback needs training_step to return a dict with "
            "'layer_divergence': {param_group_name: per-sample divergence}; got "
            f"{received}"
        )
    for name, value in divergences.items():
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != 1:
            raise ValueError(
                f"layer_divergence[{name!r}] has shape {shape}; it must hold one divergence per "
                "sample, shape (batch_size,): a per-batch scalar would count once per batch "
                "instead of once per sample (repeat it with .expand(batch_size))"
            )
    return divergences


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


def named_param_groups(optimizers: Iterable[Optimizer]) -> dict[str, list[tuple[Optimizer, int]]]:
    """The param groups that carry a ``"name"``, by name: ``[(optimizer, group index), ...]``."""
    named: dict[str, list[tuple[Optimizer, int]]] = {}
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            if "name" in group:
                named.setdefault(group["name"], []).append((optimizer, index))
    return named


def first_group_lrs(named: Mapping[str, Sequence[tuple[Optimizer, int]]]) -> dict[str, float]:
    """The ``lr`` of the first param group of each name in :func:`named_param_groups`' result."""
    return {
        name: optimizer.param_groups[index]["lr"]
        for name, places in named.items()
        for optimizer, index in places[:1]
    }


def scale_param_group(
    optimizer: Optimizer, index: int, schedulers: Iterable[Any], factor: float
) -> None:
    """Multiply param group ``index`` of ``optimizer`` by ``factor``: its ``lr``, its anchors
    (``initial_lr``; OneCycleLR's ``max_lr`` / ``min_lr``) and the ``base_lrs`` / ``_last_lr``
    entries of those ``schedulers`` (or the ones they wrap) that drive ``optimizer``."""
    group = optimizer.param_groups[index]
    group["lr"] *= factor
    for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its anchors here
        if isinstance(group.get(key), (int, float)):
            group[key] *= factor
    for top in schedulers:
        for scheduler in _with_children(top):
            if getattr(scheduler, "optimizer", None) is optimizer:
                for attribute in ("base_lrs", "_last_lr"):
                    values = getattr(scheduler, attribute, None)
                    if isinstance(values, list) and index < len(values):
                        values[index] *= factor


def _with_children(scheduler: Any) -> list[Any]:
    """A scheduler and, for SequentialLR/ChainedScheduler, the schedulers it wraps."""
    found = [scheduler]
    for child in getattr(scheduler, "_schedulers", None) or []:
        found.extend(_with_children(child))
    return found
