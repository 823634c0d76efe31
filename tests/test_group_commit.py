"""Group commit (`durable_heap._groupcommit`): concurrent commits share an fsync, an
acknowledged commit is fsynced, a commit is visible only once durable, a failed fsync
fails every waiter.

Real FileStorage files, real threads, a real SIGKILLed subprocess. The only thing
injected is ``os.fsync`` (a gate, a counter, a failure, a record of how much of the
file each fsync covered), which group commit looks up at each call: nothing of the
storage is mocked.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
import ZODB.utils
from persistent import Persistent
from ZODB.FileStorage import FileStorage as ZODBFileStorage

import durable_heap as dh
from durable_heap._storage import open_storage
from durable_heap._targets import parse_target
from durable_heap.testing import subprocess_env

#: DURABLE_HEAP_SOAK=1 runs the soak-sized SIGKILL loop (docs/operations.md).
SOAK = os.environ.get("DURABLE_HEAP_SOAK", "") not in ("", "0")


class Item(Persistent):
    def __init__(self) -> None:
        self.n = 0


def _db(path: Path) -> Any:
    """A ZODB database on durable_heap's FileStorage (checked and checksummed)."""
    return ZODB.DB(open_storage(parse_target(str(path))))


def _filestorage(db: Any) -> Any:
    return db.storage.base  # the group-committing FileStorage under the checksum wrapper


def _items(db: Any, n: int) -> None:
    with db.transaction() as conn:
        for i in range(n):
            conn.root()[f"i{i}"] = Item()


class _Gate:
    """An os.fsync that counts its calls and can be held shut (test threads wait on it)."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.calls = 0
        self.entered = threading.Semaphore(0)
        self.open = threading.Event()
        self.open.set()

    def shut(self) -> None:
        """Hold every later fsync until `open` is set; count from here."""
        self.open.clear()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.release()
        assert self.open.wait(30)
        self.real(fd)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    g = _Gate()
    monkeypatch.setattr(os, "fsync", g)
    yield g
    g.open.set()


def _bump(db: Any, key: str, done: list[str] | None = None) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        for attempt in tm.attempts(50):  # a conflict (same Item) is retried
            with attempt:
                conn.root()[key].n += 1
        if done is not None:
            done.append(key)
    finally:
        conn.close()


def _wait_for(cond: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_commits_waiting_for_one_fsync_share_the_next(tmp_path: Path, gate: _Gate) -> None:
    """While one commit's fsync runs, five more commit (the commit lock is free) and
    wait; one fsync then covers all five: 6 commits, 2 fsyncs. ZODB's FileStorage holds
    its commit lock across the fsync, so the five could not even write."""
    db = _db(tmp_path / "app.fs")
    fs = _filestorage(db)
    _items(db, 6)
    gate.shut()
    done: list[str] = []
    first = threading.Thread(target=_bump, args=(db, "i0", done))
    first.start()
    assert gate.entered.acquire(timeout=20)  # the first commit's fsync has begun
    others = [threading.Thread(target=_bump, args=(db, f"i{i}", done)) for i in range(1, 6)]
    for t in others:
        t.start()
    _wait_for(lambda: len(fs._dh_pending) == 6)  # all six written, none acknowledged
    assert done == [] and gate.calls == 1
    gate.open.set()
    for t in [first, *others]:
        t.join(20)
    assert sorted(done) == [f"i{i}" for i in range(6)]
    assert gate.calls == 2  # one for the first, one for the five
    with db.transaction() as conn:
        assert [conn.root()[f"i{i}"].n for i in range(6)] == [1] * 6
    db.close()


class _CountingCondition(threading.Condition):
    """A Condition on the storage's own lock that counts its uses."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.uses = 0

    def __enter__(self) -> bool:
        self.uses += 1
        return super().__enter__()

    def wait(self, timeout: float | None = None) -> bool:
        self.uses += 1
        return super().wait(timeout)

    def notify_all(self) -> None:
        self.uses += 1
        super().notify_all()


def test_a_lone_committer_fsyncs_without_the_condition(tmp_path: Path) -> None:
    """The single committer's fast path: a commit written while no fsync runs leads at
    once (no wait, no wake-up of anyone, the condition's lock taken as a plain lock),
    and each commit is still fsynced before it returns and visible after."""
    db = _db(tmp_path / "app.fs")
    fs = _filestorage(db)
    _items(db, 1)
    cond = fs._dh_cond = _CountingCondition(fs._dh_cond._lock)  # the same lock: _dh_lock
    synced = fs._dh_synced
    for _ in range(5):
        _bump(db, "i0")
        assert fs._dh_synced == fs._dh_finished  # acknowledged: covered by an fsync
    assert fs._dh_synced == synced + 5
    assert cond.uses == 0
    with db.transaction() as conn:
        assert conn.root()["i0"].n == 5
    db.close()


def test_a_commit_is_visible_to_other_connections_only_once_durable(tmp_path: Path, gate: _Gate) -> None:
    """Durable before visible: during the fsync another connection still reads the old
    value (and can read: loads are not stopped), and ``lastTransaction()`` has not moved;
    once the commit returns, the next transaction sees it."""
    db = _db(tmp_path / "app.fs")
    _items(db, 1)
    before = db.lastTransaction()
    tm = transaction.TransactionManager()
    reader = db.open(tm)
    gate.shut()
    writer = threading.Thread(target=_bump, args=(db, "i0"))
    writer.start()
    assert gate.entered.acquire(timeout=20)
    tm.begin()
    assert reader.root()["i0"].n == 0  # not yet durable: not yet visible
    assert db.lastTransaction() == before
    tm.abort()
    gate.open.set()
    writer.join(20)
    tm.begin()
    assert reader.root()["i0"].n == 1
    assert db.lastTransaction() > before
    tm.abort()
    reader.close()
    db.close()


def test_an_object_created_by_a_commit_waiting_for_its_fsync_is_absent_not_damaged(
        tmp_path: Path, gate: _Gate) -> None:
    """A reader whose snapshot predates a commit still waiting for its fsync, asking for
    an object that commit created, finds no object (as before the commit), not a
    damaged record: the integrity check compares a record's transaction with the last
    one *written*, as ``lastTransaction()`` moves only once durable. (It was refused as
    "later than the heap's last one": four ZEO clients opening a new heap at once
    failed so about one time in four.)"""
    db = _db(tmp_path / "app.fs")
    _items(db, 1)
    storage = db.storage
    snapshot = db.lastTransaction()
    gate.shut()
    created: list[bytes] = []

    def create() -> None:
        with db.transaction() as conn:
            conn.root()["new"] = item = Item()
            conn.add(item)
            created.append(item._p_oid)

    writer = threading.Thread(target=create)
    writer.start()
    assert gate.entered.acquire(timeout=20)  # written, waiting for its fsync
    before = ZODB.utils.p64(ZODB.utils.u64(snapshot) + 1)
    assert storage.loadBefore(created[0], before) is None  # absent at that snapshot
    gate.open.set()
    writer.join(20)
    assert storage.loadBefore(created[0], ZODB.utils.p64(ZODB.utils.u64(db.lastTransaction()) + 1))
    db.close()


def test_a_failed_fsync_fails_every_waiter_and_closes_the_heap(
    heap_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads' commits wait on one fsync that fails (EIO): each gets the heap's
    "may or may not have been committed" error, none is acknowledged, the heap is
    FAILED, and it opens again with every commit acknowledged before."""
    heap = dh.open(heap_path)
    with heap.transaction() as state:
        state.counts = dict.fromkeys(range(1000), 0)  # tree form: keys 0-3 share a bucket
    real = os.fsync
    entered = threading.Event()
    release = threading.Event()

    def failing_fsync(fd: int) -> None:
        entered.set()
        assert release.wait(30)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    errors: dict[int, BaseException] = {}
    acked: list[int] = []

    def bump(i: int) -> None:
        try:
            with heap.transaction() as state:
                state.counts[i] += 1  # one bucket: the waiters' commits merge with the first
            acked.append(i)
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            errors[i] = exc

    monkeypatch.setattr(os, "fsync", failing_fsync)
    threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
    threads[0].start()
    assert entered.wait(20)
    fs = heap.db.storage.base
    for t in threads[1:]:
        t.start()
    _wait_for(lambda: fs._dh_finished - fs._dh_synced >= 4)  # all four written, waiting
    release.set()
    for t in threads:
        t.join(30)
    monkeypatch.setattr(os, "fsync", real)
    assert acked == [] and sorted(errors) == [0, 1, 2, 3]
    for exc in errors.values():
        assert isinstance(exc, dh.StorageError), repr(exc)
        assert exc.outcome_unknown is True
    leader = [e for e in errors.values() if "may or may not have been committed" in str(e)]
    assert leader and all("input/output error (EIO)" in str(e) for e in errors.values())
    assert heap.status is dh.HeapStatus.FAILED
    with pytest.raises(dh.StorageError, match="open it again with durable_heap.open"):
        with heap.transaction() as state:
            state.counts[0] = 5
    heap.close()
    with dh.open(heap_path) as again:
        assert all(again.state.counts[i] in (0, 1) for i in range(4))
        with again.transaction() as state:
            state.counts[0] += 10


def test_pack_during_concurrent_commits_loses_nothing(tmp_path: Path) -> None:
    """Pack replaces the data file under the committers (the fsync follows it)."""
    db = _db(tmp_path / "app.fs")
    _items(db, 4)
    for _ in range(20):
        _bump(db, "i0")
    stop = threading.Event()
    counts = [0] * 4

    def work(i: int) -> None:
        while not stop.is_set():
            _bump(db, f"i{i}")
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    db.pack()
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)
    db.close()
    db = _db(tmp_path / "app.fs")
    with db.transaction() as conn:
        assert [conn.root()[f"i{i}"].n for i in range(4)] == [counts[0] + 20, *counts[1:]]
    db.close()


class _Recorder:
    """An os.fsync that notes what each call fsynced: (inode, is a folder, the inode
    that `path` named at that moment)."""

    def __init__(self, path: Path) -> None:
        self.real, self.path = os.fsync, path
        self.calls: list[tuple[int, bool, int]] = []

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        named = os.stat(self.path).st_ino if self.path.exists() else -1
        self.calls.append((st.st_ino, stat.S_ISDIR(st.st_mode), named))
        self.real(fd)


def test_a_new_heap_file_has_its_folder_fsynced_with_its_first_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync of a new file does not make its name durable: a power loss could
    leave a folder without it. So the first commit into a file this open created
    fsyncs the folder too, before it is acknowledged; a file that existed does not."""
    record = _Recorder(tmp_path / "app.fs")
    monkeypatch.setattr(os, "fsync", record)
    db = _db(tmp_path / "app.fs")  # creates the file and commits the root
    _items(db, 1)
    folder = tmp_path.stat().st_ino
    assert (folder, True, (tmp_path / "app.fs").stat().st_ino) in record.calls
    db.close()
    record.calls.clear()
    db = _db(tmp_path / "app.fs")
    _bump(db, "i0")
    assert record.calls and not [c for c in record.calls if c[1]]  # no folder this time
    db.close()


def test_pack_fsyncs_the_packed_copy_before_it_replaces_the_file_then_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZODB's pack renames ``app.fs.pack`` over ``app.fs`` without fsyncing it. Here the
    packed copy is fsynced while ``app.fs`` still names the old file, and the folder
    (the rename) after, before pack returns and before any commit to the new file is
    acknowledged."""
    path = tmp_path / "app.fs"
    db = _db(path)
    _items(db, 2)
    for _ in range(10):
        _bump(db, "i0")  # old revisions: the pack has something to drop
    old = path.stat().st_ino
    record = _Recorder(path)
    monkeypatch.setattr(os, "fsync", record)
    db.pack()
    packed = path.stat().st_ino
    assert packed != old
    before_rename = [c for c in record.calls if c[0] == packed and c[2] != packed]
    assert before_rename, record.calls  # the copy, fsynced while app.fs was the old file
    folder = tmp_path.stat().st_ino
    assert (folder, True, packed) in record.calls  # the folder, once app.fs named the copy
    db.close()


def test_a_group_committed_file_opens_with_zodbs_own_filestorage(tmp_path: Path) -> None:
    """The same file format: ZODB's FileStorage reads what group commit wrote."""
    db = _db(tmp_path / "app.fs")
    _items(db, 3)
    threads = [threading.Thread(target=_bump, args=(db, f"i{i % 3}")) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    db.close()
    size = (tmp_path / "app.fs").stat().st_size
    plain = ZODBFileStorage(str(tmp_path / "app.fs"), read_only=True)
    try:  # its own scan read every transaction to the end, each finished (status " ")
        assert [t.status for t in plain.iterator()] == [" "] * 11  # root, items, 9 commits
        assert plain.getSize() == size
    finally:
        plain.close()
    db = _db(tmp_path / "app.fs")
    with db.transaction() as conn:
        assert [conn.root()[f"i{i}"].n for i in range(3)] == [3, 3, 3]
    db.close()


WRITER = """
import os, sys, threading
import durable_heap as dh

path, nthreads, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out_lock = threading.Lock()
real_fsync = os.fsync
data_file = os.stat(path).st_ino  # no pack here: the data file stays this inode

def say(line):
    with out_lock:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

def recording_fsync(fd):
    # What a power loss would keep: the data file as far as it was when an fsync
    # that has returned began. Reported before the fsync returns, so before any
    # commit it covers is acknowledged. Every os.fsync of the process comes here:
    # only the data file's count.
    st = os.fstat(fd)
    real_fsync(fd)
    say(f"durable {st.st_size}" if st.st_ino == data_file else f"other-fsync {st.st_ino}")

os.fsync = recording_fsync
heap = dh.open(path)

def work(i):
    try:
        n = heap.state.counts[i]
        say(f"start {i} {n}")
        while True:
            n += 1
            with heap.transaction(note=f"t{i}={n}") as state:
                state.counts[i] = n
            say(f"ack {i} {n}")   # acknowledged: the commit returned
    except BaseException as exc:
        say(f"died {i} {exc!r}".replace("\\n", " "))
        raise

def work_shared(j):
    # `shared` threads add 1 to one more count: conflicts no merge resolves, so
    # aborts (tpc_abort) and retries
    try:
        while True:
            for attempt in heap.attempts(500, note=f"s{j}"):
                with attempt as state:
                    state.counts[nthreads] += 1
                    n = state.counts[nthreads]
            say(f"ack {nthreads} {n}")
    except BaseException as exc:
        say(f"died s{j} {exc!r}".replace("\\n", " "))
        raise

for i in range(nthreads):
    threading.Thread(target=work, args=(i,), daemon=True).start()
for j in range(shared):
    threading.Thread(target=work_shared, args=(j,), daemon=True).start()
threading.Event().wait()
"""


def _bucket_history(path: Path, keys: int,
                    start: bytes | None = None) -> list[tuple[str, str, dict[int, int]]]:
    """Every record of a bucket holding the writers' counts, in file order from the
    transaction `start` on: (tid, note, {key: value}), read straight from the file
    (ZODB's iterator, stubs for classes)."""
    import io
    import pickle

    class _Stub:
        def __init__(self, *a: Any) -> None:
            pass

        def __setstate__(self, state: Any) -> None:
            pass

    class _Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _Stub

        def persistent_load(self, pid: Any) -> Any:
            return pid

    out = []
    fs = ZODBFileStorage(str(path), read_only=True)
    try:
        for txn in fs.iterator(start):
            for r in txn:
                try:
                    f = io.BytesIO(r.data)
                    reader = _Reader(f)
                    reader.load()
                    state = reader.load()
                    items = state[0]
                    entries = dict(items[1::2])
                except Exception:  # noqa: BLE001, S112 - not a bucket of (key, value) entries
                    continue
                seen = {k: v for k, v in entries.items() if isinstance(k, int) and k < keys}
                if seen:
                    out.append((txn.tid.hex(), txn.description.decode(), seen))
    finally:
        fs.close()
    return out


def _explain(path: Path, keys: int, i: int, value: int) -> str:
    """The last records of count `i` up to the first that held `value`, and after."""
    history = _bucket_history(path, keys)
    first = next((n for n, (_, _, seen) in enumerate(history) if seen.get(i, -1) >= value),
                 len(history))
    shown = history[max(0, first - 3):first + 8]
    return "\n".join(f"  {tid} {note!r}: count {i} = {seen.get(i)}" for tid, note, seen in shown)


def _kill_rounds(tmp_path: Path, nthreads: int, rounds: int, acks: int = 60, more: int = 40,
                 keep: Path | None = None, progress: bool = False, shared: int = 2) -> int:
    """`rounds` times: `nthreads` threads commit in a real writer process, SIGKILLed
    once it has acknowledged `acks` (+ `more` per round) commits; every commit it
    acknowledged must be in the file (SIGKILL) and in a copy cut to what its fsyncs
    covered (power loss). Returns how many commits were checked.

    The counts a round starts from come from the file, which also holds commits
    written but never fsynced: the next round's first fsync covers them (it fsyncs
    the whole file), so they count as acknowledged from then on. `keep`: a folder
    for the files of a failed round."""
    path = tmp_path / "app.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.counts = dict.fromkeys(range(1000), 0)  # tree form: one bucket merges
    keys = nthreads + 1  # count `nthreads`: the one the `shared` threads all add to
    acked = dict.fromkeys(range(keys), 0)
    checked = 0
    begun = None
    for round_ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(nthreads), str(shared)],
                                stdout=subprocess.PIPE, text=True, env=subprocess_env())
        assert proc.stdout is not None
        stdout, got = proc.stdout, queue.Queue()  # type: ignore[var-annotated]
        threading.Thread(target=lambda: [*map(got.put, stdout), got.put("")], daemon=True).start()
        lines: list[str] = []
        seen = 0
        try:
            while seen < acks + more * (round_ % 5):
                line = got.get(timeout=60)  # a writer that hangs fails the test
                assert line, f"round {round_}: the writer stopped: {lines[-5:]}"
                lines.append(line)
                seen += line.startswith("ack")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        while line := got.get(timeout=30):
            lines.append(line)
        durable = 0
        for line in lines:
            word, *rest = line.split()
            if word == "durable":
                durable = max(durable, int(rest[0]))
            elif word == "ack":
                acked[int(rest[0])] = max(acked[int(rest[0])], int(rest[1]))
                checked += 1
        # No lost update, durable or not: in commit order each count only grows
        # (its thread writes 1, 2, 3...; a merge by another thread carries it).
        last: dict[int, tuple[int, str]] = {}
        for tid, note, seen in _bucket_history(path, keys, begun):
            for i, v in seen.items():
                was, by = last.get(i, (v, ""))
                assert v >= was, (f"round {round_}: count {i} went from {was} ({by}) to {v} in "
                                  f"transaction {tid} ({note!r}): a lost update")
                last[i] = (v, f"{tid} {note!r}")
        died = [line for line in lines if line.startswith("died")]
        assert not died, f"round {round_}: {died}"
        # the power-loss model: a copy cut to what the fsyncs covered
        size = path.stat().st_size
        assert durable <= size, f"round {round_}: fsyncs covered {durable} bytes of {size}"
        lost_power = tmp_path / f"power{round_}.fs"
        shutil.copyfile(path, lost_power)
        os.truncate(lost_power, durable)
        killed = tmp_path / f"killed{round_}.fs"  # the file as the kill left it
        shutil.copyfile(path, killed)
        for target in (path, lost_power):
            with dh.open(target) as heap:
                counts = {i: heap.state.counts[i] for i in range(keys)}
            short = {i: (counts[i], acked[i]) for i in range(keys) if counts[i] < acked[i]}
            if short:
                i, (had, want) = next(iter(short.items()))
                where = lost_power if target == lost_power else killed
                if keep is not None:
                    for f in (killed, lost_power):
                        shutil.copyfile(f, keep / f.name)
                pytest.fail(
                    f"round {round_}, {target.name} (of {size} bytes; fsyncs covered {durable}): "
                    f"(thread: had, acknowledged) {short}; thread {i}'s count in {where.name}:\n"
                    + _explain(where, keys, i, want)
                )
        with dh.open(path) as heap:  # the next round starts from the file's counts
            acked = {i: heap.state.counts[i] for i in range(keys)}
            begun = heap.db.lastTransaction()  # its history is checked from here
        for f in (lost_power, killed, *tmp_path.glob(f"power{round_}.fs.*")):
            f.unlink(missing_ok=True)
        if progress and round_ % 10 == 9:
            print(f"{round_ + 1} rounds, {checked} acknowledged commits checked", flush=True)
    assert min(acked.values()) > 0
    return checked


@pytest.mark.slow
def test_sigkill_during_concurrent_commits_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    """Six threads commit in a real subprocess, SIGKILLed at a random moment, five times;
    two more add to one shared count (conflicts no merge resolves: aborts and retries).

    SIGKILL loses only the process (the kernel keeps its page cache): every
    acknowledged commit is in the file. A power loss keeps only what an fsync made
    durable: the file is also cut to the size the last fsync that returned covered
    (reported before it returned), and every acknowledged commit is in that too.

    DURABLE_HEAP_SOAK=1 makes it the soak: DURABLE_HEAP_SOAK_ROUNDS rounds (200),
    DURABLE_HEAP_SOAK_THREADS threads (12), DURABLE_HEAP_SOAK_BURN processes spinning
    meanwhile (2). A failed round's files are kept in DURABLE_HEAP_SOAK_KEEP (a
    folder) when it is set."""
    if not SOAK:
        _kill_rounds(tmp_path, nthreads=6, rounds=5)
        return
    rounds = int(os.environ.get("DURABLE_HEAP_SOAK_ROUNDS", "200"))
    nthreads = int(os.environ.get("DURABLE_HEAP_SOAK_THREADS", "12"))
    keep = os.environ.get("DURABLE_HEAP_SOAK_KEEP")
    burners = _burners(int(os.environ.get("DURABLE_HEAP_SOAK_BURN", "2")))
    try:
        started = time.monotonic()
        checked = _kill_rounds(tmp_path, nthreads=nthreads, rounds=rounds, acks=20, more=60,
                               keep=Path(keep) if keep else None, progress=True)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    print(f"\n{rounds} rounds of {nthreads} threads SIGKILLed, {checked} acknowledged commits "
          f"checked, none lost ({time.monotonic() - started:.0f} s)")


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    """`n` processes that keep a core busy (a loaded machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_the_merge_check_fast_path_tells_equal_values_of_other_types_apart() -> None:
    """Concurrent commits to one bucket are merged (`_EntryBucket._p_resolveConflict`);
    its check compares entries exactly, now with ``==`` for plain ints, strings and
    tuples of them (no pickling): never 1 for True, 0.0 for -0.0, place by place."""
    from durable_heap._containers import _same

    assert _same(("k", 1), ("k", 1)) and _same(7, 7) and _same("a", "a")
    assert not _same(("k", 1), ("k", True)) and not _same(("k", True), ("k", 1))
    assert not _same(1, True) and not _same(0.0, -0.0) and not _same((0.0,), (-0.0,))
    assert not _same(("k", 1), ("k", 2)) and not _same(("k", 1), ("k", 1, 2))


def test_the_zodb_internals_group_commit_relies_on() -> None:
    """`_groupcommit`'s PROTECTED block: FileStorage's tpc_finish(transaction, f) calls
    f under its locks and then _finish, whose _finish_finish(tid) does the flush and
    fsync; _nextpos, _tindex, _blob_tpc_finish and _ltid are what it moves; pack calls
    the packer before it renames the packed copy over the file."""
    import inspect

    zfs = ZODBFileStorage
    assert list(inspect.signature(zfs.tpc_finish).parameters) == ["self", "transaction", "f"]
    assert list(inspect.signature(zfs._finish_finish).parameters) == ["self", "tid"]
    assert list(inspect.signature(zfs._finish).parameters) == ["self", "tid", "u", "d", "e"]
    source = inspect.getsource(zfs._finish_finish)
    for name in ("self._file.flush()", "fsync(", "self._pos = self._nextpos",
                 "self._index.update(self._tindex)", "self._ltid = tid", "self._blob_tpc_finish()"):
        assert name in source, name
    finish = inspect.getsource(zfs.tpc_finish)
    assert finish.index("f(tid)") < finish.index("self._finish(") < finish.index("_commit_lock.release()")
    # pack: the packer (a static method, called with the storage) returns before the rename
    assert list(inspect.signature(zfs.packer).parameters) == ["storage", "referencesf", "stop", "gc"]
    pack = inspect.getsource(zfs.pack)
    assert pack.index("self.packer(self,") < pack.index("os.rename(self._file_name + '.pack'")
