"""Savepoints and the watch: a rollback undoes in-place changes of plain objects and
the read caches, as it undoes assignments; what came before the savepoint stays."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import durable_heap as dh


@dataclasses.dataclass
class Conf:
    n: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)


def _fill(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.conf = Conf()
        state.confs = {f"c{i}": Conf(i) for i in range(100)}  # tree form: buckets, read caches
        state.small = {"a": Conf(1)}
        state.items = list(range(10))
        state.count = 0


def _view(state: Any) -> tuple[Any, ...]:
    return (copy.deepcopy(state.conf), state.confs["c7"].n, "new" in state.confs, len(state.confs),
            state.small["a"].n, state.items[1], len(state.items), state.count)


def test_a_rollback_undoes_in_place_changes_and_reads_made_after_the_savepoint(
        heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    """(In-place changes after the savepoint survived its rollback, and were committed;
    a Dict read after a rollback answered from its cache what the rollback had undone.)"""
    _fill(heap)
    with heap.transaction() as state:
        state.confs["c7"].n  # noqa: B018 - read before: cached
        state.conf.n = 1  # in place, before the savepoint: kept
        sp = heap.transaction_manager.savepoint()
        state.conf.n = 2
        state.conf.tags.append("after")
        state.confs["c7"].n = 70
        state.confs["new"] = Conf()
        state.small["a"].n = 10
        state.items[1] = 11
        state.items.append(12)
        state.count = 5
        sp.rollback()
        assert _view(state) == (Conf(1), 7, False, 100, 1, 1, 10, 0)
    heap = reopen(heap)
    with heap.transaction() as state:
        assert _view(state) == (Conf(1), 7, False, 100, 1, 1, 10, 0)


def test_nested_savepoints_roll_back_to_each_one(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    _fill(heap)
    with heap.transaction() as state:
        first = heap.transaction_manager.savepoint()
        state.conf.n = 1
        second = heap.transaction_manager.savepoint()
        state.conf.n = 2
        state.conf.tags.append("x")
        second.rollback()
        assert state.conf == Conf(1)
        state.confs["c1"].n = -1
        first.rollback()
        assert state.conf == Conf(0) and state.confs["c1"].n == 1
        state.conf.tags.append("kept")  # after the rollbacks: committed
    heap = reopen(heap)
    assert heap.state.conf == Conf(0, ["kept"]) and heap.state.confs["c1"].n == 1


def test_a_savepoint_without_a_rollback_commits_everything(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    _fill(heap)
    with heap.transaction() as state:
        state.conf.n = 1
        heap.transaction_manager.savepoint()
        state.conf.tags.append("a")
        heap.transaction_manager.savepoint()
        state.confs["c2"].n = 20
    heap = reopen(heap)
    assert heap.state.conf == Conf(1, ["a"]) and heap.state.confs["c2"].n == 20


def test_a_plain_object_held_across_a_rollback_is_refused_when_changed_not_lost(heap: dh.Heap) -> None:
    _fill(heap)
    with pytest.raises(dh.StaleReferenceError, match="state.conf"):
        with heap.transaction() as state:
            conf = state.conf
            sp = heap.transaction_manager.savepoint()
            conf.n = 2
            sp.rollback()  # state.conf is loaded afresh: `conf` is no longer the one in state
            conf.n = 3
    assert heap.state.conf == Conf(0)


#: An operation of the property test: (kind, which entry, value).
OPS = st.lists(st.tuples(st.sampled_from(["inplace", "assign", "append", "savepoint", "rollback"]),
                         st.integers(0, 3), st.integers(0, 99)), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_savepoints_against_a_model(tmp_path_factory: pytest.TempPathFactory, ops: list[Any]) -> None:
    """Random changes, savepoints and rollbacks, then a commit and a reopen: the heap
    holds what a model (deep copies taken at each savepoint) holds."""
    path = tmp_path_factory.mktemp("sp") / "h.fs"
    keys = [f"c{i}" for i in range(0, 100, 25)]
    with dh.open(path) as heap:
        _fill(heap)
        model = {k: Conf(int(k[1:])) for k in keys}
        items = list(range(10))
        saved: list[tuple[Any, Any, Any]] = []
        with heap.transaction() as state:
            for kind, which, value in ops:
                key = keys[which]
                if kind == "inplace":
                    state.confs[key].n = value
                    state.confs[key].tags.append(str(value))
                    model[key].n = value
                    model[key].tags.append(str(value))
                elif kind == "assign":
                    state.confs[key] = Conf(value)
                    model[key] = Conf(value)
                elif kind == "append":
                    state.items.append(value)
                    items.append(value)
                elif kind == "savepoint":
                    saved.append((heap.transaction_manager.savepoint(), copy.deepcopy(model), list(items)))
                elif saved:  # rollback to one of them: the later ones are gone
                    index = which % len(saved)
                    sp, model_then, items_then = saved[index]
                    sp.rollback()
                    del saved[index + 1:]
                    model, items = copy.deepcopy(model_then), list(items_then)
                assert {k: state.confs[k] for k in keys} == model
                assert list(state.items) == items
    with dh.open(path) as heap:
        assert {k: heap.state.confs[k] for k in keys} == model
        assert list(heap.state.items) == items
