"""Stage 1 of ``layerkd-train``: train the teacher alone, or load it from a cache keyed by
everything that changes it, safely under concurrent sweep jobs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_layerkd.module import DistillationModule

__all__ = ["EpochHistory", "atomic_write", "build_trainer", "teacher_cache_key", "train_teacher"]


class EpochHistory(Callback):
    """Records validation metrics after every epoch (not the sanity check) for results.json."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        row.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        )
        self.epochs.append(row)

    def last(self, key: str = "val/acc") -> float | None:
        """``key`` of the last epoch, or ``None`` before any."""
        return self.epochs[-1].get(key) if self.epochs else None


def build_trainer(
    cfg: DictConfig, epochs: int, root: Path, callbacks: list[Callback], logger: Any
) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` for ``epochs`` epochs under ``root``."""
    options: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(root),
        callbacks=callbacks,
        logger=logger,
        limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=cfg.limit_val_batches,
        **options,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so concurrent sweep jobs never train the same teacher twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` to a temporary file, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def teacher_cache_key(cfg: DictConfig) -> str:
    """Key of the teacher cache: dataset, architecture, epochs, seed and optimisation settings."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset, dict)
    for volatile in ("num_workers", "data_dir"):
        dataset.pop(volatile, None)
    payload = {
        "dataset": dataset,
        "teacher": OmegaConf.to_container(cfg.model.teacher, resolve=True),
        "epochs": cfg.teacher_epochs,
        "seed": cfg.seed,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.teacher_scheduler, resolve=True),
        "limit_train_batches": cfg.limit_train_batches,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{cfg.model.get('name', 'teacher')}-{digest[:16]}"


def load_teacher(teacher: nn.Module, path: Path) -> None:
    """Load a cached teacher's weights (``weights_only``); a mismatch is a clear error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the teacher checkpoint {path} does not fit the configured teacher "
            f"({type(teacher).__name__}); delete it or fix model.teacher.\n{err}"
        ) from err


def train_teacher(cfg: DictConfig, datamodule: Any, teacher: nn.Module, root: Path) -> dict:
    """Stage 1: train the teacher alone (``cfg.optimizer``, ``cfg.teacher_scheduler``), or load
    it from the cache."""
    cache_dir = Path(cfg.teacher_cache_dir)
    key = teacher_cache_key(cfg)
    weights, meta_path = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    # Under strategy=ddp Lightning re-runs this script for the other ranks while rank 0 trains
    # inside the lock; they join that fit, so only rank 0 locks and writes the cache.
    rank: int = getattr(rank_zero_only, "rank", 0)
    with _locked(cache_dir / f"{key}.lock") if rank == 0 else contextlib.nullcontext():
        if weights.exists() and meta_path.exists():
            load_teacher(teacher, weights)
            meta = json.loads(meta_path.read_text())
            meta["cached"] = True
            print(f"[layerkd] teacher loaded from cache {weights}")
            return meta
        pl.seed_everything(cfg.seed, workers=True)
        module = DistillationModule(
            None,
            teacher,
            method="none",
            num_classes=datamodule.num_classes,
            task=datamodule.task,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.teacher_scheduler),
        )
        history = EpochHistory()
        trainer = build_trainer(cfg, cfg.teacher_epochs, root / "teacher", [history], False)
        trainer.fit(module, datamodule=datamodule)
        meta = {
            "key": key,
            "val_acc": history.last(),
            "history": history.epochs,
            "epochs": cfg.teacher_epochs,
        }
        if rank == 0:
            atomic_write(weights, lambda p: torch.save(teacher.state_dict(), p))
            atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
        meta["cached"] = False
        return meta
