"""The layers of #13: an engine that knows nothing above it, the facade over it, one retry
policy, and one program swap-in that puts everything back when a load fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ZODB.POSException import ConflictError as ZODBConflictError

import durable_heap as dh
from durable_heap import _facade, _heap, _registry, _retry, _timers, _versions, _workflows
from durable_heap._targets import parse_target
from tests.conftest import run, write


def test_the_public_heap_is_the_facade_over_the_engine(tmp_path: Path) -> None:
    assert dh.Heap is _facade.Heap and dh.open is _facade.open
    assert dh.Heap.__mro__[1:] == (_heap.HeapEngine, object)  # the upper layers come on demand
    with dh.open(tmp_path / "h.fs") as heap:
        assert isinstance(heap, dh.Heap) and isinstance(heap, _heap.HeapEngine)
        assert repr(heap).startswith("<durable_heap.Heap ")
        assert dh.active_heap() is heap
        assert heap.versions("nothing") == []  # an upper layer's method: the heap takes them on
        assert type(heap).__mro__[1:] == (_versions.Versions, _timers.WorkflowMethods, dh.Heap,
                                          _heap.HeapEngine, object)
        assert isinstance(heap, dh.Heap) and heap.lease == _workflows.DEFAULT_LEASE
    assert (_facade.DEFAULT_LEASE, _facade.DEFAULT_RETENTION) == (
        _workflows.DEFAULT_LEASE, _workflows.DEFAULT_RETENTION)


LEAN = """
    import sys
    import durable_heap as dh
    upper = {"durable_heap._versions", "durable_heap._program", "durable_heap._timers",
             "durable_heap._workflows", "durable_heap._types", "durable_heap._migrations"}
    with dh.open(sys.argv[1], clock=lambda: 5.0, lease=9) as heap:
        with heap.transaction() as state:
            state.n = state.get("n", 0) + 1
            state.d = {"a": [1]}
        print("after open, a commit and a read:", sorted(upper & set(sys.modules)))
        with heap.transaction() as state:
            print(type(state.d).__name__, type(state.d["a"]).__name__)  # converted, as always
        print(heap.missing if hasattr(heap, "missing") else "no attribute missing")
        print("after hasattr:", sorted(upper & set(sys.modules)))
        print(heap.clock(), heap.lease, isinstance(heap, dh.Heap))

        @heap.action
        def bump() -> int:
            state = heap.state
            state.n += 1
            return state.n

        print(bump(), callable(bump.invoke_in))
"""


def test_open_imports_neither_the_program_nor_the_workflow_layer(tmp_path: Path) -> None:
    """`dh.open`, a commit and a read import only the engine and the containers; the first
    use of an upper layer's method (an attribute lookup the engine cannot answer) imports
    them and gives the heap their methods and options, in place (issue 18, part 4)."""
    script = write(tmp_path / "lean.py", LEAN)
    out = run([str(script), str(tmp_path / "h.fs")])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "after open, a commit and a read: []", "Dict List", "no attribute missing",
        "after hasattr: ['durable_heap._migrations', 'durable_heap._program', 'durable_heap._timers', "
        "'durable_heap._types', 'durable_heap._versions', 'durable_heap._workflows']",
        "5.0 9.0 True", "2 True"]


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
