"""Import layering of the package: no import cycle, and no module imports from a level above its own.

Every import statement of every module counts, inside functions too; "module:attribute" strings
given to the registry are not imports. A package's `__init__` is a module of its own: importing
`totobench.model.toto` is an edge to it, `from totobench.model import Toto` an edge to
`totobench.model`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "totobench"

# A module may import only from its own level or below. Keys name a module and everything under it,
# except "totobench", which names the package __init__ alone.
LEVELS = {
    "totobench": 0, "totobench.errors": 0, "totobench.paths": 0, "totobench.io": 0,
    "totobench.registry": 0, "totobench.progress": 0, "totobench.parallel": 0, "totobench.settings": 0,
    "totobench.host": 0,
    "totobench.data": 1, "totobench.model": 1,
    "totobench.features": 2, "totobench.pretrain": 2,
    "totobench.probes": 3, "totobench.metrics": 3,
    "totobench.results": 4,
    "totobench.tasks": 5,
    "totobench.runner": 6, "totobench.commands": 6,
    "totobench.cli": 7, "totobench.__main__": 7,
}

Edge = tuple[str, str]


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """totobench/model/toto.py -> "totobench.model.toto"; totobench/model/__init__.py -> "totobench.model"."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (the code of `module`) imports, anywhere in it."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: "." is this module's package, ".." its parent, ...
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from P import x` imports the module P.x when there is one, else the attribute x of P
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:   # `import totobench.x.y` where y is not a module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_edges(package_dir: Path = PACKAGE_DIR) -> set[Edge]:
    """Every (importer, imported) pair of modules of the package."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    known = set(files)
    return {(module, target)
            for module, path in files.items()
            for target in imported_modules(path.read_text(), module, path.name == "__init__.py", known)
            if target != module}


def level(module: str, levels: dict[str, int] = LEVELS) -> int | None:
    """The level of the longest key of `levels` that names `module` or a package holding it."""
    keys = [k for k in levels if module == k or (k != "totobench" and module.startswith(k + "."))]
    return levels[max(keys, key=len)] if keys else None


def import_cycles(edges: set[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(components)


def describe(edge: Edge, levels: dict[str, int] = LEVELS) -> str:
    """The edge as `a -> b (level x -> y)`; a module with no level shows "unlisted" (add it to LEVELS)."""
    a, b = edge
    la, lb = (level(m, levels) for m in edge)
    return f"{a} -> {b} (level {'unlisted' if la is None else la} -> {'unlisted' if lb is None else lb})"


def layering_offences(edges: set[Edge], levels: dict[str, int] = LEVELS) -> list[str]:
    """One line per edge that goes up the levels or touches a module with no level (a new module
    must be given one), sorted."""
    offences = []
    for a, b in sorted(edges):
        la, lb = level(a, levels), level(b, levels)
        if la is None or lb is None or lb > la:
            offences.append(describe((a, b), levels))
    return offences


def cycle_offences(edges: set[Edge], levels: dict[str, int] = LEVELS) -> list[str]:
    """For each import cycle, its modules and then every edge inside it."""
    lines = []
    for component in import_cycles(edges):
        members = set(component)
        lines.append("import cycle: " + " <-> ".join(component))
        lines += ["  " + describe(e, levels) for e in sorted(edges) if e[0] in members and e[1] in members]
    return lines


# ---- the package ----------------------------------------------------------------------------

def test_no_import_cycle():
    offences = cycle_offences(import_edges())
    assert not offences, "\n" + "\n".join(offences)


def test_no_import_goes_up_the_layers():
    offences = layering_offences(import_edges())
    assert not offences, "imports against the layering (a module may import only from its level or below):\n" \
        + "\n".join(offences)


# ---- the checker itself -----------------------------------------------------------------------

def test_checker_finds_a_cycle_and_an_upward_import():
    edges = {("totobench.model.toto", "totobench.model.hf"), ("totobench.model.hf", "totobench.model.config"),
             ("totobench.model.config", "totobench.model.toto"), ("totobench.model.toto", "totobench.errors"),
             ("totobench.io", "totobench.results.store"), ("totobench.cli", "totobench.runner")}
    assert import_cycles(edges) == [["totobench.model.config", "totobench.model.hf", "totobench.model.toto"]]
    assert cycle_offences(edges)[0] == ("import cycle: totobench.model.config <-> totobench.model.hf <-> "
                                        "totobench.model.toto")
    assert len(cycle_offences(edges)) == 4   # the cycle, then its three edges
    assert layering_offences(edges) == ["totobench.io -> totobench.results.store (level 0 -> 4)"]


def test_levels_of_packages_modules_and_the_package_init():
    assert level("totobench") == 0 and level("totobench.model") == 1 and level("totobench.model.toto") == 1
    assert level("totobench.commands.info") == 6 and level("totobench.__main__") == 7
    assert level("totobench.registry") == 0 and level("totobench.registryx") is None
    assert layering_offences({("totobench.cli", "totobench.newthing")}) == \
        ["totobench.cli -> totobench.newthing (level 7 -> unlisted)"]


@pytest.mark.parametrize("source, expected", [
    ("import totobench.model.toto", {"totobench.model.toto"}),
    ("import totobench.model.toto as t", {"totobench.model.toto"}),
    ("from totobench.model import Toto", {"totobench.model"}),
    ("from totobench.model import backbone, Toto", {"totobench.model.backbone", "totobench.model"}),
    ("from . import hf", {"totobench.model.hf"}),
    ("from .config import TotoConfig", {"totobench.model.config"}),
    ("from .. import errors", {"totobench.errors"}),
    ("from ..registry import MODELS", {"totobench.registry"}),
    ("from .. import paths", {"totobench.paths"}),
    ("def f():\n    from totobench.io import atomic_write\n", {"totobench.io"}),
    ("import json, torch\nx = 'totobench.model.backbone:load_checkpoint_backbone'", set()),
])
def test_imports_are_read_from_every_statement_form(source, expected):
    known = {"totobench", "totobench.errors", "totobench.io", "totobench.paths", "totobench.registry",
             "totobench.model", "totobench.model.toto", "totobench.model.hf", "totobench.model.config",
             "totobench.model.backbone"}
    assert imported_modules(source, "totobench.model.toto", False, known) == expected
    # in a package __init__, "." is the package itself
    assert imported_modules("from . import toto", "totobench.model", True, known) == {"totobench.model.toto"}
