"""Shared datamodule plumbing: the :class:`ImageDataModule` base class, stratified splitting and
subsetting, per-worker seeding of augmentation, :class:`RandomCropFlip`, file hashing for
:meth:`ImageDataModule.data_fingerprint` and shared constants."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from lightning_layerkd._common import Task

SubsetSpec = int | float | None
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- splitting helpers
def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(train, val)`` class by class: each class gives
    ``round(val_fraction * n_c)`` of its samples (at least one, leaving at least one) to val,
    chosen by a permutation seeded by ``seed``. Both index arrays are sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0])
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} sample(s); a split needs at least 2")
        n_val = min(max(round(val_fraction * len(idx)), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def select_subset(labels: np.ndarray, subset: SubsetSpec, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified subset of ``labels``.

    ``subset`` is ``None`` (everything), an int ``k >= 1`` (``k`` images per class, or all of a
    class with fewer) or a float in ``(0, 1]`` (that fraction of each class, at least one image).
    Which images are taken is fixed by ``seed``.
    """
    labels = np.asarray(labels)
    if subset is None:
        return np.arange(len(labels))
    is_int = isinstance(subset, (int, np.integer)) and not isinstance(subset, (bool, np.bool_))
    is_float = isinstance(subset, (float, np.floating))
    if not ((is_int and subset >= 1) or (is_float and 0.0 < subset <= 1.0)):
        raise ValueError(
            "subset must be an int >= 1 (that many images per class, e.g. subset=100) or a "
            f"float in (0, 1] (that fraction of the train split, e.g. subset=0.1); got {subset!r}"
        )
    rng = np.random.default_rng([seed, 1])
    chosen = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = int(subset) if is_int else max(1, round(float(subset) * len(idx)))
        chosen.append(idx[:n])
    return np.sort(np.concatenate(chosen))


class ReseedableDataset(Dataset):
    """A dataset whose augmentation draws from its own random stream.

    :class:`ImageDataModule`'s loaders call ``reseed(seed)`` in each worker (with that worker's
    seed), so workers do not repeat one another's augmentation. Subclasses implement ``reseed``.
    """

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed``."""
        raise NotImplementedError


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (derived from the loader's seed)."""
    info = get_worker_info()
    if info is None:
        return
    dataset: Any = info.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ReseedableDataset):
        dataset.reseed(info.seed)


# ---------------------------------------------------------------------- data identity
def file_digest(path: Path, chunk_size: int = 1 << 20) -> dict[str, Any]:
    """``{"sha256": hex digest, "size": bytes}`` of the file at ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "size": size}


def folder_digest(folder: Path, relative_to: Path) -> dict[str, dict[str, Any]]:
    """:func:`file_digest` of every file under ``folder`` (recursively), keyed by its path
    relative to ``relative_to`` in POSIX form, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(relative_to).as_posix(): file_digest(p) for p in files}


# ---------------------------------------------------------------------- base class
class ImageDataModule(LightningDataModule):
    """Shared loader plumbing: seeded shuffling for train, fixed order for val/test.

    Subclasses set ``num_classes``, ``image_size``, ``in_channels`` (and ``task``) in
    ``__init__`` and ``train_set`` / ``val_set`` in ``setup``; ``test_dataloader`` serves the
    validation split. The train loader drops a final batch of a single sample, which BatchNorm
    cannot train on.
    """

    task: Task = "multiclass"
    num_classes: int
    image_size: int
    in_channels: int

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        #: training batches carry each sample's index, ``(inputs, targets, indices)``
        #: (:class:`IndexedDataset`), for methods with a memory bank of the training set (CRD)
        self.sample_indices = False
        self._fingerprint: dict[str, Any] | None = None

    def data_fingerprint(self) -> dict[str, Any]:
        """A JSON-serialisable identity of the data on disk, for keying caches of results
        computed from the data (the app keys its teacher cache with it).

        It changes whenever the data files change (it holds sha256 content hashes, sizes and
        file counts) and does not depend on where the files are: a copied folder gives the same
        fingerprint. ``{}`` for data bundled with the package (digits), and while data that is
        to be downloaded is not there yet (CIFAR before ``prepare_data``; that ``{}`` is not
        cached, and ``setup`` reports the missing data). It is computed on the first call and
        cached on this instance, so files changed afterwards are seen by a new datamodule only.
        """
        if self._fingerprint is None:
            found = self._compute_fingerprint()
            if found is None:
                return {}
            self._fingerprint = found
        return copy.deepcopy(self._fingerprint)

    def _compute_fingerprint(self) -> dict[str, Any] | None:
        """The value of :meth:`data_fingerprint`, or ``None`` while the data is not there
        (then nothing is cached). Subclasses reading files override this."""
        return {}

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit")
            dataset = self.train_set if train else self.val_set
        assert dataset is not None
        if train and self.sample_indices:
            dataset = IndexedDataset(dataset)
        size = len(dataset)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train and size > self.batch_size and size % self.batch_size == 1,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_seed_worker if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def _augment_seed(self) -> int:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return int(np.random.default_rng([self.seed, 2, rank]).integers(2**62))


# ---------------------------------------------------------------------- augmentation
class RandomCropFlip:
    """Random crop with ``padding`` (zero or reflect padding) and horizontal flip of a
    ``(C, H, W)`` float tensor, drawing from a given ``torch.Generator``."""

    def __init__(
        self, padding: int = 4, padding_mode: Literal["zeros", "reflect"] = "zeros"
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
        self.padding = padding
        self.padding_mode = padding_mode

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = self.padding
        if p:
            h, w = image.shape[-2:]
            mode = "constant" if self.padding_mode == "zeros" else "reflect"
            padded = F.pad(image, (p, p, p, p), mode=mode)
            top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
            image = padded[..., top : top + h, left : left + w]
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image.contiguous()


class IndexedDataset(Dataset):
    """``(*item, index)``: a dataset's items with each sample's index in it, what a method with
    a memory bank of the training set needs (CRD)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)
