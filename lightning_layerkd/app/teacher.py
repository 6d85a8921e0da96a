"""Stage 1 of ``layerkd-train``: train the teacher alone, or load it from a cache keyed by
everything that changes it, safely under concurrent sweep jobs and runs killed at any point.

A cache entry is ``<key>.pt`` (the state dict) and ``<key>.json`` (its metadata), each written
atomically, the ``.json`` last, under the lock ``<key>.lock``, which holds the PID of the job
that trains the teacher. Only a finite teacher with a validation accuracy is cached; an
unreadable entry is moved aside to ``<file>.corrupt-<timestamp>`` and the teacher retrained.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from lightning_layerkd.module import DistillationModule

from . import ConfigError, signals
from .cache_key import data_fingerprint, teacher_cache_key, trainer_options
from .locks import pid_lock
from .logs import get_logger
from .safe_files import (
    ChecksummedCheckpointIO,
    UnreadableFileError,
    UnsafeFileError,
    load_tensors,
    verify_checksum,
)

log = get_logger(__name__)


class TeacherTrainingError(RuntimeError):
    """The teacher's fit gave a teacher not worth distilling from (nor caching): non-finite
    weights or outputs, or no validation accuracy."""


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

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])

    def last(self, key: str = "val/acc") -> float | None:
        """``key`` of the last epoch, or ``None`` before any."""
        return self.epochs[-1].get(key) if self.epochs else None


class TeacherKey(Callback):
    """The teacher's cache key in its checkpoints: a teacher stage stopped part-way resumes
    from its last checkpoint only if that is the same teacher (:func:`teacher_checkpoint`)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # checked by teacher_checkpoint() before the fit


def teacher_checkpoint(folder: Path, key: str) -> str | None:
    """The newest checkpoint in ``folder`` of a teacher fit of ``key`` that stopped part-way
    (read safely, its checksum intact), or ``None``."""
    found = (
        sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    )
    if not found:
        return None
    try:
        saved = load_tensors(found[-1])
    except (UnsafeFileError, UnreadableFileError, OSError) as err:
        log.warning(f"the teacher checkpoint {found[-1]} is unusable ({err}); training anew")
        return None
    states = saved.get("callbacks", {}) if isinstance(saved, dict) else {}
    recorded = next((v for k, v in states.items() if str(k).endswith("TeacherKey")), None)
    if verify_checksum(saved) is False or not recorded or recorded.get("key") != key:
        log.info(f"the teacher checkpoint {found[-1]} is of another teacher or damaged; ignored")
        return None
    return str(found[-1])


def build_trainer(
    cfg: DictConfig, epochs: int, root: Path, callbacks: list[Callback], logger: Any
) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` for ``epochs`` epochs under ``root``, its
    checkpoints written with their checksum (beside any plugins of ``trainer.plugins``)."""
    options = trainer_options(cfg, epochs)
    given = options.pop("plugins", None) or []
    return pl.Trainer(
        default_root_dir=str(root),
        callbacks=[*callbacks, signals.StopOnSigterm()],
        logger=logger,
        plugins=[*(given if isinstance(given, list) else [given]), ChecksummedCheckpointIO()],
        **options,
    )


@contextlib.contextmanager
def _locked(path: Path, weights: Path) -> Iterator[None]:
    """An exclusive file lock, so concurrent sweep jobs never train the same teacher twice.

    The holder writes its PID into the lock file; a job that finds the lock taken says once
    whom it waits for (the teacher at ``weights``), then waits. The kernel releases the lock
    of a killed job; its stale PID is overwritten by the next holder."""

    def wait(who: str) -> None:
        log.info(f"waiting for the teacher being trained by {who} at {weights}")

    with pid_lock(path, wait):
        yield


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` to a temporary file, flush it to disk, then rename: readers (and a run after a
    crash) see the old file or the complete new one, never a part; a failed ``write`` leaves
    nothing behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename's durability; not every file system can
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# ---------------------------------------------------------------------- checks
def _nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """{name: number of non-finite values} of the tensors that have any."""
    counts = {
        name: int((~torch.isfinite(t.detach())).sum())
        for name, t in tensors
        if t.is_floating_point() or t.is_complex()
    }
    return {name: n for name, n in counts.items() if n}


def _new_nonfinite(found: dict[str, int], built: Mapping[str, int]) -> dict[str, int]:
    """``found`` less what the freshly built teacher already had (a buffer of ``-inf`` masks)."""
    return {name: n for name, n in found.items() if n > built.get(name, 0)}


def _describe(bad: dict[str, int]) -> str:
    first = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
    tensors = "1 tensor" if len(bad) == 1 else f"{len(bad)} tensors"
    return f"{sum(bad.values()):,} non-finite values in {tensors} ({first})"


def check_teacher(
    teacher: nn.Module, history: EpochHistory, cfg: DictConfig, built: Mapping[str, int]
) -> None:
    """Raise :class:`TeacherTrainingError` unless the trained teacher's parameters and buffers
    are finite (beyond the non-finite values ``built`` it had when built) and its last epoch
    has a finite validation accuracy and loss."""
    tensors = itertools.chain(teacher.named_parameters(), teacher.named_buffers())
    bad = _new_nonfinite(_nonfinite(tensors), built)
    acc, loss = history.last("val/acc"), history.last("val/loss")
    fix = (
        f"lower lr (now {cfg.optimizer.get('lr')}) or check the data "
        "(non-finite inputs, labels outside 0..num_classes-1)"
    )
    if bad:
        problem = f"has {_describe(bad)}: its training diverged; {fix}"
    elif acc is None:
        problem = (
            "has no validation accuracy: no validation epoch ran; check limit_val_batches "
            f"(now {cfg.limit_val_batches}) and that the dataset has a validation split"
        )
    elif not math.isfinite(acc) or (loss is not None and not math.isfinite(loss)):
        problem = (
            f"has a validation accuracy of {acc} and loss of {loss}: its outputs are not "
            f"finite, its training diverged; {fix}"
        )
    else:
        return
    epochs = f"{cfg.teacher_epochs} epoch" + ("" if int(cfg.teacher_epochs) == 1 else "s")
    raise TeacherTrainingError(f"the teacher trained for {epochs} {problem}. Nothing was cached.")


# ---------------------------------------------------------------------- the cache entry
class _Unusable(Exception):
    """A cache file that cannot be used; the message says why."""


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a cached teacher (``weights_only``), or :class:`_Unusable`."""
    if path.stat().st_size == 0:
        raise _Unusable("an empty file")
    try:
        state = load_tensors(path)  # OSError (the file cannot be read) is not moved aside
    except UnsafeFileError as err:
        raise _Unusable(str(err)) from err
    except UnreadableFileError as err:
        raise _Unusable(f"not a readable PyTorch state dict, truncated or damaged: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _Unusable(f"it holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def _read_meta(path: Path) -> dict[str, Any]:
    """The metadata of a cached teacher, or :class:`_Unusable`."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Unusable(f"invalid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise _Unusable(f"it holds a JSON {type(meta).__name__}, not an object")
    acc = meta.get("val_acc")
    if not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise _Unusable(f"it records no finite validation accuracy (val_acc={acc})")
    return meta


def load_teacher(teacher: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load the state dict read from ``path``; a mismatch is a clear error."""
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the teacher checkpoint {path} does not fit the configured teacher "
            f"({type(teacher).__name__}); delete it or fix model.teacher.\n{err}"
        ) from err


def _move_aside(path: Path, problem: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for n in itertools.count(1):
        if not target.exists():
            break
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    log.warning(
        f"the cached teacher file {path} is unusable ({problem}); moved it aside to "
        f"{target.name} and retraining the teacher"
    )


def _cached(
    teacher: nn.Module, weights: Path, meta_path: Path, built: Mapping[str, int], owner: bool
) -> dict[str, Any] | None:
    """Load the cache entry into ``teacher`` and return its metadata, or ``None`` when there is
    none to use: missing, half-written or damaged (moved aside when ``owner``, the lock's
    holder). A sound state dict that does not fit ``teacher`` is a ``ValueError``."""
    if not weights.exists() and not meta_path.exists():
        return None
    if not (weights.exists() and meta_path.exists()):
        found, missing = (weights, meta_path) if weights.exists() else (meta_path, weights)
        log.warning(
            f"found {found} without {missing.name} (a run stopped while caching it); retraining"
        )
        return None
    current = meta_path
    try:
        meta = _read_meta(meta_path)
        current = weights
        state = _read_state(weights)
        bad = _new_nonfinite(_nonfinite(state.items()), built)
        if bad:
            raise _Unusable(f"it holds {_describe(bad)}")
    except _Unusable as err:
        if owner:
            _move_aside(current, str(err))
        else:
            log.warning(f"the cached teacher file {current} is unusable ({err}); retraining")
        return None
    load_teacher(teacher, state, weights)
    return meta


def _remove_leftovers(cache_dir: Path, key: str) -> None:
    """Temporary files of this entry (held under its lock) come from a killed run."""
    for stale in sorted(cache_dir.glob(f".{key}.*.tmp")):
        stale.unlink(missing_ok=True)
        log.info(f"removed {stale}, left by a run killed while caching its teacher")


_CACHE_FIX = (
    "set LAYERKD_CACHE (the cache is $LAYERKD_CACHE/teachers) or teacher_cache_dir=<folder> "
    "to a writable folder"
)


def _cache_access(cache_dir: Path, weights: Path, meta_path: Path) -> bool:
    """Whether the cache can be written (``True``), or only read: a read-only cache that holds
    this teacher (``False``). Any other cache location is a :class:`ConfigError`."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = "is a file" if cache_dir.is_file() else err.strerror or type(err).__name__
        raise ConfigError(
            f"the teacher cache {cache_dir} cannot be used as a folder ({problem}: "
            f"{err.filename or cache_dir}); {_CACHE_FIX}"
        ) from err
    if os.access(cache_dir, os.W_OK | os.X_OK):
        return True
    if all(os.access(p, os.R_OK) for p in (weights, meta_path)):
        log.info(f"the teacher cache {cache_dir} is read-only: reading its teacher without a lock")
        return False
    raise ConfigError(
        f"the teacher cache {cache_dir} is not writable and holds no teacher for this run "
        f"({weights.name}); {_CACHE_FIX}"
    )


def train_teacher(
    cfg: DictConfig,
    datamodule: Any,
    teacher: nn.Module,
    root: Path,
    saved: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict:
    """Stage 1: train the teacher alone (``cfg.optimizer``, ``cfg.teacher_scheduler``), or load
    it from the cache, or (an empty cache) from ``saved``, the weights and metadata of the
    teacher a resumed student checkpoint holds (then cached again)."""
    cache_dir = Path(cfg.teacher_cache_dir)
    key = teacher_cache_key(cfg, data_fingerprint(datamodule))
    weights, meta_path = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    writable = _cache_access(cache_dir, weights, meta_path)
    built = _nonfinite(teacher.named_buffers())
    # Under strategy=ddp Lightning re-runs this script for the other ranks while rank 0 trains
    # inside the lock; they join that fit, so only rank 0 locks and writes the cache.
    rank: int = getattr(rank_zero_only, "rank", 0)
    owner = rank == 0 and writable  # a read-only cache is read without its lock
    lock = _locked(cache_dir / f"{key}.lock", weights) if owner else contextlib.nullcontext()
    with lock:
        if owner:
            _remove_leftovers(cache_dir, key)
        meta = _cached(teacher, weights, meta_path, built, owner=owner)
        if meta is not None:
            meta["cached"] = True
            log.info(f"teacher loaded from cache {weights}")
            return meta
        if saved is not None and saved[1].get("key") == key:
            load_teacher(teacher, saved[0], Path(str(cfg.ckpt_path)))
            log.info(
                f"the teacher cache holds no teacher {weights.name}: using the teacher the "
                "resumed checkpoint holds"
            )
            meta = {k: v for k, v in saved[1].items() if k not in ("cached", "restored")}
            if owner:
                with signals.deferred():  # the whole entry, then SIGTERM's stop
                    atomic_write(weights, lambda p: torch.save(teacher.state_dict(), p))
                    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
            return {**meta, "cached": False, "restored": "checkpoint"}
        if not writable:
            raise ConfigError(
                f"the teacher cache {cache_dir} is read-only and its entry {weights.name} is "
                f"unusable; {_CACHE_FIX}"
            )
        log.info(f"training the teacher for {cfg.teacher_epochs} epochs; caching it at {weights}")
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
        callbacks: list[Callback] = [history, TeacherKey(key)]
        trainer = build_trainer(cfg, cfg.teacher_epochs, root / "teacher", callbacks, False)
        resume = teacher_checkpoint(root / "teacher" / "checkpoints", key)
        if resume is not None:  # a teacher stage stopped part-way (preempted): go on
            log.info(f"resuming the teacher's training from {resume}")
        with signals.deferred():  # SIGTERM: Lightning stops the fit, nothing is cached
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        check_teacher(teacher, history, cfg, built)
        meta = {
            "key": key,
            "val_acc": history.last(),
            "history": history.epochs,
            "epochs": cfg.teacher_epochs,
        }
        if rank == 0:
            with signals.deferred():  # the whole entry, then SIGTERM's stop
                atomic_write(weights, lambda p: torch.save(teacher.state_dict(), p))
                atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
        meta["cached"] = False
        return meta
