"""The scale-free ``rule="relative"`` of ``LayerwiseLRCallback``: golden
values by hand, invariance to the divergence scale and the dataset size, no compounding, one
layer, the noise floor and non-finite divergences, clipping."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_layerkd import LayerwiseLRCallback
from lightning_layerkd.layerwise_lr.rules import paper_rate, relative_factors
from tests.helpers.callback import (
    BATCH,
    BATCHES,
    LAYERS,
    LR,
    N_TRAIN,
    ContractModule,
    assert_close_dicts,
    assert_history,
    assert_trajectory,
    by_hand,
    by_hand_relative,
    fit_contract,
    group_lrs,
    multistep,
    scheduler_alone,
)
from tests.helpers.models import make_random_loader, make_trainer_kwargs

LN2 = math.log(2)


# ------------------------------------------------------------------------- pure functions
def test_relative_factors_golden() -> None:
    # geometric mean of 0.02 and 0.08 is 0.04: r = 0.5 and 2, r ** -0.5 = sqrt(2), 1/sqrt(2)
    factors = relative_factors({"a": 0.02, "b": 0.08})
    assert factors["a"] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert factors["b"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    opposite = relative_factors({"a": 0.02, "b": 0.08}, power=0.5)
    assert opposite["a"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # three layers: geometric mean 0.01 * 0.1 * 10 -> 0.1 ** (1/3) ... r = (0.1, 1, 100)/cbrt(10)
    three = relative_factors({"a": 0.001, "b": 0.01, "c": 1.0}, max_factor=100.0)
    geo = (0.001 * 0.01 * 1.0) ** (1 / 3)
    for name, eta in {"a": 0.001, "b": 0.01, "c": 1.0}.items():
        assert three[name] == pytest.approx((eta / geo) ** -0.5, rel=1e-12)
    assert math.prod(three.values()) == pytest.approx(1.0, rel=1e-12)  # geometric mean 1
    clipped = relative_factors({"a": 0.001, "b": 1.0}, max_factor=4.0)
    assert clipped == {"a": 4.0, "b": 0.25}  # (1000 ** 0.5) ** +-0.5 = 5.6: clipped at 4
    # one layer: against its first eta_hat
    assert relative_factors({"a": 0.04}, reference={"a": 0.01}) == {"a": pytest.approx(0.5)}
    assert relative_factors({"a": 0.04}) == {"a": 1.0}
    assert relative_factors({}) == {}


def test_paper_rate_golden() -> None:
    assert paper_rate(0.1, 3.0, eps=1.0) == pytest.approx(0.05)
    assert paper_rate(0.1, 0.0, eps=1e-8, max_lr=0.5) == 0.5
    assert paper_rate(0.1, 99.0, eps=1.0, min_lr=0.02) == 0.02


# ---------------------------------------------------------------------- the rule in a fit
def test_relative_rates_match_hand_computation(tmp_path: Path) -> None:
    """4 epochs, an update every epoch, MultiStepLR, real (attention-to-uniform) divergences:
    every batch's rate, the history and the logged values are the hand-computed ones."""
    seed_everything(0)
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.7)
    module = ContractModule(make_scheduler=multistep)
    trainer, recorder = fit_contract(module, callback, tmp_path, 4)
    alone = scheduler_alone(multistep, "epoch", 4, BATCHES)
    want = by_hand_relative(recorder, alone, epochs=4, batches=BATCHES, every_n_epochs=1, gamma=0.7)
    assert_trajectory(trainer, recorder, want)
    assert_history(callback.history, want["history"])
    assert all(f != pytest.approx(1.0) for f in want["factor"].values())  # the test has teeth
    # with two layers the factors are reciprocal (geometric mean 1)
    assert callback.factor["0"] * callback.factor["1"] == pytest.approx(1.0, rel=1e-12)
    # the first update: eta_hat = D exactly (bias correction), D = mean / ln 2
    d0 = recorder.sums[0]["0"] / recorder.counts[0]["0"] / LN2
    assert callback.history[0]["0"]["eta"] == pytest.approx(d0, rel=1e-12)
    for key in ("eta", "divergence", "factor"):
        for name in LAYERS:
            logged = float(trainer.callback_metrics[f"layerwise/{key}/{name}"])
            assert logged == pytest.approx(want["history"][-1][name][key], rel=1e-6)


def test_same_rates_when_divergences_are_scaled(tmp_path: Path) -> None:
    """Every divergence x100: the relative rule gives the same factors (to the float32 rounding
    of the x100);
    the paper rule does not (the test would catch a rule with a scale)."""
    runs = {}
    for scale in (1.0, 100.0):
        for rule in ("relative", "paper"):
            seed_everything(0)
            callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5, rule=rule)
            module = ContractModule(scale=scale)
            trainer, _ = fit_contract(module, callback, tmp_path / f"{rule}{scale}", 3)
            runs[rule, scale] = group_lrs(trainer)
    assert_close_dicts(runs["relative", 100.0], runs["relative", 1.0], rel=1e-6)  # float32 x100
    assert runs["relative", 1.0]["0"] != pytest.approx(LR)
    assert runs["paper", 100.0]["0"] != pytest.approx(runs["paper", 1.0]["0"], rel=1e-3)


def test_same_rates_when_the_dataset_is_ten_times_larger(tmp_path: Path) -> None:
    """Constant per-sample divergences on 20 and on 200 training samples: same rates with the
    relative rule; with the paper's sum, eta grows tenfold and the rates differ."""
    constant = {"0": 0.02, "1": 0.2}
    lrs = {}
    for n in (N_TRAIN, 10 * N_TRAIN):
        for rule in ("relative", "paper"):
            callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5, rule=rule)
            trainer = Trainer(
                max_epochs=2,
                callbacks=[callback],
                **make_trainer_kwargs(tmp_path / f"{rule}{n}", limit_val_batches=0),
            )
            trainer.fit(ContractModule(constant=constant), make_random_loader(n, BATCH, seed=0))
            lrs[rule, n] = group_lrs(trainer)
    assert_close_dicts(lrs["relative", 10 * N_TRAIN], lrs["relative", N_TRAIN], rel=1e-12)
    # golden: r = sqrt(0.02 / 0.2) for "0", so factor = 10 ** 0.25
    # (float32 constants: 1e-7 relative)
    assert lrs["relative", N_TRAIN]["0"] == pytest.approx(LR * 10**0.25, rel=1e-6)
    assert lrs["relative", N_TRAIN]["1"] == pytest.approx(LR * 10**-0.25, rel=1e-6)
    assert lrs["paper", 10 * N_TRAIN]["0"] != pytest.approx(lrs["paper", N_TRAIN]["0"], rel=1e-3)


def test_constant_divergences_do_not_compound(tmp_path: Path) -> None:
    """Constant divergences: the factor after 1 update equals the factor after 5, and the rate
    stays factor x LR (the paper's rule would divide it again at every update)."""
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.9)
    trainer, _ = fit_contract(ContractModule(constant={"0": 0.1, "1": 0.4}), callback, tmp_path, 5)
    factors = [record["0"]["factor"] for record in callback.history]
    assert len(factors) == 5
    # golden values to the float32 rounding of the constants
    assert factors == pytest.approx([math.sqrt(2)] * 5, rel=1e-6)  # (0.1 / 0.2) ** -0.5
    assert factors == pytest.approx([factors[0]] * 5, rel=1e-12)  # identical, not compounding
    assert [r["1"]["factor"] for r in callback.history] == pytest.approx([2**-0.5] * 5, rel=1e-6)
    assert group_lrs(trainer)["0"] == pytest.approx(LR * math.sqrt(2), rel=1e-6)
    assert [r["0"]["eta"] for r in callback.history] == pytest.approx([0.1 / LN2] * 5, rel=1e-6)


def test_single_crucial_layer(tmp_path: Path) -> None:
    """One reporting layer: factor 1 at the first update, then (eta_hat_t / eta_hat_1) ** -0.5;
    the unreported layer and the base group keep the scheduler's rate."""
    seed_everything(0)
    callback = LayerwiseLRCallback(every_n_epochs=1, gamma=0.5)
    trainer, recorder = fit_contract(ContractModule(report=["0"]), callback, tmp_path, 3)
    want = by_hand_relative(
        recorder,
        scheduler_alone(None, "epoch", 3, BATCHES),
        epochs=3,
        batches=BATCHES,
        every_n_epochs=1,
        gamma=0.5,
        layers=["0"],
    )
    assert callback.history[0]["0"]["factor"] == 1.0
    assert_history(callback.history, want["history"])
    lrs = group_lrs(trainer)
    assert lrs["0"] == pytest.approx(want["final_lrs"]["0"], rel=1e-12)
    assert lrs["0"] != pytest.approx(LR)
    assert lrs["1"] == LR and lrs["base"] == LR


@pytest.mark.parametrize("value", [1e-9, -1e-9, math.nan, math.inf], ids=str)
def test_layer_without_signal_keeps_factor_one(tmp_path: Path, value: float) -> None:
    """A layer under the noise floor, slightly negative (float noise) or not finite keeps
    factor 1, is warned about once by name, never raises, and leaves the other layer to the
    one-layer rule."""
    callback = LayerwiseLRCallback(every_n_epochs=1)
    module = ContractModule(constant={"1": value})
    with pytest.warns(UserWarning, match=r"layer '1'.*keeps factor 1") as warned:
        trainer, _ = fit_contract(module, callback, tmp_path, 3)
    assert sum("layer '1'" in str(w.message) for w in warned) == 1  # once
    assert all(record["1"]["factor"] == 1.0 for record in callback.history)
    assert group_lrs(trainer)["1"] == LR
    assert "1" not in callback.eta
    assert callback.history[0]["0"]["factor"] == 1.0  # alone in the geometric mean
    assert group_lrs(trainer)["0"] != pytest.approx(LR)  # ... then against its first eta_hat


def test_a_layer_that_loses_its_signal_returns_to_factor_one(tmp_path: Path) -> None:
    """Layer "1" reports NaN in epoch 2 only: its factor goes back to 1 there (no stale
    factor), and the next update gives it a factor again."""
    callback = LayerwiseLRCallback(every_n_epochs=1)
    module = ContractModule(nan_epochs={"1": {2}})
    with pytest.warns(UserWarning, match="not finite"):
        fit_contract(module, callback, tmp_path, 4)
    factors = [record["1"]["factor"] for record in callback.history]
    assert factors[2] == 1.0
    assert factors[1] != pytest.approx(1.0) and factors[3] != pytest.approx(1.0)


def test_clipping_bounds_the_factor(tmp_path: Path) -> None:
    """Divergences 600x apart: r ** -0.5 would be 24.5 ** +-0.5 ~ 4.95 / 0.2; max_factor=2
    clips them to exactly 2 and 1/2."""
    callback = LayerwiseLRCallback(every_n_epochs=1, max_factor=2.0)
    trainer, _ = fit_contract(
        ContractModule(constant={"0": 0.001, "1": 0.6}), callback, tmp_path, 1
    )
    assert group_lrs(trainer) == {"0": 2 * LR, "1": 0.5 * LR, "base": LR}


def test_paper_rule_survives_a_tiny_negative_divergence(tmp_path: Path) -> None:
    """rule="paper" with a divergence of -1e-9 (float noise) skips that layer with a warning
    instead of taking the square root of a negative number."""
    callback = LayerwiseLRCallback(every_n_epochs=1, rule="paper", reduction="mean")
    with pytest.warns(UserWarning, match=r"layer '1'.*left unchanged"):
        trainer, recorder = fit_contract(
            ContractModule(constant={"1": -1e-9}), callback, tmp_path, 1
        )
    want = by_hand(
        recorder,
        scheduler_alone(None, "epoch", 1, BATCHES),
        epochs=1,
        batches=BATCHES,
        every_n_epochs=1,
        reduction="mean",
        layers=["0"],
    )
    assert group_lrs(trainer)["1"] == LR
    assert group_lrs(trainer)["0"] == pytest.approx(want["final_lrs"]["0"], rel=1e-12)


def test_max_steps_before_the_first_update_warns(tmp_path: Path) -> None:
    """A run bounded by max_steps that ends before the first update says so before training
    (3 steps an epoch, the first update after 6; max_steps=6 is enough and does not warn)."""
    for max_steps, warns in ((4, True), (6, False)):
        callback = LayerwiseLRCallback(every_n_epochs=2)
        trainer = Trainer(
            max_epochs=5,
            max_steps=max_steps,
            callbacks=[callback],
            **make_trainer_kwargs(tmp_path / str(max_steps), limit_val_batches=0),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(ContractModule(), make_random_loader(N_TRAIN, BATCH, seed=0))
        said = [str(w.message) for w in caught if "will not update" in str(w.message)]
        assert bool(said) == warns, said
        if warns:
            assert "max_steps=4" in said[0] and "3 steps an epoch" in said[0]


def test_state_dict_round_trip_keeps_the_relative_state() -> None:
    callback = LayerwiseLRCallback()
    callback.eta, callback.updates = {"a": 0.1}, {"a": 2}
    callback.reference, callback.factor = {"a": 0.3}, {"a": 1.5}
    restored = LayerwiseLRCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict()
    assert (restored.eta, restored.updates, restored.factor) == ({"a": 0.1}, {"a": 2}, {"a": 1.5})


def test_scale_knob_scales_what_the_callback_reads() -> None:
    """Guard for the scale test: the two runs differ in what the callback reads."""
    module = ContractModule(scale=100.0)
    x, y = next(iter(make_random_loader(4, 4)))
    module_1 = ContractModule()
    module_1.load_state_dict(module.state_dict())
    d100 = module.training_step((x, y), 0)["layer_divergence"]["0"]
    d1 = module_1.training_step((x, y), 0)["layer_divergence"]["0"]
    torch.testing.assert_close(d100, 100 * d1)
