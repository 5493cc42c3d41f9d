"""The layering of DESIGN.md ("Layout"), checked statically over the source files.

The three folders install as one package (``pipeline/x.py`` is ``dasktrain.x``, ``flows/x.py``
``dasktrain.flows.x``, ``cluster/x.py`` ``dasktrain.cluster.x``). Every import of a dasktrain
module counts, wherever it sits: at the top, inside a function (a late import that dodges a cycle
at import time is still a cycle in the design), under ``if TYPE_CHECKING:`` (the types of a layer
above are a dependency on it), relative, ``from dasktrain import x`` with ``x`` a module, and
``importlib.import_module("dasktrain...")`` with a literal name.

Three checks: no import cycle; only the CLI and the flows import the CLI or the flows; each
module imports only its own layer and the ones below it (:data:`LAYERS`), or the shared modules
(:data:`SHARED`), which import only each other. A new module fails the last check until it is
given a layer here. The walker has tests of its own, on a small tree with planted faults.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = {"dasktrain": "pipeline", "dasktrain.flows": "flows", "dasktrain.cluster": "cluster"}
"""Installed package name -> its folder (pyproject.toml [tool.setuptools.package-dir])."""

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # From the top: a module may import its own layer and the layers below it. ``x*`` is the
    # module or package ``x`` and everything under it.
    ("cli", ("dasktrain.cli",)),
    ("flows", ("dasktrain.flows*",)),
    ("run loop", ("dasktrain.run_loop", "dasktrain.records", "dasktrain.run_dir",
                  "dasktrain.prepare", "dasktrain.inference", "dasktrain.report", "dasktrain.tracking")),
    ("engines", ("dasktrain.engines*",)),
    ("worker side", ("dasktrain.replica", "dasktrain.stage_actor", "dasktrain.step_core", "dasktrain.collective",
                     "dasktrain.device", "dasktrain.reduce", "dasktrain.registry", "dasktrain.ledger",
                     "dasktrain.step_events")),
    # preflight: the driver's checks of stores and model before a run (metadata and the meta device).
    ("data and model", ("dasktrain.preflight", "dasktrain.store", "dasktrain.plan", "dasktrain.feed", "dasktrain.cache",
                        "dasktrain.normalize", "dasktrain.ingest", "dasktrain.models", "dasktrain.stages",
                        "dasktrain.objective", "dasktrain.streams", "dasktrain.running_stats",
                        "dasktrain.allocator", "dasktrain.rows", "dasktrain.keras_support",
                        "dasktrain.hf_support", "dasktrain.materialize", "dasktrain.schedules")),
)

SHARED = ("dasktrain", "dasktrain.config", "dasktrain.errors", "dasktrain.checkpoint", "dasktrain.metrics",
          "dasktrain.run_lock", "dasktrain.storage", "dasktrain.cluster*")
"""Importable from any layer; they import only each other. ``dasktrain`` itself is here because
its ``__init__`` runs before every submodule (on the workers too): it stays empty or shared-only."""

TOP_ONLY = ("dasktrain.cli", "dasktrain.flows*")
"""Only these may import these: nothing below the flows knows about Prefect or the terminal."""


# -- the walker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str
    """The importing module."""
    target: str
    """The imported module (an attribute imported from a package resolves to the package)."""
    where: str
    """``folder/file.py:line``."""


def project_modules(root: Path, packages: Mapping[str, str] = PACKAGES) -> dict[str, Path]:
    """Every module of the tree under ``root`` by its installed name (``__init__.py`` is the package)."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_ours(name: str) -> bool:
    return name == "dasktrain" or name.startswith("dasktrain.")


def _imports_of(name: str, path: Path, modules: Mapping[str, Path], root: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.AST) -> None:
        if target != name:
            found.append(Import(name, target, f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"))

    for node in ast.walk(tree):  # every node: imports inside functions, classes and ifs count too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not _is_ours(module):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module, node)  # ``from dasktrain.flows import prefect_api``
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            target = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(target, str) and _is_ours(target):
                add(target, node)
    return found


def project_imports(root: Path, packages: Mapping[str, str] = PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    """The tree's modules and every import of a dasktrain module among them, sorted."""
    modules = project_modules(root, packages)
    imports = [imp for name, path in modules.items() for imp in _imports_of(name, path, modules, root)]
    return modules, sorted(set(imports), key=lambda i: (i.source, i.target, i.where))


# -- the checks (each returns one line per violation) ----------------------------------------------


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p.rstrip("*") or (p.endswith("*") and name.startswith(p[:-1] + ".")) for p in patterns)


def _own_submodule(imp: Import, modules: Mapping[str, Path]) -> bool:
    """A package's ``__init__`` importing a module under it (a re-export, not a dependency cycle)."""
    return modules[imp.source].name == "__init__.py" and imp.target.startswith(imp.source + ".")


def import_cycles(modules: Mapping[str, Path], imports: Sequence[Import]) -> list[str]:
    """One line per cycle (strongly connected group of modules): its modules, one path round it,
    and every import among them with its line."""
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules and not _own_submodule(imp, modules):
            graph[imp.source].setdefault(imp.target, imp.where)

    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)

    lines = []
    for group in sorted(groups):
        start, members = group[0], set(group)
        # Shortest way from start back to itself inside the group (breadth first).
        came: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in came:
            v = queue.popleft()
            for w in sorted(graph[v]):
                if w in members and w not in came:
                    came[w] = v
                    queue.append(w)
        path = [start]
        while True:
            prev = came[path[0]]
            path.insert(0, prev)
            if prev == start:
                break
        inside = [f"{a} -> {b} ({where})" for a in group for b, where in sorted(graph[a].items()) if b in members]
        lines.append(f"cycle among {', '.join(group)}: e.g. {' -> '.join(path)}; its imports: {'; '.join(inside)}")
    return lines


def top_only_imports(imports: Sequence[Import]) -> list[str]:
    """Imports of the CLI or the flows from anywhere else."""
    return [f"{i.source} imports {i.target} ({i.where}): only the CLI and the flows may import the CLI or the flows"
            for i in imports if _matches(i.target, TOP_ONLY) and not _matches(i.source, TOP_ONLY)]


def layer_of(name: str) -> tuple[int, str] | None:
    """(depth from the top, layer name) of a module; depth len(LAYERS) for the shared modules."""
    if _matches(name, SHARED):
        return len(LAYERS), "shared"
    for depth, (title, patterns) in enumerate(LAYERS):
        if _matches(name, patterns):
            return depth, title
    return None


def layer_violations(modules: Mapping[str, Path], imports: Sequence[Import]) -> list[str]:
    """Modules without a layer, imports of a layer above, shared modules importing a layer, and
    imports of a dasktrain module no file defines."""
    lines = [f"{name} ({path.parent.name}/{path.name}) has no layer: place it in LAYERS or SHARED of tests/test_architecture.py "
             "(DESIGN.md, Layout)" for name, path in sorted(modules.items()) if layer_of(name) is None]
    for imp in imports:
        if imp.target not in modules:
            lines.append(f"{imp.source} imports {imp.target} ({imp.where}), which no file of the tree defines")
            continue
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is None or dst is None or dst[1] == "shared":
            continue
        if src[1] == "shared":
            lines.append(f"{imp.source} (shared) imports {imp.target} (layer {dst[0] + 1}, {dst[1]}) ({imp.where}): "
                         "shared modules import only each other")
        elif dst[0] < src[0]:
            lines.append(f"{imp.source} (layer {src[0] + 1}, {src[1]}) imports {imp.target} (layer {dst[0] + 1}, "
                         f"{dst[1]}) ({imp.where}): a layer imports only its own and the ones below")
    return lines


# -- the project -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    return project_imports(ROOT)


def test_package_folders_are_those_pyproject_installs() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"] == PACKAGES
    # Every folder of modules is listed, or a wheel (not an editable install) would leave it out.
    folders = {name for name, path in project_modules(ROOT).items() if path.name == "__init__.py"}
    assert folders == set(pyproject["tool"]["setuptools"]["packages"])


def test_no_import_cycle(project: tuple[dict[str, Path], list[Import]]) -> None:
    modules, imports = project
    assert len(modules) > 20 and len(imports) > 50  # the walker saw the tree
    cycles = import_cycles(modules, imports)
    assert not cycles, "\n".join(cycles)


def test_only_the_cli_and_the_flows_import_the_cli_and_the_flows(project: tuple[dict[str, Path], list[Import]]) -> None:
    lines = top_only_imports(project[1])
    assert not lines, "\n".join(lines)


def test_layers_import_only_downward(project: tuple[dict[str, Path], list[Import]]) -> None:
    lines = layer_violations(*project)
    assert not lines, "\n".join(lines)


# -- the walker and the checks, on a small tree with planted faults --------------------------------

SYNTHETIC = {
    "pipeline/__init__.py": "",
    "pipeline/errors.py": "class E(Exception): ...\n",
    "pipeline/config.py": "from . import errors\nfrom .errors import E\n",
    "pipeline/store.py": (
        "import dasktrain.errors\n"
        "def read():\n"
        "    from dasktrain.replica import Replica  # late, and upward\n"
    ),
    "pipeline/replica.py": (
        "from typing import TYPE_CHECKING\n"
        "from dasktrain import config, store\n"
        "if TYPE_CHECKING:\n"
        "    from dasktrain.collective import Group\n"
        "class Replica: ...\n"
    ),
    "pipeline/collective.py": "from dasktrain.replica import Replica\nclass Group: ...\n",
    "pipeline/models.py": (
        "import importlib\n"
        "def load():\n"
        "    importlib.import_module('dasktrain.cli')\n"
        "    return importlib.import_module('torch')\n"
    ),
    "pipeline/cli.py": "from dasktrain.flows import api, PrefectAPIError\nimport json\n",
    "pipeline/newthing.py": "from dasktrain.nothing import x\n",
    "pipeline/engines/__init__.py": "",
    "pipeline/engines/tree.py": "from ..replica import Replica\nfrom . import pipe\n",
    "pipeline/engines/pipe.py": "from dasktrain.engines.tree import x\n",
    "flows/__init__.py": "from dasktrain.flows.api import go\nclass PrefectAPIError(Exception): ...\n",
    "flows/api.py": "from dasktrain.flows import PrefectAPIError\nfrom dasktrain.errors import E\n",
    "cluster/__init__.py": "from dasktrain.cluster.specs import open_cluster\n",
    "cluster/specs.py": "from dasktrain.config import C\nfrom dasktrain.plan import P  # shared importing a layer\n",
    "pipeline/plan.py": "",
}


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[dict[str, Path], list[Import]]:
    for rel, text in SYNTHETIC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return project_imports(tmp_path)


def test_walker_maps_files_to_installed_names_and_finds_every_import_form(synthetic) -> None:
    modules, imports = synthetic
    assert sorted(modules) == sorted([
        "dasktrain", "dasktrain.errors", "dasktrain.config", "dasktrain.store", "dasktrain.replica",
        "dasktrain.collective", "dasktrain.models", "dasktrain.cli", "dasktrain.newthing", "dasktrain.engines",
        "dasktrain.engines.tree", "dasktrain.engines.pipe", "dasktrain.flows", "dasktrain.flows.api",
        "dasktrain.cluster", "dasktrain.cluster.specs", "dasktrain.plan"])
    assert sorted({(i.source, i.target) for i in imports}) == sorted([
        ("dasktrain.config", "dasktrain.errors"),  # relative, module and attribute forms
        ("dasktrain.store", "dasktrain.errors"),
        ("dasktrain.store", "dasktrain.replica"),  # inside a function
        ("dasktrain.replica", "dasktrain.config"),  # from dasktrain import <module>
        ("dasktrain.replica", "dasktrain.store"),
        ("dasktrain.replica", "dasktrain.collective"),  # under TYPE_CHECKING
        ("dasktrain.collective", "dasktrain.replica"),
        ("dasktrain.models", "dasktrain.cli"),  # importlib.import_module with a literal name
        ("dasktrain.cli", "dasktrain.flows.api"),  # from a package: a module...
        ("dasktrain.cli", "dasktrain.flows"),  # ...and an attribute of its __init__
        ("dasktrain.newthing", "dasktrain.nothing"),
        ("dasktrain.engines.tree", "dasktrain.replica"),  # two levels up
        ("dasktrain.engines.tree", "dasktrain.engines.pipe"),  # from . import <module>
        ("dasktrain.engines.pipe", "dasktrain.engines.tree"),
        ("dasktrain.flows", "dasktrain.flows.api"),
        ("dasktrain.flows.api", "dasktrain.flows"),
        ("dasktrain.flows.api", "dasktrain.errors"),
        ("dasktrain.cluster", "dasktrain.cluster.specs"),
        ("dasktrain.cluster.specs", "dasktrain.config"),
        ("dasktrain.cluster.specs", "dasktrain.plan"),
    ])
    where = {(i.source, i.target): i.where for i in imports}
    assert where["dasktrain.store", "dasktrain.replica"] == "pipeline/store.py:3"
    assert where["dasktrain.engines.tree", "dasktrain.replica"] == str(Path("pipeline/engines/tree.py")) + ":1"


def test_checks_catch_planted_cycles_and_upward_imports(synthetic) -> None:
    modules, imports = synthetic
    cycles = import_cycles(modules, imports)
    # Found: the late and the TYPE_CHECKING import both close a cycle. Not a cycle: a package's
    # __init__ re-exporting its own submodule, which imports the package (flows, flows.api).
    assert len(cycles) == 2, cycles
    assert cycles[0].startswith("cycle among dasktrain.collective, dasktrain.replica, dasktrain.store: ")
    assert "pipeline/replica.py:4" in cycles[0] and "pipeline/store.py:3" in cycles[0]
    assert cycles[1].startswith("cycle among dasktrain.engines.pipe, dasktrain.engines.tree: ")

    assert top_only_imports(imports) == [
        "dasktrain.models imports dasktrain.cli (pipeline/models.py:3): only the CLI and the flows may import "
        "the CLI or the flows"]

    lines = layer_violations(modules, imports)
    assert lines[0].startswith("dasktrain.newthing (pipeline/newthing.py) has no layer: place it in LAYERS")
    assert len(lines) == 5, "\n".join(lines)
    joined = "\n".join(lines)
    assert "dasktrain.newthing imports dasktrain.nothing (pipeline/newthing.py:1), which no file" in joined
    assert ("dasktrain.store (layer 6, data and model) imports dasktrain.replica (layer 5, worker side) "
            "(pipeline/store.py:3)") in joined
    assert "dasktrain.models (layer 6, data and model) imports dasktrain.cli (layer 1, cli)" in joined
    assert "dasktrain.cluster.specs (shared) imports dasktrain.plan (layer 6, data and model)" in joined
    # Allowed: downward (cli -> flows, engines -> worker side), within a layer, anything -> shared.


def test_every_layer_pattern_is_distinct() -> None:
    names = [p for _, patterns in LAYERS for p in patterns] + list(SHARED)
    assert len(names) == len(set(names))
    assert layer_of("dasktrain.flows.training") == (1, "flows")
    assert layer_of("dasktrain.engines") == (3, "engines") and layer_of("dasktrain.engines.tree") == (3, "engines")
    assert layer_of("dasktrain.cluster.specs") == (len(LAYERS), "shared")
    assert layer_of("dasktrain.flowsy") is None
