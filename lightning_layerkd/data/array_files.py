"""Reading and checking the files of :class:`~lightning_layerkd.data.ArraysDataModule`: four
``.npy`` files (memory-mapped) or one ``.npz``, never unpickled, with errors that name the file
or key, say what is wrong and what was expected."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

ARRAY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_EXPECTED = (
    "Expected uint8 images of shape (N, H, W, C) or (N, H, W) in x_train and x_test and integer "
    "labels of shape (N,) in y_train and y_test"
)
_NPY_MAGIC = b"\x93NUMPY"


def _npy_error(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{path} {problem}; re-save it with numpy.save (e.g. np.save(path, array)). {_EXPECTED}."
    )


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file (never unpickling), or raise a ValueError that names the
    file and says what is wrong with it: empty, not a .npy, a damaged header, Python objects,
    or fewer bytes than its header promises."""
    size = path.stat().st_size
    if size == 0:
        raise _npy_error(path, "is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            if _NPY_MAGIC.startswith(head):
                raise _npy_error(path, f"is truncated: it has only {size} bytes")
            raise _npy_error(
                path,
                "is not a .npy file (it does not start with NumPy's magic bytes \\x93NUMPY; "
                "a CSV, pickle or image file, perhaps)",
            )
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                header = None  # (3, 0): left to np.load below
        except (ValueError, EOFError) as err:
            problem = f"is damaged: its header is truncated or unreadable ({err})"
            raise _npy_error(path, problem) from err
        offset = f.tell()
    if header is not None:
        shape, _, dtype = header
        if dtype.hasobject:
            raise _npy_error(
                path,
                f"holds Python objects (dtype {dtype}, shape {shape}), which could only be read "
                "by unpickling (allow_pickle), and data files are never unpickled here",
            )
        needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size < needed:
            raise _npy_error(
                path,
                f"is truncated: it has {size} bytes but its header describes a {dtype} array "
                f"of shape {shape}, which needs {needed} bytes (an interrupted copy or save?)",
            )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise _npy_error(path, f"could not be read as a .npy array ({err})") from err


def _read_npz(npz: Path) -> dict[str, np.ndarray]:
    """The four arrays of one ``.npz`` archive (never unpickling), with errors that name the
    archive and the key."""
    resave = (
        "re-save the archive with numpy.savez (e.g. np.savez(path, x_train=x_train, "
        f"y_train=y_train, x_test=x_test, y_test=y_test)). {_EXPECTED}."
    )
    try:
        archive = np.load(npz, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{npz} is not a readable .npz archive ({err}); {resave}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{npz} is a single .npy array, not a .npz archive of four; {resave}")
    with archive:
        missing = [k for k in ARRAY_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{npz} lacks the keys {missing}; expected {list(ARRAY_KEYS)}, "
                f"found {archive.files}"
            )
        arrays = {}
        for key in ARRAY_KEYS:
            try:
                arrays[key] = archive[key]
            except ValueError as err:
                problem = (
                    "holds Python objects (dtype object), which could only be read by "
                    "unpickling (allow_pickle), and data files are never unpickled here"
                    if "allow_pickle" in str(err)
                    else f"could not be read ({err})"
                )
                raise ValueError(f"{npz}: {key} {problem}; {resave}") from err
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                raise ValueError(f"{npz}: {key} is damaged ({err}); {resave}") from err
    return arrays


def load_arrays(data_dir: Path) -> tuple[dict[str, np.ndarray], Path, list[Path]]:
    """Open ``x_train, y_train, x_test, y_test`` from four ``.npy`` files (memory-mapped) or
    one ``.npz``; returns the arrays, the folder they came from and the files read."""
    if data_dir.is_symlink() and not data_dir.exists():
        raise FileNotFoundError(
            f"data_dir {data_dir} is a symbolic link that cannot be followed "
            f"({_link_problem(data_dir)}); point it at a folder with the arrays"
        )
    if not data_dir.exists():
        raise FileNotFoundError(
            f"data_dir {data_dir} does not exist; expected a folder with "
            f"{', '.join(ARRAY_FILES)} or one .npz with keys {', '.join(ARRAY_KEYS)}"
        )
    npz: Path | None = data_dir if data_dir.is_file() else None
    folder = data_dir.parent if npz is not None else data_dir
    if npz is None:
        if all((data_dir / name).is_file() for name in ARRAY_FILES):
            files = [data_dir / name for name in ARRAY_FILES]
            return {k: _open_npy(p) for k, p in zip(ARRAY_KEYS, files, strict=True)}, folder, files
        candidates = sorted(data_dir.glob("*.npz"))
        if len(candidates) != 1:
            broken = [p for p in sorted(data_dir.iterdir()) if p.is_symlink() and not p.exists()]
            found = sorted(p.name for p in data_dir.iterdir() if p not in broken)
            missing = [
                n
                for n in ARRAY_FILES
                if not (data_dir / n).is_file() and data_dir / n not in broken
            ]
            links = "; ".join(
                f"{p.name} is a link that cannot be followed ({_link_problem(p)})" for p in broken
            )
            raise FileNotFoundError(
                f"no image arrays in {data_dir}: expected {', '.join(ARRAY_FILES)} "
                f"(missing: {', '.join(missing) or 'none'}) or exactly one .npz with keys "
                f"{', '.join(ARRAY_KEYS)}; the folder contains: {', '.join(found) or 'nothing'}"
                + (f"; {links}" if links else "")
            )
        npz = candidates[0]
    return _read_npz(npz), folder, [npz]


def check_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def require_images(arrays: dict[str, np.ndarray], files: list[Path]) -> None:
    """Raise a ValueError naming the file (or ``.npz`` key) of an empty train or test split:
    training and validation each need at least one image."""
    for split, need, hint in (
        ("train", "training", "Put labelled images in x_train and y_train."),
        (
            "test",
            "validation",
            "Validation and test use the test split: put at least one labelled image in "
            "x_test and y_test, e.g. by holding out part of the train images.",
        ),
    ):
        x = arrays[f"x_{split}"]
        if len(x) == 0:
            npz = files[0] if len(files) == 1 else None
            where = f"{npz}: x_{split}" if npz else str(files[ARRAY_KEYS.index(f"x_{split}")])
            raise ValueError(
                f"{where} holds 0 images (shape {x.shape}); {need} needs at least one image. {hint}"
            )


def resolve_num_classes(labels: np.ndarray, num_classes: int | None, where: Path) -> int:
    """``num_classes`` checked against the sorted distinct (non-negative) ``labels``, or, when
    it is ``None``, inferred from them if they are exactly ``0..K-1``."""
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if len(labels) and labels[-1] >= num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the labels go up to {labels[-1]} (in {where}); "
                f"expected labels in 0..{num_classes - 1}: set num_classes to at least "
                f"{labels[-1] + 1} or relabel"
            )
        return num_classes
    if len(labels) == 0:
        raise ValueError(f"no labels found in {where}: y_train and y_test are both empty")
    low, high = int(labels[0]), int(labels[-1])
    if high == len(labels) - 1:
        return len(labels)
    gaps: list[int] = []
    expected = 0
    for label in labels.tolist():
        gaps.extend(range(expected, min(label, expected + 5 - len(gaps))))
        expected = label + 1
        if len(gaps) >= 5:
            break
    more = (high + 1 - len(labels)) - len(gaps)
    raise ValueError(
        f"num_classes is not set, and it can be inferred only from labels that are exactly "
        f"0..K-1, but y_train and y_test in {where} hold {len(labels)} distinct labels from "
        f"{low} to {high}, missing: {', '.join(map(str, gaps))}"
        f"{f' and {more} more' if more else ''} (inferring would give {high + 1} classes). "
        "If the classes really are 0..K-1 with some absent, set the number of classes: "
        "dataset.num_classes=K on the command line, or num_classes=K in Python "
        "(ArraysDataModule(..., num_classes=K)); otherwise relabel the classes to 0..K-1 "
        "(e.g. with np.unique(y, return_inverse=True))."
    )


def _link_problem(link: Path) -> str:
    """Why a symbolic link cannot be followed: a loop, or the missing target it points to."""
    try:
        link.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so
        return "a loop of links"
    except OSError as err:
        if err.errno == 40:  # ELOOP
            return "a loop of links"
    return f"it points to {os.readlink(link)}, which does not exist"
