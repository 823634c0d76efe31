"""Small values stored inline (`durable_heap._inline`), on real FileStorage heaps.

A small dict or list stored into a Dict or List lives in its holder's record; a
change through it must reach the disk (every mutating method), identity and
aliasing must behave as with builtins, a value that outgrows the rules becomes
its own record, and a heap holding inline values carries format 3, which an
older durable_heap refuses.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ZODB.FileStorage import FileStorage

import durable_heap as dh
from durable_heap import _containers as c
from durable_heap import _format, _inline
from durable_heap.testing import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).parent / "fixtures" / "legacy-0.1.fs"
#: main before inline values (format 2 at most): "an older version of the code".
OLDER = "8c16ead"


@dataclasses.dataclass
class Box:
    """A plain object holding what was read from state."""

    items: Any


def _entry(i: int) -> dict[str, Any]:
    return {"a": 0, "b": -1, "i": i, "d": {"a": 1, "b": 2}, "l": [3, 1, 2]}


def _records(path: Path) -> int:
    storage = FileStorage(str(path), read_only=True)
    try:
        return len(storage)
    finally:
        storage.close()


# --- what is inline --------------------------------------------------------------------


def test_small_values_live_in_their_holders_record(heap: dh.Heap, heap_path: Path) -> None:
    with heap.transaction() as s:
        s.small = {"a": {"x": 1, "tags": ["a", "b"]}}
        s.big = {f"k{i}": {"i": i, "tags": ["a", "b"]} for i in range(2000)}
        s.items = [{"i": i} for i in range(300)]
    assert type(s.small._small["a"]) is dict and type(s.small._small["a"]["tags"]) is list
    assert _records(heap_path) < 400  # buckets and leaves; not 2000 * 2 + 300 records more
    with heap.transaction() as s:
        assert s.big["k7"] == {"i": 7, "tags": ["a", "b"]} and type(s.big["k7"]) is dh.Dict
        assert type(s.big["k7"]["tags"]) is dh.List and s.items[250] == {"i": 250}


@pytest.mark.parametrize("value", [
    {str(i): i for i in range(_inline.INLINE_ITEMS + 1)},  # too many items
    [list(range(3))] * 1 + [[[1]]],                          # too deep
    {"t": "x" * (_inline.INLINE_BYTES + 1)},                 # too big
    {"when": datetime.date(2024, 1, 1)},                    # not a scalar of the rule
    {"s": {1, 2}},
    {(1, 2): "tuple key"},
])
def test_values_outside_the_rules_are_records(heap: dh.Heap, value: Any) -> None:
    with heap.transaction() as s:
        s.d = {"v": value}
        assert type(s.d._small["v"]) is not dict and type(s.d._small["v"]) is not list
    with heap.transaction() as s:
        assert s.d["v"]._p_oid is not None and dh.to_builtin(s.d["v"]) == value


def test_state_attributes_and_explicit_containers_stay_records(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.cfg = {"a": 1}
        s.d = {"x": dh.Dict({"a": 1}), "y": dh.List([1])}
    with heap.transaction() as s:
        assert s.cfg._p_oid is not None and s.d["x"]._p_oid is not None and s.d["y"]._p_oid


# --- every change through a view reaches the disk --------------------------------------

DICT_CHANGES: list[tuple[str, Callable[[Any], Any]]] = [
    ("setitem", lambda d: d.__setitem__("c", 3)),
    ("setitem existing", lambda d: d.__setitem__("a", 10)),
    ("delitem", lambda d: d.__delitem__("a")),
    ("pop", lambda d: d.pop("b")),
    ("popitem", lambda d: d.popitem()),
    ("setdefault", lambda d: d.setdefault("z", 0)),
    ("clear", lambda d: d.clear()),
    ("update", lambda d: d.update({"a": 5, "n": 6})),
    ("update kwargs", lambda d: d.update(k=1)),
    ("ior", lambda d: d.__ior__({"o": 1})),
]
LIST_CHANGES: list[tuple[str, Callable[[Any], Any]]] = [
    ("append", lambda x: x.append(9)),
    ("extend", lambda x: x.extend([7, 8])),
    ("iadd", lambda x: x.__iadd__([4])),
    ("imul", lambda x: x.__imul__(2)),
    ("insert", lambda x: x.insert(1, 5)),
    ("setitem", lambda x: x.__setitem__(0, 0)),
    ("setitem slice", lambda x: x.__setitem__(slice(0, 2), [6, 6, 6])),
    ("delitem", lambda x: x.__delitem__(0)),
    ("delitem slice", lambda x: x.__delitem__(slice(1, None))),
    ("pop", lambda x: x.pop()),
    ("pop 0", lambda x: x.pop(0)),
    ("remove", lambda x: x.remove(1)),
    ("clear", lambda x: x.clear()),
    ("reverse", lambda x: x.reverse()),
    ("sort", lambda x: x.sort()),
    ("sort key reverse", lambda x: x.sort(key=lambda v: -v, reverse=True)),
]
#: Where the inline values are held: a Dict small or tree-form, a List tail or leaves.
HOLDERS = {
    "dict small": lambda n: {f"k{i}": _entry(i) for i in range(n)},
    "dict tree": lambda n: {f"k{i}": _entry(i) for i in range(200 + n)},
    "list tail": lambda n: [_entry(i) for i in range(n)],
    "list leaves": lambda n: [_entry(i) for i in range(200 + n)],
}


def _at(holder: Any, i: int) -> Any:
    return holder[f"k{i}"] if isinstance(holder, (dict, dh.Dict)) else holder[i]


@pytest.mark.parametrize("where", sorted(HOLDERS))
def test_every_mutating_method_of_a_view_reaches_the_disk(heap: dh.Heap, reopen: Any, where: str) -> None:
    n = len(DICT_CHANGES) * 2 + len(LIST_CHANGES)
    model = HOLDERS[where](n)
    with heap.transaction() as s:
        s.h = model
    model = copy.deepcopy(model)
    with heap.transaction() as s:
        h, i = s.h, 0
        for _, change in DICT_CHANGES:  # on an entry itself, and on a dict one level in
            for twin, durable in ((_at(model, i), _at(h, i)), (_at(model, i + 1)["d"], _at(h, i + 1)["d"])):
                change(twin)
                change(durable)
                assert durable == twin
            i += 2
        for _, change in LIST_CHANGES:
            change(_at(model, i)["l"])
            change(_at(h, i)["l"])
            assert _at(h, i)["l"] == _at(model, i)["l"]
            i += 1
    heap = reopen(heap)
    assert dh.to_builtin(heap.state.h) == model


@pytest.mark.parametrize("name", [n for n, _ in DICT_CHANGES])
def test_each_dict_change_alone_marks_its_holder(heap: dh.Heap, reopen: Any, name: str) -> None:
    change = dict(DICT_CHANGES)[name]
    with heap.transaction() as s:
        s.h = {f"k{i}": _entry(i) for i in range(100)}
    with heap.transaction() as s:
        change(s.h["k50"]["d"])
    twin = _entry(50)["d"]
    change(twin)
    heap = reopen(heap)
    assert heap.state.h["k50"]["d"] == twin


@pytest.mark.parametrize("name", [n for n, _ in LIST_CHANGES])
def test_each_list_change_alone_marks_its_holder(heap: dh.Heap, reopen: Any, name: str) -> None:
    change = dict(LIST_CHANGES)[name]
    with heap.transaction() as s:
        s.h = [_entry(i) for i in range(300)]  # entry 5 is in a leaf, not the tail
    with heap.transaction() as s:
        change(s.h[5]["l"])
    twin = _entry(5)["l"]
    change(twin)
    heap = reopen(heap)
    assert heap.state.h[5]["l"] == twin


def test_changes_while_streaming_a_big_container_are_kept(heap: dh.Heap, reopen: Any) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": {"n": i} for i in range(3000)}
        s.lst = [{"n": i} for i in range(3000)]
    heap.connection.cacheMinimize()  # every bucket and leaf a ghost: streaming loads them
    with heap.transaction() as s:
        views = list(s.d.values())
        items = list(s.lst)
        for v in views:
            v["n"] += 1
        for v in items:
            v["n"] -= 1
    heap = reopen(heap)
    assert [v["n"] for v in heap.state.d.values()] == list(range(1, 3001))
    assert [v["n"] for v in heap.state.lst] == list(range(-1, 2999))


def test_an_aborted_change_through_a_view_is_dropped(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(100)}
    with pytest.raises(KeyError), heap.transaction() as s:
        s.d["k3"]["l"].append(99)
        s.d["k4"]["d"]["new"] = 1
        raise KeyError
    with heap.transaction() as s:
        assert s.d["k3"] == _entry(3) and s.d["k4"] == _entry(4)


def test_a_change_outside_a_transaction_is_refused(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {"a": {"x": [1]}}
    view = heap.state.d["a"]["x"]
    with pytest.raises(dh.NoTransactionError, match=r"state\.d\['a'\]\['x'\] was changed outside"):
        view.append(2)
    assert heap.state.d["a"]["x"] == [1]


# --- identity and aliasing ----------------------------------------------------------------


def test_identity_within_a_transaction(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(100)}
        s.lst = [_entry(i) for i in range(100)]
    with heap.transaction() as s:
        d, lst = s.d, s.lst
        assert d["k1"] is d["k1"] and d["k1"]["l"] is d["k1"]["l"] and d.get("k1") is d["k1"]
        assert next(v for k, v in d.items() if k == "k1") is d["k1"]
        assert lst[3] is lst[3] and list(lst)[3] is lst[3] and lst[-1] is lst[99]
        assert lst[3]["d"] is lst[3]["d"]
        lst.sort(key=lambda e: -e["i"])
        assert lst[96]["i"] == 3
        assert d.setdefault("k1", {}) is d["k1"]


def test_a_view_stored_in_a_second_place_becomes_one_record(heap: dh.Heap, reopen: Any) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(100)}
        s.lst = [_entry(i) for i in range(10)]
    with heap.transaction() as s:
        x = s.d["k1"]
        s.d["alias"] = x              # another entry
        s.lst.append(s.lst[0])        # the same List, again
        s.fav = s.d["k2"]["l"]        # a State attribute
        s.d["t"] = (s.d["k3"],)       # inside a tuple
        s.box = Box(s.d["k4"]["l"])   # inside a plain object
        x["i"] = "changed"
        s.fav.append("fav")
        s.lst[0]["i"] = "first"
        s.d["t"][0]["i"] = "in tuple"
        s.box.items.append("boxed")
        assert s.d["alias"] is x and s.lst[-1] is s.lst[0] and s.fav is s.d["k2"]["l"]
    heap = reopen(heap)
    with heap.transaction() as s:
        assert s.d["alias"] is s.d["k1"] and s.d["k1"]["i"] == "changed"
        assert s.lst[-1] is s.lst[0] and s.lst[10]["i"] == "first"
        assert s.fav is s.d["k2"]["l"] and s.fav == [3, 1, 2, "fav"]
        assert s.d["t"][0] is s.d["k3"] and s.d["k3"]["i"] == "in tuple"
        assert s.box.items is s.d["k4"]["l"] and s.d["k4"]["l"] == [3, 1, 2, "boxed"]
        s.d["alias"]["i"] = "once more"
    assert heap.state.d["k1"]["i"] == "once more"


def test_a_container_shared_inside_one_value_stays_shared(heap: dh.Heap, reopen: Any) -> None:
    tags = ["a"]
    with heap.transaction() as s:
        s.d = {}
        s.d["k"] = {"p": tags, "q": tags}                       # inside one inline candidate
        s.e = {"one": {"p": tags}, "two": {"q": tags}, "t": (tags,)}  # across one stored value
    heap = reopen(heap)
    with heap.transaction() as s:
        assert s.d["k"]["p"] is s.d["k"]["q"]
        assert s.e["one"]["p"] is s.e["two"]["q"] is s.e["t"][0]
        s.e["one"]["p"].append("b")
    assert heap.state.e["two"]["q"] == ["a", "b"]


def test_a_removed_value_stands_alone(heap: dh.Heap, reopen: Any) -> None:
    with heap.transaction() as s:
        s.d = {"a": {"x": 1}, "b": {"x": 2}, "c": [1]}
        s.lst = [[1], [2]]
    with heap.transaction() as s:
        kept = s.d["a"]
        popped = s.d.pop("b")
        s.d["a"] = 5  # overwritten
        s.lst[0] = "over"
        gone = s.lst.pop()
        kept["x"] = "not stored"
        popped["x"] = "not stored"
        gone.append("not stored")
        assert popped == {"x": "not stored"} and type(popped) is dh.Dict
    heap = reopen(heap)
    assert dh.to_builtin(heap.state.d) == {"a": 5, "c": [1]} and heap.state.lst == ["over"]


# --- thresholds ---------------------------------------------------------------------------


def test_a_view_past_the_rules_becomes_its_own_record(heap: dh.Heap, reopen: Any) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(100)}
    with heap.transaction() as s:
        grown, deep, odd = s.d["k1"]["l"], s.d["k2"]["d"], s.d["k3"]
        grown.extend(range(20))
        deep["more"] = [[1, 2]]
        odd["when"] = datetime.date(2024, 5, 1)
        assert not _inline.is_view(grown) and not _inline.is_view(odd)
    with heap.transaction() as s:
        assert s.d["k1"]["l"] is grown and grown._p_oid is not None
        assert odd._p_oid is not None and s.d["k3"] is odd
    heap = reopen(heap)
    with heap.transaction() as s:
        assert s.d["k1"]["l"] == [3, 1, 2, *range(20)] and s.d["k1"]["l"]._p_oid is not None
        assert s.d["k2"]["d"] == {"a": 1, "b": 2, "more": [[1, 2]]}
        assert s.d["k3"]["when"] == datetime.date(2024, 5, 1)


def test_a_view_kept_after_its_record_was_reloaded_refuses_changes(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(100)}
    with heap.transaction() as s:
        kept = s.d["k1"]["l"]
    heap.connection.cacheMinimize()  # its bucket is reloaded by the next transaction
    with pytest.raises(dh.StaleReferenceError, match="earlier transaction"), heap.transaction():
        kept.append(4)
    assert heap.state.d["k1"]["l"] == [3, 1, 2]
    with heap.transaction() as s:
        fresh = s.d["k1"]["l"]
    with heap.transaction():  # its record stayed in memory: still the one in state
        fresh.append(4)
    assert heap.state.d["k1"]["l"] == [3, 1, 2, 4]


# --- builtins, merging -----------------------------------------------------------------


def test_views_compare_and_print_as_builtins(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {"a": {"x": 1, "t": [1, 2]}}
    with heap.transaction() as s:
        v = s.d["a"]
        assert v == {"x": 1, "t": [1, 2]} and {"x": 1, "t": [1, 2]} == v and v["t"] == [1, 2]
        assert repr(v) == repr({"x": 1, "t": [1, 2]}) and v["t"] != [2, 1] and v["t"] < [3]
        assert isinstance(v, dh.Dict) and isinstance(v["t"], dh.List) and v.copy() == {"x": 1, "t": [1, 2]}
        assert dh.to_builtin(s.d) == {"a": {"x": 1, "t": [1, 2]}} and [1, 2] + v["t"] == [1, 2, 1, 2]


@pytest.mark.parametrize("n", [35, 200])  # one bucket inline in the tree's record; several
def test_concurrent_changes_to_different_inline_entries_merge(heap: dh.Heap, n: int) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(n)}
    barrier = threading.Barrier(2)
    tries: list[int] = []

    def writer(key: str) -> None:
        n = 0
        for attempt in heap.attempts(1):  # one try: a conflict would raise
            with attempt as st:
                n += 1
                st.d[key]["l"].append(key)
                barrier.wait(5)
        tries.append(n)

    threads = [threading.Thread(target=writer, args=(k,)) for k in ("k10", "k11")]  # one bucket
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tries == [1, 1]
    assert heap.state.d["k10"]["l"] == [3, 1, 2, "k10"] and heap.state.d["k11"]["l"] == [3, 1, 2, "k11"]


def test_concurrent_changes_to_one_inline_entry_conflict(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.d = {f"k{i}": _entry(i) for i in range(200)}
    inside, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            for attempt in heap.attempts(1):
                with attempt as st:
                    st.d["k10"]["l"].append("first")
                    inside.set()
                    done.wait(5)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with heap.transaction() as st:
        st.d["k10"]["d"]["b"] = "second"
    done.set()
    t.join()
    assert [type(e) for e in errors] == [dh.ConflictError]
    assert heap.state.d["k10"] == {**_entry(10), "d": {"a": 1, "b": "second"}}


# --- the format marker ---------------------------------------------------------------------


def _marker(path: Path) -> Any:
    with dh.open(path, read_only=True) as heap:
        return heap.connection.root()[_format.FORMAT_KEY]


def test_the_format_is_raised_only_by_the_first_inline_value(tmp_path: Path) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap:
        with heap.transaction() as s:
            s.d = {f"k{i}": i for i in range(100)}
            s.big = {"x": list(range(100))}  # a record, not inline
    assert _marker(path) == _format.FORMAT == 2
    with dh.open(path) as heap:
        with pytest.raises(KeyError), heap.transaction() as s:
            s.d["k1"] = {"inline": True}
            raise KeyError  # aborted: nothing inline was stored
        with heap.transaction() as s:
            s.d["k2"] = 3
    assert _marker(path) == 2
    with dh.open(path) as heap, heap.transaction() as s:
        s.new = dh.Dict()
        s.new["a"] = {"inline": [1]}  # into a Dict made in this transaction
    assert _marker(path) == _format.INLINE_FORMAT == 3
    with dh.open(path) as heap:
        assert heap.state.new["a"] == {"inline": [1]}


def test_the_legacy_heap_opens_and_takes_inline_values(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "legacy.fs"
    shutil.copy(LEGACY, path)
    with dh.open(path) as heap:
        assert len(heap.state.users) == 101
        with heap.transaction() as s:
            s.users["inline"] = {"tags": ["x"]}
    assert _marker(path) == 3
    with dh.open(path) as heap:
        assert heap.state.users["inline"] == {"tags": ["x"]} and len(heap.state.users) == 102


def _older_code(folder: Path) -> Path:
    """durable_heap as it was before inline values (`OLDER`), unpacked from git."""
    archive = folder / "older.tar"
    try:
        subprocess.run(["git", "archive", "-o", str(archive), OLDER, "durable_heap"],  # noqa: S607
                       cwd=ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"git archive {OLDER} failed (a clone with history is needed): {exc}")
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "older", filter="data")
    return folder / "older"


def test_an_older_version_refuses_a_heap_with_inline_values(tmp_path: Path) -> None:
    plain, inline = tmp_path / "plain.fs", tmp_path / "inline.fs"
    with dh.open(plain) as heap, heap.transaction() as s:
        s.d = {"a": 1, "b": dh.Dict({"x": 1})}
    with dh.open(inline) as heap, heap.transaction() as s:
        s.d = {"a": {"x": 1}}
    older = _older_code(tmp_path)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(older), env.get("PYTHONPATH", "")])
    script = ("import sys, durable_heap as dh\n"
              "assert dh.__file__.startswith(sys.argv[2]), dh.__file__\n"
              "h = dh.open(sys.argv[1]); print(dict(h.state.d)); h.close()\n")
    ok = subprocess.run([sys.executable, "-c", script, str(plain), str(older)],
                        env=env, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, "-c", script, str(inline), str(older)],
                             env=env, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode != 0
    assert "heap format 3" in refused.stderr and "newer durable_heap" in refused.stderr


# --- size ------------------------------------------------------------------------------------


def test_a_one_entry_commit_of_a_nested_value_stays_small(heap: dh.Heap, heap_path: Path) -> None:
    with heap.transaction() as s:
        s.users = {f"k{i:08d}": {"i": i, "tags": ["a", "b"]} for i in range(5000)}
    for i in range(3):  # the upper levels once
        with heap.transaction() as s:
            s.users[f"k{i * 7:08d}"]["i"] = -1
    before = os.path.getsize(heap_path)
    for i in range(20):
        with heap.transaction() as s:
            s.users[f"k{i * 211:08d}"]["i"] = 10**6 + i
    assert (os.path.getsize(heap_path) - before) / 20 <= 2048


def test_tiny_nodes_keep_inline_values_through_splits(heap: dh.Heap, reopen: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c, "TAIL_MAX", 3)
    monkeypatch.setattr(c, "LEAF_MAX", 3)
    monkeypatch.setattr(c, "BRANCH_MAX", 3)
    with heap.transaction() as s:
        s.lst = [{"n": i} for i in range(5)]
    with heap.transaction() as s:
        v = s.lst[1]
        for i in range(40):
            s.lst.insert(0, {"n": -i})  # splits leaves; v's raw value moves between records
        v["n"] = "moved"
        assert s.lst[41] is v
    heap = reopen(heap)
    assert heap.state.lst[41] == {"n": "moved"} and len(heap.state.lst) == 45


@pytest.mark.parametrize("n", [35, 100])
def test_inline_entries_merge_in_the_zeo_server(zeo_server: Any, n: int) -> None:
    """Two clients interleaved by hand: the server merges changes to different inline
    entries of one bucket (its `_EntryBucket._p_resolveConflict`), refuses the same one."""
    with dh.open(zeo_server.url) as one, dh.open(zeo_server.url) as two:
        with one.transaction() as state:
            state.big = {f"k{i}": _entry(i) for i in range(n)}
        with one.transaction() as s1:
            with two.transaction() as s2:
                s2.big["k1"]["l"].append("two")
            s1.big["k2"]["d"]["a"] = "one"  # same bucket, another entry
        with pytest.raises(dh.ConflictError, match="concurrent transaction"):
            with one.transaction() as s1:
                with two.transaction() as s2:
                    s2.big["k3"]["i"] = "two"
                s1.big["k3"]["l"].clear()  # the same entry: no merge can be right
        with two.transaction() as state:
            assert state.big["k1"]["l"] == [3, 1, 2, "two"] and state.big["k2"]["d"]["a"] == "one"
            assert state.big["k3"] == {**_entry(3), "i": "two"}


@pytest.mark.parametrize("where", ["tail", "leaf"])
def test_concurrent_changes_to_different_inline_items_of_a_list_merge(heap: dh.Heap, where: str) -> None:
    with heap.transaction() as s:
        s.lst = [_entry(i) for i in range(4 if where == "tail" else 200)]
    barrier = threading.Barrier(2)
    tries: list[int] = []

    def writer(i: int) -> None:
        n = 0
        for attempt in heap.attempts(1):  # one try: a conflict would raise
            with attempt as st:
                n += 1
                st.lst[i]["l"].append(i)
                barrier.wait(5)
        tries.append(n)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (1, 2)]  # one record
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tries == [1, 1]
    assert heap.state.lst[1]["l"] == [3, 1, 2, 1] and heap.state.lst[2]["l"] == [3, 1, 2, 2]


EARLY_READS = """
    import dataclasses
    import durable_heap as dh
    from durable_heap import state

    state.setdefault("tasks", [])          # reads state before Task is defined below

    @dataclasses.dataclass
    class Point:                            # a plain object in state: watched by snapshot
        x: int

    class Task(dh.Object):
        def __init__(self, title):
            self.title = title

    def fill():
        state.tasks = [Task("a"), Task("b")]
        state.where = Point(1)

    def titles():
        return [t.title for t in state.tasks]
"""


def test_a_top_level_reading_state_before_its_classes_loads_no_ghost(tmp_path: Path) -> None:
    """The view check of a stored container must not load it: loaded while the program's
    top level runs, before its classes exist, its objects would come back broken."""
    from tests.conftest import cli, write

    app = write(tmp_path / "app.py", EARLY_READS)
    assert cli("call", str(app), "fill", cwd=tmp_path).returncode == 0
    out = cli("call", str(app), "titles", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == '["a", "b"]', out.stderr


def test_overlapping_gc_pauses_turn_the_gc_back_on_when_the_last_one_ends() -> None:
    """`gc_paused` is process-wide: a bulk load in one thread must not turn the GC back on
    while another thread's bulk load is still running, and must not leave it off after."""
    import gc

    assert gc.isenabled()
    first_in, second_in, first_out, second_out = (threading.Event() for _ in range(4))
    seen: dict[str, bool] = {}

    def first() -> None:
        with _inline.gc_paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with _inline.gc_paused():
            second_in.set()
            first_out.wait(10)
            seen["inside the second after the first ended"] = gc.isenabled()
        second_out.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside the second after the first ended": False}
    assert gc.isenabled()
    gc.disable()  # switched off by the program: a pause leaves it off
    try:
        with _inline.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
