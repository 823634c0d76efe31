"""Dict, List and Set against their builtin twins where a new user would notice.

Each test runs the same code on the builtin and on the durable container and
compares what comes out: the result, or the exception's type (and message where
the builtin's is worth matching). Both small and tree forms.
"""

from __future__ import annotations

import collections.abc as cabc
import operator
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import Dict, List, Set
from durable_heap import _containers as c

#: A size in the small form and one in the tree form (past SMALL_MAX and TAIL_MAX).
SIZES = [3, 100]

DURABLE = {dict: Dict, list: List, set: Set}


def outcome(fn: Callable[[], Any], message: bool = False) -> Any:
    """What `fn` gives: ("ok", result as builtins) or ("raise", type[, message])."""
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - the exception is the outcome compared
        return ("raise", type(err), str(err)) if message else ("raise", type(err))
    return ("ok", dh.to_builtin(result))


def same(make: Callable[[type], Any], kind: type, message: bool = False) -> None:
    """`make(kind)` and `make(twin)` give the same outcome (the twin: Dict for dict, ...)."""
    twin = DURABLE[kind]
    assert outcome(lambda: make(twin), message) == outcome(lambda: make(kind), message), kind


# --- Dict ------------------------------------------------------------------------


class KeysAndGetitem:
    """Not a Mapping: keys() and [key] only, which is all dict.update needs."""

    def keys(self) -> list[str]:
        return ["a", "b"]

    def __getitem__(self, key: str) -> str:
        return key.upper()


class ItemsDisagree(cabc.Mapping):  # type: ignore[type-arg]
    """A Mapping whose items() says otherwise than keys() and [key]: dict.update reads the latter."""

    def __getitem__(self, key: str) -> int:
        return {"a": 1}[key]

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        return [("a", "from items()")]


@pytest.mark.parametrize("n", SIZES)
def test_dict_update_takes_what_dict_update_takes(n: int) -> None:
    base = {f"k{i}": i for i in range(n)}
    for source in (KeysAndGetitem, ItemsDisagree, lambda: [("x", 1), "yz", iter([2, 3])]):
        ref, ours = dict(base), Dict(base)
        ref.update(source())
        ours.update(source())
        assert ours == ref and list(ours.items()) == list(ref.items())
        ref |= source()
        ours |= source()
        assert ours == ref and Dict(source()) == dict(source())
    assert Dict(KeysAndGetitem()) == dict(KeysAndGetitem()) == {"a": "A", "b": "B"}


def test_dict_update_reads_a_dict_subclass_as_dict_does() -> None:
    class Shadowed(dict):  # type: ignore[type-arg]
        """Keeps dict's iteration: dict.update ignores its keys() and [key]."""

        def keys(self) -> Any:
            return ["nope"]

        def __getitem__(self, key: Any) -> Any:
            return "overridden"

    class Iterating(Shadowed):
        """Overrides __iter__: now dict.update goes through keys() and [key]."""

        def __iter__(self) -> Iterator[Any]:
            return iter(["nope"])

    for source in (Shadowed(a=1), Iterating(a=1)):
        ref: dict[Any, Any] = {}
        ours = Dict()
        ref.update(source)
        ours.update(source)
        assert ours == ref, type(source)


def test_dict_update_sequence_errors_are_dicts() -> None:
    for bad in ([1], [(1, 2, 3)], [(1,)], [("ab", 1), "abc"], 5, [None]):
        same(lambda kind: kind().update(bad), dict, message=True)  # noqa: B023
        same(lambda kind: kind(bad), dict, message=True)  # noqa: B023
    with pytest.raises(ValueError, match="element #1 has length 3; 2 is required"):
        Dict().update([("ab", 1), "abc"])
    with pytest.raises(TypeError, match="element #0 to a sequence"):
        Dict([1])


class PlainRegistry(dict):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, (value, "seen"))


class DurableRegistry(Dict):
    def __init__(self) -> None:
        super().__init__()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, (value, "seen"))


def test_fromkeys_on_a_subclass_builds_cls_and_sets_items() -> None:
    for n in SIZES:
        keys = range(n)
        ref, ours = PlainRegistry.fromkeys(keys, 0), DurableRegistry.fromkeys(keys, 0)
        assert type(ours) is DurableRegistry and type(ref) is PlainRegistry
        assert ours == ref and ours[0] == (0, "seen")  # the subclass's __setitem__ ran
        assert Dict.fromkeys(keys, 1) == dict.fromkeys(keys, 1) and type(Dict.fromkeys(keys)) is Dict


def test_setdefault_and_update_skip_a_subclass_setitem_as_dict_does() -> None:
    for kind in (PlainRegistry, DurableRegistry):
        d = kind()
        d.setdefault("a", 1)
        d.update(b=2)
        d["c"] = 3
        assert d == {"a": 1, "b": 2, "c": (3, "seen")}, kind


def test_dict_copy_is_a_plain_dict_as_documented() -> None:
    d = Dict({"a": [1]})
    assert type(d.copy()) is dict and d.copy() == {"a": [1]}
    assert "`Dict.copy()`, `List.copy()` and `Set.copy()` return a *plain*" in (
        Path(__file__).parent.parent / "docs" / "api.md").read_text()


@pytest.mark.parametrize("n", SIZES)
def test_dict_views_are_dicts_views(n: int) -> None:
    ref = {i: str(i) for i in range(n)}
    d = Dict(ref)
    for view, twin in ((d.keys(), ref.keys()), (d.items(), ref.items()), (d.values(), ref.values())):
        assert isinstance(view.mapping, types.MappingProxyType) and view.mapping == twin.mapping
        assert list(reversed(view)) == list(reversed(twin))  # type: ignore[call-overload]
        assert len(view) == len(twin)
    for probe in (1, (1, "1"), (1, "2"), (1, "1", 3), "x", (-5, "x"), ([], 1)[1:]):
        assert (probe in d.items()) == (probe in ref.items()), probe
    with pytest.raises(TypeError, match="unhashable"):
        ([], 1) in d.items()  # noqa: B015 - as ([], 1) in {}.items()
    with pytest.raises(TypeError, match="unhashable"):
        [] in d.keys()  # noqa: B015
    assert ("1" in d.values()) == ("1" in ref.values()) and [] not in d.values()
    for other in ({0, 1}, [0, -1], frozenset({-1})):
        assert d.keys() & other == ref.keys() & other
        assert d.keys() | other == ref.keys() | other
        assert d.keys() - other == ref.keys() - other
        assert d.keys() ^ other == ref.keys() ^ other
        assert d.keys().isdisjoint(other) == ref.keys().isdisjoint(other)
    assert d.keys() == set(ref) and set(ref) == d.keys() and d.items() == set(ref.items())
    assert (d.keys() <= set(ref) | {-1}) and not (d.keys() < set(ref))


def test_views_and_reads_ignore_a_subclass_getitem_as_dicts_do() -> None:
    class Loud(dict):  # type: ignore[type-arg]
        def __getitem__(self, key: Any) -> Any:
            return "overridden"

    class DurableLoud(Dict):
        def __getitem__(self, key: Any) -> Any:
            return "overridden"

    for n in SIZES:
        ref, ours = Loud({i: i for i in range(n)}), DurableLoud({i: i for i in range(n)})
        for read in (
            lambda d: list(reversed(d.values())), lambda d: list(reversed(d.items())),
            lambda d: (0, 0) in d.items(), lambda d: 0 in d.values(), lambda d: d.get(0),
            lambda d: list(d.items()), lambda d: d.copy(), lambda d: d[0],
        ):
            assert read(ours) == read(ref)


def test_dict_comparisons_with_other_types_are_dicts() -> None:
    for other in ([], (), 0, None, "a", {1}, [("a", 1)], {"a": 1}, {"b": 2}):
        same(lambda kind: kind(a=1) == other, dict)  # noqa: B023
        same(lambda kind: other == kind(a=1), dict)  # noqa: B023
        same(lambda kind: kind(a=1) != other, dict)  # noqa: B023
        same(lambda kind: kind(a=1) < other, dict)  # noqa: B023
        same(lambda kind: kind(a=1) | other, dict)  # noqa: B023
        same(lambda kind: other | kind(a=1), dict)  # noqa: B023
    import collections

    od = collections.OrderedDict(a=1)
    assert Dict(a=1) == od and od == Dict(a=1) and not (Dict(a=1) != od)
    for kind in (dict, Dict):
        with pytest.raises(KeyError, match="popitem"):
            kind().popitem()
        with pytest.raises(KeyError):
            kind().pop("x")
        assert kind().pop("x", 5) == 5


@pytest.mark.parametrize("n", [0, *SIZES])
def test_unhashable_keys_and_the_self_keyword_are_dicts(n: int) -> None:
    for keys in (range(n), map(str, range(n))):  # a hashed index, and one of str keys
        start = dict.fromkeys(keys, 0)
        for op in (
            lambda d: [] in d, lambda d: d.get([]), lambda d: d.pop([]), lambda d: d.pop([], 1),
            lambda d: d.__delitem__([]), lambda d: d[[]], lambda d: d.setdefault([]),
            lambda d: d.__setitem__([], 1), lambda d: [] in d.keys(), lambda d: ([], 1) in d.items(),
            lambda d: d.update([([], 1)]), lambda d: d.fromkeys([[]]),
        ):
            assert outcome(lambda: op(Dict(start)), True) == outcome(lambda: op(dict(start)), True)  # noqa: B023
    assert Dict(self=1) == dict(self=1) and Dict({"a": 1}, self=2) == {"a": 1, "self": 2}
    d = Dict()
    d.update(self=1)
    assert d == {"self": 1}


# --- Set ------------------------------------------------------------------------


def _binary(op: str) -> Callable[[Any, Any], Any]:
    return {"|": lambda a, b: a | b, "&": lambda a, b: a & b,
            "-": lambda a, b: a - b, "^": lambda a, b: a ^ b}[op]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", ["|", "&", "-", "^"])
def test_set_operators_take_only_sets(n: int, op: str) -> None:
    fn = _binary(op)
    members = list(range(n))
    for other in ([1, 2, -1], (1, -1), range(3), "ab", {1: 0}.values()):
        for kind in (set, Set):
            with pytest.raises(TypeError, match="unsupported operand"):
                fn(kind(members), other)
            with pytest.raises(TypeError, match="unsupported operand"):
                fn(other, kind(members))
            s = kind(members)
            with pytest.raises(TypeError, match="unsupported operand"):
                exec(f"s {op}= other", {"s": s, "other": other})
    for other in ({1, 2, -1}, frozenset({1, -1}), Set({2, -2}), {1: 0, -3: 0}.keys()):
        ref = set(members)
        got, want = fn(Set(members), other), fn(ref, set(other) if isinstance(other, Set) else other)
        assert got == want and type(got) is type(want) is set
        got, want = fn(other, Set(members)), fn(set(other) if isinstance(other, Set) else other, ref)
        assert got == want and type(got) is type(want), other  # frozenset | set is a frozenset
        s = Set(members)
        before = s
        exec(f"s {op}= other", ns := {"s": s, "other": other})
        assert ns["s"] is before and ns["s"] == fn(ref, set(other))  # in place, the same Set


def test_set_methods_take_any_iterable() -> None:
    for n in SIZES:
        s, ref = Set(range(n)), set(range(n))
        for method in ("union", "intersection", "difference", "symmetric_difference",
                       "issubset", "issuperset", "isdisjoint"):
            assert getattr(s, method)([1, 2, -1]) == getattr(ref, method)([1, 2, -1]), method
        assert s.union([1], (2,), range(-2, 0)) == ref.union([1], (2,), range(-2, 0))


class SetReverseOps(cabc.Set):  # type: ignore[type-arg]
    """Another set type: its reflected operators answer when set's refuse."""

    def __init__(self, it: Any = ()) -> None:
        self.items = frozenset(it)

    def __contains__(self, x: object) -> bool:
        return x in self.items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def test_other_set_types_answer_by_their_reflected_operators() -> None:
    for kind in (set, Set):
        result = kind({1, 2}) | SetReverseOps({3})
        assert type(result) is SetReverseOps and set(result) == {1, 2, 3}, kind
        result = kind({1, 2}) - SetReverseOps({2})
        assert type(result) is SetReverseOps and set(result) == {1}, kind


@pytest.mark.parametrize("n", SIZES)
def test_remove_discard_and_in_retry_a_set_as_a_frozenset(n: int) -> None:
    for kind in (set, Set):
        s = kind([frozenset({1}), frozenset({2, 3}), *range(n)])
        assert kind({1}) in s and {1} in s and kind({2, 3}) in s and {9} not in s
        s.remove(kind({1}))
        s.discard(kind({2, 3}))
        s.discard({7})
        assert s == set(range(n)), kind
        with pytest.raises(KeyError):
            s.remove(kind({7}))
        with pytest.raises(TypeError, match="unhashable type: 'list'"):
            s.remove([1])
        with pytest.raises(TypeError, match="unhashable type: 'list'"):
            [1] in s  # noqa: B015
    s = Set([frozenset({1})])
    s.remove(Set({1}))  # a Set argument too
    assert not s


def test_set_is_weakly_referenceable_stored_too(heap: dh.Heap) -> None:
    s = Set({1})
    ref = weakref.ref(s)
    assert ref() is s
    seen: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary({"s": s})
    assert seen["s"] is s
    del s, ref
    assert "s" not in seen  # weak: gone with the Set
    with heap.transaction() as state:
        state.tags = set(range(100))  # tree form
        state.small = {1}
    with heap.transaction() as state:
        assert weakref.ref(state.tags)() is state.tags and weakref.ref(state.small)() is state.small


def test_set_records_are_unchanged_by_the_weakref_slot(heap: dh.Heap) -> None:
    """The pickle of a Set written now, byte for byte as before Set had __weakref__."""
    with heap.transaction() as state:
        state.s = {1, 2, (3, 4)}
    data, _ = heap.connection._storage.load(heap.state.s._p_oid)
    # Written by durable_heap 8c16ead (before the slot); the four bytes after the
    # pickle and the b"dh" are the record's checksum trailer.
    assert data.startswith(
        b"\x80\x03cdurable_heap._containers\nSet\nq\x00.\x80\x03}q\x01"
        b"(K\x01NK\x02NK\x03K\x04\x86q\x02Nu\x85q\x03."
    ), data


class Holder:
    """A hashable member whose repr shows a set: the way a set comes to contain itself."""

    def __init__(self, box: Any) -> None:
        self.box = box

    def __repr__(self) -> str:
        return f"Holder({self.box!r})"


class Tags(Set):
    pass


class PlainTags(set):  # type: ignore[type-arg]
    pass


def test_set_repr_is_sets_self_containing_and_subclassed() -> None:
    for kind in (set, Set):
        s = kind()
        s.add(Holder(s))
        assert repr(s) == "{Holder(set(...))}", kind
    assert repr(Set()) == repr(set()) == "set()"
    assert repr(Tags()) == "Tags()" and repr(PlainTags()) == "PlainTags()"
    assert repr(Tags([1])) == "Tags({1})" == repr(PlainTags([1])).replace("Plain", "")
    t = Tags()
    t.add(Holder(t))
    assert repr(t) == "Tags({Holder(Tags(...))})"


def test_set_comparisons_with_other_types_are_sets() -> None:
    for other in ([1], (1,), 1, None, "a", {1: 0}, frozenset({1}), {1: 0}.keys()):
        for op in ("==", "!=", "<", "<=", ">", ">="):
            fn = eval(f"lambda a, b: a {op} b")  # noqa: S307 - our own operator strings
            assert outcome(lambda: fn(Set({1}), other)) == outcome(lambda: fn({1}, other)), (op, other)  # noqa: B023
            assert outcome(lambda: fn(other, Set({1}))) == outcome(lambda: fn(other, {1})), (op, other)  # noqa: B023
    for kind in (set, Set):
        with pytest.raises(KeyError, match="pop from an empty set"):
            kind().pop()
        with pytest.raises(TypeError, match="not reversible"):
            reversed(kind())  # type: ignore[call-overload]


# --- List ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_sort_raises_when_the_key_changes_the_list(n: int) -> None:
    for kind in (list, List):
        x = kind(range(n, 0, -1))
        with pytest.raises(ValueError, match="list modified during sort"):
            x.sort(key=lambda v: (x.append(0), v)[1])  # noqa: B023
        assert x == list(range(1, n + 1)), kind  # sorted; the appends are dropped

        x = kind(range(n, 0, -1))
        with pytest.raises(ValueError, match="list modified during sort"):
            x.sort(key=lambda v: (x.append(0), x.pop(), v)[2])  # noqa: B023 - emptied again
        assert x == list(range(1, n + 1))

        for no_change in (lambda x: x.clear(), lambda x: x.reverse(), lambda x: x.sort(),
                          lambda x: x.extend([]), lambda x: x.__delitem__(slice(None))):
            x = kind(range(n, 0, -1))
            x.sort(key=lambda v: (no_change(x), v)[1])  # noqa: B023 - the empty list, unchanged
            assert x == list(range(1, n + 1)), kind

        x = kind(range(n, 0, -1))
        seen: list[int] = []
        x.sort(key=lambda v: (seen.append(len(x)), v)[1])  # noqa: B023 - empty meanwhile
        assert seen == [0] * n and x == list(range(1, n + 1))

        x = kind(range(n, 0, -1))
        with pytest.raises(ZeroDivisionError):
            x.sort(key=lambda v: 1 // (v - 1))
        assert x == list(range(n, 0, -1))  # unchanged by a failed key

        x = kind([3, 1, 2])
        x.sort(reverse=True)
        assert x == [3, 2, 1]


def test_sort_in_a_heap_keeps_the_sorted_items(heap: dh.Heap) -> None:
    with heap.transaction() as state:
        state.items = list(range(200, 0, -1))
        with pytest.raises(ValueError, match="modified during sort"):
            state.items.sort(key=lambda v: (state.items.extend(range(70)), v)[1])
    with heap.transaction() as state:
        assert state.items == list(range(1, 201))


class Hinted:
    """An iterator whose __length_hint__ is wrong and huge."""

    def __init__(self, hint: int) -> None:
        self.hint, self.i = hint, 0

    def __iter__(self) -> Hinted:
        return self

    def __next__(self) -> int:
        self.i += 1
        if self.i > 3:
            raise StopIteration
        return self.i

    def __length_hint__(self) -> int:
        return self.hint


@pytest.mark.parametrize("n", SIZES)
def test_extend_ignores_a_wrong_huge_length_hint(n: int) -> None:
    for hint in (sys.maxsize, sys.maxsize - 1, 2**62, 2**40):
        x = List(range(n))
        x.extend(Hinted(hint))
        assert x == [*range(n), 1, 2, 3]
        x += Hinted(hint)
        x[0:0] = Hinted(hint)
        assert x == [1, 2, 3, *range(n), 1, 2, 3, 1, 2, 3]
        assert List(Hinted(hint)) == [1, 2, 3]
    ref = list(range(n))
    ref.extend(Hinted(sys.maxsize))  # the case where list.extend itself ignores the hint
    assert ref == [*range(n), 1, 2, 3]


class Shouting(list):  # type: ignore[type-arg]
    def __getitem__(self, i: Any) -> Any:
        return "overridden" if not isinstance(i, slice) else super().__getitem__(i)


class DurableShouting(List):
    def __getitem__(self, i: Any) -> Any:
        return "overridden" if not isinstance(i, slice) else super().__getitem__(i)


class OwnIter(list):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return iter(["from __iter__"])


class DurableOwnIter(List):
    def __iter__(self) -> Iterator[Any]:
        return iter(["from __iter__"])


class OwnLen(list):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 1


class DurableOwnLen(List):
    def __len__(self) -> int:
        return 1


READS: list[Callable[[Any], Any]] = [
    list, lambda x: [v for v in x], lambda x: list(reversed(x)), lambda x: 2 in x,
    lambda x: x.count(2), lambda x: x.index(2), repr, lambda x: x == [0, 1, 2, 3],
    lambda x: x.copy(), lambda x: x + [9], lambda x: [9] + x, lambda x: x * 2, sorted,
    lambda x: x[1], lambda x: x[1:3], lambda x: x[-1], len, lambda x: x < [0, 1, 2, 4],
    lambda x: x.pop(), lambda x: (x.remove(2), list.copy(x) if isinstance(x, list) else List.copy(x))[1],
]


@pytest.mark.parametrize("n", SIZES)
def test_a_subclass_is_iterated_as_list_iterates_its_subclasses(n: int) -> None:
    """list's iterator and methods ignore a subclass's __getitem__, __iter__ (but
    list(sub) and sorted() call iter()) and __len__; a List subclass alike."""
    items = [0, 1, 2, 3, *range(4, n)]
    for plain, durable in ((Shouting, DurableShouting), (OwnIter, DurableOwnIter), (OwnLen, DurableOwnLen)):
        for i, read in enumerate(READS):
            want = outcome(lambda: read(plain(items)))  # noqa: B023
            got = outcome(lambda: read(durable(items)))  # noqa: B023
            assert got == want, (durable.__name__, i)


@pytest.mark.parametrize("n", SIZES)
def test_list_errors_are_lists(n: int) -> None:
    def each(kind: type) -> Iterator[Callable[[], Any]]:
        yield lambda: kind().pop()
        yield lambda: kind(range(n)).pop(n)
        yield lambda: kind(range(n)).pop(-n - 1)
        yield lambda: kind(range(n)).pop("a")
        yield lambda: kind(range(n)).pop(1.0)
        yield lambda: kind(range(n)).insert("a", 1)
        yield lambda: kind(range(n)).insert(10**30, 1)
        yield lambda: kind(range(n)).remove(-1)
        yield lambda: kind(range(n)).index(-1)
        yield lambda: kind(range(n)).__setitem__(n, 1)
        yield lambda: kind(range(n)).__delitem__(n)
        yield lambda: kind(range(n)).__setitem__("a", 1)
        yield lambda: kind(range(n)).__getitem__(n)
        yield lambda: kind(range(n)).__getitem__("a")
        yield lambda: kind(range(n)).__setitem__(slice(0, 1), 5)
        yield lambda: kind(range(n)).__setitem__(slice(0, 3, 2), 5)
        yield lambda: kind(range(n)).__setitem__(slice(0, 3, 2), [1])
        yield lambda: kind(range(n)) * 1.5
        yield lambda: operator.imul(kind(range(n)), 1.5)
        yield lambda: operator.iadd(kind(range(n)), 5)
        yield lambda: kind(range(n))[::0]

    for got_fn, want_fn in zip(each(List), each(list), strict=True):
        assert outcome(got_fn, message=True) == outcome(want_fn, message=True)


def test_in_place_operators_return_self_and_comparisons_are_lists() -> None:
    for kind in (list, List):
        x = kind([1])
        assert x.__iadd__((2,)) is x and x.__imul__(2) is x and x == [1, 2, 1, 2]
    for other in ((1,), 1, None, "a", {1}, {1: 0}, range(1)):
        for op in ("==", "!=", "<", "<=", ">", ">=", "+"):
            fn = eval(f"lambda a, b: a {op} b")  # noqa: S307 - our own operator strings
            assert outcome(lambda: fn(List([1]), other)) == outcome(lambda: fn([1], other)), (op, other)  # noqa: B023
            assert outcome(lambda: fn(other, List([1]))) == outcome(lambda: fn(other, [1])), (op, other)  # noqa: B023
    assert List([1]) == List([1]) and [1] == List([1]) and List([1]) < List([2]) and [1] < List([2])


def test_tiny_trees_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subclass and sort rules hold in deep List trees (leaves of 4)."""
    for name in ("TAIL_MAX", "LEAF_MAX", "BRANCH_MAX"):
        monkeypatch.setattr(c, name, 4)
    for n in (10, 90):
        test_a_subclass_is_iterated_as_list_iterates_its_subclasses(n)
        test_sort_raises_when_the_key_changes_the_list(n)
        test_extend_ignores_a_wrong_huge_length_hint(n)


# --- copy.copy and copy.deepcopy -------------------------------------------------------


class Named(Dict):
    pass


@pytest.mark.parametrize("n", SIZES)
def test_copy_copy_and_deepcopy_are_independent_as_the_builtins(n: int) -> None:
    import copy

    nested = [0]
    made = {dict: {i: i for i in range(n)} | {"nested": nested}, list: [*range(n), nested],
            set: set(range(n))}
    for kind, value in made.items():
        for how in (copy.copy, copy.deepcopy):
            original = DURABLE[kind](value)
            twin = how(original)
            assert type(twin) is type(original) and twin == original and twin is not original
            if kind is dict:
                twin["new"] = 1
                assert "new" not in original  # the copy's own entries: not the original's trees
                assert (twin["nested"] is original["nested"]) == (how is copy.copy)  # shallow vs deep
            elif kind is list:
                twin.append("new")
                twin[0] = "changed"
                assert original[0] == 0 and "new" not in original
                assert (twin[-2] is original[-1]) == (how is copy.copy)
            else:
                twin.add("new")
                assert "new" not in original
    d = Named(a=1)  # a subclass keeps its type (its instances take no attributes: see below)
    assert type(copy.copy(d)) is Named and type(copy.deepcopy(d)) is Named and copy.copy(d) == d
    loop = List([1])
    loop.append(loop)
    again = copy.deepcopy(loop)
    assert again[1] is again and again is not loop


def test_a_copied_stored_dict_is_its_own_record(heap: dh.Heap) -> None:
    import copy

    with heap.transaction() as state:
        state.a = {i: i for i in range(100)}
        state.b = copy.copy(state.a)
        state.b[-1] = "only in b"
    with heap.transaction() as state:
        assert -1 not in state.a and state.b[-1] == "only in b" and len(state.a) == 100
        assert state.a._entries is not state.b._entries


@pytest.mark.parametrize("n", SIZES)
def test_init_called_again_is_the_builtins(n: int) -> None:
    """dict.__init__ on a dict updates it; list's and set's start again."""
    for kind, value, more in ((dict, {i: i for i in range(n)}, {"x": 1}), (list, list(range(n)), [7]),
                              (set, set(range(n)), {7})):
        ref, ours = kind(value), DURABLE[kind](value)
        ref.__init__(more)  # type: ignore[misc]
        ours.__init__(more)
        assert ours == ref and len(ours) == len(ref), kind


# --- attributes of subclass instances: refused, never silently dropped ---------------


class LabelledTags(Set):
    @property
    def size(self) -> int:
        return len(self)

    @size.setter
    def size(self, n: int) -> None:  # a property's setter decides: it keeps items
        self.clear()
        self.update(range(n))


class LabelledList(List):
    pass


class LabelledDict(Dict):
    pass


def test_an_attribute_on_a_subclass_instance_is_refused_not_lost(tmp_path: Path) -> None:
    """The containers store their items only: an attribute would vanish at the next load."""
    with dh.open(tmp_path / "app.fs") as heap:
        with heap.transaction() as state:
            state.tags, state.items, state.named = LabelledTags({1}), LabelledList([1]), LabelledDict(a=1)
        for name, kind in (("tags", "Set"), ("items", "List"), ("named", "Dict")):
            with pytest.raises(AttributeError, match=rf"\.label cannot be set: a {kind} subclass stores its "
                                                     rf"items.*would be lost at the next load"):
                with heap.transaction() as state:
                    getattr(state, name).label = "x"
        with heap.transaction() as state:
            state.tags.size = 3  # a property: allowed
            state.tags._v_cache = "volatile"  # volatile names: allowed, never stored
    with dh.open(tmp_path / "app.fs") as heap:
        state = heap.state
        assert state.tags == {0, 1, 2} and state.items == [1] and state.named == {"a": 1}
        assert type(state.tags) is LabelledTags and not hasattr(state.tags, "label")
        assert copy_of(state.tags) == {0, 1, 2}


def copy_of(value: Any) -> Any:
    import copy

    return copy.copy(value)
