"""Every file the app reads back with ``torch.load`` (student checkpoints, the teacher cache,
the auxiliary network) goes through :func:`load_tensors`: PyTorch's ``weights_only``
unpickler, which builds tensors and plain values (numbers, strings, lists, dicts) and refuses
anything else, so a file that would run code when unpickled is refused before any of it
runs. The other files the app reads (``results.json``, ``wandb_run_id``, the run's YAML) are
text.

Checkpoints written by the app carry a checksum of their content (:data:`CHECKSUM_KEY`, by
:class:`ChecksummedCheckpointIO`): every tensor's bytes, dtype and shape and every plain
value, in order (:func:`content_digest`). A resume recomputes it (:func:`verify_checksum`), so
bytes flipped inside a tensor, which unpickle without complaint, are found.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: The key under which a checkpoint written by the app holds its checksum.
CHECKSUM_KEY = "layerkd_checksum"


class UnsafeFileError(ValueError):
    """A file that holds Python objects beyond tensors and plain values: loading it could run
    code, so it is refused unread."""


class UnreadableFileError(ValueError):
    """A file that is not a PyTorch file, or is truncated or damaged."""


def load_tensors(path: Path | str, *, mmap: bool = False) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only=True``: tensors and plain values only.

    Raises :class:`UnsafeFileError` for a file whose unpickling would build other objects (run
    code) and :class:`UnreadableFileError` for one that cannot be read as a PyTorch file;
    ``OSError`` (no permission, a missing file) passes through."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            detail = next(
                (line.strip() for line in str(err).splitlines() if "Unsupported" in line), ""
            )
            raise UnsafeFileError(
                f"{path} holds Python objects beyond tensors and plain values; unpickling it "
                f"could run code, so it was refused unread{f' ({detail})' if detail else ''}"
            ) from err
        raise UnreadableFileError(_first_line(err)) from err
    except Exception as err:  # noqa: BLE001 - any other failure means a damaged file
        raise UnreadableFileError(_first_line(err)) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _feed(digest: Any, value: Any) -> None:
    """Feed ``value`` into ``digest``, tensors by their bytes, containers in order."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)};".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:  # plain values: exact reprs (a float's repr round-trips)
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


def content_digest(checkpoint: Mapping[str, Any]) -> str:
    """The SHA-256 of everything in ``checkpoint`` but :data:`CHECKSUM_KEY`."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def verify_checksum(checkpoint: Mapping[str, Any]) -> bool | None:
    """Whether ``checkpoint``'s recorded checksum matches its content; ``None`` when it records
    none (written by another program or an older version)."""
    recorded = checkpoint.get(CHECKSUM_KEY)
    if recorded is None:
        return None
    return recorded == content_digest(checkpoint)


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, each checkpoint with its :func:`content_digest` under
    :data:`CHECKSUM_KEY`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        stamped = {**checkpoint, CHECKSUM_KEY: content_digest(checkpoint)}
        super().save_checkpoint(stamped, path, storage_options)
