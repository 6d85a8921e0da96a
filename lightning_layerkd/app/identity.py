"""A resumed run is the same run: the student's checkpoints record the run's identity (every
setting that changes its training: the method and its options, the models, the dataset and its
data, the optimizer, schedule, epochs, seed, trainer and batch limits), and a resume whose
command differs is refused with the differences listed.

Left out of the identity, as they change no result: where things are written (``output_dir``,
``ckpt_path``, ``teacher_cache_dir``, the dataset's ``data_dir``; the data's content is in), the
callbacks and the logger, and the trainer's display options.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from . import ConfigError
from .cache_key import data_fingerprint
from .logs import get_logger
from .safe_files import UnreadableFileError, UnsafeFileError, load_tensors, verify_checksum

log = get_logger(__name__)

#: Top-level keys that change no result.
VOLATILE = ("ckpt_path", "output_dir", "teacher_cache_dir", "callbacks", "logger")
#: Keys inside groups that change no result.
VOLATILE_IN = {
    "dataset": ("data_dir", "num_workers"),
    "trainer": ("enable_progress_bar", "enable_model_summary", "log_every_n_steps"),
}


def run_identity(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The settings that make this run what it is (resolved, JSON-plain)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    for key in VOLATILE:
        config.pop(key, None)
    for group, keys in VOLATILE_IN.items():
        for key in keys:
            (config.get(group) or {}).pop(key, None)
    plain = json.loads(json.dumps(config, default=str))
    return {"config": plain, "data": data_fingerprint(datamodule)}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: <saved> -> <now>`` for every setting that differs."""
    old, new = _flat(saved), _flat(now)

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(not set)"

    return [
        f"{key.removeprefix('config.')}: {shown(old, key)} -> {shown(new, key)}"
        for key in sorted(set(old) | set(new))
        if key not in old or key not in new or old[key] != new[key]
    ]


def _way_out(path: Path) -> str:
    """How to go on from a damaged checkpoint ``path``."""
    epochs = sorted(path.parent.glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime)
    if epochs and path.name == "last.ckpt":
        return (
            f"copy the newest epoch checkpoint over it (cp {shlex.quote(str(epochs[-1]))} "
            f"{shlex.quote(str(path))}) and resume again"
        )
    return "resume from another checkpoint, or start a new run in another hydra.run.dir"


class RunIdentity(Callback):
    """Writes the run's identity into the student's checkpoints; :meth:`check` refuses to
    resume from a checkpoint of another run, or one that is not a student checkpoint."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity
        #: the teacher's metadata (as cached), kept in the checkpoints with its weights
        self.teacher: dict[str, Any] = {}
        #: the teacher a checked checkpoint holds: its state dict and metadata
        self.saved_teacher: tuple[dict[str, Any], dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "teacher": self.teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # checked by check() before anything trains

    def check(self, ckpt_path: str | None) -> None:
        """Raise :class:`ConfigError` unless ``ckpt_path`` (if any) is a readable student
        checkpoint of this same run."""
        if ckpt_path is None:
            return
        path = Path(ckpt_path)
        try:
            saved = load_tensors(path)  # tensors and plain values only: nothing runs
        except UnsafeFileError as err:
            raise ConfigError(
                f"ckpt_path: {err}; a layerkd-train checkpoint holds only tensors and plain "
                "values: pass the student's <run dir>/checkpoints/last.ckpt or one of its "
                "epoch=*.ckpt files"
            ) from err
        except Exception as err:  # noqa: BLE001 - any failure to read is the same mistake
            kind = "" if isinstance(err, UnreadableFileError) else f"{type(err).__name__}: "
            detail = f"{kind}{err}"
            raise ConfigError(
                f"ckpt_path: the checkpoint {path} cannot be read, it is truncated or damaged "
                f"({detail}); {_way_out(path)}"
            ) from err
        intact = verify_checksum(saved if isinstance(saved, dict) else {})
        if intact is False:
            raise ConfigError(
                f"ckpt_path: the checkpoint {path} is damaged: its content does not match the "
                f"checksum it was written with (bytes changed on disk); {_way_out(path)}"
            )
        states = saved.get("callbacks", {}) if isinstance(saved, dict) else {}
        if not any(str(key).endswith("StudentHistory") for key in states):
            raise ConfigError(
                f"ckpt_path: {path} is not a checkpoint of a layerkd-train student (a teacher's, "
                "or another program's): pass the student's <run dir>/checkpoints/last.ckpt or "
                "one of its epoch=*.ckpt files"
            )
        if intact is None:
            log.warning(f"{path} records no checksum (an older version wrote it); resuming")
        recorded = next(
            (state for key, state in states.items() if str(key).endswith("RunIdentity")), None
        )
        if recorded is None:
            log.warning(f"{path} records no run identity (an older version wrote it); resuming")
            return
        found = differences(recorded["identity"], self.identity)
        weights = saved.get("state_dict") or {}
        state = {k.removeprefix("teacher."): v for k, v in weights.items() if k[:8] == "teacher."}
        if state and recorded.get("teacher"):
            self.saved_teacher = (state, dict(recorded["teacher"]))
        if found:
            lines = "\n".join(f"  {line}" for line in found)
            raise ConfigError(
                f"ckpt_path: {path} was written by a run with other settings; a resume must be "
                "the same command (the run's .hydra/overrides.yaml lists its overrides), or "
                "start a new run in another hydra.run.dir. Differences (checkpoint -> this "
                f"command):\n{lines}"
            )
