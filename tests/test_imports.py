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
         "perf", "perf.peer", "perf.profile", "perf.static", "perf.stepbench", "perf.bench",
         "cli", "__main__", "__init__"]
# Who may import nbcnn.kernels besides ops: checks (the argument checks are the kernels'), device
# (its CUDA test kernel), the measurement modules (they report on kernels by name), cli (nbcnn
# info) and __init__ (nbcnn.on_stream).
KERNELS_IMPORTED_BY = {"checks", "ops", "device", "perf.profile", "perf.static", "perf.stepbench", "perf.bench",
                       "cli", "__init__"}
# Imports up the order, inside a function: a Residual's paths are Sequentials.
UPWARD_IN_FUNCTIONS = {("layers", "model")}


def source(module):
    """The file of ``module`` ("layers", "perf.bench", "perf" for the package itself)."""
    path = NBCNN.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def known(name):
    return name == "kernels" or (NBCNN.joinpath(*name.split(".")).with_suffix(".py").exists()
                                 or NBCNN.joinpath(*name.split(".")).is_dir())


def imports(module):
    """(imported nbcnn module, whether at module level) for each import in ``module``: "layers",
    "perf.bench", "kernels" (any module of nbcnn.kernels)."""
    tree = ast.parse(source(module).read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nbcnn"):
            base = node.module.split(".")[1:]
            if base[:1] == ["kernels"]:
                names = ["kernels"]
            else:
                # ``from nbcnn import NAME`` / ``from nbcnn.perf import NAME``: NAME is a module when
                # there is one by that name; otherwise what the package itself defines (nbcnn.STARTED)
                for a in node.names:
                    whole = ".".join(base + [a.name])
                    if known(whole):
                        names.append(whole)
                    elif base:
                        names.append(".".join(base))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nbcnn."):
                    parts = a.name.split(".")[1:]
                    names.append("kernels" if parts[0] == "kernels" else ".".join(parts))
        found += [(name, id(node) in top) for name in dict.fromkeys(names) if name != module]
    return found


def test_every_module_is_in_the_order():
    files = [p.relative_to(NBCNN).with_suffix("") for p in NBCNN.rglob("*.py") if "_data" not in p.parts]
    names = sorted(".".join(p.parts[:-1]) if p.name == "__init__" and p.parts[:-1] else ".".join(p.parts)
                   for p in files)
    assert sorted(ORDER) == names


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


def test_every_package_is_installed():
    """A folder of nbcnn or kernels with an __init__.py is listed in pyproject.toml's packages (a
    missing one works in this checkout and is absent from a wheel)."""
    import tomllib

    listed = set(tomllib.loads((NBCNN.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for root, name in ((NBCNN, "nbcnn"), (NBCNN.parent / "kernels", "nbcnn.kernels")):
        for init in root.rglob("__init__.py"):
            assert ".".join([name, *init.parent.relative_to(root).parts]) in listed, init
