"""AttentionTransfer (Zagoruyko & Komodakis 2017) through DistillationModule: eq. 2 by hand on
a ResNet pair, per-layer weights of the layer-wise rule, gradients, bad options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.methods import AttentionTransfer, build_method
from lightning_layerkd.models import resnet
from tests.helpers.callback import (
    BATCH,
    BATCHES,
    LAYERS,
    LR,
    N_TRAIN,
    DivergenceRecorder,
    assert_close_dicts,
    by_hand_relative,
    distillation_module,
)
from tests.helpers.models import make_random_loader, make_trainer_kwargs

CLASSES = 5


def outputs(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> list[np.ndarray]:
    found: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda m, i, o, p=p: found.__setitem__(p, o.detach())
        )
        for p in paths
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [found[p].numpy() for p in paths]


def test_loss_is_cross_entropy_plus_half_beta_times_the_weighted_distances_by_hand():
    torch.manual_seed(0)
    teacher = resnet(18, CLASSES, width=8).double().eval()
    student = resnet(10, CLASSES, width=4).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    module = DistillationModule(
        teacher, student, method=AttentionTransfer(beta=10.0), num_classes=CLASSES
    )
    module.resolve_layers(x)
    names = module.layer_names
    assert names == ["layer1", "layer2", "layer3", "layer4"]
    weights = {"layer1": 2.0, "layer2": 1.0, "layer3": 0.5, "layer4": 0.25}
    module.set_layer_loss_weights(weights)
    out = module.training_step((x, y), 0)
    student.train()
    total = 0.0
    for name, s, t in zip(
        names, outputs(student, x, names), outputs(teacher, x, names), strict=True
    ):
        q_s = (s**2).sum(1).reshape(4, -1)  # eq. 2 with p = 2, sample by sample
        q_t = (t**2).sum(1).reshape(4, -1)
        q_s /= np.linalg.norm(q_s, axis=1, keepdims=True)
        q_t /= np.linalg.norm(q_t, axis=1, keepdims=True)
        d = ((q_s - q_t) ** 2).sum(1) / q_s.shape[1]
        np.testing.assert_allclose(out["layer_divergence"][name].numpy(), d, rtol=1e-10)
        total += weights[name] * d.mean()
    ce = F.cross_entropy(student(x), y).item()
    assert out["loss"].item() == pytest.approx(ce + 10.0 / 2 * total, rel=1e-10)


def test_the_layer_wise_rule_on_map_weights_reads_the_attention_distances(tmp_path: Path):
    """LayerwiseLRCallback(target="map_weight") works unchanged: the layer weights follow the
    relative rule by hand from the recorded divergences, and the rates stay put."""
    seed_everything(0)
    module = distillation_module("attention_transfer")
    recorder = DivergenceRecorder()
    callback = LayerwiseLRCallback(every_n_epochs=1, target="map_weight", power=1.0)
    trainer = Trainer(
        max_epochs=2,
        callbacks=[recorder, callback],
        **make_trainer_kwargs(tmp_path, limit_val_batches=0, num_sanity_val_steps=0),
    )
    trainer.fit(module, make_random_loader(N_TRAIN, BATCH, seed=0))
    want = by_hand_relative(
        recorder, [LR] * (2 * BATCHES), epochs=2, batches=BATCHES, every_n_epochs=1, power=1.0
    )
    assert all(f != pytest.approx(1.0) for f in want["factor"].values())  # the test has teeth
    assert_close_dicts(module.layer_loss_weights, want["factor"])
    assert all(lrs == {**dict.fromkeys(LAYERS, LR), "base": LR} for lrs in recorder.batch_lrs)


def test_gradients_reach_the_student_and_not_the_teacher():
    torch.manual_seed(0)
    teacher, student = resnet(18, CLASSES, width=8).eval(), resnet(10, CLASSES, width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    module = DistillationModule(teacher, student, method="attention_transfer", num_classes=CLASSES)
    module.distillation_terms(x, y, create_graph=True).losses["at_loss"].backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # no hinted layer is above the head
    assert all(p.grad is None for p in teacher.parameters())
    assert module.method_parts is None  # attention transfer learns nothing of its own


@pytest.mark.parametrize(
    ("options", "message"),
    [({"beta": -1.0}, "beta must be non-negative"), ({"p": 0.0}, "p must be positive")],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        AttentionTransfer(**options)


def test_built_by_name_with_the_papers_defaults():
    method = build_method("attention_transfer")
    assert isinstance(method, AttentionTransfer)
    assert (method.beta, method.p, method.feature_weight) == (1000.0, 2.0, 500.0)
    assert method.label == "attention_transfer"


def test_a_feature_method_composes_with_any_logit_loss():
    """AttentionTransfer(logit_loss=DKDLoss()): the DKD terms join the attention-transfer term,
    equal to the loss object's own terms on the same logits; the per-layer terms are unchanged."""
    from lightning_layerkd.methods import DKDLoss

    torch.manual_seed(0)
    teacher, student = resnet(18, CLASSES, width=8).eval(), resnet(10, CLASSES, width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    dkd = DKDLoss(warmup_epochs=0)
    alone = DistillationModule(teacher, student, method="attention_transfer", num_classes=CLASSES)
    composed = DistillationModule(
        teacher, student, method=AttentionTransfer(logit_loss=dkd), num_classes=CLASSES
    )
    a = alone.distillation_terms(x, y, create_graph=False)
    c = composed.distillation_terms(x, y, create_graph=False)
    want = dkd(c.logits, c.teacher_logits, y, task="multiclass", epoch=0)
    assert set(c.losses) == {"at_loss", *want}
    for key, value in want.items():
        torch.testing.assert_close(c.losses[key], value)
    torch.testing.assert_close(c.losses["at_loss"], a.losses["at_loss"])
    assert composed.method.label != alone.method.label
