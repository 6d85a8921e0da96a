"""COCO multi-label classification from ``instances_*.json`` annotation files."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule, Task

__all__ = ["CocoDataModule", "CocoMultiLabelDataset"]


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
