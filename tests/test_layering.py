"""The package's layers (docs/architecture.md): a lower layer never imports a higher one, the
private autograd engine is imported by ``functional/`` only, Lightning stays out of the maths,
Hydra and wandb stay in the app, and no module-level import cycle exists."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import lightning_layerkd

PACKAGE = Path(lightning_layerkd.__file__).parent

#: Each unit (a subpackage or a root module) and its layer: a unit imports only its own modules
#: and units of lower layers.
LAYER = {
    "_autograd": 0,
    "layers": 1,
    "functional": 2,
    "models": 2,
    "guards": 2,
    "metrics": 3,
    "methods": 3,
    "layerwise_lr": 3,
    "data": 3,
    "module": 4,
    "__init__": 5,
    "app": 6,
}
#: Third-party packages and the lowest layer allowed to import them.
THIRD_PARTY_FLOOR = {"lightning": 3, "torchmetrics": 3, "hydra": 6, "omegaconf": 6, "wandb": 6}
#: Who may import the private autograd engine, besides itself.
AUTOGRAD_IMPORTERS = {"functional"}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "lightning_layerkd":  # ``from lightning_layerkd import x``: maybe a module
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    is_module = candidate.replace(".", "/") in _MODULE_PATHS
                    found.append((candidate if is_module else base, node.lineno, id(node) in top))
            else:
                found.append((base, node.lineno, id(node) in top))
    return found


_MODULE_PATHS: set[str] = set()


def layering_violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that breaks the rules above, one line each."""
    files = sorted(root.rglob("*.py"))
    names = {path: _module_name(path, root) for path in files}
    _MODULE_PATHS.clear()
    _MODULE_PATHS.update(name.replace(".", "/") for name in names.values())
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for path, module in names.items():
        unit = _unit(module)
        if unit == "conf":  # the Hydra configs (a link to the top-level conf/): no code
            continue
        where = f"{path.relative_to(root.parent)}"
        graph[module] = set()
        for imported, line, top_level in _imports(path, module):
            head = imported.split(".")[0]
            if head in THIRD_PARTY_FLOOR and LAYER[unit] < THIRD_PARTY_FLOOR[head]:
                problems.append(f"{where}:{line}: {unit}/ imports {head}")
            if head != "lightning_layerkd":
                continue
            target = _unit(imported)
            if target not in LAYER:
                continue  # lightning_layerkd.conf: the configs, no code
            if target != unit and LAYER[target] >= LAYER[unit]:
                problems.append(f"{where}:{line}: {unit}/ imports the higher layer {target}/")
            if target == "_autograd" and unit not in AUTOGRAD_IMPORTERS | {"_autograd"}:
                problems.append(f"{where}:{line}: {unit}/ imports the private _autograd/")
            if top_level:
                graph[module].add(imported)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import cycles (a package's ``__init__`` importing its own modules is not)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or node.startswith(nxt + "."):  # a module's own package
                continue
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    units = {u for u in units if not u.startswith("__pycache__") and u not in ("conf", "py")}
    assert units - {"__init__"} <= set(LAYER), sorted(units - set(LAYER))


def test_the_package_keeps_its_layers() -> None:
    assert layering_violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("functional/maps.py", "from lightning_layerkd.methods import AttentionMaps", "higher"),
        ("functional/maps.py", "import lightning.pytorch as pl", "imports lightning"),
        ("layers/hooks.py", "from lightning_layerkd.functional.maps import Task", "higher"),
        ("module.py", "import wandb", "imports wandb"),
        (
            "methods/base.py",
            "from lightning_layerkd._autograd.mode import LeanAutograd",
            "_autograd",
        ),
        ("data/base.py", "from lightning_layerkd.app.train import run", "higher"),
        ("metrics.py", "from lightning_layerkd import DistillationModule", "higher"),
    ],
)
def test_a_planted_wrong_import_is_caught(
    tmp_path: Path, module: str, line: str, expected: str
) -> None:
    copy = tmp_path / "lightning_layerkd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}\n")
    problems = [p for p in layering_violations(copy) if not p.startswith("import cycle")]
    assert len(problems) == 1 and module in problems[0] and expected in problems[0], problems


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "lightning_layerkd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    discovery = copy / "layers" / "discovery.py"  # specs.py imports discovery.py
    discovery.write_text(
        discovery.read_text() + "\nfrom lightning_layerkd.layers.specs import LayerSpec\n"
    )
    problems = layering_violations(copy)
    assert problems == [
        "import cycle: lightning_layerkd.layers.discovery -> lightning_layerkd.layers.specs "
        "-> lightning_layerkd.layers.discovery"
    ]
