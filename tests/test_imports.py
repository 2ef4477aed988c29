"""Imports go one way, down the order docs/architecture.md states: a module of nbcnn imports, at
module level, only modules listed before it; nbcnn.kernels only where that page says."""

import ast
from pathlib import Path

NBCNN = Path(__file__).resolve().parent.parent / "nbcnn"

ORDER = ["errors", "checks", "device", "parameter", "schedules",
         "ops",
         "layers", "model", "models", "losses", "optim", "step",
         "images", "data",
         "distributed", "predict", "export", "train",
         "profile", "static", "stepbench", "bench",
         "cli", "__main__", "__init__"]
# Who may import nbcnn.kernels besides ops: checks (the argument checks are the kernels'), device (its CUDA test kernel), the measurement
# modules (they report on kernels by name), cli (nbcnn info) and __init__ (nbcnn.on_stream).
KERNELS_IMPORTED_BY = {"checks", "ops", "device", "profile", "static", "stepbench", "bench", "cli", "__init__"}
# Imports up the order, inside a function: a Residual's paths are Sequentials.
UPWARD_IN_FUNCTIONS = {("layers", "model")}


def imports(module):
    """(imported nbcnn module, whether at module level) for each import in ``module``."""
    tree = ast.parse((NBCNN / f"{module}.py").read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nbcnn"):
            parts = node.module.split(".")
            # ``from nbcnn import NAME`` of what the package defines (nbcnn.STARTED): the package
            # runs before any of its modules anyway
            names = [parts[1]] if len(parts) > 1 else [
                a.name for a in node.names if (NBCNN / f"{a.name}.py").exists()]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("nbcnn.")]
        found += [(name, id(node) in top) for name in names if name != module]
    return found


def test_every_module_is_in_the_order():
    assert sorted(ORDER) == sorted(p.stem for p in NBCNN.glob("*.py"))


def test_imports_go_down_the_order():
    for module in ORDER:
        for name, at_top in imports(module):
            if name == "kernels":
                assert module in KERNELS_IMPORTED_BY, f"nbcnn.{module} imports nbcnn.kernels"
            elif ORDER.index(name) > ORDER.index(module):
                assert not at_top and (module, name) in UPWARD_IN_FUNCTIONS, f"nbcnn.{module} imports nbcnn.{name}"


def test_the_kernels_never_import_the_framework():
    for path in (NBCNN.parent / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("nbcnn"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("nbcnn") for a in node.names), path
