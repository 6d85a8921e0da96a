"""LightningDataModules for the experiments: digits, CIFAR, NumPy arrays and COCO multi-label.

Every datamodule yields batches ``(images, targets)`` with ``images`` float32 ``(N, C, H, W)`` and
``targets`` int64 class indices (``task="multiclass"``) or a float 0/1 matrix ``(N, num_classes)``
(``task="multilabel"``), and exposes ``num_classes``, ``image_size``, ``in_channels`` and ``task``
as soon as it is constructed, so that models can be built before the Trainer starts.

Train loaders shuffle with a ``torch.Generator`` seeded by ``seed`` (so a run is reproducible);
validation and test loaders do not shuffle. Nothing here downloads unless asked to
(``download=True`` on the CIFAR modules).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, get_worker_info

__all__ = [
    "ArrayImageDataset",
    "ArraysDataModule",
    "Cifar10DataModule",
    "Cifar100DataModule",
    "CifarDataModule",
    "CocoDataModule",
    "CocoMultiLabelDataset",
    "DigitsDataModule",
    "ImageDataModule",
    "RandomCropFlip",
    "make_coco_fixture",
    "select_subset",
    "stratified_split",
]

Task = Literal["multiclass", "multilabel"]
SubsetSpec = int | float | None

CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARRAY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


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


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (derived from the loader's seed)."""
    info = get_worker_info()
    if info is None:
        return
    dataset: Any = info.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ArrayImageDataset):
        dataset.reseed(info.seed)


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

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit")
            dataset = self.train_set if train else self.val_set
        assert dataset is not None
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


# ---------------------------------------------------------------------- digits
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


# ---------------------------------------------------------------------- tensor datasets
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


class ArrayImageDataset(Dataset):
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


def _load_arrays(data_dir: Path) -> tuple[dict[str, np.ndarray], Path]:
    """Open ``x_train, y_train, x_test, y_test`` from four ``.npy`` files (memory-mapped) or
    one ``.npz``; returns the arrays and the folder they came from."""
    if not data_dir.exists():
        raise FileNotFoundError(
            f"data_dir {data_dir} does not exist; expected a folder with "
            f"{', '.join(ARRAY_FILES)} or one .npz with keys {', '.join(ARRAY_KEYS)}"
        )
    npz: Path | None = data_dir if data_dir.is_file() else None
    folder = data_dir.parent if npz is not None else data_dir
    if npz is None:
        if all((data_dir / name).is_file() for name in ARRAY_FILES):
            arrays = {k: np.load(data_dir / f"{k}.npy", mmap_mode="r") for k in ARRAY_KEYS}
            return arrays, folder
        candidates = sorted(data_dir.glob("*.npz"))
        if len(candidates) != 1:
            found = sorted(p.name for p in data_dir.iterdir())
            missing = [name for name in ARRAY_FILES if not (data_dir / name).is_file()]
            raise FileNotFoundError(
                f"no image arrays in {data_dir}: expected {', '.join(ARRAY_FILES)} "
                f"(missing: {', '.join(missing)}) or exactly one .npz with keys "
                f"{', '.join(ARRAY_KEYS)}; the folder contains: {', '.join(found) or 'nothing'}"
            )
        npz = candidates[0]
    try:
        with np.load(npz) as archive:
            missing = [k for k in ARRAY_KEYS if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{npz} lacks the keys {missing}; expected {list(ARRAY_KEYS)}, "
                    f"found {archive.files}"
                )
            return {k: archive[k] for k in ARRAY_KEYS}, folder
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{npz} is not a readable .npz archive: {err}") from err


def _check_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate shapes and dtypes; greyscale ``(N, H, W)`` becomes ``(N, H, W, 1)`` and labels
    ``(N, 1)`` become ``(N,)``."""
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise ValueError(
                f"x_{split} has dtype {x.dtype}; expected uint8 images with values 0..255"
            )
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"x_{split} has shape {x.shape}; expected (N, H, W, C) or greyscale (N, H, W)"
            )
        if x.shape[-1] > 4 and x.shape[1] <= 4:
            raise ValueError(
                f"x_{split} has shape {x.shape}, which looks channels-first (N, C, H, W); "
                f"expected channels-last (N, H, W, C), e.g. x.transpose(0, 2, 3, 1)"
            )
        if x.shape[-1] > 4 or x.shape[1] != x.shape[2]:
            raise ValueError(
                f"x_{split} has shape {x.shape}; expected square images (N, H, H, C) with C in 1..4"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"y_{split} has shape {y.shape} and dtype {y.dtype}; expected integer class "
                "labels of shape (N,)"
            )
        if len(y) != len(x):
            raise ValueError(f"x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if len(y) and y.min() < 0:
            raise ValueError(f"y_{split} has negative labels (min {y.min()}); expected 0..K-1")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise ValueError(
            f"train images are {out['x_train'].shape[1:]} but test images are "
            f"{out['x_test'].shape[1:]}; expected the same (H, W, C)"
        )
    return out


class ArraysDataModule(ImageDataModule):
    """Images and labels from NumPy arrays: ``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
    ``y_test.npy`` in ``data_dir``, or one ``.npz`` with those keys (``data_dir`` may be the
    file or a folder holding exactly one), e.g. CIFAR-10 saved as NumPy arrays in
    ``/tmp/cifar10``.

    Images are uint8 ``(N, H, W, C)`` (greyscale ``(N, H, W)`` gives one channel) and labels
    integers; validation and test use the test split. ``num_classes`` defaults to the largest
    label + 1 over both splits; ``mean``/``std`` ([0, 1] scale) default to the full train
    split's per-channel statistics. ``augment`` adds a random crop with ``padding``
    (``padding_mode`` ``"zeros"`` or ``"reflect"``) and a horizontal flip, on tensors, to train
    images. ``subset`` thins the train split (see :func:`select_subset`). ``class_names`` is read
    from ``classes.txt`` beside the arrays when present.
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
        arrays, folder = _load_arrays(self.data_dir)
        self._arrays = _check_arrays(arrays)
        labels_max = max(
            int(self._arrays[k].max()) if len(self._arrays[k]) else -1
            for k in ("y_train", "y_test")
        )
        if num_classes is None:
            num_classes = labels_max + 1
        elif labels_max >= num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the labels go up to {labels_max}; expected "
                f"labels in 0..{num_classes - 1}"
            )
        if num_classes < 1:
            raise ValueError(f"no labels found in {self.data_dir}")
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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
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


# ---------------------------------------------------------------------- CIFAR (torchvision)
class CifarDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision (``download=True`` fetches it into
    ``data_dir``; nothing is fetched otherwise). Train images get RandomCrop(32, padding=4) and
    RandomHorizontalFlip (if ``augment``); all are normalised with the standard CIFAR mean/std.
    Validation and test use the official test split. ``subset`` thins the train split (see
    :func:`select_subset`).
    """

    def __init__(
        self,
        name: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str | Path = "data",
        download: bool = False,
        subset: SubsetSpec = None,
        augment: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if name not in CIFAR_STATS:
            raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
        select_subset(np.zeros(1), subset)  # validate early
        self.save_hyperparameters()
        self.name = name
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.subset = subset
        self.augment = augment
        self.num_classes = 10 if name == "cifar10" else 100
        self.image_size = 32
        self.in_channels = 3

    def _dataset(self, train: bool, transform: Callable[[Any], Any]) -> Dataset:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            return cls(str(self.data_dir), train=train, transform=transform, download=self.download)
        except RuntimeError as err:
            if self.download:
                raise
            raise FileNotFoundError(
                f"{self.name} was not found in data_dir={self.data_dir} and download=False. "
                "Pass download=True (needs internet access) to fetch it there, or use "
                "dataset=arrays with data_dir pointing at a folder of x_train.npy, y_train.npy, "
                f"x_test.npy, y_test.npy (e.g. data_dir=/tmp/{self.name})."
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(True, lambda x: x)
            self._dataset(False, lambda x: x)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T

        mean, std = CIFAR_STATS[str(self.name)]
        normalise = [T.ToTensor(), T.Normalize(mean, std)]
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        train = self._dataset(True, T.Compose([*augment, *normalise]))
        keep = select_subset(np.asarray(train.targets), self.subset, self.seed)  # type: ignore[attr-defined]
        self.train_set = train if len(keep) == len(train) else Subset(train, keep.tolist())  # type: ignore[arg-type]
        self.val_set = self._dataset(False, T.Compose(normalise))


class Cifar10DataModule(CifarDataModule):
    """CIFAR-10 (10 classes) through torchvision; see :class:`CifarDataModule`."""

    def __init__(self, data_dir: str | Path = "data", **kwargs: Any) -> None:
        super().__init__("cifar10", data_dir, **kwargs)


class Cifar100DataModule(CifarDataModule):
    """CIFAR-100 (100 fine classes) through torchvision; see :class:`CifarDataModule`."""

    def __init__(self, data_dir: str | Path = "data", **kwargs: Any) -> None:
        super().__init__("cifar100", data_dir, **kwargs)


# ---------------------------------------------------------------------- COCO multi-label
def _read_coco(annotation_file: Path) -> tuple[list[int], list[str], list[str], np.ndarray]:
    """Parse a COCO ``instances_*.json`` into (category ids sorted, their names, image file
    names sorted by image id, a uint8 ``(num_images, num_categories)`` label matrix)."""
    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise ValueError(f"{annotation_file} is not a COCO instances file: it lacks {missing}")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    cat_ids = [int(c["id"]) for c in categories]
    column = {cid: i for i, cid in enumerate(cat_ids)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    row = {int(im["id"]): i for i, im in enumerate(images)}
    labels = np.zeros((len(images), len(categories)), dtype=np.uint8)
    for ann in coco["annotations"]:
        image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in row or category_id not in column:
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} refers to image {image_id} or "
                f"category {category_id}, which the file does not list"
            )
        labels[row[image_id], column[category_id]] = 1
    names = [str(c.get("name", c["id"])) for c in categories]
    return cat_ids, names, [str(im["file_name"]) for im in images], labels


class CocoMultiLabelDataset(Dataset):
    """Images from ``image_dir`` (opened with PIL, converted to RGB) with float 0/1 label
    vectors."""

    def __init__(
        self,
        image_dir: Path,
        file_names: Sequence[str],
        labels: np.ndarray,
        transform: Callable[[Any], Tensor],
    ) -> None:
        self.image_dir = Path(image_dir)
        self.file_names = list(file_names)
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.image_dir / self.file_names[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), self.labels[index]


class CocoDataModule(ImageDataModule):
    """Multi-label classification over the categories of COCO ``instances_*.json`` files.

    The target of an image is a float 0/1 vector over the categories sorted by id (80 for real
    COCO), 1 where the image has at least one annotation of that category. Images without
    annotations are kept, with an all-zero target. Images are ordered by id. Train images get
    RandomResizedCrop(image_size) and a horizontal flip (Kokane et al. 2024, section 4.2), val
    images Resize(image_size / 0.875) and CenterCrop(image_size); both use the ImageNet
    mean/std. ``num_classes`` and ``category_names`` come from the train JSON (the val JSON must
    list the same categories).
    """

    task: Task = "multilabel"

    def __init__(
        self,
        annotation_file_train: str | Path,
        image_dir_train: str | Path,
        annotation_file_val: str | Path,
        image_dir_val: str | Path,
        image_size: int = 224,
        augment: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        self.save_hyperparameters()
        self.paths: dict[str, tuple[Path, Path]] = {}
        for split, ann, img in (
            ("train", annotation_file_train, image_dir_train),
            ("val", annotation_file_val, image_dir_val),
        ):
            ann, img = Path(ann).expanduser(), Path(img).expanduser()
            if not ann.is_file():
                raise FileNotFoundError(f"COCO {split} annotation file not found: {ann}")
            if not img.is_dir():
                raise FileNotFoundError(f"COCO {split} image directory not found: {img}")
            self.paths[split] = (ann, img)
        self._index = {split: _read_coco(ann) for split, (ann, _) in self.paths.items()}
        train_ids, names = self._index["train"][:2]
        if self._index["val"][0] != train_ids:
            raise ValueError(
                f"the train and val annotation files list different categories: ids "
                f"{train_ids} vs {self._index['val'][0]}"
            )
        self.category_ids: list[int] = train_ids
        self.category_names: list[str] = names
        self.num_classes = len(names)
        self.image_size = image_size
        self.in_channels = 3
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T

        size = self.image_size
        normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        evaluate = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), *normalise])
        train = (
            T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalise])
            if self.augment
            else evaluate
        )
        datasets = {}
        for split, transform in (("train", train), ("val", evaluate)):
            _, _, files, labels = self._index[split]
            datasets[split] = CocoMultiLabelDataset(self.paths[split][1], files, labels, transform)
        self.train_set, self.val_set = datasets["train"], datasets["val"]


def make_coco_fixture(
    root: Path, num_images: int = 6, num_categories: int = 3, image_size: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    """Test/demo helper: write a tiny generated COCO-format dataset under ``root``.

    Writes ``root/images/*.png`` (random background, one filled rectangle per annotation in its
    category's colour; odd images are 3/4 as tall) and ``root/instances.json`` with
    ``images``, ``annotations`` (``bbox``, ``area``, ``iscrowd``, ``segmentation``) and
    ``categories`` (non-contiguous ids, listed out of order, as in real COCO files). Image ``i``
    always has category ``i % num_categories``; the last image has no annotations (when
    ``num_images > 1``). Returns ``(annotation_file, image_dir)``.
    """
    from PIL import Image, ImageDraw

    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cat_ids = [3 * k + 1 for k in range(num_categories)]
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in cat_ids]
    categories = [
        {"id": cid, "name": f"shape{k}", "supercategory": "shape"} for k, cid in enumerate(cat_ids)
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        width, height = image_size, image_size if i % 2 == 0 else max(1, image_size * 3 // 4)
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        picture = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(picture)
        present: list[int] = []
        if num_images == 1 or i < num_images - 1:
            extra = rng.choice(num_categories, size=int(rng.integers(0, num_categories)))
            present = sorted({i % num_categories, *extra.tolist()})
        for k in present:
            w, h = (int(rng.integers(max(1, width // 4), max(2, width // 2))) for _ in range(2))
            h = min(h, height)
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=colours[k])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 100 + i,
                    "category_id": cat_ids[k],
                    "bbox": [float(x0), float(y0), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
                }
            )
        file_name = f"{i:012d}.png"
        picture.save(image_dir / file_name)
        images.append({"id": 100 + i, "file_name": file_name, "width": width, "height": height})
    order = rng.permutation(num_categories)
    payload = {
        "info": {"description": "generated by lightning_layerkd.data.make_coco_fixture"},
        "images": images,
        "annotations": annotations,
        "categories": [categories[k] for k in order],
    }
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(payload, indent=1))
    return annotation_file, image_dir
