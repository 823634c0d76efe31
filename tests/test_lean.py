"""Issue 18, part 3: the one-entry commit does no more than it must (real FileStorage)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import _containers
from durable_heap._containers import _Entries, _entries_watched, _EntryBucket

N = 6_000  # past 64 buckets of entries: the trees have inner nodes


def _build(path: Path, n: int = N) -> None:
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = {f"k{i:07d}": i for i in range(n)}


def _count_current_checks(heap: Any) -> list[bytes]:
    """Record the storage's checkCurrentSerialInTransaction calls (the real storage runs them)."""
    storage = heap.connection.db().storage
    calls: list[bytes] = []
    real = storage.checkCurrentSerialInTransaction

    def counting(oid: bytes, serial: bytes, txn: Any) -> Any:
        calls.append(oid)
        return real(oid, serial, txn)

    storage.checkCurrentSerialInTransaction = counting
    return calls


def test_replacing_a_value_checks_no_inner_node(tmp_path: Path) -> None:
    """BTrees' set would readCurrent every inner node on the way down: one message each over ZEO."""
    path = tmp_path / "h.fs"
    _build(path)
    with dh.open(path) as heap:
        with heap.transaction() as state:
            assert len(_containers.LOBTree.__getstate__(state.d._entries)[0]) > 1  # inner nodes
        calls = _count_current_checks(heap)
        for i in range(0, N, 997):
            with heap.transaction() as state:
                state.d[f"k{i:07d}"] = -i
        assert calls == []
        with heap.transaction() as state:
            state.d["new"] = 1  # an insert still guards the index (and BTrees its path)
        assert calls
        with heap.transaction() as state:
            assert [state.d[f"k{i:07d}"] for i in range(0, N, 997)] == [-i for i in range(0, N, 997)]
            state.d._entries._check()
            assert len(state.d) == N + 1


def test_a_replace_racing_a_split_of_its_bucket_is_never_lost(tmp_path: Path) -> None:
    """The other side moves the key to a new bucket: the two commits conflict on the old one."""
    path = tmp_path / "h.fs"
    _build(path, 3_000)
    with dh.open(path) as heap:
        with heap.transaction() as state:
            last = list(state.d)[-1]
        changed = threading.Event()
        split = threading.Event()
        tries: list[int] = []

        def replace() -> None:
            def action() -> None:
                tries.append(1)
                heap.state.d[last] = "mine"
                if len(tries) == 1:
                    changed.set()
                    split.wait(30)  # the split commits in between

            heap.run(action)

        t = threading.Thread(target=replace)
        t.start()
        assert changed.wait(30)
        with heap.transaction() as state:  # appends split the last bucket, moving `last`
            for i in range(200):
                state.d[f"z{i:05d}"] = i
        split.set()
        t.join(30)
        assert len(tries) == 2  # the first commit conflicted and the action ran again
        with heap.transaction() as state:
            assert state.d[last] == "mine"
            assert len(state.d) == 3_200
            assert [state.d[f"z{i:05d}"] for i in range(200)] == list(range(200))
            state.d._entries._check()
            state.d._index._check()


def test_trees_stored_with_the_old_fanout_keep_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INNER_FANOUT went from 64 to 128: nodes written under 64 grow further, nothing breaks."""
    path = tmp_path / "h.fs"
    with monkeypatch.context() as m:
        m.setattr(_Entries, "max_internal_size", 64)
        m.setattr(_containers._Index, "max_internal_size", 64)
        with dh.open(path) as heap, heap.transaction() as state:
            state.d = {f"k{i:07d}": i for i in range(20_000)}
            state.h = {i: i for i in range(20_000)}  # int keys: the _Index of stable hashes
    assert _Entries.max_internal_size == 128
    with dh.open(path) as heap:
        with heap.transaction() as state:
            for i in range(20_000, 30_000):
                state.d[f"k{i:07d}"] = i
                state.h[i] = i
            for i in range(0, 30_000, 7):
                state.d[f"k{i:07d}"] = -i
        with heap.transaction() as state:
            for tree in (state.d._entries, state.d._index, state.h._entries, state.h._index):
                tree._check()
            assert len(state.d) == len(state.h) == 30_000
            assert all(state.d[f"k{i:07d}"] == (-i if i % 7 == 0 else i) for i in range(30_000))
            sizes = [len(_containers.LOBTree.__getstate__(n)[0]) // 2 + 1
                     for n in _containers.LOBTree.__getstate__(state.d._entries)[0][::2]]
            assert max(sizes) > 64  # a node written under 64 grew past it


@dataclasses.dataclass
class _Point:
    x: int


def test_the_bucket_watch_fast_path_agrees_with_holds_watched() -> None:
    from durable_heap._kinds import holds_watched

    def state_of(entries: list[tuple[Any, Any]]) -> tuple[Any, ...]:
        return (tuple(x for seq, e in enumerate(entries) for x in (seq, e)),)

    for entries in ([("a", 1), ("b", 2.5)], [(1, None), ("c", b"x")], [("a", _Point(1))]):
        state = state_of(entries)
        assert _entries_watched(state) == holds_watched(_containers._bucket_values(state))
    assert _entries_watched(state_of([("a", _Point(1))]))  # a plain object: watched
    for raw in ([1], {"x": 1}):  # a raw list or dict in a bucket is an inline value: the
        assert not _entries_watched(state_of([("a", raw)]))  # bucket's own data, not watched
    bucket = _EntryBucket()
    bucket.__setstate__(((1, ("a", 1)),))
    assert bucket[1] == ("a", 1)
