"""The optimizer's param groups: built one per crucial layer plus ``"base"``, read back by name,
rescaled with their schedulers' anchors, and SWALR's ``swa_lr`` composed once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR, MultiStepLR, OneCycleLR, SequentialLR

from lightning_layerkd.param_groups import (
    BASE_GROUP,
    SWA_MARK,
    compose_swa_lrs,
    crucial_param_groups,
    first_group_lrs,
    named_param_groups,
    scale_param_group,
)


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    return net


def test_every_trainable_parameter_is_in_exactly_one_group() -> None:
    net = _net()
    net[1].bias.requires_grad_(False)  # a frozen parameter belongs to no group
    groups = crucial_param_groups(net, ["0", "1"])
    assert [g["name"] for g in groups] == ["0", "1", BASE_GROUP]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids)) == 5
    assert [len(g["params"]) for g in groups] == [2, 1, 2]


def test_no_base_group_when_the_crucial_layers_hold_everything() -> None:
    net = _net()
    assert [g["name"] for g in crucial_param_groups(net, ["0", "1", "3"])] == ["0", "1", "3"]
    assert [g["name"] for g in crucial_param_groups(net, [])] == [BASE_GROUP]


def _optimizer(lrs: dict[str, float]) -> torch.optim.SGD:
    params = [
        {"name": n, "params": [nn.Parameter(torch.zeros(1))], "lr": lr} for n, lr in lrs.items()
    ]
    params.append({"params": [nn.Parameter(torch.zeros(1))], "lr": 9.0})  # unnamed: not read
    return torch.optim.SGD(params, lr=1.0)


def test_groups_are_read_back_by_name_across_optimizers() -> None:
    first, second = _optimizer({"a": 0.1, "b": 0.2}), _optimizer({"a": 0.3})
    named = named_param_groups([first, second])
    assert named == {"a": [(first, 0), (second, 0)], "b": [(first, 1)]}
    assert first_group_lrs(named) == {"a": 0.1, "b": 0.2}


def test_scaling_a_group_scales_its_schedulers_anchors_and_no_other_group() -> None:
    optimizer = _optimizer({"a": 0.1, "b": 0.2})
    warmup = LinearLR(optimizer, start_factor=0.5, total_iters=2)
    decay = MultiStepLR(optimizer, milestones=[4], gamma=0.1)
    scheduler = SequentialLR(optimizer, [warmup, decay], milestones=[2])
    before = optimizer.param_groups[1]["lr"]  # 0.2 * 0.5 after the warm-up's first step
    scale_param_group(optimizer, 1, [scheduler], 3.0)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(3.0 * before, rel=1e-15)
    assert optimizer.param_groups[1]["initial_lr"] == pytest.approx(0.6, rel=1e-15)
    for child in (warmup, decay):  # the wrapped schedulers' anchors too
        assert child.base_lrs == pytest.approx([0.1, 0.6, 9.0], rel=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-15)  # untouched
    for _ in range(6):  # MultiStepLR's own 4th step after the switch: the scaled anchor decayed
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.6 * 0.1, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1, rel=1e-12)


def test_scaling_keeps_one_cycle_anchors_in_step() -> None:
    optimizer = _optimizer({"a": 0.1})
    OneCycleLR(optimizer, max_lr=[1.0, 2.0], total_steps=10)
    group = optimizer.param_groups[0]
    max_lr, min_lr = group["max_lr"], group["min_lr"]
    scale_param_group(optimizer, 0, [], 0.25)
    assert (group["max_lr"], group["min_lr"]) == pytest.approx((0.25 * max_lr, 0.25 * min_lr))


def test_swa_lr_is_composed_once_then_scaled_with_the_group() -> None:
    optimizer = _optimizer({"a": 0.1, "b": 0.1})
    for group in optimizer.param_groups:
        group["swa_lr"] = 0.02  # as SWALR writes it
    named = named_param_groups([optimizer])
    assert compose_swa_lrs(named, {"a": 3.0}) == pytest.approx({"a": 0.06})
    assert optimizer.param_groups[1]["swa_lr"] == 0.02  # multiplier 1: marked, unchanged
    assert compose_swa_lrs(named, {"a": 3.0}) == {}  # already composed: left alone
    assert optimizer.param_groups[0]["swa_lr"] == pytest.approx(0.06)
    scale_param_group(optimizer, 0, [], 2.0)  # a later update moves the composed target too
    group = optimizer.param_groups[0]
    assert group["swa_lr"] == group[SWA_MARK] == pytest.approx(0.12)
    group["swa_lr"] = 0.02  # a rebuilt SWALR writes its own value again: composed anew
    assert compose_swa_lrs(named, {"a": 3.0}) == pytest.approx({"a": 0.06})


def test_add_to_param_groups_puts_each_modules_parameters_in_its_named_group():
    from lightning_layerkd.param_groups import add_to_param_groups

    torch.manual_seed(0)
    a, b, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    groups = [{"name": "layer1", "params": [torch.nn.Parameter(torch.zeros(1))]}]
    out = add_to_param_groups(groups, [("layer1", a), ("base", b), ("layer1", frozen)])
    assert out is groups and [g["name"] for g in out] == ["layer1", "base"]
    assert [p.shape for p in out[0]["params"]] == [(1,), (2, 2), (2,)]  # frozen ones left out
    assert {id(p) for p in out[1]["params"]} == {id(p) for p in b.parameters()}
