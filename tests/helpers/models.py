"""Tiny CNNs, random image loaders, quiet CPU Trainer settings and an autograd-graph walker.

Plain module-level functions (picklable, so they also work with ``ddp_spawn``); ``conftest.py``
exposes the builders as factory fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Side length of the generated square images.
IMAGE_SIZE = 8
#: Number of classes of the generated labels.
NUM_CLASSES = 10
#: The crucial layers of :func:`make_tiny_cnn` (its two stages), as explicit layer pairs.
TINY_LAYERS = [("0", "0"), ("1", "1")]


def autograd_node_names(*tensors: torch.Tensor) -> set[str]:
    """The names of every autograd node in the graphs of ``tensors`` (which rules ran)."""
    names: set[str] = set()
    stack, seen = [t.grad_fn for t in tensors], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def make_tiny_cnn(width: int = 4, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """A two-stage CNN for ``3 x 8 x 8`` images.

    Stage ``"0"`` (``3 -> width`` channels) keeps the 8x8 resolution and stage ``"1"``
    (``width -> 2 * width``, stride 2) halves it to 4x4, so the two stages are distinct crucial
    layers (docs/design.md section 2) and each starts with a conversion convolution. The head
    (``"2"``..``"4"``) holds the parameters of the ``"base"`` param group.
    """
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        ),
        nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def make_random_dataset(n: int, seed: int = 0, num_classes: int = NUM_CLASSES) -> TensorDataset:
    """``n`` random ``3 x 8 x 8`` images with uniform labels, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return TensorDataset(x, y)


def make_random_loader(
    n: int, batch_size: int, seed: int = 0, *, num_classes: int = NUM_CLASSES
) -> DataLoader:
    """A deterministic (``shuffle=False``, single-process) loader over
    :func:`make_random_dataset`; the last batch is partial when ``batch_size`` does not
    divide ``n``."""
    return DataLoader(
        make_random_dataset(n, seed, num_classes), batch_size=batch_size, shuffle=False
    )


def make_trainer_kwargs(root: Path, **overrides: Any) -> dict[str, Any]:
    """Quiet single-process CPU ``Trainer`` arguments rooted at ``root``."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    kwargs.update(overrides)
    return kwargs
