"""The code's seams, checked from the source alone (no imports run): no import cycle inside gradprune_mlflow, no
module over 300 lines, no Prefect in the library, and the flows installed under a name no other package claims.

Only module-level imports count towards cycles (top level, class bodies, `try`/`if` blocks; not
`if TYPE_CHECKING:`): they run while a module is being imported, which is when a cycle breaks. Imports inside
functions run later, when every module is complete, and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gradprune_mlflow", "gradprune_flows")
MAX_LINES = 300


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, *, module_level: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for each import; with module_level, not those in functions or
    under `if TYPE_CHECKING:`."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if module_level and isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, [alias.name for alias in child.names], child.lineno))
            visit(child)

    visit(tree)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports at module level. `from pkg import mod` points at pkg.mod
    when that is a module; parent packages a dotted import also runs are not counted (every module would then sit
    in a cycle with the package's own __init__)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _line in _imports(ast.parse(path.read_text()), module_level=True):
            if target not in modules:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            graph[name].update(subs or [target])
            if len(subs) < len(names):  # names that are attributes of the target module itself
                graph[name].add(target)
            graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycles = _cycles(_graph(package))
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_300_lines(package):
    long = {str(p.relative_to(REPO)): n for p in _modules(package).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_the_library_imports_no_prefect():
    """The library runs without Prefect; only gradprune_flows composes it into flows. The CLI may import Prefect and
    the flows inside its commands (they are what `scan`, `serve`, `demo` and `webhook` run), never at module level."""
    bad = []
    for name, path in _modules("gradprune_mlflow").items():
        in_cli = name.startswith("gradprune_mlflow.cli")
        for target, _names, line in _imports(ast.parse(path.read_text()), module_level=in_cli):
            if target.split(".")[0] in ("prefect", "gradprune_flows"):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, bad


def test_flows_install_under_their_own_name_and_flows_stays_the_entrypoint_folder(tmp_path):
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(pattern.startswith("gradprune_") for pattern in include), include
    # Outside the repository only the installed names resolve: no top-level `flows` is claimed.
    code = ("import importlib.util as u; assert u.find_spec('flows') is None, 'flows installed'; "
            "assert u.find_spec('gradprune_flows') is not None")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    for entry in ("flows/sanitize.py", "flows/scan.py"):
        targets = [t for t, _n, _l in _imports(ast.parse((REPO / entry).read_text()), module_level=True)]
        assert any(t.startswith("gradprune_flows.") for t in targets), entry
