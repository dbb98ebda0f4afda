"""Slicer's generic tests import the modules and build their widgets and effects without PyTorch and
without a network. Qt and desktop Slicer are out of reach here, so check statically (ast) that nothing
reachable at import time or from a constructor imports torch, installs packages or downloads, and check
dynamically that the core modules those paths import do not pull in torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI_FILES = {
    "SPDSegment/SPDSegment.py": ("SPDSegment.__init__", "SPDSegmentWidget.setup", "SPDSegmentLogic.__init__"),
    "SegmentEditorSPD/SegmentEditorSPD.py": ("SegmentEditorSPD.__init__",),
    "SegmentEditorSPD/SegmentEditorSPDLib/SegmentEditorEffect.py": (
        "SegmentEditorEffect.__init__", "SegmentEditorEffect.setupOptionsFrame", "SegmentEditorEffect.setMRMLDefaults",
        "SegmentEditorEffect.updateGUIFromMRML", "SegmentEditorEffect.icon", "SegmentEditorEffect.helpText"),
}
HEAVY_MODULES = ("torch", "torchvision", "segment_anything", "monai", "timm", "PyTorchUtils",
                 "SPDSegmentLib.core.spd_model", "SPDSegmentLib.core.saliency", "SPDSegmentLib.core.models.backbone")
SIDE_EFFECT_CALLS = {"pip_install", "pip_ensure", "installTorch", "installDependencies", "checkpoint_for", "download",
                     "startDownload", "load_model", "load_backbone", "urlopen", "segment", "encode_ahead",
                     "engine", "local_engine", "preloadModel", "Popen", "EngineClient"}  # no engine while building
CORE_MODULES = ("SPDSegmentLib", "SPDSegmentLib.slicer_side.adapter", "SPDSegmentLib.slicer_side.gui",
                "SPDSegmentLib.engine.client", "SPDSegmentLib.engine.protocol",
                "SPDSegmentLib.core.pipeline", "SPDSegmentLib.core.prompts", "SPDSegmentLib.core.models.registry",
                "SPDSegmentLib.core.models.download", "SPDSegmentLib.core.progress", "SPDSegmentLib.core.errors",
                "SPDSegmentLib.core.volume")


def imported_names(node) -> list:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def is_heavy(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in HEAVY_MODULES)


def eager_nodes(body):
    """Nodes that run when ``body`` runs: not inside nested functions or lambdas (those run later)."""
    deferred = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    stack = [n for n in body if not isinstance(n, deferred)]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, deferred):
                stack.append(child)


def call_name(node):
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return None


def parse(relative):
    return ast.parse((ROOT / relative).read_text(encoding="utf-8"), filename=relative)


def methods(tree):
    found = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            found[f"{cls.name}.{fn.name}"] = fn
    return found


def reachable(tree, entries):
    """Methods run by the entry points: follow ``self.x()`` / ``self.logic.x()`` calls to methods of this file."""
    table = methods(tree)
    by_name = {}
    for qualified, fn in table.items():
        by_name.setdefault(qualified.split(".")[1], []).append(qualified)
    seen, todo = set(), list(entries)
    while todo:
        qualified = todo.pop()
        if qualified in seen or qualified not in table:
            continue
        seen.add(qualified)
        for node in eager_nodes(table[qualified].body):
            name = call_name(node)
            if name in by_name and isinstance(node.func, ast.Attribute):
                todo.extend(by_name[name])
    return {q: table[q] for q in seen}


@pytest.mark.parametrize("relative", sorted(GUI_FILES))
def test_nothing_heavy_at_import_time(relative):
    tree = parse(relative)
    module_level = [n for n in eager_nodes(tree.body) if not isinstance(n, ast.ClassDef)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):  # class bodies run at import too
        module_level += [n for n in eager_nodes(cls.body)]
    heavy = [name for node in module_level for name in imported_names(node) if is_heavy(name)]
    assert not heavy, f"{relative} imports {heavy} at import time"
    calls = [call_name(n) for n in module_level if call_name(n) in SIDE_EFFECT_CALLS]
    assert not calls, f"{relative} calls {calls} at import time"


@pytest.mark.parametrize("relative", sorted(GUI_FILES))
def test_constructors_import_no_torch_and_install_nothing(relative):
    tree = parse(relative)
    run = reachable(tree, GUI_FILES[relative])
    assert set(GUI_FILES[relative]) <= set(run), "an entry point was renamed; update GUI_FILES"
    for qualified, fn in run.items():
        nodes = list(eager_nodes(fn.body))
        heavy = [name for node in nodes for name in imported_names(node) if is_heavy(name)]
        assert not heavy, f"{relative}: {qualified} (run while building the GUI) imports {heavy}"
        calls = [call_name(n) for n in nodes if call_name(n) in SIDE_EFFECT_CALLS]
        assert not calls, f"{relative}: {qualified} (run while building the GUI) calls {calls}"


def test_the_checks_catch_a_violation():
    tree = ast.parse("import torch\nclass W:\n    def setup(self):\n        self.build()\n"
                     "    def build(self):\n        import torch\n        pip_install('x')\n"
                     "    def later(self):\n        import torch\n")
    run = reachable(tree, ["W.setup"])
    assert set(run) == {"W.setup", "W.build"}
    assert any(is_heavy(n) for node in eager_nodes(run["W.build"].body) for n in imported_names(node))
    assert any(is_heavy(n) for node in eager_nodes(tree.body) for n in imported_names(node))


def test_core_imports_do_not_import_torch():
    code = (f"import sys; import {', '.join(CORE_MODULES)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'segment_anything', 'monai')); "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SPDSegment"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_adapter_is_the_only_core_file_touching_slicer():
    core = ROOT / "SPDSegment" / "SPDSegmentLib"
    for path in sorted(core.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n for node in ast.walk(tree) for n in imported_names(node)]
        touching = [n for n in names if n.split(".")[0] in ("slicer", "qt", "ctk", "vtk", "vtkmodules")]
        if path.relative_to(core).as_posix() == "slicer_side/adapter.py":
            top = [n for node in tree.body for n in imported_names(node)]
            assert not [n for n in top if n.split(".")[0] in ("slicer", "vtk", "qt")], "import slicer/vtk lazily"
        else:
            assert not touching, f"{path.relative_to(ROOT)} imports {touching}"
