"""ReviewKD (Chen et al. 2021) through DistillationModule: ABF by hand, the fusion's shapes on
ResNet and MobileNet pairs, the loss from the fusion's outputs and HCL, gradients, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from lightning_layerkd import DistillationModule
from lightning_layerkd.functional.review import hierarchical_context_loss
from lightning_layerkd.methods import ReviewKD
from lightning_layerkd.methods.review_kd import AttentionFusion
from lightning_layerkd.models import resnet

CLASSES = 5


def test_attention_fusion_by_hand():
    fusion = AttentionFusion(2, 2, 3, fuse=True).double().eval()
    with torch.no_grad():
        fusion.reduce[0].weight.copy_(torch.eye(2, dtype=torch.float64).view(2, 2, 1, 1))
        fusion.attention.weight.copy_(  # type: ignore[union-attr]
            torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]).view(2, 4, 1, 1)
        )
        fusion.attention.bias.copy_(torch.tensor([0.5, 0.0]))  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    deeper = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    _, fused = fusion(x, deeper)
    bn = 1 / math.sqrt(1 + 1e-5)  # eval-mode batch norm with its initial statistics
    a = x.numpy()[0] * bn
    up = deeper.numpy()[0].repeat(2, axis=1).repeat(2, axis=2)  # nearest: 2x2 -> 4x4
    z0 = 1 / (1 + np.exp(-(a[0] + 0.5)))
    z1 = 1 / (1 + np.exp(up[1]))
    np.testing.assert_allclose(fused.detach().numpy()[0], a * z0 + up * z1, rtol=1e-12)


def features(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> list[torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: found.__setitem__(p, o))
        for p in paths
    ]
    model(x)
    for h in handles:
        h.remove()
    return [found[p] for p in paths]


def mobilenet_v2() -> torch.nn.Module:
    # no dropout: the test recomputes the training step's cross-entropy
    return torchvision.models.mobilenet_v2(weights=None, num_classes=CLASSES, dropout=0.0)


def tv_resnet18() -> torch.nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=CLASSES)


@pytest.mark.parametrize(
    ("teacher", "student", "size"),
    [
        pytest.param(
            lambda: resnet(18, CLASSES, width=8),
            lambda: resnet(10, CLASSES, width=4),
            16,
            id="resnet18->resnet10",
        ),
        pytest.param(
            mobilenet_v2, tv_resnet18, 64, id="mobilenet_v2->resnet18", marks=pytest.mark.slow
        ),
        pytest.param(
            tv_resnet18, mobilenet_v2, 64, id="resnet18->mobilenet_v2", marks=pytest.mark.slow
        ),
    ],
)
def test_the_fusion_outputs_the_teachers_shapes_and_the_loss_is_its_hcl(teacher, student, size):
    torch.manual_seed(0)
    t_net, s_net = teacher().double().eval(), student().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (2,), generator=g)
    module = DistillationModule(t_net, s_net, method=ReviewKD(mid_channels=8), num_classes=CLASSES)
    module.resolve_layers(x)
    assert module.layer_pairs is not None and len(module.layer_pairs) == 4
    out = module.training_step((x, y), 0)
    s_paths = [s for s, _ in module.layer_pairs]
    t_paths = [t for _, t in module.layer_pairs]
    with torch.no_grad():
        s_feats = features(s_net, x, s_paths)
        t_feats = features(t_net, x, t_paths)
        assert module.method_parts is not None
        fusions = list(module.method_parts.per_layer)
        deeper = None
        fused = [None] * 4
        for j in (3, 2, 1, 0):  # from the deepest layer to the shallowest
            fused[j], deeper = fusions[j](s_feats[j], deeper)
        total = 0.0
        for j in range(4):
            assert fused[j].shape == t_feats[j].shape  # type: ignore[union-attr]
            d = hierarchical_context_loss(fused[j], t_feats[j])  # type: ignore[arg-type]
            torch.testing.assert_close(out["layer_divergence"][s_paths[j]], d, rtol=1e-10, atol=0)
            total += d.mean().item()
        ce = F.cross_entropy(s_net(x), y).item()
    assert out["loss"].item() == pytest.approx(ce + total, rel=1e-10)


def test_gradients_reach_every_fusion_and_the_student_and_not_the_teacher():
    torch.manual_seed(0)
    teacher, student = resnet(18, CLASSES, width=8).eval(), resnet(10, CLASSES, width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    module = DistillationModule(teacher, student, method="review_kd", num_classes=CLASSES)
    module.distillation_terms(x, y, create_graph=True).losses["review_loss"].backward()
    assert module.method_parts is not None
    for j, fusion in enumerate(module.method_parts.per_layer):
        assert fusion.output[0].weight.grad.abs().sum() > 0
        if j < 3:  # the deepest fuses nothing
            assert fusion.attention.weight.grad.abs().sum() > 0
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.param_groups()}
    for name, fusion in zip(module.layer_names, module.method_parts.per_layer, strict=True):
        assert {id(p) for p in fusion.parameters()} <= groups[name]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"review_weight": -1.0}, "review_weight must be non-negative"),
        ({"mid_channels": 0}, "mid_channels must be a positive integer"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        ReviewKD(**options)
