"""Rewrite stored records under the new paths of renamed classes (``__durable_renames__``).

A rename table makes records that name ``app.User`` load as ``app.Member``, but
the records keep naming the old path until each is written again, and so do
the records that *refer* to them: a persistent reference pickles the class of
the object it points to (ZODB's ``(oid, class)`` references), and a plain
instance held inside a record pickles its class too. `rewrite` finds every
current record whose pickles name an old path (read from the opcodes, nothing
unpickled), and writes each again through the loaded program (whose classes
carry the new paths), in batches of their own transactions.

Then only history names the old path. Once a pack has removed the history from
before the rewrite, a deploy may drop the rename entry: the deploy sees that the
rewrite's marker (`REWRITES_KEY`, one record per old path, written when the
rewrite starts and again when it ends) has no revision left from before its
end, and drops the old path from the class registry. This module knows no
versions: `_versions` passes the program's rename table.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ZODB.broken
import ZODB.POSException
from BTrees.OOBTree import OOBTree

from ._allow import record_globals
from ._errors import ProgramError
from ._format import CLASSES_KEY, REWRITES_KEY
from ._heap import HeapEngine
from ._retry import retry

__all__ = ["RewriteReport", "entry", "forget", "history_remains", "rewrite"]

#: Rounds of scan-and-rewrite before giving up: records another process writes
#: under an old path meanwhile (a process still running an older version) are
#: found by the next round's scan.
_ROUNDS = 3


@dataclass(frozen=True)
class RewriteReport:
    """What `rewrite` did: the renames, the records written again, when it finished."""

    renames: dict[str, str]
    records: int
    batches: int
    finished: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _needles(renames: Iterable[str]) -> dict[bytes, str]:
    """The GLOBAL opcode bytes (``c<module>\\n<name>\\n``, protocol 3) of each old path."""
    found = {}
    for path in renames:
        module, _, name = path.rpartition(".")
        found[f"c{module}\n{name}\n".encode()] = path
    return found


def _naming(storage: Any, old: set[str], *, exact: bool = True) -> Iterator[bytes]:
    """The oids of the current records whose pickles name one of the paths `old`.

    Not `exact`: also those with the opcode's bytes in string data (rare), found
    without reading opcodes; writing such a record again does no harm.
    """
    needles = _needles(old)

    def names(data: bytes | None) -> bool:
        # The bytes find candidates fast (also in string data); the opcodes decide.
        if not data or not any(n in data for n in needles):
            return False
        if not exact:
            return True
        try:
            return bool(old.intersection(record_globals(data)))
        except Exception:  # noqa: BLE001 - a record that does not parse names nothing
            return False

    # RelStorage trap: its record_iternext reads through the storage's load
    # connection, a snapshot as of that connection's last poll, which our own commits
    # (made by the DB's per-Connection instances) never move: a scan after a rewrite
    # would still see the old records. A fresh instance reads the current state.
    fresh = storage.new_instance() if hasattr(storage, "new_instance") else None
    source = fresh if fresh is not None else storage
    try:
        cursor = None
        while True:
            # IStorageIteration's record_iternext: FileStorage, ZEO's ClientStorage and
            # RelStorage all have it (the current revision of every object, by oid).
            oid, _, data, cursor = source.record_iternext(cursor)
            if names(data):
                yield oid
            if cursor is None:
                break
    finally:
        if fresh is not None:
            fresh.release()


def entry(conn: Any, path: str) -> Any:
    """The rewrite marker of the old class `path` (an OOBTree), or None."""
    table = conn.root().get(REWRITES_KEY)
    return table.get(path) if table is not None else None


def history_remains(conn: Any, marker: Any) -> bool:
    """Whether history from before the rewrite of `marker` is still stored.

    The marker's first revision was written when the rewrite started, its last
    when it finished; a pack removes the first only when it removes every
    revision older than the last, and so every old record of the rewritten
    objects (each has a newer revision, the rewrite's, by then).
    """
    marker._p_activate()  # a ghost's serial is not known yet
    try:
        earlier = conn.db().storage.loadBefore(marker._p_oid, marker._p_serial)
    except ZODB.POSException.POSKeyError:
        return False
    return earlier is not None


def forget(conn: Any, paths: Iterable[str]) -> None:
    """Drop `paths` from the class registry (in the caller's transaction)."""
    registry = conn.root().get(CLASSES_KEY)
    if registry is None:
        return
    for path in paths:
        if path in registry:
            del registry[path]


def rewrite(heap: HeapEngine, program: str, renames: dict[str, str], *, batch: int = 1000,
            on_progress: Callable[[int, int], None] | None = None) -> RewriteReport:
    """Write every current record that names an old path of `renames` again, `batch`
    records per transaction; ``on_progress(done, total)`` after each batch.

    The program must be loaded in this process with `renames` as its rename
    table, so that those records load as the new classes (and are written so).
    Safe while other processes use the heap: a batch that conflicts is retried.
    """
    if not renames:
        raise ProgramError(
            f"{program} declares no __durable_renames__: there are no renamed classes to rewrite"
        )
    if batch < 1:
        raise ValueError("batch must be at least 1")
    old = set(renames)
    _mark(heap, program, renames, started=True)
    broken: dict[bytes, str] = {}  # records of classes the code does not define: not writable
    written, batches = _rounds(heap, program, renames, batch, on_progress, broken)
    if broken:
        classes = ", ".join(sorted(set(broken.values())))
        raise ProgramError(
            f"{len(broken)} records that name {', '.join(sorted(old))} are objects of classes this "
            f"version does not define ({classes}): they load as broken objects, which cannot be "
            f"written. Define those classes again (or map them in __durable_renames__) and run "
            f"the rewrite again; the other {written} records were rewritten"
        )
    finished = _mark(heap, program, renames, started=False, records=written)
    return RewriteReport(dict(renames), written, batches, finished)


def _rounds(heap: HeapEngine, program: str, renames: dict[str, str], batch: int,
            on_progress: Callable[[int, int], None] | None, broken: dict[bytes, str]) -> tuple[int, int]:
    """Scan and write again until a scan finds nothing; (records written, transactions)."""
    old = set(renames)
    storage = heap.db.storage
    written = batches = 0
    for round_ in range(_ROUNDS):
        with heap.transaction(note=f"rewrite-classes {program}: scan"):
            pass  # a transaction boundary: the storage's view is synced (ZEO invalidations)
        # The first round by the opcode bytes alone (most records match: reading their
        # opcodes would cost more than writing a stray one again); the next ones exactly,
        # so that a string that happens to hold those bytes does not count as left.
        oids = [oid for oid in _naming(storage, old, exact=round_ > 0) if oid not in broken]
        if not oids:
            return written - len(broken), batches
        total = written + len(oids)
        for start in range(0, len(oids), batch):
            chunk = oids[start:start + batch]
            note = (f"rewrite-classes {program}: records {written + 1}-{written + len(chunk)} "
                    f"({', '.join(f'{k} -> {v}' for k, v in sorted(renames.items()))})")
            retry(lambda chunk=chunk, note=note: _write_again(heap, chunk, note, broken),  # type: ignore[misc]
                  attempts=heap.max_attempts, note=note)
            written += len(chunk)
            batches += 1
            if on_progress is not None:
                on_progress(written, total)
    left = [oid for oid in _naming(storage, old) if oid not in broken]
    if left:
        raise ProgramError(
            f"{len(left)} records still name {', '.join(sorted(old))} after {_ROUNDS} rounds of "
            f"rewriting: another process keeps writing them (one still running a version "
            f"that defines the old class?). Stop it, or let it load the current version, and "
            f"run the rewrite again"
        )
    return written - len(broken), batches


def _write_again(heap: HeapEngine, oids: list[bytes], note: str, broken: dict[bytes, str]) -> None:
    with heap.transaction(note=note):
        conn = heap.connection
        for oid in oids:
            obj = conn.get(oid)
            if isinstance(obj, ZODB.broken.Broken):  # ZODB refuses to store a broken object
                broken[oid] = f"{type(obj).__module__}.{type(obj).__name__}"
                continue
            obj._p_activate()  # its state, loaded through the rename table
            obj._p_changed = True  # pickled again at commit: its class, its references'


def _mark(heap: HeapEngine, program: str, renames: dict[str, str], *, started: bool,
          records: int = 0) -> datetime.datetime:
    """Write the rewrite markers of `renames`: started (finished None), or finished."""
    when = _now()

    def once() -> None:
        state = "start" if started else "done"
        with heap.transaction(note=f"rewrite-classes {program}: {state}"):
            root = heap.connection.root()
            table = root.get(REWRITES_KEY)
            if table is None:
                table = root[REWRITES_KEY] = OOBTree()
            for path, new in renames.items():
                marker = table.get(path)
                if marker is None:
                    marker = table[path] = OOBTree()
                marker.update({"new": new, "program": program,
                               "started": when if started else marker.get("started"),
                               "finished": None if started else when, "records": records})

    retry(once, attempts=heap.max_attempts, note=f"rewrite-classes {program}")
    return when
