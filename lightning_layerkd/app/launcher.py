"""``hydra/launcher=parallel``: sweep jobs side by side, each in a process of its own, that
stop and fail as the basic launcher's do.

Each job runs Hydra's ``run_job`` in a fresh (spawned) process, as a job of the sweep (its
number, directory and overrides as under any launcher), ``n_jobs`` at a time. Unlike a worker
pool, one job's end touches no other: a job that fails (a diverged loss, status 1) or is killed
by the system (an out-of-memory kill) is reported while the jobs in flight finish and write
their results; the sweep then exits with status 1 (2 when a job found a configuration mistake)
and names each job that did not finish with the command that reruns or resumes it. SIGTERM to
the sweep is passed on to the running jobs, which stop after their current batch (each with
``last.ckpt`` the last complete epoch's); the sweep exits with status 143 and lists every job
that did not finish with its resume command.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict
from omegaconf.basecontainer import BaseContainer

from . import signals

#: Seconds between two looks at the running jobs.
POLL_S = 0.1


class SweepEnded(BaseException):
    """A sweep that did not end with every job's results: ``status`` is the process's exit
    status (1, 2 or 143), ``message`` what happened and how to go on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Job:
    """One job of the sweep: its number, overrides and directory, and how it went."""

    num: int
    overrides: list[str]
    folder: Path
    process: Any = None
    connection: Any = None
    result: JobReturn | None = None  # a job that ended well: what it returned
    exitcode: int | None = None


def _task(reference: tuple[str, str]) -> Callable[[DictConfig], Any]:
    """The task function from its module and name (the function ``hydra.main`` wraps)."""
    module, name = reference
    function = getattr(importlib.import_module(module), name)
    return getattr(function, "__wrapped__", function)


def _job_process(
    connection: Any,
    num: int,
    overrides: list[str],
    context: HydraContext,
    config: DictConfig,
    task: tuple[str, str],
    singletons: dict[Any, Any],
) -> None:
    """One sweep job in its own process: its return (or failure) goes back through
    ``connection``; the exit status says how it ended (0, 1, 2, or 143 with its resume line)."""
    signals.install()
    try:
        task_function = _task(task)  # imports the app: its resolvers, with OmegaConf's own
        importlib.import_module("lightning_layerkd.conf")
        Singleton.set_state({**singletons, "omegaconf_resolvers": BaseContainer._resolvers})
        setup_globals()
        sweep_config = context.config_loader.load_sweep_config(config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
            sweep_config.hydra.job.num = num
        HydraConfig.instance().set_config(sweep_config)
        ret = run_job(
            hydra_context=context,
            config=sweep_config,
            task_function=task_function,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        failed = ret.status == JobStatus.FAILED
        if not failed:  # what the sweeper reads (Optuna: the value it maximises)
            connection.send(ret.return_value)
        else:
            traceback.print_exception(ret._return_value)  # a bug: its traceback
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)
    except BaseException as err:  # noqa: BLE001 - a job's end, reported by its status
        if signals.stopped(err):  # Lightning's SIGTERMException is a SystemExit
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once, quietly
            sys.stdout.flush()
            sys.stderr.write(f"{signals.stop_message(sweep=False)}\n")
            code = signals.EXIT_SIGTERM
        elif isinstance(err, SystemExit):  # the job's own status (2: a mistake, 1: a failure)
            code = err.code if isinstance(err.code, int) else 1
        else:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ProcessLauncher(Launcher):
    """Runs a sweep's jobs ``n_jobs`` at a time, each in its own process (see the module)."""

    def __init__(self, n_jobs: int = 2) -> None:
        if int(n_jobs) < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be at least 1, got {n_jobs}")
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.context: HydraContext | None = None
        self.task: tuple[str, str] | None = None

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: Callable[[DictConfig], Any],
        config: DictConfig,
    ) -> None:
        self.config, self.context = config, hydra_context
        self.task = (task_function.__module__, task_function.__name__)

    def _folder(self, num: int) -> Path:
        """Job ``num``'s directory (``hydra.sweep.subdir`` is the job number in conf/)."""
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir)) / str(num)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.context is not None and self.task is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [
            _Job(
                initial_job_idx + i, [str(o) for o in overrides], self._folder(initial_job_idx + i)
            )
            for i, overrides in enumerate(job_overrides)
        ]
        stopped = False
        try:
            self._run(jobs)
        except signals.Preempted:
            stopped = True
            self._stop(jobs)
        return self._outcome(jobs, stopped)

    # ------------------------------------------------------------------ running
    def _start(self, job: _Job) -> None:
        assert self.config is not None and self.context is not None and self.task is not None
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        args = (send, job.num, job.overrides, self.context, self.config, self.task)
        state = {"instances": Singleton.get_state()["instances"]}  # resolvers: the job's own
        job.process = context.Process(target=_job_process, args=(*args, state))
        job.process.start()
        send.close()
        job.connection = receive

    @staticmethod
    def _collect(job: _Job) -> bool:
        """Take what ``job`` sent; whether it has ended."""
        with contextlib.suppress(EOFError, OSError):
            while job.connection.poll():
                job.result = _returned(job, job.connection.recv())
        if job.process.is_alive():
            return False
        job.process.join()
        with contextlib.suppress(EOFError, OSError):
            while job.connection.poll():
                job.result = _returned(job, job.connection.recv())
        job.exitcode = job.process.exitcode
        job.connection.close()
        return True

    def _run(self, jobs: list[_Job]) -> None:
        waiting, running = list(jobs), list[_Job]()
        while waiting or running:
            while waiting and len(running) < self.n_jobs:
                job = waiting.pop(0)
                self._start(job)
                running.append(job)
            running = [job for job in running if not self._collect(job)]
            if running:
                time.sleep(POLL_S)

    def _stop(self, jobs: list[_Job]) -> None:
        """Pass SIGTERM on to the running jobs and wait for them to stop."""
        running = [j for j in jobs if j.process is not None and j.exitcode is None]
        for job in running:  # stopped as it was being started: it never ran
            if job.process.pid is None:
                job.process = None
        running = [j for j in running if j.process is not None]
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.process.pid, signal.SIGTERM)
        while running:
            running = [job for job in running if not self._collect(job)]
            if running:
                time.sleep(POLL_S)

    # ------------------------------------------------------------------ the outcome
    def _outcome(self, jobs: list[_Job], stopped: bool) -> list[JobReturn]:
        finished = [j for j in jobs if j.exitcode == 0 and j.result is not None]
        unfinished = [j for j in jobs if j not in finished]
        if not unfinished:
            return [j.result for j in jobs if j.result is not None]
        codes = {j.exitcode for j in unfinished}
        lines = [f"  job {j.num} ({_how(j)}): {_command(j)}" for j in unfinished]
        total = len(jobs)
        if stopped or signals.EXIT_SIGTERM in codes:
            head = (
                f"layerkd-train: stopped by SIGTERM; {len(unfinished)} of the sweep's {total} "
                "jobs did not finish (the others' results are kept); resume or run each with:"
            )
            assert self.config is not None
            search = signals.search(self.config.hydra)  # an Optuna search: how to go on
            more = signals.continue_search(search, unfinished[0].num) if search else []
            raise SweepEnded(signals.EXIT_SIGTERM, "\n".join([head, *lines, *more]))
        status = 2 if 2 in codes else 1
        what = "a configuration mistake" if status == 2 else "a failure"
        head = (
            f"layerkd-train: {len(unfinished)} of the sweep's {total} jobs did not finish "
            f"({what}: each job's message is above and in its train.log); the others' results "
            "are kept. Rerun or resume each with:"
        )
        raise SweepEnded(status, "\n".join([head, *lines]))


def _returned(job: _Job, value: Any) -> JobReturn:
    """The :class:`JobReturn` of ``job``, which returned ``value``."""
    ret = JobReturn(overrides=job.overrides, working_dir=str(job.folder))
    ret.return_value, ret.status = value, JobStatus.COMPLETED
    return ret


def _how(job: _Job) -> str:
    code = job.exitcode
    if code is None:
        return "not started"
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (the system: out of memory?)" if name == "SIGKILL" else "")
    return {
        0: "no result",
        1: "failed, status 1",
        2: "configuration mistake, status 2",
        signals.EXIT_SIGTERM: "stopped by SIGTERM",
    }.get(code, f"status {code}")


def _command(job: _Job) -> str:
    resume = (job.folder / "checkpoints" / "last.ckpt").is_file()
    return signals.command(job.overrides, job.folder, resume)
