"""Fixtures shared by every test; the helpers behind them are in ``tests/helpers``.

The builders are plain module-level functions (picklable, so they also work with
``ddp_spawn``) exposed through factory fixtures::

    def test_something(tiny_cnn, random_loader, trainer_kwargs):
        student, teacher = tiny_cnn(4), tiny_cnn(8)
        loader = random_loader(20, 8, seed=0)
        trainer = Trainer(max_epochs=2, **trainer_kwargs)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers.models import make_random_loader, make_tiny_cnn, make_trainer_kwargs


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
    2-core machine. ``LAYERKD_TEST_THREADS=2`` runs the suite with 2 (results must not depend
    on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LAYERKD_TEST_THREADS", "1")))
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
