"""Hessian-map probes of a frozen eval-mode model (the teacher) in one pass over a repeated
batch (lightning_layerkd.functional._probes): the same maps, to float64 rounding, as one pass per
probe,
with the probes drawn in the same order from the same generator."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_layerkd.functional.derivatives import compute_maps
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.layers.specs import conversion_conv
from lightning_layerkd.models import resnet

B, CLASSES = 3, 10
LAYERS = ["layer1", "layer2", "layer3"]


def teacher() -> nn.Module:
    """A float64 eval-mode ResNet-10 with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    net = resnet(10, CLASSES, 4).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def inputs(rows: int = B) -> Tensor:
    return torch.randn(rows, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()


def hooks_for(net: nn.Module, wrt: str) -> FeatureHooks:
    modules = [net.get_submodule(p) for p in LAYERS]
    if wrt == "weight":
        convs = [conversion_conv(m, p) for m, p in zip(modules, LAYERS, strict=True)]
        return FeatureHooks([c for _, c in convs], [p for p, _ in convs])
    return FeatureHooks(modules, LAYERS)


@contextmanager
def forward_rows(net: nn.Module) -> Iterator[list[int]]:
    """The number of rows of every forward pass of ``net``."""
    rows: list[int] = []
    handle = net.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


@contextmanager
def one_module_in_train_mode(net: nn.Module) -> Iterator[None]:
    """A train-mode identity: the same function, but the model is no longer all in eval mode,
    which must send it down the one-pass-per-probe path (the reference)."""
    net.add_module("train_mode_identity", nn.Identity().train())
    try:
        yield
    finally:
        del net.train_mode_identity


def maps(
    net: nn.Module,
    hooks: FeatureHooks,
    x: Tensor,
    wrt: str,
    k: int,
    seed: int | None = 5,
    **options: Any,
) -> tuple[Tensor, list[Tensor]]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return compute_maps(
        net, x, hooks, method="hessian", wrt=wrt, num_probes=k, generator=generator, **options
    )


def sequential(
    net: nn.Module, x: Tensor, wrt: str, k: int, **options: Any
) -> tuple[Tensor, list[Tensor]]:
    hooks = hooks_for(net, wrt)
    try:
        with one_module_in_train_mode(net), forward_rows(net) as rows:
            result = maps(net, hooks, x, wrt, k, **options)
    finally:
        hooks.remove()
    assert rows == [len(x)] * k  # the reference really is one pass per probe
    return result


def assert_same_maps(got: list[Tensor], expected: list[Tensor]) -> None:
    assert len(got) == len(expected) == len(LAYERS)
    for g, e in zip(got, expected, strict=True):
        assert float(e.abs().max()) > 1e-6  # not a degenerate map
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_batched_probes_give_the_sequential_maps(wrt: str, k: int) -> None:
    net, x = teacher(), inputs()
    reference_logits, reference = sequential(net, x, wrt, k)
    hooks = hooks_for(net, wrt)
    with forward_rows(net) as rows:
        first_logits, first = maps(net, hooks, x, wrt, k)  # plans the draws with probe 1
        logits, batched = maps(net, hooks, x, wrt, k)  # every probe in one pass
    hooks.remove()
    # one probe, then the other k - 1 together; then all k in one pass
    assert rows == ([B, B] if k == 1 else [B, (k - 1) * B, k * B])
    assert_same_maps(first, reference)
    assert_same_maps(batched, reference)
    for found in (first_logits, logits):
        assert found.shape == (B, CLASSES) and not found.requires_grad
        torch.testing.assert_close(found, reference_logits)
    torch.testing.assert_close(logits, net(x))


@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_batched_probes_draw_from_the_global_generator_in_the_same_order(wrt: str) -> None:
    net, x, k = teacher(), inputs(), 4
    torch.manual_seed(123)
    _, reference = sequential(net, x, wrt, k, seed=None)
    hooks = hooks_for(net, wrt)
    maps(net, hooks, x, wrt, k, seed=None)  # plans
    torch.manual_seed(123)
    with forward_rows(net) as rows:
        _, batched = maps(net, hooks, x, wrt, k, seed=None)
    hooks.remove()
    assert rows == [k * B]
    assert_same_maps(batched, reference)
    # and another seed gives other maps: the draws come from the global generator
    torch.manual_seed(124)
    _, other = sequential(net, x, wrt, k, seed=None)
    assert not torch.allclose(other[0], reference[0])


def test_batched_probes_with_a_multilabel_target() -> None:
    net, x, k = teacher(), inputs(), 3
    y = (torch.arange(B * CLASSES).view(B, CLASSES) % 3 == 0).double()
    _, reference = sequential(net, x, "weight", k, target=y, task="multilabel")
    hooks = hooks_for(net, "weight")
    maps(net, hooks, x, "weight", k, target=y, task="multilabel")
    _, batched = maps(net, hooks, x, "weight", k, target=y, task="multilabel")
    hooks.remove()
    assert_same_maps(batched, reference)


def test_a_new_input_layout_is_planned_again() -> None:
    """The activation probes' shapes follow the batch: another batch size plans anew (one probe
    alone first) and still gives the sequential maps."""
    net, k = teacher(), 2
    hooks = hooks_for(net, "activation")
    maps(net, hooks, inputs(3), "activation", k)
    x = inputs(2)
    with forward_rows(net) as rows:
        _, batched = maps(net, hooks, x, "activation", k)
    hooks.remove()
    assert rows == [2, 2]
    assert_same_maps(batched, sequential(net, x, "activation", k)[1])


def test_a_layer_the_plan_missed_gets_fresh_probes_and_is_planned_again() -> None:
    net, x, k = teacher(), inputs(), 2
    hooks = hooks_for(net, "weight")
    maps(net, hooks, x, "weight", k)
    plan = hooks.probe_plan
    assert plan is not None and [i for i, _ in plan.draws] == [0, 1, 2]  # forward order
    hooks.probe_plan = type(plan)(plan.key, plan.draws[:2])  # as if layer3 had not run before
    _, found = maps(net, hooks, x, "weight", k)
    assert hooks.probe_plan is None  # so the next call plans again
    for m, conv in zip(found, hooks.modules, strict=True):
        assert m.shape == conv.weight.shape and bool(m.isfinite().all())
    _, again = maps(net, hooks, x, "weight", k)
    hooks.remove()
    assert_same_maps(again, sequential(net, x, "weight", k)[1])


def test_student_and_train_mode_keep_one_pass_per_probe() -> None:
    """A graph through the maps (the student) or any module in train mode: one pass per probe,
    every time (a train-mode batch norm would mix the repeated copies)."""
    net, x, k = teacher(), inputs(), 3
    hooks = hooks_for(net, "activation")
    with forward_rows(net) as rows:
        for _ in range(2):
            maps(net, hooks, x.clone().requires_grad_(True), "activation", k, create_graph=True)
    assert rows == [B] * 2 * k
    net.layer4.train()
    with forward_rows(net) as rows:
        for _ in range(2):
            maps(net, hooks, x, "activation", k)
    hooks.remove()
    assert rows == [B] * 2 * k
