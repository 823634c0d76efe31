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
    assert _reopened(heap, heap_path).state.x["big"]["k00005"]["i"] == -5


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
