"""The package's shape (issue #13): stages take each other's artefacts, not each other's code.

Checked with ``ast`` over ``casd_ray/`` so it stays true: no stage module imports another
stage module, the training loop does not import the export format, and every module stays
small enough to read in one sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "casd_ray"
STAGES = {"teacher", "search", "finetune", "audit", "report"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every ``casd_ray`` module a file imports, at any depth (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("casd_ray"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("casd_ray"))
    return {m.split(".")[1] for m in out if m.count(".") >= 1}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = imported(PACKAGE / f"{stage}.py") & (STAGES - {stage})
    assert not others, f"casd_ray/{stage}.py imports stage modules {sorted(others)}"


def test_training_loop_does_not_import_export():
    assert "export" not in imported(PACKAGE / "distill.py")


def test_the_check_sees_imports():  # the checker itself must find a known import
    assert "trials" in imported(PACKAGE / "report.py")
    assert {"teacher", "search", "finetune", "audit", "report"} <= imported(PACKAGE / "pipeline.py")


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 410, f"{path.name}: split it"
