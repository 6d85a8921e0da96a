"""The checks :class:`~lightning_layerkd.LayerwiseLRCallback` makes when a fit starts: that it
can update within the fit and that the module honours the contract of its target."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_layerkd.layerwise_lr.rules import named_param_groups, steps_per_epoch


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
