"""The layer-wise callback's references: a divergence recorder, the learning rates computed by
hand (float64) from what it recorded, and a minimal LightningModule that honours the callback's
contract."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim.lr_scheduler import (
    MultiStepLR,
)

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.methods import method_class
from tests.helpers.models import make_random_loader, make_tiny_cnn, make_trainer_kwargs

LAYERS = ["0", "1"]  # the crucial layers of make_tiny_cnn, also the param-group names
GROUPS = [*LAYERS, "base"]
LR = 0.01
N_TRAIN, BATCH = 20, 8  # 3 batches per epoch, the last one partial (8, 8, 4)
BATCHES = math.ceil(N_TRAIN / BATCH)
RTOL = 1e-9


# ---------------------------------------------------------------------------------- helpers
def group_lrs(trainer: Trainer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}


class DivergenceRecorder(Callback):
    """Records, independently of ``LayerwiseLRCallback``, what the callback should see: the
    per-epoch sums and counts of ``outputs["layer_divergence"]`` over training batches, and the
    learning rate of every param group at the start of every training batch.

    With ``out_dir`` it writes ``rank<k>.json`` at ``on_train_end`` (for ``ddp_spawn``, where
    callbacks do not come back to the parent process)."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.sums: dict[int, dict[str, float]] = {}
        self.counts: dict[int, dict[str, int]] = {}
        self.batch_lrs: list[dict[str, float]] = []
        self.final_lrs: dict[str, float] = {}
        self.save_stages: list[str] = []
        self.metrics: dict[int, dict[str, float]] = {}  # callback_metrics after each epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.save_stages.append(str(trainer.state.stage.value))

    def _snapshot(self, trainer: Trainer, epoch: int) -> None:
        metrics = trainer.callback_metrics
        self.metrics[epoch] = {k: float(v) for k, v in metrics.items() if "layerwise" in k}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self._snapshot(trainer, trainer.current_epoch - 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_lrs.append(group_lrs(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sums = self.sums.setdefault(trainer.current_epoch, {})
        counts = self.counts.setdefault(trainer.current_epoch, {})
        if not isinstance(outputs, dict) or "layer_divergence" not in outputs:
            return  # a contract violation: LayerwiseLRCallback must be the one to complain
        for name, value in outputs["layer_divergence"].items():
            value = value.detach().to(torch.float64)
            sums[name] = sums.get(name, 0.0) + float(value.sum())
            counts[name] = counts.get(name, 0) + value.numel()

    def on_train_end(self, trainer, pl_module) -> None:
        self.final_lrs = group_lrs(trainer)
        self._snapshot(trainer, trainer.current_epoch - 1)
        if self.out_dir is not None:
            callback = next(c for c in trainer.callbacks if isinstance(c, LayerwiseLRCallback))
            record = {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "lrs": self.final_lrs,
                "eta": callback.eta,
                "layer_weights": dict(getattr(pl_module, "layer_loss_weights", {})),
                "sums": self.sums,
                "counts": self.counts,
            }
            path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(record))


def scheduler_alone(
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    interval: str,
    epochs: int,
    batches: int,
    lr: float = LR,
) -> list[float]:
    """The learning rate a scheduler gives by itself at each training batch, followed by the
    one left after the last batch, stepped as Lightning steps it (after each optimizer step for
    ``"step"``, after the last batch of an epoch for ``"epoch"``)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    lrs = []
    for _ in range(epochs):
        for b in range(batches):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None and (interval == "step" or b == batches - 1):
                scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def by_hand(
    recorder: DivergenceRecorder,
    alone: list[float],
    *,
    epochs: int,
    batches: int,
    every_n_epochs: int,
    gamma: float = 0.9,
    eps: float = 1e-8,
    eta_init: float = 0.0,
    reduction: str = "sum",
    min_lr: float = 0.0,
    max_lr: float | None = None,
    layers: list[str] = LAYERS,
) -> dict[str, Any]:
    """docs/design.md section 5 in float64 from the recorded divergences: eq. 3 (sum or mean),
    eq. 12, eq. 11 and clamping, applied as a factor on top of the scheduler's own rates."""
    factor = {name: 1.0 for name in layers}
    eta = {name: eta_init for name in layers}
    updated: dict[str, float] = {}
    acc = {name: 0.0 for name in layers}
    count = {name: 0 for name in layers}
    batch_lrs: list[dict[str, float]] = []
    history: list[dict[str, Any]] = []
    in_interval = 0
    for epoch in range(epochs):
        for b in range(batches):
            k = epoch * batches + b
            lrs = {name: alone[k] * factor[name] for name in layers}
            batch_lrs.append({**lrs, "base": alone[k]})
        in_interval += 1
        for name in layers:
            acc[name] += recorder.sums[epoch][name]
            count[name] += recorder.counts[epoch][name]
        if (epoch + 1) % every_n_epochs:
            continue
        record: dict[str, Any] = {"epoch": epoch}
        for name in layers:
            a = acc[name] / in_interval if reduction == "sum" else acc[name] / count[name]
            if not math.isfinite(a):
                continue
            eta[name] = gamma * eta[name] + (1 - gamma) * a  # eq. 12
            updated[name] = eta[name]
            alpha = alone[(epoch + 1) * batches] * factor[name]  # the rate now in the group
            new = alpha / math.sqrt(eta[name] + eps)  # eq. 11
            new = max(new, min_lr)
            if max_lr is not None:
                new = min(new, max_lr)
            factor[name] *= new / alpha
            record[name] = {"divergence": a, "eta": eta[name], "factor": new / alpha}
        history.append(record)
        acc = {name: 0.0 for name in layers}
        count = {name: 0 for name in layers}
        in_interval = 0
    final = {name: alone[-1] * factor[name] for name in layers}
    return {
        "batch_lrs": batch_lrs,
        "final_lrs": {**final, "base": alone[-1]},
        "eta": updated,
        "factor": factor,
        "history": history,
    }


def by_hand_relative(
    recorder: DivergenceRecorder,
    alone: list[float],
    *,
    epochs: int,
    batches: int,
    every_n_epochs: int,
    gamma: float = 0.9,
    power: float = -0.5,
    max_factor: float = 4.0,
    noise_floor: float = 1e-6,
    layers: list[str] = LAYERS,
) -> dict[str, Any]:
    """The relative rule in float64 from the recorded divergences, written
    independently of ``lr_rules``: mean over the interval / ln 2, eq. 12 with Adam's bias
    correction, ratio to the geometric mean (one layer: to its first eta_hat), power, clip; the
    factor replaces the previous one on top of the scheduler's own rates."""
    factor = {name: 1.0 for name in layers}
    eta = {name: 0.0 for name in layers}
    t = {name: 0 for name in layers}
    first: dict[str, float] = {}
    acc = {name: 0.0 for name in layers}
    count = {name: 0 for name in layers}
    batch_lrs: list[dict[str, float]] = []
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        for b in range(batches):
            k = epoch * batches + b
            batch_lrs.append({**{n: alone[k] * factor[n] for n in layers}, "base": alone[k]})
        for name in layers:
            acc[name] += recorder.sums[epoch].get(name, 0.0)
            count[name] += recorder.counts[epoch].get(name, 0)
        if (epoch + 1) % every_n_epochs:
            continue
        d = {n: acc[n] / count[n] / math.log(2) for n in layers if count[n]}
        hat = {}
        for name, value in d.items():
            if math.isfinite(value) and value >= noise_floor:
                eta[name] = gamma * eta[name] + (1 - gamma) * value
                t[name] += 1
                hat[name] = eta[name] / (1 - gamma ** t[name])
                first.setdefault(name, hat[name])
        if len(hat) == 1:
            ratio = {n: v / first[n] for n, v in hat.items()}
        else:
            geo = math.prod(hat.values()) ** (1 / len(hat)) if hat else 1.0
            ratio = {n: v / geo for n, v in hat.items()}
        record: dict[str, Any] = {"epoch": epoch}
        for name in d:
            f = min(max(ratio[name] ** power, 1 / max_factor), max_factor) if name in hat else 1.0
            factor[name] = f
            record[name] = {"divergence": d[name], "eta": hat.get(name, math.nan), "factor": f}
        history.append(record)
        acc = {name: 0.0 for name in layers}
        count = {name: 0 for name in layers}
    final = {name: alone[-1] * factor[name] for name in layers}
    return {
        "batch_lrs": batch_lrs,
        "final_lrs": {**final, "base": alone[-1]},
        "factor": factor,
        "history": history,
    }


def assert_close_dicts(got: dict[str, float], want: dict[str, float], rel: float = RTOL) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=0.0, nan_ok=True), key


def assert_trajectory(trainer: Trainer, recorder: DivergenceRecorder, want: dict[str, Any]) -> None:
    """Every training batch's rates and the rates left at the end are the hand-computed ones."""
    for got, expected in zip(recorder.batch_lrs, want["batch_lrs"], strict=True):
        assert_close_dicts(got, expected)
    assert_close_dicts(group_lrs(trainer), want["final_lrs"])


def assert_history(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for name in set(w) - {"epoch"}:
            assert_close_dicts(g[name], w[name])


def distillation_module(
    method: str = "attention",
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    interval: str = "epoch",
    lr: float = LR,
) -> DistillationModule:
    return DistillationModule(
        make_tiny_cnn(8),
        make_tiny_cnn(4),
        # layer "1" feeds global pooling: its activation map is constant
        method=method_class(method)(wrt="weight") if method in ("jacobian", "hessian") else method,
        layers=LAYERS,
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9),
        scheduler=scheduler,
        scheduler_interval=interval,
    )


def attention_jsd_to_uniform(feature: Tensor) -> Tensor:
    """Per-sample JSD between a feature map's spatial attention and the uniform distribution."""
    a = feature.pow(2).sum(1).flatten(1) + 1e-8
    p = a / a.sum(1, keepdim=True)
    u = torch.full_like(p, 1.0 / p.shape[1])
    m = (p + u) / 2
    return 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (u * (u / m).log()).sum(1)


class ContractModule(LightningModule):
    """A plain LightningModule (not ``DistillationModule``) that follows the callback's
    contract: named param groups ``"0"``, ``"1"``, ``"base"`` and ``training_step`` returning
    ``{"loss", "layer_divergence"}``. The knobs break the contract on purpose.

    Args:
        constant: per-layer constant per-sample divergence (instead of the computed one).
        nan_epochs: per-layer epochs in which the layer reports NaN divergences.
        rename: per-layer name used in ``layer_divergence`` instead of the group name.
        bare_loss: return the loss tensor alone.
        named_groups: give the param groups their ``"name"``.
        skip_batches: batch indices for which ``training_step`` returns ``None`` (Lightning's
            way to skip a batch in automatic optimization).
        make_scheduler: optional scheduler factory, stepped every ``interval``.
        scale: multiplies every reported divergence.
        report: the layers whose divergence ``training_step`` reports (default: both).
        per_batch: report each layer's batch mean (a scalar) instead of per-sample values.
    """

    def __init__(
        self,
        constant: dict[str, float] | None = None,
        nan_epochs: dict[str, set[int]] | None = None,
        rename: dict[str, str] | None = None,
        bare_loss: bool = False,
        named_groups: bool = True,
        skip_batches: set[int] | None = None,
        make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        interval: str = "epoch",
        lr: float = LR,
        scale: float = 1.0,
        report: list[str] | None = None,
        per_batch: bool = False,
    ) -> None:
        super().__init__()
        self.per_batch = per_batch
        self.net = make_tiny_cnn(4)
        self.scale = scale
        self.report = LAYERS if report is None else report
        self.constant = constant or {}
        self.nan_epochs = nan_epochs or {}
        self.rename = rename or {}
        self.bare_loss = bare_loss
        self.named_groups = named_groups
        self.skip_batches = skip_batches or set()
        self.make_scheduler = make_scheduler
        self.interval = interval
        self.lr = lr
        self.train_steps = 0

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = {}
        for name in LAYERS:
            x = self.net[int(name)](x)
            features[name] = x
        return self.net[2:](x), features

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.train_steps += 1
        if batch_idx in self.skip_batches:
            return None
        x, y = batch
        logits, features = self(x)
        loss = F.cross_entropy(logits, y)
        if self.bare_loss:
            return loss
        divergences = {}
        for name, feature in features.items():
            if name not in self.report:
                continue
            d = attention_jsd_to_uniform(feature).detach() * self.scale
            if name in self.constant:
                d = torch.full_like(d, self.constant[name])
            if self.current_epoch in self.nan_epochs.get(name, ()):
                d = torch.full_like(d, math.nan)
            divergences[self.rename.get(name, name)] = d.mean() if self.per_batch else d
        return {"loss": loss, "layer_divergence": divergences}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x)[0], y), batch_size=x.shape[0])
        # validation (and sanity-check) divergences must never reach the rule
        return {"layer_divergence": {name: torch.full((len(x),), 1e6) for name in LAYERS}}

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = [
            {"name": "0", "params": list(self.net[0].parameters())},
            {"name": "1", "params": list(self.net[1].parameters())},
            {"name": "base", "params": list(self.net[4].parameters())},
        ]
        if not self.named_groups:
            for group in groups:
                del group["name"]
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        if self.make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": self.interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def fit_contract(
    module: LightningModule, callback: LayerwiseLRCallback, root: Path, epochs: int
) -> tuple[Trainer, DivergenceRecorder]:
    recorder = DivergenceRecorder()
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[recorder, callback],
        **make_trainer_kwargs(root, limit_val_batches=1, num_sanity_val_steps=1),
    )
    trainer.fit(
        module, make_random_loader(N_TRAIN, BATCH, seed=0), make_random_loader(4, 4, seed=1)
    )
    return trainer, recorder


def multistep(opt: torch.optim.Optimizer) -> MultiStepLR:
    return MultiStepLR(opt, milestones=[1, 3], gamma=0.1)
