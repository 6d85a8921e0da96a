"""``LayerwiseLRCallback``: layer-wise learning rates (Kokane et al. 2024, eqs. 3, 11, 12)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LayerwiseLRCallback"]


class LayerwiseLRCallback(Callback):
    """Rescale each crucial layer's learning rate from its accumulated JSD every N epochs.

    Per crucial layer ``j`` (an optimizer param group named ``j``) the callback sums the
    per-sample divergences that ``training_step`` returns in ``outputs["layer_divergence"][j]``
    over the training batches of an interval (not sanity checks, not validation). At the end of
    every ``every_n_epochs``-th training epoch (design.md section 5):

    1. the sums and counts are all-reduced over processes, so every rank gets the same rates;
    2. ``A_j = acc_j / epochs_in_interval`` (``reduction="sum"``: eq. 3 sums over the N training
       samples) or ``acc_j / n_j`` (``reduction="mean"``);
    3. ``eta_j = gamma * eta_j + (1 - gamma) * A_j`` (eq. 12);
    4. ``alpha_j = alpha_j / sqrt(eta_j + eps)`` (eq. 11), clamped to ``[min_lr, max_lr]``;
    5. the factor ``alpha_j' / alpha_j`` is applied to the group's ``lr`` and ``initial_lr``
       (and OneCycleLR's ``max_lr``/``min_lr`` anchors) and to every scheduler's ``base_lrs``,
       so chainable (MultiStepLR) and closed-form (LambdaLR, OneCycleLR) schedules keep it.

    The rule raises a rate when ``eta_j + eps < 1`` and lowers it otherwise; the applied factor is
    logged as ``layerwise/factor/<layer>``, next to ``layerwise/lr``, ``layerwise/eta`` and
    ``layerwise/divergence`` (``A_j``). A non-finite ``A_j`` skips that layer with a warning.

    The update runs when the last training batch of the epoch ends: after Lightning has stepped
    that epoch's schedulers (so ``alpha_j`` is the rate the next epoch would use), before
    validation and checkpointing, so a run resumed from any end-of-epoch checkpoint follows the
    same learning rates as one that was not interrupted. ``min_lr``/``max_lr`` bound the rate
    set by the update; a closed-form scheduler may later move it by its own schedule.

    Works with any LightningModule whose param groups carry ``"name"`` and whose
    ``training_step`` returns ``{"loss": ..., "layer_divergence": {name: per-sample JSD}}``,
    such as :class:`~lightning_layerkd.DistillationModule`.

    Args:
        every_n_epochs: update interval in epochs (the paper: 25).
        gamma: the momentum of eq. 12, in (0, 1).
        eps: the constant of eq. 11.
        eta_init: ``eta_j`` before the first update.
        reduction: ``"sum"`` (the paper) or ``"mean"``, see step 2.
        min_lr: lower clamp of the new rate.
        max_lr: upper clamp of the new rate (``None``: no upper clamp).
    """

    def __init__(
        self,
        every_n_epochs: int = 25,
        gamma: float = 0.9,
        eps: float = 1e-8,
        eta_init: float = 0.0,
        reduction: Literal["sum", "mean"] = "sum",
        min_lr: float = 0.0,
        max_lr: float | None = None,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1) (eq. 12), got {gamma}")
        if eps <= 0:
            raise ValueError(f"eps must be positive (eq. 11), got {eps}")
        if eta_init < 0:
            raise ValueError(f"eta_init must be non-negative, got {eta_init}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if min_lr < 0 or (max_lr is not None and max_lr < min_lr):
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        self.every_n_epochs = every_n_epochs
        self.gamma = gamma
        self.eps = eps
        self.eta_init = eta_init
        self.reduction = reduction
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.eta: dict[str, float] = {}
        self._sum: dict[str, Tensor | float] = {}
        self._count: dict[str, int] = {}
        self._epochs_in_interval = 0
        self._last_epoch_ended = -1
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, gamma=self.gamma, reduction=self.reduction
        )

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs < self.every_n_epochs:
            raise ValueError(
                f"LayerwiseLRCallback(every_n_epochs={self.every_n_epochs}) never updates with "
                f"max_epochs={max_epochs}; choose every_n_epochs <= max_epochs"
            )
        names = set(self._named_groups(trainer))
        if not names:
            raise ValueError(
                "LayerwiseLRCallback needs optimizer param groups with a 'name' key, one per "
                "crucial layer (DistillationModule.configure_optimizers builds them)"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        skipped = outputs is None or (isinstance(outputs, Mapping) and not outputs)
        divergences = outputs.get("layer_divergence") if isinstance(outputs, Mapping) else None
        if skipped:  # training_step returned None: the batch contributes nothing
            divergences = {}
        elif not isinstance(divergences, Mapping):
            received = list(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                "LayerwiseLRCallback needs training_step to return a dict with "
                "'layer_divergence': {param_group_name: per-sample divergence}; got "
                f"{received}"
            )
        groups = self._named_groups(trainer)
        for name, value in divergences.items():
            if name not in groups:
                raise ValueError(
                    f"layer_divergence has layer {name!r} but no optimizer param group has that "
                    f"name; param groups: {sorted(groups)}"
                )
            value = torch.as_tensor(value).detach()
            dtype = torch.float32 if value.device.type == "mps" else torch.float64
            self._sum[name] = self._sum.get(name, 0.0) + value.to(dtype).sum()
            self._count[name] = self._count.get(name, 0) + value.numel()
        if _is_last_batch(trainer, batch_idx):
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Normally done at the last batch; this catches epochs whose length was not known.
        if self._last_epoch_ended != trainer.current_epoch:
            self._end_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ the rule
    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_epoch_ended = trainer.current_epoch
        self._epochs_in_interval += 1
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._update(trainer, pl_module)
        for name, lr in self._current_lrs(trainer).items():
            _log(pl_module, "lr", name, lr)
            if name in self._count or name in self.eta:  # crucial layers: eta every epoch too
                _log(pl_module, "eta", name, self.eta.get(name, self.eta_init))

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = sorted(self._sum)
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        stats = torch.tensor(
            [[float(self._sum[n]), float(self._count[n])] for n in names],
            dtype=dtype,
            device=device,
        ).reshape(-1, 2)
        stats = trainer.strategy.reduce(stats, reduce_op="sum")  # step 1: all ranks agree
        record: dict[str, Any] = {"epoch": trainer.current_epoch}
        for name, (acc, count) in zip(names, stats.tolist(), strict=True):
            if self.reduction == "sum":
                divergence = acc / self._epochs_in_interval  # eq. 3: sum over the training set
            else:
                divergence = acc / count if count else math.nan
            if not math.isfinite(divergence):
                rank_zero_warn(
                    f"LayerwiseLRCallback: accumulated divergence of layer {name!r} is "
                    f"{divergence}; its learning rate is left unchanged this interval"
                )
                continue
            eta = self.gamma * self.eta.get(name, self.eta_init) + (1 - self.gamma) * divergence
            self.eta[name] = eta  # eq. 12
            factor = self._rescale(trainer, name, eta)
            if factor > 10 and self.max_lr is None:
                rank_zero_warn(
                    f"LayerwiseLRCallback: the learning rate of layer {name!r} grew {factor:.3g}x "
                    f"because eta={eta:.3g} is small (eq. 11 divides by sqrt(eta + eps)); set "
                    "max_lr to bound it"
                )
            record[name] = {"divergence": divergence, "eta": eta, "factor": factor}
            _log(pl_module, "divergence", name, divergence)
            _log(pl_module, "factor", name, factor)
        self.history.append(record)
        self._sum, self._count, self._epochs_in_interval = {}, {}, 0

    def _rescale(self, trainer: pl.Trainer, name: str, eta: float) -> float:
        """Apply eq. 11 to every param group named ``name``; return the factor used."""
        factor = 1.0
        for optimizer, index in self._named_groups(trainer)[name]:
            group = optimizer.param_groups[index]
            alpha = group["lr"]
            new_alpha = alpha / math.sqrt(eta + self.eps)  # eq. 11
            new_alpha = max(new_alpha, self.min_lr)
            if self.max_lr is not None:
                new_alpha = min(new_alpha, self.max_lr)
            if alpha == 0:
                rank_zero_warn(
                    f"LayerwiseLRCallback: param group {name!r} has lr 0, which eq. 11 cannot "
                    "rescale; it is left at 0"
                )
                continue
            factor = new_alpha / alpha
            group["lr"] = new_alpha
            for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its anchors here
                if isinstance(group.get(key), (int, float)):
                    group[key] *= factor
            for config in trainer.lr_scheduler_configs:
                for scheduler in _with_children(config.scheduler):
                    if getattr(scheduler, "optimizer", None) is optimizer:
                        for attribute in ("base_lrs", "_last_lr"):
                            values = getattr(scheduler, attribute, None)
                            if isinstance(values, list) and index < len(values):
                                values[index] *= factor
        return factor

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _named_groups(trainer: pl.Trainer) -> dict[str, list[tuple[Optimizer, int]]]:
        named: dict[str, list[tuple[Optimizer, int]]] = {}
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                if "name" in group:
                    named.setdefault(group["name"], []).append((optimizer, index))
        return named

    def _current_lrs(self, trainer: pl.Trainer) -> dict[str, float]:
        return {
            name: optimizer.param_groups[index]["lr"]
            for name, places in self._named_groups(trainer).items()
            for optimizer, index in places[:1]
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "eta": dict(self.eta),
            "sum": {name: float(value) for name, value in self._sum.items()},
            "count": dict(self._count),
            "epochs_in_interval": self._epochs_in_interval,
            "last_epoch_ended": self._last_epoch_ended,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.eta = dict(state_dict["eta"])
        self._sum = dict(state_dict["sum"])
        self._count = dict(state_dict["count"])
        self._epochs_in_interval = int(state_dict["epochs_in_interval"])
        self._last_epoch_ended = int(state_dict["last_epoch_ended"])
        self.history = list(state_dict.get("history", []))


def _log(pl_module: pl.LightningModule, quantity: str, layer: str, value: float) -> None:
    # identical on every rank; sync_dist only keeps Lightning's distributed logging quiet
    pl_module.log(
        f"layerwise/{quantity}/{layer}", value, on_step=False, on_epoch=True, sync_dist=True
    )


def _with_children(scheduler: Any) -> list[Any]:
    """A scheduler and, for SequentialLR/ChainedScheduler, the schedulers it wraps."""
    found = [scheduler]
    for child in getattr(scheduler, "_schedulers", None) or []:
        found.extend(_with_children(child))
    return found


def _is_last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether this is the epoch's last training batch (limits and iterable data included)."""
    total = trainer.num_training_batches
    if isinstance(total, int) and batch_idx + 1 >= total:
        return True
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
