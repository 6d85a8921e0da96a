"""JacobianMatching (Srinivas & Fleuret 2018) against a reference built from separate passes.

The method computes every term from one forward pass per network (the output's and each layer's
Jacobian, Prop. 2's penalty included). The reference below is the formula computed another way:
one forward and one backward per Jacobian (``input_jacobian``, ``attention_pixel_jacobian``) and
Prop. 2's penalty from its own forward (``jacobian_norm_penalty``), as the method did before it
shared the pass. Loss and student gradients must agree to float64 rounding under every option,
with the student's batch norm in training mode (samples coupled through the batch statistics).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd.functional.jacobian_matching import (
    activation_matching_loss,
    attention_pixel_jacobian,
    input_jacobian,
    jacobian_matching_loss,
    jacobian_norm_penalty,
)
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods import JacobianMatching
from lightning_layerkd.methods.base import Networks

B, K, SIDE = 6, 4, 10  # batch, classes, image side


def make_net(width: int, seed: int) -> nn.Sequential:
    """Stage ``"0"`` at 10x10 (a residual-free conv + batch norm + tanh), stage ``"1"`` at 5x5."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh()),
        nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.Tanh(),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, K),
    ).double()
    with torch.no_grad():
        for bn in (net[0][1], net[1][1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


@pytest.fixture
def nets() -> tuple[nn.Sequential, nn.Sequential]:
    teacher = make_net(5, seed=0).eval().requires_grad_(False)
    student = make_net(3, seed=1).train()
    return teacher, student


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, SIDE, SIDE, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, K, (B,), generator=gen)


def method_loss(
    method: JacobianMatching, teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, layers
) -> tuple[Tensor, dict[str, Tensor]]:
    """The method's total loss (cross-entropy included) and its per-layer divergences."""
    t_hooks = FeatureHooks([teacher.get_submodule(p) for p in layers], list(layers))
    s_hooks = FeatureHooks([student.get_submodule(p) for p in layers], list(layers))
    try:
        out = method(Networks(student, teacher, s_hooks, t_hooks, tuple(layers)), x, y,
                     create_graph=True)  # fmt: skip
    finally:
        t_hooks.remove()
        s_hooks.remove()
    loss = F.cross_entropy(out.logits, y) + sum(out.losses.values())
    return loss, out.divergences


def reference_loss(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    layers,
    *,
    output_weight: float,
    activation_weight: float,
    norm_penalty_weight: float,
    map_weight: float,
    map_target: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 10 (output and layers), Prop. 1 and Prop. 2, one forward per term."""
    label_free = map_target == "teacher"
    t_logits, j_teacher = input_jacobian(teacher, x, None if label_free else y)
    target = t_logits.argmax(1) if label_free else y
    logits, j_student = input_jacobian(student, x, target, create_graph=True)
    divergences = {}
    for path in layers:
        t_pixel = attention_pixel_jacobian(teacher, x, path)
        s_pixel = attention_pixel_jacobian(student, x, path, t_pixel, create_graph=True)
        divergences[path] = jacobian_matching_loss(
            s_pixel.jacobian, t_pixel.jacobian, reduction="none"
        )
    matching = output_weight * jacobian_matching_loss(j_student, j_teacher)
    matching = matching + sum(d.mean() for d in divergences.values())
    loss = F.cross_entropy(logits, y) + map_weight * matching
    loss = loss + activation_weight * activation_matching_loss(logits, t_logits)
    if norm_penalty_weight:
        loss = loss + norm_penalty_weight * jacobian_norm_penalty(student, x)[1]
    return loss, divergences


OPTIONS = list(
    itertools.product(
        ["label", "teacher"],  # map_target
        [0.0, 0.7],  # activation_weight
        [0.0, 0.3],  # norm_penalty_weight
        [(), ("0",), ("0", "1")],  # crucial layers
    )
)


@pytest.mark.parametrize(
    ("map_target", "activation_weight", "norm_penalty_weight", "layers"), OPTIONS
)
def test_loss_and_gradients_equal_separate_passes(
    nets, batch, map_target, activation_weight, norm_penalty_weight, layers
):
    teacher, student = nets
    x, y = batch
    options = {
        "output_weight": 0.8,
        "activation_weight": activation_weight,
        "norm_penalty_weight": norm_penalty_weight,
        "map_weight": 1.3,
        "map_target": map_target,
    }
    reference_student = copy.deepcopy(student)
    loss, divergences = method_loss(JacobianMatching(**options), teacher, student, x, y, layers)
    expected, expected_divergences = reference_loss(
        teacher, reference_student, x, y, layers, **options
    )
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    assert divergences.keys() == expected_divergences.keys()
    for name, d in divergences.items():
        torch.testing.assert_close(d.detach(), expected_divergences[name].detach())
    params = list(student.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, list(reference_student.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # every parameter gets a gradient, the first stage's through its Jacobian terms too
    assert all(g.abs().sum() > 0 for g in got)


def test_norm_penalty_gradient_equals_finite_differences(nets, batch):
    """Prop. 2's term of the shared pass trains the student: d/dW of the whole loss against a
    central difference (the penalty is ``K`` backward passes of the same forward)."""
    teacher, student = nets
    x, y = batch
    method = JacobianMatching(norm_penalty_weight=0.5, activation_weight=0.2)
    loss, _ = method_loss(method, teacher, student, x, y, ("0",))
    weight = student[0][0].weight
    (grad,) = torch.autograd.grad(loss, [weight])

    def loss_now() -> float:
        return float(method_loss(method, teacher, student, x, y, ("0",))[0])

    entry, h = (1, 2, 0, 1), 1e-5
    with torch.no_grad():
        old = weight[entry].item()
        weight[entry] = old + h
        up = loss_now()
        weight[entry] = old - h
        down = loss_now()
        weight[entry] = old
    assert grad[entry].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9)


def test_one_step_updates_the_running_statistics_once(nets, batch):
    """The shared pass runs the student forward once: its batch-norm running statistics move as
    after one plain forward, whatever terms the method computes."""
    teacher, student = nets
    x, y = batch
    plain = copy.deepcopy(student)
    plain(x)
    method_loss(JacobianMatching(norm_penalty_weight=1.0), teacher, student, x, y, ("0", "1"))
    for got, want in zip(student.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_output_term_alone_has_no_layers(nets, batch):
    """An empty layer list is eq. 10 on the output alone: no divergences, and the loss is the
    reference's output term."""
    teacher, student = nets
    x, y = batch
    loss, divergences = method_loss(JacobianMatching(), teacher, student, x, y, ())
    assert divergences == {}
    t_logits, j_t = input_jacobian(teacher, x, y)
    logits, j_s = input_jacobian(copy.deepcopy(student), x, y)
    by_hand = F.cross_entropy(logits, y) + (
        (j_s.flatten(1) / j_s.flatten(1).norm(dim=1, keepdim=True)
         - j_t.flatten(1) / j_t.flatten(1).norm(dim=1, keepdim=True)).square().sum(1).mean()
    )  # fmt: skip
    torch.testing.assert_close(loss.detach(), by_hand.detach(), rtol=1e-12, atol=1e-12)
    assert JacobianMatching.allows_no_layers
