"""State and Object: attribute access, conversion, the watch on plain objects, refusals."""

from __future__ import annotations

import copy
import dataclasses
import enum
import pickle
import random
import socket
import threading
from pathlib import Path

import pytest

import durable_heap as dh
from tests.strategies import Point


@dataclasses.dataclass
class Settings:
    retries: int = 1
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Box:
    inner: object = None


class User(dh.Object):
    email = None  # class default: serves instances stored before it existed

    def __init__(self, name: str) -> None:
        self.name = name
        self.tags = []


def test_state_is_a_mapping_of_names(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        assert state.setdefault("count", 0) == 0
        assert state.setdefault("count", 5) == 0
        state["title"] = "x"
        state.items = [1]  # a stored name may shadow a helper of State
        assert "count" in state and "nope" not in state
        assert state.get("nope", 3) == 3 and state["title"] == "x"
        assert list(state) == ["count", "title", "items"] and len(state) == 3
        assert type(state.items) is dh.List
        del state["title"]
        with pytest.raises(KeyError):
            del state["title"]
        with pytest.raises(KeyError):
            state["title"]
        with pytest.raises(TypeError):
            state[1] = 2  # type: ignore[index]
        with pytest.raises(ValueError):
            state["_p_oid"] = 1


def test_objects_persist_and_share(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        ann = User("ann")
        state.users = {"ann": ann}
        state.admins = [ann]  # one object, two places
        ann.tags.append("a")
    heap = reopen(heap)
    with heap.transaction() as state:
        ann = state.users["ann"]
        assert ann is state.admins[0]
        assert ann.tags == ["a"] and ann.email is None
        assert repr(ann) == "User(name='ann', tags=['a'])"
        ann.email = "ann@example.org"
    heap = reopen(heap)
    assert heap.state.admins[0].email == "ann@example.org"


def test_in_place_changes_to_plain_objects_are_saved(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.settings = Settings()
        state.points = {f"p{i}": Point(i) for i in range(100)}  # tree form, watched buckets
        state.few = [Point(1)]  # a List's own record
        u = state.user = User("bob")
        u.prefs = Settings()  # an Object's record
    with heap.transaction() as state:
        state.settings.retries = 3
        state.settings.tags.append("a")
        state.points["p50"].x = -50
        state.few[0].y = "why"
        state.user.prefs.retries = 9
    heap = reopen(heap)
    st = heap.state
    assert st.settings == Settings(3, ["a"])
    assert st.points["p50"] == Point(-50) and st.points["p49"] == Point(49)
    assert st.few[0] == Point(1, "why")
    assert st.user.prefs.retries == 9


def test_in_place_changes_are_rolled_back_on_abort(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.settings = Settings()
        state.points = {f"p{i}": Point(i) for i in range(100)}
    with pytest.raises(ZeroDivisionError):
        with heap.transaction() as state:
            state.settings.retries = 99
            state.points["p1"].x = 99
            1 / 0  # noqa: B018
    # Not only not saved: not left behind in memory either.
    with heap.transaction() as state:
        assert state.settings.retries == 1 and state.points["p1"].x == 1


def _read_record(heap: dh.Heap, how: str, state: dh.State) -> None:
    """Something that reads a record's whole state (its ``__getstate__``), not storing it."""
    if how == "copy":
        copy.copy(state.user)
    elif how == "deepcopy":
        copy.deepcopy(state.user)
    elif how == "pickle":
        pickle.dumps(state.user)
        pickle.dumps(state._p_jar.root())  # the state's own record too
    else:  # what the middlewares ask of a request's transaction before committing it
        from durable_heap._watch import changed_path
        assert changed_path(heap.connection) is not None


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "changed_path"])
def test_an_in_place_change_is_saved_after_the_record_was_copied_or_pickled(
        heap: dh.Heap, reopen, how: str) -> None:  # type: ignore[no-untyped-def]
    """A record's ``__getstate__`` called by something else than ZODB's store took the
    changed state as the record's new snapshot: the commit then found nothing changed
    and the change was silently lost (seen under TransactionMiddleware, which asks for
    a request's changes before committing, and with copy.deepcopy of an Object)."""
    with heap.transaction() as state:
        state.settings = Settings()
        state.points = {f"p{i}": Point(i) for i in range(100)}  # tree form, watched buckets
        state.user = User("dee")
        state.user.prefs = Settings()
    with heap.transaction() as state:
        state.settings.retries = 5
        state.points["p7"].x = -7
        state.user.prefs.retries = 6
        _read_record(heap, how, state)
    heap = reopen(heap)
    assert heap.state.settings.retries == 5
    assert heap.state.points["p7"] == Point(-7)
    assert heap.state.user.prefs.retries == 6


def test_held_objects_are_watched_in_later_transactions(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.user = User("cy")
        state.user.prefs = Settings()
    user = heap.state.user  # an Object kept across transactions
    for n in range(3):
        with heap.transaction():
            user.prefs.retries = n + 10
    heap = reopen(heap)
    assert heap.state.user.prefs.retries == 12


def test_changes_outside_a_transaction_are_refused(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.users = {"a": 1}
        state.items = [1]
        state.tags = {1}
        state.user = User("x")
    st = heap.state
    for change in (
        lambda: setattr(st, "count", 1),
        lambda: st.users.__setitem__("b", 2),
        lambda: st.items.append(2),
        lambda: st.tags.add(2),
        lambda: setattr(st.user, "name", "y"),
        lambda: st.users.pop("a"),
    ):
        with pytest.raises(dh.NoTransactionError, match="outside a transaction"):
            change()
    assert st.users == {"a": 1} and st.items == [1] and st.tags == {1} and st.user.name == "x"
    assert "count" not in st


class Outer:
    @dataclasses.dataclass
    class Nested:
        a: int

    class Inner(dh.Object):
        pass

    class Color(enum.Enum):
        RED = 1

    @staticmethod
    def helper() -> None:
        pass


class Holder:
    @dataclasses.dataclass
    class Exported:
        a: int

    class Kind(enum.Enum):
        ONE = 1


Exported = Holder.Exported  # exported under its __name__: ZODB finds it as tests.test_state.Exported
Kind = Holder.Kind


def test_nested_classes_exported_at_top_level_and_named_builtins_are_stored(tmp_path: Path) -> None:
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        state.exported, state.kind = Holder.Exported(1), Holder.Kind.ONE
        state.rand = random.random  # a bound builtin that its module names
    # A function of the standard library is stored by name, and loads once allowed.
    with dh.open(tmp_path / "h.fs", allow=["random.random"]) as heap:
        assert heap.state.exported == Exported(1) and heap.state.kind is Kind.ONE
        assert heap.state.rand is random.random


@pytest.mark.parametrize(
    ("make", "type_name"),
    [
        (lambda: (lambda: 0), "function"),
        (lambda: (i for i in range(2)), "generator"),
        (lambda: threading.Lock(), "lock"),
        (lambda: socket.socket(), "socket"),
        (lambda: open(__file__), "TextIOWrapper"),  # noqa: SIM115
        (lambda: threading, "module"),
        (lambda: dataclasses.make_dataclass("Local", ["a"])(1), "Local"),
        (lambda: Settings(tags=[threading.Lock()]), "lock"),
        # ZODB stores classes and functions as module.name: nested ones would not load again.
        (lambda: Outer.Nested(1), "nested in a class (Outer.Nested)"),
        (lambda: Outer.Inner(), "nested in a class (Outer.Inner)"),
        (lambda: Outer.Color.RED, "nested in a class (Outer.Color)"),
        (lambda: Outer.helper, "nested in a class (Outer.helper)"),
        (lambda: Outer.Nested, "nested in a class (Outer.Nested)"),
        (lambda: [].append, "bound method"),
    ],
)
def test_unstorable_values_are_refused_at_assignment(heap: dh.Heap, make, type_name: str) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.keep = {"old": 1}
    value = make()
    try:
        with pytest.raises(dh.NotPersistableError) as info:
            with heap.transaction() as state:
                state.keep["cb"] = value
        assert "state.keep['cb']" in str(info.value) and type_name in str(info.value)
        assert isinstance(info.value, TypeError)
        assert heap.state.keep == {"old": 1}
    finally:
        if hasattr(value, "close"):
            value.close()


def test_unstorable_value_added_after_assignment_is_caught_at_commit(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.settings = Settings()
        state.points = {f"p{i}": Point(i) for i in range(100)}
    with pytest.raises(dh.NotPersistableError, match=r"state\.settings\.tags\[0\]"):
        with heap.transaction() as state:
            state.settings.tags.append(lambda: 0)
    with pytest.raises(dh.NotPersistableError, match=r"state\.points\['p7'\]\.y"):
        with heap.transaction() as state:
            state.points["p7"].y = threading.Lock()
    with pytest.raises(dh.NotPersistableError, match=r"state\.fresh\.y"):
        with heap.transaction() as state:
            state.fresh = Point(1)
            state.fresh.y = threading.Lock()  # changed in the same transaction
    assert heap.state.settings == Settings() and heap.state.points["p7"] == Point(7)
    assert "fresh" not in heap.state


def test_object_constructed_with_a_bad_value(heap: dh.Heap) -> None:
    with pytest.raises(dh.NotPersistableError, match=r"User\(\.\.\.\)\.tags"):
        u = User("x")
        u.tags = lambda: 0


def test_state_proxy(heap_path: Path) -> None:
    from durable_heap import state

    with dh.open(heap_path) as heap:
        with heap.transaction():
            state.count = 1
            state["n"] = 2
        assert state.count == 1 and state["n"] == 2 and "n" in state
        assert sorted(state) == ["count", "n"] and len(state) == 2
        other = dh.open("memory://")
        assert "count" not in state  # the heap most recently opened
        with heap.activate():
            assert state.count == 1
        other.close()
        assert state.count == 1  # `other` closed: back to the newest heap still open
    with pytest.raises(dh.NoActiveHeapError, match=r"durable_heap.open"):
        state.count  # noqa: B018
    assert "no heap open" in repr(state)


def test_plain_objects_in_a_one_bucket_tree_are_watched(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.d = {f"k{i}": Settings(i) for i in range(35)}  # tree form, one inline bucket
    with heap.transaction() as state:
        state.d["k1"].retries = 99
    heap = reopen(heap)
    assert heap.state.d["k1"].retries == 99


def test_a_plain_object_kept_across_transactions_is_refused_not_lost(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        cfg = state.setdefault("cfg", Settings())
        cfg.retries = 2  # same transaction: fine
    assert heap.state.cfg.retries == 2
    with pytest.raises(dh.StaleReferenceError, match=r"state\.cfg: a Settings was changed .*Object"):
        with heap.transaction() as state:
            cfg.retries = 3  # `cfg` is no longer the object in state
            state.other = 1
    assert heap.state.cfg.retries == 2 and "other" not in heap.state
    with heap.transaction() as state:  # reported once; reading it again works
        state.cfg.retries = 4
    assert heap.state.cfg.retries == 4


def test_pooled_connections_start_clean(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    import gc

    with heap.transaction() as state:
        state.cfg = Settings(1)
        state.big = {f"k{i}": i for i in range(100)}

    expected = {"retries": 1, "k1": 1}
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            with heap.transaction() as st:
                assert st.cfg.retries == expected["retries"] and st.big["k1"] == expected["k1"]
            assert heap.state.big["k1"] == expected["k1"]  # read outside a transaction, cached
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    def writer(value: int) -> None:
        with heap.transaction() as st:
            st.cfg.retries = value
            st.big["k1"] += value
        expected["retries"] = value
        expected["k1"] += value

    for value in (5, 7):
        for target, args in ((reader, ()), (writer, (value,))):
            t = threading.Thread(target=target, args=args)
            t.start()
            t.join()
            del t
            gc.collect()  # the thread's connection goes back to ZODB's pool
    assert not failures, failures
    heap = reopen(heap)
    assert heap.state.cfg.retries == 7 and heap.state.big["k1"] == 13


def test_change_after_a_savepoint_is_saved(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.cfg = Settings(1)
        heap.transaction_manager.savepoint()
        state.cfg.retries = 2
    heap = reopen(heap)
    assert heap.state.cfg.retries == 2


class Slotted(dh.Object):
    __slots__ = ("conf",)


def test_objects_with_slots_are_watched(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    with heap.transaction() as state:
        state.s = Slotted()
        state.s.conf = Settings(1)
    with heap.transaction() as state:
        state.s.conf.retries = 8
    heap = reopen(heap)
    assert heap.state.s.conf.retries == 8


def test_kept_values_without_weak_references_are_checked_too(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        buf = state.setdefault("buf", bytearray(b"ab"))  # no weak references to a bytearray
    with pytest.raises(dh.StaleReferenceError, match=r"state\.buf: a bytearray"):
        with heap.transaction():
            buf.extend(b"c")
    assert heap.state.buf == bytearray(b"ab")


def test_values_nobody_keeps_are_not_tracked(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.d = {f"k{i}": Settings(i) for i in range(100)}
    for _ in range(3):
        with heap.transaction() as state:
            state.d["k3"].retries += 1
    watch = heap.connection._dh_watch
    assert watch.orphans == []  # every Settings loaded was let go after its transaction
    assert heap.state.d["k3"].retries == 6


# --- values that contain themselves -------------------------------------------------------


def test_values_that_contain_themselves_are_stored(heap: dh.Heap, reopen) -> None:  # type: ignore[no-untyped-def]
    """Pickle and ZODB handle cycles: a plain list or dict that contains itself
    becomes a durable container that contains itself (a reference to its own
    record), through a tuple as well; a dataclass cycle is pickled as one."""
    with heap.transaction() as state:
        x: list[object] = []
        x.append(x)
        state.lst = x
        d: dict[str, object] = {}
        d["me"] = d
        state.dct = d
        t_list: list[object] = []
        t = (1, t_list)
        t_list.append(t)
        state.tup = t
        b = Box()
        b.inner = b
        state.box = b
        ring: list[object] = []
        ring.append(Box(ring))  # a list and a dataclass around each other
        state.ring = ring
        shared = [1]
        state.pair = [shared, shared]
        assert type(state.lst) is dh.List and state.lst[0] is state.lst
        assert state.tup[1][0] is state.tup  # one twin for the tuple met twice
    heap = reopen(heap)
    with heap.transaction() as state:
        assert type(state.lst) is dh.List and state.lst[0] is state.lst
        assert type(state.dct) is dh.Dict and state.dct["me"] is state.dct
        assert state.tup[0] == 1 and state.tup[1][0][1] is state.tup[1]
        assert state.box.inner is state.box
        assert state.ring[0].inner[0] is state.ring[0]
        assert state.pair[0] is state.pair[1]  # held twice in one value: one List
        assert repr(state.lst) == "[[...]]" and repr(state.dct) == "{'me': {...}}"
        state.lst[0].append(2)  # through the cycle: the same List
        state.dct["me"]["n"] = 3
    heap = reopen(heap)
    assert heap.state.lst[1] == 2 and heap.state.lst[0][0] is heap.state.lst
    assert heap.state.dct["n"] == 3
    plain = dh.to_builtin(heap.state.lst)
    assert type(plain) is list and plain[0] is plain and plain[1] == 2
    plain_d = dh.to_builtin(heap.state.dct)
    assert type(plain_d) is dict and plain_d["me"] is plain_d


def test_a_cycle_holding_an_unstorable_value_is_refused_with_its_path(heap: dh.Heap) -> None:
    """The search for the failing part walks the cycle once, then names the value."""
    b = Box()
    b.inner = b
    b.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(dh.NotPersistableError, match=r"state\.bad\.lock cannot be stored"):
        with heap.transaction() as state:
            state.bad = b
    ring: list[object] = []
    box = Box(ring)
    ring.append(box)
    box.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(dh.NotPersistableError, match=r"state\.bad\[0\]\.lock cannot be stored"):
        with heap.transaction() as state:
            state.bad = ring
    with heap.transaction() as state:
        cyclic = Box()
        cyclic.inner = cyclic
        state.box = cyclic
    with pytest.raises(dh.NotPersistableError, match=r"state\.box\.lock cannot be stored"):
        with heap.transaction() as state:
            state.box.lock = threading.Lock()  # found at commit, by the watch
    assert "bad" not in heap.state and not hasattr(heap.state.box, "lock")


def test_values_nested_too_deeply_are_refused_not_a_recursion_error(heap: dh.Heap) -> None:
    nested: list[object] = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(dh.NotPersistableError, match=r"state\.deep cannot be stored.*nested too deeply"):
        with heap.transaction() as state:
            state.deep = nested
    with heap.transaction() as state:
        state.after = [1]  # the heap carries on
    assert heap.state.after == [1] and "deep" not in heap.state
