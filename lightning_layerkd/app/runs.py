"""Where a run stands among runs: resuming a killed student fit (``ckpt_path``) exactly, and
the sweep a job belongs to (so that ``layerkd-report`` never mixes two sweeps)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from . import ConfigError
from .locks import pid_lock
from .teacher import EpochHistory


class StudentHistory(EpochHistory):
    """The student's :class:`EpochHistory`, kept in its checkpoints with the state of the random
    generators its fit draws from (the train loader's and its dataset's, put back by
    :meth:`restore` as the loader is built; torch's, as the first epoch starts), so that a fit
    resumed from an end-of-epoch checkpoint trains as an uninterrupted one and reports every
    epoch."""

    def __init__(self) -> None:
        super().__init__()
        self._generators: dict[str, torch.Generator] = {"torch": torch.default_generator}
        self._saved: dict[str, torch.Tensor] = {}  # the checkpoint's, until put back

    def restore(self, loader: Any) -> Any:
        """``train_dataloader()``'s ``loader``, its generators put back to the checkpoint's."""
        for key, owner in (("loader", loader), ("dataset", getattr(loader, "dataset", None))):
            if isinstance(generator := getattr(owner, "generator", None), torch.Generator):
                self._generators[key] = generator
                if key in self._saved:
                    generator.set_state(self._saved.pop(key))
        return loader

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "torch" in self._saved:  # torch's own: as late as possible
            torch.set_rng_state(self._saved.pop("torch"))
        if "cuda" in self._saved and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(self._saved.pop("cuda"), pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        rng = {key: generator.get_state() for key, generator in self._generators.items()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()  # the current device's
        return {"epochs": list(self.epochs), "rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs, self._saved = list(state_dict["epochs"]), dict(state_dict.get("rng", {}))


def resume_from(cfg: DictConfig, root: Path, callbacks: list[Callback]) -> str | None:
    """``cfg.ckpt_path``, the checkpoint the student's fit resumes from: a file, or ``last``, the
    ``last.ckpt`` of this run's checkpoint folder. A run folder that holds a ``last.ckpt`` is
    only resumed from it (another fit would leave ``last-v1.ckpt`` beside it)."""
    folders = [Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    folder = folders[0] if folders else root / "checkpoints"
    last, wanted = folder / "last.ckpt", cfg.get("ckpt_path")
    path = None if wanted is None else last if wanted == "last" else Path(str(wanted)).expanduser()
    if path is not None and not path.is_file():
        raise ConfigError(
            f"ckpt_path={wanted}: there is no checkpoint {path}; a run saves its checkpoints in "
            "<its run directory>/checkpoints (outputs/<date>/<time>/checkpoints, a sweep's job "
            "multirun/<date>/<time>/<job>/checkpoints): resume it with hydra.run.dir=<its run "
            "directory> ckpt_path=last, or pass ckpt_path=<a .ckpt file> (quoted if its name has "
            "'=': \"ckpt_path='<file>'\")"
        )
    if last.is_file() and (path is None or path.resolve() != last.resolve()):
        raise ConfigError(
            f"this run directory already holds a checkpoint ({last}): resume with "
            "ckpt_path=last, or choose another hydra.run.dir"
        )
    return None if path is None else str(path)


#: Directories this process holds the lock of since Hydra started the run or sweep
#: (:class:`LockBeforeHydraWrites`), so that :func:`run_dir_lock` does not take it again.
_held_by_hydra: set[Path] = set()


@contextlib.contextmanager
def run_dir_lock(root: Path, *, option: str = "hydra.run.dir") -> Iterator[None]:
    """One job per run directory: an exclusive lock on ``<root>/.layerkd.lock`` (holding the
    PID) for the whole run; a second job into the same directory is a :class:`ConfigError` that
    names the holder. The kernel frees the lock of a killed job. Under DDP only rank 0 locks
    (Lightning starts the other ranks into the same directory)."""
    if getattr(rank_zero_only, "rank", 0) != 0 or root.resolve() in _held_by_hydra:
        yield
        return

    def refuse(who: str) -> None:
        kind = "sweep" if option == "hydra.sweep.dir" else "run"
        raise ConfigError(
            f"the {kind} directory {root} is in use by another layerkd-train job ({who}); "
            f"wait for it to end, or choose another {option} (two jobs in one "
            "directory would mix their checkpoints and results)"
        )

    with pid_lock(root / ".layerkd.lock", refuse):
        yield


class LockBeforeHydraWrites(HydraCallback):
    """A Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``) that takes the run
    directory's lock (:func:`run_dir_lock`) as Hydra starts a run, and the sweep directory's as
    it starts a sweep, before Hydra writes anything there (``.hydra/``, ``multirun.yaml``, the
    log): a job refused for a busy directory exits with status 2 and leaves the holder's
    directory as it was."""

    def __init__(self) -> None:
        self._held = contextlib.ExitStack()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a launcher's job process gets one that holds nothing

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._held = contextlib.ExitStack()

    def _hold(self, folder: str, option: str) -> None:
        root = Path(folder)
        try:
            self._held.enter_context(run_dir_lock(root, option=option))
        except ConfigError as err:
            print(f"layerkd-train: error: {err}", file=sys.stderr)
            sys.exit(2)
        _held_by_hydra.add(root.resolve())

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._hold(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._hold(str(config.hydra.sweep.dir), "hydra.sweep.dir")

    def _release(self) -> None:
        self._held.close()
        _held_by_hydra.clear()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()


def _sweep_overrides(hydra_cfg: Any, folder: Path) -> list[Any]:
    """The sweep's overrides: its ``multirun.yaml``'s (Hydra's basic sweeper writes one), or,
    under a sweeper that writes none (Optuna's), this job's less the parameters it searches."""
    if (folder / "multirun.yaml").is_file():
        return list(OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task)
    searched = set(hydra_cfg.sweeper.get("params") or {})
    task = hydra_cfg.overrides.task
    return [o for o in task if str(o).split("=", 1)[0].lstrip("+~") not in searched]


def sweep_identity() -> dict[str, Any]:
    """Which sweep (``-m``) or single run this job belongs to: the directory and a hash of the
    sweep's overrides but ``ckpt_path`` (a resumed job stays in its sweep, also when run on its
    own with ``hydra.run.dir=<sweep dir>/<job>``), so that
    ``layerkd-report`` can refuse a directory that mixes sweeps."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra (the Python API)
        return {}
    output = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        folder = Path(hydra_cfg.sweep.dir)
        spec = _sweep_overrides(hydra_cfg, folder)
    elif output.name.isdigit() and (output.parent / "multirun.yaml").is_file():
        # a sweep's job run on its own (resumed, or started after the sweep was stopped)
        folder = output.parent
        spec = OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task
    else:
        folder, spec = Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task
    overrides = [str(o) for o in spec if not str(o).startswith("ckpt_path=")]
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]
    return {"dir": str(folder), "id": digest, "overrides": overrides}
