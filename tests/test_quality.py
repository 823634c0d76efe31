"""The package type-checks under mypy --strict and passes the linter (both configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "durable_heap", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _import_graph() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_is_one_way() -> None:
    """The package's imports run down the layers of tools/import_graph.py: no cycle, no
    upward import (lazy ones count; only ``if TYPE_CHECKING:`` imports are left out),
    and every module has a layer. The engine (_heap) knows nothing above it."""
    data = _import_graph().report()  # type: ignore[attr-defined]
    assert data["cycles"] == [], data["cycles"]
    assert data["upward"] == [], data["upward"]
    assert data["unplaced"] == [], data["unplaced"]
    engine_and_below = {"_heap", "_retry", "_format", "_values", "_kinds", "_paths", "_registry",
                        "_snapshot", "_storable", "_watch", "_defaults", "_state", "_containers",
                        "_counter"}
    above = {"_versions", "_types", "_stubs", "_program", "_facade", "cli", "testing", "_workflows"}
    for name in engine_and_below & set(data["edges"]):
        assert not above & set(data["edges"][name]), (name, data["edges"][name])
