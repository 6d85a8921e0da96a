"""The shared vocabulary every layer may import: the task names, the choice check, a model's
device and eval mode that restores each module's own flag."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from lightning_layerkd._common import TASKS, Task, check_choice, eval_mode, model_device


def test_the_task_names_are_the_literal_type() -> None:
    assert typing.get_args(Task) == TASKS == ("multiclass", "multilabel")


def test_check_choice_names_the_option_and_its_choices() -> None:
    check_choice("task", "multilabel", TASKS)
    with pytest.raises(ValueError, match=r"^task must be one of \['multiclass', 'multilabel'\], "):
        check_choice("task", "regression", TASKS)


def test_eval_mode_restores_each_modules_own_flag() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    net[1].eval()  # mixed flags: the container trains, one child does not
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before == [True, True, False, True, True]


def test_eval_mode_restores_the_flags_after_an_error() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("the traced pass failed")
    assert all(m.training for m in net.modules())


def test_model_device_reads_parameters_then_buffers() -> None:
    assert model_device(nn.ReLU()) is None
    assert model_device(nn.Linear(1, 1)) == torch.device("cpu")
    buffers_only = nn.Module()
    buffers_only.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    assert model_device(buffers_only) == torch.device("cpu")
