"""SIGTERM, as a scheduler sends it on preemption or at a time limit: ``layerkd-train`` stops
with status 143 (128 + 15) and a line saying how to resume, never with status 0.

:func:`install` puts a SIGTERM handler in place for the whole process. Outside a critical
section it raises :class:`Preempted` at once (a ``BaseException``: nothing catches it on the
way up, and :func:`~lightning_layerkd.app.teacher.atomic_write` removes its temporary file).
Inside :func:`deferred` (a Lightning fit, the writes of a cache entry or of ``results.json``)
it only records the signal: Lightning's own handler, which it composes with ours during a fit,
stops the fit after the current batch (``SIGTERMException``, with ``last.ckpt`` still the last
complete epoch's), :class:`StopOnSigterm` catches a signal that came before Lightning's handler
was in place, and the end of a critical section raises :class:`Preempted`.

Under SLURM with ``auto_requeue`` Lightning's requeue signal (``SIGUSR1``) is untouched.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The exit status of a run stopped by SIGTERM, as schedulers and shells expect.
EXIT_SIGTERM = 128 + signal.SIGTERM


class Preempted(BaseException):
    """The run was stopped by SIGTERM (outside a Lightning fit)."""


_state: dict[str, Any] = {"received": False, "depth": 0, "installed": False}


def _handler(signum: int, frame: FrameType | None) -> None:
    _state["received"] = True
    if _state["depth"] == 0:
        raise Preempted(f"stopped by signal {signal.Signals(signum).name}")


def install() -> None:
    """Handle SIGTERM in this process (the main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        _state["installed"] = True


def received() -> bool:
    """Whether SIGTERM has arrived since :func:`install`."""
    return bool(_state["received"])


def stopped(err: BaseException) -> bool:
    """Whether ``err`` is a stop by SIGTERM (ours or Lightning's)."""
    return isinstance(err, (Preempted, SIGTERMException))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A critical section: SIGTERM is recorded, and :class:`Preempted` raised once it ends
    (unless it ends with an exception already)."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["received"] and _state["installed"]:
        raise Preempted("stopped by signal SIGTERM")


class StopOnSigterm(Callback):
    """Stops a fit at the next batch boundary when SIGTERM came before Lightning's own handler
    was in place (while the ``Trainer`` was built or the fit set up)."""

    def _check(self, trainer: pl.Trainer) -> None:
        if received() and not trainer.received_sigterm:
            raise SIGTERMException

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)


# ---------------------------------------------------------------------- what to say
def remember_job(root: Path) -> None:
    """Record the job now running (its run directory and overrides) for :func:`stop_message`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra
        return
    job: dict[str, Any] = {"root": root, "overrides": [str(o) for o in hydra_cfg.overrides.task]}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        job["num"], job["sweep_dir"] = int(hydra_cfg.job.num), Path(hydra_cfg.sweep.dir)
    _state["job"] = job


def job_started() -> bool:
    """Whether a job of this process reached :func:`remember_job`."""
    return "job" in _state


def _command(overrides: list[str], root: Path, resume: bool) -> str:
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    words = ["layerkd-train", *kept, f"hydra.run.dir={root}"]
    words += ["ckpt_path=last"] if resume else []
    return " ".join(shlex.quote(w) for w in words)


def sweep_jobs(sweep_dir: Path) -> list[list[str]]:
    """The overrides of every job of the sweep in ``sweep_dir`` (its ``multirun.yaml``), in the
    basic sweeper's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    params = saved.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += [str(o) for o in saved.hydra.overrides.task]
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def stop_message() -> str:
    """What happened and how to go on, for a run (or sweep) stopped by SIGTERM."""
    job = _state.get("job")
    if job is None:
        return "layerkd-train: stopped by SIGTERM before a run started; rerun the same command"
    root: Path = job["root"]
    resume = (root / "checkpoints" / "last.ckpt").is_file()
    how = "resume with" if resume else "no epoch was checkpointed; rerun with"
    command = _command(job["overrides"], root, resume)
    lines = [f"layerkd-train: stopped by SIGTERM; {how}: {command}"]
    if "num" in job:
        try:
            jobs = sweep_jobs(job["sweep_dir"])
        except Exception as err:  # noqa: BLE001 - the sweep's jobs are a courtesy here
            lines.append(f"layerkd-train: the sweep's other jobs could not be listed ({err})")
            jobs = []
        left = list(enumerate(jobs))[job["num"] + 1 :]
        if left:
            lines.append(
                f"layerkd-train: the sweep stopped at job {job['num']}; {len(left)} of its "
                f"{len(jobs)} jobs did not run:"
            )
            lines += [
                f"  job {n}: {_command(o, job['sweep_dir'] / str(n), False)}" for n, o in left
            ]
    return "\n".join(lines)
