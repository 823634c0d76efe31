"""Scale: a one-entry commit appends the same bytes at 1k and 1M entries; huge containers work.

Byte counts, not times: the FileStorage grows by what a commit writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import durable_heap as dh

BIG = 1_000_000


@pytest.fixture(scope="module")
def heaps(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two heaps, 1k and 1M entries in a Dict and a List, built once."""
    paths = {}
    for n in (1_000, BIG):
        path = tmp_path_factory.mktemp("scale") / f"h{n}.fs"
        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.d = {f"k{i:07d}": i for i in range(n)}
                state.lst = list(range(n))
        paths[n] = path
    return paths


def _bytes_per_commit(path: Path, n: int, change) -> float:  # type: ignore[no-untyped-def]
    with dh.open(path) as heap:
        before = os.path.getsize(path)
        reps = 40
        for r in range(reps):
            with heap.transaction() as state:
                change(state, n, r)
        return (os.path.getsize(path) - before) / reps


def _update(state, n, r) -> None:  # type: ignore[no-untyped-def]
    state.d[f"k{(r * 7919) % n:07d}"] = -r


def _insert(state, n, r) -> None:  # type: ignore[no-untyped-def]
    state.d[f"n{r:07d}"] = r


def _list_set(state, n, r) -> None:  # type: ignore[no-untyped-def]
    state.lst[(r * 7919) % (n - 200)] = -r


def _list_append(state, n, r) -> None:  # type: ignore[no-untyped-def]
    state.lst.append(r)


@pytest.mark.slow
@pytest.mark.parametrize("change", [_update, _insert, _list_set, _list_append])
def test_bytes_per_commit_do_not_grow_with_size(heaps: dict[int, Path], change) -> None:  # type: ignore[no-untyped-def]
    small = _bytes_per_commit(heaps[1_000], 1_000, change)
    big = _bytes_per_commit(heaps[BIG], BIG, change)
    assert big <= 2048, f"{change.__name__}: {big:.0f} bytes per commit at 1M entries"
    assert big <= small * 1.25 + 64, f"{change.__name__}: {small:.0f} B at 1k, {big:.0f} B at 1M"


@pytest.mark.slow
def test_million_entry_containers(tmp_path: Path) -> None:
    path = tmp_path / "big.fs"
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.d = {i: str(i) for i in range(BIG)}  # int keys: the hashed index
            state.s = set(range(0, 2 * BIG, 2))
            state.lst = list(range(BIG))
    with dh.open(path, cache_size=2_000) as heap:
        with heap.transaction() as state:
            d, s, lst = state.d, state.s, state.lst
            assert len(d) == len(s) == len(lst) == BIG
            assert d[123_456] == "123456" and 4 in s and 5 not in s
            assert lst[-1] == BIG - 1 and lst[500_000] == 500_000 and lst[-500_001] == 499_999
            d[BIG] = "new"
            del d[0]
            lst.insert(250_000, "mid")
            del lst[10]
            s.discard(4)
    with dh.open(path, cache_size=2_000) as heap:
        cache = heap.connection._cache
        with heap.transaction() as state:
            # Streaming: what is loaded only to be iterated is let go again, so the
            # objects in memory stay bounded within this one transaction.
            assert sum(1 for _ in state.d.items()) == BIG
            loaded_by_dict = cache.cache_non_ghost_count
            assert sum(1 for _ in state.lst) == BIG
            loaded = cache.cache_non_ghost_count
            assert state.lst[249_999] == "mid" and state.lst[250_000] == 250_000
            assert next(iter(state.d)) == 1 and list(reversed(state.d))[:1] == [BIG]
        # 1M entries are ~25,000 buckets and the List ~16,000 leaves.
        assert loaded_by_dict < 200 and loaded < 400, (loaded_by_dict, loaded)


def test_small_containers_stay_one_small_record(tmp_path: Path) -> None:
    """A 3-entry Dict costs about what a 3-entry PersistentMapping costs: one record."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from persistent.mapping import PersistentMapping

    def last_transaction(path: Path) -> list[int]:
        fs = ZODB.FileStorage.FileStorage(str(path), read_only=True)
        try:
            return [[len(r.data) for r in txn] for txn in fs.iterator()][-1]
        finally:
            fs.close()

    ours = tmp_path / "ours.fs"
    with dh.open(ours) as heap:
        with heap.transaction() as state:
            state.d = {"a": 1, "b": 2, "c": 3}
        with heap.transaction() as state:
            state.d["b"] = 20
    raw = tmp_path / "raw.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(raw)))
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["d"] = PersistentMapping({"a": 1, "b": 2, "c": 3})
    tm.commit()
    conn.root()["d"]["b"] = 20
    tm.commit()
    db.close()
    (ours_record,) = last_transaction(ours)
    (raw_record,) = last_transaction(raw)
    assert ours_record <= raw_record  # one record, no bigger than PersistentMapping's
