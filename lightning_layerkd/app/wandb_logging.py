"""Weights & Biases integration: an offline-safe logger, per-layer panels and map images."""

from __future__ import annotations

import netrc
import os
import re
import secrets
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_layerkd.functional.divergence import js_divergence
from lightning_layerkd.functional.maps import to_distribution
from lightning_layerkd.methods import MapMethod

from .logs import get_logger
from .map_images import figure_to_rgb, grid_shape, sample_maps_figure, weight_maps_figure

log = get_logger(__name__)


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
    resume: bool = False,
) -> WandbLogger:
    """A WandbLogger that runs offline (and says how to sync) when it cannot authenticate;
    the run is named after the job's overrides, ``name`` is its job type. The run's id is kept
    in ``<save_dir>/wandb_run_id``; with ``resume`` (a fit resumed from a checkpoint) the run of
    that id goes on (``resume="allow"``) instead of a new one starting."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not has_credentials():
        os.environ["WANDB_MODE"] = mode = "offline"
    if mode in ("offline", "dryrun"):
        runs = Path(save_dir) / "wandb"
        log.info(
            f"wandb is offline (no credentials or WANDB_MODE={mode}); runs are saved "
            f"under {runs}; upload them later with `wandb sync {runs}/offline-run-*`"
        )
    run_id = _run_id(Path(save_dir), resume)
    logger = WandbLogger(
        id=run_id,
        resume="allow",
        project=project,
        entity=entity,
        group=group,
        name=_job_name(name),
        save_dir=str(save_dir),
        job_type=name,
        config=None,
        reinit=_reinit(),
    )
    # Lightning always passes anonymous=None, which recent wandb (0.31) warns is a setting
    # that "has no effect and will be removed"; left out, wandb keeps its own default.
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


#: The file in the run directory that keeps the run's wandb id.
RUN_ID_FILE = "wandb_run_id"


def _run_id(save_dir: Path, resume: bool) -> str:
    """The wandb run id of this run directory: the kept one when resuming, else a new one,
    written down (by rank zero) for a later resume."""
    kept = save_dir / RUN_ID_FILE
    if resume and kept.is_file() and kept.read_text().strip():
        run_id = kept.read_text().strip()
        log.info(f"resuming the wandb run {run_id} (kept in {kept})")
        return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if getattr(rank_zero_only, "rank", 0) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        kept.write_text(run_id + "\n")
    return run_id


def _reinit() -> bool | str:
    """``"finish_previous"``, what ``reinit=True`` means, where wandb knows it (0.19.10 on;
    recent versions deprecate booleans); ``True`` for older wandb, which takes only booleans."""
    import wandb

    version = tuple(int(part) for part in re.findall(r"\d+", wandb.__version__)[:3])
    return "finish_previous" if version >= (0, 19, 10) else True


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

    KEYS = (
        "layerwise/lr/",
        "layerwise/eta/",
        "layerwise/divergence/",
        "layerwise/factor/",
        "layerwise/map_weight/",
    )

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(row) for row in self.rows]}  # a resumed run's panels go on

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [list(row) for row in state_dict.get("rows", [])]

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
    """Logs teacher vs student maps of a fixed validation batch every few epochs, one figure
    per crucial layer under ``maps/<layer>`` (:mod:`~lightning_layerkd.app.map_images`).

    Per-sample maps are shown as the distributions the JSD compares, times the support size
    (1 = uniform mass), on the pooled grid of
    :func:`~lightning_layerkd.functional.maps.match_maps`; weight
    maps as per-channel energies in compared order. A method without layer maps (not a
    :class:`~lightning_layerkd.methods.MapMethod`) logs none, with one message."""

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
        if (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        x, y = (t.to(pl_module.device) for t in self._batch)
        with torch.inference_mode(False), _pooled_sizes(pl_module) as sizes:
            _, maps = pl_module.layer_maps(x.clone(), y.clone(), create_graph=False)
        aspect = x.shape[-2] / x.shape[-1] if x.dim() == 4 else 1.0
        for name, (student, teacher) in maps.items():
            title = f"{name}: {getattr(pl_module.method, 'name', 'layer')} maps, "
            title += f"epoch {trainer.current_epoch}"
            k = student.shape[1]
            grid = sizes.get(name)
            grid = grid if grid and grid[0] * grid[1] == k else grid_shape(k, aspect)
            image, caption = _layer_image(pl_module.method, student, teacher, title, grid)
            for logger in loggers:
                logger.log_image(key=f"maps/{name}", images=[image], caption=[caption])


def _layer_image(
    method: Any, student: torch.Tensor, teacher: torch.Tensor, title: str, grid: tuple[int, int]
) -> tuple[np.ndarray, str]:
    """One layer's figure and caption: a weight-map chart or per-sample maps on ``grid``."""
    if getattr(method, "wrt", "activation") == "weight":
        alignment = getattr(method, "weight_alignment", "sorted")
        caption = f"{title}; per-channel energies, teacher vs student ({alignment})"
        return _weight_image(student, teacher, title, alignment), caption
    caption = f"{title}; rows: samples, teacher | student, one colour scale per row"
    return _sample_image(student, teacher, title, grid), caption


@contextmanager
def _pooled_sizes(pl_module: Any) -> Iterator[dict[str, tuple[int, int]]]:
    """Records the crucial layers' output sizes during the forward passes inside; on exit,
    fills in per layer the grid :func:`~lightning_layerkd.functional.maps.match_maps` pools both
    maps
    to (the smaller height and the smaller width)."""
    pairs: list[tuple[str, str]] = getattr(pl_module, "layer_pairs", None) or []
    seen: dict[tuple[int, str], tuple[int, int]] = {}
    handles = []
    for side, model in enumerate((pl_module.student, getattr(pl_module, "teacher", None))):
        for path in {pair[side] for pair in pairs} if model is not None else ():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            handles.append(module.register_forward_hook(_size_hook(seen, (side, path))))
    sizes: dict[str, tuple[int, int]] = {}
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()
    for s, t in pairs:
        if (0, s) in seen and (1, t) in seen:
            (hs, ws), (ht, wt) = seen[(0, s)], seen[(1, t)]
            sizes[s] = (min(hs, ht), min(ws, wt))


def _size_hook(
    seen: dict[tuple[int, str], tuple[int, int]], key: tuple[int, str]
) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            seen.setdefault(key, (int(output.shape[-2]), int(output.shape[-1])))

    return hook


def _relative_mass(m: torch.Tensor) -> np.ndarray:
    """Maps as the distributions the JSD compares, times their support size (1 = uniform)."""
    p = to_distribution(m.detach().float())
    return (p * p.shape[1]).cpu().numpy()


def _sample_image(
    student: torch.Tensor, teacher: torch.Tensor, title: str, grid: tuple[int, int]
) -> np.ndarray:
    """Per-sample ``(B, K)`` maps drawn on their ``grid``, a row per sample with its JSD."""
    jsd = js_divergence(to_distribution(student.detach()), to_distribution(teacher.detach()))
    labels = [f"sample {i}\nJSD {float(d):.3g}" for i, d in enumerate(jsd)]
    shape = (student.shape[0], *grid)
    figure = sample_maps_figure(
        _relative_mass(teacher).reshape(shape),
        _relative_mass(student).reshape(shape),
        title=title,
        row_labels=labels,
        colorbar_label="mass x K (1 = uniform)",
    )
    return figure_to_rgb(figure)


def _weight_image(
    student: torch.Tensor, teacher: torch.Tensor, title: str, alignment: str
) -> np.ndarray:
    """``(1, K)`` weight maps as a bar chart of teacher vs student energies."""
    jsd = float(js_divergence(to_distribution(student.detach()), to_distribution(teacher.detach())))
    order = "sorted by energy" if alignment == "sorted" else "channel by channel"
    figure = weight_maps_figure(
        _relative_mass(teacher)[0],
        _relative_mass(student)[0],
        title=f"{title}, JSD {jsd:.3g}",
        xlabel=f"output channel ({order})",
        ylabel="energy share x K (1 = uniform)",
    )
    return figure_to_rgb(figure)
