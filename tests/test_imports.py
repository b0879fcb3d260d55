"""The import graph of ``lifelong_delta``, read from the source with ``ast`` (imports in functions included).

* The library never imports the CLI: ``cli.py`` imports the library and the studies, not the other way round.
* The components never import a study: ``lifelong_delta/studies/`` imports the library, not the other way round.
* No module imports itself round a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lifelong_delta"
CLI = "lifelong_delta.cli"

# (file, name) imports of the CLI allowed in the library: none. The studies that run `lightning fit` in-process take
# the entry point from lifelong_delta/runner.py, which cli.py imports too.
KNOWN_CLI_IMPORTS: set[tuple[str, str]] = set()

STUDIES = "lifelong_delta.studies"
# Modules that may import a study without being one: the CLI, which lists the studies as subcommands.
STUDY_IMPORTERS = {CLI}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``, which never run."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(module: str, tree: ast.Module, is_package: bool = False) -> Iterator[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import statement of ``module`` that runs.

    ``from pkg import sub`` yields ``(pkg.sub, None)`` when ``pkg.sub`` is a module of the package; relative
    imports are resolved against ``module`` (``is_package``: it is an ``__init__.py``).
    """
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None) if sub in MODULES else (base, alias.name)


def _imports_of(module: str) -> Iterator[tuple[str, str | None]]:
    path = MODULES[module]
    return _imports(module, ast.parse(path.read_text(), str(path)), path.name == "__init__.py")


def _owner(name: str) -> str | None:
    """The module of the package that ``name`` (a dotted import target) executes, or None if outside it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the package it imports (its own parent packages left out: they always run)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = {_owner(target) for target, _ in _imports_of(module)}
        graph[module] = {t for t in targets if t is not None and t != module and not module.startswith(f"{t}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_does_not_import_the_cli() -> None:
    found = set()
    for module, path in MODULES.items():
        if module == CLI:
            continue
        for target, name in _imports_of(module):
            if _owner(target) == CLI:
                found.add((path.relative_to(PACKAGE).as_posix(), name))
    assert found == KNOWN_CLI_IMPORTS, (
        f"the library imports lifelong_delta/cli.py: {sorted(found - KNOWN_CLI_IMPORTS)}; move what it needs "
        f"into a library module that cli.py imports (as repro.py). "
        f"No longer imported, drop from KNOWN_CLI_IMPORTS: {sorted(KNOWN_CLI_IMPORTS - found)}"
    )


def _is_study(module: str) -> bool:
    return module == STUDIES or module.startswith(f"{STUDIES}.")


def test_the_components_do_not_import_a_study() -> None:
    found = set()
    for module, path in MODULES.items():
        if _is_study(module) or module in STUDY_IMPORTERS:
            continue
        for target, _name in _imports_of(module):
            owner = _owner(target)
            if owner is not None and _is_study(owner):
                found.add((path.relative_to(PACKAGE).as_posix(), owner))
    assert not found, (
        f"components import a study: {sorted(found)}; move what they need from the study into the component "
        f"(a study composes the library, the library never depends on a study)"
    )


def test_the_checks_read_imports_as_python_runs_them() -> None:
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from lifelong_delta.cli import main
from lifelong_delta.continual import backbones, sources
from . import heads
from ..anchors import ParameterAnchor
import lifelong_delta.optim.adamr
def f():
    from lifelong_delta.repro import repro_command
"""
    assert set(_imports("lifelong_delta.continual.x", ast.parse(source))) == {
        ("typing", "TYPE_CHECKING"),
        ("lifelong_delta.continual.backbones", None),
        ("lifelong_delta.continual.sources", None),
        ("lifelong_delta.continual.heads", None),
        ("lifelong_delta.anchors", "ParameterAnchor"),
        ("lifelong_delta.optim.adamr", None),
        ("lifelong_delta.repro", "repro_command"),
    }
    assert _owner("lifelong_delta.cli.main") == CLI and _owner("torch.nn") is None
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], f"modules that import each other (imports in functions count): {found}"


def test_repro_imports_only_the_standard_library() -> None:
    code = "import json, sys, lifelong_delta.repro; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "lightning", "numpy", "jsonargparse")]
    assert heavy == []
