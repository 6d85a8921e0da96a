"""The README is a front door: at most 9,000 characters, its test command the one CI runs, and
no measured result of its own (every number lives in benchmarks/RESULTS.md, which it points to)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.exists(), reason="needs the source tree")


def test_the_readme_is_short() -> None:
    assert len(README.read_text()) <= 9000


def test_ci_runs_the_readmes_test_command() -> None:
    command = "python -m pip install nox && nox -s tests"
    assert command in README.read_text()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_points_to_the_results_instead_of_repeating_them() -> None:
    text = README.read_text()
    assert "benchmarks/RESULTS.md" in text
    assert "±" not in text and "%" not in text.partition("## Evidence")[2]
