"""Weights & Biases integration: an offline-safe logger, per-layer panels and map images."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_layerkd.methods import MapMethod

__all__ = ["LayerPanels", "MapImageLogger", "finish", "has_credentials", "make_wandb_logger"]


def has_credentials() -> bool:
    """Whether wandb can authenticate: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def make_wandb_logger(
    *,
    project: str,
    save_dir: str | Path,
    name: str = "student",
    entity: str | None = None,
    group: str | None = None,
) -> WandbLogger:
    """A WandbLogger that runs offline (and says how to sync) when it cannot authenticate;
    the run is named after the job's overrides, ``name`` is its job type."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not has_credentials():
        os.environ["WANDB_MODE"] = mode = "offline"
    if mode in ("offline", "dryrun"):
        runs = Path(save_dir) / "wandb"
        print(
            f"[layerkd] wandb is offline (no credentials or WANDB_MODE={mode}); runs are saved "
            f"under {runs}; upload them later with `wandb sync {runs}/offline-run-*`"
        )
    return WandbLogger(
        project=project,
        entity=entity,
        group=group,
        name=_job_name(name),
        save_dir=str(save_dir),
        job_type=name,
        config=None,
        reinit=True,
    )


def _job_name(default: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
        return overrides or default
    except (ImportError, ValueError):
        return default


def finish() -> None:
    """Close the current wandb run, so the next sweep job starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class LayerPanels(Callback):
    """One wandb panel per quantity with a line per crucial layer: ``lr``, ``eta``, the
    accumulated divergence, the layer-wise factor and the training JSD, re-plotted at the end
    of every epoch."""

    KEYS = ("layerwise/lr/", "layerwise/eta/", "layerwise/divergence/", "layerwise/factor/")

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        epoch = trainer.current_epoch
        # the per-layer training term is named by the method (train/jsd/..., train/pkt/...)
        keys = (*self.KEYS, f"train/{getattr(pl_module, 'divergence_name', 'divergence')}/")
        for key, value in trainer.callback_metrics.items():
            for prefix in keys:
                if key.startswith(prefix):
                    self.rows.append([epoch, prefix.rstrip("/"), key[len(prefix) :], float(value)])
        for prefix in keys:
            quantity = prefix.rstrip("/")
            rows = [[e, layer, v] for e, q, layer, v in self.rows if q == quantity]
            if not rows:
                continue
            table = wandb.Table(data=rows, columns=["epoch", "layer", "value"])
            chart = wandb.plot.line(table, "epoch", "value", stroke="layer", title=quantity)
            for logger in loggers:
                logger.experiment.log({f"panels/{quantity}": chart})


class MapImageLogger(Callback):
    """Logs teacher vs student maps of a fixed validation batch as images every few epochs;
    a method without layer maps (not a :class:`~lightning_layerkd.methods.MapMethod`) logs
    none, with one message."""

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 4) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.enabled = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.enabled = isinstance(getattr(pl_module, "method", None), MapMethod)
        if not self.enabled:
            rank_zero_info(
                f"MapImageLogger: {getattr(pl_module, 'method', pl_module)!r} has no layer maps; "
                "no map images are logged"
            )

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.enabled:
            return
        if self._batch is None and not trainer.sanity_checking and batch_idx == 0:
            x, y = pl_module.unpack_batch(batch)
            n = self.num_samples
            self._batch = (x[:n].detach().clone(), y[:n].detach().clone())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        loggers = _wandb_loggers(trainer)
        if trainer.sanity_checking or not loggers or self._batch is None or not self.enabled:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x, y = (t.to(pl_module.device) for t in self._batch)
        with torch.inference_mode(False):
            _, maps = pl_module.layer_maps(x.clone(), y.clone(), create_graph=False)
        for name, (student, teacher) in maps.items():
            images, captions = [], []
            for i in range(student.shape[0]):
                side = _side(student[i].numel())
                for role, m in (("teacher", teacher[i]), ("student", student[i])):
                    grid = m.detach().float().reshape(-1)[: side * side].reshape(side, side)
                    images.append((grid / grid.max().clamp_min(1e-12)).cpu().numpy())
                    captions.append(f"{role} {i}")
            for logger in loggers:
                logger.log_image(key=f"maps/{name}", images=images, caption=captions)


def _side(n: int) -> int:
    side = int(n**0.5)
    return max(side, 1)
