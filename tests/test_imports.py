"""The package's layers are its folders; imports point only down, without cycles, and no import
hides inside a function.

A module's layer is the folder it lives in (``pyproject.toml``'s ``package-dir`` maps each
``actedit.*`` package to its folder): :data:`LAYERS` orders the folders from the bottom, and
every package of ``pyproject.toml`` must appear there. The graph is read from the source files
(``ast``): the imports a module runs when it is imported (module level and class bodies); an
import inside a function is allowed for an optional or heavy third-party dependency and must
say so with a ``# lazy:`` comment. ``actedit`` itself (the package root) imports nothing: its
public names resolve lazily, so that a stock pyvene load of an edit imports the core only
(checked in a fresh process by ``conftest.assert_stock_reload`` for every method, and below).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ["interventions", "data", "train", "eval", "export", "study", "cli"]
"""The layers' folders, from the bottom: core ← data and collection ← fit and train ← evaluation
← export ← study ← CLI."""

NAMES = {
    "interventions": "core",
    "data": "data and collection",
    "train": "fit and train",
    "eval": "evaluation",
    "export": "export",
    "study": "study",
    "cli": "CLI",
}


def packages() -> dict:
    """``actedit.*`` package → its folder, as ``pyproject.toml`` declares them (configs hold no code)."""
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^package-dir = \{(.*)\}$", text, re.MULTILINE).group(1)
    pairs = dict(re.findall(r'"([\w.]+)" = "(\w+)"', line))
    return {package: folder for package, folder in pairs.items() if package not in ("actedit.configs",)}


def modules(root: Path = ROOT) -> dict:
    out = {}
    for package, folder in packages().items():
        for path in sorted((root / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def layer_of(module: str) -> int:
    """The rank of ``module``'s folder in :data:`LAYERS`; the package root ``actedit`` is above them all."""
    if module == "actedit":
        return len(LAYERS)
    folder = packages()[".".join(module.split(".")[:2])]
    return LAYERS.index(folder)


def layer_name(module: str) -> str:
    return "package root" if module == "actedit" else NAMES[LAYERS[layer_of(module)]]


def resolve(importer: str, is_package: bool, node, known) -> list:
    """The actedit modules an import statement names (submodules when it imports them by name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "actedit" or a.name.startswith("actedit.")]
    if node.level:
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == "actedit" or target.startswith("actedit.")):
        return []
    names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return names or [target]


def import_time_nodes(path: Path):
    """Imports that run when the module is imported: module level and class bodies, not functions."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in inside]


def graph(root: Path = ROOT) -> dict:
    known = modules(root)
    return {
        name: {
            t
            for node in import_time_nodes(path)
            for t in resolve(name, path.stem == "__init__", node, known)
            if t != name
        }
        for name, path in known.items()
    }


def layer_violations(root: Path = ROOT) -> list:
    """Every import-time import that points up a layer, or at an actedit module that does not exist."""
    known = modules(root)
    bad = []
    for name, targets in graph(root).items():
        for target in sorted(targets):
            if target not in known:
                bad.append(f"{name} imports {target}, which is not a module of any layer folder")
            elif layer_of(target) > layer_of(name):
                bad.append(f"{name} ({layer_name(name)}) imports {target} ({layer_name(target)})")
    return bad


def test_every_package_is_a_layer_folder():
    folders = set(packages().values()) - {"actedit"}
    assert folders == set(LAYERS), (
        f"folders without a layer: {folders - set(LAYERS)}; layers without a folder: {set(LAYERS) - folders}"
    )


def test_every_import_points_down_or_sideways():
    bad = layer_violations()
    assert not bad, "\n".join(bad)


def test_the_package_root_imports_nothing():
    """``import actedit`` runs no actedit module: its public names resolve lazily."""
    nodes = import_time_nodes(ROOT / "actedit" / "__init__.py")
    assert not [t for n in nodes for t in resolve("actedit", True, n, modules())]


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
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(known):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodules is not a cycle of the design
    cycles = [c for c in cycles if not any(c.startswith(p + " ->") and c.endswith(p) for p in packages())]
    assert not cycles, "\n".join(cycles)


def test_no_import_hides_inside_a_function():
    bad = []
    known = modules()
    for name, path in known.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                line, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if resolve(name, path.stem == "__init__", node, known) or getattr(node, "level", 0):
                    bad.append(f"{path.name}:{node.lineno}: imports actedit inside a function: {line.strip()}")
                elif "# lazy:" not in line and not before.startswith("# lazy:"):
                    bad.append(
                        f"{path.name}:{node.lineno}: a function-level import needs a '# lazy:' reason: {line.strip()}"
                    )
    assert not bad, "\n".join(bad)


def _copy_tree(tmp_path: Path) -> Path:
    """The package's folders and pyproject.toml, copied, for the failure demonstrations."""
    import shutil

    for folder in ["actedit", *LAYERS]:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_check_catches_an_upward_import(tmp_path):
    root = _copy_tree(tmp_path)
    hpr = root / "interventions" / "hpr.py"
    hpr.write_text(
        hpr.read_text().replace(
            "from __future__ import annotations\n",
            "from __future__ import annotations\n\nfrom actedit.data.store import ROLES\n",
            1,
        )
    )
    assert layer_violations(root) == [
        "actedit.interventions.hpr (core) imports actedit.data.store (data and collection)"
    ]


def test_the_check_catches_a_file_in_the_wrong_layer_folder(tmp_path):
    """The store (data and collection) moved into the core folder: its imports now point up."""
    root = _copy_tree(tmp_path)
    (root / "data" / "store.py").rename(root / "interventions" / "store.py")
    bad = layer_violations(root)
    assert any(v.startswith("actedit.interventions.store imports actedit.interventions.contrast") for v in bad), bad
    assert any(v.startswith("actedit.data.collect imports actedit.data.store, which is not a module") for v in bad), bad


def test_the_check_catches_an_import_in_a_class_body(tmp_path):
    root = _copy_tree(tmp_path)
    path = root / "interventions" / "registry.py"
    path.write_text(
        path.read_text().replace("class FitContext:\n", "class FitContext:\n    from actedit.eval import plots\n", 1)
    )
    assert any("actedit.interventions.registry (core) imports actedit.eval.plots" in v for v in layer_violations(root))


@pytest.mark.parametrize(
    "module",
    [
        "actedit.interventions.hpr",
        "actedit.data.collect",
        "actedit.train.pipeline",
        "actedit.eval.mc",
        "actedit.study",
        "actedit.cli",
        "actedit",
    ],
)
def test_each_layer_imports_on_its_own(module):
    """Importing any layer first works (no import-order dependence) and stays quiet."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nnsight" not in done.stdout + done.stderr


def test_importing_an_intervention_loads_the_core_only():
    """What pyvene does to rebuild an edit: ``import actedit.interventions.<method>`` for every
    method loads no data, training, evaluation, study or CLI module; ``actedit.fit`` still
    resolves from the package root."""
    code = (
        "import sys, importlib, actedit.interventions as core\n"
        "for spec in core.methods(): importlib.import_module(spec.intervention.__module__)\n"
        "above = sorted(m for m in sys.modules\n"
        "               if m.startswith('actedit.') and not m.startswith('actedit.interventions'))\n"
        "print(above)\n"
        "import actedit\n"
        "print(actedit.fit.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    above, fit_module = done.stdout.strip().splitlines()[-2:]
    assert above == "[]"
    assert fit_module == "actedit.train.api"
