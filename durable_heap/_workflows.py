"""Durable execution: workflows that wait for days, durable timers, promises, events.

CPython cannot pickle frames, so a workflow is replayed: an ordinary function
(sync or ``async def``) run again from the top at each wake, with what it
already did read back from its journal in the heap. What a body does:

* calls `@heap.action` functions: each such call is a **step**, run once in a
  transaction of its own together with its journal entry (and the removal of
  the timer that woke the workflow, for the first one), so its changes to the
  heap happen exactly once; on replay its recorded result (or exception) is
  returned instead. Steps are identified by (number, name), checked on replay:
  a mismatch raises `NonDeterminismError`.
* waits: `sleep`, `Promise.wait`. A wait that is not over journals what it
  needs (its deadline), leaves a timer, and unwinds the stack with `_Suspend`
  (a BaseException: ``except Exception`` in user code cannot catch it). No
  thread or process is held.
* reads time and randomness through the journal: `now`, `uuid4`, `random`.
* never changes state itself: the body runs outside any transaction, so such a
  change is refused (by the heap's explicit transactions) and the workflow
  fails with a message naming the path; a change there would be applied again
  at each replay.

Stored format (root keys and classes; they are on-disk format, never moved):
``durable_heap.workflows`` (OOBTree id -> `WorkflowRecord`, whose ``journal``
is a `Journal` of `JournalEntry`), ``durable_heap.timers`` (OOBTree
(deadline, seq) -> `TimerEntry`), ``durable_heap.promises`` (OOBTree name ->
`PromiseRecord`), ``durable_heap.subscriptions`` (OOBTree topic -> tuple of
(module, qualname)), ``durable_heap.crons`` (OOBTree id -> `CronEntry`) and
``durable_heap.dead_letters`` (OOBTree seq -> `TimerEntry`).

Timers, subscriptions and crons name their actions by (module, qualname), never
by a closure; `resolver` (registered by the version layer) finds a program's
functions by those names.
"""

from __future__ import annotations

import contextlib
import contextvars
import copyreg
import datetime
import functools
import importlib
import inspect
import io
import logging
import marshal
import numbers
import operator
import os
import random as _random
import sys
import threading
import time
import types
import uuid as _uuid
import weakref
from collections.abc import Callable
from itertools import chain
from typing import Any, SupportsIndex

import transaction.interfaces
from BTrees.IOBTree import IOBTree, IOBucket
from BTrees.OOBTree import OOBTree, OOBucket
from persistent import Persistent

from . import _fastpickle, _jsonform, _watch
from . import _heap as _engine
from ._errors import (
    ConflictError,
    DurableHeapError,
    NonDeterminismError,
    NoTransactionError,
    PromiseTimeout,
    StorageError,
    WorkflowError,
)
from ._format import FORMAT_KEY, JOURNAL_FORMAT, WORKFLOW_KEYS
from ._kinds import ATOMIC as _ATOMIC
from ._retry import call_note
from ._snapshot import _NotingPickler

__all__ = [
    "CronEntry",
    "JournalEntry",
    "Promise",
    "PromiseRecord",
    "TimerEntry",
    "Workflow",
    "WorkflowFunction",
    "WorkflowRecord",
    "emit",
    "now",
    "on",
    "patched",
    "promise",
    "random",
    "resolve",
    "sleep",
    "step_key",
    "uuid4",
    "workflow",
]

_log = logging.getLogger("durable_heap.workflows")

# The root keys (owned by `_format`, which says what each holds). WAITING_KEY's tree,
# (module, qualname, code hash or "!blocked", id) -> True, lists the waiting and
# blocked workflows by their function's code, so that a deploy replays only those
# whose code changed, without reading the others.
# STATUS_KEY's tree, status -> OOBTree (created, id) -> True, lists the workflows by
# status, so that listing those of one status reads only them; one set per status, so
# that the transient "running" one stays small and cheap to write.
# RETENTION_KEY's tree, (deadline, id) -> True, lists the ended workflows whose journal
# is dropped at that deadline (`retain`): plain keys, cheap to write at each end, where a
# "prune" TimerEntry in the timers' last bucket (written before it, still fired) made a
# workflow's end rewrite a bucket of TimerEntry objects. A promise resolved while no
# workflow waits on it is listed too, as (deadline, name, "promise"): dropped then if
# still nobody waits on it (`resolve`, `_timers._prune_due`).
(WORKFLOWS_KEY, TIMERS_KEY, PROMISES_KEY, SUBSCRIPTIONS_KEY, CRONS_KEY, DEAD_KEY,
 WAITING_KEY, STATUS_KEY, RETENTION_KEY) = WORKFLOW_KEYS

#: Seconds a runner holds a running workflow between two of its transactions;
#: after that a scheduler takes it over (its runner is presumed dead).
DEFAULT_LEASE = 60.0
#: Seconds a finished workflow keeps its journal (its status and result stay).
DEFAULT_RETENTION = 7 * 86400.0
#: Tries of a timer's action (or an event's subscriber) before it becomes a dead letter.
TIMER_ATTEMPTS = 5
STATUSES = ("running", "waiting", "done", "failed", "blocked", "cancelled")
_FINAL = frozenset({"done", "failed", "cancelled"})
_ENDED = _FINAL | {"blocked"}  # a run stops at its next transaction (`_Run._begin`)

#: The version layer's hook: (module, qualname) -> the function to call, or None.
resolver: Callable[[str, str], Any] | None = None
#: The version layer's hook: (heap, program, save) -> a context manager that binds the
#: program's durable module globals (and with `save`, saves their changes at its end).
globals_binder: Callable[[Any, str, bool], contextlib.AbstractContextManager[None]] | None = None
#: Actions and workflows by (module, qualname), as decorated in this process.
_named: dict[tuple[str, str], Any] = {}


# --- stored records ---------------------------------------------------------------------


_newobj = copyreg.__newobj__  # type: ignore[attr-defined]  # (pickle emits NEWOBJ for it)


class Journal(IOBTree):
    """A workflow's journal: step number -> `JournalEntry` (stored).

    Small buckets (8 entries, not IOBTree's 60): each step rewrites the bucket its
    entry lands in, so the cost of a step stays flat as the journal grows.
    """

    max_leaf_size = 8
    max_internal_size = 64

    @staticmethod
    def _dh_plain_refs(state: Any) -> tuple[Any, ...] | None:
        """For `_fastpickle`: nothing, when the journal is one bucket held inline (of
        up to 8 entries: the record a step rewrites until then) of plain entries; else
        None. A split tree, ``((bucket, step, bucket, ...), first bucket)``, is written
        only at a split and names its first bucket twice, which ZODB pickles as two
        references (a table would give one, memoized: other bytes): ZODB's way."""
        if state is None:  # empty
            return ()
        if len(state) == 1 and _plain_entries(state[0][0][0]):  # (((step, entry, ...),),)
            return ()
        return None


def _journal_bucket_refs(state: Any) -> tuple[Any, ...] | None:
    """`Journal._dh_plain_refs` for its buckets (``IOBucket``, a C type: `_fastpickle.register`),
    state ``((step, entry, ...), [next bucket])``; any other ``IOBucket`` is left to ZODB."""
    return state[1:] if _plain_entries(state[0]) else None  # type: ignore[no-any-return]


_entry_fields = operator.attrgetter("kind", "name", "detail", "value", "error", "at")


def _plain_entries(items: tuple[Any, ...]) -> bool:
    """Whether a journal bucket's items ``(step, entry, ...)`` are stored entries
    (tuples; or `JournalEntry` objects, format 3) of plain atoms (or tuples of them):
    then `_fastpickle` pickles it without a Python call per object (about 70 for a
    bucket of 8 entries), in the same bytes. Looked at in C but for tuples (an error's
    arguments)."""
    entries = items[1::2]
    kinds = set(map(type, entries))
    if kinds == _TUPLE:  # format 4
        return _fastpickle.plain_values(tuple(chain.from_iterable(entries)))
    if kinds <= _JOURNAL_ENTRY:  # format 3 (a journal written before)
        return _fastpickle.plain_values(tuple(chain.from_iterable(map(_entry_fields, entries))))
    return False  # both (an old journal appended to): ZODB's way


class WorkflowRecord(Persistent):
    """One workflow: what it runs, where it is, and its journal (stored)."""

    def __init__(self, wid: str, function: tuple[str, str], args: tuple[Any, ...],
                 kwargs: dict[str, Any], now: float, retention: float) -> None:
        self.id = wid
        self.function = function  # (module, qualname) of the workflow function
        self.args = args
        self.kwargs = kwargs
        self.status = "running"  # one of STATUSES
        self.created = now
        self.since = now  # when it entered its status
        # Its runner's last transaction that wrote this record; a step writes only its
        # journal entry (whose `at` says when), so see `last_seen` (and DEFAULT_LEASE).
        self.heartbeat = now
        self.result: Any = None
        self.error: tuple[str, str, tuple[Any, ...], str] | None = None  # see _pack_error
        self.reason = ""  # why it is blocked
        self.waiting: tuple[Any, ...] | None = None  # ("sleep", deadline) | ("promise", name, deadline)
        self.timer: tuple[float, str] | None = None  # its one timer: wake, lease or prune
        self.journal = Journal()  # step number (from 0) -> JournalEntry
        # Entries in the journal as of the last write of this record (a step appends to
        # the journal only; a dropped journal keeps it): see `journal_length`.
        self.length = 0
        self.retention = retention
        self.finished: float | None = None
        self.code = ""  # a hash of the workflow function's code that last ran it (see `code_hash`)
        self.indexed: tuple[str, str, str, str] | None = None  # its key in WAITING_KEY's tree

    #: (status, created, id): where STATUS_KEY's index lists it (a class default: records
    #: written before the index lack it, see `reindex`).
    listed: tuple[str, float, str] | None = None
    #: Steps last replayed with other arguments than their journal entry's: number (from
    #: 0) -> the call as replayed. A class default: records written before it lack it.
    replayed: dict[int, str] | None = None
    #: Its key in RETENTION_KEY's tree once it ended (`retain`). A class default: records
    #: written before the tree have a "prune" timer (`timer`) instead.
    retained: tuple[float, str] | None = None


def _pristine(rec: WorkflowRecord) -> WorkflowRecord:
    """A fresh copy of the record that a start outside a transaction stores with its
    first transaction, for each attempt at that transaction after the first.

    ZODB trap: an aborted transaction takes back its changes to stored records, not
    to new ones. The record a failed attempt was creating stays filled in memory: the
    journal entry of a step whose changes were undone (stored, the step would replay
    as done, its effect lost), and its status index key (a conflict's retry would
    leave it out of the running set, where takeovers look)."""
    return WorkflowRecord(rec.id, rec.function, rec.args, rec.kwargs, rec.created, rec.retention)


class JournalEntry:
    """One thing a workflow did: a step, a wait, a journaled value.

    Stored (since heap format 4, `_format.JOURNAL_FORMAT`) as the plain tuple of
    `stored`, which `_fastpickle` pickles without a Python call per object; records
    of format 3 hold JournalEntry objects (inline), still read (`_entry`).
    """

    __slots__ = ("at", "detail", "error", "kind", "name", "value")

    def __init__(self, kind: str, name: str, detail: Any = None, value: Any = None,
                 error: tuple[str, str, tuple[Any, ...], str] | None = None, at: float = 0.0) -> None:
        self.kind = kind  # "step", "sleep", "wait", "got", "now", "uuid", "random", "patched"
        self.name = name
        self.detail = detail  # a step's arguments (shortened), a wait's deadline
        self.value = value
        self.error = error
        self.at = at

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.kind, self.name, self.detail, self.value, self.error, self.at)

    #: What the journal stores (format 4): ``(kind, name, detail, value, error, at)``,
    #: in the order of ``__init__``'s parameters (`_entry` makes the entry back).
    stored = __getstate__

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        if int(protocol) < 2:
            return object.__reduce_ex__(self, protocol)
        # What object.__reduce_ex__ gives, so the same bytes (the stored format), without
        # its detour through copyreg and a call of __getstate__: a step pickles each entry
        # of its journal's bucket again.
        return (_newobj, (JournalEntry,), (self.kind, self.name, self.detail, self.value, self.error,
                                           self.at))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.kind, self.name, self.detail, self.value, self.error, self.at = state

    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.name else self.kind


_JOURNAL_ENTRY = frozenset({JournalEntry})
_TUPLE = frozenset({tuple})
_fastpickle.register(IOBucket, _journal_bucket_refs)


def _entry(stored: Any) -> JournalEntry:
    """A journal entry as stored (a tuple; a `JournalEntry` in heaps of format 3) made an entry."""
    return stored if type(stored) is JournalEntry else JournalEntry(*stored)


def _read_journal(journal: Journal) -> list[JournalEntry]:
    """The entries of a stored journal, in order (a run's copy: `_Run.entries`)."""
    return list(map(_entry, journal.values()))


def _mark_journal_format(conn: Any) -> None:
    """Raise the heap's format marker to `JOURNAL_FORMAT` in this transaction (one that
    writes journal entries as tuples), so that an older durable_heap, which would read
    them as `JournalEntry` objects, refuses the heap instead. Once the committed marker
    says so, the connection remembers it: one dict lookup per transaction then."""
    root = conn.root()
    found = root.get(FORMAT_KEY, 1)
    if isinstance(found, int) and found >= JOURNAL_FORMAT:
        if root._p_changed is False:  # committed (not only raised in this transaction)
            conn._dh_journal_format = True
        return
    root[FORMAT_KEY] = JOURNAL_FORMAT


class TimerEntry:
    """A timer: an action to call, a workflow to run (wake or lease), a journal to drop (stored inline)."""

    __slots__ = ("args", "attempts", "created", "error", "kind", "kwargs", "origin", "target")

    def __init__(self, kind: str, target: Any, args: tuple[Any, ...] = (),
                 kwargs: dict[str, Any] | None = None, created: float = 0.0, origin: str = "") -> None:
        # "call" (target: (module, qualname)), "run" / "prune" (target: a workflow id),
        # "cron" (target: a cron id)
        self.kind = kind
        self.target = target
        self.args = args
        self.kwargs = kwargs or {}
        self.attempts = 0
        self.created = created
        self.error = ""  # the last failure, for retries and dead letters
        self.origin = origin  # "invoke", "event TOPIC", ...

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.kind, self.target, self.args, self.kwargs, self.attempts, self.created,
                self.error, self.origin)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        if int(protocol) < 2:
            return object.__reduce_ex__(self, protocol)
        # As `JournalEntry.__reduce_ex__`: each commit that adds or removes a timer
        # pickles every entry of its bucket again.
        return (_newobj, (TimerEntry,), (self.kind, self.target, self.args, self.kwargs, self.attempts,
                                         self.created, self.error, self.origin))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.kind, self.target, self.args, self.kwargs, self.attempts, self.created,
         self.error, self.origin) = state


_timer_fields = operator.attrgetter("kind", "target", "args", "attempts", "created", "error", "origin")


def _plain_timers(items: tuple[Any, ...]) -> bool:
    """Whether a timers bucket's items ``(key, entry, ...)`` are plain keys and exact
    `TimerEntry` objects of plain fields (kwargs: a dict of plain keys and values):
    ZODB's ``persistent_id`` answers None for each object pickled (the entry, its
    class, ``copyreg.__newobj__``, the rest atoms, tuples and dicts), so `_fastpickle`
    pickles the bucket, when it has no next bucket, without a Python call per object
    (about 20 an entry: each workflow's end adds its retention timer to the timers'
    last bucket and rewrites it)."""
    entries = items[1::2]
    if set(map(type, entries)) != _TIMER_ENTRY:
        return False
    kwargs = [e.kwargs for e in entries]
    if set(map(type, kwargs)) != _DICT:
        return False
    return _fastpickle.plain_values(
        (*items[0::2], *chain.from_iterable(map(_timer_fields, entries)),
         *chain.from_iterable(kwargs), *chain.from_iterable(k.values() for k in kwargs if k)))


def _oo_bucket_refs(state: Any) -> tuple[Any, ...] | None:
    """``OOBucket``'s `_fastpickle` rule: plain entries (`_fastpickle`'s own rule), or a
    last bucket of timers (`_plain_timers`); else None (ZODB's way)."""
    refs = _fastpickle.plain_bucket_refs(state)
    if refs is None and len(state) == 1 and _plain_timers(state[0]):
        return _fastpickle.NO_REFS
    return refs


def _oo_tree_refs(state: Any) -> tuple[Any, ...] | None:
    """``OOBTree``'s: as `_oo_bucket_refs`, for a tree of one bucket held inline."""
    refs = _fastpickle.plain_tree_refs(state)
    if refs is None and len(state) == 1 and _plain_timers(state[0][0][0]):
        return _fastpickle.NO_REFS
    return refs


_TIMER_ENTRY = frozenset({TimerEntry})
_DICT = frozenset({dict})
# (In place of `_fastpickle`'s own rules for these two C types, which these extend.)
_fastpickle.register(OOBucket, _oo_bucket_refs)
_fastpickle.register(OOBTree, _oo_tree_refs)


class PromiseRecord(Persistent):
    """A named promise: resolved once; the workflows waiting on it (stored)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.resolved = False
        self.value: Any = None
        self.at: float | None = None
        self.waiters: tuple[str, ...] = ()


class CronEntry:
    """A declared cron: an action, its spec, zone and missed-tick policy (stored inline)."""

    __slots__ = ("action", "args", "key", "kwargs", "missed", "spec", "tz")

    def __init__(self, action: tuple[str, str], spec: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], tz: str | None, missed: str) -> None:
        self.action = action
        self.spec = spec
        self.args = args
        self.kwargs = kwargs
        self.tz = tz
        self.missed = missed
        self.key: tuple[float, str] | None = None  # its pending tick in the timers tree

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.action, self.spec, self.args, self.kwargs, self.tz, self.missed, self.key)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        if int(protocol) < 2:
            return object.__reduce_ex__(self, protocol)
        return (_newobj, (CronEntry,), self.__getstate__())  # as `JournalEntry.__reduce_ex__`

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.action, self.spec, self.args, self.kwargs, self.tz, self.missed, self.key = state

    def same(self, other: CronEntry) -> bool:
        return self.__getstate__()[:6] == other.__getstate__()[:6]


# --- control flow -------------------------------------------------------------------------


class _Suspend(BaseException):  # noqa: N818 - control flow, never seen by users
    """Unwinds a workflow body that waits; ``except Exception`` cannot catch it."""


class _Abandon(BaseException):  # noqa: N818
    """Another runner owns this workflow now (or it was cancelled): this run stops."""


class _StopReplay(BaseException):  # noqa: N818
    """A read-only replay (a deploy's check) reached the end of the journal."""


class _Done:
    """An awaitable already complete: what waits return inside ``async def`` workflows."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value
        yield  # a generator: `await` on it returns at once


# --- helpers --------------------------------------------------------------------------------


def scheduler_stopping(heap: Any) -> bool:
    """Whether the scheduler loop of this thread (`_timers.run_scheduler`) was asked to stop."""
    stop = getattr(heap._wf_thread, "stop", None)
    return stop is not None and bool(stop.is_set())


def _clock(heap: Any) -> float:
    return float(getattr(heap, "clock", time.time)())


def _txn(heap: Any, func: Callable[[Any], Any], note: str) -> Any:
    """``func(conn)`` in a transaction of `heap` (joining one in progress), retried on conflicts."""
    def body() -> Any:
        return func(heap.connection)
    return heap._run(body, (), {}, note, heap.max_attempts)


def _trees(conn: Any) -> Any:
    return conn.root()


def _tree(conn: Any, key: str) -> Any:
    """One of our trees; created (in the transaction in progress) when missing."""
    root = conn.root()
    tree = root.get(key)
    if tree is None:
        tree = root[key] = OOBTree()
    return tree


def _peek(conn: Any, key: str) -> Any:
    return conn.root().get(key)


class _Added(threading.local):
    """Per thread: whether this transaction added a timer (the scheduler is rung after
    the commit). A class default, so the engine's after-commit hook, which runs after
    every commit of the heap, reads it without raising and catching an AttributeError."""

    flag = False


_added = _Added()


def _add_timer(conn: Any, deadline: float, entry: TimerEntry, seq: str | None = None) -> tuple[float, str]:
    key = (float(deadline), seq or _seq())
    _tree(conn, TIMERS_KEY)[key] = entry
    _added.flag = True  # the scheduler of this process wakes after the commit
    return key


def _seq() -> str:
    """A unique, roughly increasing sequence: no shared counter, so no conflicts on one."""
    return f"{time.time_ns():016x}{os.urandom(4).hex()}"


def name_of(func: Any, what: str) -> tuple[str, str]:
    """(module, qualname) of a module-level function, or a `WorkflowError` saying why not."""
    func = getattr(func, "__wrapped__", func)
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if inspect.ismethod(func) or not module or not qualname or "<" in qualname:
        raise WorkflowError(
            f"{what} needs a function defined at the top level of a module, found by name from "
            f"any process; {getattr(func, '__qualname__', func)!r} is a lambda, a closure or a "
            "bound method. Define it at module level (decorated with @heap.action)."
        )
    return module, qualname


def find(name: tuple[str, str]) -> Any:
    """The action or workflow stored as (module, qualname), or a `WorkflowError`."""
    module, qualname = name
    if resolver is not None:  # first: a program's current version, not what was decorated before
        found = resolver(module, qualname)
        if found is not None:
            return found
    found = _named.get(name)
    if found is not None:
        return found
    if module == "__main__" or "<" in qualname:
        raise WorkflowError(
            f"{module}.{qualname} was defined in a plain script (__main__) or inside a function, "
            "which another process cannot find by name: define it at the top level of a "
            "module or of a program that the worker loads"
        )
    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise WorkflowError(
            f"{module}.{qualname} cannot be found ({exc}): it was removed or renamed, or this "
            "process did not load the program that defines it"
        ) from exc
    return _named.get(name, obj)


def _pack_error(exc: BaseException) -> tuple[str, str, tuple[Any, ...], str]:
    tp = type(exc)
    args = exc.args if all(isinstance(a, (str, int, float, bool, type(None))) for a in exc.args) else ()
    # durable_heap's own errors by their public name (durable_heap.WorkflowError, as users
    # import them), not their private module's.
    module = "durable_heap" if tp.__module__ == "durable_heap._errors" else tp.__module__
    return (module, tp.__qualname__, args, str(exc))


def _unpack_error(packed: tuple[str, str, tuple[Any, ...], str]) -> BaseException:
    """The exception again, of its type where that can be made, else a `WorkflowError`."""
    module, qualname, args, text = packed
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, Exception):
            try:
                return obj(*args) if args else obj(text)  # type: ignore[no-any-return]
            except Exception:  # noqa: BLE001 - its __init__ takes other arguments than its args
                # Of its type all the same (an ``except Custom:`` in the body matches on
                # replay as at the first run), with its args and so its message, as
                # BaseException.__new__ makes it; what its own __init__ set is not kept.
                exc = obj.__new__(obj, *args)
                exc.args = args if args else (text,)
                return exc  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001,S110 - fall back to a description
        pass
    return WorkflowError(f"{module}.{qualname}: {text}")


def _describe(packed: tuple[str, str, tuple[Any, ...], str] | None) -> str:
    if packed is None:
        return ""
    module, qualname, _, text = packed
    name = qualname if module == "builtins" else f"{module}.{qualname}"
    return f"{name}: {text}" if text else name


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


def _timestamp(when: datetime.datetime | float | int, what: str = "a time") -> float:
    """`when` (a datetime, naive meaning UTC, or epoch seconds) as epoch seconds, checked
    as `_deadline` checks them."""
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)  # naive means UTC, as everywhere here
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, numbers.Real):
        raise TypeError(f"{what} takes a datetime or epoch seconds (an int or a float), not {when!r}")
    return _deadline(0.0, when, what)


#: The deadlines a timer may have: from year 1 to the end of year 9999 UTC (a datetime's range).
EARLIEST, LATEST = -62135596800.0, 253402300799.0


def _deadline(now: float, seconds: Any, what: str) -> float:
    """``now + seconds``, for a deadline that keys a timer: `seconds` must be a real
    number (not a bool, not a str) and the deadline finite and within a datetime's range.
    ZODB trap: a NaN key breaks a BTree's order (every comparison with it is False), so
    the timers tree could no longer find its other keys; and an infinite one failed later,
    in a log line, after the wait was journaled."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"{what} takes a number of seconds (an int or a float), not {seconds!r}")
    deadline = now + float(seconds)
    if not EARLIEST <= deadline <= LATEST:  # (False for NaN too)
        raise ValueError(f"{what}: {seconds!r} seconds is not a time a timer can be set to "
                         "(a finite number, between years 1 and 9999)")
    return deadline


# --- a run of a workflow ------------------------------------------------------------------------


_current: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("durable_heap_workflow", default=None)


class _Run:
    """One replay of a workflow body, from the top to its end or its next wait."""

    def __init__(self, heap: Any, wid: str, func: WorkflowFunction, entries: list[JournalEntry],
                 *, claim: tuple[float, str] | None, create: WorkflowRecord | None,
                 check: bool = False, promised: dict[str, Any] | None = None) -> None:
        self.heap = heap
        self.wid = wid
        self.func = func
        self.entries = entries  # the journal as known here, pending entries included
        self.committed = len(entries)  # entries of `entries` that are stored
        self.cursor = 0  # the next entry replay reads
        self.claim = claim  # the timer that woke it: removed by its first transaction
        self.create = create  # a record to store at the first transaction (a start outside one)
        self.created = False  # whether an attempt at that transaction stored `create` already
        self.check = check  # a deploy's read-only replay: stop at the first new thing
        # Promises seen resolved (name -> value) where the run's journal was read: a
        # resolved promise stays so, so `Promise.wait` needs no transaction of its own.
        self.promised = promised or {}
        # Steps replayed with other arguments than journaled (number from 0 -> the call
        # now): reported, not refused (the body may read state, which moves on); kept
        # in the record (`WorkflowRecord.replayed`) for inspection.
        self.changed: dict[int, str] = {}
        self.in_step = False
        self.step_task: Any = None  # the asyncio task running an async step
        self.is_async = inspect.iscoroutinefunction(func.func)
        self.code = code_hash(func.func)
        self._wfs: Any = None  # the workflows tree, as last read by `_begin`
        self.writing = False  # in one of the run's own transactions that end no step (`transact`)
        # Its wait is recorded and `_Suspend` raised (True; "said": `_gone_on` logged it).
        self.suspended: bool | str = False
        # Records the thread's watch held before the body ran (a caller's reads outside
        # a transaction): their changes are the caller's, not the body's (`_begin_hook`).
        self.outside = _watch.watched_records(heap.connection)

    # journal -----------------------------------------------------------------------

    def next(self, kind: str, name: str, detail: Any = None) -> JournalEntry | None:
        """The journal's entry for what the body does now (checked), or None when new."""
        if self.suspended:
            raise _gone_on(self)  # a body that caught its suspension goes no further
        if self.cursor < len(self.entries):
            entry = self.entries[self.cursor]
            if entry.kind != kind or entry.name != name:
                found = f"{kind} {name}" if name else kind
                msg = (
                    f"workflow {self.wid} ({self.func.label}) no longer matches its journal at "
                    f"step {self.cursor + 1}: the journal has {entry.label()!r} there, the code "
                    f"now does {found!r}. Deploy code that does the same up to the workflow's "
                    "wait (branch with durable_heap.patched('id') for new runs), or cancel it."
                )
                raise NonDeterminismError(msg, step=self.cursor + 1, expected=entry.label(), found=found)
            if kind == "step" and detail is not None and entry.detail != detail and not self.check:
                _log.warning("workflow %s step %d (%s): arguments changed on replay: %s, was %s",
                             self.wid, self.cursor + 1, name, detail, entry.detail)
                self.changed[self.cursor] = detail  # kept in the record by the next transaction
            self.cursor += 1
            return entry
        if self.check:
            raise _StopReplay
        return None

    def add(self, entry: JournalEntry) -> None:
        """Journal a new entry with the next transaction."""
        self.entries.append(entry)
        self.cursor += 1

    # transactions ---------------------------------------------------------------------

    def transact(self, work: Callable[[WorkflowRecord, Any, float], Any], note: str,
                 appended: int = 0) -> Any:
        """One transaction of this run: pending entries, `work`, the lease; `appended`:
        how many journal entries `work` adds."""
        heap = self.heap
        if self.suspended:
            raise _gone_on(self)

        def body() -> Any:  # (`_txn`'s, inlined: a step is on the hot path)
            conn = heap.connection
            now = _clock(heap)
            rec = self._begin(conn, now)
            result = work(rec, conn, now)
            if rec._p_changed or rec._p_jar is None:  # (`_end`'s test: most steps need not call it)
                self._end(rec, conn, now)
            return result

        writing, self.writing = self.writing, True
        try:
            result = heap._run(body, (), {}, note, heap.max_attempts)
        finally:
            self.writing = writing
        self.committed = len(self.entries) + appended
        self.claim = self.create = None
        return result

    def _begin(self, conn: Any, now: float) -> WorkflowRecord:
        """The start of each transaction of this run: checks that it still owns the
        workflow, removes the timer that woke it, writes the pending entries."""
        wfs = self._wfs
        # The same stored tree again (conn.root() costs a few µs a step); not one made in
        # a transaction that then aborted (a failed first step): ZODB took it back, and
        # one not committed yet has no jar.
        if wfs is None or wfs._p_jar is not conn:
            wfs = self._wfs = _tree(conn, WORKFLOWS_KEY)
        rec: WorkflowRecord | None = wfs.get(self.wid)
        if self.create is not None:
            if rec is not None:
                raise _Abandon  # started with the same id meanwhile, elsewhere
            # (the first attempt stores `create` itself; a later one a fresh copy: `_pristine`)
            rec = wfs[self.wid] = self.create if not self.created else _pristine(self.create)
            self.created = True
        elif rec is None or rec.status in _ENDED or (
                rec.journal.maxKey() + 1 if rec.journal else rec.length) != self.committed:  # journal_length
            raise _Abandon
        if self.claim is not None:
            timers = _tree(conn, TIMERS_KEY)
            if self.claim not in timers:
                raise _Abandon  # another scheduler fired it
            del timers[self.claim]
            if rec.timer == self.claim:
                rec.timer = None
        if rec.status == "waiting":
            rec.status, rec.waiting, rec.since = "running", None, now
        if rec.code != self.code:
            rec.code = self.code
        if not conn.__dict__.get("_dh_journal_format"):
            _mark_journal_format(conn)
        for n, entry in enumerate(self.entries[self.committed:], self.committed):
            rec.journal[n] = entry.stored()
        if self.changed:
            known = rec.replayed or {}
            if any(known.get(n) != d for n, d in self.changed.items()):
                rec.replayed = {**known, **self.changed}
        return rec

    def _end(self, rec: WorkflowRecord, conn: Any, now: float) -> None:
        """The end of each transaction of this run: the record's heartbeat, length and
        index entries when it is written anyway (a step writes only the journal, whose
        last entry says when: `last_seen`). A running workflow holds no timer: a runner
        that dies is found in the status index by a scheduler (`_timers._take_over`)."""
        if rec._p_changed or rec._p_jar is None:  # (a new record is never "changed")
            rec.heartbeat, rec.length = now, journal_length(rec)
            reindex(conn, rec)

    # what a body does -----------------------------------------------------------------

    def step(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             label: str | None = None) -> Any:
        name = label or func.__qualname__
        detail = _step_note(name, args, kwargs, func)
        # A new step (past the journal's end, in a run that may run it): `_journaled_step`
        # would find nothing, so it is not called.
        if self.in_step or self.cursor < len(self.entries) or self.check:
            entry = self._journaled_step(name, detail, "called")
            if entry is not None:
                value = entry.value
                return value if type(value) in _ATOM_TYPES else _fresh(value)
        if scheduler_stopping(self.heap):
            self.leave_for_later(detail)
        self.in_step = True
        try:
            value = self._run_step(func, name, detail, args, kwargs)
        finally:
            self.in_step = False
        return value if type(value) in _ATOM_TYPES else _fresh(value)

    def leave_for_later(self, detail: str) -> None:
        """Stop this run before its next step, for a scheduler to go on with (raises `_Abandon`).

        The scheduler running it is stopping (SIGTERM): a body with many long steps
        would otherwise hold the stop up until it waits or ends, past a service
        manager's patience (then SIGKILL, and a lease to wait out). The workflow
        stays running, with a run timer due now: the next scheduler (this worker
        restarted, or another) replays its journal and runs that step. Only between
        steps: a step in progress commits first.
        """
        number = len(self.entries) + 1

        def later(rec: WorkflowRecord, conn: Any, now: float) -> None:
            rec.timer = _add_timer(conn, now, TimerEntry("run", self.wid, created=now, origin="resume"))

        self.transact(later, f"workflow {self.wid}: left before step {number} (the scheduler stops)")
        _log.info("workflow %s (%s): the scheduler is stopping: left before step %d (%s), for the "
                  "next scheduler to go on with", self.wid, self.func.label, number, detail)
        raise _Abandon

    def _journaled_step(self, name: str, detail: str, verb: str) -> JournalEntry | None:
        """The journal's entry for the step about to run (its error re-raised), or None: run it.

        Concurrent steps are refused: they have no stable order to replay.
        """
        if self.in_step:
            raise WorkflowError(
                f"workflow {self.wid}: {name} was {verb} while another step runs (concurrent "
                "steps, e.g. asyncio.gather over actions, have no stable order to replay): "
                "await the steps one after the other"
            )
        entry = self.next("step", name, detail)
        if entry is not None and entry.error is not None:
            raise _unpack_error(entry.error)
        return entry

    def _run_step(self, func: Callable[..., Any], name: str, detail: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        failure: list[BaseException] = []
        number = len(self.entries) + 1
        made: list[tuple[Any, ...]] = []  # the entry of the attempt that committed (the last)
        module = getattr(func, "__module__", None) or ""
        binds = _binds(module)

        def work(rec: WorkflowRecord, conn: Any, now: float) -> Any:
            # The step's own copies of the plain lists and dicts it is given, at each attempt:
            # one that changed the body's would change what the body goes on with at the
            # first run and not at a replay (which runs no step), nor at a retried attempt.
            a = args if _ATOM_TYPES.issuperset(map(type, args)) else _fresh(args)  # (`_fresh`'s first case)
            kw = _fresh(kwargs) if kwargs else kwargs  # (**kw makes a new dict anyway)
            try:
                if not binds:  # (no `with _UNBOUND`: nullcontext's two calls, on the hot path)
                    value = func(*a, **kw)
                else:
                    with _bound(self.heap, module, True):  # one per attempt (a generator's)
                        value = func(*a, **kw)
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:
                failure.append(exc)
                raise
            stored = ("step", name, detail, value, None, now)  # (JournalEntry.stored)
            rec.journal[len(self.entries)] = stored
            made.append(stored)
            return value

        try:
            value = self.transact(work, f"workflow {self.wid} step {number}: {detail}", appended=1)
        except Exception as exc:
            if not failure or failure[-1] is not exc:  # the commit failed, not the step: nothing journaled
                what = f"the result of step {number} ({detail})"
                error = _unstorable(what, made[-1][3], exc) if made else None
                if error is None or isinstance(exc, DurableHeapError):
                    raise
                raise error from None
            self._journal_error(name, detail, number, exc)
            raise
        self.entries.append(JournalEntry(*made[-1]))
        self.cursor += 1
        return value

    async def astep(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """`step` for an ``async def`` action awaited in an ``async def`` workflow."""
        name = func.__qualname__
        detail = _step_note(name, args, kwargs, func)
        entry = self._journaled_step(name, detail, "started")
        if entry is not None:
            return _fresh(entry.value)
        if self.suspended:
            raise _gone_on(self)
        if scheduler_stopping(self.heap):
            self.leave_for_later(detail)
        heap = self.heap
        number = len(self.entries) + 1
        failure: list[BaseException] = []

        async def body() -> Any:
            conn = heap.connection
            now = _clock(heap)
            rec = self._begin(conn, now)
            try:
                with _bound(heap, getattr(func, "__module__", None) or "", True):
                    value = await func(*_fresh(args), **_fresh(kwargs))  # (as `_run_step`)
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:
                failure.append(exc)
                raise
            rec.journal[len(self.entries)] = ("step", name, detail, value, None, now)  # JournalEntry.stored
            self._end(rec, conn, now)
            return value

        self.in_step = True
        self.step_task = _engine._running_task()
        try:
            value = await heap._arun(body, (), {}, f"workflow {self.wid} step {number}: {detail}",
                                     heap.max_attempts)
        except Exception as exc:
            if not failure or failure[-1] is not exc:
                raise
            self.committed = len(self.entries)
            self.claim = self.create = None
            self._journal_error(name, detail, number, exc)
            raise
        finally:
            self.in_step = False
        self.committed = len(self.entries) + 1
        self.claim = self.create = None
        self.entries.append(JournalEntry("step", name, detail, value))
        self.cursor += 1
        return _fresh(value)

    def _journal_error(self, name: str, detail: str, number: int, exc: BaseException) -> None:
        packed = _pack_error(exc)
        if type(_unpack_error(packed)) is not type(exc):
            _log.warning(
                "workflow %s step %d (%s) raised %s, a class that cannot be found by its name "
                "%s.%s (defined in a function?): a replay raises WorkflowError in its place. Raise "
                "an exception class defined at module level.", self.wid, number, detail,
                type(exc).__name__, packed[0], packed[1])
        now = _clock(self.heap)

        def journal_error(rec: WorkflowRecord, conn: Any, at: float) -> None:
            rec.journal[len(self.entries)] = ("step", name, detail, None, packed, at)  # JournalEntry.stored

        self.transact(journal_error, f"workflow {self.wid} step {number} failed: {detail}", appended=1)
        self.entries.append(JournalEntry("step", name, detail, error=packed, at=now))
        self.cursor += 1

    def suspend(self, waiting: tuple[Any, ...], deadline: float | None) -> bool:
        """Record the wait (and its timer) and unwind; False when a promise was
        resolved meanwhile (then the body goes on)."""
        if self.check:
            raise _StopReplay  # a deploy's replay reached the workflow's wait
        def work(rec: WorkflowRecord, conn: Any, now: float) -> bool:
            if waiting[0] == "promise":
                promises = _tree(conn, PROMISES_KEY)
                prom = promises.get(waiting[1])
                if prom is None:
                    prom = promises[waiting[1]] = PromiseRecord(waiting[1])
                if prom.resolved:
                    return False
                if self.wid not in prom.waiters:
                    prom.waiters = (*prom.waiters, self.wid)
            _drop_timer(conn, rec)
            rec.status, rec.waiting, rec.since = "waiting", waiting, now
            if deadline is not None:
                rec.timer = _add_timer(conn, deadline, TimerEntry("run", self.wid, created=now,
                                                                  origin=waiting[0]))
            return True

        if self.transact(work, f"workflow {self.wid} waits: {waiting[0]} {waiting[1:]}"):
            self.suspended = True
            raise _Suspend
        return False

    def finish(self, status: str, result: Any = None,
               error: tuple[str, str, tuple[Any, ...], str] | None = None, reason: str = "") -> None:
        def work(rec: WorkflowRecord, conn: Any, now: float) -> None:
            _drop_timer(conn, rec)
            rec.status, rec.since, rec.waiting = status, now, None
            rec.result, rec.error, rec.reason = result, error, reason
            if status in _FINAL:
                rec.finished = now
                retain(conn, rec, now)

        self.transact(work, f"workflow {self.wid} {status}")


_SHORT = (int, float, bool, str, type(None))


def _step_note(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], func: Any) -> str:
    """A step's journaled call, ``put(3, 'a')``: `call_note`'s text (arguments shortened, and
    hidden where the action is marked with `durable_heap.redact`: the journal and the
    transaction's note are history too), built directly for a few short plain arguments."""
    if not kwargs and len(args) <= 4 and not hasattr(func, "__durable_redact__") and \
            not hasattr(getattr(func, "__wrapped__", None), "__durable_redact__"):
        parts = []
        for a in args:
            if type(a) not in _SHORT:
                break
            r = repr(a)
            if len(r) > 40:  # reprlib's limit (`_notes._note_repr`): shortened there
                break
            parts.append(r)
        else:
            return f"{name}({', '.join(parts)})"
    return call_note(name, args, kwargs, func)


def reindex(conn: Any, rec: WorkflowRecord) -> None:
    """Keep `rec`'s entries in the waiting index (WAITING_KEY) and the status index
    (STATUS_KEY) in step with its status."""
    listed = (rec.status, float(rec.created), rec.id)
    if rec.listed != listed:
        by_status = _status_index(conn)
        entry = listed[1:]
        olds = [rec.listed[0]] if rec.listed is not None else STATUSES  # (before the index: any)
        for status in olds:
            members = by_status.get(status)
            if members is not None and entry in members:
                del members[entry]
        members = by_status.get(rec.status)
        if members is None:
            members = by_status[rec.status] = OOBTree()
        members[entry] = True
        rec.listed = listed
    old = rec.indexed
    new = None
    if rec.status in ("waiting", "blocked"):
        new = (rec.function[0], rec.function[1], "!blocked" if rec.status == "blocked" else rec.code, rec.id)
    if old != new:
        tree = _tree(conn, WAITING_KEY)
        if old is not None and old in tree:
            del tree[old]
        if new is not None:
            tree[new] = True
        rec.indexed = new


def _status_index(conn: Any) -> Any:
    """STATUS_KEY's tree; made (in the transaction in progress) from every record when a
    heap from before it lacks it: once, then kept in step by `reindex`."""
    root = conn.root()
    tree = root.get(STATUS_KEY)
    if tree is None:
        tree = root[STATUS_KEY] = OOBTree()
        wfs = root.get(WORKFLOWS_KEY)
        for rec in wfs.values() if wfs is not None else ():
            members = tree.get(rec.status)
            if members is None:
                members = tree[rec.status] = OOBTree()
            members[(float(rec.created), rec.id)] = True
    return tree


def journal_length(rec: WorkflowRecord) -> int:
    """Entries in the workflow's journal (keys run from 0); a dropped journal: its last length."""
    journal = rec.journal
    return int(journal.maxKey()) + 1 if journal else rec.length


def last_seen(rec: WorkflowRecord) -> float:
    """When the workflow's runner last committed: the record's heartbeat or its last step."""
    journal = rec.journal
    if not journal:
        return float(rec.heartbeat)
    return max(float(rec.heartbeat), float(_entry(journal[journal.maxKey()]).at))


def _drop_timer(conn: Any, rec: WorkflowRecord) -> None:
    """Remove `rec`'s timer, and its place in the retention tree (a retried workflow)."""
    if rec.timer is not None:
        timers = _tree(conn, TIMERS_KEY)
        if rec.timer in timers:
            del timers[rec.timer]
        rec.timer = None
    if rec.retained is not None:
        kept = _tree(conn, RETENTION_KEY)
        if rec.retained in kept:
            del kept[rec.retained]
        rec.retained = None


def retain(conn: Any, rec: WorkflowRecord, now: float) -> None:
    """`rec` ended: its journal is dropped once its retention has passed (`drop_journal`,
    run by a scheduler), its status and result kept."""
    key = (float(now + rec.retention), rec.id)
    _tree(conn, RETENTION_KEY)[key] = True
    rec.retained = key


#: The third element of a retention key that lists a promise, not a workflow (see above).
PROMISE_KEPT = "promise"


def drop_promise(conn: Any, name: str, gone: str | None = None) -> None:
    """Drop the record of promise `name` if no workflow waits on it, workflow `gone`
    aside (one that ended: a wait that timed out stays listed among the waiters)."""
    promises = _peek(conn, PROMISES_KEY)
    prom = promises.get(name) if promises is not None else None
    if prom is None:
        return
    others = tuple(w for w in prom.waiters if w != gone)
    if not others:
        del promises[name]
    elif others != prom.waiters:
        prom.waiters = others


def drop_journal(rec: WorkflowRecord, conn: Any = None) -> None:
    """Drop the journal of `rec`, which ended more than its retention ago, and with it
    (given `conn`) the records of the promises its waits got (resolved, or timed out)
    that no workflow waits on now: each one's value is in the journal of whoever got
    it, so nothing reads the record again, and without this every promise a service
    ever made stayed in the heap for ever. A name used again later is a new promise."""
    if conn is not None:
        for name in {e.name for e in _read_journal(rec.journal) if e.kind == "got"}:
            drop_promise(conn, name, gone=rec.id)
    rec.length = journal_length(rec)
    rec.journal = Journal()  # the ended workflow keeps its status and result


def _require_run(what: str) -> _Run:
    run = _current.get()
    if run is None:
        raise WorkflowError(
            f"{what} works only in the body of a workflow (a function decorated with "
            "@heap.workflow or @durable_heap.workflow), which can wait without holding a "
            "process; here there is none"
        )
    if run.in_step:
        raise WorkflowError(
            f"{what} was called inside a step (an action called by the workflow {run.wid}): a "
            "step is one transaction and cannot wait; call it in the workflow's body instead"
        )
    return run


def code_hash(func: Callable[..., Any]) -> str:
    """A hash of a function's code: a deploy replays only workflows whose code changed."""
    code = getattr(func, "__code__", None)
    return _code_hash(code) if code is not None else ""


@functools.lru_cache(maxsize=4096)
def _code_hash(code: types.CodeType) -> str:
    import hashlib

    return hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]


class _StepScope(dict):  # type: ignore[type-arg]
    """The globals a program's workflow body runs with: its module's, live, except that
    each function of the program is a step (`_as_step`).

    CPython looks globals up with ``__getitem__`` when they are not an exact dict
    (LOAD_GLOBAL's slow path), so nothing is copied: the module's later changes show.
    """

    def __init__(self, module: types.ModuleType) -> None:
        super().__init__(__builtins__=module.__dict__.get("__builtins__", __builtins__))
        self.module = module
        self.steps: dict[str, tuple[Any, Any]] = {}

    def __getitem__(self, key: str) -> Any:
        value = self.module.__dict__[key]
        if (isinstance(value, types.FunctionType) and value.__module__ == self.module.__name__
                and key != "migrate" and not hasattr(value, "invoke_in")):
            known = self.steps.get(key)
            if known is None or known[0] is not value:
                known = self.steps[key] = (value, _as_step(value))
            return known[1]
        return value


_bodies: dict[Any, Callable[..., Any]] = {}


_UNBOUND = contextlib.nullcontext()  # stateless: one for every call


def _bound(heap: Any, module: str, save: bool) -> contextlib.AbstractContextManager[None]:
    """A program's durable module globals bound around a workflow body (`save` False) or
    a step, timer action or subscriber (`save`: in its transaction), as around a call."""
    if not _binds(module):
        return _UNBOUND
    assert globals_binder is not None
    return globals_binder(heap, module.partition(".")[0], save)


def _binds(module: str) -> bool:
    """Whether `_bound` binds anything for a function of `module` (a program's)."""
    # (the module's __dict__, not getattr: a missing attribute raises and catches inside)
    return globals_binder is not None and getattr(sys.modules.get(module.partition(".")[0]), "__dict__",
                                                  {}).get("__durable_source__") is not None


def _program_body(func: Callable[..., Any]) -> Callable[..., Any]:
    """In a program, every module-level function called from a workflow is a step.

    The body runs with `_StepScope` globals (the module itself is left as it
    is). A program's module carries ``__durable_source__`` (set by the version
    layer).
    """
    module = sys.modules.get(getattr(func, "__module__", ""))
    if module is None or getattr(module, "__durable_source__", None) is None or not isinstance(
            func, types.FunctionType):
        return func
    body = _bodies.get(func)
    if body is None:
        body = types.FunctionType(func.__code__, _StepScope(module), func.__name__, func.__defaults__,
                                  func.__closure__)
        body.__kwdefaults__ = func.__kwdefaults__
        if len(_bodies) > 1000:
            _bodies.clear()
        _bodies[func] = body
    return body


def _as_step(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        run = _current.get()
        if run is None or run.in_step:
            return func(*args, **kwargs)
        return run.step(func, args, kwargs)
    return step


def _call_body(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with _bound(run.heap, getattr(run.func.func, "__module__", None) or "", False):
        return _call_body_bound(run, args, kwargs)


def _call_body_bound(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    func = _program_body(run.func.func)
    if func is run.func.func:
        return _call_body_in(run, func, args, kwargs)
    try:  # a program's body
        result = _call_body_in(run, func, args, kwargs)
    except BaseException:
        _refuse_rebound(func, refuse=not run.check)  # (a deploy's read-only replay refuses nothing)
        raise
    _refuse_rebound(func, refuse=not run.check)
    return result


def _call_body_in(run: _Run, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not run.is_async:
        return func(*args, **kwargs)
    if _engine._running_task() is None:
        return _engine._asyncio().run(func(*args, **kwargs))
    # Inside a running event loop: only a read-only replay (`replay`, a deploy's check)
    # gets here (a run is a task of that loop, `_in_task`), and a deploy is synchronous:
    # the body gets a loop of its own, in a thread, with this context (the run) copied in.
    box: list[Any] = []
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box.append((True, ctx.run(_engine._asyncio().run, func(*args, **kwargs))))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append((False, exc))

    t = threading.Thread(target=target, name=f"durable_heap workflow {run.wid}")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _execute(heap: Any, wid: str, *, claim: tuple[float, str] | None = None,
             create: WorkflowRecord | None = None, known: tuple[Any, ...] | None = None) -> None:
    """Run workflow `wid` from the top until it ends or waits (outside any transaction).

    `known`: what `_known` read of it in the scheduler's transaction that found it due.
    An ``async def`` body asked to run inside a running event loop runs as a task of
    that loop instead (`_in_task`): this returns at once.
    """
    prepared = _prepare(heap, wid, claim, create, known)
    if prepared is None:
        return
    run, args, kwargs = prepared
    if run.is_async and _engine._running_task() is not None:
        _in_task(run, args, kwargs)
        return
    token = _current.set(run)
    try:
        with heap.activate():
            try:
                result = _call_body(run, args, kwargs)
            except BaseException as exc:  # noqa: BLE001 - sorted out by _settle (re-raised there)
                _settle(run, exc)
                return
            _settle_done(run, result)
    except _Abandon:
        return
    finally:
        _current.reset(token)


async def _aexecute(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`_execute` in a task of the caller's event loop: the body awaited in it."""
    token = _current.set(run)
    try:
        with run.heap.activate():
            try:
                with _bound(run.heap, getattr(run.func.func, "__module__", None) or "", False):
                    body = _program_body(run.func.func)
                    try:
                        result = await body(*args, **kwargs)
                    finally:
                        if body is not run.func.func:
                            _refuse_rebound(body)
            except BaseException as exc:  # noqa: BLE001 - sorted out by _settle (re-raised there)
                _settle(run, exc)
                return
            _settle_done(run, result)
    except _Abandon:
        return
    finally:
        _current.reset(token)


def _in_task(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run an ``async def`` body as a task of the running loop (`Workflow` awaits it).

    A workflow not yet stored (started outside a transaction) is first stored with
    a start timer, in a transaction of its own, as one started inside a transaction
    is: if the task never gets to run (the loop stops, the process dies), a
    scheduler runs it. The task's first transaction removes that timer.
    """
    heap = run.heap
    if run.create is not None:
        first, run.create = run.create, None
        tried = [False]  # an attempt stored `first` already

        def store(conn: Any) -> tuple[float, str]:
            wfs = _tree(conn, WORKFLOWS_KEY)
            if run.wid in wfs:
                raise _Abandon  # started with the same id meanwhile, elsewhere
            # A retried attempt stores a fresh copy (`_pristine`: the ZODB trap of a
            # new record filled in by an attempt that then aborted).
            record = _pristine(first) if tried[0] else first
            tried[0] = True
            wfs[run.wid] = record
            now = _clock(heap)
            start = TimerEntry("run", run.wid, created=now, origin="start")
            key = record.timer = _add_timer(conn, now, start)
            reindex(conn, record)
            return key

        try:
            run.claim = tuple(_txn(heap, store, f"workflow {run.wid}: start"))  # type: ignore[assignment]
        except _Abandon:
            return
        starting.add(run.claim)
    task = _engine._asyncio().get_running_loop().create_task(_aexecute(run, args, kwargs))
    _tasks[run.wid] = task
    claim = run.claim

    def done(_: Any) -> None:
        _tasks.pop(run.wid, None)
        if claim is not None:
            starting.discard(claim)
    task.add_done_callback(done)


#: The tasks running async workflow bodies in this process, by workflow id (`Workflow.__await__`).
_tasks: dict[str, Any] = {}


def _prepare(heap: Any, wid: str, claim: tuple[float, str] | None, create: WorkflowRecord | None,
             known: tuple[Any, ...] | None) -> tuple[_Run, tuple[Any, ...], dict[str, Any]] | None:
    """The run of `wid` about to start (its record read unless given), or None: nothing to run."""
    promised: dict[str, Any] = {}
    if create is not None:
        rec_args, rec_kwargs, function, entries = create.args, create.kwargs, create.function, []
    elif known is not None:
        rec_args, rec_kwargs, function, entries, promised = known
    else:
        def read(conn: Any) -> Any:
            wfs = _peek(conn, WORKFLOWS_KEY)
            rec = wfs.get(wid) if wfs is not None else None
            if rec is None or rec.status in _FINAL or rec.status == "blocked":
                return None
            return _known(conn, rec)
        found = _txn(heap, read, f"workflow {wid}: read")
        if found is None:
            return None
        rec_args, rec_kwargs, function, entries, promised = found
    try:
        wf = find(function)
        if not isinstance(wf, WorkflowFunction):
            raise WorkflowError(f"{function[0]}.{function[1]} is no longer a workflow")
    except WorkflowError as exc:
        if create is None:
            _block(heap, wid, str(exc), claim)
        raise
    run = _Run(heap, wid, wf, entries, claim=claim, create=create, promised=promised)
    # The body's own copies of the plain lists and dicts among its arguments: one that
    # changed them would change the record cached here, unseen (records are not watched),
    # and a later replay in this process would start from other arguments than stored.
    return run, _fresh(rec_args), _fresh(rec_kwargs)


def _gone_on(run: _Run) -> _Suspend:
    """The suspension again, for `run`'s body that went on after its wait was recorded,
    having caught the suspension (``except BaseException:`` or a bare ``except:`` around
    the wait): each step, wait or end it reaches raises it again, so nothing it does is
    kept, and the workflow waits, as recorded (said once in the log)."""
    if run.suspended != "said":
        run.suspended = "said"
        _log.warning(
            "workflow %s (%s): its body caught the suspension of its wait (an `except "
            "BaseException:` or a bare `except:` around it) and went on; nothing it did after "
            "was kept, and the workflow waits. Catch Exception instead.", run.wid, run.func.label)
    return _Suspend()


def _settle(run: _Run, exc: BaseException) -> None:
    """What the body's exception makes of the workflow: waiting, blocked or failed (or
    re-raised: the heap's trouble, or not an Exception)."""
    if isinstance(exc, (_Suspend, _Abandon)):
        return
    if run.suspended and isinstance(exc, Exception):
        _gone_on(run)
        return
    if isinstance(exc, NonDeterminismError):
        run.finish("blocked", reason=str(exc))
        _log.error("%s", exc)
        return
    if isinstance(exc, (ConflictError, StorageError)):
        raise exc  # the heap's trouble, not the workflow's: it stays running, its lease brings it back
    if isinstance(exc, (NoTransactionError, _Rebound, transaction.interfaces.NoTransaction)):
        if isinstance(exc, _Rebound):
            changed = f"rebound the durable global {exc.args[0]}"
        elif not isinstance(exc, NoTransactionError):  # ZODB's own: a raw persistent.Persistent
            changed = "changed a persistent object (ZODB refused it: no transaction)"
        else:
            changed = "changed " + _global_path(run, str(exc).split(" was changed", 1)[0])
        msg = (
            f"the workflow {run.func.label} {changed} in its body, outside a step: a "
            "change there would be made again at every replay. Move it into an action "
            "(@heap.action) that the workflow calls: each call is a step, run once."
        )
        run.finish("failed", error=("durable_heap", "WorkflowError", (msg,), msg))
        return
    if isinstance(exc, Exception):  # the workflow failed: kept in its record
        run.finish("failed", error=_pack_error(exc))
        return
    raise exc


class _Rebound(Exception):  # noqa: N818 - internal: becomes the workflow's WorkflowError
    """A program's workflow body rebound a module global (``global count; count = 1``)."""


def _global_path(run: _Run, path: str) -> str:
    """`path` (a changed object's, from `NoTransactionError`) named by the program's
    durable global it is under: the globals' own record is not reachable from state,
    so its path reads ``<Dict oid 0x7>['hits']``."""
    if path.startswith("<") and "]" in path and "['" in path:
        name = path.partition("['")[2].partition("']")[0]
        module = sys.modules.get(getattr(run.func.func, "__module__", ""))
        if name and module is not None and name in module.__dict__:
            return f"the durable global {name}{path.partition(']')[2]}"
    return path


def _refuse_rebound(body: Callable[..., Any], *, refuse: bool = True) -> None:
    """Raise `_Rebound` if the program's workflow body `body` rebound a module global.

    Its globals are a `_StepScope`, read through ``__getitem__`` from the module, but
    STORE_GLOBAL writes into the dict itself: a rebinding lands there, is seen by no
    one and saved nowhere. Emptied (also when not `refuse`), so that the next run
    starts clean."""
    scope = body.__globals__
    if isinstance(scope, _StepScope) and len(scope) > 1:  # (its one own key: __builtins__)
        names = sorted(k for k in scope if k != "__builtins__")
        for k in names:
            del scope[k]
        if refuse:
            raise _Rebound(", ".join(names))


def _settle_done(run: _Run, result: Any) -> None:
    if run.suspended:
        _gone_on(run)
        return
    try:
        run.finish("done", result)
    except (_Abandon, _Suspend):
        return
    except NoTransactionError as exc:  # the body changed state after its last step (`_begin_hook`)
        _settle(run, exc)
        return
    except Exception as exc:  # noqa: BLE001 - re-raised unless its result cannot be stored
        error = _unstorable(f"the result of the workflow {run.func.label}", result, exc)
        if error is None:
            raise
        # (`run.create` is kept: a start outside a transaction whose first transaction was
        # this one stored nothing, and the failed record is created here instead.)
        run.finish("failed", error=_pack_error(error))


def _unstorable(what: str, result: Any, exc: Exception) -> Exception | None:
    """The error for a commit that failed with `exc` because `result` (`what`: a
    workflow's or a step's result) cannot be stored, or None when the result is not what
    failed. ZODB trap: the record is pickled at commit, and a value that does not pickle
    fails there with pickle's bare TypeError or PicklingError (no `NotPersistableError`:
    the library's records are not watched)."""
    if isinstance(exc, DurableHeapError):
        return exc
    return _refusal(what, result)


def _refusal(what: str, value: Any) -> Exception | None:
    """The `NotPersistableError` naming the part of `value` (given to `what`) that cannot
    be stored, or None when the search finds none."""
    from ._kinds import BadValue
    from ._storable import public_error, refuse_or_accept

    try:
        refuse_or_accept(value)  # names the part that fails (`[0]['cb']`)
    except BadValue as bad:
        return public_error(bad, None, base=what)
    except Exception:  # noqa: BLE001 - the search failed: then the caller's own error says it
        return None
    return None


def storable(what: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
    """Refuse at the call a value that cannot be stored (`NotPersistableError` naming
    `what` it was given to). ZODB trap: the record holding it is pickled only at
    commit, where a lambda fails with pickle's bare TypeError, naming nothing; inside
    a caller's transaction, in the caller's commit. Plain atoms pass at once; other
    values are trial-pickled as the heap's snapshots are, durable objects as references
    (nothing of theirs is touched)."""
    values = [v for v in (chain(args, kwargs.values()) if kwargs else args) if type(v) not in _ATOMIC]
    if not values:
        return
    try:
        _TrialPickler(io.BytesIO(), protocol=3).dump(values)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the caller's value
        from ._errors import NotPersistableError

        for value in values:
            error = _refusal(what, value)
            if error is not None:
                raise error from None
        raise NotPersistableError(what, values[0], f"pickling failed: {exc}") from None


class _TrialPickler(_NotingPickler):
    """`storable`'s pickler: the heap's snapshot pickling, with durable objects
    as bare references (no promotion of inline values, no adoption)."""

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle protocol
        return 1 if isinstance(obj, Persistent) and not isinstance(obj, type) else None


def _known(conn: Any, rec: WorkflowRecord) -> tuple[Any, ...]:
    """What a run of `rec` starts from: (args, kwargs, function, journal, promised),
    promised: the value of the promise it waits on, if resolved (read here, in the
    same transaction, so that the wake needs no read of its own)."""
    promised: dict[str, Any] = {}
    if rec.waiting and rec.waiting[0] == "promise":
        promises = _peek(conn, PROMISES_KEY)
        prom = promises.get(rec.waiting[1]) if promises is not None else None
        if prom is not None and prom.resolved:
            promised[prom.name] = prom.value
    return rec.args, rec.kwargs, rec.function, _read_journal(rec.journal), promised


def _block(heap: Any, wid: str, reason: str, claim: tuple[float, str] | None) -> None:
    def work(conn: Any) -> None:
        rec = _tree(conn, WORKFLOWS_KEY).get(wid)
        if rec is None or rec.status in _FINAL:
            return
        if claim is not None:
            timers = _tree(conn, TIMERS_KEY)
            if claim in timers:
                del timers[claim]
            if rec.timer == claim:
                rec.timer = None
        _drop_timer(conn, rec)
        rec.status, rec.reason, rec.since = "blocked", reason, _clock(heap)
        reindex(conn, rec)
    _txn(heap, work, f"workflow {wid} blocked")


# --- starting: in a transaction (after its commit) or inline --------------------------------------


class _After(threading.local):
    """Per thread: the workflows started in the transaction, run once it commits."""

    starts: list[tuple[Any, str, Any]] | None = None


_after = _After()


def _after_commit(heap: Any) -> None:
    """The engine's hook: workflows started in the transaction just committed run now."""
    if getattr(_added, "flag", False):
        _added.flag = False
        wake = getattr(heap, "_wf_wake", None)
        if wake is not None:
            wake.set()
    pending = getattr(_after, "starts", None)
    if not pending:
        return
    mine = [p for p in pending if p[0] is heap]
    if not mine:
        return
    _after.starts = [p for p in pending if p[0] is not heap]
    for _, wid, key in mine:
        try:
            _execute(heap, wid, claim=key)
        except Exception:  # noqa: BLE001 - the starting transaction committed: never fail it now
            # The workflow keeps its start timer: a scheduler runs it.
            _log.exception("workflow %s could not run after its start committed", wid)
        finally:
            if wid not in _tasks:  # (a task's end lets its timer go)
                starting.discard(key)


#: Start timers this process runs itself, right after their transaction commits (or in
#: a task of an event loop): its own scheduler leaves them alone (a scheduler thread
#: would otherwise race the starting thread for them). Another process's may take one.
starting: set[tuple[float, str]] = set()


_engine.after_commit.append(_after_commit)


class WorkflowFunction:
    """What ``@heap.workflow`` makes: call it (or `start`) to start a workflow."""

    def __init__(self, func: Callable[..., Any], heap: Any = None, *,
                 retention: float | None = None) -> None:
        self.func = func
        self.heap = heap  # None: the active heap at each call (``@durable_heap.workflow``)
        # A workflow defined in a function (a closure) is found by its name in this
        # process only, like one of a plain script: fine for tests, not for timers.
        self.name = (func.__module__, func.__qualname__)
        self.label = func.__qualname__
        self.retention = retention
        functools.update_wrapper(self, func)  # type: ignore[arg-type]
        _named[self.name] = self

    def __repr__(self) -> str:
        return f"<durable_heap workflow {self.name[0]}.{self.name[1]}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Workflow:
        return self.start(*args, **kwargs)

    def start(self, *args: Any, workflow_id: str | None = None, **kwargs: Any) -> Workflow:
        """Start the workflow, or return the one with `workflow_id` if it exists.

        Outside a transaction it runs at once until it ends or first waits;
        inside one it is recorded there and runs right after that transaction
        commits (and, if this process dies first, in a scheduler).
        """
        heap: Any = self.heap if self.heap is not None else _engine.active_heap()
        run = _current.get()
        if run is not None and not run.in_step:
            raise WorkflowError(
                f"{self.label} was started in the body of the workflow {run.wid}: start it "
                "from an action that the workflow calls (a step), so that it starts once"
            )
        check_call(self.func, self.label, args, kwargs)
        storable(f"the arguments of the workflow {self.label}", args, kwargs)
        wid = workflow_id or _uuid.uuid4().hex
        retention = self.retention if self.retention is not None else float(heap.retention)
        now = _clock(heap)
        # Its own copies of the caller's plain lists and dicts: the record is pickled at
        # its commit, and one the caller changes after the start (in the same transaction,
        # or later, in memory) would make the record here differ from the one stored.
        record = WorkflowRecord(wid, self.name, _fresh(args), _fresh(kwargs), now, retention)
        if heap.in_transaction:
            conn = heap.connection
            wfs = _tree(conn, WORKFLOWS_KEY)
            if wid in wfs:
                return Workflow(heap, wid)
            wfs[wid] = record
            key = record.timer = _add_timer(conn, now, TimerEntry("run", wid, created=now, origin="start"))
            reindex(conn, record)
            txn = heap.transaction_manager.get()
            starting.add(key)

            def queue(ok: bool) -> None:
                if not ok:
                    starting.discard(key)
                if ok:
                    starts = getattr(_after, "starts", None)
                    if starts is None:
                        starts = _after.starts = []
                    starts.append((heap, wid, key))

            txn.addAfterCommitHook(queue)
            return Workflow(heap, wid)
        if workflow_id is not None:
            exists = _txn(heap, lambda conn: wid in (_peek(conn, WORKFLOWS_KEY) or ()),
                          f"workflow {wid}: look up")
            if exists:
                return Workflow(heap, wid)
        _execute(heap, wid, create=record)
        return Workflow(heap, wid)


def workflow(func: Callable[..., Any] | None = None, /, *, retention: float | None = None) -> Any:
    """``@durable_heap.workflow``: a workflow of the active heap (a program's, under the runtime)."""
    def decorate(f: Callable[..., Any]) -> WorkflowFunction:
        return WorkflowFunction(f, None, retention=retention)
    return decorate(func) if func is not None else decorate


# --- steps: the engine's action hooks -------------------------------------------------------------


def _call_action(heap: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 run: Callable[[], Any]) -> Any:
    current = _current.get()
    if current is None or current.in_step or current.heap is not heap:
        return run()
    if current.check:
        return current.step(func, args, kwargs)  # replays it, or stops at it
    return current.step(func, args, kwargs)


async def _call_async_action(heap: Any, func: Callable[..., Any], args: tuple[Any, ...],
                             kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
    current = _current.get()
    if current is None or current.heap is not heap:
        return await run()
    if current.in_step:
        if current.step_task is _engine._running_task():
            return await run()  # called by the step itself: part of its transaction
        raise WorkflowError(
            f"workflow {current.wid}: {func.__qualname__} was started while another step runs "
            "(concurrent steps, e.g. asyncio.gather over actions, have no stable order to "
            "replay): await the steps one after the other"
        )
    return await current.astep(func, args, kwargs)


_engine.call_action = _call_action
_engine.call_async_action = _call_async_action


def _begin_hook(heap: Any, conn: Any) -> Callable[[], None] | None:
    """The engine's `begin` hook: a workflow body changes no state outside its steps.

    Durable objects refuse a change made outside a transaction at once
    (`_watch.check_writable`); a plain object (a dataclass) held in a record
    cannot, and the watch would save it with the next transaction of the thread,
    which in a body is the run's next step or its end: a change that every replay
    would make again. So before each transaction begins in a body, such a change
    is found, dropped and refused (`_watch.changed_outside`: the body, or the
    finish, raises `NoTransactionError`, which `_settle` makes the workflow's
    error). And a transaction the body opens itself (``with heap.transaction()``,
    outside a step) may read, but a change in it is refused at its commit.
    """
    run = _current.get()
    if run is None or run.heap is not heap:
        return None
    thread_conn = heap._local.conn  # a task's transaction runs on a connection of its own
    for c in (conn, thread_conn) if thread_conn is not conn and thread_conn is not None else (conn,):
        path = _watch.changed_outside(c, run.outside)
        if path is not None:
            raise NoTransactionError(
                f"{path} was changed in the body of the workflow {run.func.label}, outside a "
                "step (the change was dropped). Move it into an action that the workflow calls."
            )
    if run.in_step or run.writing or run.check:
        return None
    return functools.partial(_refuse_body_changes, run, conn)


def _refuse_body_changes(run: _Run, conn: Any) -> None:
    """Before the commit of a transaction a workflow body opened itself: refuse a change."""
    path = _watch.changed_path(conn)
    if path is not None:
        raise NoTransactionError(
            f"{path} was changed in a transaction of the body of the workflow {run.func.label}, "
            "outside a step (nothing was committed). Move the change into an action that the "
            "workflow calls."
        )


_engine.begin = _begin_hook


def _in_transaction(heap: Any, what: str, func: Callable[[Any], Any]) -> Any:
    """`func(conn)` joining the caller's transaction, or as its own; in a workflow body, a step."""
    run = _current.get()
    if run is not None and not run.in_step and run.heap is heap:
        return run.step(lambda: func(heap.connection), (), {}, label=what)
    return _txn(heap, func, what)


def _warn_if_main(name: tuple[str, str], what: str) -> None:
    if name[0] == "__main__":
        _log.warning(
            "%s: %s is defined in a plain script (__main__): only a scheduler in this process "
            "can find it by name; another process's scheduler keeps it as a dead letter. Define "
            "it in a module or program that the worker loads.", what, name[1])


def _declare(heap: Any, what: Any) -> None:
    """Remember a cron id or a (topic, name) subscription declared in the transaction in
    progress: a deploy's check drops those of the program it did not see (`_declared_in`)."""
    if not heap.in_transaction:
        return
    txn = heap.transaction_manager.get()
    mark = getattr(heap, "_wf_declared", None)
    if not mark or mark[0] is not txn:
        fresh: set[Any] = set()
        mark = heap._wf_declared = (txn, fresh)
    mark[1].add(what)


def _read_then_write(heap: Any, what: str, func: Callable[[Any], Any]) -> Any:
    """Like `_in_transaction`, but outside a transaction a declaration already made commits nothing."""
    if heap.in_transaction or _current.get() is not None:
        return _in_transaction(heap, what, func)
    return _txn(heap, func, what)  # an unchanged declaration changes nothing: an empty commit


# --- waits and journaled values ------------------------------------------------------------------


def sleep(seconds: float) -> Any:
    """Wait `seconds` in a workflow, durably: across restarts, holding no process."""
    run = _require_run("durable_heap.sleep")
    entry = run.next("sleep", "")
    if entry is None:
        deadline = _deadline(_clock(run.heap), seconds, "durable_heap.sleep")
        run.add(JournalEntry("sleep", "", deadline, at=_clock(run.heap)))
    else:
        deadline = entry.detail
    if _clock(run.heap) < deadline:
        run.suspend(("sleep", deadline), deadline)
    return _Done(None) if run.is_async else None


class Promise:
    """A named value that another call resolves (`resolve`), waited on by workflows::

        reply = durable_heap.promise("reply:ann")   # in a workflow body
        answer = reply.wait(timeout=86400)          # PromiseTimeout after a day
    """

    def __init__(self, name: str, heap: Any = None) -> None:
        if not isinstance(name, str) or not name:
            raise WorkflowError(f"a promise is named by a non-empty str, not {name!r}")
        self.name = name
        self._heap = heap

    def __repr__(self) -> str:
        return f"<durable_heap.Promise {self.name!r}>"

    def wait(self, timeout: float | None = None) -> Any:
        """Its value, once resolved; `PromiseTimeout` after `timeout` seconds (None: never)."""
        run = _require_run("Promise.wait")
        entry = run.next("wait", self.name)
        now = _clock(run.heap)
        if entry is None:
            deadline = None if timeout is None else _deadline(now, timeout, "Promise.wait's timeout")
            run.add(JournalEntry("wait", self.name, deadline, at=now))
        else:
            deadline = entry.detail
        while True:
            got = run.next("got", self.name)
            if got is None:
                got = self._outcome(run, deadline)
                if got is None:
                    if run.suspend(("promise", self.name, deadline), deadline):
                        continue  # not reached: suspend raises
                    continue  # resolved meanwhile: look again
                run.add(got)
            if got.error is not None:
                raise PromiseTimeout(
                    f"the promise {self.name!r} was not resolved within its timeout "
                    f"(deadline {_utc(got.detail).isoformat()})"
                )
            value = _fresh(got.value)
            return _Done(value) if run.is_async else value

    def _outcome(self, run: _Run, deadline: float | None) -> JournalEntry | None:
        now = _clock(run.heap)
        if self.name in run.promised:  # read with the journal (a wake by its resolve)
            return JournalEntry("got", self.name, deadline, run.promised[self.name], at=now)

        def read(conn: Any) -> Any:
            promises = _peek(conn, PROMISES_KEY)
            prom = promises.get(self.name) if promises is not None else None
            return (prom.resolved, prom.value) if prom is not None else (False, None)

        resolved, value = _txn(run.heap, read, f"promise {self.name}: read")
        if resolved:
            return JournalEntry("got", self.name, deadline, value, at=now)
        if deadline is not None and now >= deadline:
            return JournalEntry("got", self.name, deadline, error=("durable_heap", "PromiseTimeout", (), ""),
                                at=now)
        return None

    def resolve(self, value: Any = None) -> bool:
        return resolve(self.name, value)


def promise(name: str) -> Promise:
    """A named promise; in a workflow, `wait` on it; elsewhere `resolve` it."""
    return Promise(name)


def resolve(name: str, value: Any = None) -> bool:
    """Resolve the promise `name` with `value`; True if this call did (the first resolve wins).

    A resolve before the wait is kept. The waiting workflow's wake is queued in
    this transaction (its own outside one) and runs in a scheduler.
    """
    if not isinstance(name, str) or not name:  # (as `Promise`: the promises tree is keyed by str)
        raise WorkflowError(f"a promise is named by a non-empty str, not {name!r}")
    storable(f"the value resolving the promise {name!r}", (value,))
    run = _current.get()
    heap = run.heap if run is not None else _engine.active_heap()

    def work(conn: Any) -> bool:
        _prefetch_front(conn)
        promises = _tree(conn, PROMISES_KEY)
        prom = promises.get(name)
        if prom is None:
            prom = promises[name] = PromiseRecord(name)
        if prom.resolved:
            return False
        now = _clock(heap)
        prom.resolved, prom.value, prom.at = True, _fresh(value), now  # its own copy (as a start's arguments)
        if not prom.waiters:  # kept for a wait to come, for the heap's retention (then dropped)
            _tree(conn, RETENTION_KEY)[(float(now + heap.retention), name, PROMISE_KEPT)] = True
        wfs = _peek(conn, WORKFLOWS_KEY)
        for wid in prom.waiters:
            rec = wfs.get(wid) if wfs is not None else None
            if rec is not None and rec.status == "waiting" and (rec.waiting or ())[:2] == ("promise", name):
                _drop_timer(conn, rec)
                wake = TimerEntry("run", wid, created=now, origin=f"promise {name}")
                rec.timer = _add_timer(conn, now, wake)
                _hand_over(heap, rec, {name: value})
        prom.waiters = ()
        return True

    return bool(_in_transaction(heap, f"resolve {name}", work))


def _prefetch_front(conn: Any) -> None:
    """Over ZEO (a storage that prefetches): ask for the timers' first bucket, where a
    wake due now lands, while the promise and the waiting record load (one round trip
    less for a resolve). The tree's state names its first bucket without loading it."""
    if not _prefetches(conn):
        return
    timers = _peek(conn, TIMERS_KEY)
    if timers is not None:
        state = timers.__getstate__()  # ((children and keys), first bucket); one inline bucket: 1-tuple
        if state is not None and len(state) == 2:
            conn.prefetch(state[1])


def _prefetches(conn: Any) -> bool:
    """Whether `conn`'s storage loads ahead when asked (ZEO, RelStorage; not FileStorage)."""
    return hasattr(conn.db().storage, "prefetch")


#: Journal entries beyond which a wake is not handed over (`_hand_over`): the scheduler reads it.
HAND_OVER_ENTRIES = 256


def _hand_over(heap: Any, rec: WorkflowRecord, promised: dict[str, Any]) -> None:
    """Hand the wake just queued for `rec` straight to this process's scheduler, with
    what it would read again to run it (its journal, the promise's value), once this
    transaction commits: the scheduler skips its transaction that finds the timer due.

    Only while a scheduler runs in this process (`run_scheduler`), and only
    immutable builtin values (`_frozen`): a persistent object belongs to this
    thread's connection (the scheduler's thread must load it from its own), and a
    list or dict would be shared between the two threads. The timer stays the wake's
    durable record: the wake's first transaction removes it (or finds it gone, fired
    by another scheduler, and stops), as for a timer the scheduler found itself.
    """
    handed = getattr(heap, "_wf_handed", None)
    if handed is None or not heap._wf_schedulers:
        return
    if journal_length(rec) > HAND_OVER_ENTRIES:
        return
    entries = _read_journal(rec.journal)
    if not (_frozen(rec.args) and _frozen(tuple(rec.kwargs.values())) and _frozen(tuple(promised.values()))
            and all(_frozen((e.detail, e.value, e.error)) for e in entries)):
        return
    item = (rec.id, rec.timer, (rec.args, rec.kwargs, rec.function, entries, promised))

    def hand(ok: bool) -> None:
        if ok:
            handed.append(item)  # (the engine's after-commit hook then rings the scheduler)
    heap.transaction_manager.get().addAfterCommitHook(hand)


_ATOMS = (str, int, float, bool, bytes, complex, type(None), datetime.datetime, datetime.date,
          datetime.timedelta)
_ATOM_TYPES = frozenset(_ATOMS)  # (what `_fresh` returns as they are, looked up in one step)


#: func -> `signature_of` it. Weak: a function defined per call (a closure, a version's
#: function replaced by a deploy) is not kept alive by having been checked.
_signatures: weakref.WeakKeyDictionary[Any, tuple[inspect.Signature, int] | None] = (
    weakref.WeakKeyDictionary())


def signature_of(func: Callable[..., Any]) -> tuple[inspect.Signature, int] | None:
    """`func`'s signature and its arity: the number of its parameters when each is a plain
    positional one without a default (exactly that many positional arguments bind),
    else -1; None when `inspect` can read none (a builtin). Cached per function."""
    try:
        return _signatures[func]
    except (KeyError, TypeError):  # (TypeError: not weakly referable, worked out afresh)
        pass
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        known = None
    else:
        plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                    for p in sig.parameters.values())
        known = (sig, len(sig.parameters) if plain else -1)
    with contextlib.suppress(TypeError):
        _signatures[func] = known
    return known


def check_call(func: Callable[..., Any], label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise TypeError, as calling `func` would, when `args` and `kwargs` do not bind to it.

    For what runs later (a workflow's body, a timer's action): bound when it is
    started or scheduled, so that a wrong call fails at the call, stores nothing,
    and does not become a failed workflow or a dead letter later.
    """
    known = signature_of(func)
    if known is None or (not kwargs and len(args) == known[1]):
        return  # (the common case: as many positional arguments as plain parameters)
    sig = known[0]
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        shown = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                            return_annotation=sig.empty)
        name = getattr(func, "__name__", label)
        raise TypeError(f"{name}{shown}: {exc}; nothing was started or scheduled") from None


def _fresh(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """`value` with its plain lists, dicts, sets and bytearrays copied (nested in tuples
    too, aliasing kept), for a workflow body: what a step returned, or a promise's
    value, is kept in the journal, and a body that changes what it got would change the
    journal's copy cached in this process, so a later replay here would read the
    changed value and take another path than the first run. Other objects (atoms, the
    heap's own containers, a user's instances) are handed over as they are."""
    tp = type(value)
    if tp in _ATOMS or not (tp is list or tp is dict or tp is set or tp is tuple or tp is bytearray):
        return value
    if tp is tuple and _ATOM_TYPES.issuperset(map(type, value)):
        return value  # the common case (a call's arguments: atoms), at C speed
    if tp is dict and not value:
        return {}  # (a call's keyword arguments, most often)
    if memo is None:
        memo = {}
    done = memo.get(id(value))
    if done is not None:
        return done
    out: Any
    if tp is list:
        out = memo[id(value)] = []
        out.extend(_fresh(v, memo) for v in value)
    elif tp is dict:
        out = memo[id(value)] = {}
        for k, v in value.items():
            out[k] = _fresh(v, memo)
    elif tp is set:
        out = memo[id(value)] = set(value)  # its items are hashable: not plain mutables
    elif tp is bytearray:
        out = memo[id(value)] = bytearray(value)
    else:
        items = tuple(_fresh(v, memo) for v in value)
        out = value if all(a is b for a, b in zip(items, value, strict=True)) else items
        memo[id(value)] = out
    return out


def _frozen(value: Any, depth: int = 0) -> bool:
    """True for builtin immutable atoms and tuples (frozensets) of them: nothing of a
    connection, nothing another thread could change."""
    tp = type(value)
    if tp in _ATOMS:
        return True
    if (tp is tuple or tp is frozenset) and depth < 8:
        return all(_frozen(v, depth + 1) for v in value)
    return False


def emit(topic: str, payload: Any = None) -> int:
    """Deliver `payload` to each subscriber of `topic` (`on`), once each; returns how many.

    One delivery per subscriber is written in this transaction (its own outside
    one); the subscribers run in a scheduler.
    """
    if not isinstance(topic, str) or not topic:  # (as `on`: the subscriptions tree is keyed by str)
        raise WorkflowError(f"an event's topic is a non-empty str, not {topic!r}")
    storable(f"the payload of the event {topic!r}", (payload,))
    run = _current.get()
    heap = run.heap if run is not None else _engine.active_heap()

    def work(conn: Any) -> int:
        subs = _peek(conn, SUBSCRIPTIONS_KEY)
        names = subs.get(topic, ()) if subs is not None else ()
        now = _clock(heap)
        for name in names:
            delivery = TimerEntry("call", name, (_fresh(payload),), created=now, origin=f"event {topic}")
            _add_timer(conn, now, delivery)
        return len(names)

    return int(_in_transaction(heap, f"emit {topic}", work))


def _journaled(kind: str, make: Callable[[], Any]) -> Any:
    run = _current.get()
    if run is None or run.in_step:
        return make()
    entry = run.next(kind, "")
    if entry is None:
        entry = JournalEntry(kind, "", value=make())
        run.add(entry)
    return entry.value


def now() -> datetime.datetime:
    """The time (UTC); in a workflow body, journaled: a replay sees the same."""
    run = _current.get()
    heap = run.heap if run is not None else None
    if heap is None:
        try:
            heap = _engine.active_heap()
        except DurableHeapError:
            heap = None
    ts = _journaled("now", lambda: _clock(heap) if heap is not None else time.time())
    return _utc(ts)


def uuid4() -> _uuid.UUID:
    """A random UUID; in a workflow body, journaled."""
    return _uuid.UUID(_journaled("uuid", lambda: _uuid.uuid4().hex))


def random() -> float:
    """A random float in [0, 1); in a workflow body, journaled."""
    return float(_journaled("random", _random.random))


def patched(patch_id: str) -> bool:
    """True where new code may take its new branch: False only while a workflow
    started under old code replays a part of its journal that ran without it."""
    run = _require_run("durable_heap.patched")
    if run.cursor < len(run.entries):
        entry = run.entries[run.cursor]
        if entry.kind == "patched" and entry.name == patch_id:
            run.cursor += 1
            return bool(entry.value)
        return False  # replaying history made before this code: the old branch
    if run.check:
        raise _StopReplay
    run.add(JournalEntry("patched", patch_id, value=True))
    return True


def step_key() -> str:
    """A stable idempotency key for the external effect of the step running now."""
    run = _current.get()
    if run is None or not run.in_step:
        raise WorkflowError(
            "durable_heap.step_key() works only inside a step (an action called from a "
            "workflow's body): it names that step, the same at every retry"
        )
    return f"{run.wid}:{len(run.entries) + 1}"


def on(topic: str) -> Callable[[Callable[..., Any]], Any]:
    """``@durable_heap.on(topic)``: subscribe a function of the active heap's program."""
    def decorate(func: Callable[..., Any]) -> Any:
        heap: Any = _engine.active_heap()
        return heap.on(topic)(func)
    return decorate


# --- handles ---------------------------------------------------------------------------------------


class Workflow:
    """A handle on one workflow; every property reads the heap again.

    It can be stored (a step's result, an argument, a value in state): by its id,
    and loaded back as a handle on the active heap. So an action that starts a child
    workflow may return the child's handle, as a step of its parent.
    """

    def __init__(self, heap: Any, wid: str) -> None:
        self._heap = heap
        self.id = wid

    @property
    def heap(self) -> Any:
        """Its heap: for a handle loaded from a heap, the active one at each use."""
        return self._heap if self._heap is not None else _engine.active_heap()

    def __repr__(self) -> str:
        return f"<durable_heap.Workflow {self.id} {self.status}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workflow) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("durable_heap.Workflow", self.id))

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_stored_handle, (self.id,))  # by id: a handle holds its (unstorable) heap

    def __copy__(self) -> Workflow:
        return self  # (immutable: a copy, as `_fresh` makes of a step's result, keeps the heap)

    def __deepcopy__(self, memo: dict[int, Any]) -> Workflow:
        return self

    def __await__(self) -> Any:
        """``await handle``: until the run of an ``async def`` body started from this
        event loop (a task of it) has ended or first waits; the handle."""
        task = _tasks.get(self.id)
        if task is not None:
            yield from _engine._asyncio().shield(task).__await__()
        return self

    def _read(self, func: Callable[[WorkflowRecord], Any]) -> Any:
        def read(conn: Any) -> Any:
            wfs = _peek(conn, WORKFLOWS_KEY)
            rec = wfs.get(self.id) if wfs is not None else None
            if rec is None:
                raise WorkflowError(f"there is no workflow {self.id!r} in the heap {self.heap.target}")
            return func(rec)
        return _txn(self.heap, read, f"workflow {self.id}: read")

    @property
    def status(self) -> str:
        """"running", "waiting", "done", "failed", "blocked" or "cancelled"."""
        return str(self._read(lambda rec: rec.status))

    @property
    def info(self) -> dict[str, Any]:
        """Everything known: status, since when, what it waits on, why blocked, its journal."""
        lease = self.heap.lease

        def describe(rec: WorkflowRecord) -> dict[str, Any]:
            stuck = rec.status == "running" and last_seen(rec) + lease < _clock(self.heap)
            return {
                "id": rec.id,
                "function": f"{rec.function[0]}.{rec.function[1]}",
                "status": rec.status,
                "since": _utc(rec.since),
                "stuck": stuck,  # running, but its runner has not been seen for a lease
                "waiting_on": _waiting(rec),
                "reason": rec.reason,
                "error": _describe(rec.error),
                "result": _fresh(rec.result) if rec.status == "done" else None,
                "steps": max(rec.length, journal_length(rec)),
                "journal": [
                    {"number": n + 1, "kind": e.kind, "name": e.name, "detail": e.detail,
                     "error": _describe(e.error), "replayed": (rec.replayed or {}).get(n)}
                    for n, e in zip(rec.journal.keys(), _read_journal(rec.journal), strict=True)
                ],
            }
        return self._read(describe)  # type: ignore[no-any-return]

    @property
    def waiting_on(self) -> dict[str, Any] | None:
        """What it waits on: ``{"sleep": until}`` or ``{"promise": name, "until": ...}`` (with
        ``"resolved"``: when, once the promise is resolved and the wake queued); else None."""
        return self._read(_waiting)  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        """Its result once done (waiting up to `timeout` seconds); raises what it raised."""
        task = _tasks.get(self.id)
        if task is not None and not task.done() and _engine._running_task() is not None:
            raise WorkflowError(
                f"the workflow {self.id} runs as a task of this event loop, which result() "
                "would block: await the handle first (await handle), then call result()"
            )
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            status, result, error, reason = self._read(lambda r: (r.status, r.result, r.error, r.reason))
            if status == "done":
                return _fresh(result)  # the caller's copy: not the record cached here
            if status == "failed" and error is not None:
                raise _unpack_error(error)
            if status == "cancelled":
                raise WorkflowError(f"the workflow {self.id} was cancelled")
            if status == "blocked":
                raise WorkflowError(f"the workflow {self.id} is blocked: {reason}")
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"the workflow {self.id} is still {status} after {timeout} s")
            time.sleep(0.005)

    def cancel(self) -> bool:
        """Cancel it unless it has finished; True if this call did."""
        def work(conn: Any) -> bool:
            rec = _tree(conn, WORKFLOWS_KEY).get(self.id)
            if rec is None or rec.status in _FINAL:
                return False
            _drop_timer(conn, rec)
            now = _clock(self.heap)
            rec.status, rec.since, rec.finished, rec.waiting = "cancelled", now, now, None
            retain(conn, rec, now)
            reindex(conn, rec)
            return True
        return bool(_in_transaction(self.heap, f"cancel workflow {self.id}", work))

    def retry(self) -> bool:
        """Run a blocked (or failed) workflow again from its journal: queued for a scheduler."""
        def work(conn: Any) -> bool:
            rec = _tree(conn, WORKFLOWS_KEY).get(self.id)
            if rec is None or rec.status not in ("blocked", "failed"):
                return False
            now = _clock(self.heap)
            if rec.status == "failed":
                rec.result, rec.error, rec.finished = None, None, None
            _drop_timer(conn, rec)
            rec.status, rec.since, rec.reason = "waiting", now, ""
            rec.waiting = ("retry", now)
            rec.timer = _add_timer(conn, now, TimerEntry("run", self.id, created=now, origin="retry"))
            reindex(conn, rec)
            return True
        return bool(_in_transaction(self.heap, f"retry workflow {self.id}", work))


def _stored_handle(wid: str) -> Workflow:
    """A `Workflow` handle loaded from a heap (stored by `Workflow.__reduce__`). Its path is
    stored in records: never move it (`durable_heap._format.INLINE_CLASSES`)."""
    return Workflow(None, wid)


def _handle_from_json(wid: Any) -> Workflow:
    if not isinstance(wid, str) or not wid:
        raise ValueError(f"a workflow id is a non-empty string, not {wid!r}")
    return Workflow(None, wid)


# In the tagged JSON of `durable-heap export`/`import` and of serve's answers: ``{"$workflow": id}``.
_jsonform.register_tag(Workflow, "$workflow", lambda handle: handle.id, _handle_from_json)


def _waiting(rec: WorkflowRecord) -> dict[str, Any] | None:
    """What `rec` waits on, for people: a promise resolved meanwhile says so and when
    (``"resolved"``): its wake is queued, for a scheduler to run. Without that, a
    workflow whose promise was resolved while no scheduler runs looked unanswered."""
    waiting = rec.waiting
    if not waiting:
        return None
    if waiting[0] == "sleep":
        return {"sleep": _utc(waiting[1])}
    if waiting[0] == "promise":
        out = {"promise": waiting[1], "until": None if waiting[2] is None else _utc(waiting[2])}
        promises = _peek(rec._p_jar, PROMISES_KEY) if rec._p_jar is not None else None
        prom = promises.get(waiting[1]) if promises is not None else None
        if prom is not None and prom.resolved:
            out["resolved"] = None if prom.at is None else _utc(prom.at)
        return out
    return {waiting[0]: _utc(waiting[1])}


def _listed(conn: Any, status: str | None) -> list[tuple[float, str]]:
    """(created, id) of the workflows (of `status`), oldest first: from the status index,
    reading no record (a heap from before it, not yet written to: every record)."""
    by_status = _peek(conn, STATUS_KEY)
    if by_status is None:
        wfs = _peek(conn, WORKFLOWS_KEY)
        if wfs is None:
            return []
        return sorted((rec.created, wid) for wid, rec in wfs.items()
                      if status is None or rec.status == status)
    if status is not None:
        return list(by_status.get(status, {}).keys())  # sorted: (created, id)
    return sorted(entry for members in by_status.values() for entry in members.keys())


def summaries(heap: Any, status: str | None = None) -> list[dict[str, Any]]:
    """What `durable-heap workflows` lists of each workflow (of `status`), in one
    transaction: its record only, not its journal."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")

    def read(conn: Any) -> list[dict[str, Any]]:
        wfs = _peek(conn, WORKFLOWS_KEY)
        now = _clock(heap)
        out = []
        for _, wid in _listed(conn, status):
            rec = wfs.get(wid) if wfs is not None else None
            if rec is not None:
                out.append({
                    "id": rec.id, "function": f"{rec.function[0]}.{rec.function[1]}",
                    "status": rec.status, "since": _utc(rec.since),
                    "stuck": rec.status == "running" and last_seen(rec) + heap.lease < now,
                    "waiting_on": _waiting(rec),
                    # what the listing prints for a blocked or failed one
                    "reason": rec.reason, "error": _describe(rec.error),
                })
        return out
    return _txn(heap, read, "durable_heap: list workflows")  # type: ignore[no-any-return]


def deploy_check(heap: Any, program: str, *, force: bool) -> None:
    """The deploy's check, in its transaction, after the new code's top level ran.

    * Each waiting workflow of `program` whose function's code changed (and each
      blocked one) is replayed, read-only, against the new code up to its wait.
      A mismatch refuses the deploy (`DeployError` listing the workflows and the
      first mismatching step) unless `force`, which marks them blocked with the
      reason; a blocked one that matches again is queued to run.
    * Timers, crons and subscriptions that name a function the new code no
      longer defines refuse the deploy too (forced: they fail as they fire and
      end as dead letters, visible in `timers`).
    * Crons of `program` that the new top level did not declare are dropped.
    """
    from ._errors import DeployError

    conn = heap.connection
    prefix = program + "."

    def ours(module: str) -> bool:
        return module == program or module.startswith(prefix)

    problems: list[str] = []
    wfs = _peek(conn, WORKFLOWS_KEY)
    index = _peek(conn, WAITING_KEY)
    for group in list(_groups(index, ours, program)) if index is not None and wfs is not None else ():
        if group[2] != "!blocked":
            try:
                wf = find(group[:2])
            except WorkflowError:
                wf = None
            if isinstance(wf, WorkflowFunction) and code_hash(wf.func) == group[2]:
                continue  # its code did not change: none of these is read
        for key in list(index.keys(min=(*group, ""), max=(*group, _TOP))):
            rec = wfs.get(key[3])
            if rec is None or rec.status not in ("waiting", "blocked"):
                del index[key]  # stale
                continue
            reason = _replay_check(heap, rec)
            if reason:
                problems.append(f"workflow {rec.id} ({rec.function[1]}): {reason}")
                if force and rec.status != "blocked":
                    _drop_timer(conn, rec)
                    rec.status, rec.reason, rec.since = "blocked", reason, _clock(heap)
                    reindex(conn, rec)
            elif rec.status == "blocked":
                now = _clock(heap)
                rec.status, rec.reason, rec.since, rec.waiting = "waiting", "", now, ("retry", now)
                rec.timer = _add_timer(conn, now, TimerEntry("run", rec.id, created=now, origin="deploy"))
                reindex(conn, rec)
    crons = _peek(conn, CRONS_KEY)
    declared = _declared_in(heap)
    for cid, cron in list(crons.items()) if crons is not None else ():
        if ours(cron.action[0]) and cid not in declared:
            timers = _tree(conn, TIMERS_KEY)
            if cron.key in timers:
                del timers[cron.key]
            del crons[cid]  # the new code no longer declares it
    subs = _peek(conn, SUBSCRIPTIONS_KEY)
    for topic, names in list(subs.items()) if subs is not None else ():
        kept = tuple(n for n in names if not ours(n[0]) or (topic, n) in declared)
        if kept != names:  # subscribers the new code no longer declares
            if kept:
                subs[topic] = kept
            else:
                del subs[topic]
    missing = _missing_targets(conn, ours)
    if problems and not force:
        listed = "; ".join(problems)
        raise DeployError(
            f"deploy of {program} refused: waiting workflows no longer match the new code: "
            f"{listed}. Keep the code up to their waits as it was (branch with "
            "durable_heap.patched('id') for new runs), cancel them, or deploy with force "
            "(--force) to mark them blocked (retried at each later deploy); nothing was committed"
        )
    if missing and not force:
        raise DeployError(
            f"deploy of {program} refused: {'; '.join(missing)} name functions the new code "
            "no longer defines. Keep those functions, cancel the timers (durable-heap timers), "
            "or deploy with force (--force): they then fail as they fire and are kept as dead "
            "letters; nothing was committed"
        )


_TOP = "\U0010ffff" * 4  # sorts after every id and name


def _groups(index: Any, ours: Callable[[str], bool], program: str) -> Any:
    """The (module, qualname, code) groups of `program`'s entries in the waiting index:
    one ``minKey`` per group (keys sort by module, and a program's modules are together)."""
    low: tuple[str, ...] = (program,)
    while True:
        try:
            key = index.minKey(low)
        except ValueError:
            return
        if not ours(key[0]):
            return
        yield key[:3]
        low = (key[0], key[1], key[2], _TOP)


def _declared_in(heap: Any) -> set[Any]:
    """The crons and subscriptions declared in the transaction in progress (a deploy's top level)."""
    mark = getattr(heap, "_wf_declared", None)
    try:
        txn = heap.transaction_manager.get()
    except transaction.interfaces.NoTransaction:
        return set()
    if not mark or mark[0] is not txn:
        return set()
    return set(mark[1])


def _defined(module: str, qualname: str) -> bool:
    obj: Any = sys.modules.get(module)
    if obj is None:
        return False
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def _missing_targets(conn: Any, ours: Callable[[str], bool]) -> list[str]:
    missing: list[str] = []
    timers = _peek(conn, TIMERS_KEY)
    for key, entry in timers.items() if timers is not None else ():
        if entry.kind == "call" and ours(entry.target[0]) and not _defined(*entry.target):
            missing.append(f"timer {key[1]} ({entry.target[1]}, due {_utc(key[0]).isoformat()})")
    crons = _peek(conn, CRONS_KEY)
    for cid, cron in crons.items() if crons is not None else ():
        if ours(cron.action[0]) and not _defined(*cron.action):
            missing.append(f"cron {cid!r}")
    subs = _peek(conn, SUBSCRIPTIONS_KEY)
    for topic, names in subs.items() if subs is not None else ():
        for name in names:
            if ours(name[0]) and not _defined(*name):
                missing.append(f"the subscription of {name[1]} to {topic!r}")
    return missing


def replay(heap: Any, wid: str) -> Any:
    """Replay workflow `wid` from its journal, read-only, running nothing: its result.

    For a finished workflow whose journal is kept (see `DEFAULT_RETENTION`):
    what the body returns when every step, wait and value is read back. A
    journal that ends before the body does raises `WorkflowError`.
    """
    def read(conn: Any) -> Any:
        wfs = _peek(conn, WORKFLOWS_KEY)
        rec = wfs.get(wid) if wfs is not None else None
        if rec is None:
            raise WorkflowError(f"there is no workflow {wid!r} in the heap {heap.target}")
        wf = find(rec.function)
        run = _Run(heap, wid, wf, _read_journal(rec.journal), claim=None, create=None, check=True)
        token = _current.set(run)
        try:
            result = _call_body(run, _fresh(rec.args), _fresh(rec.kwargs))
        except (_StopReplay, _Suspend):
            raise WorkflowError(
                f"the journal of workflow {wid} ends at entry {run.cursor} before its body does"
            ) from None
        finally:
            _current.reset(token)
        path = _watch.changed_path(conn)
        if path is not None:
            raise WorkflowError(
                f"replaying workflow {wid}: its body changed {path} outside a step (a replay "
                "changes nothing: the change was dropped). Move it into an action."
            )
        raise _Replayed(result)  # out of the transaction, which it aborts: a replay keeps nothing

    try:
        # (`_txn`, not `read_transaction`: a transaction the body opens joins this one.)
        _txn(heap, read, f"workflow {wid}: replay")
    except _Replayed as done:
        return done.result
    raise AssertionError("unreachable: the replay's transaction ends in _Replayed or an error")


class _Replayed(Exception):  # noqa: N818 - internal control flow
    """Carries a replay's result out of its transaction, aborting it (`replay`)."""

    def __init__(self, result: Any) -> None:
        super().__init__("replayed")
        self.result = result


def _replay_check(heap: Any, rec: WorkflowRecord) -> str:
    """Replay `rec`'s journal against the code now loaded, running nothing; '' if it matches."""
    try:
        wf = find(rec.function)
    except WorkflowError as exc:
        return str(exc)
    if not isinstance(wf, WorkflowFunction):
        return f"{rec.function[1]} is no longer a workflow"
    run = _Run(heap, rec.id, wf, _read_journal(rec.journal), claim=None, create=None, check=True)
    token = _current.set(run)
    try:
        _call_body(run, _fresh(rec.args), _fresh(rec.kwargs))
    except (_StopReplay, _Suspend):
        pass
    except NonDeterminismError as exc:
        return f"step {exc.step}: the journal has {exc.expected!r}, the new code does {exc.found!r}"
    except Exception as exc:  # noqa: BLE001 - replay under the new code failed: that is the finding
        if run.cursor < len(run.entries):
            return f"the new code raised {_describe(_pack_error(exc))} while replaying step {run.cursor + 1}"
    finally:
        _current.reset(token)
    if run.cursor < len(run.entries):
        return (f"the new code ended after step {run.cursor} of {len(run.entries)} journaled "
                "(it no longer reaches the workflow's wait)")
    return ""


Binder = Callable[[Any, str, bool], contextlib.AbstractContextManager[None]]


def set_globals_binder(func: Binder | None) -> None:
    """Register the version layer's binding of a program's durable globals (see `_bound`)."""
    global globals_binder
    globals_binder = func


def set_resolver(func: Callable[[str, str], Any] | None) -> None:
    """Register the version layer's lookup of a program's functions by name."""
    global resolver
    resolver = func
