"""The examples run as scripts, as a user would run them."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_METHOD = ROOT / "examples" / "custom_method.py"
CRUCIAL = ["layer1", "layer2", "layer3", "layer4"]
BASE_LR = 0.1  # DistillationModule's default SGD rate, which the example keeps


def run_example(path: Path) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: tiny networks gain nothing from more, and lose a lot on a busy
    # machine. PYTHONPATH makes the package importable even when it is not installed.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def printed_learning_rates(stdout: str) -> dict[str, float]:
    lines = [line for line in stdout.splitlines() if line.startswith("learning rates:")]
    assert len(lines) == 1, f"expected one 'learning rates:' line in:\n{stdout[-3000:]}"
    return ast.literal_eval(lines[0].removeprefix("learning rates:").strip())


def test_custom_method_example_is_shorter_than_40_lines():
    text = CUSTOM_METHOD.read_text()
    assert text.count("\n") < 40
    assert len(text.splitlines()) < 40


def test_custom_method_example_defines_and_registers_outside_the_package():
    text = CUSTOM_METHOD.read_text()
    assert '@register_method("cosine_energy")' in text
    assert 'method="cosine_energy"' in text  # used by name, through the registry
    assert "pytorch_lightning" not in text


@pytest.mark.slow
def test_custom_method_example_runs_and_the_layerwise_rule_acts():
    result = run_example(CUSTOM_METHOD)
    assert result.returncode == 0, result.stderr[-5000:]
    lrs = printed_learning_rates(result.stdout)
    assert list(lrs) == [*CRUCIAL, "base"]
    # The layer-wise rule touches the crucial layers only.
    assert lrs["base"] == pytest.approx(BASE_LR, rel=1e-12)
    crucial = [lrs[name] for name in CRUCIAL]
    # It acted: the crucial layers' rates differ from each other (a method whose divergences
    # were all zero, or no callback, leaves every rate at the base rate) ...
    assert max(crucial) / min(crucial) > 1.05, lrs
    assert all(lr != pytest.approx(BASE_LR, rel=1e-6) for lr in crucial), lrs
    # ... and it is the relative rule: each factor within [1/4, 4], and their geometric mean
    # kept at 1 (no factor is clipped at this scale).
    assert all(BASE_LR / 4 <= lr <= BASE_LR * 4 for lr in crucial), lrs
    geometric_mean = math.exp(sum(math.log(lr) for lr in crucial) / len(crucial))
    assert geometric_mean == pytest.approx(BASE_LR, rel=1e-9), lrs
