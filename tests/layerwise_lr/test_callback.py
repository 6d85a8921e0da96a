"""Tests of ``LayerwiseLRCallback`` (docs/design.md section 5) on real ``Trainer.fit`` runs.

Every expected learning rate is computed by hand, in float64, from divergences recorded by an
independent callback (:class:`DivergenceRecorder`, placed before ``LayerwiseLRCallback``), and
from the learning rates the scheduler alone would give (:func:`scheduler_alone`).

Order of events at the last training batch of an epoch (Lightning 2.6): optimizer step ->
step-interval schedulers -> epoch-interval schedulers -> ``on_train_batch_end`` (where the
callback updates) -> validation -> checkpoint. So the ``alpha_j`` of eq. 11 is the rate the next
epoch would use; with no clamping the order does not matter, since the rule is multiplicative.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    SequentialLR,
)

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from tests.helpers.callback import (
    BATCH,
    BATCHES,
    GROUPS,
    LAYERS,
    LR,
    N_TRAIN,
    RTOL,
    ContractModule,
    DivergenceRecorder,
    assert_close_dicts,
    assert_history,
    assert_trajectory,
    by_hand,
    by_hand_relative,
    distillation_module,
    fit_contract,
    group_lrs,
    multistep,
    scheduler_alone,
)
from tests.helpers.models import make_random_loader, make_trainer_kwargs


# ---------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": 0.0}, "gamma"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": -2}, "every_n_epochs"),
        ({"every_n_epochs": 2.0}, "every_n_epochs"),
        ({"reduction": "max"}, "reduction"),
        ({"eps": 0.0}, "eps"),
        ({"eta_init": -1.0}, "eta_init"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"min_lr": 0.2, "max_lr": 0.1}, "max_lr"),
        ({"rule": "adam"}, r"rule must be one of \['relative', 'paper'\]"),
        ({"max_factor": 0.5}, "max_factor"),
        ({"noise_floor": -1.0}, "noise_floor"),
        ({"power": math.inf}, "power"),
        ({"reduction": "mean"}, r"\['reduction'\] only apply to rule='paper'"),
        ({"min_lr": 1e-4, "max_lr": 1.0}, r"\['max_lr', 'min_lr'\] only apply to rule='paper'"),
        ({"rule": "paper", "power": 0.5}, r"\['power'\] only apply to rule='relative'"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerwiseLRCallback(**kwargs)


# ------------------------------------------------------------------ 1. the rule, by hand
def _lambda(opt: torch.optim.Optimizer) -> LambdaLR:
    return LambdaLR(opt, lambda step: 0.8**step)


def _onecycle(opt: torch.optim.Optimizer) -> OneCycleLR:
    return OneCycleLR(opt, max_lr=0.05, total_steps=3 * BATCHES)


@pytest.mark.parametrize(
    ("make_scheduler", "interval", "reduction"),
    [
        (multistep, "epoch", "sum"),
        (multistep, "epoch", "mean"),
        (_lambda, "step", "sum"),
        (_onecycle, "step", "mean"),
    ],
    ids=["multistep-sum", "multistep-mean", "lambda-step-sum", "onecycle-step-mean"],
)
def test_rates_match_hand_computation(
    tmp_path: Path, make_scheduler: Callable, interval: str, reduction: str
) -> None:
    """N=2 over 3 epochs with validation and sanity checks: one update at the end of epoch 1;
    every batch's rate is (the scheduler's own rate) x (the accumulated factor), the base group
    follows the scheduler alone, and the logged values are the hand-computed ones."""
    epochs, every_n, gamma = 3, 2, 0.9
    seed_everything(0)
    module = distillation_module("attention", make_scheduler, interval)
    callback = LayerwiseLRCallback(
        every_n_epochs=every_n, gamma=gamma, rule="paper", reduction=reduction
    )
    recorder = DivergenceRecorder()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[recorder, callback],
        **make_trainer_kwargs(tmp_path, logger=logger, num_sanity_val_steps=2),
    )
    train = make_random_loader(N_TRAIN, BATCH, seed=0)
    trainer.fit(module, train, make_random_loader(8, 4, seed=1))

    # the recorder saw every training sample of every epoch, and nothing else
    assert sorted(recorder.sums) == list(range(epochs))
    assert all(recorder.counts[e] == {n: N_TRAIN for n in LAYERS} for e in range(epochs))
    assert len(recorder.batch_lrs) == epochs * BATCHES

    alone = scheduler_alone(make_scheduler, interval, epochs, BATCHES)
    want = by_hand(
        recorder,
        alone,
        epochs=epochs,
        batches=BATCHES,
        every_n_epochs=every_n,
        gamma=gamma,
        reduction=reduction,
    )
    if reduction == "sum":  # eq. 3: A = acc / epochs_in_interval
        a0 = (recorder.sums[0]["0"] + recorder.sums[1]["0"]) / 2
    else:  # A = acc / n
        a0 = (recorder.sums[0]["0"] + recorder.sums[1]["0"]) / (2 * N_TRAIN)
    assert want["history"][0]["0"]["divergence"] == pytest.approx(a0, rel=RTOL)
    assert want["eta"]["0"] == pytest.approx((1 - gamma) * a0, rel=RTOL)  # eta_init = 0

    # optimizer: every batch's rates, and the rates left at the end of fit (base untouched)
    assert_trajectory(trainer, recorder, want)
    assert recorder.batch_lrs[:BATCHES] == [{g: alone[k] for g in GROUPS} for k in range(BATCHES)]
    assert all(want["factor"][n] != pytest.approx(1.0) for n in LAYERS)  # the test has teeth

    # the scheduler keeps the factor: base_lrs and initial_lr scaled, base group's not
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    reference = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR))
    groups = trainer.optimizers[0].param_groups
    for index, group in enumerate(groups):
        f = want["factor"].get(group["name"], 1.0)
        assert scheduler.base_lrs[index] == pytest.approx(reference.base_lrs[0] * f, rel=RTOL)
        initial = reference.optimizer.param_groups[0]["initial_lr"]
        assert group["initial_lr"] == pytest.approx(initial * f, rel=RTOL)

    # the callback's own state
    assert_close_dicts(callback.eta, want["eta"])
    assert_history(callback.history, want["history"])
    assert callback.state_dict()["epochs_in_interval"] == 1  # epoch 2 is pending
    assert callback.state_dict()["count"] == {n: N_TRAIN for n in LAYERS}

    # logging (float32): lr and eta every epoch (eta_init before the first update); A and the
    # factor at the update epoch only
    for name in LAYERS:
        lr_logged = float(trainer.callback_metrics[f"layerwise/lr/{name}"])
        assert lr_logged == pytest.approx(want["final_lrs"][name], rel=1e-6)
        record = want["history"][0][name]
        for key in ("eta", "divergence", "factor"):
            logged = recorder.metrics[1][f"layerwise/{key}/{name}"]
            assert logged == pytest.approx(record[key], rel=1e-6), (name, key)
        assert recorder.metrics[0][f"layerwise/eta/{name}"] == 0.0
        assert recorder.metrics[2][f"layerwise/eta/{name}"] == pytest.approx(
            record["eta"], rel=1e-6
        )
        for key in ("divergence", "factor"):
            assert f"layerwise/{key}/{name}" not in recorder.metrics[0]
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    update_rows = [r for r in rows if r.get("layerwise/divergence/0")]
    assert [int(r["epoch"]) for r in update_rows] == [1]
    for name in LAYERS:
        record = want["history"][0][name]
        for key in ("eta", "divergence", "factor"):
            logged = float(update_rows[0][f"layerwise/{key}/{name}"])
            assert logged == pytest.approx(record[key], rel=1e-6), (name, key)
    lr_rows = {int(r["epoch"]): r for r in rows if r.get("layerwise/lr/0")}
    assert sorted(lr_rows) == list(range(epochs))
    for epoch, row in lr_rows.items():
        for name in LAYERS:  # logged after the epoch's update: the rate of the next epoch
            k = (epoch + 1) * BATCHES
            expected = (
                want["batch_lrs"][k][name]
                if k < len(want["batch_lrs"])
                else want["final_lrs"][name]
            )
            assert float(row[f"layerwise/lr/{name}"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bound", ["max_lr", "min_lr"])
def test_clamping(tmp_path: Path, bound: str) -> None:
    """Eq. 11 gives lr / sqrt(eta): raised past ``max_lr`` for tiny eta, lowered below
    ``min_lr`` for large eta; the clamped layer lands exactly on the bound, the other not."""
    if bound == "max_lr":  # A = 20 * 1e-4 -> eta = 1e-3 -> x31.6 for "1"; eta = 0.25 -> x2 for "0"
        constant, clamp = {"0": 0.025, "1": 1e-4}, {"max_lr": 0.05}
    else:  # A = 20 * 10 -> eta = 100 -> x0.1 for "1"; A = 8 -> eta = 4 -> x0.5 for "0"
        constant, clamp = {"0": 0.4, "1": 10.0}, {"min_lr": 0.005}
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5, rule="paper", **clamp)
    trainer, recorder = fit_contract(ContractModule(constant=constant), callback, tmp_path, 1)
    lrs = group_lrs(trainer)
    assert lrs["1"] == clamp[bound]
    assert lrs["base"] == LR
    want = by_hand(
        recorder,
        scheduler_alone(None, "epoch", 1, BATCHES),
        epochs=1,
        batches=BATCHES,
        every_n_epochs=1,
        gamma=0.5,
        **clamp,
    )
    assert_close_dicts(lrs, want["final_lrs"])
    unclamped = LR * (2.0 if bound == "max_lr" else 0.5)
    assert lrs["0"] == pytest.approx(unclamped, rel=1e-6)


def _cosine(opt: torch.optim.Optimizer) -> CosineAnnealingLR:
    return CosineAnnealingLR(opt, T_max=6)


def _chained(opt: torch.optim.Optimizer) -> ChainedScheduler:
    return ChainedScheduler([LinearLR(opt, 0.5, 1.0, total_iters=3), MultiStepLR(opt, [3], 0.1)])


def _sequential(opt: torch.optim.Optimizer) -> SequentialLR:
    warmup = ConstantLR(opt, factor=0.5, total_iters=2)
    return SequentialLR(opt, [warmup, MultiStepLR(opt, [3], 0.1)], milestones=[2])


@pytest.mark.parametrize(
    "make_scheduler",
    [
        _cosine,
        _chained,
        _sequential,
    ],
    ids=["cosine", "chained", "sequential"],
)
def test_factor_survives_more_schedulers(tmp_path: Path, make_scheduler: Callable) -> None:
    """N=1 over 4 epochs (an update every epoch) with CosineAnnealingLR (eta_min=0),
    ChainedScheduler and SequentialLR (warm-up then MultiStepLR): every batch's rate is the
    scheduler's own rate times the accumulated factor."""
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5, rule="paper")
    module = ContractModule(make_scheduler=make_scheduler)
    trainer, recorder = fit_contract(module, callback, tmp_path, 4)
    alone = scheduler_alone(make_scheduler, "epoch", 4, BATCHES)
    want = by_hand(recorder, alone, epochs=4, batches=BATCHES, every_n_epochs=1, gamma=0.5)
    assert_trajectory(trainer, recorder, want)


# -------------------------------------------------------------------------------- 2. NaN
def test_nan_divergence_skips_layer_with_warning(tmp_path: Path) -> None:
    """Layer "1" reports NaN in epoch 0 only: its first update is skipped (rate unchanged,
    warning, no eta), layer "0" updates; the NaN does not leak into the next interval."""
    callback = LayerwiseLRCallback(every_n_epochs=1, rule="paper")
    module = ContractModule(nan_epochs={"1": {0}})
    with pytest.warns(UserWarning, match=r"layer '1'.*left unchanged"):
        trainer, recorder = fit_contract(module, callback, tmp_path, 2)
    want = by_hand(
        recorder,
        scheduler_alone(None, "epoch", 2, BATCHES),
        epochs=2,
        batches=BATCHES,
        every_n_epochs=1,
    )
    assert math.isnan(recorder.sums[0]["1"])
    assert set(callback.history[0]) == {"epoch", "0"}  # "1" skipped at epoch 0
    assert set(callback.history[1]) == {"epoch", "0", "1"}
    assert all(lrs["1"] == LR for lrs in recorder.batch_lrs[: 2 * BATCHES])  # unchanged
    assert recorder.batch_lrs[BATCHES]["0"] != LR  # the other layer did update
    assert_trajectory(trainer, recorder, want)
    assert_close_dicts(callback.eta, want["eta"])
    assert_history(callback.history, want["history"])
    # eta of "1" only saw epoch 1: (1 - gamma) * A
    assert callback.eta["1"] == pytest.approx(0.1 * recorder.sums[1]["1"], rel=RTOL)


# --------------------------------------------------------------------- 3. contract errors
def test_bare_loss_is_rejected(tmp_path: Path) -> None:
    module = ContractModule(bare_loss=True)
    with pytest.raises(ValueError, match=r"training_step to return a dict with 'layer_divergence'"):
        fit_contract(module, LayerwiseLRCallback(every_n_epochs=1), tmp_path, 1)
    assert module.train_steps == 1  # raised at the first batch


def test_per_batch_scalar_divergence_is_rejected(tmp_path: Path) -> None:
    """A scalar per batch would count once per batch, shrinking eta by the batch size."""
    module = ContractModule(per_batch=True)
    with pytest.raises(ValueError, match=r"layer_divergence\['0'\] has shape \(\); .*per sample"):
        fit_contract(module, LayerwiseLRCallback(every_n_epochs=1), tmp_path, 1)
    assert module.train_steps == 1


def test_unknown_layer_name_lists_groups(tmp_path: Path) -> None:
    module = ContractModule(rename={"1": "stage1"})
    match = r"'stage1'.*no optimizer param group.*\['0', '1', 'base'\]"
    with pytest.raises(ValueError, match=match):
        fit_contract(module, LayerwiseLRCallback(every_n_epochs=1), tmp_path, 1)


def test_unnamed_param_groups_are_rejected_at_fit_start(tmp_path: Path) -> None:
    module = ContractModule(named_groups=False)
    with pytest.raises(ValueError, match="'name'"):
        fit_contract(module, LayerwiseLRCallback(every_n_epochs=1), tmp_path, 1)
    assert module.train_steps == 0


def test_interval_longer_than_fit_is_rejected_at_fit_start(tmp_path: Path) -> None:
    module = ContractModule()
    with pytest.raises(ValueError, match=r"every_n_epochs=3.*max_epochs=2"):
        fit_contract(module, LayerwiseLRCallback(every_n_epochs=3), tmp_path, 2)
    assert module.train_steps == 0


def test_skipped_batch_contributes_nothing(tmp_path: Path) -> None:
    callback = LayerwiseLRCallback(every_n_epochs=1, rule="paper")
    trainer, recorder = fit_contract(ContractModule(skip_batches={1}), callback, tmp_path, 2)
    assert recorder.counts[0] == {n: N_TRAIN - BATCH for n in LAYERS}
    want = by_hand(
        recorder,
        scheduler_alone(None, "epoch", 2, BATCHES),
        epochs=2,
        batches=BATCHES,
        every_n_epochs=1,
    )
    assert_close_dicts(group_lrs(trainer), want["final_lrs"])
    assert_history(callback.history, want["history"])


# ------------------------------------------------------------------------------ 4. drop-in
def test_drop_in_with_plain_lightning_module(tmp_path: Path) -> None:
    """A LightningModule of its own (no DistillationModule) that follows the contract: two
    updates (N=1, 2 epochs), eta carried over by eq. 12, reduction="mean", eta_init > 0."""
    seed_everything(0)
    kwargs: dict[str, Any] = dict(every_n_epochs=1, gamma=0.7, eta_init=0.02, reduction="mean")
    callback = LayerwiseLRCallback(rule="paper", **kwargs)
    trainer, recorder = fit_contract(ContractModule(), callback, tmp_path, 2)
    want = by_hand(
        recorder, scheduler_alone(None, "epoch", 2, BATCHES), epochs=2, batches=BATCHES, **kwargs
    )
    assert_trajectory(trainer, recorder, want)
    assert_close_dicts(callback.eta, want["eta"])
    assert_history(callback.history, want["history"])
    for name in LAYERS:  # the last epoch updated: its values are in callback_metrics
        record = want["history"][-1][name]
        for key in ("eta", "divergence", "factor"):
            logged = float(trainer.callback_metrics[f"layerwise/{key}/{name}"])
            assert logged == pytest.approx(record[key], rel=1e-6), (name, key)
        logged_lr = float(trainer.callback_metrics[f"layerwise/lr/{name}"])
        assert logged_lr == pytest.approx(want["final_lrs"][name], rel=1e-6)
    eta0 = 0.7 * 0.02 + 0.3 * recorder.sums[0]["0"] / N_TRAIN
    assert callback.history[0]["0"]["eta"] == pytest.approx(eta0, rel=RTOL)
    assert callback.eta["0"] == pytest.approx(
        0.7 * eta0 + 0.3 * recorder.sums[1]["0"] / N_TRAIN, rel=RTOL
    )


# -------------------------------------------------------------------------------- 5. resume
def _resume_run(
    root: Path,
    method: str,
    max_epochs: int,
    save_on_train_epoch_end: bool | None,
    ckpt_path: str | None = None,
) -> tuple[Trainer, DistillationModule, LayerwiseLRCallback, DivergenceRecorder, dict]:
    seed_everything(0, workers=True)
    module = distillation_module(method, multistep, "epoch")
    teacher0 = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    callback = LayerwiseLRCallback(every_n_epochs=2)
    recorder = DivergenceRecorder()
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt",
        save_last=True,
        save_top_k=-1,
        every_n_epochs=1,
        save_on_train_epoch_end=save_on_train_epoch_end,
    )
    trainer = Trainer(
        max_epochs=max_epochs,
        deterministic=True,
        callbacks=[recorder, callback, checkpoint],
        **make_trainer_kwargs(root, enable_checkpointing=True, num_sanity_val_steps=2),
    )
    train = make_random_loader(N_TRAIN, BATCH, seed=0)
    trainer.fit(module, train, make_random_loader(8, 4, seed=1), ckpt_path=ckpt_path)
    return trainer, module, callback, recorder, teacher0


@pytest.mark.parametrize(
    ("method", "stop", "save_on_train_epoch_end"),
    [
        ("jacobian", 2, None),
        ("attention", 3, None),
        ("attention", 2, False),
        ("jacobian", 3, False),
    ],
    ids=[
        "end-of-interval-default-jacobian",
        "mid-interval-default-attention",
        "end-of-interval-val-end-attention",
        "mid-interval-val-end-jacobian",
    ],
)
def test_resume_follows_the_same_trajectory(
    tmp_path: Path, method: str, stop: int, save_on_train_epoch_end: bool | None
) -> None:
    """N=2, 4 epochs straight vs ``stop`` epochs then a new Trainer/module/callback resumed
    from ``last.ckpt`` up to 4 epochs: bit-identical rates, eta, history, student weights and
    optimizer state; the teacher never changes.

    With validation once per epoch, Lightning's default ModelCheckpoint saves on train epoch
    end (after every callback's ``on_train_epoch_end``); ``save_on_train_epoch_end=False``
    saves at validation end, inside the last batch, before ``on_train_epoch_end`` runs."""
    epochs = 4
    straight = _resume_run(tmp_path / "straight", method, epochs, save_on_train_epoch_end)
    first = _resume_run(tmp_path / "resumed", method, stop, save_on_train_epoch_end)
    expected_stage = "validate" if save_on_train_epoch_end is False else "train"
    assert first[3].save_stages == [expected_stage] * (2 * stop)  # epoch ckpt + last.ckpt
    saved = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == stop - 1
    state = next(v for k, v in saved["callbacks"].items() if "LayerwiseLRCallback" in k)
    assert state["epochs_in_interval"] == stop % 2  # mid-interval: pending sums are saved
    assert (state["sum"] != {}) == bool(stop % 2)
    ckpt_path = str(tmp_path / "resumed" / "ckpt" / "last.ckpt")
    resumed = _resume_run(tmp_path / "resumed", method, epochs, save_on_train_epoch_end, ckpt_path)
    s_trainer, s_module, s_callback, s_recorder, teacher0 = straight
    r_trainer, r_module, r_callback, r_recorder, _ = resumed

    assert r_trainer.current_epoch == s_trainer.current_epoch == epochs
    assert r_trainer.global_step == s_trainer.global_step
    assert len(s_callback.history) == 2 and len(first[2].history) == 1
    assert group_lrs(r_trainer) == group_lrs(s_trainer)
    assert r_callback.eta == s_callback.eta
    assert r_callback.history == s_callback.history
    assert r_callback.state_dict() == s_callback.state_dict()
    # the resumed run trained exactly the remaining batches, at the same rates
    assert r_recorder.batch_lrs == s_recorder.batch_lrs[stop * BATCHES :]
    assert sorted(r_recorder.sums) == list(range(stop, epochs))
    for epoch in range(stop, epochs):
        assert r_recorder.sums[epoch] == s_recorder.sums[epoch]
    s_sched = s_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    r_sched = r_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert r_sched == s_sched
    s_student, r_student = s_module.student.state_dict(), r_module.student.state_dict()
    assert s_student.keys() == r_student.keys()
    for key in s_student:
        assert torch.equal(r_student[key], s_student[key]), key
    s_opt = s_trainer.optimizers[0].state_dict()["state"]
    r_opt = r_trainer.optimizers[0].state_dict()["state"]
    for index in s_opt:
        assert torch.equal(r_opt[index]["momentum_buffer"], s_opt[index]["momentum_buffer"])
    for model in (s_module.teacher, r_module.teacher):
        teacher = model.state_dict()
        assert all(torch.equal(teacher[k], teacher0[k]) for k in teacher0)
    # and the trajectory is the hand-computed one
    want = by_hand_relative(
        s_recorder,
        scheduler_alone(multistep, "epoch", epochs, BATCHES),
        epochs=epochs,
        batches=BATCHES,
        every_n_epochs=2,
    )
    assert all(f != pytest.approx(1.0) for f in want["factor"].values())  # the test has teeth
    assert_close_dicts(group_lrs(r_trainer), want["final_lrs"])
    assert_history(r_callback.history, want["history"])


# ---------------------------------------------------------------------------------- 6. DDP
def _constant_lr(opt: torch.optim.Optimizer) -> LambdaLR:  # module level: picklable
    return LambdaLR(opt, _one)


def _one(step: int) -> float:
    return 1.0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["lr", "map_weight"])
def test_ddp_spawn_reduces_divergences_over_ranks(tmp_path: Path, target: str) -> None:
    """Two CPU processes (gloo, spawn): each rank sees different samples (Lightning's
    DistributedSampler), yet both end with the same rates (or map-loss weights) and eta,
    computed from the SUM of both ranks' local divergence sums and counts (the relative rule)."""
    seed_everything(0)
    module = distillation_module("attention", _constant_lr, "epoch")
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5, target=target)
    recorder = DivergenceRecorder(out_dir=str(tmp_path))
    trainer = Trainer(
        max_epochs=2,
        callbacks=[recorder, callback],
        **make_trainer_kwargs(
            tmp_path,
            strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
            devices=2,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        ),
    )
    trainer.fit(module, make_random_loader(16, 4, seed=0))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    assert ranks[0]["eta"] == ranks[1]["eta"]
    assert ranks[0]["layer_weights"] == ranks[1]["layer_weights"]
    for epoch in ("0", "1"):
        assert all(r["counts"][epoch] == {n: 8 for n in LAYERS} for r in ranks)  # 16 / 2
        for name in LAYERS:
            assert ranks[0]["sums"][epoch][name] != pytest.approx(ranks[1]["sums"][epoch][name])

    eta = {n: 0.0 for n in LAYERS}
    factor: dict[str, float] = {}
    for t, epoch in enumerate(("0", "1"), start=1):  # N=1: D = both ranks' mean / ln 2
        hat = {}
        for name in LAYERS:
            total = ranks[0]["sums"][epoch][name] + ranks[1]["sums"][epoch][name]
            eta[name] = 0.5 * eta[name] + 0.5 * total / 16 / math.log(2)
            hat[name] = eta[name] / (1 - 0.5**t)
        geo = math.sqrt(hat["0"] * hat["1"])
        factor = {n: min(max((hat[n] / geo) ** -0.5, 0.25), 4.0) for n in LAYERS}
    assert_close_dicts(ranks[0]["eta"], eta)
    if target == "lr":
        assert_close_dicts(ranks[0]["lrs"], {**{n: LR * factor[n] for n in LAYERS}, "base": LR})
        assert ranks[0]["layer_weights"] == {}
    else:  # the factors weight the map loss; every rate stays the base
        assert_close_dicts(ranks[0]["layer_weights"], factor)
        assert ranks[0]["lrs"] == {**{n: LR for n in LAYERS}, "base": LR}
    assert factor["0"] != pytest.approx(1.0)


# ------------------------------------------------------------- what the messages promise
def test_fast_dev_run_says_it_will_not_update_and_does_not(tmp_path: Path) -> None:
    """fast_dev_run (Lightning's one epoch) is a smoke test, not refused, and the warning says
    what the user set, not the max_epochs=1 Lightning puts in its place."""
    callback = LayerwiseLRCallback(every_n_epochs=2, rule="paper")
    trainer = Trainer(fast_dev_run=True, callbacks=[callback], **make_trainer_kwargs(tmp_path))
    match = (
        r"^fast_dev_run=True runs a single epoch, so LayerwiseLRCallback\(every_n_epochs=2\) "
        r"will not update in it \(it updates after each 2 epochs\)"
    )
    with pytest.warns(UserWarning, match=match):
        trainer.fit(ContractModule(), make_random_loader(N_TRAIN, BATCH, seed=0))
    assert callback.history == [] and set(group_lrs(trainer).values()) == {LR}


@pytest.mark.parametrize("max_steps", [2 * BATCHES - 1, 2 * BATCHES])
def test_max_steps_warning_is_kept_an_epoch_cut_short_never_updates(
    tmp_path: Path, max_steps: int
) -> None:
    """every_n_epochs=2 and a fit stopped by max_steps one step before the end of epoch 1: the
    callback warns it will not update, and it does not (the cut epoch is no interval); at
    exactly two epochs' steps it updates once, without a warning."""
    callback = LayerwiseLRCallback(every_n_epochs=2, rule="paper")
    trainer = Trainer(
        max_epochs=4,
        max_steps=max_steps,
        callbacks=[callback],
        **make_trainer_kwargs(tmp_path),
    )
    loader = make_random_loader(N_TRAIN, BATCH, seed=0)
    if max_steps < 2 * BATCHES:
        match = (
            rf"max_steps={max_steps} stops the fit before the end of epoch 2 \({BATCHES} steps "
            rf"an epoch\), where it would first update, .*raise max_steps to at least "
            rf"{2 * BATCHES}"
        )
        with pytest.warns(UserWarning, match=match):
            trainer.fit(ContractModule(), loader)
        assert callback.history == [] and set(group_lrs(trainer).values()) == {LR}
    else:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.fit(ContractModule(), loader)
        assert not [w for w in seen if "will not update" in str(w.message)]
        assert [row["epoch"] for row in callback.history] == [1]
