"""``hparams_search=optuna``: an Optuna search (hydra-optuna-sweeper) of map_weight, lr and the
layer-wise rule's power, maximising the student's best validation accuracy; ``layerkd-report``
lists the trials and the best one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_layerkd.app.report import main as report
from tests.helpers.app import TINY
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

LAYERKD_TRAIN = str(Path(sys.executable).parent / "layerkd-train")
SEARCHED = ("map_weight", "lr", "schedule.layerwise.power")


def searched(run: dict) -> tuple[float, float, float]:
    config = run["config"]
    return config["map_weight"], config["lr"], config["schedule"]["layerwise"]["power"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="needs hydra-optuna-sweeper (the sweeps extra)",
)
def test_a_three_trial_search_maximises_the_best_validation_accuracy_and_is_reported(
    tmp_path: Path, cache: Path, capsys
) -> None:
    sweep = tmp_path / "search"
    env = {**os.environ, "LAYERKD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(  # no -m: the preset sets Hydra's multirun mode
        [
            LAYERKD_TRAIN,
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "setup plugin alembic" not in result.stdout
    runs = [json.loads((sweep / str(n) / "results.json").read_text()) for n in range(3)]
    assert not (sweep / "3").exists()
    values = [searched(run) for run in runs]
    assert len(set(values)) == 3  # three different trials
    for map_weight, lr, power in values:
        assert 0.1 <= map_weight <= 10.0 and 0.005 <= lr <= 0.2 and -1.0 <= power <= 1.0
    assert len({run["sweep"]["id"] for run in runs}) == 1  # one sweep for the report
    assert all(run["method"] == "attention" for run in runs)  # TINY's
    assert all(run["schedule"] == "layerwise" for run in runs)  # set by the preset

    scores = [run["student"]["best_val_acc"] for run in runs]
    best = scores.index(max(scores))
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert found["best_value"] == max(scores)  # what main() returned, maximised
    assert [found["best_params"][k] for k in SEARCHED] == pytest.approx(list(values[best]))

    capsys.readouterr()
    report([str(sweep)])
    out = capsys.readouterr().out
    header = (
        "| Trial | map_weight | lr | schedule.layerwise.power | Best val acc (%) | Best epoch |"
    )
    assert "Search trials (3):\n" + header in out
    for n, (run, (map_weight, lr, power)) in enumerate(zip(runs, values, strict=True)):
        row = f"| {n} | {map_weight:.4g} | {lr:.4g} | {power:.4g} | "
        row += f"{100 * run['student']['best_val_acc']:.2f} | {run['student']['best_epoch']} |"
        assert row in out
    map_weight, lr, power = values[best]
    assert (
        f"Best: trial {best} (map_weight={map_weight:.4g}, lr={lr:.4g}, "
        f"schedule.layerwise.power={power:.4g}): best val acc {100 * scores[best]:.2f}%"
    ) in out
    assert (sweep / "trials.md").read_text().startswith(header)
    assert math.isfinite(scores[best])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="needs hydra-optuna-sweeper (the sweeps extra)",
)
def test_a_search_stopped_during_a_trial_says_how_to_continue_and_that_continues_it(
    tmp_path: Path,
) -> None:
    """SIGTERM during trial 1 of 3: status 143, no raw ``[Errno 2]`` (there is no
    multirun.yaml to list jobs from), and the exact command that runs the 2 trials to go in a
    new sweep directory (another sampler seed: the study was in memory); pasted, it does (was:
    the printed command started the whole search again, and rerunning exited 2)."""
    cache, sweep = tmp_path / "cache", tmp_path / "search"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", *FAST, "teacher_epochs=1"]
    args += ["epochs=3", "milestones=[2]", f"hydra.sweep.dir={sweep}"]
    args += ["+callbacks.pause._target_=tests.helpers.app.Pause", "+callbacks.pause.seconds=1"]
    with launched(args, tmp_path / "log", cache) as proc:
        wait_for(has_file(sweep / "1" / "checkpoints", "last.ckpt"), proc, tmp_path, "trial 1")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    log = log_path(tmp_path / "log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, tail(tmp_path / "log")
    assert "Errno" not in log and "Traceback" not in log
    (line,) = [ln for ln in log.splitlines() if "the Optuna search stopped after" in ln]
    assert line.startswith("layerkd-train: the Optuna search stopped after 1 of its 3 trials")
    pasted = line.split("with: ", 1)[1]
    words = shlex.split(pasted)
    continued = sweep.with_name(f"{sweep.name}-continued")
    assert f"hydra.sweep.dir={continued}" in words
    assert "hydra.sweeper.n_trials=2" in words and "hydra.sweeper.sampler.seed=1235" in words
    assert not any(w.startswith(("map_weight=", "lr=")) for w in words)  # the searched ones
    done = paste(pasted, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in continued.iterdir() if p.name.isdigit()) == ["0", "1"]
    assert all((continued / n / "results.json").is_file() for n in ("0", "1"))
    assert (sweep / "0" / "results.json").is_file()  # the first search's finished trial
