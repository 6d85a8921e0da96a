"""FitNet (Romero et al. 2015) through DistillationModule: eq. 3 by hand with the learnt
regressors, gradients that flow to the student and the regressors and not to the teacher, the
regressors in their layer's param group under the layer-wise callback, checkpoints and resume,
bad options."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.methods import FitNet, build_method
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


def resnets(dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = resnet(18, CLASSES, width=8).to(dtype).eval()
    return teacher, resnet(10, CLASSES, width=4).to(dtype)


def batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def features(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> list[np.ndarray]:
    """The layers' outputs read by plain forward hooks, as NumPy arrays."""
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


def regress(feature: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """An unpadded convolution by loops over the kernel, then ReLU (Romero et al. 2.2)."""
    b, _, h, w = feature.shape
    k_h, k_w = weight.shape[2:]
    out = np.zeros((b, weight.shape[0], h - k_h + 1, w - k_w + 1))
    for a in range(k_h):
        for c in range(k_w):
            window = feature[:, :, a : a + out.shape[2], c : c + out.shape[3]]
            out += np.einsum("bihw,oi->bohw", window, weight[:, :, a, c])
    return np.maximum(out + bias[None, :, None, None], 0.0)


def test_loss_is_cross_entropy_plus_the_hint_losses_of_eq_3_by_hand():
    teacher, student = resnets()
    x, y = batch()
    layers = [("layer1", "layer1"), ("layer2", "layer3")]  # layer2 (8x8) -> layer3 (4x4): k = 5
    module = DistillationModule(
        teacher, student, method=FitNet(hint_weight=3.0), layers=layers, num_classes=CLASSES
    )
    module.resolve_layers(x)
    assert module.method_parts is not None
    convs = [r.conv for r in module.method_parts.per_layer]
    assert [c.kernel_size for c in convs] == [(1, 1), (5, 5)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 8), (8, 32)]
    for conv in convs:  # away from the ReLU's kink and from zero, so the test has teeth
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.1)
    module.set_layer_loss_weights({"layer1": 1.0, "layer2": 0.25})
    out = module.training_step((x, y), 0)

    student.train()  # the student's features as the step saw them (batch statistics)
    s_feats = features(student, x, ["layer1", "layer2"])
    t_feats = features(teacher, x, ["layer1", "layer3"])
    want_d = {}
    for name, s, t, conv in zip(["layer1", "layer2"], s_feats, t_feats, convs, strict=True):
        r = regress(s, conv.weight.detach().numpy(), conv.bias.detach().numpy())
        assert r.shape == t.shape
        want_d[name] = 0.5 * ((r - t) ** 2).reshape(len(x), -1).mean(axis=1)
    logits = student(x).detach()
    ce = F.cross_entropy(logits, y).item()
    hint = want_d["layer1"].mean() + 0.25 * want_d["layer2"].mean()
    for name, d in out["layer_divergence"].items():
        np.testing.assert_allclose(d.numpy(), want_d[name], rtol=1e-10)
    assert all(d.min() > 0 for d in want_d.values())
    assert out["loss"].item() == pytest.approx(ce + 3.0 * hint, rel=1e-10)


def test_the_regressors_and_student_get_gradients_and_the_teacher_none():
    teacher, student = resnets()
    x, y = batch()
    module = DistillationModule(teacher, student, method="fitnet", num_classes=CLASSES)
    module.resolve_layers(x)
    assert module.layer_pairs == [(f"layer{i}",) * 2 for i in range(1, 5)]
    module.distillation_terms(x, y, create_graph=True).losses["hint_loss"].backward()
    assert module.method_parts is not None
    for regressor in module.method_parts.per_layer:
        assert regressor.conv.weight.grad is not None and regressor.conv.weight.grad.abs().sum() > 0
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the hint terms do not reach the head: it is not below any hinted layer
    assert student.fc.weight.grad is None


def test_each_regressor_joins_its_layers_param_group():
    teacher, student = resnets(torch.float32)
    x, _ = batch()
    module = DistillationModule(
        teacher, student, method="fitnet", num_classes=CLASSES, example_input=x.float()
    )
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.param_groups()}
    assert module.method_parts is not None
    for name, regressor in zip(module.layer_names, module.method_parts.per_layer, strict=True):
        own = {id(p) for p in student.get_submodule(name).parameters()}
        assert groups[name] == own | {id(p) for p in regressor.parameters()}
    every = [i for ids in groups.values() for i in ids]
    assert (
        len(every)
        == len(set(every))
        == len(list(module.parameters())) - len(list(teacher.parameters()))
    )


def test_the_layerwise_rule_scales_each_regressors_rate_with_its_layer(tmp_path: Path):
    """LayerwiseLRCallback works unchanged on FitNet's hint losses: the rates follow the
    relative rule by hand from the recorded divergences, regressors included."""
    seed_everything(0)
    module = distillation_module("fitnet")
    recorder = DivergenceRecorder()
    trainer = Trainer(
        max_epochs=3,
        callbacks=[recorder, LayerwiseLRCallback(every_n_epochs=1)],
        **make_trainer_kwargs(tmp_path, limit_val_batches=0, num_sanity_val_steps=0),
    )
    trainer.fit(module, make_random_loader(N_TRAIN, BATCH, seed=0))
    want = by_hand_relative(
        recorder, [LR] * (3 * BATCHES), epochs=3, batches=BATCHES, every_n_epochs=1
    )
    assert all(f != pytest.approx(1.0) for f in want["factor"].values())  # the test has teeth
    for got, expected in zip(recorder.batch_lrs, want["batch_lrs"], strict=True):
        assert_close_dicts(got, expected)
    optimizer = trainer.optimizers[0]
    assert module.method_parts is not None
    for name, regressor in zip(LAYERS, module.method_parts.per_layer, strict=True):
        group = next(g for g in optimizer.param_groups if g["name"] == name)
        assert all(any(p is q for q in group["params"]) for p in regressor.parameters())


def _fit(
    root: Path, epochs: int, ckpt_path: str | None = None, method: str = "fitnet"
) -> DistillationModule:
    seed_everything(0, workers=True)
    module = distillation_module(method)
    trainer = Trainer(
        max_epochs=epochs,
        deterministic=True,
        callbacks=[
            LayerwiseLRCallback(every_n_epochs=1, target="map_weight", power=1.0),
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1),
        ],
        **make_trainer_kwargs(root, enable_checkpointing=True, limit_val_batches=0),
    )
    trainer.fit(module, make_random_loader(N_TRAIN, BATCH, seed=0), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("method", ["fitnet", "review_kd"])
def test_resume_restores_the_learnt_parts_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, method: str
):
    """FitNet's regressors; ReviewKD's fusion (batch-norm statistics included) likewise."""
    straight = _fit(tmp_path / "straight", 3, method=method)
    first = _fit(tmp_path / "resumed", 1, method=method)
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert first.method_parts is not None
    for key, value in first.method_parts.state_dict().items():
        assert torch.equal(saved["state_dict"][f"method_parts.{key}"], value)
    resumed = _fit(tmp_path / "resumed", 3, str(last), method=method)
    assert resumed.layer_loss_weights == straight.layer_loss_weights != {}
    assert straight.method_parts is not None and resumed.method_parts is not None
    s_state, r_state = straight.state_dict(), resumed.state_dict()
    assert s_state.keys() == r_state.keys()
    for key in s_state:  # parameters and buffers
        torch.testing.assert_close(r_state[key], s_state[key], rtol=0, atol=0, msg=key)
    # load_from_checkpoint rebuilds the regressors from the saved shapes before loading them
    loaded = DistillationModule.load_from_checkpoint(
        last,
        teacher=distillation_module().teacher,
        student=distillation_module().student,
        method=method,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
    )
    assert loaded.method_parts is not None
    parts = zip(loaded.method_parts.parameters(), resumed.method_parts.parameters(), strict=True)
    for a, b in parts:  # last.ckpt now holds the resumed run's end
        assert torch.equal(a, b)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="hint_weight must be non-negative"):
        FitNet(hint_weight=-1.0)
    with pytest.raises(ValueError, match="logit_weight must be non-negative"):
        FitNet(logit_weight=-1.0)
    assert isinstance(build_method("fitnet"), FitNet)


def test_regressors_need_an_example_to_be_sized():
    teacher, student = resnets(torch.float32)
    module = DistillationModule(
        teacher, student, method="fitnet", layers=["layer1"], num_classes=CLASSES
    )
    with pytest.raises(ValueError, match="FitNet sizes its learnt parts.*example_input"):
        module.param_groups()
