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
    merge on a hot bucket reads the same ones); a pack forgets them, so a revision it
    removed is gone as it is from ZODB's own FileStorage."""
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
        bucket = conn.root()["b"] = OOBucket({"n": 1})
        tm.commit()
        oid, first = bucket._p_oid, bucket._p_serial
        bucket["n"] = 2
        tm.commit()
        storage = db.storage
        data = storage.loadSerial(oid, first)
        assert storage.loadSerial(oid, first) == data and reads == [first]
        assert storage.loadSerial(oid, bucket._p_serial) != data and len(reads) == 2
        conn.close()
        db.pack()  # the first revision is no longer needed: pack removes it
        with pytest.raises(ZODB.POSException.POSKeyError):
            storage.loadSerial(oid, first)
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
