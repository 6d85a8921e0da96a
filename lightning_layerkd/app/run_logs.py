"""One run, one log: a run resumed with ``ckpt_path`` writes its later epochs into the CSV
logger's version folder and the wandb run of the run it resumes, so that its curves are one.

- CSV: the newest ``version_N`` of the run directory is continued; its rows up to the epoch of
  the checkpoint are kept (later ones, of an epoch cut short, are logged again by the resumed
  fit). :class:`FlushLogsOnCheckpoint` writes the rows to disk with every checkpoint, so a run
  killed at any point has them.
- wandb: the run's id is kept in ``<run dir>/wandb_run_id``
  (:func:`~lightning_layerkd.app.wandb_logging.make_wandb_logger`); a resumed run opens the
  same run with ``resume="allow"``.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from .logs import get_logger
from .safe_files import load_tensors

log = get_logger(__name__)


class FlushLogsOnCheckpoint(Callback):
    """Writes the loggers' buffered rows whenever a checkpoint is saved (Lightning's CSV logger
    writes every 100 steps otherwise), so a killed run's log reaches its last checkpoint."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            logger.save()


def build_logger(cfg: DictConfig, ckpt_path: str | None) -> Any:
    """The logger of ``cfg.logger`` (``False`` for none); when the fit resumes from
    ``ckpt_path``, the one that continues the resumed run's CSV folder or wandb run."""
    node = cfg.get("logger")
    if node is None:
        return False
    resume = ckpt_path is not None
    if "make_wandb_logger" in str(node.get("_target_", "")):
        return instantiate(node, resume=resume)
    logger = instantiate(node)
    if resume and isinstance(logger, CSVLogger):
        continue_csv(logger, ckpt_path)  # type: ignore[arg-type]
    return logger


def _versions(folder: Path) -> list[int]:
    found = (p.name.removeprefix("version_") for p in folder.glob("version_*") if p.is_dir())
    return sorted(int(n) for n in found if n.isdigit())


def continue_csv(logger: CSVLogger, ckpt_path: str) -> int | None:
    """Point ``logger`` at the newest ``version_N`` folder of its run and keep that folder's rows
    up to the epoch of the checkpoint ``ckpt_path``; returns ``N``, or ``None`` when there is no
    folder to continue (a checkpoint resumed into a new run directory)."""
    versions = _versions(Path(logger.root_dir))
    if not versions:
        return None
    logger._version = versions[-1]  # CSVLogger's own attribute: no setter
    if getattr(rank_zero_only, "rank", 0) != 0:  # rank zero alone writes the log (DDP)
        return versions[-1]
    metrics = Path(logger.log_dir) / "metrics.csv"
    header: list[str] = []
    rows: list[dict[str, str]] = []
    if metrics.is_file():
        epoch = int(load_tensors(ckpt_path, mmap=True)["epoch"])  # checked by RunIdentity
        with open(metrics, newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("epoch") or float(r["epoch"]) <= epoch]
    with warnings.catch_warnings():  # "Previous log files ... will be deleted": we keep them
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment  # Lightning's writer removes metrics.csv as it starts
    if header:
        writer.metrics_keys = list(header)
        with open(metrics, "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
    log.info(f"continuing the CSV log {metrics} ({len(rows)} rows kept)")
    return versions[-1]
