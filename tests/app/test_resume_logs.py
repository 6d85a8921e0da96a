"""One run, one log: a run killed and resumed with ``ckpt_path=last`` has one CSV version folder
and one wandb run, whose rows equal those of a run never interrupted; information flow's
auxiliary network is restored on resume, not trained again."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest

from lightning_layerkd.app.train import run
from tests.helpers.app import THREE, Killed, config
from tests.helpers.wandb_files import history

# tests/app/test_resume.py's settings: 3 epochs, killed as epoch 2 starts, with a logger
LOGGED = [o for o in THREE if not o.startswith("logger=")]  # each test picks its logger
KILL = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=2"]
# wall-clock times, wandb's own row counter, and a table's file and artifact names (which hold
# that counter); a table's content is its sha256
VOLATILE = ("_runtime", "_timestamp", "_step", "path", "artifact_path", "_latest_artifact_path")


def csv_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return [
            {k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(handle)
        ]


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same rows in the same order: the same keys, numbers within 1e-9 (relative)."""
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g) == sorted(w), index
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (index, key)
            else:
                assert g[key] == value, (index, key)


def kill_and_resume(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    with pytest.raises(Killed):
        run(config(*overrides, *KILL), run_dir)
    return run(config(*overrides, "ckpt_path=last"), run_dir)


@pytest.mark.parametrize("method", ["attention", "information_flow"])
def test_a_resumed_run_continues_its_csv_log(tmp_path: Path, cache: Path, method: str) -> None:
    overrides = [*LOGGED, f"method={method}", "logger=csv"]
    straight = run(config(*overrides), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    resumed = kill_and_resume(overrides, run_dir)

    assert [p.name for p in (run_dir / "student").iterdir()] == ["version_0"]
    want = csv_rows(tmp_path / "straight" / "student" / "version_0" / "metrics.csv")
    got = csv_rows(run_dir / "student" / "version_0" / "metrics.csv")
    assert sorted({row["epoch"] for row in got}) == [0.0, 1.0, 2.0]
    assert_same_rows(got, want)  # every row, the same values, in order
    assert_same_rows(resumed["student"]["history"], straight["student"]["history"])
    if method == "information_flow":  # trained before the kill, restored on resume
        assert resumed["auxiliary"].pop("restored") is True
        assert resumed["auxiliary"] == straight["auxiliary"]
        assert "restored" not in straight["auxiliary"]
        assert sorted(p.name for p in (run_dir / "auxiliary").glob("auxiliary.*")) == [
            "auxiliary.json",
            "auxiliary.pt",
        ]


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [*LOGGED, "logger=wandb", "logger.group=test", "~callbacks.map_images"]
    run(config(*overrides), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    kill_and_resume(overrides, run_dir)

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))  # in time order (a "-1" suffix
    assert len(parts) == 2  # when both started in the same second), each a part of one run:
    assert all((part / f"run-{run_id}.wandb").is_file() for part in parts)
    (whole,) = (tmp_path / "straight" / "wandb").glob("offline-run-*")

    def rows(folders: list[Path]) -> list[dict[str, Any]]:
        found = [row for folder in folders for row in history(folder)]
        return [{k: v for k, v in row.items() if k.split("/")[-1] not in VOLATILE} for row in found]

    got, want = rows(parts), rows([whole])
    steps = [row["trainer/global_step"] for row in got if "trainer/global_step" in row]
    assert steps == sorted(steps) and max(steps) == 8  # 3 epochs of 3 batches, continuous
    tables = {k for row in want for k in row if k.endswith("_table/sha256")}
    assert {"panels/layerwise/lr_table/sha256", "panels/train/jsd_table/sha256"} <= tables
    assert_same_rows(got, want)  # the metrics and each panel's table, all rows so far
    assert os.environ["WANDB_MODE"] == "offline"
