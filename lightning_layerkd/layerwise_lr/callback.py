"""``LayerwiseLRCallback``: layer-wise learning rates (Kokane et al. 2024, eqs. 3, 11, 12)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_layerkd.layerwise_lr._checks import (
    check_fit,
    check_rule_options,
    layer_divergences,
    warn_if_max_steps_ends_first,
)
from lightning_layerkd.layerwise_lr.rules import (
    Rule,
    Target,
    multipliers_in_force,
    paper_divergence,
    paper_rate,
    relative_factors,
    relative_step,
    steps_per_epoch,
)
from lightning_layerkd.param_groups import (
    compose_swa_lrs,
    first_group_lrs,
    named_param_groups,
    scale_param_group,
)


class LayerwiseLRCallback(Callback):
    """Rescale each crucial layer's learning rate from its divergence every N epochs.

    Per crucial layer ``j`` (an optimizer param group named ``j``) the callback accumulates the
    per-sample divergences that ``training_step`` returns in ``outputs["layer_divergence"][j]``
    over the training batches of an interval (not sanity checks, not validation). At the end of
    every ``every_n_epochs``-th training epoch, after the sums and counts are all-reduced over
    processes (every rank gets the same rates), one of two rules runs.

    ``rule="relative"`` (default) keeps the paper's intent, a layer whose maps are further from
    the teacher's learns more slowly, without its scale:

    1. ``D_j`` = the interval's mean per-sample divergence ``/ ln 2`` (in ``[0, 1]`` for JSD);
    2. ``eta_j = gamma * eta_j + (1 - gamma) * D_j`` (eq. 12), bias-corrected
       ``eta_hat_j = eta_j / (1 - gamma ** t)`` at the layer's ``t``-th update (as Adam does);
    3. ``r_j = eta_hat_j / geometric_mean_k(eta_hat_k)`` (one layer: its first ``eta_hat``);
    4. ``factor_j = clip(r_j ** power, 1 / max_factor, max_factor)`` (eq. 11 has ``power=-0.5``);
    5. the factor replaces the previous one (no compounding), so the rates stay within
       ``max_factor`` of what the scheduler alone gives and their geometric mean is kept.

    The result does not depend on the dataset size, batch size, interval length or the method's
    divergence level. A layer whose ``D_j`` is below ``noise_floor`` (a map that carries no
    signal) or not finite keeps factor 1, is left out of the geometric mean, and is warned
    about once.

    ``rule="paper"`` is eqs. 3, 11, 12 as written, for reproduction: ``A_j`` = the interval's
    per-epoch sum of per-sample divergences (``reduction="sum"``, eq. 3) or their mean
    (``"mean"``); ``eta_j = gamma * eta_j + (1 - gamma) * A_j`` (eq. 12);
    ``alpha_j = alpha_j / sqrt(eta_j + eps)`` (eq. 11), compounding, clamped to
    ``[min_lr, max_lr]``. It has no scale (docs/design.md section 5): with ``"sum"`` the rates
    shrink at every update, with ``"mean"`` they grow.

    Either rule also rescales the group's scheduler anchors, so MultiStepLR, LambdaLR and
    OneCycleLR keep it. Logged per layer: ``layerwise/lr``, ``layerwise/eta`` (``eta_hat`` for
    "relative"), ``layerwise/divergence`` (``D_j`` or ``A_j``) and ``layerwise/factor``.

    The update runs when the last training batch of the epoch ends: after Lightning has stepped
    that epoch's schedulers, before validation and checkpointing, so a run resumed from any
    end-of-epoch checkpoint follows the same learning rates as one that was not interrupted.

    Composes with :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging`: each crucial
    group's ``swa_lr`` is multiplied by its layer's factor in force (an info message says so),
    so crucial rates stay ``factor_j`` times SWA's; SWA's BatchNorm epoch is skipped.

    ``target="map_weight"`` applies the relative rule's factors to each crucial layer's weight
    in the map loss instead of its learning rate (``lambda_j = factor_j``, eqs. 2, 4, 6 with
    one ``lambda`` per layer), through the module's ``set_layer_loss_weights``; the learning
    rates are left to the scheduler. ``power < 0`` gives the layers the student is furthest
    from less of the loss (eq. 11's direction), ``power > 0`` more.

    Works with any LightningModule whose param groups carry ``"name"`` and whose
    ``training_step`` returns ``{"loss": ..., "layer_divergence": {name: per-sample JSD}}``,
    such as :class:`~lightning_layerkd.DistillationModule`; ``target="map_weight"`` also needs
    its ``set_layer_loss_weights({name: weight})``.

    Args:
        every_n_epochs: update interval in epochs (the paper: 25).
        gamma: the momentum of eq. 12, in (0, 1).
        rule: ``"relative"`` or ``"paper"``, see above.
        power: exponent of the relative ratio (``-0.5`` as in eq. 11; ``+0.5`` lets the layers
            further from the teacher learn faster). "relative" only.
        max_factor: the factors lie in ``[1 / max_factor, max_factor]``. "relative" only.
        noise_floor: ``D_j`` below this leaves layer ``j`` at factor 1. "relative" only.
        eps: the constant of eq. 11. "paper" only.
        eta_init: ``eta_j`` before the first update. "paper" only (bias correction makes the
            relative rule independent of it).
        reduction: ``"sum"`` (the paper) or ``"mean"``. "paper" only.
        min_lr: lower clamp of the new rate. "paper" only.
        max_lr: upper clamp of the new rate (``None``: no upper clamp). "paper" only.
        target: what the factors scale: ``"lr"`` (the paper) or ``"map_weight"`` (each
            layer's weight in the map loss). "map_weight" needs rule="relative".
    """

    def __init__(
        self,
        every_n_epochs: int = 25,
        gamma: float = 0.9,
        rule: Rule = "relative",
        power: float = -0.5,
        max_factor: float = 4.0,
        noise_floor: float = 1e-6,
        eps: float = 1e-8,
        eta_init: float = 0.0,
        reduction: Literal["sum", "mean"] = "sum",
        min_lr: float = 0.0,
        max_lr: float | None = None,
        target: Target = "lr",
    ) -> None:
        check_rule_options(
            every_n_epochs=every_n_epochs,
            gamma=gamma,
            rule=rule,
            power=power,
            max_factor=max_factor,
            noise_floor=noise_floor,
            eps=eps,
            eta_init=eta_init,
            reduction=reduction,
            min_lr=min_lr,
            max_lr=max_lr,
            target=target,
        )
        self.target = target
        self.every_n_epochs = every_n_epochs
        self.gamma = gamma
        self.rule = rule
        self.power = power
        self.max_factor = max_factor
        self.noise_floor = noise_floor
        self.eps = eps
        self.eta_init = eta_init
        self.reduction = reduction
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.eta: dict[str, float] = {}  # eq. 12's eta_j (the raw moving average)
        self.updates: dict[str, int] = {}  # t of the bias correction, per layer
        self.reference: dict[str, float] = {}  # each layer's first eta_hat (one-layer case)
        self.factor: dict[str, float] = {}  # the relative factor in force, per layer
        self._sum: dict[str, Tensor | float] = {}
        self._count: dict[str, int] = {}
        self._epochs_in_interval = 0
        self._last_epoch_ended = -1
        self._warned: set[str] = set()  # layers warned about for lacking signal
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs,
            gamma=self.gamma,
            rule=self.rule,
            power=self.power,
            reduction=self.reduction,
            target=self.target,
        )

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(trainer, pl_module, every_n_epochs=self.every_n_epochs, target=self.target)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target == "map_weight" and self.factor:  # resumed: the weights in force
            pl_module.set_layer_loss_weights(dict(self.factor))  # type: ignore[operator]
        warn_if_max_steps_ends_first(trainer, self.every_n_epochs)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # SWALR sets swa_lr when it is built: in on_train_epoch_start, of whichever callback
        if self.target == "map_weight":
            return
        multipliers = multipliers_in_force(self.rule, self.factor, self.history)
        composed = compose_swa_lrs(named_param_groups(trainer.optimizers), multipliers)
        if composed:
            rank_zero_info(
                "LayerwiseLRCallback: SWALR (StochasticWeightAveraging) took over the learning "
                "rates; each crucial layer's swa_lr is multiplied by its layer-wise factor: "
                + ", ".join(f"{n}: {v:.4g} (x{multipliers[n]:.4g})" for n, v in composed.items())
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if getattr(trainer.fit_loop, "_skip_backward", False):  # SWA's BatchNorm epoch
            self._last_epoch_ended = trainer.current_epoch
            return
        divergences = layer_divergences(outputs)
        groups = named_param_groups(trainer.optimizers)
        for name, value in divergences.items():
            if name not in groups and self.target == "lr":
                raise ValueError(
                    f"layer_divergence has layer {name!r} but no optimizer param group has that "
                    f"name; param groups: {sorted(groups)}"
                )
            value = torch.as_tensor(value).detach()
            self._sum[name] = self._sum.get(name, 0.0) + value.to(_sum_dtype(value.device)).sum()
            self._count[name] = self._count.get(name, 0) + value.numel()
        if _is_last_batch(trainer, batch_idx):
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Normally done at the last batch; this catches epochs whose length was not known, and
        # an epoch cut short by max_steps, which is no update interval (as on_fit_start warns).
        if self._last_epoch_ended != trainer.current_epoch:
            known = steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)
            cut = known is not None and 0 <= trainer.max_steps <= trainer.global_step
            self._end_epoch(trainer, pl_module, update=not cut)

    # ------------------------------------------------------------------ the rules
    def _end_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, update: bool = True
    ) -> None:
        self._last_epoch_ended = trainer.current_epoch
        self._epochs_in_interval += 1
        if update and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._update(trainer, pl_module)
        for name, lr in first_group_lrs(named_param_groups(trainer.optimizers)).items():
            _log(pl_module, "lr", name, lr)
            if name in self._count or name in self.eta:  # crucial layers: eta every epoch too
                _log(pl_module, "eta", name, self._eta_logged(name))
                if self.target == "map_weight":
                    _log(pl_module, "map_weight", name, self.factor.get(name, 1.0))

    def _eta_logged(self, name: str) -> float:
        if self.rule == "paper":
            return self.eta.get(name, self.eta_init)
        t = self.updates.get(name)  # eta_hat, bias-corrected at the layer's t-th update
        return self.eta[name] / (1 - self.gamma**t) if t else 0.0

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = sorted(self._sum)
        device = pl_module.device
        stats = torch.tensor(
            [[float(self._sum[n]), float(self._count[n])] for n in names],
            dtype=_sum_dtype(device),
            device=device,
        ).reshape(-1, 2)
        stats = trainer.strategy.reduce(stats, reduce_op="sum")  # all ranks agree
        totals = {n: (acc, count) for n, (acc, count) in zip(names, stats.tolist(), strict=True)}
        record: dict[str, Any] = {"epoch": trainer.current_epoch}
        if self.rule == "paper":
            self._update_paper(trainer, pl_module, totals, record)
        else:
            self._update_relative(trainer, pl_module, totals, record)
        self.history.append(record)
        self._sum, self._count, self._epochs_in_interval = {}, {}, 0

    def _update_relative(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        totals: dict[str, tuple[float, float]],
        record: dict[str, Any],
    ) -> None:
        divergence, eta_hat, silent = relative_step(
            totals, self.eta, self.updates, self.reference, gamma=self.gamma, noise=self.noise_floor
        )  # steps 1-2
        for name, why in silent.items():
            if name not in self._warned:  # once a layer
                self._warned.add(name)
                rank_zero_warn(
                    f"LayerwiseLRCallback: the divergence of layer {name!r} is "
                    f"{divergence[name]:.3g} ({why}): its map carries no signal, so the layer "
                    "keeps factor 1 and is left out of the geometric mean"
                )
        factors = relative_factors(
            eta_hat, power=self.power, max_factor=self.max_factor, reference=self.reference
        )  # steps 3-4
        for name, d in divergence.items():
            factor = factors.get(name, 1.0)
            if self.target == "lr":
                self._scale(trainer, name, factor / self.factor.get(name, 1.0))  # step 5
            self.factor[name] = factor
            _record(pl_module, record, name, d, eta_hat.get(name, math.nan), factor)
        if self.target == "map_weight":
            pl_module.set_layer_loss_weights(dict(self.factor))  # type: ignore[operator]

    def _update_paper(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        totals: dict[str, tuple[float, float]],
        record: dict[str, Any],
    ) -> None:
        for name, (acc, count) in totals.items():
            divergence = paper_divergence(acc, count, self._epochs_in_interval, self.reduction)
            if not math.isfinite(divergence) or divergence < 0:
                rank_zero_warn(
                    f"LayerwiseLRCallback: accumulated divergence of layer {name!r} is "
                    f"{divergence}; its learning rate is left unchanged this interval"
                )
                continue
            eta = self.gamma * self.eta.get(name, self.eta_init) + (1 - self.gamma) * divergence
            self.eta[name] = eta  # eq. 12
            factor = self._paper_factor(trainer, name, eta)
            self._scale(trainer, name, factor)
            if factor > 10 and self.max_lr is None:
                rank_zero_warn(
                    f"LayerwiseLRCallback: the learning rate of layer {name!r} grew {factor:.3g}x "
                    f"because eta={eta:.3g} is small (eq. 11 divides by sqrt(eta + eps)); set "
                    "max_lr to bound it, or use rule='relative'"
                )
            _record(pl_module, record, name, divergence, eta, factor)

    def _paper_factor(self, trainer: pl.Trainer, name: str, eta: float) -> float:
        """Eq. 11 with clamping for the group named ``name``: the factor new / old rate."""
        alpha = first_group_lrs(named_param_groups(trainer.optimizers))[name]
        if alpha == 0:
            rank_zero_warn(
                f"LayerwiseLRCallback: param group {name!r} has lr 0, which eq. 11 cannot "
                "rescale; it is left at 0"
            )
            return 1.0
        new_alpha = paper_rate(alpha, eta, eps=self.eps, min_lr=self.min_lr, max_lr=self.max_lr)
        return new_alpha / alpha

    def _scale(self, trainer: pl.Trainer, name: str, factor: float) -> None:
        """Multiply every param group named ``name`` and its schedulers' anchors by ``factor``."""
        if factor == 1.0:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer, index in named_param_groups(trainer.optimizers)[name]:
            scale_param_group(optimizer, index, schedulers, factor)

    def state_dict(self) -> dict[str, Any]:
        return {
            "eta": dict(self.eta),
            "updates": dict(self.updates),
            "reference": dict(self.reference),
            "factor": dict(self.factor),
            "warned": sorted(self._warned),
            "sum": {name: float(value) for name, value in self._sum.items()},
            "count": dict(self._count),
            "epochs_in_interval": self._epochs_in_interval,
            "last_epoch_ended": self._last_epoch_ended,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.eta = dict(state_dict["eta"])
        self.updates = dict(state_dict.get("updates", {}))
        self.reference = dict(state_dict.get("reference", {}))
        self.factor = dict(state_dict.get("factor", {}))
        self._warned = set(state_dict.get("warned", []))
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


def _record(
    pl_module: pl.LightningModule,
    record: dict[str, Any],
    name: str,
    divergence: float,
    eta: float,
    factor: float,
) -> None:
    """Put one layer's update into the history record and the logs."""
    record[name] = {"divergence": divergence, "eta": eta, "factor": factor}
    _log(pl_module, "divergence", name, divergence)
    _log(pl_module, "factor", name, factor)


def _is_last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether this is the epoch's last training batch (limits and iterable data included)."""
    total = trainer.num_training_batches
    if isinstance(total, int) and batch_idx + 1 >= total:
        return True
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The divergence sums' dtype: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64
