"""COCO multi-label classification from ``instances_*.json`` annotation files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_layerkd._common import Task

from .base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule, file_digest

_SHAPE = (
    "expected a COCO instances file: a JSON object with lists 'images' (objects with an integer "
    "'id' and a string 'file_name'), 'annotations' (objects with integer 'image_id' and "
    "'category_id') and 'categories' (objects with an integer 'id')"
)
_SHAPE_SENTENCE = f"E{_SHAPE[1:]}."


def _json_kind(value: Any) -> str:
    """How JSON names the type of ``value``, with an article."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else "?")


def _load_json(path: Path) -> Any:
    """The parsed JSON of ``path``, or a ValueError naming it if it is not UTF-8 JSON."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
            f"JSON files are UTF-8: re-save it as UTF-8. {_SHAPE_SENTENCE}"
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            f"{_SHAPE}."
        ) from err


def _entries(path: Path, coco: dict[str, Any], key: str, kind: str) -> list[dict[str, Any]]:
    """``coco[key]``, checked to be a list of objects."""
    entries = coco[key]
    if not isinstance(entries, list):
        kind_found = _json_kind(entries)
        raise ValueError(f"{path}: '{key}' is {kind_found}; expected a list. {_SHAPE_SENTENCE}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: {kind} at index {i} in '{key}' is {_json_kind(entry)}; expected an "
                f"object. {_SHAPE_SENTENCE}"
            )
    return entries


def _describe(kind: str, index: int, entry: dict[str, Any]) -> str:
    return f"{kind} at index {index}" + (f" (id {entry['id']!r})" if "id" in entry else "")


def _get(path: Path, what: str, entry: dict[str, Any], key: str, kind: type) -> Any:
    """``entry[key]``, checked to be of type ``kind`` (``int`` excludes booleans)."""
    if key not in entry:
        raise ValueError(f"{path}: {what} has no '{key}'. {_SHAPE_SENTENCE}")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = "an integer" if kind is int else "a string"
        raise ValueError(f"{path}: {what}: {key} is {value!r}; expected {expected}")
    return value


def _index_ids(path: Path, entries: list[dict[str, Any]], kind: str) -> dict[int, int]:
    """``{id: position}`` of ``entries``, whose int ids must be unique."""
    seen: dict[int, int] = {}
    for i, entry in enumerate(entries):
        what = _describe(kind, i, entry)
        ident = _get(path, what, entry, "id", int)
        if ident in seen:
            raise ValueError(
                f"{path}: {what}: the id {ident} is listed twice (also at index {seen[ident]}); "
                f"expected unique {kind} ids"
            )
        seen[ident] = i
    return seen


def _read_coco(annotation_file: Path) -> tuple[list[int], list[str], list[str], np.ndarray]:
    """Parse a COCO ``instances_*.json`` into (category ids sorted, their names, image file
    names sorted by image id, a uint8 ``(num_images, num_categories)`` label matrix). Anything
    malformed is a ValueError naming the file and the entry (its index in its list, and id)."""
    path = annotation_file
    coco = _load_json(path)
    if not isinstance(coco, dict):
        raise ValueError(f"{path} holds {_json_kind(coco)}; {_SHAPE}.")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: it lacks {missing}; {_SHAPE}.")
    categories = _entries(path, coco, "categories", "category")
    if not categories:
        raise ValueError(f"{path}: 'categories' is empty; expected at least one category")
    images = _entries(path, coco, "images", "image")
    annotations = _entries(path, coco, "annotations", "annotation")
    cat_ids = sorted(_index_ids(path, categories, "category"))
    image_ids = _index_ids(path, images, "image")
    for i, image in enumerate(images):
        _get(path, _describe("image", i, image), image, "file_name", str)
    column = {cid: i for i, cid in enumerate(cat_ids)}
    row = {image_id: i for i, image_id in enumerate(sorted(image_ids))}
    labels = np.zeros((len(images), len(categories)), dtype=np.uint8)
    for i, ann in enumerate(annotations):
        what = _describe("annotation", i, ann)
        image_id = _get(path, what, ann, "image_id", int)
        category_id = _get(path, what, ann, "category_id", int)
        if image_id not in row:
            raise ValueError(
                f"{path}: {what} refers to image {image_id}, which is not in 'images'; "
                "expected the id of a listed image"
            )
        if category_id not in column:
            shown = ", ".join(map(str, cat_ids[:20])) + (", ..." if len(cat_ids) > 20 else "")
            raise ValueError(
                f"{path}: {what} refers to category {category_id}, which is not in "
                f"'categories' (ids: {shown or 'none'}); expected one of those ids"
            )
        labels[row[image_id], column[category_id]] = 1
    by_id = {int(c["id"]): c for c in categories}
    names = [str(by_id[cid].get("name", cid)) for cid in cat_ids]
    files = [str(images[image_ids[image_id]]["file_name"]) for image_id in sorted(image_ids)]
    return cat_ids, names, files, labels


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

    def _compute_fingerprint(self) -> dict[str, Any]:
        """Per split: the annotation file's name, sha256 and size, and the number of files in
        the image directory (``"images"``)."""
        fingerprint: dict[str, Any] = {}
        for split, (ann, image_dir) in self.paths.items():
            count = sum(1 for entry in os.scandir(image_dir) if entry.is_file())
            fingerprint[split] = {"annotations": {"file": ann.name, **file_digest(ann)}}
            fingerprint[split]["images"] = count
        return fingerprint

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for split, need in (("train", "training"), ("val", "validation")):
            if not self._index[split][2]:
                raise ValueError(
                    f"{self.paths[split][0]} lists 0 images; {need} needs at least one image. "
                    f"Point annotation_file_{split} (dataset.annotation_file_{split} on the "
                    "command line) at a COCO instances file whose 'images' list is not empty."
                )
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
