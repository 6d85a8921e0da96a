"""Datamodules: digits, arrays, CIFAR (no download) and COCO multi-label on a generated fixture."""

from __future__ import annotations

import json
import os
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_layerkd import DistillationModule
from lightning_layerkd.data import (
    ARRAY_FILES,
    ArraysDataModule,
    Cifar10DataModule,
    Cifar100DataModule,
    CifarDataModule,
    CocoDataModule,
    DigitsDataModule,
    RandomCropFlip,
    select_subset,
    stratified_split,
)
from lightning_layerkd.models import resnet
from tests.helpers.coco import make_coco_fixture
from tests.helpers.models import make_trainer_kwargs


# ---------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    return dm


def test_digits_batches_and_attributes(digits):
    assert (digits.num_classes, digits.image_size, digits.in_channels) == (10, 16, 3)
    assert digits.task == "multiclass"
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    xv, yv = next(iter(digits.val_dataloader()))
    assert xv.shape[1:] == (3, 16, 16)
    labels = torch.cat([b[1] for b in digits.val_dataloader()])
    assert labels.min() >= 0 and labels.max() <= 9


def test_digits_split_is_disjoint_complete_and_stratified(digits):
    train, val = digits.train_indices, digits.val_indices
    assert len(set(train) & set(val)) == 0
    assert len(train) + len(val) == 1797 == len(set(train) | set(val))
    assert len(digits.train_set) == len(train) and len(digits.val_set) == len(val)
    train_labels = digits.train_set.tensors[1]
    val_labels = digits.val_set.tensors[1]
    assert set(train_labels.tolist()) == set(val_labels.tolist()) == set(range(10))
    assert abs(len(val) / 1797 - 0.2) < 0.01


def test_digits_train_split_is_normalised_per_channel(digits):
    x = digits.train_set.tensors[0]
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)


def test_digits_seed_fixes_split_and_shuffle(digits):
    again = DigitsDataModule(seed=0)
    again.setup("fit")
    np.testing.assert_array_equal(again.val_indices, digits.val_indices)
    (xa, ya), (xb, yb) = next(iter(again.train_dataloader())), next(iter(digits.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = DigitsDataModule(seed=1)
    other.setup("fit")
    assert not np.array_equal(other.val_indices, digits.val_indices)


def test_digits_upsampling_and_subset():
    dm = DigitsDataModule(image_size=8, batch_size=16, subset=5)
    dm.setup("fit")
    assert dm.train_set.tensors[0].shape == (50, 3, 8, 8)
    assert torch.bincount(dm.train_set.tensors[1]).tolist() == [5] * 10


# ---------------------------------------------------------------------- subset helpers
def test_select_subset_forms_and_errors():
    labels = np.repeat(np.arange(4), 10)
    per_class = select_subset(labels, 3, seed=0)
    assert np.bincount(labels[per_class]).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(per_class, select_subset(labels, 3, seed=0))
    assert not np.array_equal(per_class, select_subset(labels, 3, seed=1))
    half = select_subset(labels, 0.5, seed=0)
    assert np.bincount(labels[half]).tolist() == [5, 5, 5, 5]
    assert len(select_subset(labels, None)) == len(select_subset(labels, 1.0)) == 40
    for bad in (0, -1, 0.0, 1.5, True, "10"):
        with pytest.raises(ValueError, match=r"int >= 1.*float in \(0, 1\]"):
            select_subset(labels, bad)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.repeat(np.arange(3), [2, 5, 20])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert set(labels[train]) == set(labels[val]) == {0, 1, 2}
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(27))


# ---------------------------------------------------------------------- arrays
def make_arrays(n_train: int = 40, n_test: int = 20, size: int = 8, channels: int | None = 3):
    rng = np.random.default_rng(0)
    shape = (size, size) if channels is None else (size, size, channels)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % 4,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 4).astype(np.uint8),
    }


def save_npy(folder, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)


@pytest.mark.parametrize("layout", ["npy", "npz_file", "npz_folder"])
def test_arrays_loads_npy_and_npz(tmp_path, layout):
    arrays = make_arrays()
    if layout == "npy":
        save_npy(tmp_path, arrays)
        data_dir = tmp_path
    else:
        np.savez(tmp_path / "data.npz", **arrays)
        data_dir = tmp_path / "data.npz" if layout == "npz_file" else tmp_path
    dm = ArraysDataModule(data_dir, batch_size=16, augment=False)
    assert (dm.num_classes, dm.image_size, dm.in_channels, dm.task) == (4, 8, 3, "multiclass")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_set) == 40 and len(dm.val_set) == 20
    # Defaults normalise with the train split's per-channel statistics.
    expected = arrays["x_train"].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(dm.mean, expected, rtol=1e-6)
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    xv, yv = next(iter(dm.val_dataloader()))
    assert torch.equal(yv, torch.as_tensor(arrays["y_test"][:16], dtype=torch.int64))
    raw = torch.as_tensor(arrays["x_test"][0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    assert torch.allclose(xv[0], (raw - mean) / std, atol=1e-5)


def test_arrays_greyscale_explicit_stats_and_num_classes(tmp_path):
    save_npy(tmp_path, make_arrays(channels=None))
    dm = ArraysDataModule(tmp_path, num_classes=7, mean=[0.5], std=[0.25], batch_size=8)
    assert (dm.num_classes, dm.in_channels) == (7, 1)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="num_classes=2"):
        ArraysDataModule(tmp_path, num_classes=2)


def test_arrays_subset_int_and_float(tmp_path):
    save_npy(tmp_path, make_arrays())
    dm = ArraysDataModule(tmp_path, subset=3, batch_size=4)
    dm.setup("fit")
    assert torch.bincount(dm.train_set.labels).tolist() == [3, 3, 3, 3]
    assert len(dm.val_set) == 20
    dm = ArraysDataModule(tmp_path, subset=0.5, batch_size=4)
    dm.setup("fit")
    assert torch.bincount(dm.train_set.labels).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="images per class"):
        ArraysDataModule(tmp_path, subset=2.5)


def test_arrays_augmentation_keeps_shape_and_is_seeded(tmp_path):
    save_npy(tmp_path, make_arrays())
    plain = ArraysDataModule(tmp_path, augment=False)
    plain.setup("fit")
    runs = []
    for _ in range(2):
        dm = ArraysDataModule(tmp_path, augment=True, seed=3)
        dm.setup("fit")
        runs.append(torch.stack([dm.train_set[i][0] for i in range(40)]))
    reference = torch.stack([plain.train_set[i][0] for i in range(40)])
    assert runs[0].shape == reference.shape == (40, 3, 8, 8)
    assert torch.equal(runs[0], runs[1])  # same seed, same augmentation
    changed = (runs[0] != reference).flatten(1).any(1)
    assert 0 < changed.sum() <= 40
    # Only pixels of the image appear (zero padding aside): a crop of the padded image.
    assert not torch.equal(runs[0], reference)


def test_random_crop_flip_is_a_shifted_window():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6) + 1
    generator = torch.Generator().manual_seed(0)
    for mode in ("zeros", "reflect"):
        out = RandomCropFlip(padding=2, padding_mode=mode)(image, generator)
        assert out.shape == image.shape
    out = RandomCropFlip(padding=0)(image, torch.Generator().manual_seed(0))
    assert torch.equal(out, image) or torch.equal(out, image.flip(-1))


def test_arrays_missing_files_are_listed(tmp_path):
    np.save(tmp_path / "x_train.npy", make_arrays()["x_train"])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError) as err:
        ArraysDataModule(tmp_path)
    message = str(err.value)
    for name in ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy", "notes.txt", ".npz"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ArraysDataModule(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("x_train", np.zeros((40, 3, 8, 8), np.uint8), "channels-first"),
        ("x_train", np.zeros((40, 8), np.uint8), r"expected \(N, H, W, C\)"),
        ("x_train", np.zeros((40, 8, 8, 3), np.float32), "expected uint8"),
        ("x_test", np.zeros((20, 6, 6, 3), np.uint8), "the same"),
        ("y_train", np.zeros(39, np.int64), "40 images but y_train has 39"),
        ("y_train", np.zeros(40, np.float32), "integer class labels"),
    ],
)
def test_arrays_bad_shapes_and_dtypes(tmp_path, key, value, match):
    arrays = make_arrays()
    arrays[key] = value
    save_npy(tmp_path, arrays)
    with pytest.raises(ValueError, match=match):
        ArraysDataModule(tmp_path)


def test_arrays_num_classes_is_inferred_only_from_labels_0_to_k_minus_1(tmp_path):
    arrays = make_arrays()
    arrays["y_train"] = np.where(np.arange(40) == 5, 1000, np.arange(40) % 10)
    save_npy(tmp_path, arrays)
    with pytest.raises(ValueError) as err:
        ArraysDataModule(tmp_path)
    message = str(err.value)
    for part in ("11 distinct labels", "from 0 to 1000", "10, 11, 12", "dataset.num_classes"):
        assert part in message
    assert "num_classes=" in message and "relabel" in message
    assert ArraysDataModule(tmp_path, num_classes=1001).num_classes == 1001  # explicit is fine
    arrays["y_train"], arrays["y_test"] = np.arange(40) % 4 + 1, arrays["y_test"] + 1  # no 0
    save_npy(tmp_path / "b", arrays)
    with pytest.raises(ValueError, match=r"4 distinct labels from 1 to 4, missing: 0 \("):
        ArraysDataModule(tmp_path / "b")


@pytest.mark.parametrize("label, match", [(4, "labels go up to 4"), (-1, "negative labels")])
def test_arrays_labels_outside_given_num_classes(tmp_path, label, match):
    arrays = make_arrays()
    arrays["y_test"] = np.where(np.arange(20) == 3, label, arrays["y_test"].astype(np.int64))
    save_npy(tmp_path, arrays)
    with pytest.raises(ValueError, match=match):
        ArraysDataModule(tmp_path, num_classes=4)


@pytest.mark.parametrize("split, need", [("test", "validation"), ("train", "training")])
def test_arrays_empty_split_is_an_error_at_setup(tmp_path, split, need):
    arrays = make_arrays()
    arrays[f"x_{split}"], arrays[f"y_{split}"] = np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, int)
    save_npy(tmp_path, arrays)
    with pytest.raises(ValueError, match=rf"x_{split}\.npy .*0 images.*{need} needs at least one"):
        ArraysDataModule(tmp_path, num_classes=4).setup("fit")


def damage_npy(path, how: str) -> None:
    data = path.read_bytes()
    if how == "object":
        np.save(path, np.array([1, "a", None], dtype=object), allow_pickle=True)
    elif how == "not_npy":
        path.write_text("x,y\n1,2\n")
    else:
        path.write_bytes(data[: {"data": len(data) // 2, "header": 40, "empty": 0}[how]])


@pytest.mark.parametrize(
    "how, match",
    [
        ("data", r"truncated: it has \d+ bytes but its header describes a uint8 array"),
        ("header", "header is truncated or unreadable"),
        ("empty", "is empty"),
        ("object", "holds Python objects"),
        ("not_npy", "is not a .npy file"),
    ],
)
def test_arrays_truncated_or_unreadable_npy(tmp_path, how, match):
    save_npy(tmp_path, make_arrays())
    damage_npy(tmp_path / "x_train.npy", how)
    with pytest.raises(ValueError, match=match) as err:
        ArraysDataModule(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "x_train.npy") in message and "numpy.save" in message
    assert "uint8 images" in message and "integer labels" in message


def test_arrays_npz_with_object_array(tmp_path):
    arrays = make_arrays()
    arrays["y_test"] = np.array([1, "a"] * 10, dtype=object)
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(ValueError, match=r"data\.npz: y_test holds Python objects.*numpy\.savez"):
        ArraysDataModule(tmp_path)


# ---------------------------------------------------------------------- data fingerprint
def test_data_fingerprint_follows_the_array_contents_not_the_path(tmp_path):
    arrays = make_arrays()
    save_npy(tmp_path / "a", arrays)
    save_npy(tmp_path / "b", dict(arrays, x_train=arrays["x_train"] ^ 1))  # same shapes
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    dm = ArraysDataModule(tmp_path / "a")
    first = dm.data_fingerprint()
    assert set(first) == set(ARRAY_FILES)
    assert first["x_train.npy"]["size"] == (tmp_path / "a" / "x_train.npy").stat().st_size
    assert str(tmp_path) not in json.dumps(first)
    assert ArraysDataModule(tmp_path / "copy").data_fingerprint() == first
    assert ArraysDataModule(tmp_path / "b").data_fingerprint() != first
    # computed once per instance: a file replaced afterwards does not change it
    os.replace(tmp_path / "b" / "x_train.npy", tmp_path / "a" / "x_train.npy")
    assert dm.data_fingerprint() == first
    assert ArraysDataModule(tmp_path / "a").data_fingerprint() != first
    np.savez(tmp_path / "data.npz", **arrays)
    assert set(ArraysDataModule(tmp_path / "data.npz").data_fingerprint()) == {"data.npz"}
    assert DigitsDataModule().data_fingerprint() == {}  # bundled with the package


@pytest.mark.parametrize(
    "cls, folder",
    [(Cifar10DataModule, "cifar-10-batches-py"), (Cifar100DataModule, "cifar-100-python")],
)
def test_cifar_data_fingerprint(tmp_path, cls, folder):
    assert cls(tmp_path / "a").data_fingerprint() == {}  # absent: setup reports it
    (tmp_path / "a" / folder).mkdir(parents=True)
    (tmp_path / "a" / folder / "test_batch").write_bytes(b"batch")
    (tmp_path / "a" / "unrelated.txt").write_text("not part of the dataset")
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("*.txt"))
    first = cls(tmp_path / "a").data_fingerprint()
    assert list(first) == [f"{folder}/test_batch"]
    assert cls(tmp_path / "b").data_fingerprint() == first
    (tmp_path / "b" / folder / "test_batch").write_bytes(b"other")
    assert cls(tmp_path / "b").data_fingerprint() != first


# ---------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("cls", [Cifar10DataModule, Cifar100DataModule])
def test_cifar_missing_without_download_raises_clearly(tmp_path, cls):
    dm = cls(data_dir=tmp_path, download=False)
    assert dm.image_size == 32 and dm.in_channels == 3
    assert dm.num_classes == (10 if cls is Cifar10DataModule else 100)
    dm.prepare_data()  # nothing to fetch, nothing fetched
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path) in message and "download=True" in message
    assert "dataset=arrays" in message
    # both the Python and the command-line switch, and the folder it looked in
    assert "dataset.download=true" in message
    folder = "cifar-10-batches-py" if cls is Cifar10DataModule else "cifar-100-python"
    assert str(tmp_path / folder) in message


def test_cifar_rejects_bad_name_and_subset(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        CifarDataModule("cifar1000", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images per class"):
        Cifar10DataModule(tmp_path, subset=0)


# ---------------------------------------------------------------------- COCO
def expected_targets(annotation_file) -> tuple[list[str], torch.Tensor]:
    coco = json.loads(annotation_file.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    column = {c["id"]: i for i, c in enumerate(categories)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    row = {im["id"]: i for i, im in enumerate(images)}
    target = torch.zeros(len(images), len(categories))
    for ann in coco["annotations"]:
        target[row[ann["image_id"]], column[ann["category_id"]]] = 1.0
    return [c["name"] for c in categories], target


def test_coco_fixture_format(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path, num_images=5, num_categories=4)
    coco = json.loads(annotation_file.read_text())
    assert len(coco["images"]) == 5 and len(coco["categories"]) == 4
    assert all((image_dir / im["file_name"]).is_file() for im in coco["images"])
    for ann in coco["annotations"]:
        assert {"bbox", "area", "iscrowd", "image_id", "category_id"} <= set(ann)
    names, target = expected_targets(annotation_file)
    assert target[-1].sum() == 0  # the last image has no annotations
    assert (target.sum(0) > 0).all()  # every category is used


def test_coco_datamodule_batches(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path, num_images=6, num_categories=3)
    dm = CocoDataModule(annotation_file, image_dir, annotation_file, image_dir, image_size=32)
    names, target = expected_targets(annotation_file)
    assert dm.task == "multilabel" and dm.num_classes == 3 and dm.category_names == names
    assert names == ["shape0", "shape1", "shape2"]
    dm.batch_size = 2
    dm.setup("fit")
    assert len(dm.train_set) == len(dm.val_set) == 6  # the un-annotated image is kept
    val = list(dm.val_dataloader())
    x, y = val[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (2, 3) and y.dtype == torch.float32
    assert torch.equal(y, target[:2])
    assert torch.equal(torch.cat([b[1] for b in val]), target)
    assert val[-1][1][-1].sum() == 0
    xt, yt = next(iter(dm.train_dataloader()))
    assert xt.shape == (2, 3, 32, 32) and set(yt.unique().tolist()) <= {0.0, 1.0}


def test_coco_missing_paths(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDataModule(tmp_path / "missing.json", image_dir, annotation_file, image_dir)
    with pytest.raises(FileNotFoundError, match="val image directory not found"):
        CocoDataModule(annotation_file, image_dir, annotation_file, tmp_path / "nope")


def coco_datamodule(annotation_file, image_dir, val_file=None) -> CocoDataModule:
    val_file = annotation_file if val_file is None else val_file
    return CocoDataModule(annotation_file, image_dir, val_file, image_dir, image_size=32)


def test_coco_data_fingerprint(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = coco_datamodule(annotation_file, image_dir).data_fingerprint()
    assert first["val"]["images"] == 6 and first["train"]["annotations"]["file"] == "instances.json"
    copy = coco_datamodule(tmp_path / "b" / "instances.json", tmp_path / "b" / "images")
    assert copy.data_fingerprint() == first and str(tmp_path) not in json.dumps(first)
    (tmp_path / "b" / "images" / "extra.png").write_bytes(b"")
    assert copy.data_fingerprint() == first  # cached on the instance
    other = coco_datamodule(tmp_path / "b" / "instances.json", tmp_path / "b" / "images")
    assert other.data_fingerprint()["train"]["images"] == 7
    make_coco_fixture(tmp_path / "c", seed=1)
    changed = coco_datamodule(tmp_path / "c" / "instances.json", tmp_path / "c" / "images")
    assert changed.data_fingerprint()["train"]["annotations"] != first["train"]["annotations"]


def test_coco_empty_val_split_is_an_error_at_setup(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path)
    coco = json.loads(annotation_file.read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(dict(coco, images=[], annotations=[])))
    with pytest.raises(ValueError, match=r"empty\.json lists 0 images.*validation needs at least"):
        coco_datamodule(annotation_file, image_dir, empty).setup("fit")


def corrupt(coco: dict, how: str) -> dict:
    if how == "category_str":
        coco["annotations"][2]["category_id"] = "x"
    elif how == "unknown_category":
        coco["annotations"][2]["category_id"] = 999
    elif how == "unknown_image":
        coco["annotations"][2]["image_id"] = 999
    elif how == "no_image_id":
        del coco["annotations"][2]["image_id"]
    elif how == "images_not_list":
        coco["images"] = {"id": 1}
    elif how == "category_no_id":
        del coco["categories"][1]["id"]
    elif how == "duplicate_image":
        coco["images"][1]["id"] = coco["images"][0]["id"]
    elif how == "file_name":
        coco["images"][1]["file_name"] = 7
    return coco


@pytest.mark.parametrize(
    "how, match",
    [
        ("category_str", r"annotation at index 2 \(id 3\): category_id is 'x'; expected an int"),
        ("unknown_category", r"annotation at index 2 \(id 3\) refers to category 999, which"),
        ("unknown_image", r"annotation at index 2 \(id 3\) refers to image 999, which"),
        ("no_image_id", r"annotation at index 2 \(id 3\) has no 'image_id'"),
        ("images_not_list", r"'images' is an object; expected a list"),
        ("category_no_id", r"category at index 1 has no 'id'"),
        ("duplicate_image", r"image at index 1 \(id 100\): the id 100 is listed twice"),
        ("file_name", r"image at index 1 \(id 101\): file_name is 7; expected a str"),
        ("not_json", r"is not valid JSON \(line 1, column 1"),
        ("latin1", r"is not UTF-8 text"),
        ("list", r"holds a list; expected a COCO instances file: a JSON object"),
    ],
)
def test_coco_malformed_annotation_file(tmp_path, how, match):
    annotation_file, image_dir = make_coco_fixture(tmp_path)
    bad = tmp_path / "bad.json"
    if how == "not_json":
        bad.write_text("images: []")
    elif how == "latin1":
        bad.write_bytes(annotation_file.read_text().replace("shape0", "sh\xe4pe").encode("latin-1"))
    elif how == "list":
        bad.write_text("[]")
    else:
        bad.write_text(json.dumps(corrupt(json.loads(annotation_file.read_text()), how)))
    with pytest.raises(ValueError, match=match) as err:
        coco_datamodule(annotation_file, image_dir, bad)
    assert str(bad) in str(err.value)


@pytest.mark.filterwarnings("ignore:No positive samples found in target")
@pytest.mark.filterwarnings("ignore:.*modules? in eval mode")
def test_coco_one_distillation_step_reports_map(tmp_path):
    annotation_file, image_dir = make_coco_fixture(tmp_path, num_images=6, num_categories=3)
    dm = CocoDataModule(
        annotation_file, image_dir, annotation_file, image_dir, image_size=32, batch_size=2
    )
    c = dm.num_classes
    torch.manual_seed(0)
    teacher = resnet(18, num_classes=c, width=4)
    student = resnet(10, num_classes=c, width=4)
    module = DistillationModule(
        teacher, student, task="multilabel", num_classes=c, method="attention"
    )
    trainer = pl.Trainer(
        **make_trainer_kwargs(
            tmp_path,
            max_steps=1,
            limit_train_batches=1,  # end the epoch so validation runs
            limit_val_batches=1,
        )
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert "val/map" in trainer.callback_metrics
    assert "train/loss" in trainer.callback_metrics


def test_links_that_cannot_be_followed_are_named_as_such(tmp_path) -> None:
    import os

    from lightning_layerkd.data.array_files import load_arrays

    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(
        FileNotFoundError,
        match=r"loop is a symbolic link that cannot be followed \(a loop of links\)",
    ):
        load_arrays(tmp_path / "loop")
    folder = tmp_path / "arrays"
    folder.mkdir()
    for name in ("x_train.npy", "y_train.npy"):
        os.symlink(folder / name, folder / name)  # each a link to itself
    os.symlink(tmp_path / "gone.npy", folder / "x_test.npy")
    with pytest.raises(FileNotFoundError) as err:
        load_arrays(folder)
    message = str(err.value)
    assert "(missing: y_test.npy)" in message  # a looping link is not "missing" and present
    assert "the folder contains: nothing" in message
    assert "x_train.npy is a link that cannot be followed (a loop of links)" in message
    assert (
        f"x_test.npy is a link that cannot be followed (it points to {tmp_path / 'gone.npy'}"
        in message
    )


def test_sample_indices_add_each_samples_index_to_train_batches_only():
    from lightning_layerkd.data import DigitsDataModule, IndexedDataset
    from lightning_layerkd.module import batch_indices

    dm = DigitsDataModule(batch_size=16, image_size=8)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    dm.sample_indices = True
    xi, yi, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(xi, x) and torch.equal(yi, y)  # the same shuffle, the same samples
    assert dm.train_set is not None
    for k in range(len(idx)):  # each index names its sample in the training set
        image, label = dm.train_set[int(idx[k])]
        assert int(label) == int(yi[k])
    assert batch_indices((xi, yi, idx)) is idx and batch_indices((x, y)) is None
    assert len(next(iter(dm.val_dataloader()))) == 2
    assert IndexedDataset(dm.train_set)[3][2] == 3
