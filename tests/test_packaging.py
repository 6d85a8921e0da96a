"""What the wheel ships: pyproject.toml lists every package of the tree, the configs are the
top-level conf/ folder (the one home of the configs, no link), and the repository tracks no
link, so a checkout without links (``git -c core.symlinks=false clone``) is whole."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_layerkd

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(lightning_layerkd.__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_of_the_tree() -> None:
    """The code's packages and every folder of conf/ (a config group: a package of data)."""
    package = ROOT / "lightning_layerkd"
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in package.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    configs = {
        ".".join(["lightning_layerkd", *folder.relative_to(ROOT).parts])
        for folder in [ROOT / "conf", *(ROOT / "conf").rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__"
    }
    assert "lightning_layerkd.conf.method" in configs
    plugins = {  # Hydra's namespace: the app's launcher, registered
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "hydra_plugins").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert plugins == {"hydra_plugins.layerkd_launcher"}
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()  # a namespace, shared
    assert set(SETUPTOOLS["packages"]) == found | configs | plugins | {"hydra_plugins"}


def test_the_configs_package_is_the_top_level_conf_folder() -> None:
    assert SETUPTOOLS["package-dir"] == {"lightning_layerkd.conf": "conf"}
    assert not (ROOT / "lightning_layerkd" / "conf").exists()
    import lightning_layerkd.conf as conf

    assert Path(conf.__file__).resolve().parent == (ROOT / "conf").resolve()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_repository_tracks_no_link() -> None:
    listing = subprocess.run(
        ["git", "ls-files", "--stage"], cwd=ROOT, capture_output=True, text=True
    )
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t")[1] for line in listing.stdout.splitlines() if line[:6] == "120000"]
    assert links == []
