"""Operating a heap from the command line: pack, backup, restore, verify, log, stats.

Each command takes a program (its heap is found as for ``call``: ``--storage``,
``$DURABLE_HEAP_STORAGE``, else the file beside the program) and works on every
target that `durable_heap.open` takes; what differs per backend is said where
it differs:

* ``pack`` packs through ZODB (``heap.pack``): FileStorage locally, the
  server's storage over ZEO.
* ``backup`` / ``restore`` use ZODB's own ``repozo`` for FileStorage: it is the
  tool ZODB ships and maintains for exactly this (a consistent copy of a file
  that is being written, up to its last whole transaction; incremental after
  the first full backup; point-in-time recovery; checksums of what it wrote),
  and its repository format is the one ZODB users already know. Over ZEO there
  is no file to read: the transactions are copied through the ZEO protocol into
  a local FileStorage in the backup folder (only the new ones each time), and
  repozo backs that up, so a ZEO backup restores the same way.
* ``verify``, ``log`` and ``stats`` only read: they open the heap read-only, so
  they run beside a writer (FileStorage) or any number of clients (ZEO).

Long work shows a progress bar on stderr when stderr is a terminal (tqdm, from
the ``progress`` extra: small, no dependencies, and it writes only to the stream
it is given), nothing otherwise. Ctrl-C stops each command cleanly: nothing is
left half-written (see each command).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._errors import DurableHeapError, HeapLockedError, StorageError

__all__ = [
    "DEFAULT_LOG_COUNT",
    "CommandError",
    "Problem",
    "UsageError",
    "add_commands",
    "backup",
    "log_entries",
    "pack",
    "progress",
    "quiet_interrupted_calls",
    "restore",
    "stats",
    "verify",
    "waiting_notice",
]

#: Transactions `durable-heap log` lists unless told (-n).
DEFAULT_LOG_COUNT = 20
#: A record at least this big is reported by `stats` as rewritten whole on every change.
BIG_RECORD = 64 * 1024
#: Objects a path search may load (log --show, verify): paths are a help, not the job.
PATH_BUDGET = 100_000


class CommandError(DurableHeapError):
    """An operation failed in a way the user must act on (exit 1)."""

    exit_code = 1


class UsageError(CommandError):
    """A command was given wrong arguments (exit 2)."""

    exit_code = 2


# --- progress and waiting -----------------------------------------------------------------


class _Quiet:
    """The progress bar of a stream that is not a terminal: nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress(total: int | None, what: str, unit: str = "records") -> Iterator[Any]:
    """A progress bar on stderr while the block runs, when stderr is a terminal and tqdm is
    installed (``pip install durable-heap[progress]``); a no-op otherwise."""
    bar: Any = _Quiet()
    if sys.stderr.isatty() and os.environ.get("DURABLE_HEAP_PROGRESS", "1") != "0":
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total, desc=what, unit=unit if unit == "B" else f" {unit}",
                       unit_scale=unit == "B", file=sys.stderr, leave=False, dynamic_ncols=True,
                       mininterval=0.2)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def waiting_notice(target: str, delay: float = 1.0) -> Iterator[None]:
    """Say on stderr, after `delay` seconds, that a ``zeo://`` target keeps us waiting
    (ZEO's client waits for its server silently for up to ``wait_timeout``)."""
    if not target.startswith("zeo://"):
        yield
        return
    from ._targets import option, parse_target
    from ._zeo import DEFAULT_WAIT

    try:
        parsed = parse_target(target)
        wait = option(parsed, "wait_timeout") or DEFAULT_WAIT
        shown = str(parsed)
    except DurableHeapError:  # the open reports it
        yield
        return
    if wait <= delay:  # it gives up before the notice would say anything
        yield
        return

    def notice() -> None:
        print(f"durable-heap: waiting for the ZEO server at {shown} to answer (up to {wait:g} s; "
              "?wait_timeout=SECONDS changes it) ...", file=sys.stderr, flush=True)

    timer = threading.Timer(delay, notice)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class _InterruptedCalls:
    """Drops asyncio's report of a ZEO call whose answer nobody waits for any more.

    ZEO trap (ZEO 6.2): Ctrl-C interrupts a thread waiting for the server's answer; when
    the client closes, that call's future fails with ``ClientDisconnected``, and since
    no one retrieves it, its ``__del__`` has asyncio's handler log "ConcurrentTask
    exception was never retrieved" with a traceback, after the command said it stopped.
    """

    def filter(self, record: Any) -> bool:
        text = str(record.msg)
        return not ("exception was never retrieved" in text and "ClientDisconnected" in
                    repr(getattr(record, "exc_info", None)))


def quiet_interrupted_calls() -> None:
    """After Ctrl-C: leave out asyncio's report of the ZEO call it cut off (`_InterruptedCalls`)."""
    import logging

    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _InterruptedCalls) for f in logger.filters):
        logger.addFilter(_InterruptedCalls())  # type: ignore[arg-type]


# --- helpers ------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tid_text(tid: bytes) -> str:
    return tid.hex()


def _tid_time(tid: bytes) -> datetime.datetime:
    from ZODB.TimeStamp import TimeStamp

    return datetime.datetime.fromtimestamp(TimeStamp(tid).timeTime(), datetime.timezone.utc)


def _oid_text(oid: bytes) -> str:
    from ZODB.utils import oid_repr

    return str(oid_repr(oid))


def _class_of(data: bytes | None) -> str:
    """The class a record names (its first pickle), or "?"."""
    if data is None:
        return "class unknown"
    if not data:
        return "(deleted)"
    from ZODB.utils import get_pickle_metadata

    try:
        module, name = get_pickle_metadata(data)
    except Exception:  # noqa: BLE001 - a damaged record names nothing we can read
        return "?"
    return f"{module}.{name}" if module else str(name)


def _raw(storage: Any) -> Any:
    """The storage under durable_heap's checksum wrapper (records as stored, unchecked)."""
    return getattr(storage, "base", storage)


def _file_path(heap: Any) -> str | None:
    return heap.target.location if heap.target.scheme == "file" else None


def _heap_size(heap: Any) -> int:
    path = _file_path(heap)
    if path is not None:
        return os.path.getsize(path)
    return _figures(heap.db.storage)[1]


def _objects(storage: Any) -> int:
    return _figures(storage)[0]


def _figures(storage: Any) -> tuple[int, int]:
    """(objects, bytes) of a storage. ZEO trap: a ClientStorage's ``len`` and ``getSize``
    are the figures the server last pushed (after this client's commits, and some time
    after a pack), so they are asked for: ``get_size_info`` is the server method that
    pushes them (ZEO.StorageServer), called as ClientStorage calls its server."""
    call = getattr(storage, "_call", None)
    if call is not None:
        try:
            info = call("get_size_info")
            return int(info["length"]), int(info["size"])
        except Exception:  # noqa: BLE001, S110 - an older server: the pushed figures then
            pass
    return len(storage), int(storage.getSize())


# --- walking the current records ----------------------------------------------------------


@dataclass
class Problem:
    """One thing `verify` found wrong."""

    oid: bytes
    cls: str
    what: str
    parent: bytes | None = None
    path: str = ""
    tid: bytes | None = None

    def line(self) -> str:
        where = f" at {self.path}" if self.path else ""
        rev = f" (revision {_tid_text(self.tid)})" if self.tid else ""
        return f"object {_oid_text(self.oid)} ({self.cls}){where}{rev}: {self.what}"


@dataclass
class _Walk:
    """What a walk over the current records found."""

    records: int = 0
    size: int = 0
    problems: list[Problem] = field(default_factory=list)
    by_class: dict[str, list[int]] = field(default_factory=dict)  # class -> [count, bytes]
    largest: list[tuple[int, bytes, str]] = field(default_factory=list)
    parents: dict[bytes, bytes | None] = field(default_factory=dict)

    def count(self, oid: bytes, cls: str, size: int, keep_largest: int) -> None:
        """Add one intact record to the figures (and to the `keep_largest` biggest)."""
        import heapq

        self.records += 1
        self.size += size
        entry = self.by_class.setdefault(cls, [0, 0])
        entry[0] += 1
        entry[1] += size
        if keep_largest:
            item = (size, oid, cls)
            if len(self.largest) < keep_largest:
                heapq.heappush(self.largest, item)
            else:
                heapq.heappushpop(self.largest, item)


#: What the history pass of `verify` learnt of a current record: (class, size, the oids
#: it refers to, or None and what is wrong: "damaged: ..." (its seal fails: not counted)
#: or "does not unpickle ..." (counted, its references unknown)).
Known = dict[bytes, tuple[str, int, "list[bytes] | None", str]]


def _walk(storage: Any, bar: Any, *, keep_largest: int = 0, known: Known | None = None) -> _Walk:
    """Read every record reachable from ZODB's root, once: check it (the storage checks
    each record's seal as it loads it) and that every reference resolves.

    The walk follows references in the records themselves (ZODB's `referencesf`),
    not objects, so it loads no classes and needs no program. A record in `known`
    (read already, by `verify`'s pass over the file) is not read again.
    """
    from ZODB.serialize import referencesf
    from ZODB.utils import z64

    from ._integrity import strip

    found = _Walk()
    parents = found.parents
    parents[z64] = None
    queue = collections.deque([z64])
    while queue:
        oid = queue.popleft()
        entry = known.get(oid) if known is not None else None
        if entry is not None:
            cls, size, refs_known, problem = entry
            if refs_known is None and problem.startswith("is damaged"):
                found.problems.append(Problem(oid, cls, problem, parents.get(oid)))
                continue
            bar.update(1)
            found.count(oid, cls, size, keep_largest)
            if refs_known is None:
                found.problems.append(Problem(oid, cls, problem, parents.get(oid)))
                continue
            refs = refs_known
        else:
            data = _load_checked(storage, oid, found)
            if data is None:
                continue
            bar.update(1)
            data = strip(data)
            cls = _class_of(data)
            found.count(oid, cls, len(data), keep_largest)
            try:
                refs = referencesf(data)
            except Exception as exc:  # noqa: BLE001 - a record that does not unpickle
                found.problems.append(Problem(oid, cls, _unpickle_problem(exc), parents.get(oid)))
                continue
        for ref in refs:
            if ref not in parents:
                parents[ref] = oid
                queue.append(ref)
    found.largest.sort(reverse=True)
    return found


def _unpickle_problem(exc: BaseException) -> str:
    return f"does not unpickle ({type(exc).__name__}: {exc})"


def _load_checked(storage: Any, oid: bytes, found: _Walk) -> bytes | None:
    """The record of `oid` (its seal checked by the storage), or None with the problem noted."""
    from ZODB.POSException import POSKeyError

    from ._errormap import translate_storage_error

    parent = found.parents.get(oid)
    try:
        return storage.load(oid)[0]  # type: ignore[no-any-return]
    except POSKeyError:
        found.problems.append(Problem(oid, _class_named_by(storage, parent, oid),
                                      "is referred to but missing (a dangling reference)"
                                      + (f" from object {_oid_text(parent)}" if parent else ""),
                                      parent))
    except Exception as exc:  # noqa: BLE001 - CorruptHeapError: its seal or header failed
        err = translate_storage_error(exc, action="load")  # a ZEO server's, rebuilt
        if not isinstance(err, DurableHeapError):
            raise
        cls = _class_of(_raw_record(storage, oid))
        if cls == "class unknown":
            cls = _class_named_by(storage, parent, oid)
        found.problems.append(Problem(oid, cls, _reason(err), parent))
    return None


def _class_named_by(storage: Any, parent: bytes | None, oid: bytes) -> str:
    """The class that `parent`'s record names for its reference to `oid` (ZODB's persistent
    references carry the class), when the record of `oid` itself cannot tell."""
    from ZODB.serialize import get_refs

    if parent is None:
        return "class unknown"
    try:
        data, _ = storage.load(parent)
        for ref, klass in get_refs(data):
            if ref == oid and klass is not None:
                module, name = klass if isinstance(klass, tuple) else (getattr(klass, "__module__", "?"),
                                                                       getattr(klass, "__name__", "?"))
                return f"{module}.{name}"
    except Exception:  # noqa: BLE001, S110 - only a hint
        pass
    return "class unknown"


def _raw_record(storage: Any, oid: bytes) -> bytes | None:
    try:
        return _raw(storage).load(oid)[0]  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - as damaged as the rest: no class then
        return None


def _is_current(fs: Any, record: Any) -> bool:
    """Whether a record of FileStorage's iterator is its object's current revision.

    -- PROTECTED: FileStorage internals (pinned by tests/test_zodb_internals.py): the
    iterator's records carry their offset (``Record.pos``), and ``_lookup_pos`` is the
    index's offset of the current revision (under ``_lock``: a follower's index moves).
    """
    from ZODB.POSException import POSKeyError

    pos = getattr(record, "pos", None)
    if pos is None:
        return False
    try:
        with fs._lock:
            return bool(fs._lookup_pos(record.oid) == pos)
    except POSKeyError:
        return False


def _known(data: bytes, damage: str) -> tuple[str, int, list[bytes] | None, str]:
    """What the walk needs of a current record read by the history pass."""
    from ZODB.serialize import referencesf

    from ._integrity import strip

    body = strip(data)
    cls = _class_of(body)
    if damage:
        return cls, len(body), None, damage
    try:
        return cls, len(body), referencesf(body), ""
    except Exception as exc:  # noqa: BLE001 - a record that does not unpickle
        return cls, len(body), None, _unpickle_problem(exc)


def _reason_text(reason: str) -> str:
    return f"is damaged: its record {reason}"


def _reason(exc: BaseException) -> str:
    """The part of a `CorruptHeapError` message that says what is wrong with the record."""
    reason = getattr(exc, "_dh_reason", None)
    if reason:
        return _reason_text(reason)
    text = str(exc).split(". Restore", 1)[0]
    return f"is damaged: {text}"


def _paths(heap: Any, wanted: set[bytes], budget: int = PATH_BUDGET,
           skip: frozenset[bytes] = frozenset()) -> dict[bytes, str]:
    """Paths from ``state`` to the objects `wanted` (by oid), found by loading objects
    breadth first from ``state`` (at most `budget` of them, never those in `skip`: known
    to be damaged, and ZODB logs a traceback for each load that fails): a help for messages."""
    from persistent import Persistent

    from ._format import ROOT_KEY
    from ._kinds import is_atomic
    from ._paths import durable_children  # the accessors error messages use

    found: dict[bytes, str] = {}
    if not wanted:
        return found
    tm = heap.transaction_manager
    tm.begin()
    try:
        root = heap.connection.root()
        state = root.get(ROOT_KEY)
        if state is None:
            return found
        if state._p_oid in wanted:
            found[state._p_oid] = "state"
        queue: collections.deque[tuple[Any, str]] = collections.deque([(state, "state")])
        seen: set[Any] = {state._p_oid}
        loaded = 0
        while queue and loaded < budget and len(found) < len(wanted):
            obj, path = queue.popleft()
            loaded += 1
            try:
                if isinstance(obj, Persistent):
                    obj._p_activate()  # durable_children lists only what is in memory
                children = list(durable_children(obj))
            except Exception:  # noqa: BLE001, S112 - a damaged object: its children stay unknown
                continue
            for accessor, child in children:
                if isinstance(child, Persistent):
                    key: Any = child._p_oid  # known without loading the child
                    if key is None:
                        continue
                    if key in wanted and key not in found:
                        found[key] = path + accessor
                elif is_atomic(child):
                    continue
                else:
                    key = id(child)  # a plain container or object inside a record
                if key in seen or key in skip:
                    continue
                seen.add(key)
                queue.append((child, path + accessor))
    finally:
        tm.abort()
    return found


def _name_problems(heap: Any, walk: _Walk) -> None:
    """Give each problem the path of its object, or of its nearest ancestor found."""
    chains: dict[bytes, list[bytes]] = {}
    wanted: set[bytes] = set()
    for p in walk.problems[:50]:
        chain: list[bytes] = []
        oid: bytes | None = p.oid
        while oid is not None and len(chain) < 1000:
            chain.append(oid)
            oid = walk.parents.get(oid)
        chains[p.oid] = chain
        wanted.update(chain)
    try:
        paths = _paths(heap, wanted, skip=frozenset(p.oid for p in walk.problems))
    except Exception:  # noqa: BLE001 - the root itself is damaged: no paths
        return
    for p in walk.problems[:50]:
        for depth, oid in enumerate(chains[p.oid]):
            if oid in paths:
                p.path = paths[oid] if depth == 0 else f"{paths[oid]} (inside it)"
                break


# --- verify -------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What `verify` read and what it found."""

    records: int
    history: int
    problems: list[Problem]


def verify(heap: Any) -> VerifyReport:
    """Read every current record (checked, references resolved) and, for a file heap, every
    older revision in the file too (checked); name each damaged object where it can.

    A file heap is read once: the pass over the file notes what the walk needs of each
    current record (`_verify_history`), so the walk loads only records it did not see
    (one a writer added meanwhile)."""
    storage = heap.db.storage
    problems: list[Problem] = []
    history = 0
    read: Known | None = None
    path = _file_path(heap)
    if path is not None:  # one pass over the file: every revision checked, the current ones noted
        read = {}
        history, problems = _verify_history(storage, path, read)
    with progress(len(storage), "verify") as bar:
        walk = _walk(storage, bar, known=read)
    del read
    known = {(p.oid, p.tid) for p in problems}
    current = [p for p in walk.problems if (p.oid, None) not in known]
    # A revision found damaged in the history that is also current is reported once, as current.
    current_oids = {p.oid for p in current}
    problems = [p for p in problems if p.oid not in current_oids or p.tid is None] + current
    walk.problems = problems
    _name_problems(heap, walk)
    return VerifyReport(walk.records, history, problems)


def _verify_history(storage: Any, path: str, known: Known) -> tuple[int, list[Problem]]:
    """Check the seal of every record in the file, old revisions included, and note in
    `known` what the walk needs of each current revision, so that it reads none again."""
    from ._integrity import MARK, intact

    problems: list[Problem] = []
    count = 0
    base = _raw(storage)
    with progress(os.path.getsize(path), "verify history", "B") as bar:
        it = base.iterator()
        try:
            last = 0
            for txn in it:
                for r in txn:
                    count += 1
                    whole = not r.data or intact(r.oid, r.data)
                    if not whole:
                        problems.append(Problem(r.oid, _class_of(r.data), "an older revision fails its "
                                                "checksum (history only: the current state is not "
                                                "affected unless listed again)", None, tid=r.tid))
                    if r.data and _is_current(base, r):
                        damage = "" if whole else _reason_text("fails its checksum" if r.data[-2:] == MARK
                                                               else "has a damaged checksum mark")
                        known[r.oid] = _known(r.data, damage)
                pos = int(getattr(it, "_pos", last) or last)  # FileIterator's offset
                bar.update(max(0, pos - last))
                last = pos
        except Exception as exc:  # noqa: BLE001 - a header FileStorage cannot read
            problems.append(Problem(b"\0" * 8, "-", f"the file's transaction log cannot be read past "
                                    f"record {count}: {exc}"))
        finally:
            with contextlib.suppress(Exception):
                it.close()
    return count, problems


# --- log ----------------------------------------------------------------------------------


@dataclass
class LogEntry:
    """One transaction of the heap's history."""

    tid: bytes
    time: datetime.datetime
    note: str
    user: str
    records: int
    bytes: int


def _transactions(storage: Any, start: bytes | None = None, stop: bytes | None = None) -> Iterator[Any]:
    it = _raw(storage).iterator(start, stop)
    try:
        # RelStorage trap (RelStorage 4.3 on psycopg2, measured here): `yield from` over its
        # transaction iterator crashes the interpreter (SIGSEGV); a plain loop does not.
        for txn in it:  # noqa: UP028 - see above
            yield txn
    finally:
        with contextlib.suppress(Exception):
            it.close()


def log_entries(heap: Any, *, since: datetime.datetime | None = None, grep: str | None = None,
                count: int = DEFAULT_LOG_COUNT) -> list[LogEntry]:
    """The last `count` transactions (newest first; 0: all) since `since`, whose note contains
    `grep` (case-insensitive).

    Without `since`, it reads a window at the end of the history and doubles it until it
    holds `count` entries or reaches the first transaction: ZODB's iterators seek to a
    start time cheaply (FileStorage scans transaction headers from the nearer end), so
    ``log -n 20`` of a big file reads its end, not all of it.
    """
    from ZODB.TimeStamp import TimeStamp
    from ZODB.utils import z64

    storage = heap.db.storage
    if since is not None:
        t = since.astimezone(datetime.timezone.utc)
        start = TimeStamp(t.year, t.month, t.day, t.hour, t.minute, t.second + t.microsecond / 1e6).raw()
        return _log_from(storage, start, grep, count)
    last = storage.lastTransaction()
    if count <= 0 or last == z64:
        return _log_from(storage, None, grep, count)
    first = next((t.tid for t in _transactions(storage)), last)
    end = TimeStamp(last).timeTime()
    window = 3600.0
    while True:
        start = _tid_at(end - window)
        entries = _log_from(storage, start, grep, count)
        if len(entries) >= count or start <= first:
            return entries
        window *= 4


def _tid_at(seconds: float) -> bytes:
    from ZODB.TimeStamp import TimeStamp

    t = datetime.datetime.fromtimestamp(max(seconds, 0.0), datetime.timezone.utc)
    return TimeStamp(t.year, t.month, t.day, t.hour, t.minute, t.second + t.microsecond / 1e6).raw()  # type: ignore[no-any-return]


def _log_from(storage: Any, start: bytes | None, grep: str | None, count: int) -> list[LogEntry]:
    kept: collections.deque[LogEntry] = collections.deque(maxlen=count if count > 0 else None)
    needle = grep.lower() if grep else None
    for txn in _transactions(storage, start):
        note = _text(txn.description)
        if needle is not None and needle not in note.lower():
            continue
        n = size = 0
        for r in txn:
            n += 1
            size += len(r.data or b"")
        kept.append(LogEntry(txn.tid, _tid_time(txn.tid), note, _text(txn.user), n, size))
    return list(reversed(kept))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value or "")


@dataclass
class ChangedRecord:
    """One record a transaction wrote."""

    oid: bytes
    cls: str
    bytes: int
    path: str


def show_transaction(heap: Any, tid_text: str) -> tuple[LogEntry, list[ChangedRecord]]:
    """What transaction `tid_text` (hex, as `log` prints it) changed, with paths where cheap."""
    tid = _parse_tid(tid_text)
    from ._integrity import strip

    found = None
    for txn in _transactions(heap.db.storage, tid, tid):  # records are read while it is open
        if txn.tid == tid:
            records = [(r.oid, strip(r.data) if r.data else r.data) for r in txn]
            found = (_text(txn.description), _text(txn.user))
        break
    if found is None:
        raise UsageError(f"the heap has no transaction {tid_text}: `durable-heap log` lists them "
                         "(a pack may have removed it)")
    paths = _paths(heap, {oid for oid, _ in records}, budget=20_000)
    changed = [ChangedRecord(oid, _class_of(data if data is not None else b""), len(data or b""),
                             paths.get(oid, ""))
               for oid, data in records]
    entry = LogEntry(tid, _tid_time(tid), found[0], found[1], len(changed),
                     sum(c.bytes for c in changed))
    return entry, changed


def _parse_tid(text: str) -> bytes:
    digits = text.lower().removeprefix("0x")
    try:
        tid = bytes.fromhex(digits.rjust(16, "0"))
    except ValueError:
        tid = b""
    if len(tid) != 8:
        raise UsageError(f"{text!r} is not a transaction id: give the 16 hex digits "
                         "`durable-heap log` prints")
    return tid


# --- stats --------------------------------------------------------------------------------


@dataclass
class Stats:
    """What `stats` reports."""

    file_size: int
    records: int
    size: int
    by_class: dict[str, list[int]]
    largest: list[tuple[int, bytes, str, str]]  # size, oid, class, path
    transactions: int
    first: datetime.datetime | None
    last: datetime.datetime | None


def stats(heap: Any, *, top: int = 10) -> Stats:
    """Size, records by class, the largest records, and the history's depth."""
    storage = heap.db.storage
    with progress(len(storage), "stats") as bar:
        walk = _walk(storage, bar, keep_largest=top)
    paths = _paths(heap, {oid for _, oid, _ in walk.largest}, budget=20_000)
    largest = [(n, oid, cls, paths.get(oid, "")) for n, oid, cls in walk.largest]
    count, first, last = 0, None, None
    for txn in _transactions(storage):
        count += 1
        if first is None:
            first = txn.tid
        last = txn.tid
    return Stats(_heap_size(heap), walk.records, walk.size, walk.by_class, largest, count,
                 _tid_time(first) if first else None, _tid_time(last) if last else None)


#: Classes whose records are small by design (containers split into buckets).
_SPLIT = ("BTrees.", "durable_heap._containers.")


def rewritten_whole(s: Stats) -> list[str]:
    """Advice for big records that every small change rewrites in full."""
    lines = []
    for n, _oid, cls, path in s.largest:
        if n < BIG_RECORD or cls.startswith(_SPLIT):
            continue
        where = path or "a record"
        lines.append(
            f"{where} ({cls}) is one record of {_size(n)}: every change to it (one attribute, "
            f"`{path or 'obj'}.n += 1`) writes all {_size(n)} again. Keep big values in an "
            "object of their own (a durable_heap.Object subclass holding the value, or an entry "
            "of a Dict), so that small changes beside them write only the small record."
        )
    return lines


# --- pack ---------------------------------------------------------------------------------


@dataclass
class PackReport:
    """Figures before and after a pack."""

    bytes_before: int
    bytes_after: int
    objects_before: int
    objects_after: int
    revisions_before: int | None
    revisions_after: int | None
    dropped_classes: list[str]


def pack(heap: Any, days: float) -> PackReport:
    """``heap.pack(days)``, with figures, and (file heaps) the class registry pruned to the
    classes the remaining records still name."""
    path = _file_path(heap)
    storage = heap.db.storage
    before, objects_before = _heap_size(heap), _objects(storage)
    revisions_before = _count_revisions(storage) if path else None
    with progress(None, f"pack (keeping {days:g} days)", "s") as bar:
        ticker = _Ticker(bar)
        try:
            with _unlogged_interrupt("ZODB.DB"):  # DB.pack logs what ends it, Ctrl-C included
                heap.pack(days=days)
        except KeyboardInterrupt:
            _undo_interrupted_pack(path)
            raise
        finally:
            ticker.stop()
    dropped = _prune_registry(heap) if path else []
    return PackReport(before, _heap_size(heap), objects_before, _objects(storage), revisions_before,
                      _count_revisions(storage) if path else None, dropped)


class _DropInterrupt:
    """A logging filter: drops records of a KeyboardInterrupt (the command reports it)."""

    def filter(self, record: Any) -> bool:
        info = getattr(record, "exc_info", None)
        return not (info and isinstance(info[1], KeyboardInterrupt))


@contextlib.contextmanager
def _unlogged_interrupt(name: str) -> Iterator[None]:
    """While the block runs, logger `name` does not log a Ctrl-C with its traceback."""
    import logging

    logger, drop = logging.getLogger(name), _DropInterrupt()
    logger.addFilter(drop)  # type: ignore[arg-type]
    try:
        yield
    finally:
        logger.removeFilter(drop)  # type: ignore[arg-type]


class _Ticker:
    """Moves a progress bar once a second while ZODB packs (its pack reports no progress)."""

    def __init__(self, bar: Any) -> None:
        self._stop = threading.Event()
        self._bar = bar
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._bar.update(1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Growth:
    """Moves a byte-counting progress bar as files grow (repozo reports no progress, but
    writes each file under a name of its own first: ``tmp.tmp`` in the repository, or
    ``OUTPUT.part`` when it recovers)."""

    def __init__(self, bar: Any, files: Callable[[], list[str]]) -> None:
        self._stop = threading.Event()
        self._bar, self._files = bar, files
        self._shown = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            size = 0
            for path in self._files():
                with contextlib.suppress(OSError):
                    size += os.path.getsize(path)
            if size > self._shown:
                self._bar.update(size - self._shown)
                self._shown = size

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _undo_interrupted_pack(path: str | None) -> None:
    """After Ctrl-C in FileStorage's pack: the file is as it was; drop the scratch copy.

    ZODB trap: FileStorage.pack renames the file to ``.old`` and the ``.pack`` copy to the
    file one after the other; an interrupt between the two would leave no file.
    """
    if path is None:
        return
    if not os.path.exists(path) and os.path.exists(path + ".pack"):
        os.replace(path + ".pack", path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".pack")


def _count_revisions(storage: Any) -> int:
    return sum(1 for txn in _transactions(storage) for _ in txn)


def _prune_registry(heap: Any) -> list[str]:
    """Drop registry entries of classes that no remaining record names (history included:
    ``inspect --at`` loads old revisions through the allowlist, which reads the registry).

    Only for a file heap, which this process holds alone: over ZEO other clients keep
    their own note of what is registered and would not register a class again.
    """
    from ._format import CLASSES_KEY
    from ._registry import scan_classes  # the registry's own scanner

    found = scan_classes(_Records(heap.db.storage))
    tm = heap.transaction_manager
    tm.begin()
    try:
        registry = heap.connection.root().get(CLASSES_KEY)
        if registry is None:
            tm.abort()
            return []
        gone = sorted(set(registry.keys()) - found)
        if not gone:
            tm.abort()
            return []
        for name in gone:
            del registry[name]
        tm.get().note(f"durable_heap: pack: drop {len(gone)} unused class{'es' if len(gone) > 1 else ''} "
                      "from the class registry")
        tm.commit()
    except BaseException:
        tm.abort()
        raise
    return gone


class _Records:
    """Every revision of a storage, for `_registry.scan_classes` (which scans only the
    current ones of a storage with ``record_iternext``)."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def iterator(self) -> Iterator[Any]:
        return _transactions(self._storage)


# --- backup and restore (repozo) ----------------------------------------------------------


@dataclass
class BackupReport:
    """What a backup wrote."""

    kind: str  # "full", "incremental" or "unchanged"
    written: int
    files: list[str]
    copied_transactions: int | None = None  # over ZEO: new transactions copied into the mirror


#: Over ZEO, the local FileStorage copy that repozo backs up, inside the backup folder.
MIRROR = os.path.join("zeo-mirror", "heap.fs")


def _repozo(argv: list[str]) -> None:
    """Run ZODB's repozo in this process; its errors become `CommandError`."""
    from ZODB.scripts import repozo

    try:
        repozo.main(argv)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise CommandError(f"repozo {' '.join(argv[:1])} failed: {exc.code}") from None


def _repo_files(dest: str) -> set[str]:
    try:
        return set(os.listdir(dest))
    except FileNotFoundError:
        return set()


def _next_second(dest: str) -> None:
    """repozo names files by the second: wait for a new second if this one is taken."""
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
    if any(n.startswith(stamp) for n in _repo_files(dest)):
        time.sleep(1.05 - (time.time() % 1))


def backup(heap_target: Any, source: str, dest: str) -> BackupReport:
    """Back `source` (a FileStorage file) up into the repozo repository `dest`, then verify it.

    Safe while a process writes the file: repozo copies up to the end of its last whole
    transaction. Interrupted, it leaves the repository as it was.
    """
    with _private():
        os.makedirs(dest, exist_ok=True)
    before = _repo_files(dest)
    _next_second(dest)
    def being_written() -> list[str]:
        return [os.path.join(dest, n) for n in _repo_files(dest) - before]

    try:
        with progress(None, "backup", "B") as bar:
            growth = _Growth(bar, being_written)
            try:
                with _private():
                    _repozo(["-B", "-Q", "-r", dest, "-f", source])
            finally:
                growth.stop()
    except BaseException:
        for name in _repo_files(dest) - before:  # a half-written backup: as if never started
            with contextlib.suppress(OSError):
                os.remove(os.path.join(dest, name))
        raise
    new = sorted(n for n in _repo_files(dest) - before if n.endswith((".fs", ".deltafs")))
    _repozo(["-V", "-r", dest])  # sizes and checksums of every file of the last full backup
    if not new:
        return BackupReport("unchanged", 0, [])
    kind = "full" if new[-1].endswith(".fs") else "incremental"
    written = sum(os.path.getsize(os.path.join(dest, n)) for n in new)
    return BackupReport(kind, written, new)


def backup_zeo(heap: Any, dest: str) -> BackupReport:
    """Over ZEO: copy the server's new transactions into the mirror in `dest`, then `backup` it."""
    from ZODB.utils import p64, u64, z64

    from ._storage import open_storage
    from ._targets import parse_target

    mirror_path = os.path.join(dest, MIRROR)
    with _private():
        os.makedirs(os.path.dirname(mirror_path), exist_ok=True)
    source = heap.db.storage
    mirror = open_storage(parse_target(mirror_path))
    copied = 0
    try:
        last = mirror.lastTransaction()
        if last != z64 and not any(t.tid == last for t in _transactions(source, last, last)):
            # The server's history does not contain the mirror's last transaction (it was
            # restored from something older): start the mirror again.
            mirror.close()
            for suffix in ("", ".index", ".tmp", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(mirror_path + suffix)
            mirror = open_storage(parse_target(mirror_path))
            last = z64
        start = None if last == z64 else p64(u64(last) + 1)
        with progress(None, "copy from the server", "transactions") as bar:
            for txn in _transactions(source, start):
                # ZODB's storage-copy protocol (as ZODB.BaseStorage.copy): restore keeps tids.
                mirror.tpc_begin(txn, txn.tid, txn.status)
                try:
                    for r in txn:
                        mirror.restore(r.oid, r.tid, r.data, "", r.data_txn, txn)
                    mirror.tpc_vote(txn)
                except BaseException:
                    mirror.tpc_abort(txn)
                    raise
                mirror.tpc_finish(txn)
                copied += 1
                bar.update(1)
    finally:
        mirror.close()
    report = backup(None, mirror_path, dest)
    report.copied_transactions = copied
    return report


@contextlib.contextmanager
def _private() -> Iterator[None]:
    from ._targets import private_files

    with private_files():
        yield


def restore(dest: str, path: str, *, force: bool, date: str | None = None) -> str | None:
    """Recover the heap file `path` from the repozo repository `dest` (as of `date`).

    Refuses a heap that a process has open (its lock is taken for the whole restore,
    so none can open it meanwhile), and an existing file unless `force` (then kept as
    ``PATH.before-restore``). Writes beside it, checks the result opens and reads, then
    moves it into place. Returns the name the old file was kept under, if any.
    """
    from ZODB.scripts.repozo import is_data_file

    if not os.path.isdir(dest) or not any(is_data_file(n) for n in os.listdir(dest)):
        raise UsageError(f"{dest} holds no backup (made by `durable-heap backup`)")
    exists = os.path.exists(path)
    if exists and not force:
        raise UsageError(
            f"{path} exists: restore replaces a heap only with --force (the current file is then "
            f"kept as {os.path.basename(path)}.before-restore)"
        )
    lock = _lock_heap(path)
    work = path + ".restoring"
    try:
        _remove_work(work)
        try:
            with progress(None, "restore", "B") as bar:
                growth = _Growth(bar, lambda: [work + ".part", work])
                try:
                    with _private():
                        _repozo(["-R", "-w", "-r", dest, "-o", work, *(["-D", date] if date else [])])
                finally:
                    growth.stop()
            _check_restored(work)
        except BaseException:
            _remove_work(work)  # interrupted or refused: the heap as it was
            raise
        return _move_into_place(work, path, exists)
    finally:
        lock.close()


def _lock_heap(path: str) -> Any:
    """Take the heap file's lock (FileStorage's, ``PATH.lock``): `HeapLockedError` if a process holds it."""
    import zc.lockfile

    with _private():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            return zc.lockfile.LockFile(path + ".lock")
        except zc.lockfile.LockError as exc:
            from ._errormap import translate_storage_error

            held = translate_storage_error(exc, path, action="open")  # names the process
            raise HeapLockedError(str(held).split(". A FileStorage")[0]
                                  + ": stop it before restoring its heap.") from None


def _remove_work(work: str) -> None:
    for suffix in ("", ".index", ".part"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(work + suffix)


def _move_into_place(work: str, path: str, exists: bool) -> str | None:
    """The restored file (and its index) in place of the heap, which is kept; its name."""
    kept = None
    if exists:
        kept = path + ".before-restore"
        if os.path.exists(kept):  # an earlier restore's: keep that one too
            kept += time.strftime("-%Y%m%d-%H%M%S", time.gmtime())
        os.replace(path, kept)
        if os.path.exists(path + ".index"):
            os.replace(path + ".index", kept + ".index")
    os.replace(work, path)
    if os.path.exists(work + ".index"):
        os.replace(work + ".index", path + ".index")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".index")  # it would describe the file replaced
    return kept


def _check_restored(path: str) -> None:
    """Open the restored file as a heap (its structure checked) and read every current record."""
    import durable_heap

    with durable_heap.open(path, read_only=True) as heap:
        report = verify(heap)
    if report.problems:
        raise CommandError(
            f"the restored file does not verify ({len(report.problems)} problem(s): "
            f"{report.problems[0].line()}); the heap was not replaced. Restore an older backup "
            "(--date)."
        )


# --- the commands -----------------------------------------------------------------------------


EXAMPLES = {
    "pack": "example:\n  durable-heap pack tracker.py --days 30",
    "backup": "example:\n  durable-heap backup tracker.py /backups/tracker    # every hour, from cron",
    "restore": "example:\n  durable-heap restore /backups/tracker tracker.py\n"
               "  durable-heap restore /backups/tracker tracker.py --force --date 2026-11-30-12",
    "verify": "example:\n  durable-heap verify tracker.py || mail -s 'heap damaged' ops@example.com",
    "log": "example:\n  durable-heap log tracker.py -n 5 --grep add_task\n"
           "  durable-heap log tracker.py --show 03f2a1c4e5b6d7a8",
    "stats": "example:\n  durable-heap stats tracker.py",
}


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]
                 ) -> dict[str, argparse.ArgumentParser]:
    """Add the operations' subcommands to the ``durable-heap`` parser; each sets ``run``."""
    from ._heap import DEFAULT_PACK_DAYS

    made: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, text: str, run: Callable[[argparse.Namespace], int],
                program: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=text, description=text, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        if program:
            p.add_argument("program", help="the program: a .py file or a package folder")
        p.set_defaults(run=run)
        made[name] = p
        return p

    p = command("pack", "remove history older than --days (and objects nothing refers to)", _pack)
    p.add_argument("--days", type=float, default=DEFAULT_PACK_DAYS,
                   help=f"history to keep, in days (default {DEFAULT_PACK_DAYS:g}, as heap.pack(): "
                   "`inspect --at` reaches back that far)")
    p = command("backup", "back the heap up into a folder: full the first time, then incremental", _backup)
    p.add_argument("dest", metavar="DEST", help="the backup folder (created 0700 if missing)")
    p = command("restore", "restore a heap from a backup folder (the backup first, as cp reads)",
                _restore, program=False)
    p.add_argument("dest", metavar="DEST", help="the backup folder, made by `durable-heap backup`")
    p.add_argument("program", help="the program whose heap is restored")
    p.add_argument("--force", action="store_true",
                   help="replace an existing heap (kept as HEAP.before-restore)")
    p.add_argument("--date", metavar="YYYY-MM-DD[-HH[-MM[-SS]]]",
                   help="restore the state as of this time (UTC) instead of the latest backup")
    command("verify", "read every record: checksums, references; exit 1 on damage (read-only)", _verify)
    p = command("log", "the heap's history as a log of calls, newest first (read-only)", _log)
    p.add_argument("--since", metavar="TIME", help="only transactions since this ISO time (UTC by default)")
    p.add_argument("--grep", metavar="TEXT", help="only transactions whose note contains TEXT")
    p.add_argument("-n", type=int, default=DEFAULT_LOG_COUNT, metavar="N",
                   help=f"at most N transactions (default {DEFAULT_LOG_COUNT}; 0: all)")
    p.add_argument("--show", metavar="TID", help="list what transaction TID changed")
    command("stats", "size, records by class, the largest records, history (read-only)", _stats)
    for p in made.values():
        common(p)
    return made


def _target(args: argparse.Namespace) -> str:
    from ._program import default_target

    return args.storage or os.environ.get("DURABLE_HEAP_STORAGE") or default_target(args.program)


def _open(args: argparse.Namespace, *, read_only: bool) -> Any:
    import durable_heap

    target = _target(args)
    if "://" not in target and not os.path.exists(target):
        raise StorageError(f"{args.program} has no heap yet at {target}: `durable-heap call` creates it")
    with waiting_notice(target):
        return durable_heap.open(target, read_only=read_only, allow=args.allow)


def _pack(args: argparse.Namespace) -> int:
    if args.days < 0:
        raise UsageError(f"--days {args.days:g} is negative: give 0 (keep no history) or more")
    with _open(args, read_only=False) as heap:
        r = pack(heap, args.days)
        where = str(heap.target)
    print(f"packed {where}, keeping {args.days:g} days of history: {_size(r.bytes_before)} -> "
          f"{_size(r.bytes_after)}")
    print(f"  objects: {r.objects_before:,} -> {r.objects_after:,} "
          f"({max(r.objects_before - r.objects_after, 0):,} no longer referred to were removed)")
    if r.revisions_before is not None and r.revisions_after is not None:
        print(f"  records in the file (all revisions): {r.revisions_before:,} -> {r.revisions_after:,} "
              f"({r.revisions_before - r.revisions_after:,} removed)")
    if r.dropped_classes:
        print(f"  class registry: dropped {', '.join(r.dropped_classes)} (no object uses them any more)")
    if _is_file(where) and os.path.exists(where + ".old"):
        print(f"  the file before the pack is kept as {where}.old: delete it once you are satisfied")
    return 0


def _is_file(target: str) -> bool:
    return "://" not in target


def _backup(args: argparse.Namespace) -> int:
    from ._targets import parse_target

    target = parse_target(_target(args))
    dest = os.path.abspath(args.dest)
    if target.scheme == "file":
        if not os.path.exists(target.location):
            raise StorageError(f"{args.program} has no heap yet at {target}: nothing to back up")
        _check_whole(target.location)
        r = backup(None, target.location, dest)
    elif target.scheme == "zeo":
        with _open(args, read_only=True) as heap:
            r = backup_zeo(heap, dest)
    elif target.scheme == "postgresql":
        raise UsageError(
            f"{target} is a PostgreSQL database: back it up with PostgreSQL's own tools (pg_dump, "
            "or base backups with WAL archiving), or copy it into a heap file with "
            f"`durable-heap copy {target} FILE.fs` (see docs/operations.md)"
        )
    else:
        raise UsageError(f"{target} cannot be backed up: backups are of file and zeo:// heaps")
    if r.kind == "unchanged":
        print(f"{target}: nothing changed since the last backup in {dest}")
    else:
        extra = (f" ({r.copied_transactions:,} new transactions copied from the server)"
                 if r.copied_transactions is not None else "")
        print(f"{target}: {r.kind} backup of {_size(r.written)} in {dest}: {', '.join(r.files)}{extra}; "
              "verified")
    return 0


def _check_whole(path: str) -> None:
    """Refuse to back up a file that would not open whole (a damaged one): the backups
    already made stay the good ones. Opening it read-only checks its structure (where
    an open scans it) without taking the writer's lock."""
    import durable_heap

    from ._errors import CorruptHeapError

    try:
        durable_heap.open(path, read_only=True).close()
    except CorruptHeapError as exc:
        raise CommandError(f"not backed up: {exc} The backups made before are untouched.") from None


def _restore(args: argparse.Namespace) -> int:
    from ._targets import parse_target

    target = parse_target(_target(args))
    if target.scheme == "postgresql":
        raise UsageError(
            f"{target} is a PostgreSQL database: restore writes a heap file. Restore the file, "
            f"then `durable-heap copy FILE.fs {target}` into an empty database (or use pg_restore)"
        )
    if target.scheme != "file":
        raise UsageError(
            f"{target} is not a file: restore writes a heap file. For a ZEO server, stop it, restore "
            "into its file (durable-heap restore DEST PROGRAM --storage SERVER_FILE), start it again"
        )
    kept = restore(os.path.abspath(args.dest), target.location, force=args.force, date=args.date)
    print(f"restored {target} from {os.path.abspath(args.dest)}"
          + (f" (as of {args.date})" if args.date else "") + "; verified")
    if kept:
        print(f"  the heap it replaced is kept as {kept}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ._errors import CorruptHeapError

    try:
        with _open(args, read_only=True) as heap:
            report = verify(heap)
            where = str(heap.target)
    except CorruptHeapError as exc:  # it does not even open: that is the finding
        print(f"{_target(args)}: damaged: {exc}")
        return 1
    if not report.problems:
        history = f", {report.history:,} records in the file's history" if report.history else ""
        print(f"{where}: ok: {report.records:,} current records read{history}; every checksum and "
              "reference is good")
        return 0
    print(f"{where}: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''} "
          f"({report.records:,} records read):")
    for p in report.problems:
        print(f"  {p.line()}")
    print('Restore a backup (durable-heap restore), or see "A damaged file or record" in '
          "docs/operations.md to keep what is intact.")
    return 1


def _log(args: argparse.Namespace) -> int:
    from ._versions import parse_time

    with _open(args, read_only=True) as heap:
        if args.show is not None:
            entry, changed = show_transaction(heap, args.show)
            _print_entry(entry)
            for c in changed:
                print(f"    {_oid_text(c.oid):>10}  {c.cls:<40} {_size(c.bytes):>10}  {c.path}")
            return 0
        try:
            since = parse_time(args.since) if args.since else None
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from None
        entries = log_entries(heap, since=since, grep=args.grep, count=args.n)
    for e in entries:
        _print_entry(e)
    return 0


def _print_entry(e: LogEntry) -> None:
    when = e.time.strftime("%Y-%m-%d %H:%M:%S")
    note = " / ".join(e.note.splitlines()) or "(no note)"  # notes of several parts, one line
    print(f"{_tid_text(e.tid)}  {when}  {note}  "
          f"[{e.records} record{'s' if e.records != 1 else ''}, {_size(e.bytes)}]")


def _stats(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as heap:
        s = stats(heap)
        where = str(heap.target)
    print(f"{where}: {_size(s.file_size)}; {s.records:,} current records ({_size(s.size)})")
    if s.first and s.last:
        print(f"history: {s.transactions:,} transactions, {s.first:%Y-%m-%d %H:%M} to "
              f"{s.last:%Y-%m-%d %H:%M} UTC")
    print("records by class:")
    for cls, (n, size) in sorted(s.by_class.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:>10,}  {_size(size):>10}  {cls}")
    print("largest records:")
    for n, oid, cls, path in s.largest:
        print(f"  {_size(n):>10}  {_oid_text(oid):>10}  {cls}  {path}")
    for line in rewritten_whole(s):
        print(f"note: {line}")
    return 0
