"""The package's layers point only down, without cycles, and no import hides inside a function.

Core (:mod:`actedit.interventions`) ← data and collection ← fit/train ← evaluation ← study and
CLI. The graph is read from the source files (``ast``), module-level imports only; an import
inside a function is allowed for an optional or heavy third-party dependency and must say so
with a ``# lazy:`` comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"actedit": "actedit", "actedit.interventions": "interventions", "actedit.train": "train",
            "actedit.eval": "eval", "actedit.study": "study", "actedit.cli": "cli"}
DATA_AND_COLLECTION = {"data", "tasks", "truthfulqa", "formats", "environment", "models", "generate", "store",
                       "collect", "plots"}
FIT_AND_TRAIN = {"select", "trainer", "lm", "pipeline"}
LAYERS = ["core", "data and collection", "fit/train", "evaluation", "study and CLI"]


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[:2] == ["actedit", "interventions"]:
        return 0
    if parts[:2] == ["actedit", "train"]:
        if len(parts) == 2:  # the package's __init__ registers the tasks
            return 1
        if parts[2] in DATA_AND_COLLECTION:
            return 1
        if parts[2] in FIT_AND_TRAIN:
            return 2
        raise AssertionError(f"{module} has no layer: add it to DATA_AND_COLLECTION or FIT_AND_TRAIN")
    if module == "actedit.api":
        return 2
    if parts[:2] == ["actedit", "eval"]:
        return 3
    if parts[:2] in (["actedit", "study"], ["actedit", "cli"]) or module == "actedit":
        return 4
    raise AssertionError(f"{module} has no layer")


def modules():
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def resolve(importer: str, is_package: bool, node) -> list:
    """The actedit modules a module-level import statement names."""
    known = modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("actedit")]
    if node.level:
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("actedit"):
        return []
    names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return names or [target]


def graph():
    edges = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(resolve(name, path.stem == "__init__", node))
        edges[name] = {t for t in targets if t != name}
    return edges


def top_level_imports(path: Path):
    """Imports that run when the module is imported (not inside a function or class body)."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in inside]


def test_every_import_points_down_or_sideways():
    known = modules()
    bad = []
    for name, path in known.items():
        for node in top_level_imports(path):
            for target in resolve(name, path.stem == "__init__", node):
                if target in known and layer_of(target) > layer_of(name):
                    bad.append(f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    known = set(edges)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in known:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(known):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodules is not a cycle of the design
    cycles = [c for c in cycles if not any(c.startswith(p + " ->") and c.endswith(p) for p in PACKAGES)]
    assert not cycles, "\n".join(cycles)


def test_no_import_hides_inside_a_function():
    bad = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                line, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if resolve(name, path.stem == "__init__", node) or getattr(node, "level", 0):
                    bad.append(f"{path.name}:{node.lineno}: imports actedit inside a function: {line.strip()}")
                elif "# lazy:" not in line and not before.startswith("# lazy:"):
                    bad.append(f"{path.name}:{node.lineno}: a function-level import needs a '# lazy:' reason: "
                               f"{line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["actedit.interventions.hpr", "actedit.train.pipeline", "actedit.eval.mc",
                                    "actedit.study", "actedit.cli", "actedit"])
def test_each_layer_imports_on_its_own(module):
    """Importing any layer first works (no import-order dependence) and stays quiet."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nnsight" not in done.stdout + done.stderr
