"""``LayerwiseLRCallback(target="map_weight")``: the relative rule's factors weight each crucial
layer's term of the map loss instead of its learning rate (docs/design.md section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.methods import AttentionMaps, InformationFlow, JacobianMatching
from tests.helpers.callback import (
    BATCH,
    BATCHES,
    LAYERS,
    LR,
    N_TRAIN,
    ContractModule,
    DivergenceRecorder,
    assert_close_dicts,
    by_hand_relative,
    distillation_module,
    fit_contract,
)
from tests.helpers.models import make_random_loader, make_tiny_cnn, make_trainer_kwargs


def _module(method: Any) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        make_tiny_cnn(8), make_tiny_cnn(4), method=method, layers=LAYERS, num_classes=10
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def test_layer_weights_scale_each_layer_term_of_the_hand_computed_loss() -> None:
    module = _module(AttentionMaps(map_weight=0.7))
    x, y = _batch()
    out = module.distillation_terms(x, y, create_graph=False)
    d0, d1 = (out.divergences[n].double().mean() for n in LAYERS)
    ce = F.cross_entropy(out.logits.double(), y)
    assert float(module.training_step((x, y), 0)["loss"]) == pytest.approx(
        float(ce + 0.7 * (d0 + d1)), rel=1e-6
    )
    module.set_layer_loss_weights({"0": 2.0, "1": 0.25})
    loss = module.training_step((x, y), 0)["loss"]
    assert float(loss) == pytest.approx(float(ce + 0.7 * (2.0 * d0 + 0.25 * d1)), rel=1e-6)


def test_a_zero_weight_stops_that_layers_gradient() -> None:
    """Layer "1"'s weights feed only its own map (and the head); with its weight 0 the map loss
    no longer reaches layer "1" except through the task loss's path."""
    module = _module(AttentionMaps(task_loss=False))
    x, y = _batch()
    module.set_layer_loss_weights({"0": 1.0, "1": 0.0})
    loss = module.training_step((x, y), 0)["loss"]
    grads = torch.autograd.grad(loss, [module.student[0][0].weight, module.student[1][0].weight])
    assert float(grads[0].abs().sum()) > 0
    assert float(grads[1].abs().sum()) == 0.0


def test_information_flow_weights_its_layer_terms() -> None:
    module = _module(InformationFlow(task_loss=False))
    x, y = _batch()
    out = module.distillation_terms(x, y, create_graph=False)
    output_term = float(out.losses["map_loss"]) - sum(float(d[0]) for d in out.divergences.values())
    module.set_layer_loss_weights({"0": 3.0})
    got = float(module.training_step((x, y), 0)["loss"])
    want = output_term + 3.0 * float(out.divergences["0"][0]) + float(out.divergences["1"][0])
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"2": 1.0}, r"no crucial layers \['2'\]"),
        ({"0": -1.0}, "finite and non-negative"),
        ({"0": float("nan")}, "finite and non-negative"),
    ],
)
def test_bad_weights_are_refused(weights: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _module("attention").set_layer_loss_weights(weights)


def test_a_method_without_layer_terms_is_refused() -> None:
    with pytest.raises(ValueError, match="JacobianMatching has no per-layer loss terms"):
        _module(JacobianMatching()).set_layer_loss_weights({"0": 2.0})


class WeightRecorder(Callback):
    """The layer weights in force at the start of every training batch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights.append({n: pl_module.layer_loss_weights.get(n, 1.0) for n in LAYERS})


@pytest.mark.parametrize("power", [-0.5, 1.0])
def test_the_factors_become_the_layer_weights_and_the_rates_stay(
    tmp_path: Path, power: float
) -> None:
    """3 epochs, an update every epoch: every batch's layer weights are the factors computed by
    hand from the recorded divergences, and every learning rate stays the optimizer's."""
    seed_everything(0)
    module = distillation_module("attention")
    callback = LayerwiseLRCallback(every_n_epochs=1, power=power, target="map_weight")
    weights = WeightRecorder()
    recorder = DivergenceRecorder()
    trainer = Trainer(
        max_epochs=3,
        callbacks=[recorder, weights, callback],
        **make_trainer_kwargs(tmp_path, limit_val_batches=0, num_sanity_val_steps=0),
    )
    trainer.fit(module, make_random_loader(N_TRAIN, BATCH, seed=0))
    alone = [LR] * (3 * BATCHES)
    want = by_hand_relative(
        recorder, alone, epochs=3, batches=BATCHES, every_n_epochs=1, power=power
    )
    for got, expected in zip(weights.weights, want["batch_lrs"], strict=True):
        assert_close_dicts(got, {n: expected[n] / LR for n in LAYERS})
    assert_close_dicts(module.layer_loss_weights, want["factor"])
    assert all(f != pytest.approx(1.0) for f in want["factor"].values())  # the test has teeth
    assert all(lrs == {"0": LR, "1": LR, "base": LR} for lrs in recorder.batch_lrs)
    logged = float(trainer.callback_metrics["layerwise/map_weight/0"])
    assert logged == pytest.approx(want["factor"]["0"], rel=1e-6)


def _run(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[DistillationModule, Any]:
    seed_everything(0, workers=True)
    module = distillation_module("attention")
    callback = LayerwiseLRCallback(every_n_epochs=1, power=1.0, target="map_weight")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1)
    trainer = Trainer(
        max_epochs=epochs,
        deterministic=True,
        callbacks=[callback, checkpoint],
        **make_trainer_kwargs(root, enable_checkpointing=True, limit_val_batches=0),
    )
    trainer.fit(module, make_random_loader(N_TRAIN, BATCH, seed=0), ckpt_path=ckpt_path)
    return module, callback


def test_a_resumed_run_keeps_the_weights_and_ends_like_the_straight_one(tmp_path: Path) -> None:
    straight, s_callback = _run(tmp_path / "straight", 4)
    _run(tmp_path / "resumed", 2)
    resumed, r_callback = _run(tmp_path / "resumed", 4, str(tmp_path / "resumed/ckpt/last.ckpt"))
    assert r_callback.history == s_callback.history
    assert resumed.layer_loss_weights == straight.layer_loss_weights != {}
    for a, b in zip(resumed.student.parameters(), straight.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_module_without_layer_weights_is_refused(tmp_path: Path) -> None:
    callback = LayerwiseLRCallback(every_n_epochs=1, target="map_weight")
    with pytest.raises(ValueError, match="ContractModule has no set_layer_loss_weights"):
        fit_contract(ContractModule(), callback, tmp_path, 1)


def test_map_weight_needs_the_relative_rule() -> None:
    with pytest.raises(ValueError, match="target='map_weight'.*Use rule='relative'"):
        LayerwiseLRCallback(rule="paper", target="map_weight")
    with pytest.raises(ValueError, match="target must be one of"):
        LayerwiseLRCallback(target="weights")  # type: ignore[arg-type]
