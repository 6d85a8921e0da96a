"""Developer sessions: ``nox -s tests`` (what the README and CI run), ``lint``, ``typecheck`` and
``wheel`` (the built wheel in a fresh environment, as a user gets it)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "wheel"]
nox.options.reuse_existing_virtualenvs = True

#: Every subpackage a user can import; the wheel must ship each one.
SUBPACKAGES = [
    "lightning_layerkd",
    "lightning_layerkd.app",
    "lightning_layerkd.conf",
    "lightning_layerkd.data",
    "lightning_layerkd.functional",
    "lightning_layerkd.layers",
    "lightning_layerkd.layerwise_lr",
    "lightning_layerkd.methods",
    "lightning_layerkd._autograd",
]


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


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it (not the source tree) and check what a user gets: every
    subpackage imports, the configs ship, and the app composes its default job."""
    session.install("build")
    dist = session.create_tmp()
    session.run("python", "-m", "build", "--wheel", "--outdir", dist, silent=True)
    session.run("python", "-m", "pip", "uninstall", "-y", "lightning-layerkd", silent=True)
    session.run("sh", "-c", f"python -m pip install {dist}/*.whl", external=True)
    imports = "; ".join(f"import {name}" for name in SUBPACKAGES)
    check = f"{imports}; import lightning_layerkd as p; assert 'site-packages' in p.__file__, p"
    session.run("python", "-c", check, env={"PYTHONSAFEPATH": "1"})
    session.chdir(dist)  # away from the source tree, so nothing resolves to it
    session.run("layerkd-train", "--cfg", "job", silent=True)
