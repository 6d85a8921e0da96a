"""Sweeps as Hydra users run them: ``hydra/launcher=parallel`` (a process per job) runs jobs
side by side that share the cores and one cached teacher; the SLURM example launcher composes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from lightning_layerkd.app.sweeps import cpu_count, parallel_jobs, threads_per_job
from tests.helpers.app import TINY_ANY_METHOD

LAYERKD_TRAIN = str(Path(sys.executable).parent / "layerkd-train")
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
OURS = "hydra_plugins.layerkd_launcher.layerkd_launcher.LayerkdLauncher"
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def hydra_config(*overrides: str):
    with initialize_config_module(config_module="lightning_layerkd.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_parallel_jobs_share_the_cores() -> None:
    joblib = {"_target_": JOBLIB, "n_jobs": 2}
    assert parallel_jobs(joblib, 8) == 2 and threads_per_job(joblib, 8) == 4
    assert threads_per_job({**joblib, "n_jobs": 3}, 8) == 2  # 8 // 3
    assert threads_per_job({**joblib, "n_jobs": 4}, 2) == 1  # never 0
    assert parallel_jobs({**joblib, "n_jobs": -1}, 8) == 8  # joblib's count: one per core
    assert parallel_jobs({**joblib, "n_jobs": -2}, 8) == 7  # all cores but one
    basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    assert parallel_jobs(basic, 8) == 1 and threads_per_job(basic, 8) == 8
    assert 1 <= cpu_count() <= (os.cpu_count() or 1)


def test_the_parallel_launcher_is_layerkds_own_with_two_jobs() -> None:
    """``hydra/launcher=parallel``: the process-per-job launcher (registered with Hydra from
    ``hydra_plugins``), 2 jobs at a time; its jobs share the cores as joblib's do."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    launcher = hydra_config("hydra/launcher=parallel").hydra.launcher
    assert launcher._target_ == OURS and launcher.n_jobs == 2
    assert (
        hydra_config("hydra/launcher=parallel", "hydra.launcher.n_jobs=4").hydra.launcher.n_jobs
        == 4
    )
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert OURS in found
    assert parallel_jobs(launcher, 8) == 2 and threads_per_job(launcher, 8) == 4


def test_the_slurm_launcher_example_composes() -> None:
    """``hydra/launcher=slurm`` composes (as ``--cfg job`` does); with hydra-submitit-launcher
    installed its target is the plugin's SlurmLauncher."""
    cfg = hydra_config("hydra/launcher=slurm", "method=attention")
    launcher = cfg.hydra.launcher
    target = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher._target_ == target
    assert (launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node) == (1440, 8, 1)
    assert launcher.tasks_per_node == 1 and launcher.nodes == 1 and launcher.mem_gb == 32
    assert launcher._get_node("submitit_folder")._value() == "${hydra.sweep.dir}/.submitit/%j"
    assert cfg.method._target_ == "lightning_layerkd.methods.AttentionMaps"
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        from hydra.utils import get_class

        assert get_class(target).__name__ == "SlurmLauncher"


def _span(log: Path) -> tuple[datetime, datetime]:
    stamps = [STAMP.match(line) for line in log.read_text().splitlines()]
    times = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f") for m in stamps if m]
    return times[0], times[-1]


@pytest.mark.slow
def test_a_parallel_two_job_sweep_runs_both_jobs_at_once_with_one_teacher(
    tmp_path: Path, cache: Path
) -> None:
    sweep = tmp_path / "sweep"
    root = str(Path(__file__).resolve().parents[2])  # tests.helpers for the jobs' barrier
    env = {**os.environ, "LAYERKD_CACHE": str(cache), "PYTHONPATH": root}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(
        [
            LAYERKD_TRAIN,
            "-m",
            "hydra/launcher=parallel",
            "method=attention,jacobian",
            *TINY_ANY_METHOD,  # the sweep's methods
            f"hydra.sweep.dir={sweep}",
            "+callbacks.barrier._target_=tests.helpers.app.Barrier",
            f"+callbacks.barrier.folder={tmp_path / 'barrier'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((sweep / str(job) / "results.json").read_text()) for job in (0, 1)]
    assert [r["method"] for r in runs] == ["attention", "jacobian"]
    assert all(r["student"]["best_val_acc"] is not None for r in runs)
    assert sorted(r["teacher"]["cached"] for r in runs) == [False, True]  # trained once
    assert runs[0]["teacher"]["key"] == runs[1]["teacher"]["key"]
    logs = [sweep / str(job) / "train.log" for job in (0, 1)]
    threads = max(1, cpu_count() // 2)
    shared = f"2 parallel jobs share {cpu_count()} cores: {threads} torch thread(s) per job"
    assert all(log.read_text().count(shared) == 1 for log in logs)
    assert sum(log.read_text().count("training the teacher") for log in logs) == 1
    # both students passed the barrier: each waited for the other, so they ran side by side
    assert len(list((tmp_path / "barrier").iterdir())) == 2
    assert len(list(cache.rglob("*.pt"))) == 1
