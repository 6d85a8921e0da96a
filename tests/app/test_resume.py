"""``layerkd-train`` resumes a killed run: ``ckpt_path=last`` (or a ``.ckpt`` file) continues the
student's fit where its last checkpoint left it, with the same learning rates, batches and
results as a run that was never interrupted; a run directory that already holds a checkpoint is
never trained into afresh, and a missing checkpoint is a clear error."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_layerkd.app.train import ConfigError, run
from tests.helpers.app import THREE, TINY, Killed, config

KILL = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=2"]
REL = 1e-9


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal structures, floats within ``REL``."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=REL, abs=1e-12, nan_ok=True), where
    else:
        assert got == want, where


@pytest.mark.parametrize(
    "method", ["attention", "hessian", pytest.param("crd", marks=pytest.mark.slow)]
)
def test_killed_run_resumed_with_ckpt_path_last_matches_the_straight_run(
    tmp_path: Path, cache: Path, method: str
) -> None:
    """3 epochs straight, and 3 epochs killed as epoch 2 starts then resumed with
    ``ckpt_path=last`` in the same run directory (the teacher from the cache both times): the
    same learning rates, eta, factors and layer-wise history, the same validation accuracy of
    every epoch (results.json reports all three), and no ``last-v1.ckpt``. Hessian maps draw
    Hutchinson probes from torch's generator, whose state the resumed fit gets back too; CRD's
    heads and memory banks come back from the checkpoint, its shuffled batches carry sample
    indices, and its negatives are drawn from the step."""
    overrides = [*THREE, f"method={method}"]
    straight = run(config(*overrides), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        run(config(*overrides, *KILL), run_dir)
    assert checkpoints(run_dir) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert not (run_dir / "results.json").exists()

    resumed = run(config(*overrides, "ckpt_path=last"), run_dir)

    assert resumed["teacher"]["cached"] is True
    assert_same(resumed["final_lrs"], straight["final_lrs"], "final_lrs")
    assert_same(resumed["eta"], straight["eta"], "eta")
    assert_same(resumed["layerwise"], straight["layerwise"], "layerwise")
    assert [r["epoch"] for r in resumed["layerwise"]["history"]] == [0, 1, 2]
    assert_same(resumed["student"], straight["student"], "student")
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1, 2]
    assert resumed["student"]["val_acc"] == straight["student"]["val_acc"]
    assert all(f != pytest.approx(1.0) for f in straight["layerwise"]["factor"].values())
    assert checkpoints(run_dir) == checkpoints(tmp_path / "straight")  # no last-v1.ckpt
    written = json.loads((run_dir / "results.json").read_text())
    assert_same(written["final_lrs"], straight["final_lrs"], "results.json")

    # resuming a finished run trains nothing and reports the same
    again = run(config(*overrides, "ckpt_path=last"), run_dir)
    assert_same(again["student"], straight["student"], "again")
    assert_same(again["final_lrs"], straight["final_lrs"], "again")
    assert checkpoints(run_dir) == checkpoints(tmp_path / "straight")


def test_a_checkpoint_file_resumes_into_a_new_run_directory(tmp_path: Path, cache: Path) -> None:
    """``ckpt_path=<file>``: an epoch checkpoint of a killed run, resumed in another run
    directory, which gets its own checkpoints; with the teacher cache gone (another machine)
    the teacher is the one the checkpoint holds, not trained again, and cached anew. The
    result is the uninterrupted run's."""
    overrides = [*THREE, "epochs=2", "milestones=[1]"]
    straight = run(config(*overrides), tmp_path / "straight")
    kill = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=1"]
    with pytest.raises(Killed):
        run(config(*overrides, *kill), tmp_path / "killed")
    for entry in list(cache.rglob("*")):  # the teacher cache is gone: it is trained again
        if entry.is_file():
            entry.unlink()
    ckpt = tmp_path / "killed" / "checkpoints" / "epoch=0-step=3.ckpt"
    resumed = run(config(*overrides, f"ckpt_path='{ckpt}'"), tmp_path / "new")  # quoted: "="
    assert resumed["teacher"] == {**straight["teacher"], "restored": "checkpoint"}
    assert not (tmp_path / "new" / "teacher").exists()  # no teacher fit
    assert len(list(cache.rglob("*.pt"))) == 1  # cached anew from the checkpoint
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1]
    assert_same(resumed["student"], straight["student"], "student")
    assert_same(resumed["final_lrs"], straight["final_lrs"], "final_lrs")
    assert_same(resumed["layerwise"], straight["layerwise"], "layerwise")
    assert checkpoints(tmp_path / "new") == ["epoch=1-step=6.ckpt", "last.ckpt"]


def test_rerun_into_a_run_directory_with_a_checkpoint_is_refused(
    tmp_path: Path, cache: Path
) -> None:
    """A run directory that holds ``checkpoints/last.ckpt`` is refused, before anything trains
    or is written, without ``ckpt_path`` or with a checkpoint other than that ``last.ckpt`` (of
    another run, or an older epoch's: either would leave ``last-v1.ckpt`` beside it)."""
    overrides = [*THREE, "epochs=1", "milestones=[1]"]
    run_dir = tmp_path / "run"
    run(config(*overrides), run_dir)
    other = tmp_path / "other"
    run(config(*overrides), other)

    def written() -> dict[Path, int]:  # the run directory's lock file is rewritten by each job
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".layerkd.lock"}

    before = written()
    message = (
        r"this run directory already holds a checkpoint \(.*last\.ckpt\): resume with "
        r"ckpt_path=last, or choose another hydra\.run\.dir"
    )
    with pytest.raises(ConfigError, match=message):
        run(config(*overrides), run_dir)
    for ckpt in (
        other / "checkpoints" / "last.ckpt",
        run_dir / "checkpoints" / "epoch=0-step=3.ckpt",
    ):
        with pytest.raises(ConfigError, match=message):
            run(config(*overrides, f"ckpt_path='{ckpt}'"), run_dir)
    assert written() == before
    assert checkpoints(run_dir) == ["epoch=0-step=3.ckpt", "last.ckpt"]


@pytest.mark.parametrize("ckpt_path", ["last", "missing.ckpt"])
def test_a_missing_checkpoint_names_the_path_and_where_checkpoints_are(
    tmp_path: Path, cache: Path, ckpt_path: str
) -> None:
    run_dir = tmp_path / "run"
    wanted = str(run_dir / "checkpoints" / "last.ckpt") if ckpt_path == "last" else ckpt_path
    with pytest.raises(ConfigError) as err:
        run(config(*THREE, f"ckpt_path={ckpt_path}"), run_dir)
    message = str(err.value)
    assert message.startswith(f"ckpt_path={ckpt_path}: there is no checkpoint {wanted};")
    assert "<its run directory>/checkpoints" in message
    assert "hydra.run.dir=<its run directory> ckpt_path=last" in message
    assert list(cache.rglob("*.pt")) == []  # before the teacher trains


def test_the_refusal_exits_2_from_the_command_line(tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    overrides = [o for o in TINY if not o.startswith("trainer.")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_layerkd.app.train",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "layerkd-train: error: this run directory already holds a checkpoint" in result.stderr
    assert "resume with ckpt_path=last, or choose another hydra.run.dir" in result.stderr


@pytest.mark.slow
def test_a_job_resumed_from_the_command_line_keeps_its_sweep_identity(
    tmp_path: Path, cache: Path
) -> None:
    """``layerkd-train ... hydra.run.dir=D`` then the same with ``ckpt_path=last``: the resumed
    job (here of a finished run: nothing left to train) writes the same results and the same
    sweep identity, so ``layerkd-report`` reports it with its sweep."""
    run_dir = tmp_path / "run"
    overrides = [*(o for o in THREE if not o.startswith("trainer.")), "epochs=1", "milestones=[1]"]
    command = [sys.executable, "-m", "lightning_layerkd.app.train", *overrides]
    command.append(f"hydra.run.dir={run_dir}")
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((run_dir / "results.json").read_text())
    again = subprocess.run(
        [*command, "ckpt_path=last"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    after = json.loads((run_dir / "results.json").read_text())
    assert after["sweep"] == before["sweep"]
    assert not any(o.startswith("ckpt_path") for o in after["sweep"]["overrides"])
    assert after["config"]["ckpt_path"] == "last"
    assert_same(after["student"], before["student"], "student")
    assert_same(after["final_lrs"], before["final_lrs"], "final_lrs")
    assert checkpoints(run_dir) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def test_a_resume_with_another_command_is_refused_listing_the_differences(
    tmp_path: Path, cache: Path
) -> None:
    """Killed after epoch 0 with attention maps, resumed with ``method=jacobian lr=0.02``:
    refused before anything trains, each difference named (checkpoint -> this command); the
    same command still resumes."""
    run_dir = tmp_path / "run"
    kill = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=1"]
    with pytest.raises(Killed):
        run(config(*THREE, *kill), run_dir)
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(ConfigError) as err:
        run(config(*THREE, "method=jacobian", "lr=0.02", "ckpt_path=last"), run_dir)
    message = str(err.value)
    assert message.startswith(
        f"ckpt_path: {run_dir / 'checkpoints' / 'last.ckpt'} was written by a run with other "
        "settings; a resume must be the same command"
    )
    listed = message.split("Differences (checkpoint -> this command):\n")[1].splitlines()
    assert "  lr: 0.05 -> 0.02" in listed
    assert (
        "  method._target_: 'lightning_layerkd.methods.AttentionMaps' -> "
        "'lightning_layerkd.methods.JacobianMaps'"
    ) in listed
    assert "  optimizer.lr: 0.05 -> 0.02" in listed
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    resumed = run(config(*THREE, "ckpt_path=last"), run_dir)  # the same command resumes
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1, 2]


def test_a_truncated_last_ckpt_or_a_teacher_checkpoint_is_refused_with_the_way_out(
    tmp_path: Path, cache: Path
) -> None:
    overrides = [*THREE, "epochs=2", "milestones=[1]"]
    run_dir = tmp_path / "run"
    kill = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=1"]
    with pytest.raises(Killed):
        run(config(*overrides, *kill), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # the file system lost its end
    epoch = run_dir / "checkpoints" / "epoch=0-step=3.ckpt"
    with pytest.raises(ConfigError) as err:
        run(config(*overrides, "ckpt_path=last"), run_dir)
    assert str(err.value).startswith(
        f"ckpt_path: the checkpoint {last} cannot be read, it is truncated or damaged ("
    )
    assert str(err.value).endswith(
        f"copy the newest epoch checkpoint over it (cp {shlex.quote(str(epoch))} "
        f"{shlex.quote(str(last))}) and resume again"
    )
    (teacher,) = (run_dir / "teacher" / "checkpoints").glob("*.ckpt")
    with pytest.raises(ConfigError, match="is not a checkpoint of a layerkd-train student"):
        run(config(*overrides, f"ckpt_path='{teacher}'"), tmp_path / "other")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(epoch.read_bytes())  # the way out
    resumed = run(config(*overrides, "ckpt_path=last"), run_dir)
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1]
