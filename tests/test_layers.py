"""The layers of #13: an engine that knows nothing above it, the facade over it, one retry
policy, and one program swap-in that puts everything back when a load fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ZODB.POSException import ConflictError as ZODBConflictError

import durable_heap as dh
from durable_heap import _facade, _heap, _registry, _retry, _timers, _versions
from durable_heap._targets import parse_target
from tests.conftest import write


def test_the_public_heap_is_the_facade_over_the_engine(tmp_path: Path) -> None:
    assert dh.Heap is _facade.Heap and dh.open is _facade.open
    assert dh.Heap.__mro__[1:] == (_versions.Versions, _timers.WorkflowMethods, _heap.HeapEngine, object)
    with dh.open(tmp_path / "h.fs") as heap:
        assert isinstance(heap, dh.Heap) and isinstance(heap, _heap.HeapEngine)
        assert repr(heap).startswith("<durable_heap.Heap ")
        assert dh.active_heap() is heap


def test_the_engine_alone_runs_transactions_and_installs_no_programs() -> None:
    engine = _heap.HeapEngine(parse_target("memory://"))
    try:
        with engine.transaction() as state:
            state.n = 1
        assert engine.state.n == 1
        assert not hasattr(engine, "deploy") and not hasattr(engine, "load")
        assert engine.install_definitions(engine.connection, "some_program") == "absent"
    finally:
        engine.close()


def test_the_retry_policy_retries_conflicts_only_and_names_the_note() -> None:
    calls: list[int] = []

    def conflicting() -> None:
        calls.append(1)
        raise ZODBConflictError()

    with pytest.raises(dh.ConflictError, match=r"in add\('ann'\), and the transaction was tried 3 times"):
        _retry.retry(conflicting, attempts=3, note=_retry.call_note("add", ("ann",), {}))
    assert len(calls) == 3

    def failing() -> None:
        calls.append(1)
        raise ValueError("the program's own error")

    calls.clear()
    with pytest.raises(ValueError, match="own error"):
        _retry.retry(failing, attempts=3, note="x")
    assert len(calls) == 1  # never retried
    assert _retry.retry(lambda: 7, attempts=1, note=None) == 7


def test_a_failed_first_deploy_leaves_no_trace_of_the_program(tmp_path: Path) -> None:
    app = write(tmp_path / "layers_first.py", "x = 1 / 0\n")
    with dh.open(tmp_path / "h.fs") as heap:
        with pytest.raises(dh.DeployError, match="nothing was committed"):
            heap.deploy(app)
        assert "layers_first" not in sys.modules
        assert "layers_first" not in _registry.program_roots  # as it was before the deploy
        assert heap.renames == {}


def test_a_failed_view_load_puts_the_loaded_version_back(tmp_path: Path) -> None:
    app = write(tmp_path / "layers_view.py", """
        from durable_heap import Object, state

        class Item(Object):
            pass

        state.setdefault("n", 1)
    """)
    with dh.open(tmp_path / "h.fs") as heap:
        heap.deploy(app)
        loaded = sys.modules["layers_view"]
        write(app, "raise RuntimeError('broken on disk')\n")
        with pytest.raises(dh.ProgramError, match="broken on disk"):
            _versions.load_discarded(heap, app, from_file=True)
        assert sys.modules["layers_view"] is loaded  # not a half-built module
        assert "layers_view" in _registry.program_roots
