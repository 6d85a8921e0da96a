"""Developer sessions: ``nox -s tests`` (what the README and CI run), ``lint``, ``typecheck``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Install the package with its test extra and run the whole suite (pass pytest args)."""
    session.install("-e", ".[test]")
    session.run("pytest", *(session.posargs or ["-q"]), env={"WANDB_MODE": "offline"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.4")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the package."""
    session.install("-e", ".[test]", "mypy>=1.8")
    session.run("mypy", "lightning_layerkd")
