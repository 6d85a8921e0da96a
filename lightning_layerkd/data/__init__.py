"""LightningDataModules for the experiments: digits, CIFAR, NumPy arrays and COCO multi-label.

Every datamodule yields batches ``(images, targets)`` with ``images`` float32 ``(N, C, H, W)`` and
``targets`` int64 class indices (``task="multiclass"``) or a float 0/1 matrix ``(N, num_classes)``
(``task="multilabel"``), and exposes ``num_classes``, ``image_size``, ``in_channels`` and ``task``
as soon as it is constructed, so that models can be built before the Trainer starts.

Train loaders shuffle with a ``torch.Generator`` seeded by ``seed`` (so a run is reproducible);
validation and test loaders do not shuffle. With ``sample_indices = True`` (set by the app for
CRD) train batches are ``(images, targets, indices)`` (:class:`IndexedDataset`). Nothing here
downloads unless asked to (``download=True`` on the CIFAR modules).
"""

from lightning_layerkd._common import Task

from .array_files import ARRAY_FILES, ARRAY_KEYS
from .arrays import ArrayImageDataset, ArraysDataModule
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataModule,
    IndexedDataset,
    RandomCropFlip,
    ReseedableDataset,
    SubsetSpec,
    select_subset,
    stratified_split,
)
from .cifar import CIFAR_STATS, Cifar10DataModule, Cifar100DataModule, CifarDataModule
from .coco import CocoDataModule, CocoMultiLabelDataset
from .digits import DigitsDataModule

__all__ = [
    "ARRAY_FILES",
    "ARRAY_KEYS",
    "CIFAR_STATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayImageDataset",
    "ArraysDataModule",
    "Cifar10DataModule",
    "Cifar100DataModule",
    "IndexedDataset",
    "CifarDataModule",
    "CocoDataModule",
    "CocoMultiLabelDataset",
    "DigitsDataModule",
    "ImageDataModule",
    "RandomCropFlip",
    "ReseedableDataset",
    "SubsetSpec",
    "Task",
    "select_subset",
    "stratified_split",
]
