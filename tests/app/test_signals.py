"""SIGTERM as clusters send it: the printed resume command works when pasted whatever the run
directory's name, and a storm of signals stops the run once, quietly, with the resume line
alone (status 143, never death by the signal, no traceback)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lightning_layerkd.app.signals import command, hydra_value
from tests.helpers.processes import FAST, TIMEOUT, launched, log_path, paste, tail

NAMES = [
    "outputs/2025-01-01/10-00-00-123456",  # plain: as it is
    "runs/é (1),x",  # non-ASCII, parentheses, a comma, a space
    "runs/it's [a]=b",  # a quote, brackets, '='
    "runs/${HOME} \\",  # an interpolation's syntax, a trailing backslash
    "runs/日本語",
]


@pytest.mark.parametrize("name", NAMES)
def test_the_printed_command_parses_back_to_the_run_directory(tmp_path: Path, name: str) -> None:
    """The shell splits the printed command into words; Hydra parses the ``hydra.run.dir``
    word; OmegaConf resolves its value: the directory itself comes out (it exited 2 for
    names that need quoting for Hydra)."""
    root = tmp_path / name
    words = shlex.split(command(["method=attention", "seed=1"], root, resume=True))
    assert words[:3] == ["layerkd-train", "method=attention", "seed=1"]
    assert words[-1] == "ckpt_path=last"
    override = OverridesParser.create().parse_override(words[3])
    assert override.key_or_group == "hydra.run.dir"
    assert OmegaConf.create({"dir": override.value()}).dir == str(root)
    assert (hydra_value(name) == name) is (name == NAMES[0])


def storm(pid: int, until: float) -> int:
    """SIGTERM to ``pid`` every millisecond while it lives (up to ``until``); how many."""
    sent = 0
    while time.monotonic() < until:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.001)
    return sent


@pytest.mark.slow
def test_a_storm_of_sigterms_stops_once_with_the_resume_line_alone_which_works_pasted(
    tmp_path: Path,
) -> None:
    """SIGTERM every millisecond from the moment the first checkpoint is being written, in a
    run directory whose name needs quoting for Hydra: status 143, no traceback, one stop line
    on a line of its own; pasted, that line's command resumes the run to its end."""
    cache, run_dir = tmp_path / "cache", tmp_path / "é (1),x"
    args = [*FAST, "epochs=3", "teacher_epochs=1", "milestones=[2]"]
    with launched(args, run_dir, cache) as proc:
        checkpoints = run_dir / "checkpoints"
        deadline = time.monotonic() + TIMEOUT
        while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, tail(run_dir)
            time.sleep(0.002)
        sent = storm(proc.pid, time.monotonic() + TIMEOUT)
        proc.wait(timeout=TIMEOUT)
    log = log_path(run_dir).read_text()
    assert sent > 10
    assert proc.returncode == 128 + signal.SIGTERM, tail(run_dir)  # never -15: by the signal
    assert "Traceback" not in log, tail(run_dir)
    lines = [line for line in log.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1, tail(run_dir)
    (line,) = lines
    marker = "layerkd-train: stopped by SIGTERM; "
    assert line.startswith(marker), tail(run_dir)  # alone on its line
    pasted = line.split(": ", 2)[2]
    assert pasted.startswith("layerkd-train ")
    done = paste(pasted, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["epoch"] for row in results["student"]["history"]] == [0, 1, 2]
