"""CIFAR-10 and CIFAR-100 through torchvision (downloaded only with ``download=True``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset, Subset

from .base import ImageDataModule, SubsetSpec, folder_digest, select_subset

CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# torchvision's folder under data_dir (CIFAR10.base_folder / CIFAR100.base_folder)
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


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
            folder = self.data_dir / _FOLDERS[str(self.name)]
            state = (
                f"exists but torchvision could not use it ({err})"
                if folder.exists()
                else "does not exist"
            )
            raise FileNotFoundError(
                f"{self.name} was not found: torchvision looked for {folder} (its "
                f"{folder.name} folder under data_dir={self.data_dir}), which {state}, and "
                "download is off. To fetch it there (needs internet access), pass "
                f"download=True in Python ({type(self).__name__}(data_dir=..., download=True)) "
                "or dataset.download=true on the command line; or use dataset=arrays with "
                "dataset.data_dir pointing at a folder of x_train.npy, y_train.npy, x_test.npy, "
                f"y_test.npy (e.g. dataset.data_dir=/tmp/{self.name})."
            ) from err

    def _compute_fingerprint(self) -> dict[str, Any] | None:
        folder = self.data_dir / _FOLDERS[str(self.name)]
        if not folder.is_dir():
            return None  # not downloaded yet: setup reports it
        return folder_digest(folder, relative_to=self.data_dir)

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
