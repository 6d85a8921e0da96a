"""scikit-learn's bundled 8x8 digits as a datamodule (no download)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import ImageDataModule, SubsetSpec, select_subset, stratified_split


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download).

    Pixels (16 grey levels) are divided by 16, upsampled bilinearly to ``image_size``, repeated
    to 3 channels and normalised with the train split's per-channel mean and std. Train and val
    are a per-class split fixed by ``seed`` (every class in both); ``subset`` then thins the train
    split (see :func:`select_subset`). ``train_indices`` / ``val_indices`` index ``load_digits``.
    """

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        subset: SubsetSpec = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        select_subset(np.zeros(1), subset)  # validate early
        self.save_hyperparameters()
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.subset = subset
        self.num_classes = 10
        self.in_channels = 3
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DigitsDataModule needs scikit-learn (pip install scikit-learn)"
            ) from err
        digits = load_digits()
        labels = np.asarray(digits.target, dtype=np.int64)
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != images.shape[-1]:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        images = images.repeat(1, 3, 1, 1)
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
        train_x = images[train_idx]
        self.mean = train_x.mean(dim=(0, 2, 3))
        self.std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-8)
        images = (images - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        train_idx = train_idx[select_subset(labels[train_idx], self.subset, self.seed)]
        self.train_indices, self.val_indices = train_idx, val_idx
        targets = torch.from_numpy(labels)
        self.train_set = TensorDataset(images[train_idx], targets[train_idx])
        self.val_set = TensorDataset(images[val_idx], targets[val_idx])
