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


def test_the_storage_side_imports_only_downward() -> None:
    """No import cycle through a storage-side module, and none of them imports a layer
    above its own (lazy imports count): targets and the error map at the bottom,
    then the backends, then the dispatcher; the ZEO server sits in the faces layer."""
    graph = _import_graph()
    data = graph.report()  # type: ignore[attr-defined]
    storage_side = {"_targets", "_errormap", "_allow", "_integrity", "_filestorage", "_follow",
                    "_zeo", "_storage", "_zeo_server"}
    assert not [c for c in data["cycles"] if storage_side & set(c)], data["cycles"]
    assert not [u for u in data["upward"] if u.split(" -> ")[0] in storage_side], data["upward"]
    assert not storage_side & set(data["unplaced"])
    edges = data["edges"]
    assert "_zeo" not in edges["_targets"] and "_storage" not in edges["_zeo"]
    assert set(edges["_targets"]) <= {"_errors"}  # the bottom of the storage side
