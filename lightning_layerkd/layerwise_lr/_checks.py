"""The checks :class:`~lightning_layerkd.LayerwiseLRCallback` makes: of its options when it is
built, of the fit when it starts (that it can update within the fit and that the module honours
the contract of its target) and of the per-layer divergences each ``training_step`` returns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_layerkd._common import check_choice
from lightning_layerkd.layerwise_lr.rules import RULES, TARGETS, steps_per_epoch
from lightning_layerkd.param_groups import named_param_groups

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
    check_choice("rule", rule, RULES)
    check_choice("target", target, TARGETS)
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


def check_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, *, every_n_epochs: int, target: str
) -> None:
    """At fit start: refuse a fit too short to update (warn under ``fast_dev_run``, a smoke
    test), a module without ``set_layer_loss_weights`` for ``target="map_weight"`` and
    unnamed param groups for ``target="lr"``."""
    max_epochs = trainer.max_epochs
    fast_dev_run = getattr(trainer, "fast_dev_run", False)  # set by Trainer.__init__
    if fast_dev_run:
        if every_n_epochs > 1:  # Lightning runs one epoch: a smoke test, not refused
            rank_zero_warn(
                f"fast_dev_run={fast_dev_run!r} runs a single epoch, so "
                f"LayerwiseLRCallback(every_n_epochs={every_n_epochs}) will not update "
                f"in it (it updates after each {every_n_epochs} epochs); the run only "
                "checks the wiring"
            )
    elif max_epochs is not None and 0 < max_epochs < every_n_epochs:
        raise ValueError(
            f"LayerwiseLRCallback(every_n_epochs={every_n_epochs}) never updates in a "
            f"fit of max_epochs={max_epochs} (it updates after each {every_n_epochs} "
            "epochs); choose every_n_epochs <= max_epochs"
        )
    if target == "map_weight":
        if not callable(getattr(pl_module, "set_layer_loss_weights", None)):
            raise ValueError(
                "LayerwiseLRCallback(target='map_weight') scales each crucial layer's "
                f"weight in the map loss, but {type(pl_module).__name__} has no "
                "set_layer_loss_weights({layer: weight}) to set them "
                "(DistillationModule has); use target='lr' with this module"
            )
        return
    if not named_param_groups(trainer.optimizers):
        raise ValueError(
            "LayerwiseLRCallback needs optimizer param groups with a 'name' key, one per "
            "crucial layer (DistillationModule.configure_optimizers builds them)"
        )


def warn_if_max_steps_ends_first(trainer: pl.Trainer, every_n_epochs: int) -> None:
    """At train start: warn when ``max_steps`` stops the fit before the first update."""
    steps = steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)
    first_update = (every_n_epochs - trainer.current_epoch) * (steps or 0)  # from here
    if steps and 0 <= trainer.max_steps < trainer.global_step + first_update:
        rank_zero_warn(
            f"LayerwiseLRCallback(every_n_epochs={every_n_epochs}) will not update: "
            f"max_steps={trainer.max_steps} stops the fit before the end of epoch "
            f"{every_n_epochs} ({steps} steps an epoch), where it would first update, "
            "and an epoch cut short by max_steps is no update interval; lower "
            f"every_n_epochs or raise max_steps to at least "
            f"{trainer.global_step + first_update}"
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
