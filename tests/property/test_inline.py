"""Stateful property test of inline values (`durable_heap._inline`) against builtin twins.

A Dict and a List hold small nested values (some inside the inline rules, some
past them); rules change them in place at any depth through what reading gives,
alias one entry into another place, replace and delete entries, and commit,
abort or reopen the FileStorage between steps. After every step the heap equals
its builtin model, and values that are one object in the model (aliases) are
one object in the heap.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import durable_heap as dh
from durable_heap import _containers as c

SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=5),
                    st.binary(max_size=3), st.floats(allow_nan=False, allow_infinity=False))
#: Nested values around the inline rules: up to 10 items (the rule: 8), 3 levels (2).
nested = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=10),
                            st.dictionaries(st.text(max_size=3), inner, max_size=10)),
    max_leaves=12,
)
containers = st.one_of(st.lists(nested, max_size=6), st.dictionaries(st.text(max_size=3), nested, max_size=6))
KEYS = [f"k{i}" for i in range(8)]


def _containers_in(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (keys / indexes) to every dict and list inside `value`, itself first."""
    found = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if isinstance(v, (dict, list)):
            found += _containers_in(v, (*path, k))
    return found


def _follow(value: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        value = value[k]
    return value


def _change(target: Any, choice: int, new: Any) -> None:
    """One of the in-place changes of a dict or list, picked by `choice`."""
    if isinstance(target, (dict, dh.Dict)):
        keys = list(target)
        kind = choice % 6
        if kind == 0:
            target["n"] = new
        elif kind == 1 and keys:
            del target[keys[choice % len(keys)]]
        elif kind == 2:
            target.update({"u": new, "v": 1})
        elif kind == 3:
            target.setdefault("s", new)
        elif kind == 4 and keys:
            target.pop(keys[-1])
        elif kind == 5:
            target.clear()
        return
    kind = choice % 7
    n = len(target)
    if kind == 0:
        target.append(new)
    elif kind == 1:
        target.extend([new, 0])
    elif kind == 2:
        target.insert(choice % (n + 1), new)
    elif kind == 3 and n:
        target[choice % n] = new
    elif kind == 4 and n:
        target.pop(choice % n)
    elif kind == 5:
        del target[: choice % 3]
    elif kind == 6:
        target.reverse()


class InlineMachine(RuleBasedStateMachine):
    """A Dict and a List of nested values in a real FileStorage heap, and their twins."""

    def __init__(self) -> None:
        super().__init__()
        # Small node sizes: a few entries already take the tree forms.
        self._saved = (c.SMALL_MAX, c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX)
        c.SMALL_MAX, c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX = 3, 2, 2, 3
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "heap.fs"
        self.heap = dh.open(self.path)
        self.model: dict[str, Any] = {"d": {}, "l": []}
        with self.heap.transaction() as state:
            state.d, state.l = {}, []
        self.committed = copy.deepcopy(self.model)
        self.tm = self.heap.transaction_manager
        self.tm.begin()

    def teardown(self) -> None:
        try:
            self.tm.abort()
        except Exception:  # noqa: BLE001,S110 - no transaction open
            pass
        self.heap.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        c.SMALL_MAX, c.TAIL_MAX, c.LEAF_MAX, c.BRANCH_MAX = self._saved

    def _holder(self, which: str) -> tuple[Any, Any]:
        return getattr(self.heap.state, which), self.model[which]

    # -- changes ---------------------------------------------------------------------

    @rule(k=st.sampled_from(KEYS), v=containers)
    def set_entry(self, k: str, v: Any) -> None:
        self.heap.state.d[k] = v
        self.model["d"][k] = copy.deepcopy(v)

    @rule(v=containers, i=st.integers(0, 20))
    def insert_item(self, v: Any, i: int) -> None:
        self.heap.state.l.insert(i, v)
        self.model["l"].insert(i, copy.deepcopy(v))

    @rule(which=st.sampled_from(["d", "l"]), data=st.data(), choice=st.integers(0, 100), new=nested)
    def change_in_place(self, which: str, data: st.DataObject, choice: int, new: Any) -> None:
        durable, model = self._holder(which)
        if not model:
            return
        where = data.draw(st.sampled_from(sorted(model) if which == "d" else range(len(model))))
        if not isinstance(model[where], (dict, list)):
            return
        path = data.draw(st.sampled_from(_containers_in(model[where])))
        _change(_follow(durable[where], path), choice, new)
        _change(_follow(model[where], path), choice, copy.deepcopy(new))

    @rule(data=st.data())
    def alias(self, data: st.DataObject) -> None:
        """Store what reading one entry gave into another place (an entry, the List)."""
        model = self.model["d"]
        if not model:
            return
        src = data.draw(st.sampled_from(sorted(model)))
        if not isinstance(model[src], (dict, list)):
            return
        if data.draw(st.booleans()):
            dst = data.draw(st.sampled_from(KEYS))
            self.heap.state.d[dst] = self.heap.state.d[src]
            model[dst] = model[src]
        else:
            self.heap.state.l.append(self.heap.state.d[src])
            self.model["l"].append(model[src])

    @precondition(lambda self: self.model["d"])
    @rule(data=st.data())
    def delete_entry(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(self.model["d"])))
        assert dh.to_builtin(self.heap.state.d.pop(k)) == self.model["d"].pop(k)

    @precondition(lambda self: self.model["l"])
    @rule(i=st.integers(0, 30))
    def pop_item(self, i: int) -> None:
        i %= len(self.model["l"])
        assert dh.to_builtin(self.heap.state.l.pop(i)) == self.model["l"].pop(i)

    # -- transactions ------------------------------------------------------------------

    @rule()
    def commit(self) -> None:
        self.tm.commit()
        self.committed = copy.deepcopy(self.model)  # keeps the aliases: one memo
        self.tm.begin()

    @rule()
    def abort(self) -> None:
        self.tm.abort()
        self.model = copy.deepcopy(self.committed)
        self.tm.begin()

    @rule(commit_first=st.booleans())
    def reopen(self, commit_first: bool) -> None:
        if commit_first:
            self.commit()
        self.tm.abort()
        self.model = copy.deepcopy(self.committed)
        self.heap.close()
        self.heap = dh.open(self.path)
        self.tm = self.heap.transaction_manager
        self.tm.begin()

    # -- the promises -----------------------------------------------------------------

    @invariant()
    def equal_to_the_model(self) -> None:
        state = self.heap.state
        assert dh.to_builtin(state.d) == self.model["d"]
        assert dh.to_builtin(state.l) == self.model["l"]
        assert state.d == self.model["d"] and state.l == self.model["l"]

    @invariant()
    def aliases_are_one_object(self) -> None:
        state = self.heap.state
        places = [(state.d[k], v) for k, v in self.model["d"].items()]
        places += [(state.l[i], v) for i, v in enumerate(self.model["l"])]
        for a, (durable_a, model_a) in enumerate(places):
            if not isinstance(model_a, (dict, list)):
                continue
            for durable_b, model_b in places[a + 1:]:
                assert (durable_a is durable_b) == (model_a is model_b)


TestInline = InlineMachine.TestCase
TestInline.settings = SETTINGS
