"""The package's layout holds its own rules (docs/architecture.md): read from the source, as text and syntax trees.

One folder per concept with its job in its ``__init__`` docstring, a few modules at the
top, no import loops, no reach into another module's private names, every exception in
``errors.py``, and the import paths users name still there.
"""

from __future__ import annotations

import ast
import importlib
import os
from collections import defaultdict

import pytest

import fisherstore

PKG = os.path.dirname(fisherstore.__file__)


def _modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path).read()) for name, path in MODULES.items()}


def _imports(name: str) -> list[tuple[str, str]]:
    """``(module, imported name)`` of every ``from X import Y`` of a module inside the package (absolute)."""
    is_pkg = MODULES[name].endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "fisherstore":
                out += [(target, a.name) for a in node.names]
    return out


def test_the_top_holds_a_few_modules_and_the_concepts_are_folders():
    top = [n for n in os.listdir(PKG) if n.endswith(".py")]
    folders = [n for n in os.listdir(PKG) if os.path.isfile(os.path.join(PKG, n, "__init__.py"))]
    assert len(top) <= 12, sorted(top)
    assert len(folders) >= 5, folders
    for name, path in MODULES.items():  # every module, package or not, says its job
        assert ast.get_docstring(TREES[name]), f"{path} has no docstring"


def test_no_module_imports_another_modules_private_names():
    private = [(n, t, y) for n in MODULES for t, y in _imports(n) if y.startswith("_") and not y.startswith("__")]
    assert private == []


def test_no_module_reaches_into_another_objects_private_attributes():
    reach = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                reach.append((name, node.lineno, ast.unparse(node)))
    # torch has no public spelling of "this tensor is a view of another" (collect/autograd.py says why)
    assert [(n, what) for n, _, what in reach] == [("fisherstore.collect.autograd", "g._base")]


def test_there_is_no_import_loop():
    graph = defaultdict(set)
    for name in MODULES:
        for target, imported in _imports(name):
            sub = f"{target}.{imported}"
            dep = sub if sub in MODULES else target
            if dep != name and dep in MODULES:
                graph[name].add(dep)
    done, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import loop: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for dep in graph[node]:
            if not dep.startswith(node + "."):  # a package importing its own modules is no loop
                visit(dep)
        stack.pop()
        done.add(node)

    for name in MODULES:
        visit(name)


#: The floors of the package, bottom up: a module imports its own floor or lower ones only (docs/architecture.md).
FLOORS = [
    {"errors", "progress", "_version"},
    {"spec", "losses"},
    {"backends"},
    {"engine"},
    {"store"},
    {"collect", "views", "optimizers", "consumers"},
    {"qkov"},
    {"integrations", "testing"},
    {"cli"},
    {"__init__", "compat", "phase6", "verify"},  # the package's face and the kept import paths
]


def _floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(FLOORS) if part in names)


#: The one arrow that runs up: the facade's notebook verbs (store.to_dask, to_xarray, summary) are sugar over
#: fisherstore.views, imported when called, so a store never loads xarray, Dask or pandas it is not asked for.
UPWARD = {("fisherstore.store.read_verbs", "fisherstore.views.arrays"),
          ("fisherstore.store.read_verbs", "fisherstore.views.summary")}


def test_every_import_points_down_the_floors():
    up = []
    for name in MODULES:
        for target, imported in _imports(name):
            sub = f"{target}.{imported}"
            dep = sub if sub in MODULES else target
            if dep in MODULES and _floor(dep) > _floor(name) and (name, dep) not in UPWARD:
                up.append((name, dep))
    assert up == []


def test_every_exception_and_warning_is_defined_in_errors():
    outside = []
    for name, tree in TREES.items():
        if name == "fisherstore.errors":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).split(".")[-1] for b in node.bases}
                if any(b.endswith(("Error", "Warning", "Exception")) for b in bases):
                    outside.append(f"{name}.{node.name}")
    assert outside == []
    errors = importlib.import_module("fisherstore.errors")
    for n in errors.__all__:
        assert issubclass(getattr(errors, n), (fisherstore.FisherStoreError, Warning)), n


@pytest.mark.parametrize("path, names", [
    ("fisherstore", fisherstore.__all__),
    ("fisherstore.qkov", ["QKOVIndexer", "QKOVInterference", "BlockHeadSlice", "heatmap_png"]),
    ("fisherstore.phase6", ["compare_fishers", "plot_comparison", "weighted_gram", "contribution_mean"]),
    ("fisherstore.compat", ["TensorScopeAdapter"]),
    ("fisherstore.integrations", ["collect_from_grads"]),
    ("fisherstore.integrations.hf", ["FisherCallback", "FisherCallbackWarning"]),
    ("fisherstore.losses", ["causal_lm", "seq2seq_lm", "masked_lm"]),
    ("fisherstore.views", ["block_sums", "to_dask", "to_xarray"]),
    ("fisherstore.cli", ["main", "EXIT_CODES", "store_info", "run_demo", "build_parser"]),
    ("fisherstore.verify", ["verify_store"]),
    ("fisherstore.store", ["FisherStore", "StepWriter"]),
    ("fisherstore.testing", ["BackendTests"]),
])
def test_the_import_paths_users_name_keep_working(path, names):
    module = importlib.import_module(path)
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == []


def test_protocols_declare_public_members_only():
    declared = {}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Protocol" in ast.unparse(b) for b in node.bases):
                members = [n.target.id for n in node.body if isinstance(n, ast.AnnAssign)]
                members += [n.name for n in node.body if isinstance(n, ast.FunctionDef)]
                declared[f"{name}.{node.name}"] = members
    assert "fisherstore.collect.step_loop.Collecting" in declared
    assert "fisherstore.collect.multipass.MultiPassCollector" in declared
    private = {p: [m for m in ms if m.startswith("_") and not m.startswith("__")] for p, ms in declared.items()}
    assert {p: ms for p, ms in private.items() if ms} == {}
