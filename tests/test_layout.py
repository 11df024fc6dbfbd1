"""The package's shape: folders that are the pipeline, rules that keep them honest.

Checked with ``ast`` over ``casd_ray/`` (lazy imports included) so it stays true: no import
cycle; each package imports only what its ``__init__`` docstring says; only ``search/``
and ``stream/`` import ray; stages never import each other; lazy imports only at the entry
points; reading the CLI does not import torch; every module stays small enough to read in
one sitting.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "casd_ray"
FILES = sorted(PACKAGE.rglob("*.py"))
ENTRY_POINTS = {"casd_ray", "casd_ray.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, inside a function?) for every import in ``path``, any package."""
    tree = ast.parse(path.read_text())
    in_func: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_func |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in in_func) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, id(node) in in_func))
            out += [(f"{node.module}.{a.name}", id(node) in in_func) for a in node.names]
    return out


def internal(path: Path) -> set[str]:
    """The casd_ray modules ``path`` imports (resolved to files), itself excluded."""
    me = module_name(path)
    found = {_resolve(name) for name, _ in imports(path) if name.startswith("casd_ray")}
    return {m for m in found if m and m != me}


GRAPH = {m: internal(p) for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a chain of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():  # the checker itself must see one when it exists
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _top(m: str) -> str:
    """The package (or top-level module) of ``m``: ``casd_ray.models.graph`` -> ``models``."""
    return m.split(".")[1] if m.count(".") else ""


# package -> the casd_ray packages and top-level modules it may import (besides its own)
ALLOWED = {
    "models": {"errors"},
    "data": {"config", "errors"},
    "widths": {"models", "config", "errors"},
    "train": {"data", "files", "errors"},
    "artifacts": {"models", "files", "errors"},
    "report": {"artifacts", "files", "errors"},
    "errors": set(),
    "files": {"errors"},
    "config": {"errors", "files", "models", "config_data"},
    "config_data": {"errors"},
    "stream": {"data", "config", "files", "errors"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_rule(package):
    broken = {
        m: sorted({_top(n) for n in deps} - ALLOWED[package] - {package})
        for m, deps in GRAPH.items()
        if _top(m) == package or m == f"casd_ray.{package}"
    }
    broken = {m: bad for m, bad in broken.items() if bad}
    assert not broken, f"{package}/ imports what its rule forbids: {broken}"


def test_config_reads_only_names_of_models():  # config must stay torch-free
    assert {n for n in GRAPH["casd_ray.config"] if _top(n) == "models"} <= {
        "casd_ray.models",
        "casd_ray.models.names",
    }


RAY_PACKAGES = {"search", "stream"}  # the search on Ray Tune; streaming data on Ray Data


def test_only_search_and_stream_import_ray():
    outside = sorted(
        m
        for m, p in MODULES.items()
        if _top(m) not in RAY_PACKAGES
        and any(n == "ray" or n.startswith("ray.") for n, _ in imports(p))
    )
    assert not outside, f"ray imported outside casd_ray/search and casd_ray/stream: {outside}"


STAGES = ("teacher", "finetune", "audit")


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_neither_each_other_nor_search(stage):
    deps = GRAPH[f"casd_ray.pipeline.stages.{stage}"]
    others = {f"casd_ray.pipeline.stages.{s}" for s in STAGES if s != stage}
    assert not deps & others, f"stage {stage} imports another stage"
    assert not {d for d in deps if _top(d) == "search"}, f"stage {stage} imports search/"


def test_only_the_pipeline_runner_calls_stages_and_search():
    callers = {
        m
        for m, deps in GRAPH.items()
        if any(
            d.startswith("casd_ray.search")
            or d in {f"casd_ray.pipeline.stages.{s}" for s in STAGES}
            for d in deps
        )
        and _top(m) != "search"
    }
    assert callers == {"casd_ray.pipeline.run"}, callers


def test_lazy_imports_only_at_entry_points():
    lazy = {
        m: sorted({n for n, inside in imports(p) if inside and n.startswith("casd_ray")})
        for m, p in MODULES.items()
        if m not in ENTRY_POINTS
    }
    lazy = {m: names for m, names in lazy.items() if names}
    assert not lazy, f"function-level casd_ray imports outside the entry points: {lazy}"


def test_every_package_states_its_rule():
    missing = [
        m for m, p in MODULES.items() if p.name == "__init__.py" and m != "casd_ray"
        if "Rule" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]  # fmt: skip
    assert not missing, f"packages without a stated rule in their docstring: {missing}"


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, casd_ray.cli; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_checks_see_imports():  # the checkers themselves must find known imports
    assert "casd_ray.artifacts.trials" in GRAPH["casd_ray.report.build"]
    assert {f"casd_ray.pipeline.stages.{s}" for s in STAGES} <= GRAPH["casd_ray.pipeline.run"]
    assert ("ray", False) in imports(MODULES["casd_ray.search.session"]) or any(
        n.startswith("ray") for n, _ in imports(MODULES["casd_ray.search.run"])
    )


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 410, f"{path.name}: split it"
