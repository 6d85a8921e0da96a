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
import re
import shlex
import signal
import sys
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
    """The first SIGTERM stops the run (at once, or as the critical section ends); repeated
    ones (a scheduler that keeps sending it) are recorded only, so the stop happens once."""
    first = not _state["received"]
    _state["received"] = True
    if first and _state["depth"] == 0:
        raise Preempted(f"stopped by signal {signal.Signals(signum).name}")


def install() -> None:
    """Handle SIGTERM in this process (the main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        _state["installed"] = True


def finish(message: str, status: int = EXIT_SIGTERM) -> None:
    """End the process with ``status`` after printing ``message`` on a line of its own: SIGTERM
    is ignored from here on (a storm of them can neither interrupt the message with a
    traceback nor kill the process by the signal while Python shuts down, which restores the
    default handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    sys.exit(status)


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
        job["search"] = search(hydra_cfg)
    _state["job"] = job


def search(hydra_cfg: Any) -> dict[str, Any] | None:
    """What continuing an Optuna search (``hparams_search=optuna``) takes, from its Hydra
    config: its storage, trials, the search's own overrides (less the searched parameters) and
    Hydra's; ``None`` for any other sweeper."""
    sweeper = hydra_cfg.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    searched = set(sweeper.get("params") or {})
    own = tuple(f"hydra.{key}=" for key in ("sweep.dir", "sweeper.n_trials", "sweeper.storage")) + (
        "hydra.sweeper.sampler.seed=",
    )
    return {
        "storage": sweeper.get("storage"),
        "seed": int((sweeper.get("sampler") or {}).get("seed") or 0),
        "n_trials": int(sweeper.n_trials),
        "sweep_dir": Path(str(hydra_cfg.sweep.dir)),
        "overrides": [
            str(o)
            for o in hydra_cfg.overrides.task
            if str(o).split("=", 1)[0].lstrip("+~") not in searched
            and not str(o).startswith("ckpt_path=")
        ],
        "hydra": [str(o) for o in hydra_cfg.overrides.hydra if not str(o).startswith(own)],
    }


def continue_search(info: dict[str, Any], done: int) -> list[str]:
    """How to continue an Optuna search stopped with ``done`` trials behind it: its remaining
    trials in a new sweep directory beside the old one, from the study's storage where it
    has one (its finished trials then inform the sampler), else as a new search (with another
    sampler seed, so that it does not propose the finished trials again)."""
    sweep_dir: Path = info["sweep_dir"]
    storage, left = info["storage"], max(info["n_trials"] - done, 1)
    target = sweep_dir.with_name(f"{sweep_dir.name}-continued")
    words = ["layerkd-train", *info["overrides"], *info["hydra"]]
    words += [f"hydra.sweep.dir={hydra_value(str(target))}", f"hydra.sweeper.n_trials={left}"]
    if storage:
        if str(storage).startswith("sqlite:///"):  # a relative file: the same from any folder
            storage = "sqlite:///" + str(Path(str(storage).removeprefix("sqlite:///")).resolve())
        words += [f"hydra.sweeper.storage={hydra_value(str(storage))}"]
        how = f"its study is in {storage}: continue it, its finished trials informing the sampler"
    else:
        words += [f"hydra.sweeper.sampler.seed={info['seed'] + done}"]
        how = (
            "its study was in memory (hydra.sweeper.storage=null): run its remaining trials as a "
            f"new search (its {done} finished trials stay in {sweep_dir}; layerkd-report "
            f"{sweep_dir.parent} reports both)"
        )
    return [
        f"layerkd-train: the Optuna search stopped after {done} of its {info['n_trials']} "
        f"trials; {how}, with: {' '.join(shlex.quote(w) for w in words)}"
    ]


def job_started() -> bool:
    """Whether a job of this process reached :func:`remember_job`."""
    return "job" in _state


#: Characters an unquoted Hydra override value may hold as they are.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_\-+./:@%~]+")


def hydra_value(value: str) -> str:
    """``value`` as a Hydra override value that parses back to itself: as it is when plain,
    else single-quoted (a quote escaped, backslashes before a quote, the end or ``${``
    doubled, ``${`` escaped), for paths with spaces, parentheses, commas or non-ASCII."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    out = re.sub(r"(\\+)(?='|$|\$\{)", lambda m: m.group(1) * 2, value)
    return "'" + out.replace("'", "\\'").replace("${", "\\${") + "'"


def command(overrides: list[str], root: Path, resume: bool) -> str:
    """The shell command that runs (``resume``: resumes) the job with ``overrides`` in the run
    directory ``root``: each word shell-quoted, the directory also quoted for Hydra, so that it
    works when pasted, whatever the directory's name."""
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    words = ["layerkd-train", *kept, f"hydra.run.dir={hydra_value(str(root))}"]
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


def stop_message(*, sweep: bool = True) -> str:
    """What happened and how to go on, for a run (or sweep) stopped by SIGTERM; without
    ``sweep``, for the job alone (a job of a parallel sweep, whose launcher lists the rest)."""
    job = _state.get("job")
    if job is None:
        return "layerkd-train: stopped by SIGTERM before a run started; rerun the same command"
    root: Path = job["root"]
    resume = (root / "checkpoints" / "last.ckpt").is_file()
    how = "resume with" if resume else "no epoch was checkpointed; rerun with"
    lines = [f"layerkd-train: stopped by SIGTERM; {how}: {command(job['overrides'], root, resume)}"]
    if sweep and job.get("search") is not None:
        lines += continue_search(job["search"], job["num"])
    elif sweep and "num" in job:
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
            lines += [f"  job {n}: {command(o, job['sweep_dir'] / str(n), False)}" for n, o in left]
    return "\n".join(lines)
