"""Map images a person can read: rendering (app.map_images) and what wandb writes offline."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layerkd import DistillationModule
from lightning_layerkd.app.map_images import (
    figure_to_rgb,
    grid_shape,
    sample_maps_figure,
    weight_maps_figure,
)
from lightning_layerkd.app.wandb_logging import (
    MapImageLogger,
    _pooled_sizes,
    finish,
    make_wandb_logger,
)
from lightning_layerkd.functional.maps import match_maps
from lightning_layerkd.methods import JacobianMaps
from lightning_layerkd.models import resnet

wandb = pytest.importorskip("wandb")

LAYERS = {"layer1", "layer2", "layer3", "layer4"}


def blobs(n: int = 3, side: int = 8, shift: float = 0.0) -> np.ndarray:
    """``n`` maps with one Gaussian bump each (structure, not noise)."""
    yy, xx = np.mgrid[0:side, 0:side]
    centres = [(1 + 2 * i + shift) % side for i in range(n)]
    return np.stack([np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / 4.0) for c in centres])


def contrast(image: np.ndarray) -> tuple[float, int]:
    """The standard deviation and the range of the pixel values."""
    return float(image.std()), int(image.max()) - int(image.min())


# ---------------------------------------------------------------------- rendering
def test_sample_maps_render_large_rgb_with_full_contrast():
    teacher, student = blobs(), blobs(shift=1.0)
    fig = sample_maps_figure(teacher, student, title="layer1: attention maps, epoch 0")
    panels = [ax for ax in fig.axes if ax.get_title() in ("teacher", "student")]
    assert len(panels) == 6
    for ax in panels:
        extent = ax.get_window_extent()
        assert min(extent.width, extent.height) >= 128
    image = figure_to_rgb(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    std, spread = contrast(image)
    assert std > 20 and spread > 100


def test_each_sample_row_shares_one_colour_scale():
    teacher, student = blobs(2), 3.0 * blobs(2, shift=2.0)
    student[1] *= 10.0
    fig = sample_maps_figure(teacher, student, title="t")
    rows = [[ax for ax in fig.axes if ax.images][2 * i : 2 * i + 2] for i in range(2)]
    for i, (t_ax, s_ax) in enumerate(rows):
        clim = t_ax.images[0].get_clim()
        assert clim == s_ax.images[0].get_clim()
        assert clim == pytest.approx((min(teacher[i].min(), student[i].min()), student[i].max()))
    assert rows[0][0].images[0].get_clim() != rows[1][0].images[0].get_clim()
    assert len(fig.axes) == 2 * 2 + 2  # one colour bar per row


@pytest.mark.parametrize("value", [0.0, 1.0, 1e-9])
def test_constant_maps_render_without_errors(value):
    maps = np.full((2, 4, 4), value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = figure_to_rgb(sample_maps_figure(maps, maps.copy(), title="constant"))
    assert image.dtype == np.uint8 and image.shape[2] == 3


def test_non_finite_values_do_not_break_the_colour_scale():
    teacher, student = blobs(1), blobs(1)
    student[0, 0, 0] = np.nan
    fig = sample_maps_figure(teacher, student, title="t")
    assert np.isfinite(fig.axes[0].images[0].get_clim()).all()
    figure_to_rgb(fig)


def test_weight_maps_render_as_a_wide_bar_chart():
    teacher = np.sort(np.random.default_rng(0).random(32))[::-1]
    student = np.sort(np.random.default_rng(1).random(32))[::-1]
    fig = weight_maps_figure(teacher, student, title="layer2 weight maps")
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * 32  # a bar per channel and network
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["teacher", "student"]
    image = figure_to_rgb(fig)
    assert image.dtype == np.uint8 and image.shape[1] > 2 * image.shape[0]
    std, spread = contrast(image)
    assert std > 20 and spread > 100


def test_long_weight_maps_are_binned_step_lines():
    values = np.random.default_rng(0).random(5000)
    fig = weight_maps_figure(values, values[::-1].copy(), title="t", max_points=1000)
    (ax,) = fig.axes
    assert not ax.patches and [len(line.get_xdata()) for line in ax.lines] == [1000, 1000]
    assert "mean of 5 per point" in ax.get_xlabel()


def test_mismatched_maps_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        sample_maps_figure(np.ones((2, 4, 4)), np.ones((2, 4, 5)), title="t")
    with pytest.raises(ValueError, match="one size"):
        weight_maps_figure(np.ones(3), np.ones(4), title="t")


def test_grid_shape_follows_the_input_aspect():
    assert grid_shape(64) == (8, 8)
    assert grid_shape(24, aspect=16 / 24) == (4, 6)
    assert grid_shape(24, aspect=24 / 16) == (6, 4)
    assert grid_shape(7) == (1, 7)
    with pytest.raises(ValueError):
        grid_shape(0)


def test_pooled_sizes_are_the_grid_match_maps_pools_to():
    """Student 12x16, teacher 6x8 (stride 2): both maps are pooled to 6x8, not a square."""
    student = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    module = SimpleNamespace(layer_pairs=[("0", "0")], student=student, teacher=teacher)
    x = torch.randn(2, 3, 12, 16)
    with _pooled_sizes(module) as sizes:
        s, t = student(x), teacher(x)
    assert sizes == {"0": (6, 8)}
    matched, _ = match_maps(s.pow(2).sum(1), t.pow(2).sum(1))
    assert matched.shape[1] == 6 * 8
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


# ---------------------------------------------------------------------- wandb, offline
def pair(width: int = 4, classes: int = 5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return resnet(18, num_classes=classes, width=2 * width), resnet(10, classes, width=width)


def loader(n: int = 16, size: int = 16, classes: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    finish()
    yield
    finish()


@pytest.mark.parametrize("method", ["attention", "jacobian_weight"])
def test_wandb_writes_readable_map_images(method, tmp_path, offline):
    teacher, student = pair()
    chosen = JacobianMaps(wrt="weight") if method == "jacobian_weight" else method
    module = DistillationModule(teacher, student, method=chosen, num_classes=5)
    logger = WandbLogger(project="layerkd-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[MapImageLogger(every_n_epochs=1, num_samples=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(), loader())
    finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    pngs = sorted((run_dir / "files" / "media" / "images" / "maps").glob("*.png"))
    assert {p.name.split("_")[0] for p in pngs} == LAYERS
    for path in pngs:
        image = np.asarray(Image.open(path).convert("RGB"))
        std, spread = contrast(image)
        assert image.max() > 200 and std > 20 and spread > 100, (path.name, std, spread)
        if method == "attention":  # 3 rows of 128+ px panels, teacher | student
            assert image.shape[0] > 3 * 128 and image.shape[1] > 2 * 128
        else:  # a wide per-channel chart
            assert image.shape[1] > 2 * image.shape[0]


def test_make_wandb_logger_starts_without_deprecation_warnings(tmp_path, offline, monkeypatch):
    said: list[str] = []
    termwarn = wandb.termwarn
    monkeypatch.setattr(
        wandb, "termwarn", lambda m, *a, **k: (said.append(m), termwarn(m, *a, **k))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = make_wandb_logger(project="layerkd-test", save_dir=tmp_path)
        assert logger.experiment is not None
        finish()
    assert not [m for m in said if "deprecat" in m.lower() or "anonymous" in m.lower()], said
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not [w for w in deprecations if "wandb" in w.filename], deprecations
