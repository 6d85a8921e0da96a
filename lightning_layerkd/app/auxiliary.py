"""Information flow's auxiliary stage (Passalis et al. 2020, section 3.2): the student's
architecture at twice the width learns from the teacher first (outputs only), then teaches the
student layer by layer.

The trained auxiliary network is saved in the run directory (``auxiliary/auxiliary.pt`` and
``auxiliary.json``, written atomically), so that a run resumed with ``ckpt_path`` restores it
instead of training it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import nn

from . import signals
from .logs import get_logger
from .safe_files import load_tensors
from .teacher import EpochHistory, atomic_write, build_trainer

log = get_logger(__name__)


def auxiliary_files(root: Path) -> tuple[Path, Path]:
    """The auxiliary network's weights and metadata in the run directory ``root``."""
    return root / "auxiliary" / "auxiliary.pt", root / "auxiliary" / "auxiliary.json"


def train_or_restore_auxiliary(
    cfg: DictConfig,
    root: Path,
    auxiliary: nn.Module,
    distiller: Callable[[], pl.LightningModule],
    datamodule: Any,
    resume: bool,
) -> dict[str, Any]:
    """Train ``auxiliary`` with the module ``distiller()`` builds (the teacher distilled into
    it) and save it, or, when the fit ``resume``\\ s, restore the one this run saved; returns
    its metadata for results.json (``restored: true`` when restored). It is frozen after."""
    weights, meta_path = auxiliary_files(root)
    if resume and weights.is_file() and meta_path.is_file():
        auxiliary.load_state_dict(load_tensors(weights))
        meta = json.loads(meta_path.read_text())
        log.info(f"auxiliary network restored from {weights}")
        auxiliary.requires_grad_(False)
        return {**meta, "restored": True}
    pl.seed_everything(cfg.seed, workers=True)
    seen = EpochHistory()
    trainer = build_trainer(cfg, cfg.epochs, weights.parent, [seen], False)
    log.info(f"training the auxiliary network for {cfg.epochs} epochs")
    with signals.deferred():  # SIGTERM stops the fit after a batch (Lightning's handler)
        trainer.fit(distiller(), datamodule=datamodule)
    meta = {
        "width": int(cfg.model.student.width) * 2,
        "val_acc": seen.last(),
        "history": seen.epochs,
    }
    if trainer.is_global_zero:
        with signals.deferred():  # both files, then the stop
            atomic_write(weights, lambda p: torch.save(auxiliary.state_dict(), p))
            atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
    auxiliary.requires_grad_(False)
    return meta
