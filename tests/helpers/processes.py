"""``layerkd-train`` as a real process: started in its own session (so that no process
outlives a test), its output in ``<run dir>.log``, waited for, signalled and killed."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightning_layerkd.app.signals import hydra_value
from tests.helpers.app import TINY

LAYERKD_TRAIN = str(Path(sys.executable).parent / "layerkd-train")
# tests/test_app.py's TINY, with the epochs set per test
FAST = [o for o in TINY if not o.startswith(("epochs=", "teacher_epochs="))]
TIMEOUT = 240  # seconds for one run; a run takes about 10 s to start, 1 s per epoch


@contextlib.contextmanager
def launched(args: list[str], run_dir: Path, cache: Path) -> Iterator[subprocess.Popen]:
    """``layerkd-train args`` in a new session writing ``<run_dir>.log``; on leaving, its
    process group is killed if it still runs."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LAYERKD_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # tests.helpers' callbacks
    env["OMP_NUM_THREADS"] = "1"  # tiny networks; two jobs share the cores
    with open(log_path(run_dir), "w") as log:
        proc = subprocess.Popen(
            [LAYERKD_TRAIN, *args, f"hydra.run.dir={hydra_value(str(run_dir))}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                kill_group(proc)


def log_path(run_dir: Path) -> Path:
    return run_dir.with_name(f"{run_dir.name}.log")


def tail(run_dir: Path, lines: int = 40) -> str:
    return "\n".join(log_path(run_dir).read_text().splitlines()[-lines:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` and check that none of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"processes of group {proc.pid} survived SIGKILL")


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen, run_dir: Path, what: str
) -> float:
    """Poll ``condition`` while the job runs; returns the seconds waited."""
    start = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"layerkd-train ended ({proc.returncode}) before {what}:\n{tail(run_dir)}")
        if time.monotonic() - start > TIMEOUT:
            pytest.fail(f"no {what} after {TIMEOUT} s:\n{tail(run_dir)}")
        time.sleep(0.02)
    return time.monotonic() - start


def complete(args: list[str], run_dir: Path, cache: Path) -> dict:
    """Run ``layerkd-train args`` to the end; returns its results.json."""
    with launched(args, run_dir, cache) as proc:
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, tail(run_dir)
    return json.loads((run_dir / "results.json").read_text())


def has_file(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(folder.glob(pattern))


def stop_lines(run_dir: Path) -> list[str]:
    return [line for line in log_path(run_dir).read_text().splitlines() if "layerkd-train:" in line]


def hinted(line: str, marker: str) -> list[str]:
    """The overrides of the command a stop message gives after ``marker``, less
    ``hydra.run.dir`` (which :func:`launched` sets)."""
    words = shlex.split(line.split(marker, 1)[1])
    assert words[0] == "layerkd-train"
    return [w for w in words[1:] if not w.startswith("hydra.run.dir=")]


def no_temporary_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*.tmp")]


def paste(command: str, cache: Path) -> subprocess.CompletedProcess:
    """Run a printed command as a user pastes it into a shell (this environment's
    ``layerkd-train`` first on the PATH)."""
    env = {**os.environ, "LAYERKD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(LAYERKD_TRAIN).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env)
