"""Images and labels from NumPy arrays (``.npy`` files or one ``.npz``): the in-memory
:class:`ArrayImageDataset` and :class:`ArraysDataModule` (the files are read and checked in
:mod:`.array_files`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .array_files import (
    check_arrays,
    load_arrays,
    require_images,
    resolve_num_classes,
)
from .base import (
    ImageDataModule,
    RandomCropFlip,
    ReseedableDataset,
    SubsetSpec,
    file_digest,
    select_subset,
)


class ArrayImageDataset(ReseedableDataset):
    """uint8 ``(N, C, H, W)`` images and int64 labels held in memory; each item is converted to
    float, optionally augmented, then normalised with ``mean``/``std`` (given on the [0, 1]
    scale). Augmentation draws from the dataset's own generator (``reseed`` per worker)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.images = images
        self.labels = labels.long()
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream (called in each loader worker)."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].float()
        if self.augment is not None:
            image = self.augment(image, self.generator)
        return image * self.scale + self.shift, self.labels[index]


# ---------------------------------------------------------------------- arrays
def _channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 ``(N, H, W, C)`` images on the [0, 1] scale (exact,
    from per-channel histograms of the 256 grey levels)."""
    c = images.shape[-1]
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk]).reshape(-1, c)
        for k in range(c):
            counts[k] += np.bincount(block[:, k], minlength=256)
    levels = np.arange(256) / 255.0
    n = np.maximum(counts.sum(1), 1)
    mean = counts @ levels / n
    std = np.sqrt(np.maximum(counts @ levels**2 / n - mean**2, 0.0))
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()


class ArraysDataModule(ImageDataModule):
    """Images and labels from NumPy arrays: ``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
    ``y_test.npy`` in ``data_dir``, or one ``.npz`` with those keys (``data_dir`` may be the
    file or a folder holding exactly one), e.g. CIFAR-10 saved as NumPy arrays in
    ``/tmp/cifar10``.

    Images are uint8 ``(N, H, W, C)`` (greyscale ``(N, H, W)`` gives one channel) and labels
    integers; validation and test use the test split (neither split may be empty). Without
    ``num_classes`` the labels over both splits must be exactly ``0..K-1`` (then
    ``num_classes = K``); with it, they must lie in ``0..num_classes-1``. ``mean``/``std``
    ([0, 1] scale) default to the full train split's per-channel statistics. ``augment`` adds a
    random crop with ``padding`` (``padding_mode`` ``"zeros"`` or ``"reflect"``) and a horizontal
    flip, on tensors, to train images. ``subset`` thins the train split (see
    :func:`select_subset`). ``class_names`` is read from ``classes.txt`` beside the arrays when
    present. :meth:`data_fingerprint` hashes the array files (``.npy`` or ``.npz``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        num_classes: int | None = None,
        augment: bool = True,
        subset: SubsetSpec = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        padding: int = 4,
        padding_mode: Literal["zeros", "reflect"] = "zeros",
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        select_subset(np.zeros(1), subset)  # validate early
        self.data_dir = Path(data_dir).expanduser()
        self.augment = RandomCropFlip(padding, padding_mode) if augment else None
        self.subset = subset
        arrays, folder, self._files = load_arrays(self.data_dir)
        self._arrays = check_arrays(arrays)
        labels = np.unique(np.concatenate([self._arrays["y_train"], self._arrays["y_test"]]))
        num_classes = resolve_num_classes(labels, num_classes, self.data_dir)
        _, h, _, c = self._arrays["x_train"].shape
        self.num_classes, self.image_size, self.in_channels = num_classes, h, c
        # after num_classes is resolved: a logger merges these hparams with the module's
        self.save_hyperparameters()
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != c:
                raise ValueError(f"{name} has {len(value)} values; the images have {c} channels")
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        names = folder / "classes.txt"
        self.class_names: list[str] | None = names.read_text().split() if names.is_file() else None

    def _compute_fingerprint(self) -> dict[str, Any]:
        return {path.name: file_digest(path) for path in self._files}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        require_images(self._arrays, self._files)
        x_train, y_train = self._arrays["x_train"], self._arrays["y_train"]
        if self.mean is None or self.std is None:
            mean, std = _channel_stats(x_train)
            self.mean = self.mean if self.mean is not None else mean
            self.std = self.std if self.std is not None else std
        keep = select_subset(y_train, self.subset, self.seed)
        if len(keep) != len(y_train):
            x_train, y_train = x_train[keep], y_train[keep]
        self.train_set = self._dataset(x_train, y_train, self.augment)
        self.val_set = self._dataset(self._arrays["x_test"], self._arrays["y_test"], None)

    def _dataset(
        self, x: np.ndarray, y: np.ndarray, augment: RandomCropFlip | None
    ) -> ArrayImageDataset:
        assert self.mean is not None and self.std is not None
        # Copies: the arrays may be read-only memory maps.
        images = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C", copy=True))
        labels = torch.from_numpy(np.array(y, dtype=np.int64, copy=True))
        return ArrayImageDataset(images, labels, self.mean, self.std, augment, self._augment_seed())
