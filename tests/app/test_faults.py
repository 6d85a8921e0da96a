"""``layerkd-train`` killed with SIGKILL at any point leaves the teacher cache sound: no entry
half-written, the lock free, the cached teacher intact, and the same command completes when
rerun. Two jobs that need one teacher train it once; the second says whom it waits for.

Each test starts the console script in its own session and kills the whole process group, so
no process outlives a test, also when it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
from collections.abc import Callable

import pytest
import torch

from tests.helpers.processes import (
    FAST,
    TIMEOUT,
    complete,
    has_file,
    hinted,
    kill_group,
    launched,
    log_path,
    no_temporary_files,
    paste,
    stop_lines,
    tail,
    wait_for,
)


@pytest.mark.slow
def test_a_run_killed_while_the_teacher_trains_leaves_no_entry_and_a_free_lock(tmp_path):
    cache, killed = tmp_path / "cache", tmp_path / "killed"
    teachers = cache / "teachers"
    args = [*FAST, "epochs=1", "teacher_epochs=6"]  # six teacher epochs: time to kill one
    with launched(args, killed, cache) as proc:
        wait_for(
            has_file(killed / "teacher" / "checkpoints", "*.ckpt"),
            proc,
            killed,
            "teacher checkpoint (its first epoch)",
        )
        (lock,) = teachers.glob("*.lock")
        assert lock.read_text().strip() == str(proc.pid)  # it holds the lock, and says so
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    # nothing half-written, no temporary file: the lock file is all there is
    assert [p.name for p in teachers.iterdir()] == [lock.name]
    with open(lock) as handle:  # the kernel freed the killed job's lock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    results = complete(args, tmp_path / "rerun", cache)
    assert results["teacher"]["cached"] is False and results["teacher"]["val_acc"] is not None
    assert "waiting for the teacher" not in log_path(tmp_path / "rerun").read_text()
    assert sorted(p.suffix for p in teachers.iterdir()) == [".json", ".lock", ".pt"]


@pytest.mark.slow
def test_a_run_killed_while_the_student_trains_keeps_the_cached_teacher(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    teachers = cache / "teachers"
    args = [*FAST, "epochs=4", "teacher_epochs=1"]  # four student epochs: time to kill one
    with launched(args, run_dir, cache) as proc:
        wait_for(
            has_file(run_dir / "checkpoints", "epoch=*.ckpt"),
            proc,
            run_dir,
            "student checkpoint (its first epoch)",
        )
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    (weights,) = teachers.glob("*.pt")
    meta = json.loads(weights.with_suffix(".json").read_text())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert meta["val_acc"] is not None
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    # The same command in a new folder: the killed run's folder may already hold last.ckpt
    # (written right after the epoch checkpoint), which the app refuses to overwrite without
    # ckpt_path=last; whether it does depends on when the kill lands.
    rerun = tmp_path / "rerun"
    results = complete(args, rerun, cache)
    assert results["teacher"]["cached"] is True and results["teacher"]["key"] == meta["key"]
    assert f"teacher loaded from cache {weights}" in log_path(rerun).read_text()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert [row["epoch"] for row in results["student"]["history"]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_jobs_needing_one_teacher_train_it_once_and_the_second_says_whom_it_waits_for(
    tmp_path,
):
    """The first job takes the lock and is frozen (SIGSTOP) while it holds it; the second names
    it and the teacher's weights, waits, and once the first has cached the teacher, loads it."""
    cache, first_dir, second_dir = tmp_path / "cache", tmp_path / "first", tmp_path / "second"
    teachers = cache / "teachers"
    args = [*FAST, "epochs=1", "teacher_epochs=2"]

    def lock_held_by(pid: int) -> Callable[[], bool]:
        return lambda: any(p.read_text().strip() == str(pid) for p in teachers.glob("*.lock"))

    with launched(args, first_dir, cache) as first:
        wait_for(lock_held_by(first.pid), first, first_dir, "teacher lock held")
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            with launched(args, second_dir, cache) as second:
                wait_for(
                    lambda: "waiting for the teacher" in log_path(second_dir).read_text(),
                    second,
                    second_dir,
                    "waiting message",
                )
                assert not list(teachers.glob("*.pt"))  # it waits: nothing to load yet
                os.killpg(first.pid, signal.SIGCONT)
                first.wait(timeout=TIMEOUT)
                second.wait(timeout=TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGCONT)
    assert first.returncode == 0, tail(first_dir)
    assert second.returncode == 0, tail(second_dir)
    (lock,) = teachers.glob("*.lock")
    weights = lock.with_suffix(".pt")
    log = log_path(second_dir).read_text()
    message = f"waiting for the teacher being trained by PID {first.pid} at {weights}"
    assert log.count(message) == 1 and log.count("waiting for the teacher") == 1
    assert log.index(message) < log.index(f"teacher loaded from cache {weights}")
    assert "waiting for the teacher" not in log_path(first_dir).read_text()
    cached = [
        json.loads((d / "results.json").read_text())["teacher"]["cached"]
        for d in (first_dir, second_dir)
    ]
    assert cached == [False, True]


# ---------------------------------------------------------------------- SIGTERM (preemption)


@pytest.mark.slow
def test_sigterm_while_the_student_trains_exits_143_and_the_resumed_run_is_the_straight_one(
    tmp_path,
):
    """SIGTERM (a scheduler's preemption) after the student's second epoch: status 143, the
    last complete epoch's last.ckpt, one line with the command that resumes; that command
    ends with exactly the results of a run never interrupted."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [*FAST, "epochs=4", "teacher_epochs=1", "milestones=[2]"]
    straight = complete(args, tmp_path / "straight", cache)  # also caches the teacher
    with launched(args, run_dir, cache) as proc:
        wait_for(has_file(run_dir / "checkpoints", "epoch=1-*.ckpt"), proc, run_dir, "epoch 1")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, tail(run_dir)
    assert not (run_dir / "results.json").exists() and not no_temporary_files(run_dir, cache)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] >= 1  # a complete checkpoint of the last finished epoch
    (line,) = stop_lines(run_dir)
    marker = "layerkd-train: stopped by SIGTERM; resume with: "
    assert line.startswith(marker) and line.endswith(f"hydra.run.dir={run_dir} ckpt_path=last")
    resumed = complete(hinted(line, marker), run_dir, cache)
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1, 2, 3]
    for key in ("student", "final_lrs", "eta", "layerwise", "layer_pairs"):
        assert resumed[key] == straight[key], key  # exactly: the same floats
    assert resumed["teacher"] == {**straight["teacher"], "cached": True}
    assert resumed["config"]["ckpt_path"] == "last"


@pytest.mark.slow
def test_sigterm_while_the_teacher_trains_exits_143_and_caches_nothing(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    teachers = cache / "teachers"
    args = [*FAST, "epochs=1", "teacher_epochs=6"]
    with launched(args, run_dir, cache) as proc:
        wait_for(
            has_file(run_dir / "teacher" / "checkpoints", "*.ckpt"), proc, run_dir, "teacher epoch"
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, tail(run_dir)
    (lock,) = teachers.glob("*.lock")
    assert [p.name for p in teachers.iterdir()] == [lock.name]  # no entry, no temporary file
    with open(lock) as handle:  # released
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not no_temporary_files(run_dir)
    (line,) = stop_lines(run_dir)
    assert line.startswith("layerkd-train: stopped by SIGTERM; no epoch was checkpointed; rerun")
    assert line.endswith(f"hydra.run.dir={run_dir}")
    # the printed command resumes the teacher from its last checkpoint instead of restarting
    (saved,) = (run_dir / "teacher" / "checkpoints").glob("*.ckpt")
    stopped_at = torch.load(saved, map_location="cpu", weights_only=True)["epoch"]
    assert 0 <= stopped_at < 5
    done = paste(line.split("rerun with: ", 1)[1], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming the teacher's training from {saved}" in (run_dir / "train.log").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["epoch"] for row in results["teacher"]["history"]] == list(range(6))
    assert len(list(teachers.glob("*.pt"))) == 1  # and cached


@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_143_and_names_the_jobs_that_did_not_run(tmp_path):
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    args = ["-m", *FAST, "epochs=6", "teacher_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    with launched(args, tmp_path / "log", cache) as proc:
        wait_for(has_file(sweep / "0" / "checkpoints", "epoch=0-*.ckpt"), proc, sweep, "epoch 0")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, tail(tmp_path / "log")
    lines = stop_lines(tmp_path / "log")
    assert lines[0].startswith("layerkd-train: stopped by SIGTERM; resume with: ")
    assert lines[0].endswith(f"seed=0 hydra.run.dir={sweep / '0'} ckpt_path=last")
    assert lines[1] == "layerkd-train: the sweep stopped at job 0; 1 of its 2 jobs did not run:"
    log = log_path(tmp_path / "log").read_text()
    (job,) = [line for line in log.splitlines() if line.startswith("  job ")]
    assert job.startswith("  job 1: layerkd-train ") and job.endswith(
        f" seed=1 hydra.run.dir={sweep / '1'}"
    )
    left = sorted(p.name for p in sweep.iterdir())
    assert left == [".layerkd.lock", "0", "multirun.yaml"]  # the sweep's lock, its one job
