"""Stateful property tests: each container against its builtin twin, across
commit, abort and reopening the FileStorage between steps."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import durable_heap as dh
from durable_heap import _containers as c
from tests.strategies import Point, small_keys, values

SETTINGS = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

dict_keys = st.one_of(st.integers(0, 120), small_keys, st.text(max_size=3))


class HeapMachine(RuleBasedStateMachine):
    """A container in a real FileStorage heap, a builtin model, and one open transaction."""

    kind: type = dict
    durable_kind: type = dh.Dict

    def __init__(self) -> None:
        super().__init__()
        # Tiny List nodes so that a few dozen steps build deep trees.
        self._saved = (c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX)
        c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX = 3, 3, 3
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "heap.fs"
        self.heap = dh.open(self.path)
        self.model: Any = self.kind()
        self.committed: Any = self.kind()
        with self.heap.transaction() as state:
            state.c = self.kind()
        self.tm = self.heap.transaction_manager
        self.tm.begin()

    @property
    def durable(self) -> Any:
        return self.heap.state.c

    def teardown(self) -> None:
        try:
            self.tm.abort()
        except Exception:  # noqa: BLE001,S110 - no transaction open
            pass
        self.heap.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX = self._saved

    @rule()
    def commit(self) -> None:
        self.tm.commit()
        self.committed = copy.deepcopy(self.model)
        self.tm.begin()

    @rule()
    def abort(self) -> None:
        self.tm.abort()
        self.model = copy.deepcopy(self.committed)
        self.tm.begin()

    @rule(commit_first=st.booleans())
    def reopen(self, commit_first: bool) -> None:
        if commit_first:
            self.tm.commit()
            self.committed = copy.deepcopy(self.model)
        else:
            self.tm.abort()
            self.model = copy.deepcopy(self.committed)
        self.heap.close()
        self.heap = dh.open(self.path)
        self.tm = self.heap.transaction_manager
        self.tm.begin()

    @invariant()
    def same_as_model(self) -> None:
        d = self.durable
        assert type(d) is self.durable_kind
        assert d == self.model
        assert len(d) == len(self.model)


class DictMachine(HeapMachine):
    @rule(k=dict_keys, v=values)
    def set(self, k: Any, v: Any) -> None:
        self.durable[k] = v
        self.model[k] = copy.deepcopy(v)

    @rule(k=dict_keys)
    def delete(self, k: Any) -> None:
        if k in self.model:
            del self.durable[k]
            del self.model[k]
        else:
            with pytest.raises(KeyError):
                del self.durable[k]

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def popitem(self) -> None:
        assert self.durable.popitem() == self.model.popitem()

    @rule(n=st.integers(0, 80), start=st.integers(0, 1000))
    def update_many(self, n: int, start: int) -> None:
        new = {start + i: i for i in range(n)}
        self.durable.update(new)
        self.model.update(new)

    @rule(k=dict_keys, v=values)
    def setdefault(self, k: Any, v: Any) -> None:
        self.durable.setdefault(k, v)
        self.model.setdefault(k, copy.deepcopy(v))

    @rule(dx=st.integers(1, 5))
    def mutate_plain_objects_in_place(self, dx: int) -> None:
        for k, v in self.model.items():
            if isinstance(v, Point):
                v.x += dx
                self.durable[k].x += dx
                return

    @rule()
    def clear(self) -> None:
        self.durable.clear()
        self.model.clear()

    @invariant()
    def same_order(self) -> None:
        assert list(self.durable.keys()) == list(self.model.keys())


class ListMachine(HeapMachine):
    kind = list
    durable_kind = dh.List

    @rule(v=values)
    def append(self, v: Any) -> None:
        self.durable.append(v)
        self.model.append(copy.deepcopy(v))

    @rule(i=st.integers(-30, 30), v=st.integers())
    def insert(self, i: int, v: int) -> None:
        self.durable.insert(i, v)
        self.model.insert(i, v)

    @rule(n=st.integers(0, 40))
    def extend(self, n: int) -> None:
        self.durable.extend(range(n))
        self.model.extend(range(n))

    @precondition(lambda self: len(self.model) > 0)
    @rule(i=st.integers(-30, 30))
    def pop(self, i: int) -> None:
        i = i % len(self.model)
        assert self.durable.pop(i) == self.model.pop(i)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def pop_last(self) -> None:
        assert self.durable.pop() == self.model.pop()

    @precondition(lambda self: len(self.model) > 0)
    @rule(i=st.integers(0, 100), v=values)
    def setitem(self, i: int, v: Any) -> None:
        i = i % len(self.model)
        self.durable[i] = v
        self.model[i] = copy.deepcopy(v)

    @rule(a=st.integers(-20, 60), b=st.integers(-20, 60), new=st.lists(st.integers(), max_size=5))
    def set_slice(self, a: int, b: int, new: list[int]) -> None:
        self.durable[a:b] = new
        self.model[a:b] = new

    @rule(a=st.integers(-20, 60), b=st.integers(-20, 60), step=st.sampled_from([None, 2, -1]))
    def del_slice(self, a: int, b: int, step: int | None) -> None:
        del self.durable[a:b:step]
        del self.model[a:b:step]

    @rule()
    def reverse(self) -> None:
        self.durable.reverse()
        self.model.reverse()

    @rule(dx=st.integers(1, 5))
    def mutate_plain_objects_in_place(self, dx: int) -> None:
        for i, v in enumerate(self.model):
            if isinstance(v, Point):
                v.x += dx
                self.durable[i].x += dx
                return

    @invariant()
    def indexing(self) -> None:
        d = self.durable
        for i in range(0, len(self.model), 7):
            assert d[i] == self.model[i]


class SetMachine(HeapMachine):
    kind = set
    durable_kind = dh.Set

    @rule(m=dict_keys)
    def add(self, m: Any) -> None:
        self.durable.add(m)
        self.model.add(m)

    @rule(m=dict_keys)
    def discard(self, m: Any) -> None:
        self.durable.discard(m)
        self.model.discard(m)

    @rule(ms=st.sets(st.integers(0, 200), max_size=60))
    def update(self, ms: set[int]) -> None:
        s = self.durable
        s |= ms
        self.model |= ms

    @rule(ms=st.sets(st.integers(0, 200), max_size=60))
    def symmetric(self, ms: set[int]) -> None:
        s = self.durable
        s ^= ms
        self.model ^= ms

    @rule(ms=st.sets(st.integers(0, 200), max_size=60))
    def subtract(self, ms: set[int]) -> None:
        s = self.durable
        s -= ms
        self.model -= ms

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def pop(self) -> None:
        m = self.durable.pop()
        self.model.remove(m)


TestDict = DictMachine.TestCase
TestDict.settings = SETTINGS
TestList = ListMachine.TestCase
TestList.settings = SETTINGS
TestSet = SetMachine.TestCase
TestSet.settings = SETTINGS
