"""`Counter`: an int in state whose concurrent increments merge (real FileStorage heaps)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import durable_heap as dh


def test_counter_behaves_like_an_int_and_persists(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.hits = dh.Counter(5)
        state.hits += 2
        state.hits -= 1
        assert state.hits.increment(4) == 10
        assert state.hits.decrement() == 9
        c = state.hits
        assert isinstance(c, dh.Counter)  # += kept the Counter: nothing converted
        assert (int(c), c.value, float(c), bool(c)) == (9, 9, 9.0, True)
        assert c == 9 and c != 8 and 8 < c <= 9 and c > 1 and c >= dh.Counter(9)
        assert c + 1 == 10 and 1 + c == 10 and c - 1 == 8 and 10 - c == 1
        assert list(range(10))[c] == 9 and repr(c) == "Counter(9)"
        state.table = {"c": c}  # the same record, referenced twice
    heap = reopen(heap)
    with heap.transaction() as state:
        assert state.hits == 9 and state.table["c"] is state.hits
        state.hits.value = 0
    assert dh.to_builtin(heap.state.table) == {"c": 0}


def test_counter_refuses_non_ints_and_changes_outside_a_transaction(heap: dh.Heap) -> None:
    with pytest.raises(TypeError, match="must be an int, not float"):
        dh.Counter(1.5)  # type: ignore[arg-type]
    with heap.transaction() as state:
        state.hits = dh.Counter()
        with pytest.raises(TypeError, match="not bool"):
            state.hits += True
    with pytest.raises(dh.NoTransactionError):
        heap.state.hits.increment()
    assert heap.state.hits == 0
    with pytest.raises(TypeError):
        hash(heap.state.hits)


def test_increment_in_place_leaves_the_holder_clean(heap: dh.Heap) -> None:
    """``state.hits += 1`` assigns the Counter back: its holder must not become a
    change, or concurrent increments would conflict on the holder's record."""
    with heap.transaction() as state:
        state.hits = dh.Counter()
        state.small = {"hits": dh.Counter()}
    with heap.transaction() as state:
        state.hits += 1
        state.small["hits"] += 1
        assert state._p_changed is False and state.small._p_changed is False
        assert state.hits._p_changed is True


def test_resolver_adds_both_changes() -> None:
    c = dh.Counter()
    assert c._p_resolveConflict(10, 13, 11) == 14
    assert c._p_resolveConflict(10, 7, 15) == 12
    from ZODB.POSException import ConflictError

    with pytest.raises(ConflictError):
        c._p_resolveConflict(10, "x", 11)


def test_threads_increment_without_retries(heap_path: Path) -> None:
    """Concurrent transactions on one FileStorage: every increment merges at commit."""
    with dh.open(heap_path, attempts=1) as heap:  # one attempt: a conflict would fail
        with heap.transaction() as state:
            state.hits = dh.Counter()
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        @heap.action
        def bump() -> None:
            heap.state.hits += 1
            barrier.wait(timeout=30)  # all four are inside their transaction at once

        def run() -> None:
            try:
                for _ in range(10):
                    bump()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert heap.state.hits == 40
