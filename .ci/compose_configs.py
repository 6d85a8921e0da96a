"""Compose every option of every config group of the INSTALLED package (``nox -s wheel``):
the configs ship inside the wheel as ``lightning_layerkd.conf`` and each one composes.

Run it as a script from outside the source tree (its own folder, ``.ci/``, holds no package),
so that ``lightning_layerkd`` resolves to the installed copy; it refuses the source tree."""

from __future__ import annotations

import importlib.resources
import sys

from hydra import compose, initialize_config_module

import lightning_layerkd

PACKAGE = "lightning_layerkd.conf"


def options() -> list[str]:
    """``group=option`` for every ``<group>/<option>.yaml`` shipped, nested groups included
    (``hydra/launcher=parallel``)."""
    found = []

    def walk(folder: importlib.resources.abc.Traversable, group: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("__"):
                walk(entry, f"{group}/{entry.name}" if group else entry.name)
            elif group and entry.name.endswith(".yaml"):
                found.append(f"{group}={entry.name.removesuffix('.yaml')}")

    walk(importlib.resources.files(PACKAGE), "")
    return found


def main() -> int:
    if "site-packages" not in lightning_layerkd.__file__:
        print(f"not the installed package: {lightning_layerkd.__file__}", file=sys.stderr)
        return 1
    overrides = options()
    failed = []
    with initialize_config_module(config_module=PACKAGE, version_base="1.3"):
        compose(config_name="config", return_hydra_config=True)
        for override in overrides:
            try:
                compose(config_name="config", overrides=[override], return_hydra_config=True)
            except Exception as error:  # report every option that does not compose
                failed.append(f"{override}: {type(error).__name__}: {error}")
    groups = {o.partition("=")[0] for o in overrides}
    print(f"composed the default and {len(overrides)} options of {len(groups)} groups")
    for line in failed:
        print(f"does not compose: {line}", file=sys.stderr)
    return 1 if failed or not overrides else 0


if __name__ == "__main__":
    sys.exit(main())
