"""Sweep jobs that run side by side (``hydra/launcher=parallel``, or ``joblib``) share the cores.

Each of ``n`` parallel jobs would otherwise start as many torch threads as the machine has
cores, so that ``n`` jobs oversubscribe them ``n`` times over. :func:`share_cores` gives each job
``max(1, cores // n)`` threads, ``n`` read from the launcher's config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from .logs import get_logger

log = get_logger(__name__)


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, which ``taskset`` and most
    schedulers set), or all of them where the mask is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_jobs(launcher: Mapping[str, Any], cores: int) -> int:
    """How many jobs ``launcher`` (``hydra.launcher``) runs at once on ``cores`` cores: joblib's
    ``n_jobs`` and the parallel launcher's (``-1``: one per core, ``-2``: all but one, as joblib
    counts), 1 for a launcher
    that runs one job at a time on this machine (basic, or a cluster's, whose jobs get their own
    cores)."""
    target = str(launcher.get("_target_", ""))
    if not any(name in target for name in ("JoblibLauncher", "LayerkdLauncher")):
        return 1
    n = int(launcher.get("n_jobs") or 1)
    return max(1, cores + 1 + n if n < 0 else n)


def threads_per_job(launcher: Mapping[str, Any], cores: int) -> int:
    """``max(1, cores // jobs)``: the torch threads of each of the launcher's parallel jobs."""
    return max(1, cores // parallel_jobs(launcher, cores))


def share_cores() -> int | None:
    """In a sweep whose launcher runs jobs side by side, set this job's torch threads so that
    the jobs share the cores, log it and return the number; ``None`` (nothing changed) outside
    such a sweep."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    cores = cpu_count()
    jobs = parallel_jobs(hydra_cfg.launcher, cores)
    if jobs == 1:
        return None
    threads = threads_per_job(hydra_cfg.launcher, cores)
    torch.set_num_threads(threads)
    log.info(f"{jobs} parallel jobs share {cores} cores: {threads} torch thread(s) per job")
    return threads
