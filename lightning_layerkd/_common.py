"""The package's shared vocabulary: names and small helpers that every layer may import
(docs/architecture.md), so that no unit imports another only for them.

- :data:`Task` / :data:`TASKS`: what the labels are, which picks the task loss (eq. 1's
  ``l_1``), the score of the derivative maps and the validation metrics.
- :func:`check_choice`: the error for an option outside its choices.
- :func:`model_device` and :func:`eval_mode`: where a network lives and a traced pass in eval
  mode that leaves every submodule's own flag as it was.

Plain PyTorch; nothing here imports the package.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

#: Single-label classification (softmax cross-entropy) or multi-label (sigmoid BCE).
Task = Literal["multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """A ``ValueError`` naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; ``None`` for a model with neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
