"""The key of the teacher cache: a hash of every setting that changes the teacher's training
(the data, the architecture, the seed, the optimizer and scheduler, and every option of the
teacher's ``Trainer`` but the display-only ones), and the ``Trainer`` options themselves, so
that the key and the ``Trainer`` read the same settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .logs import get_logger

log = get_logger(__name__)

#: Trainer options that change no weight (display and logging only), left out of the cache key.
DISPLAY_ONLY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def trainer_options(cfg: DictConfig, epochs: int) -> dict[str, Any]:
    """Every option a ``Trainer`` of ``epochs`` epochs gets from the config: ``cfg.trainer``
    whole, the epochs and the batch limits (the teacher cache key reads these)."""
    options: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    return {
        "max_epochs": epochs,
        "limit_train_batches": cfg.limit_train_batches,
        "limit_val_batches": cfg.limit_val_batches,
        **options,
    }


#: Lightning's shorthands of a precision, by the name it resolves them to.
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def data_fingerprint(datamodule: Any) -> dict[str, Any]:
    """The datamodule's ``data_fingerprint()`` (an identity of its data on disk; ``{}`` for
    bundled data), checked to be a JSON-serialisable dict."""
    method = getattr(datamodule, "data_fingerprint", None)
    name = type(datamodule).__name__
    if method is None:
        log.warning(
            f"{name} has no data_fingerprint(): the teacher cache tells its data apart by the "
            "dataset config only; give it a data_fingerprint() returning the data's identity"
        )
        return {}
    fingerprint = method()
    if not isinstance(fingerprint, dict):
        raise TypeError(
            f"{name}.data_fingerprint() returned {type(fingerprint).__name__}; expected a "
            "JSON-serialisable dict identifying the data"
        )
    return fingerprint


def teacher_cache_payload(cfg: DictConfig, data: Mapping[str, Any]) -> dict[str, Any]:
    """What the teacher cache key hashes: the data (``data``, the datamodule's
    :func:`data_fingerprint`, and the dataset config but its path and workers), the
    architecture, the seed, the optimizer and scheduler, and every option of the teacher's
    ``Trainer`` (:func:`trainer_options`: the whole trainer group, the epochs and batch limits)
    but the display-only ones. The same data in another folder gives the same key."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset, dict)
    for volatile in ("num_workers", "data_dir"):
        dataset.pop(volatile, None)
    trainer = trainer_options(cfg, cfg.teacher_epochs)
    for display in DISPLAY_ONLY:
        trainer.pop(display, None)
    precision = str(trainer.get("precision") or "32-true")
    trainer["precision"] = _PRECISION_ALIASES.get(precision, precision)
    return {
        "dataset": dataset,
        "data": dict(data),
        "teacher": OmegaConf.to_container(cfg.model.teacher, resolve=True),
        "seed": cfg.seed,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.teacher_scheduler, resolve=True),
        "trainer": trainer,
    }


def teacher_cache_key(cfg: DictConfig, data: Mapping[str, Any]) -> str:
    """Key of the teacher cache: a hash of :func:`teacher_cache_payload`."""
    payload = teacher_cache_payload(cfg, data)
    try:
        text = json.dumps(payload, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"the teacher cache key needs JSON-serialisable data: {err}; make the "
            "datamodule's data_fingerprint() return plain dicts, lists, strings and numbers"
        ) from err
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{cfg.model.get('name', 'teacher')}-{digest[:16]}"
