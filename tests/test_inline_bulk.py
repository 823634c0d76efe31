"""Bulk loads by assignment (``state.users = {...}``) take the inline fast path, and keep
every container met twice one object (issue 18, part 2; audit a18).

`Dict.update` of a big dict of small dicts copied them inline in C-level passes
(`_inline.bulk_raw`), but an assignment, which converts inside one `stored_form`
(its memo keeps shared containers shared), fell back to one `_raw_copy` per value:
about 1.7x the CPU of the same load through `update` (100k entries: 1.6 s against
0.95 s). These tests pin the fast path by counting `_raw_copy` calls, not by time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import _inline


def _nested(n: int) -> dict[str, Any]:
    return {f"k{i:05d}": {"i": i, "tags": ["a", "b"]} for i in range(n)}


@pytest.fixture
def raw_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many values were copied inline one by one (the slow path)."""
    calls: list[int] = []
    real = _inline._raw_copy

    def counting(value: Any, depth: int) -> Any:
        calls.append(1)
        return real(value, depth)

    monkeypatch.setattr(_inline, "_raw_copy", counting)
    return calls


def test_a_bulk_assignment_copies_inline_in_one_pass(heap: dh.Heap, raw_copies: list[int]) -> None:
    data = _nested(1000)
    with heap.transaction() as s:
        s.users = data
    assert len(raw_copies) < 10  # one per value (1000) before
    with heap.transaction() as s:
        s.by_update = {}
        s.by_update.update(data)
    assert heap.state.users == heap.state.by_update == data
    assert type(heap.state.users._entries) is type(heap.state.by_update._entries)


def _reopened(heap: dh.Heap, path: Path) -> dh.Heap:
    heap.close()
    return dh.open(path)


def test_a_value_met_again_after_the_bulk_stays_one_object(heap: dh.Heap, heap_path: Path) -> None:
    """Stored once inline by the fast path, met again later in the same assignment:
    stored_form starts over without inline copies, and both places are one record."""
    data = _nested(100)
    with heap.transaction() as s:
        s.x = {"big": data, "alias": data["k00005"], "tags": data["k00007"]["tags"]}
        assert s.x["big"]["k00005"] is s.x["alias"]
        assert s.x["big"]["k00007"]["tags"] is s.x["tags"]
    heap = _reopened(heap, heap_path)
    with heap.transaction() as s:
        s.x["alias"]["i"] = -5
        s.x["tags"].append("c")
    heap = _reopened(heap, heap_path)
    assert heap.state.x["big"]["k00005"] == {"i": -5, "tags": ["a", "b"]}
    assert heap.state.x["big"]["k00007"]["tags"] == ["a", "b", "c"]
    heap.close()


def test_a_value_met_before_the_bulk_stays_one_object(heap: dh.Heap, heap_path: Path) -> None:
    data = _nested(100)
    with heap.transaction() as s:
        s.x = {"alias": data["k00005"], "big": data}  # converted first, then met in the bulk
        assert s.x["big"]["k00005"] is s.x["alias"]
    heap = _reopened(heap, heap_path)
    with heap.transaction() as s:
        s.x["alias"]["i"] = -5
    heap = _reopened(heap, heap_path)
    assert heap.state.x["big"]["k00005"]["i"] == -5
    heap.close()  # the heap opened last is the active one: leave none open


@pytest.mark.parametrize("shared", ["value", "inner list"])
def test_a_container_held_twice_in_the_bulk_stays_one_object(
        heap: dh.Heap, heap_path: Path, shared: str) -> None:
    data = _nested(100)
    if shared == "value":
        data["k00001"] = data["k00000"]
    else:
        data["k00001"]["tags"] = data["k00000"]["tags"]
    with heap.transaction() as s:
        s.x = data

    def first(x: Any) -> Any:
        return x["k00000"] if shared == "value" else x["k00000"]["tags"]

    def second(x: Any) -> Any:
        return x["k00001"] if shared == "value" else x["k00001"]["tags"]

    with heap.transaction() as s:
        assert first(s.x) is second(s.x)
    heap = _reopened(heap, heap_path)
    with heap.transaction() as s:
        assert first(s.x) is second(s.x)
        target = first(s.x)
        if shared == "value":
            target["i"] = 42
        else:
            target.append("z")
    heap = _reopened(heap, heap_path)
    assert first(heap.state.x) == second(heap.state.x)
    assert (second(heap.state.x)["i"] == 42) if shared == "value" else (second(heap.state.x)[-1] == "z")
    heap.close()


# -- the cache of views: bounded, and O(1) per view kept -------------------------------------

def _views(container: Any) -> dict[int, Any]:
    link = _inline._link(container)
    return (link.views if link is not None else None) or {}


def test_iterating_many_inline_values_keeps_the_view_cache_bounded(heap: dh.Heap) -> None:
    """Views nobody refers to are dropped once the cache holds CACHE_MAX. (The prune
    never found one: it counted the reference of the items iterator's tuple, so the
    cache held a view of every value ever read while the holder stayed in memory.)"""
    n = 3 * _inline.CACHE_MAX
    with heap.transaction() as s:
        s.users = {f"u{i}": {"i": i} for i in range(n)}
    with heap.transaction() as s:
        assert sum(v["i"] for v in s.users.values()) == n * (n - 1) // 2
        assert len(_views(s.users)) <= _inline.CACHE_MAX


def test_keeping_many_views_prunes_rarely_and_keeps_them_the_same(
        heap: dh.Heap, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping every value of a big Dict read: each prune keeps them all, and the next
    waits for twice as many (it scanned the whole cache at every new view: 20,000 kept
    took 4.7 s). What is kept stays the object a read gives."""
    n = 5 * _inline.CACHE_MAX
    with heap.transaction() as s:
        s.users = {f"u{i}": {"i": i, "tags": ["a"]} for i in range(n)}
    prunes: list[int] = []
    real = _inline._prune

    def counting(views: dict[int, Any]) -> None:
        prunes.append(len(views))
        real(views)

    monkeypatch.setattr(_inline, "_prune", counting)
    with heap.transaction() as s:
        kept = list(s.users.values())
        assert len(prunes) <= 4, len(prunes)  # CACHE_MAX, 2x, 4x: not one per view past CACHE_MAX
        assert all(s.users[f"u{i}"] is kept[i] for i in range(0, n, 97))
        kept[3]["tags"].append("b")
    assert heap.state.users["u3"] == {"i": 3, "tags": ["a", "b"]}
