"""The conflict path of concurrent commits to one bucket: cheap, and exactly as strict.

Threads (or ZEO clients) changing neighbouring keys of one Dict commit to one
bucket record; each such commit meets a newer revision and is merged inside the
storage (the allowlist guard, ZODB's resolver, `_EntryBucket._p_resolveConflict`).
Issue 18 measured that path at about 1 ms of CPU per commit; these tests pin the
two things that made it cheap without making it less strict. What the merge
decides is property-tested against a reference in tests/property/test_bucket_merge.py.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
import ZODB.POSException
from BTrees.OOBTree import OOBucket
from ZODB.FileStorage import FileStorage

import durable_heap as dh
from durable_heap import _allow
from durable_heap import _containers as c

PROGRAM = "dh_test_merge_path_program"


def test_a_bucket_of_plain_values_merges_without_pickling_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries of one exact key type and one exact value type are compared as they are;
    any other bucket still compares its entries by their pickles."""

    pickled: list[Any] = []

    class Counted(c._RefPickler):
        def dump(self, obj: Any) -> None:
            pickled.append(obj)
            super().dump(obj)

    monkeypatch.setattr(c, "_RefPickler", Counted)

    def state(changes: dict[int, Any], value: Any = 0) -> Any:
        items: list[Any] = []
        for seq in range(1, 41):
            items += [seq, (seq - 1, changes.get(seq, value))]
        return (tuple(items),)

    merged = c._EntryBucket()._p_resolveConflict(state({}), state({3: 7}), state({5: 9}))
    entries = dict(zip(merged[0][0::2], merged[0][1::2], strict=True))
    assert entries[3] == (2, 7) and entries[5] == (4, 9) and entries[1] == (0, 0)
    texts = c._EntryBucket()._p_resolveConflict(state({}, "a"), state({3: "b"}, "a"), state({5: "c"}, "a"))
    assert dict(zip(texts[0][0::2], texts[0][1::2], strict=True))[5] == (4, "c")
    assert pickled == []
    floats = c._EntryBucket()._p_resolveConflict(state({}), state({3: 1.5}), state({5: 9}))
    assert dict(zip(floats[0][0::2], floats[0][1::2], strict=True))[3] == (2, 1.5)
    assert (2, 1.5) in pickled  # a float: by its pickle (0.0 == -0.0, yet not the same)


@pytest.fixture
def program() -> Iterator[types.ModuleType]:
    """A deployed program's module defining `Thing`: admitted while it is the loaded one."""
    module = types.ModuleType(PROGRAM)

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__ = PROGRAM, "Thing"
    module.Thing = Thing  # type: ignore[attr-defined]
    sys.modules[PROGRAM] = module
    try:
        yield module
    finally:
        sys.modules.pop(PROGRAM, None)


def test_the_guard_reads_a_stored_revision_once_and_checks_its_globals_at_each_merge(
    tmp_path: Path, program: types.ModuleType
) -> None:
    """The old and committed revisions of a merge are read once (they never change), but
    what they name is checked against the allowlist at every merge: after a deploy that
    no longer defines the class, a merge against those revisions is refused."""
    storage = FileStorage(str(tmp_path / "raw.fs"))
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        bucket = conn.root()["b"] = OOBucket({"plain": 1})
        tm.commit()
        oid, plain_serial = bucket._p_oid, bucket._p_serial
        bucket["x"] = program.Thing()  # type: ignore[attr-defined]
        tm.commit()
        old_serial = bucket._p_serial
        bucket["y"] = program.Thing()  # type: ignore[attr-defined]
        tm.commit()
        committed_serial = bucket._p_serial
        newpickle = storage.loadSerial(oid, committed_serial)
        conn.close()

        allowlist = _allow.Allowlist(programs={PROGRAM})
        guard = _allow._GuardedResolver(storage, lambda *args: b"merged", allowlist)
        reads: list[bytes] = []
        real = storage.loadSerial

        def counted(o: bytes, serial: bytes) -> bytes:
            reads.append(serial)
            return real(o, serial)

        storage.loadSerial = counted  # counts the guard's reads; the storage is real
        assert guard(oid, committed_serial, old_serial, newpickle) == b"merged"
        assert sorted(reads) == sorted([old_serial, committed_serial])
        assert guard(oid, committed_serial, old_serial, newpickle) == b"merged"
        assert len(reads) == 2  # the second merge against the same revisions read none
        # A committed record handed over with the call (a ZEO client's own merge) is
        # checked as given, whatever was remembered of the stored one.
        crafted = pickle.dumps(OOBucket, 3) + pickle.dumps(((("x", os.getcwd),),), 3)
        with pytest.raises(ZODB.POSException.ConflictError):
            guard(oid, committed_serial, old_serial, newpickle, crafted)

        deployed = types.ModuleType(PROGRAM)  # a new version: Thing is no class of its own
        deployed.Thing = os.system  # type: ignore[attr-defined]
        sys.modules[PROGRAM] = deployed
        plain = real(oid, plain_serial)  # a new state naming no program class
        with pytest.raises(ZODB.POSException.ConflictError):
            guard(oid, committed_serial, old_serial, plain)
    finally:
        db.close()


def test_a_revision_read_for_a_merge_is_read_from_the_file_once_and_forgotten_by_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """durable_heap's FileStorage keeps the revisions ``loadSerial`` read last (every
    merge on a hot bucket reads the same ones) and the records it stored last (the next
    merge's committed revision); a pack forgets them, so a revision it removed is gone
    as it is from ZODB's own FileStorage."""
    from durable_heap._filestorage import FileStorage as Ours

    reads: list[bytes] = []
    real = FileStorage.loadSerial

    def counted(self: Any, oid: bytes, serial: bytes) -> bytes:
        reads.append(serial)
        return real(self, oid, serial)  # type: ignore[no-any-return]

    monkeypatch.setattr(FileStorage, "loadSerial", counted)  # ZODB's: what reads the file
    db = ZODB.DB(Ours(str(tmp_path / "app.fs")))
    with db.transaction() as conn:
        conn.root()["b"] = OOBucket({"n": 1})
    with db.transaction() as conn:
        bucket = conn.root()["b"]
        bucket._p_activate()
        oid, first = bucket._p_oid, bucket._p_serial
        bucket["n"] = 2
    db.close()
    db = ZODB.DB(Ours(str(tmp_path / "app.fs")))  # opened again: nothing kept
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        bucket = conn.root()["b"]
        bucket._p_activate()  # its first load: loadBefore, not loadSerial
        storage = db.storage
        data = storage.loadSerial(oid, first)
        assert storage.loadSerial(oid, first) == data and reads == [first]
        assert storage.loadSerial(oid, bucket._p_serial) != data and len(reads) == 2
        bucket["n"] = 3
        tm.commit()  # the record stored is kept too: the next merge's committed revision
        assert storage.loadSerial(oid, bucket._p_serial) == real(storage, oid, bucket._p_serial)
        assert len(reads) == 2
        conn.close()
        db.pack()  # the first revision is no longer needed: pack removes it
        with pytest.raises(ZODB.POSException.POSKeyError):
            storage.loadSerial(oid, first)
    finally:
        db.close()


def test_records_are_kept_for_merges_only_once_this_storage_has_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage whose commits never merged keeps no record it stored (issue 18: a dict
    insert per record at every commit, for revisions nobody reads back); once a merge
    happened in it, a stored record is kept and served without a file read."""
    from durable_heap._filestorage import FileStorage as Ours

    reads: list[bytes] = []
    real = FileStorage.loadSerial

    def counted(self: Any, oid: bytes, serial: bytes) -> bytes:
        reads.append(serial)
        return real(self, oid, serial)  # type: ignore[no-any-return]

    monkeypatch.setattr(FileStorage, "loadSerial", counted)  # ZODB's: what reads the file
    db = ZODB.DB(Ours(str(tmp_path / "app.fs")))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        bucket = conn.root()["b"] = OOBucket({"a": 0, "b": 0})
        tm.commit()
        bucket["a"] = 1
        tm.commit()
        storage = db.storage
        assert storage._dh_revisions == {}  # nothing merged: nothing kept
        assert storage.loadSerial(bucket._p_oid, bucket._p_serial) and len(reads) == 1  # from the file
        # Two connections change different keys of the bucket: the second commit merges.
        tm2 = transaction.TransactionManager()
        other = db.open(transaction_manager=tm2)
        other.root()["b"]["b"] = 2
        bucket["a"] = 2
        tm.commit()
        tm2.commit()  # merged by conflict resolution
        assert dict(other.root()["b"]) == {"a": 2, "b": 2}
        del reads[:]
        other.root()["b"]["b"] = 3
        tm2.commit()  # after a merge: the record stored is kept
        oid, serial = bucket._p_oid, other.root()["b"]._p_serial
        assert storage.loadSerial(oid, serial) == real(storage, oid, serial) and reads == []
        conn.close()
        other.close()
    finally:
        db.close()


def test_threads_on_neighbouring_keys_keep_every_increment(tmp_path: Path) -> None:
    """Six threads add 1 to their own neighbouring key at once, each commit merged into
    the shared bucket: every increment is there, the others' entries untouched."""
    path = tmp_path / "app.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = dict.fromkeys(range(200), 0)
    per_thread, nthreads = 40, 6
    with dh.open(path) as heap:
        start = threading.Barrier(nthreads)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                start.wait(10)
                for _ in range(per_thread):
                    for attempt in heap.attempts(100):
                        with attempt as st:
                            st.d[t] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
    with dh.open(path) as heap:
        d = heap.state.d
        assert [d[t] for t in range(nthreads)] == [per_thread] * nthreads
        assert all(d[k] == 0 for k in range(nthreads, 200)) and len(d) == 200


def test_the_merges_benchmark_counts_the_conflict_path() -> None:
    """`python -m benchmarks.merges` runs and reports where the commits went."""
    from tests.conftest import run

    out = run(["-m", "benchmarks.merges", "--threads", "2", "--seconds", "1", "--entries", "500",
               "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["commits"] > 0 and r["retries_per_commit"] == 0
    assert r["conflict"]["per_commit"] > 0  # two threads on neighbouring keys do conflict
    assert r["bucket merge"]["per_commit"] == pytest.approx(r["conflict"]["per_commit"])
    assert r["commit lock held (wall)"]["per_commit"] == pytest.approx(1, abs=0.05)  # once a commit


# --- the guard's own resolver: one reading of each record, and as strict ---------------------


def _two_commits(storage: Any, make: Any, change_one: Any, change_two: Any) -> None:
    """Commit `make(root)`, then two concurrent transactions; the second is merged (or not)."""
    db = ZODB.DB(storage)
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        one = db.open(transaction_manager=tm1)
        make(one.root())
        tm1.commit()
        two = db.open(transaction_manager=tm2)
        change_one(one.root())
        change_two(two.root())
        tm1.commit()
        try:
            tm2.commit()  # meets the first one's revision: resolved in the storage
        finally:
            tm2.abort()
            one.close()
            two.close()
    finally:
        db.close()


def test_a_merge_in_the_storage_checks_each_record_as_it_unpickles_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard with ZODB's resolver behind it unpickles each of the three records once,
    checking every global as the unpickler meets it: no separate reading for the check,
    no opcode scan (which a byte from 0x82 to 0x98 anywhere, as in the int 140, made the
    old check take), no Python ``persistent_id`` per object when pickling the merge.
    Issue 18: that was about half of the merge path of threads on neighbouring keys."""
    scans: list[bytes] = []
    real_scan, real_named = _allow.resolution_globals, _allow._named_globals

    def scan(data: bytes) -> Any:
        scans.append(data)
        return real_scan(data)

    def named(data: bytes) -> Any:
        scans.append(data)
        return real_named(data)

    monkeypatch.setattr(_allow, "resolution_globals", scan)
    monkeypatch.setattr(_allow, "_named_globals", named)
    merges: list[Any] = []
    real_merge = c._EntryBucket._p_resolveConflict

    def merge(self: Any, *states: Any) -> Any:
        merges.append(states)
        return real_merge(self, *states)

    monkeypatch.setattr(c._EntryBucket, "_p_resolveConflict", merge)
    path = tmp_path / "app.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = dict.fromkeys(range(200), 140)
    with dh.open(path) as heap:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        one, two = heap.db.open(transaction_manager=tm1), heap.db.open(transaction_manager=tm2)
        try:
            d1, d2 = one.root()["durable_heap.state"].d, two.root()["durable_heap.state"].d
            d1[1] = 141
            d2[2] = 142
            tm1.commit()
            tm2.commit()  # the same bucket: merged in the storage
        finally:
            one.close()
            two.close()
        assert len(merges) == 1 and scans == []
        assert (heap.state.d[1], heap.state.d[2], heap.state.d[3]) == (141, 142, 140)


def test_the_guards_resolver_refuses_a_class_after_a_deploy_drops_it(
    tmp_path: Path, program: types.ModuleType
) -> None:
    """A merge of records naming a program's class is made while the program defines it;
    once a deploy replaces it with something else, the same merge is refused."""
    allowlist = _allow.Allowlist(programs={PROGRAM})
    thing = program.Thing  # type: ignore[attr-defined]
    # A new version whose Thing is no class of its own (it imports one): loading the
    # record would make a SimpleNamespace, were the allowlist not asked.
    deployed = types.ModuleType(PROGRAM)
    deployed.Thing = types.SimpleNamespace  # type: ignore[attr-defined]

    def run(name: str, deploy: bool) -> None:
        storage = FileStorage(str(tmp_path / name))
        _allow.guard_conflicts(storage, allowlist)
        guard = storage.tryToResolveConflict

        def resolve(*args: Any) -> Any:
            if deploy:
                sys.modules[PROGRAM] = deployed  # after pickling, before the merge
            return guard(*args)

        storage.tryToResolveConflict = resolve  # type: ignore[method-assign]
        try:
            _two_commits(storage, lambda root: root.__setitem__("b", OOBucket({"t": 0})),
                         lambda root: root["b"].__setitem__("x", 1),
                         lambda root: root["b"].__setitem__("y", thing()))
        finally:
            sys.modules[PROGRAM] = program

    run("one.fs", deploy=False)  # merged: Thing is the program's class
    with pytest.raises(ZODB.POSException.ConflictError):
        run("two.fs", deploy=True)


@pytest.mark.parametrize("protocol", [3, 4])
def test_the_guards_resolver_refuses_a_crafted_record_whatever_its_opcodes(
    tmp_path: Path, protocol: int
) -> None:
    """A new state naming ``os.system`` is refused before anything is called: by GLOBAL
    (the unpickler asks the allowlist), or by protocol 4's opcodes (ZODB's unpickler,
    zodbpickle's, does not read them; the full check refuses them too)."""
    marker = tmp_path / "marker"
    storage = FileStorage(str(tmp_path / "raw.fs"))
    allowlist = _allow.Allowlist()
    _allow.guard_conflicts(storage, allowlist)
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        bucket = conn.root()["b"] = OOBucket({"x": 1})
        tm.commit()
        old_serial = bucket._p_serial
        bucket["y"] = 2
        tm.commit()
        crafted = (pickle.dumps(OOBucket, protocol)
                   + pickle.dumps(((("z", _Run(str(marker))),),), protocol))
        assert (b"\x93" in crafted) == (protocol == 4)  # STACK_GLOBAL
        with pytest.raises(ZODB.POSException.ConflictError):
            storage.tryToResolveConflict(bucket._p_oid, bucket._p_serial, old_serial, crafted)
        conn.close()
    finally:
        db.close()
    assert not marker.exists()


class _Run:
    """Pickles as a call of ``os.system`` (touching a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_with_a_copyreg_extension_registered_the_guard_takes_its_full_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extension code names a global without the unpickler's lookup (copyreg caches
    it): while one is registered, every merge takes the opcode check, which refuses one."""
    import copyreg

    checked: list[bytes] = []
    real = _allow._named_globals
    monkeypatch.setattr(_allow, "_named_globals", lambda data: checked.append(data) or real(data))
    copyreg.add_extension("os", "system", 0x7EED)
    try:
        storage = FileStorage(str(tmp_path / "raw.fs"))
        _allow.guard_conflicts(storage, _allow.Allowlist())
        _two_commits(storage, lambda root: root.__setitem__("b", OOBucket({"t": 1})),
                     lambda root: root["b"].__setitem__("x", 1),
                     lambda root: root["b"].__setitem__("y", 2))
        assert checked  # the merge was made, after the full check
        storage = FileStorage(str(tmp_path / "two.fs"))
        _allow.guard_conflicts(storage, _allow.Allowlist())
        db = ZODB.DB(storage)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(transaction_manager=tm)
            bucket = conn.root()["b"] = OOBucket({"x": 1})
            tm.commit()
            old_serial = bucket._p_serial
            bucket["y"] = 2
            tm.commit()
            crafted = pickle.dumps(OOBucket, 3) + b"\x80\x02\x83\xed\x7e."  # EXT2 0x7EED: os.system
            with pytest.raises(ZODB.POSException.ConflictError):
                storage.tryToResolveConflict(bucket._p_oid, bucket._p_serial, old_serial, crafted)
            conn.close()
        finally:
            db.close()
    finally:
        copyreg.remove_extension("os", "system", 0x7EED)


def test_a_kept_state_is_checked_again_at_each_use(program: types.ModuleType) -> None:
    """The states merges keep (`_allow._States`) come back only while every global their
    record named is still allowed: after a deploy that drops the class, the merge takes
    the full path, which refuses it."""
    from ZODB.ConflictResolution import PersistentReference

    allowlist = _allow.Allowlist(programs={PROGRAM})
    states = _allow._States()
    state = (("a", 1), PersistentReference((b"\0" * 8, program.Thing)))  # type: ignore[attr-defined]
    states.keep(b"record", [(PROGRAM, "Thing")], state, states.references)
    assert states.get(b"record", allowlist.check) is state
    assert states.get(b"another", allowlist.check) is _allow._MISS
    deployed = types.ModuleType(PROGRAM)
    deployed.Thing = types.SimpleNamespace  # type: ignore[attr-defined]
    sys.modules[PROGRAM] = deployed
    with pytest.raises(dh.ClassNotAllowedError):
        states.get(b"record", allowlist.check)
    mutable = ([1], PersistentReference((b"\0" * 8, program.Thing)))  # type: ignore[attr-defined]
    states.keep(b"mutable", [], mutable, states.references)
    assert states.get(b"mutable", allowlist.check) is _allow._MISS  # only states nothing can change
