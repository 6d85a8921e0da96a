"""The package's layers (docs/architecture.md): a lower layer never imports a higher one, the
private autograd engine is imported by ``functional/`` only, Lightning stays out of the maths,
Hydra and wandb stay in the app, and no import cycle exists: every import counts, at module
level, inside a function or under an ``if`` / ``try`` block, except the type-only ones under
``if TYPE_CHECKING:`` (never run, so no cycle), which still keep the layers."""

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
    "_common": 0,
    "_autograd": 1,
    "param_groups": 1,
    "layers": 2,
    "functional": 3,
    "models": 3,
    "guards": 3,
    "metrics": 4,
    "methods": 4,
    "layerwise_lr": 4,
    "data": 4,
    "module": 5,
    "__init__": 6,
    "app": 7,
}
#: Third-party packages and the lowest layer allowed to import them.
THIRD_PARTY_FLOOR = {"lightning": 4, "torchmetrics": 4, "hydra": 7, "omegaconf": 7, "wandb": 7}
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


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement anywhere in ``tree`` (functions, classes, ``if`` and ``try``
    blocks included), with whether it runs: ``False`` for the body of ``if TYPE_CHECKING:``."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, runs))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(tree, True)
    return found


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, runs)`` for every import in ``path``, wherever it stands;
    ``runs`` is ``False`` for a type-only import under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, runs in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, runs) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        if base.startswith("lightning_layerkd"):  # ``from <package> import x``: maybe a module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = candidate.replace(".", "/") in _MODULE_PATHS
                found.append((candidate if is_module else base, node.lineno, runs))
        else:
            found.append((base, node.lineno, runs))
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
        where = f"{path.relative_to(root.parent)}"
        graph[module] = set()
        for imported, line, runs in _imports(path, module):
            head = imported.split(".")[0]
            if head in THIRD_PARTY_FLOOR and LAYER[unit] < THIRD_PARTY_FLOOR[head]:
                problems.append(f"{where}:{line}: {unit}/ imports {head}")
            if head != "lightning_layerkd":
                continue
            target = _unit(imported)
            if target not in LAYER:
                problems.append(f"{where}:{line}: {imported} is no unit of the layer table")
                continue
            if target != unit and LAYER[target] >= LAYER[unit]:
                problems.append(f"{where}:{line}: {unit}/ imports the higher layer {target}/")
            if target == "_autograd" and unit not in AUTOGRAD_IMPORTERS | {"_autograd"}:
                problems.append(f"{where}:{line}: {unit}/ imports the private _autograd/")
            if runs:
                graph[module].add(imported)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (a package's ``__init__`` importing its own modules is not one)."""
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
    units = {u for u in units if not u.startswith("__pycache__") and u != "py"}
    assert units - {"__init__"} <= set(LAYER), sorted(units - set(LAYER))


def test_the_package_keeps_its_layers() -> None:
    assert layering_violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("functional/maps.py", "from lightning_layerkd.methods import AttentionMaps", "higher"),
        ("functional/maps.py", "import lightning.pytorch as pl", "imports lightning"),
        ("layers/hooks.py", "from lightning_layerkd.functional.maps import score", "higher"),
        ("_common.py", "from lightning_layerkd.layers.tokens import token_layout", "higher"),
        ("param_groups.py", "from lightning_layerkd.layers.specs import LayerSpec", "higher"),
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


@pytest.mark.parametrize(
    "planted",
    [
        "def _planted() -> None:\n    from lightning_layerkd.layers.discovery import LayerInfo\n",
        "if True:\n    from lightning_layerkd.layers import discovery\n",
        "try:\n    import lightning_layerkd.layers.discovery\nexcept ImportError:\n    pass\n",
    ],
    ids=["in a function", "under an if", "under a try"],
)
def test_a_planted_hidden_cycle_is_caught(tmp_path: Path, planted: str) -> None:
    copy = tmp_path / "lightning_layerkd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tokens = copy / "layers" / "tokens.py"  # discovery.py imports tokens.py
    tokens.write_text(tokens.read_text() + "\n\n" + planted)
    problems = layering_violations(copy)
    assert problems == [
        "import cycle: lightning_layerkd.layers.discovery -> lightning_layerkd.layers.tokens "
        "-> lightning_layerkd.layers.discovery"
    ]


def test_a_type_only_import_is_no_cycle_but_keeps_the_layers(tmp_path: Path) -> None:
    copy = tmp_path / "lightning_layerkd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tokens = copy / "layers" / "tokens.py"
    tokens.write_text(
        tokens.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        + "    from lightning_layerkd.layers.discovery import LayerInfo\n"
        + "    from lightning_layerkd.methods import MapMethod\n"
    )
    problems = layering_violations(copy)
    assert len(problems) == 1 and "layers/ imports the higher layer methods/" in problems[0]
