"""``hydra/launcher=parallel`` stops and fails like the basic launcher: SIGTERM exits 143 with
each unfinished job's resume command (which works), a diverged job or one killed by the system
exits 1 while the other jobs in flight finish and keep their results, and 2 is left to
configuration mistakes. Real processes, real signals."""

from __future__ import annotations

import json
import shlex
import signal

import pytest

from tests.helpers.processes import (
    FAST,
    TIMEOUT,
    has_file,
    launched,
    log_path,
    paste,
    tail,
    wait_for,
)

PARALLEL = ["-m", "hydra/launcher=parallel", *FAST, "teacher_epochs=1"]


def job_lines(log: str) -> dict[str, str]:
    """``job N`` -> its command, from the sweep's closing message."""
    found = {}
    for line in log.splitlines():
        if line.startswith("  job "):
            head, command = line[2:].split(": ", 1)
            found[head.split(" (")[0]] = command
    return found


@pytest.mark.slow
def test_sigterm_stops_a_parallel_sweep_with_143_and_each_jobs_resume_command(tmp_path):
    """SIGTERM to the sweep (as ``kill <pid>``) after both jobs checkpointed an epoch: status
    143 (it said "stopped before a run started", and rerunning exited 2), each job named with
    a command that, pasted, resumes it to its end."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    args = [*PARALLEL, "epochs=4", "milestones=[2]", "map_weight=0.5,1.0"]
    args += ["+callbacks.pause._target_=tests.helpers.app.Pause", "+callbacks.pause.seconds=1"]
    with launched([*args, f"hydra.sweep.dir={sweep}"], tmp_path / "log", cache) as proc:
        for job in ("0", "1"):
            wait_for(has_file(sweep / job / "checkpoints", "last.ckpt"), proc, tmp_path, job)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    log = log_path(tmp_path / "log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, tail(tmp_path / "log")
    assert "before a run started" not in log
    assert "layerkd-train: stopped by SIGTERM; 2 of the sweep's 2 jobs did not finish" in log
    commands = job_lines(log)
    assert sorted(commands) == ["job 0", "job 1"]
    for job, command in commands.items():
        folder = sweep / job.split()[1]
        assert command.endswith(f"hydra.run.dir={folder} ckpt_path=last")
        assert not (folder / "results.json").exists()
        done = paste(command, cache)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((folder / "results.json").read_text())
        assert [row["epoch"] for row in results["student"]["history"]] == [0, 1, 2, 3]
        assert results["sweep"]["dir"] == str(sweep)  # still a job of its sweep


@pytest.mark.slow
@pytest.mark.parametrize("how", ["diverged", "killed"])
def test_a_failed_parallel_job_exits_1_and_the_others_keep_their_results(tmp_path, how):
    """One job diverges (its learning rate far too high: status 1) or is killed by the system
    (SIGKILL, as an out-of-memory kill): the sweep exits 1, not 2; the job beside it finishes
    and writes its results; the failed job is named with the command that reruns it."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    if how == "diverged":
        grid = ["epochs=2", "milestones=[1]", "lr=0.05,1e30"]
    else:
        grid = ["epochs=2", "milestones=[1]", "+callbacks.oom._target_=tests.helpers.app.SigkillAt"]
        grid += ["+callbacks.oom.epoch=1,99"]
    with launched([*PARALLEL, *grid, f"hydra.sweep.dir={sweep}"], tmp_path / "log", cache) as p:
        p.wait(timeout=TIMEOUT)
    log = log_path(tmp_path / "log").read_text()
    assert p.returncode == 1, tail(tmp_path / "log")
    assert "layerkd-train: 1 of the sweep's 2 jobs did not finish (a failure" in log
    failed, ok = ("1", "0") if how == "diverged" else ("0", "1")  # the grid's order
    healthy = json.loads((sweep / ok / "results.json").read_text())
    assert [row["epoch"] for row in healthy["student"]["history"]] == [0, 1]
    assert not (sweep / failed / "results.json").exists()
    (line,) = [ln for ln in log.splitlines() if ln.startswith(f"  job {failed} (")]
    reason = "failed, status 1" if how == "diverged" else "killed by SIGKILL"
    assert line.startswith(f"  job {failed} ({reason}")
    words = shlex.split(line.split("): ", 1)[1])
    assert words[0] == "layerkd-train" and f"hydra.run.dir={sweep / failed}" in words
    if how == "diverged":
        assert "layerkd-train: the training loss is nan at epoch 0" in log  # the job's own
    else:  # it had checkpointed epoch 0: the command resumes it
        assert words[-1] == "ckpt_path=last"


@pytest.mark.slow
def test_a_configuration_mistake_in_a_parallel_job_exits_2(tmp_path):
    """A job whose settings are a mistake (here: map_weight=-1) exits 2 as under the basic
    launcher; the other job still finishes."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    args = [*PARALLEL, "epochs=1", "milestones=[1]", "map_weight=1.0,-1"]
    args.append(f"hydra.sweep.dir={sweep}")
    with launched(args, tmp_path / "log", cache) as proc:
        proc.wait(timeout=TIMEOUT)
    log = log_path(tmp_path / "log").read_text()
    assert proc.returncode == 2, tail(tmp_path / "log")
    assert "layerkd-train: error: map_weight must be finite and non-negative, got -1" in log
    assert "(a configuration mistake" in log
    assert (sweep / "0" / "results.json").is_file()
