"""Shared test helpers: tiny CNNs, random image loaders and quiet CPU Trainer settings.

The builders are plain module-level functions (picklable, so they also work with
``ddp_spawn``) exposed through factory fixtures::

    def test_something(tiny_cnn, random_loader, trainer_kwargs):
        student, teacher = tiny_cnn(4), tiny_cnn(8)
        loader = random_loader(20, 8, seed=0)
        trainer = Trainer(max_epochs=2, **trainer_kwargs)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
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


@pytest.fixture
def tiny_cnn() -> Callable[..., nn.Sequential]:
    """Factory fixture: ``tiny_cnn(width)`` builds :func:`make_tiny_cnn`."""
    return make_tiny_cnn


@pytest.fixture
def random_loader() -> Callable[..., DataLoader]:
    """Factory fixture: ``random_loader(n, batch_size, seed)`` builds
    :func:`make_random_loader`."""
    return make_random_loader


@pytest.fixture
def trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """Quiet CPU ``Trainer`` arguments rooted at the test's ``tmp_path``."""
    return make_trainer_kwargs(tmp_path)


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """``Trainer(deterministic=True)`` switches deterministic algorithms on process-wide and
    never switches them off; restore the setting (and the default dtype) after each test."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    dtype = torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test networks are tiny: intra-op threads only add overhead, badly so on a busy
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the app's teacher caches
@pytest.fixture()
def cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty teacher cache."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LAYERKD_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def shared_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture()
def shared_cache(shared_cache_dir, monkeypatch) -> Path:
    """A teacher cache shared by the runs of one test module: the teacher is trained once."""
    monkeypatch.setenv("LAYERKD_CACHE", str(shared_cache_dir))
    return shared_cache_dir
