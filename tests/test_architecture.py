"""The shape of the package: no import cycle among charlstm's modules, and imports that only point
down the layers of docs/architecture.md. Both read the source with `ast`, so an import inside a
function counts like one at the top (a lazy import that dodges a cycle is still a cycle).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from tests.helpers import ROOT

SRC = ROOT / "src"
PACKAGE = "charlstm"

# Each module's layer; a module may import from its own layer or lower ones. A name stands for the
# module of that name and, for a package, every module in it; the package itself (its __init__) is
# the top layer's "charlstm".
LAYERS: dict[str, int] = {
    # 0: the foundation, which knows nothing of the rest
    "charlstm.errors": 0,
    "charlstm.config": 0,
    "charlstm.hardware": 0,
    "charlstm.textutil": 0,
    "charlstm.atomic": 0,
    # 1-8: the sub-packages, each built on those below it
    "charlstm.data": 1,
    "charlstm.model": 2,
    "charlstm.runs": 3,
    "charlstm.generate": 4,
    "charlstm.analysis": 5,
    "charlstm.export": 5,
    "charlstm.training": 6,
    "charlstm.experiments": 7,
    "charlstm.bench": 7,
    "charlstm.serve": 8,
    # 9: what users call
    "charlstm.api": 9,
    "charlstm.cli": 9,
    "charlstm.__main__": 9,
    "charlstm": 9,
}


def modules(src: Path) -> dict[str, Path]:
    """Every module of the package under `src`, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(src: Path) -> dict[str, dict[str, int]]:
    """module → {module it imports: the line of the first such import}, within the package.

    `from X import name` imports the module X.name when there is one, else X itself; a name that is
    not a module resolves to the closest enclosing module. Importing X.Y also runs the package X,
    but that implicit step is not an edge: every package's __init__ would otherwise be in a cycle
    with the modules it re-exports."""
    mods = modules(src)

    def closest(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 packages
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for target in targets:
                resolved = closest(target)
                if resolved and resolved != module:
                    graph[module].setdefault(resolved, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    """The layer of `module`, from the longest name of LAYERS that is it or a package holding it."""
    if module in LAYERS:
        return LAYERS[module]
    holders = [name for name in LAYERS if name != PACKAGE and module.startswith(name + ".")]
    return LAYERS[max(holders, key=len)] if holders else None


def upward_imports(src: Path) -> list[str]:
    """Each import of a module from a higher layer, as 'file:line: a (layer) imports b (layer)'."""
    mods = modules(src)
    found = []
    for module, targets in imports(src).items():
        for target, line in targets.items():
            here, there = layer(module), layer(target)
            if here is not None and there is not None and there > here:
                where = mods[module].relative_to(src)
                found.append(f"{where}:{line}: {module} ({here}) imports {target} ({there})")
    return sorted(found)


def unassigned(src: Path) -> list[str]:
    return sorted(m for m in modules(src) if layer(m) is None)


# ---------------------------------------------------------------------------------------- the tests


def test_no_import_cycle_among_the_modules() -> None:
    """No set of charlstm's modules imports each other in a circle, counting imports made inside
    functions."""
    graph = imports(SRC)
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the whole package was read
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer() -> None:
    """A new module must be given its place in LAYERS (and in docs/architecture.md)."""
    assert not unassigned(SRC), f"modules without a layer in LAYERS: {unassigned(SRC)}"


def test_imports_point_down_the_layers() -> None:
    """Each module imports only from its own layer or lower ones."""
    found = upward_imports(SRC)
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_the_checks_find_a_planted_cycle_an_upward_import_and_a_new_module(tmp_path) -> None:
    """On a copy of the source with one import planted inside a function (the data layer reaching
    up into the training loop, which reaches back down) and one new module, each check above
    fails, naming what was planted."""
    src = tmp_path / "src"
    shutil.copytree(SRC / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    corpus = src / PACKAGE / "data" / "corpus.py"
    corpus.write_text(
        corpus.read_text(encoding="utf-8")
        + "\n\ndef _planted():\n    from charlstm.training import loop\n\n    return loop\n",
        encoding="utf-8",
    )
    (src / PACKAGE / "newthing.py").write_text('"""Not in LAYERS."""\n', encoding="utf-8")

    found = cycles(imports(src))
    assert any({"charlstm.data.corpus", "charlstm.training.loop"} <= set(c) for c in found), found
    upward = upward_imports(src)
    assert any(
        "charlstm.data.corpus (1) imports charlstm.training.loop (6)" in line for line in upward
    ), upward
    assert unassigned(src) == ["charlstm.newthing"]
