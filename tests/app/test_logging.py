"""The app reports through Python's logging, from rank zero only: under ``layerkd-train`` the
console and the run directory's ``train.log`` hold the same lines (Lightning's included); the
result table is printed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_layerkd.app.logs import get_logger
from tests.helpers.app import TINY

LAYERKD_TRAIN = str(Path(sys.executable).parent / "layerkd-train")


def test_console_and_train_log_hold_the_same_lines(tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "LAYERKD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [LAYERKD_TRAIN, *TINY, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logged = (run_dir / "train.log").read_text().splitlines()
    console = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert console == logged
    text = "\n".join(logged)
    assert "[lightning_layerkd.app.teacher][INFO] - training the teacher for 1 epochs" in text
    assert f"[lightning_layerkd.app.train][INFO] - wrote {run_dir / 'results.json'}" in text
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available: False" in text
    assert "[layerkd]" not in result.stdout + result.stderr
    assert "INFO:" not in result.stderr  # Lightning's own console handler is gone
    assert "| student val acc (best) |" in result.stdout  # the table is printed, not logged
    assert "| student val acc (best) |" not in text


def test_only_rank_zero_logs(caplog, monkeypatch) -> None:
    log = get_logger("lightning_layerkd.app.test_rank")
    caplog.set_level(logging.INFO, logger="lightning_layerkd.app")
    log.info("from rank zero")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    log.info("from rank one")
    assert [r.getMessage() for r in caplog.records] == ["from rank zero"]
    assert get_logger("lightning_layerkd.app.test_rank").filters == log.filters  # one filter
    assert len(log.filters) == 1
