"""Issue 18, part 3: buckets of plain entries are pickled without a Python call per object
(`durable_heap._fastpickle`), into exactly the bytes ZODB's own pickler writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import ZODB.serialize
from BTrees.LOBTree import LOBucket

import durable_heap as dh
from durable_heap._containers import _EntryBucket, _walk_buckets
from durable_heap._fastpickle import speed_up


@dataclasses.dataclass
class Point:
    x: int
    y: int


def _count_persistent_ids(monkeypatch: pytest.MonkeyPatch, counting: list[bool] | None = None) -> list[Any]:
    """The objects ZODB's Python ``persistent_id`` is called for from now on (while
    ``counting[0]``, when given)."""
    calls: list[Any] = []
    real = ZODB.serialize.ObjectWriter.persistent_id

    def persistent_id(self: Any, obj: Any) -> Any:
        if counting is None or counting[0]:
            calls.append(obj)
        return real(self, obj)

    monkeypatch.setattr(ZODB.serialize.ObjectWriter, "persistent_id", persistent_id)
    return calls


def _buckets(state: Any) -> list[Any]:
    return [bucket for bucket, _ in _walk_buckets(state.d._entries)]


def _both_ways(obj: Any) -> tuple[bytes, bytes]:
    """The record of `obj` as ZODB's writer makes it, and through `speed_up`."""
    theirs = ZODB.serialize.ObjectWriter(obj).serialize(obj)
    writer = ZODB.serialize.ObjectWriter(obj)
    speed_up(writer)
    return theirs, writer.serialize(obj)


@pytest.mark.parametrize(
    "value",
    [
        lambda i: i,
        lambda i: f"s{i}",
        lambda i: float(i) / 3,
        lambda i: i % 2 == 0,
        lambda i: None,
        lambda i: f"b{i}".encode(),
        lambda i: 2**70 + i,  # a long int
        lambda i: {"i": i},  # inline raw dicts: ZODB's path
        lambda i: [i, i],  # inline raw lists: ZODB's path
        lambda i: Point(i, i),  # a watched plain object: ZODB's path
        lambda i: dh.Object(),  # a persistent value: ZODB's path
        lambda i: (i, "t"),  # a tuple value
    ],
    ids=["int", "str", "float", "bool", "none", "bytes", "long", "dict", "list", "dataclass",
         "object", "tuple"],
)
def test_a_bucket_record_is_byte_for_byte_zodbs(tmp_path: Path, value: Any) -> None:
    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": value(i) for i in range(100)}
        with heap.transaction() as state:
            buckets = _buckets(state)
            assert len(buckets) > 2  # with and without a next bucket
            for bucket in buckets:
                theirs, ours = _both_ways(bucket)
                assert ours == theirs


def test_a_one_entry_commit_calls_zodbs_persistent_id_a_few_times(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ZODB's ``persistent_id`` runs in Python once per object pickled: about 85 for a
    bucket of 20 entries before; now once for the class and once for the next bucket."""
    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": i for i in range(2_000)}
        calls = _count_persistent_ids(monkeypatch)
        with heap.transaction() as state:
            state.d["k500"] = -1
        stored = [obj for obj in calls if isinstance(obj, type)]
        assert stored == [_EntryBucket]  # one record, the bucket, was pickled
        assert len(calls) <= 3, calls
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        assert state.d["k500"] == -1
        assert state.d["k501"] == 501


def test_a_split_stores_the_new_bucket_the_fast_state_refers_to(tmp_path: Path) -> None:
    """A bucket that splits refers to a new bucket: ZODB's ``persistent_id`` gives it an
    oid and queues it, as it would while pickling; both are stored."""
    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.d = {f"k{i:04d}": i for i in range(200)}
            before = len(_buckets(state))
        for i in range(200, 400):  # appended: the last bucket splits again and again
            with heap.transaction() as state:
                state.d[f"k{i:04d}"] = i
        with heap.transaction() as state:
            assert len(_buckets(state)) > before
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        assert dict(state.d.items()) == {f"k{i:04d}": i for i in range(400)}
        assert all(bucket._p_oid is not None for bucket in _buckets(state))


def test_a_state_that_is_not_plain_is_left_to_zodb() -> None:
    """`_EntryBucket._dh_plain_refs` admits only tuples of exact plain atoms."""
    plain = _EntryBucket._dh_plain_refs
    assert plain(((1, ("a", 1), 2, ("b", 2.5)),)) == ()
    nxt = _EntryBucket()
    assert plain(((1, ("a", None)), nxt)) == (nxt,)
    assert plain(((1, ("a", [1])),)) is None  # a list: unhashable
    assert plain(((1, ("a", {"x": 1})),)) is None
    assert plain(((1, ("a", (1, 2))),)) is None  # a tuple value: ZODB's way (it may hold anything)

    class MyStr(str):
        pass

    assert plain(((1, (MyStr("a"), 1)),)) is None  # subclasses may hash in Python


def test_an_unhashable_entry_is_pickled_by_zodbs_way() -> None:
    """Entries are tuples; one that is not (unhashable) makes the fast pickling fail,
    and the record is then ZODB's, byte for byte."""
    bucket = _EntryBucket()
    bucket[1] = ["a", 1]
    bucket[2] = ("b", 2)
    assert _EntryBucket._dh_plain_refs(LOBucket.__getstate__(bucket)) == ()  # looks plain
    theirs = ZODB.serialize.ObjectWriter().serialize(bucket)
    writer = ZODB.serialize.ObjectWriter()
    speed_up(writer)
    assert writer.serialize(bucket) == theirs


# --- a workflow's journal (issue 14: a step's cost) ----------------------------------------


def _journal_records(journal: Any) -> list[Any]:
    """The Journal and each of its buckets (every record a step may rewrite)."""
    from BTrees.IOBTree import IOBucket

    records = [journal]
    state = journal.__getstate__()
    if state is not None and len(state) == 2:  # split: its buckets are records of their own
        bucket = state[1]
        while bucket is not None:
            assert type(bucket) is IOBucket
            records.append(bucket)
            bucket = bucket.__getstate__()[1] if len(bucket.__getstate__()) > 1 else None
    return records


@pytest.mark.parametrize(
    "value",
    [
        lambda i: i,
        lambda i: None,
        lambda i: f"s{i}",
        lambda i: (i, ("a", 1.5)),  # nested tuples of atoms: fast
        lambda i: (i, dh.Object()),  # a persistent object in a tuple: ZODB's path (a reference)
        lambda i: [i],  # a list: ZODB's path
        lambda i: {"i": i},
        lambda i: Point(i, i),
    ],
    ids=["int", "none", "str", "tuples", "object-in-tuple", "list", "dict", "dataclass"],
)
@pytest.mark.parametrize("n", [0, 3, 8, 30])
def test_a_journal_record_is_byte_for_byte_zodbs(tmp_path: Path, value: Any, n: int) -> None:
    """The Journal (one bucket held inline, or split) and its ``IOBucket`` records, with
    entries of plain values, failed steps (an error tuple) and values that are not
    plain, pickle to exactly ZODB's bytes."""
    from durable_heap._workflows import Journal, JournalEntry

    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.j = journal = Journal()
            for i in range(n):
                if i % 5 == 4:
                    entry = JournalEntry("step", "put", f"put({i})",
                                         error=("builtins", "ValueError", (i, "bad"), "ValueError"), at=1.5)
                else:
                    entry = JournalEntry("step", "put", f"put({i})", value(i), at=float(i))
                journal[i] = entry
        with heap.transaction() as state:
            records = _journal_records(state.j)
            assert len(records) > 1 or n <= 8
            for record in records:
                theirs, ours = _both_ways(record)
                assert ours == theirs


def test_a_step_calls_zodbs_persistent_id_a_few_times(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A step rewrites its journal's bucket of up to 8 entries: about 70 Python calls of
    ZODB's ``persistent_id`` for pickling it before; now one, for its class."""
    from durable_heap._workflows import Journal

    heap = dh.open(tmp_path / "h.fs")
    with heap.transaction() as state:
        state.box = {}

    @heap.action
    def put(i: int) -> int:
        heap.state.box["k"] = i
        return i

    counting = [False]
    calls = _count_persistent_ids(monkeypatch, counting)

    @heap.workflow
    def flow(n: int) -> int:
        for i in range(n):
            counting[0] = i == n - 1  # the last step: its journal is one bucket of 8 entries
            put(i)
            counting[0] = False
        return n

    try:
        flow(8)
        journal = [c for c in calls if c is Journal]
        assert journal == [Journal]  # the step pickled the journal's record
        # The Dict's record (its small form: ZODB's way, 5 calls) and the journal's (1).
        assert len(calls) <= 8, calls  # before: about 80
    finally:
        heap.close()
    with dh.open(tmp_path / "h.fs") as heap:  # read back from the file
        (wf,) = heap.workflows()
        assert wf.status == "done" and wf.result() == 8
        journal = wf.info["journal"]
        assert [e["detail"].rpartition(".")[2] for e in journal] == [f"put({i})" for i in range(8)]
        assert heap.state.box["k"] == 7


def test_records_load_through_a_buffered_stream_into_the_same_objects(tmp_path: Path) -> None:
    """Every connection of a heap reads records through `BufferedObjectReader` (a stream
    with ``peek``, so the C unpickler reads from memory, not one ``read()`` per opcode),
    and each record loads into what ZODB's own reader makes of it. Fails without the
    reader (the connection's reader is ZODB's ObjectReader)."""
    from durable_heap._fastpickle import BufferedObjectReader

    path = tmp_path / "app.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = {f"k{i}": (i, f"v{i}", [i]) for i in range(500)}
        state.p = Point(1, 2)
    with dh.open(path) as heap:
        with heap.transaction() as state:
            reader = heap.connection._reader
            assert type(reader) is BufferedObjectReader
            assert [state.d[f"k{i}"] for i in (0, 250, 499)] == [(0, "v0", [0]), (250, "v250", [250]),
                                                                  (499, "v499", [499])]
            assert (state.p.x, state.p.y) == (1, 2)
            conn = heap.connection
            zodbs = ZODB.serialize.ObjectReader(conn, conn._cache, conn._db.classFactory)
            for bucket in _buckets(state):
                record = conn._storage.load(bucket._p_oid)[0]
                assert reader.getClassName(record) == zodbs.getClassName(record)
                assert reader.getState(record) == zodbs.getState(record)


# --- the heap's own trees: indexes and timers (issue 14: a workflow's start and end) ------


def _tree_records(tree: Any) -> list[Any]:
    """An ``OOBTree`` and, when split, each of its ``OOBucket`` records."""
    records = [tree]
    state = tree.__getstate__()
    if state is not None and len(state) == 2:
        bucket = state[1]
        while bucket is not None:
            records.append(bucket)
            bstate = bucket.__getstate__()
            bucket = bstate[1] if len(bstate) > 1 else None
    return records


def _timer(i: int, kind: str) -> Any:
    from durable_heap._workflows import TimerEntry

    if kind == "retention":  # what a workflow's end adds
        return TimerEntry("prune", f"wf{i}", created=float(i), origin="retention")
    if kind == "kwargs":
        return TimerEntry("call", ("app", "put"), (i, "a", (1.5, None)), {"n": i, "t": ("x",)}, created=1.0)
    if kind == "list":  # a list argument: ZODB's way
        return TimerEntry("call", ("app", "put"), ([i],), created=1.0)
    if kind == "dict-in-kwargs":  # a dict in the kwargs: ZODB's way
        return TimerEntry("call", ("app", "put"), (), {"d": {"i": i}}, created=1.0)
    assert kind == "object"  # a persistent argument: ZODB's way (a reference)
    return TimerEntry("call", ("app", "put"), (dh.Object(),), created=1.0)


@pytest.mark.parametrize("kind", ["retention", "kwargs", "list", "dict-in-kwargs", "object", "index"])
@pytest.mark.parametrize("n", [0, 3, 100])
def test_a_heap_tree_record_is_byte_for_byte_zodbs(tmp_path: Path, kind: str, n: int) -> None:
    """The heap's ``OOBTree``s (one bucket held inline, or split into ``OOBucket``s with
    and without a next bucket) of timers and of index entries pickle to exactly ZODB's
    bytes; a timers bucket of plain timers takes the fast way."""
    from BTrees.OOBTree import OOBTree

    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction():
            root = heap.connection.root()
            root["t"] = tree = OOBTree()
            for i in range(n):
                tree[(float(i), f"{i:08x}")] = True if kind == "index" else _timer(i, kind)
        with heap.transaction():
            records = _tree_records(heap.connection.root()["t"])
            assert len(records) > 2 or n <= 30
            for record in records:
                theirs, ours = _both_ways(record)
                assert ours == theirs
        with heap.transaction():  # read back: a persistent argument is a reference
            tree = heap.connection.root()["t"]
            assert len(tree) == n
            if kind == "object" and n:
                (arg,) = tree.values()[0].args
                assert isinstance(arg, dh.Object) and arg._p_oid is not None


def test_a_timers_rule_looks_into_every_object() -> None:
    """`NO_REFS` (ZODB's answer None for every object, unhashable ones too) only for
    exact timer entries whose fields, arguments and kwargs hold plain atoms and tuples."""
    from durable_heap import _fastpickle
    from durable_heap._workflows import _oo_bucket_refs

    def items(*timers: Any) -> Any:
        return (tuple(x for i, t in enumerate(timers) for x in ((float(i), "s"), t)),)

    assert _oo_bucket_refs(items(_timer(1, "retention"), _timer(2, "kwargs"))) is _fastpickle.NO_REFS
    for kind in ("list", "dict-in-kwargs", "object"):
        assert _oo_bucket_refs(items(_timer(1, "retention"), _timer(2, kind))) is None
    nxt = __import__("BTrees.OOBTree", fromlist=["OOBucket"]).OOBucket()
    assert _oo_bucket_refs((items(_timer(1, "retention"))[0], nxt)) is None  # a next bucket: ZODB's way
    assert _oo_bucket_refs((((1.0, "s"), True),)) == ()  # plain index entries: the table


def test_a_workflows_end_pickles_no_timer_through_zodbs_persistent_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workflow's end adds its retention timer to the timers' last bucket and rewrites
    it: about 20 Python calls of ZODB's ``persistent_id`` per timer there before (some
    500 for 25 timers); now none of them."""
    from durable_heap._workflows import TimerEntry

    heap = dh.open(tmp_path / "h.fs")

    @heap.workflow
    def flow(n: int) -> int:
        return n

    for i in range(20):
        flow(i)
    calls = _count_persistent_ids(monkeypatch)
    try:
        flow(20)
        assert [c for c in calls if type(c) is TimerEntry] == []  # before: 21, one per timer
        assert len(calls) < 150, len(calls)  # before: about 600
    finally:
        monkeypatch.undo()
        heap.close()
    with dh.open(tmp_path / "h.fs") as heap:  # read back from the file
        assert len(heap.timers()) == 21
        assert sorted(wf.result() for wf in heap.workflows()) == list(range(21))
