"""The one direction of imports (docs/architecture.md), checked on the source with ``ast``.

Every module of ``r1platform/``, ``gpu_workers/`` and ``pipelines/`` (migrations aside) is read,
and every import in it is collected: at the top, inside functions, under ``TYPE_CHECKING``
(a type-only import still ties two modules together), relative ones resolved, and
``from pkg import name`` taken as the submodule ``pkg.name`` when there is one. Nothing is
imported to do it, so a module that would fail to import is still checked.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("r1platform", "gpu_workers", "pipelines")

# The apps of r1platform from the bottom up: an app imports only the apps before it. The project
# modules (settings, env, celery, queues) sit below every app; the web side sits above them all.
APP_LAYERS = (
    "core",
    "accounts",
    "workers",
    "registry",
    "datasets",
    "jobs",
    "certification",
    "deployments",
    "serving",
    "notifications",
    "schedules",
    "monitoring",
)
PROJECT_BASE = {
    "r1platform",
    "r1platform.env",
    "r1platform.settings",
    "r1platform.celery",
    "r1platform.queues",
}
# Modules that face users: pages, the API, admin, commands. They may import any app.
WEB_PARTS = {"views", "urls", "forms", "admin", "templatetags", "management", "tables", "api"}
WEB_MODULES = {
    "r1platform.urls",
    "r1platform.wsgi",
    "r1platform.core.context_processors",
    # Seeds a demo team through every app's services; only management commands call it.
    "r1platform.core.demo",
}
# Only a worker loads task modules (by name); work is sent to them by task name.
TASK_PART = "tasks"
OUTSIDE_LIBRARIES_OF_PIPELINES = ("django", "celery", "kombu", "r1platform", "gpu_workers")
# The parts of pipelines the stages are made of: they sit below ``pipelines.stages``, which
# composes them, so none of them imports a stage (its settings included).
BELOW_THE_STAGES = (
    "pipelines.certification",
    "pipelines.engines",
    "pipelines.backends",
    "pipelines.datasets",
    "pipelines.formats",
    "pipelines.quantization",
    "pipelines.finetuning",
)
STAGES = "pipelines.stages"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        return f"{self.source} -> {self.target} ({_path(self.source)}:{self.line}, {where})"


@cache
def modules() -> dict[str, Path]:
    """Every module by dotted name (a package by its own name, for its ``__init__``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _path(module: str) -> str:
    return str(modules()[module].relative_to(ROOT))


def _is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of ours (None for other libraries)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules():
            return candidate
        parts.pop()
    return None


def _imports(module: str) -> Iterator[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import of ``module``; a ``from``
    import gives ``pkg.name`` for each name, and ``pkg`` itself when the name is no module."""
    tree = ast.parse(modules()[module].read_text(), filename=_path(module))
    functions: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for inner in ast.walk(node):
                if inner is not node:
                    functions.add(id(inner))
    for node in ast.walk(tree):
        in_function = id(node) in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, in_function
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not _is_package(module):
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                yield (submodule if submodule in modules() else origin), node.lineno, in_function


@cache
def edges() -> tuple[Edge, ...]:
    """Every import between two modules of ours (a module importing itself left out)."""
    found: dict[Edge, None] = {}  # ordered and unique: `from a import b, c` is one edge
    for module in modules():
        for name, line, in_function in _imports(module):
            target = _resolve(name)
            if target is not None and target != module:
                found[Edge(module, target, line, in_function)] = None
    return tuple(found)


def _app(module: str) -> str | None:
    """The r1platform app a module belongs to, or None for a project module."""
    parts = module.split(".")
    return (
        parts[1] if parts[0] == "r1platform" and len(parts) > 1 and parts[1] in APP_LAYERS else None
    )


def _is_web(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "r1platform" and (
        module in WEB_MODULES or any(p in WEB_PARTS for p in parts[1:])
    )


def _is_tasks(module: str) -> bool:
    return module.split(".")[-1] == TASK_PART


def _strongly_connected(nodes: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a long chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _fail(title: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{title}:\n  " + "\n  ".join(sorted(set(problems))), pytrace=False)


# -- the checks --------------------------------------------------------------------------------


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for edge in edges():
        graph[edge.source].add(edge.target)
    cycles = [c for c in _strongly_connected(list(modules()), graph) if len(c) > 1]
    report = []
    for members in cycles:
        inside = set(members)
        lines = [str(e) for e in edges() if e.source in inside and e.target in inside]
        report.append(f"{len(members)} modules: {', '.join(members)}\n    " + "\n    ".join(lines))
    _fail(
        "modules that import each other (break each cycle by moving the shared piece down)", report
    )


def test_pipelines_imports_nothing_of_the_platform():
    problems = []
    for module in modules():
        if not module.startswith("pipelines"):
            continue
        for name, line, in_function in _imports(module):
            top = name.split(".")[0]
            if top in OUTSIDE_LIBRARIES_OF_PIPELINES:
                where = "in a function" if in_function else "at module level"
                problems.append(f"{module} imports {name} ({_path(module)}:{line}, {where})")
    _fail("pipelines is the library at the bottom: no Django, Celery or platform code", problems)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_parts_below_the_stages_never_import_them():
    problems = [
        str(e)
        for e in edges()
        if any(_within(e.source, part) for part in BELOW_THE_STAGES) and _within(e.target, STAGES)
    ]
    _fail(
        "certification, engines, backends, datasets, formats, quantization and finetuning sit "
        "below the stages: a stage imports them, never the other way",
        problems,
    )


def test_r1platform_never_imports_gpu_workers():
    problems = [
        str(e)
        for e in edges()
        if e.source.startswith("r1platform") and e.target.startswith("gpu_workers")
    ]
    _fail("r1platform sends work by task name and never imports gpu_workers", problems)


def test_settings_and_celery_import_no_worker_code():
    problems = [
        str(e)
        for e in edges()
        if e.source in {"r1platform.settings", "r1platform.celery"}
        and (e.target.startswith("gpu_workers") or _is_tasks(e.target))
    ]
    _fail(
        "every process imports settings and celery: they name worker modules as strings", problems
    )


def test_project_modules_import_no_app():
    problems = [
        str(e)
        for e in edges()
        if e.source in PROJECT_BASE
        and e.target.startswith("r1platform")
        and e.target not in PROJECT_BASE
    ]
    _fail("settings, env, celery and queues sit below every app", problems)


def test_an_app_imports_only_the_apps_below_it():
    rank = {app: i for i, app in enumerate(APP_LAYERS)}
    problems = []
    for edge in edges():
        source, target = _app(edge.source), _app(edge.target)
        if source is None or target is None or source == target or _is_web(edge.source):
            continue
        if rank[target] > rank[source]:
            problems.append(f"{edge}: {source} sits below {target}")
    _fail(f"apps import downward only ({' < '.join(APP_LAYERS)} < the web side)", problems)


def test_nothing_below_the_web_side_imports_it():
    problems = [
        f"{e}: {e.target} is the web side"
        for e in edges()
        if e.source.startswith(("r1platform", "gpu_workers"))
        and not _is_web(e.source)
        and _is_web(e.target)
    ]
    _fail("services, tasks and workers never import views, the API, forms or commands", problems)


def test_no_module_imports_a_task_module():
    problems = [str(e) for e in edges() if _is_tasks(e.target) and not e.source.startswith("tests")]
    _fail("task modules are loaded by the worker only; work is sent by task name", problems)


def test_no_module_imports_its_own_package():
    problems = [
        f"{e}: names from the package's __init__ (import the submodule that holds them)"
        for e in edges()
        if _is_package(e.target) and e.source.startswith(e.target + ".")
    ]
    _fail("a module never imports the __init__ of a package it is part of", problems)


def test_the_checks_see_function_level_imports():
    """The walk itself: a function-level import is an edge like any other."""
    found = {(e.source, e.target) for e in edges() if e.in_function}
    assert found, "no function-level import found: the walk is broken"
    assert sys.version_info >= (3, 10)  # ast.walk over match statements and `X | Y` types
