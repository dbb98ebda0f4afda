"""The package's folders are its layers: ``core`` imports nothing above it, ``engine`` builds on
``core`` only, ``research`` and ``slicer_side`` on both, ``cluster`` on ``core`` only, ``cli`` on all; and no module imports itself back through others
(an import circle), counting lazy imports inside functions too. Checked statically (ast)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "SPDSegment" / "SPDSegmentLib"
ROOT_NAME = "SPDSegmentLib"
# layer -> the layers it may import (the package root only carries __version__)
ALLOWED = {
    "core": {"", "core"},
    "engine": {"", "core", "engine"},  # the engine process runs the core and nothing else
    "research": {"", "core", "research", "engine"},  # speed.py times the effect's path through the engine
    "slicer_side": {"", "core", "slicer_side", "engine"},
    "cluster": {"", "core", "cluster"},  # batches on Ray: the core's batch code on remote workers
    "cli": {"", "core", "research", "slicer_side", "engine", "cluster", "cli"},
    "": {""},
}


def modules() -> dict:
    """Dotted module name -> (path, is_package) for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [ROOT_NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def imports_of(name: str, path: Path, is_package: bool, known: set) -> set:
    """Modules of the package that ``name`` imports anywhere in its file (top level or lazily)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == ROOT_NAME)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == ROOT_NAME:
                source = node.module
            else:
                continue
            # "from package import module" imports the module; "from module import name" the module
            submodules = {f"{source}.{a.name}" for a in node.names} & known
            targets.update(submodules if len(submodules) == len(node.names) else submodules | {source})
    return {t for t in targets if t in known and t != name}


def graph() -> dict:
    found = modules()
    return {name: imports_of(name, path, is_package, set(found)) for name, (path, is_package) in found.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_walk_sees_the_package():
    edges = graph()
    assert {"SPDSegmentLib.cli", "SPDSegmentLib.core.pipeline", "SPDSegmentLib.research.train",
            "SPDSegmentLib.slicer_side.adapter"} <= set(edges)
    # relative, lazy and "from package import module" imports are all seen
    assert "SPDSegmentLib.core.distill" in edges["SPDSegmentLib.core.pipeline"]
    assert "SPDSegmentLib.core.models.openvino_runtime" in edges["SPDSegmentLib.core.models.backbone"]
    assert "SPDSegmentLib.core.pipeline" in edges["SPDSegmentLib.cli"]


def test_no_import_runs_up_a_layer():
    wrong = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                   if layer(b) not in ALLOWED[layer(a)])
    assert not wrong, "imports against the layers: " + "; ".join(wrong)


def test_no_import_circle():
    edges = graph()
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
