"""The learning-rate rules of :class:`~lightning_layerkd.LayerwiseLRCallback` as pure functions
(Kokane et al. 2024, eqs. 11-12): the paper's literal rule and the scale-free relative rule,
the validation of their options, the reading of ``training_step``'s per-layer divergences, the
rescaling of named optimizer param groups (with their schedulers' anchors) that applies them,
and its composition with SWALR's ``swa_lr``. Nothing here depends on Lightning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from torch.optim import Optimizer

from lightning_layerkd.functional.divergence import LN2

Rule = Literal["relative", "paper"]
RULES: tuple[str, ...] = ("relative", "paper")
#: What the factors scale: each crucial layer's learning rate or its weight in the map loss.
Target = Literal["lr", "map_weight"]
TARGETS: tuple[str, ...] = ("lr", "map_weight")
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
#: The param-group key that remembers the ``swa_lr`` :func:`compose_swa_lrs` gave the group.
SWA_MARK = "layerwise_swa_lr"


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
    target: str = "lr",
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
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if target == "map_weight" and rule != "relative":
        raise ValueError(
            "target='map_weight' scales each layer's map-loss weight by the relative rule's "
            f"factor; rule={rule!r} rescales learning rates only. Use rule='relative'"
        )
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


def steps_per_epoch(batches: Any, accumulate_grad_batches: int) -> int | None:
    """Optimizer steps in an epoch of ``batches`` training batches, ``None`` when unknown."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches <= 0:
        return None
    return math.ceil(batches / max(1, accumulate_grad_batches))


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
    (``initial_lr``; OneCycleLR's ``max_lr`` / ``min_lr``; SWALR's ``swa_lr`` once
    :func:`compose_swa_lrs` has composed it) and the ``base_lrs`` / ``_last_lr`` entries of those
    ``schedulers`` (or the ones they wrap) that drive ``optimizer``."""
    group = optimizer.param_groups[index]
    group["lr"] *= factor
    for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its anchors here
        if isinstance(group.get(key), (int, float)):
            group[key] *= factor
    if _composed(group):  # SWALR's target; one SWALR has just written waits for compose_swa_lrs
        group["swa_lr"] = group[SWA_MARK] = group["swa_lr"] * factor
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


def compose_swa_lrs(
    named: Mapping[str, Sequence[tuple[Optimizer, int]]], multipliers: Mapping[str, float]
) -> dict[str, float]:
    """Multiply the ``swa_lr`` that SWALR (``torch.optim.swa_utils``, as built by Lightning's
    ``StochasticWeightAveraging``) put in each param group of :func:`named_param_groups`' result
    by its layer's multiplier (1 for a layer not in ``multipliers``); returns the new ``swa_lr``
    of the layers in ``multipliers`` that were composed now.

    SWALR anneals ``lr`` towards ``swa_lr`` linearly in both, so a group whose ``lr`` and
    ``swa_lr`` carry the same multiplier keeps it exactly. SWALR writes ``swa_lr`` when it is
    built (also when a resumed fit rebuilds it), while a restored optimizer state brings back the
    composed value: each group remembers (:data:`SWA_MARK`) the value composed last, so every
    ``swa_lr`` SWALR writes is composed once and a restored one is left alone."""
    composed: dict[str, float] = {}
    for name, places in named.items():
        for optimizer, index in places:
            group = optimizer.param_groups[index]
            if not isinstance(group.get("swa_lr"), (int, float)) or _composed(group):
                continue
            group["swa_lr"] = group[SWA_MARK] = group["swa_lr"] * multipliers.get(name, 1.0)
            if name in multipliers:
                composed[name] = float(group["swa_lr"])
    return composed


def _composed(group: Mapping[str, Any]) -> bool:
    """Whether the group's ``swa_lr`` is the one :func:`compose_swa_lrs` composed last."""
    swa_lr = group.get("swa_lr")
    return isinstance(swa_lr, (int, float)) and swa_lr == group.get(SWA_MARK)
