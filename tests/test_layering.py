"""The package's layering (planner/__init__.py): no import circles, and each
room imports only the rooms it may. Imports are read from the source, lazy
ones inside functions included (a lazy import must not hide a circle); only
``if TYPE_CHECKING:`` blocks are left out, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "profiles", "solvers", "cli")

# room -> the rooms it may import (besides itself).
ALLOWED = {
    "planner.specs": {"profiles"},
    "planner.schedule": set(),
    "planner.cost": {"planner.specs", "planner.schedule", "profiles", "solvers"},
    "planner.plan": {"planner.specs", "planner.cost", "planner.schedule", "solvers"},
    "planner.search": {"planner.specs", "planner.cost", "planner.schedule", "planner.plan", "profiles", "solvers"},
    "planner.output": {"planner.specs", "planner.cost", "planner.schedule", "planner.plan", "profiles", "solvers"},
    "planner.calibrate": {"planner.specs", "planner.cost", "planner.plan", "planner.output", "profiles"},
    "solvers": set(),
    "profiles": {"planner.specs", "planner.cost"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "planner" and len(parts) > 1:
        return f"planner.{parts[1]}"
    return parts[0]


def _imports(path: Path) -> set[str]:
    """loom modules imported by ``path``, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
               for child in block.body for node in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loom."):
            base = node.module.removeprefix("loom.")
            for alias in node.names:  # `from loom.planner.cost import layers` imports a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("loom.") for alias in node.names if alias.name.startswith("loom.")}
    return found


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = _module_name(path)
            graph.add_node(module)
            for target in _imports(path):
                if target != module:
                    graph.add_edge(module, target)
    return graph


def test_no_import_circles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import circles: {cycles[:3]}"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_what_it_may(room):
    graph = _graph()
    wrong = sorted(
        (module, target) for module, target in graph.edges
        if _room(module) == room and _room(target) not in ALLOWED[room] | {room}
    )
    assert not wrong, f"{room} may import only {sorted(ALLOWED[room])}: {wrong}"


def test_the_graph_sees_the_imports():
    """The checks above would pass on an empty graph: the planner's own edges are there."""
    graph = _graph()
    assert graph.has_edge("planner.cost.time_model", "planner.cost.layers")
    assert graph.has_edge("planner.specs.cluster", "planner.specs.topology")
    assert graph.has_edge("cli.experts", "planner.search.experts")  # a lazy import counts
