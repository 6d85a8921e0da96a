"""``LayerwiseLRCallback`` with ``StochasticWeightAveraging`` on real ``Trainer.fit`` runs.

SWA builds ``torch.optim.swa_utils.SWALR`` at the start of epoch ``swa_epoch_start - 1``
(0-based), which anneals every param group's ``lr`` to the group's ``swa_lr`` and keeps it there.
The callback composes with it: each crucial group's ``swa_lr`` carries the layer's factor, so
after SWA has annealed (``annealing_epochs=1``: from the epoch after SWA starts) crucial layer
``j`` trains at ``swa_lr * factor_j`` and the base group at ``swa_lr``. Every expected rate is
computed by hand from the factors the callback recorded in its ``history``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from torch.optim.lr_scheduler import MultiStepLR
from torch.optim.swa_utils import SWALR

from lightning_layerkd import LayerwiseLRCallback
from lightning_layerkd.param_groups import SWA_MARK
from tests.helpers.callback import (
    BATCH,
    BATCHES,
    LAYERS,
    N_TRAIN,
    ContractModule,
    DivergenceRecorder,
)
from tests.helpers.models import make_random_loader, make_trainer_kwargs

SWA_LR = 0.005
EPOCHS = 5
SWA_EPOCH_START = 3  # StochasticWeightAveraging's 1-based epoch: SWALR is built at epoch 2
SWA_START = SWA_EPOCH_START - 1  # 0-based
REL = 1e-12


class Killed(Exception):
    """Stands for a killed job."""


class KillAt(Callback):
    """Raise :class:`Killed` when epoch ``epoch`` starts: the checkpoint of the epoch before is
    on disk, nothing of this one is."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at the start of epoch {self.epoch}")


def _multistep(optimizer: torch.optim.Optimizer) -> MultiStepLR:
    return MultiStepLR(optimizer, [2], 0.5)


def _swalr(optimizer: torch.optim.Optimizer) -> SWALR:
    return SWALR(optimizer, swa_lr=SWA_LR, anneal_epochs=2)


def fit(
    root: Path,
    rule: str = "relative",
    *,
    swa: bool = True,
    make_scheduler: Any = _multistep,
    kill_at: int | None = None,
    ckpt_path: str | None = None,
) -> tuple[Trainer, LayerwiseLRCallback, DivergenceRecorder]:
    """``EPOCHS`` epochs of :class:`ContractModule`, one layer-wise update an epoch, SWA from
    ``SWA_EPOCH_START`` (``swa``), a checkpoint every epoch."""
    seed_everything(0)
    options: dict[str, Any] = {"max_lr": 0.05, "min_lr": 1e-4} if rule == "paper" else {}
    callback = LayerwiseLRCallback(every_n_epochs=1, rule=rule, **options)  # type: ignore[arg-type]
    recorder = DivergenceRecorder()
    callbacks: list[Callback] = [recorder, callback]
    if swa:
        callbacks.append(
            StochasticWeightAveraging(
                swa_lrs=SWA_LR, swa_epoch_start=SWA_EPOCH_START, annealing_epochs=1
            )
        )
    callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True))
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    trainer = Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        **make_trainer_kwargs(
            root, enable_checkpointing=True, limit_val_batches=1, num_sanity_val_steps=1
        ),
    )
    train, val = make_random_loader(N_TRAIN, BATCH, seed=0), make_random_loader(4, 4, seed=1)
    module = ContractModule(make_scheduler=make_scheduler)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, callback, recorder


def multiplier(callback: LayerwiseLRCallback, epoch: int) -> dict[str, float]:
    """Each crucial layer's multiplier during ``epoch``, from the recorded updates (one at the
    end of every epoch): the factor of the last one ("relative"), the product of all
    ("paper")."""
    records = [r for r in callback.history if r["epoch"] < epoch]
    if callback.rule == "relative":
        return {n: records[-1][n]["factor"] if records else 1.0 for n in LAYERS}
    return {n: math.prod(r[n]["factor"] for r in records) for n in LAYERS}


def epoch_lrs(recorder: DivergenceRecorder, epoch: int, first: int = 0) -> list[dict[str, float]]:
    """The rates of every training batch of ``epoch`` (of a fit whose first epoch is ``first``)."""
    start = (epoch - first) * BATCHES
    return recorder.batch_lrs[start : start + BATCHES]


def assert_lrs(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=REL, abs=0.0), name


@pytest.mark.parametrize("rule", ["relative", "paper"])
def test_swa_lr_carries_the_layerwise_factors(
    tmp_path: Path, rule: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        trainer, callback, recorder = fit(tmp_path / "swa", rule)
    _, plain_callback, plain = fit(tmp_path / "plain", rule, swa=False)

    # SWA's extra BatchNorm epoch (EPOCHS, no training) is no layer-wise epoch
    assert [r["epoch"] for r in callback.history] == list(range(EPOCHS))
    assert trainer.current_epoch == EPOCHS + 1
    # before SWALR acts (its first step ends epoch SWA_START) nothing differs from a fit without
    assert (
        recorder.batch_lrs[: (SWA_START + 1) * BATCHES]
        == plain.batch_lrs[: (SWA_START + 1) * BATCHES]
    )
    assert callback.history[: SWA_START + 1] == plain_callback.history[: SWA_START + 1]
    # every batch: crucial rate = base rate x the layer's multiplier (before and during SWA)
    for epoch in range(EPOCHS):
        m = multiplier(callback, epoch)
        for lrs in epoch_lrs(recorder, epoch):
            assert_lrs(lrs, {**{n: lrs["base"] * m[n] for n in LAYERS}, "base": lrs["base"]})
    # once SWALR has annealed: swa_lr x factor_j for crucial layers, swa_lr for base
    for epoch in range(SWA_START + 1, EPOCHS):
        m = multiplier(callback, epoch)
        for lrs in epoch_lrs(recorder, epoch):
            assert_lrs(lrs, {**{n: SWA_LR * m[n] for n in LAYERS}, "base": SWA_LR})
    final = multiplier(callback, EPOCHS)
    assert all(abs(f - 1.0) > 1e-3 for f in final.values())  # the test has teeth
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert_lrs(
        {n: g["lr"] for n, g in groups.items()},
        {**{n: SWA_LR * final[n] for n in LAYERS}, "base": SWA_LR},
    )
    assert_lrs(
        {n: g["swa_lr"] for n, g in groups.items()},
        {**{n: SWA_LR * final[n] for n in LAYERS}, "base": SWA_LR},
    )
    # said once, when SWA started, with the factors then in force
    said = [r.getMessage() for r in caplog.records if "swa_lr is multiplied" in r.getMessage()]
    assert len(said) == 1
    start = multiplier(callback, SWA_START)
    assert all(f"{n}: {SWA_LR * start[n]:.4g} (x{start[n]:.4g})" in said[0] for n in LAYERS)


def test_resume_during_swa_composes_the_restored_factors(tmp_path: Path) -> None:
    """Killed in the SWA phase and resumed from ``last.ckpt``: Lightning's SWA rebuilds SWALR,
    which writes the bare ``swa_lr`` again; the callback composes it with the restored factors,
    so the resumed fit follows the uninterrupted one."""
    straight, s_callback, s_recorder = fit(tmp_path / "straight")
    stop = SWA_START + 2  # killed when epoch 4 starts; epoch 3's checkpoint is the last one
    with pytest.raises(Killed):
        fit(tmp_path / "resumed", kill_at=stop)
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == stop - 1
    resumed, r_callback, r_recorder = fit(tmp_path / "resumed", ckpt_path=str(last))

    assert r_callback.history == s_callback.history
    for epoch in range(stop, EPOCHS):
        for got, want in zip(
            epoch_lrs(r_recorder, epoch, stop), epoch_lrs(s_recorder, epoch), strict=True
        ):
            assert_lrs(got, want)
    for s_group, r_group in zip(
        straight.optimizers[0].param_groups, resumed.optimizers[0].param_groups, strict=True
    ):
        for key in ("lr", "swa_lr", SWA_MARK):
            assert r_group[key] == pytest.approx(s_group[key], rel=REL, abs=0.0), (
                r_group["name"],
                key,
            )
    final = multiplier(s_callback, EPOCHS)
    assert r_recorder.final_lrs["0"] == pytest.approx(SWA_LR * final["0"], rel=REL)


def test_swalr_of_the_module_is_composed_once_also_when_resumed(tmp_path: Path) -> None:
    """A SWALR returned by ``configure_optimizers`` (anneal_epochs=2): its ``swa_lr`` is composed
    at the first batch and rescaled by every update, so each batch's crucial rate is the base
    rate times the factor; a resumed fit gets the composed ``swa_lr`` back with the optimizer
    state and must not compose it a second time."""
    straight, s_callback, s_recorder = fit(tmp_path / "straight", swa=False, make_scheduler=_swalr)
    for epoch in range(EPOCHS):
        m = multiplier(s_callback, epoch)
        for lrs in epoch_lrs(s_recorder, epoch):
            assert_lrs(lrs, {**{n: lrs["base"] * m[n] for n in LAYERS}, "base": lrs["base"]})
    final = multiplier(s_callback, EPOCHS)
    assert all(abs(f - 1.0) > 1e-3 for f in final.values())
    groups = {g["name"]: g for g in straight.optimizers[0].param_groups}
    assert_lrs(
        {n: g["swa_lr"] for n, g in groups.items()},
        {**{n: SWA_LR * final[n] for n in LAYERS}, "base": SWA_LR},
    )
    assert groups["base"]["lr"] == pytest.approx(SWA_LR, rel=REL)  # annealed by epoch 2

    stop = 3
    with pytest.raises(Killed):
        fit(tmp_path / "resumed", swa=False, make_scheduler=_swalr, kill_at=stop)
    last = str(tmp_path / "resumed" / "ckpt" / "last.ckpt")
    resumed, r_callback, r_recorder = fit(
        tmp_path / "resumed", swa=False, make_scheduler=_swalr, ckpt_path=last
    )
    assert r_callback.history == s_callback.history
    for epoch in range(stop, EPOCHS):
        for got, want in zip(
            epoch_lrs(r_recorder, epoch, stop), epoch_lrs(s_recorder, epoch), strict=True
        ):
            assert_lrs(got, want)
    for s_group, r_group in zip(
        straight.optimizers[0].param_groups, resumed.optimizers[0].param_groups, strict=True
    ):
        assert r_group["swa_lr"] == pytest.approx(s_group["swa_lr"], rel=REL, abs=0.0)
        assert r_group["lr"] == pytest.approx(s_group["lr"], rel=REL, abs=0.0)
