"""Developer sessions: ``nox -s tests`` (what the README and CI run), ``lint``, ``typecheck`` and
``wheel`` (the built wheel in a fresh environment, as a user gets it)."""

from __future__ import annotations

from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

nox.options.sessions = ["tests", "lint", "typecheck", "wheel"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
#: Every package the wheel ships (pyproject.toml's list), the configs' package included.
PACKAGES: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "packages"
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
    package imports, the configs ship and every option of every config group composes
    (``.ci/compose_configs.py``), and the app composes its default job. Then the same from a
    clone with links turned off (``core.symlinks=false``, as on Windows), installed both ways:
    the repository holds no link the package needs."""
    session.install("build")
    dist = str(Path(session.create_tmp()).resolve())
    session.run("python", "-m", "build", "--wheel", "--outdir", dist, silent=True)
    _install_and_check(session, f'"$(ls {dist}/*.whl)[sweeps]"', away=dist)
    clone = Path(dist) / "no-links"
    session.run("rm", "-rf", str(clone), external=True)
    session.run(
        "git", "-c", "core.symlinks=false", "clone", "-q", str(ROOT), str(clone), external=True
    )
    _install_and_check(session, f'"{clone}[sweeps]"', away=dist)
    _install_and_check(session, f'-e "{clone}[sweeps]"', away=dist, editable=True)


def _install_and_check(session: nox.Session, what: str, away: str, editable: bool = False) -> None:
    """``pip install <what>`` in place of any earlier install, then, from ``away`` (no source
    tree there): every package imports from where it was installed, every config composes and
    ``layerkd-train --cfg job`` composes."""
    session.chdir(ROOT)
    session.run("python", "-m", "pip", "uninstall", "-y", "lightning-layerkd", silent=True)
    session.run("sh", "-c", f"python -m pip install -q {what}", external=True)
    session.chdir(away)  # away from the source tree, so nothing resolves to it
    imports = "; ".join(f"import {name}" for name in PACKAGES)
    where = "'no-links' in p.__file__" if editable else "'site-packages' in p.__file__"
    check = f"{imports}; import lightning_layerkd as p; assert {where}, p.__file__"
    session.run("python", "-c", check, env={"PYTHONSAFEPATH": "1"})
    if not editable:
        session.run("python", str(ROOT / ".ci" / "compose_configs.py"))
    session.run("layerkd-train", "--cfg", "job", silent=True)
