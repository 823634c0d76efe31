"""Durable execution's timers and scheduler: timers on actions, crons, firing, the heap's methods.

Above `_workflows` in the same layer (it imports `_workflows`, never the other
way): `_workflows` keeps the stored records (`TimerEntry` and `CronEntry`
among them: their class paths are the on-disk format) and what a workflow does;
here are what fires them:

* ``action.invoke_in / invoke_at / cron`` (`_on_action`, the engine's hook that
  gives each action its timers), and the `Timer` handle;
* the scheduler: `_fire_one` takes one due timer of the tree (keyed by
  (deadline, seq)) and removes it in the transaction that runs its action, or
  hands a workflow's wake to `_workflows._execute` (whose first transaction
  removes it); a failing action is retried with backoff (`_failed`), then kept
  as a dead letter;
* `WorkflowMethods`, the heap's mixin: ``run_due``, ``run_scheduler`` (woken by
  commits of this process, `_workflows._after_commit`, and over ZEO by other
  processes' commits, `_ring_on_invalidation`), ``timers``, and the workflow
  methods of `_workflows` (``workflow``, ``on``, ``workflows``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import itertools
import logging
import random as _random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import transaction.interfaces

from . import _cron
from . import _heap as _engine
from ._errors import ConflictError, DurableHeapError, StorageError, WorkflowError
from ._retry import call_note
from ._workflows import (
    _FINAL,
    CRONS_KEY,
    DEAD_KEY,
    DEFAULT_LEASE,
    DEFAULT_RETENTION,
    RETENTION_KEY,
    STATUS_KEY,
    STATUSES,
    SUBSCRIPTIONS_KEY,
    TIMER_ATTEMPTS,
    TIMERS_KEY,
    WORKFLOWS_KEY,
    CronEntry,
    TimerEntry,
    Workflow,
    WorkflowFunction,
    _add_timer,
    _bound,
    _clock,
    _current,
    _deadline,
    _declare,
    _describe,
    _execute,
    _fresh,
    _in_transaction,
    _known,
    _listed,
    _named,
    _pack_error,
    _peek,
    _read_then_write,
    _seq,
    _timestamp,
    _tree,
    _txn,
    _utc,
    _warn_if_main,
    check_call,
    drop_journal,
    drop_promise,
    find,
    last_seen,
    name_of,
    reindex,
    scheduler_stopping,
    starting,
    storable,
)
from ._zeo import trusting_pushed

__all__ = ["Timer", "WorkflowMethods"]

_log = logging.getLogger("durable_heap.workflows")


# --- timers on actions -----------------------------------------------------------------------------


def _on_action(heap: Any, func: Callable[..., Any], wrapper: Any) -> None:
    """Give each action its timers (`invoke_in`, `invoke_at`, `cron`), and a name."""
    try:
        name: tuple[str, str] | None = name_of(func, "a timer")
    except WorkflowError:
        name = None  # a closure: fine as an action, refused as a timer's
    if name is not None:
        _named[name] = wrapper
    wrapper.invoke_in = functools.partial(_invoke_in, heap, func)
    wrapper.invoke_at = functools.partial(_invoke_at, heap, func)
    wrapper.cron = functools.partial(_cron_of, heap, func)


_engine.on_action.append(_on_action)


def _invoke_in(heap: Any, func: Callable[..., Any], seconds: float, /, *args: Any, **kwargs: Any) -> Timer:
    """``action.invoke_in(seconds, *args)``: call the action then, in a scheduler."""
    what = f"{getattr(func, '__qualname__', 'the action')}.invoke_in"
    return _call_timer(heap, func, "invoke_in", _deadline(_clock(heap), seconds, what), args, kwargs)


def _invoke_at(heap: Any, func: Callable[..., Any], when: datetime.datetime | float, /,
               *args: Any, **kwargs: Any) -> Timer:
    """``action.invoke_at(when, *args)``: call the action at `when` (a datetime, naive
    meaning UTC, or a timestamp)."""
    return _call_timer(heap, func, "invoke_at", when, args, kwargs)


def _call_timer(heap: Any, func: Callable[..., Any], method: str, when: datetime.datetime | float,
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> Timer:
    """A timer calling `func` (its errors name the `method` the user called)."""
    name = name_of(func, f"{getattr(func, '__qualname__', 'the action')}.{method}")
    _warn_if_main(name, "a timer")
    check_call(func, name[1], args, kwargs)
    storable(f"the arguments of the timer for {name[1]}", args, kwargs)
    args, kwargs = _fresh(args), _fresh(kwargs)  # its own: the caller may change them later
    deadline = _timestamp(when, f"{name[1]}.{method}")
    seq = _seq()

    def add(conn: Any) -> tuple[float, str]:
        return _add_timer(conn, deadline, TimerEntry("call", name, args, kwargs, created=_clock(heap),
                                                     origin="invoke"), seq)

    key = _in_transaction(heap, f"timer {name[1]} at {_utc(deadline).isoformat()}", add)
    return Timer(heap, tuple(key))


def _cron_of(heap: Any, func: Callable[..., Any], spec: str, /, *args: Any, tz: str | None = None,
             id: str | None = None, missed: str = "once", **kwargs: Any) -> Timer:  # noqa: A002
    """``action.cron(spec, *args, tz=None, id=None, missed="once")``: call it at each tick."""
    name = name_of(func, f"{getattr(func, '__qualname__', 'the action')}.cron")
    _warn_if_main(name, "a cron")
    _cron.check(spec, tz, missed)
    check_call(func, name[1], args, kwargs)
    storable(f"the arguments of the cron for {name[1]}", args, kwargs)
    cid = id or f"{name[0]}.{name[1]} {spec} {call_note('', args, kwargs)}" + (f" {tz}" if tz else "")
    entry = CronEntry(name, spec, _fresh(args), _fresh(kwargs), tz, missed)  # (as `_call_timer`)

    def declare(conn: Any) -> tuple[float, str] | None:
        crons = _peek(conn, CRONS_KEY)
        old = crons.get(cid) if crons is not None else None
        if old is not None and old.same(entry) and old.key is not None:
            # declared already (a top level runs at every load)
            return tuple(old.key)  # type: ignore[return-value]
        crons = _tree(conn, CRONS_KEY)
        if old is not None and old.key is not None:
            timers = _tree(conn, TIMERS_KEY)
            if old.key in timers:
                del timers[old.key]
        now = _clock(heap)
        entry.key = _add_timer(conn, _cron.next_tick(spec, tz, now), TimerEntry("cron", cid, created=now,
                                                                               origin="cron"))
        crons[cid] = entry
        return entry.key

    key = _read_then_write(heap, f"cron {cid}", declare)
    _declare(heap, cid)
    return Timer(heap, tuple(key), cron=cid)


# --- handles -----------------------------------------------------------------------------------------


class Timer:
    """A handle on one timer (`id`, `due`); `cancel()`; for a dead letter `retry()`."""

    def __init__(self, heap: Any, key: tuple[float, str], *, cron: str | None = None,
                 entry: TimerEntry | None = None, dead: bool = False) -> None:
        self.heap = heap
        self.key = key
        self.id = cron or key[1]
        self.due = _utc(key[0])
        self.cron = cron
        self.dead = dead
        self.kind = entry.kind if entry is not None else ("cron" if cron else "call")
        self.target = entry.target if entry is not None else None
        self.attempts = entry.attempts if entry is not None else 0
        self.error = entry.error if entry is not None else ""
        self.origin = entry.origin if entry is not None else ""

    def __repr__(self) -> str:
        what = "dead letter" if self.dead else f"due {self.due.isoformat()}"
        return f"<durable_heap.Timer {self.id} {self.kind} {self.target!r} {what}>"

    def cancel(self) -> bool:
        """Remove the timer (a cron: the cron; a dead letter: drop it); True if it was there."""
        def work(conn: Any) -> bool:
            if self.dead:
                dead = _tree(conn, DEAD_KEY)
                if self.key[1] in dead:
                    del dead[self.key[1]]
                    return True
                return False
            timers = _tree(conn, TIMERS_KEY)
            if self.cron is not None:
                crons = _tree(conn, CRONS_KEY)
                entry = crons.get(self.cron)
                if entry is None:
                    return False
                if entry.key in timers:
                    del timers[entry.key]
                del crons[self.cron]
                return True
            for key in _keys_of(timers, self.key):
                del timers[key]
                return True
            kept = _peek(conn, RETENTION_KEY)
            if self.kind == "prune" and kept is not None and self.key in kept:
                del kept[self.key]  # the journal is kept, then
                rec = _tree(conn, WORKFLOWS_KEY).get(self.key[1])
                if rec is not None and rec.retained == self.key:
                    rec.retained = None
                return True
            return False
        return bool(_in_transaction(self.heap, f"cancel timer {self.id}", work))

    def retry(self) -> bool:
        """Queue a dead letter again, due now, with its attempts reset."""
        def work(conn: Any) -> bool:
            dead = _tree(conn, DEAD_KEY)
            entry = dead.get(self.key[1])
            if entry is None:
                return False
            del dead[self.key[1]]
            entry.attempts, entry.error = 0, ""
            _add_timer(conn, _clock(self.heap), entry, self.key[1])
            return True
        return bool(_in_transaction(self.heap, f"retry timer {self.id}", work))


def _keys_of(timers: Any, key: tuple[float, str]) -> list[tuple[float, str]]:
    """The timer's key: where it was made, or where a retry moved it (same seq)."""
    if key in timers:
        return [key]
    return [k for k in timers.keys() if k[1] == key[1]][:1]


# --- the scheduler ---------------------------------------------------------------------------------


class _ActionFailed(Exception):  # noqa: N818 - internal: aborts the firing transaction
    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _due_key(conn: Any, now: float) -> tuple[float, str] | None:
    """One due timer: picked at random among the first few, so that several
    schedulers mostly take different ones instead of conflicting."""
    timers = _peek(conn, TIMERS_KEY)
    if not timers:  # a BTree's truth is O(1); its len() walks every bucket
        return None
    first = timers.minKey()
    if first[0] > now:
        return None
    keys = []
    for n, key in enumerate(timers.keys(max=(now, "\uffff"))):
        if key not in starting:  # this process runs those itself
            keys.append(key)
        if len(keys) >= 8 or n >= 64:
            break
    return tuple(_random.choice(keys)) if keys else None  # type: ignore[return-value]


def _fire_one(heap: Any) -> int | None:
    """Fire one due timer: None when nothing is due, else how many items ran (0 or 1)."""
    state: dict[str, Any] = {}

    def fire(conn: Any) -> Any:
        state.clear()
        rung, heap._wf_rung = heap._wf_rung, None
        if rung:  # over ZEO: the records of the commit that rang, loaded in parallel
            conn.prefetch(rung)  # (unless `_ring_on_invalidation` asked for them already)
        now = _clock(heap)
        key = _due_key(conn, now)
        if key is None:
            state["key"] = (now, "retention")
            return _prune_due(conn, now) or None
        timers = _tree(conn, TIMERS_KEY)
        entry = timers[key]
        state["key"], state["entry"] = key, entry
        if entry.kind == "run":
            rec = _tree(conn, WORKFLOWS_KEY).get(entry.target)
            if rec is None or rec.status in _FINAL or rec.status == "blocked" or rec.timer != key:
                del timers[key]  # stale
                return 0
            if rec.status == "running" and entry.origin == "lease" and last_seen(rec) + heap.lease > now:
                # A lease timer of a heap written before leases were read from the status
                # index (`_take_over`): its runner is alive, the index covers it from now on.
                del timers[key]
                rec.timer = None
                reindex(conn, rec)  # (makes the index, from every record, on a heap without it)
                return 0
            state["run"] = entry.target
            if rung is not None:  # over ZEO: its journal comes while `_known` reads the promise
                conn.prefetch(rec.journal)
            state["known"] = _known(conn, rec)
            return 1  # the run's first transaction removes the timer (a wake is one transaction)
        if entry.kind == "prune":  # a heap's from before the retention tree (`_prune_due`)
            del timers[key]
            rec = _tree(conn, WORKFLOWS_KEY).get(entry.target)
            if rec is not None and rec.timer == key:
                rec.timer = None
                drop_journal(rec, conn)
            return 1
        del timers[key]
        if entry.kind == "cron":
            cron = _tree(conn, CRONS_KEY).get(entry.target)
            if cron is None or cron.key != key:
                return 0  # dropped or replaced
            run_it, nxt = _cron.plan(cron.spec, cron.tz, cron.missed, key[0], now)
            cron.key = _add_timer(conn, nxt, TimerEntry("cron", entry.target, created=now, origin="cron"))
            _tree(conn, CRONS_KEY)[entry.target] = cron  # inline: store the new key
            if not run_it:
                return 0
            target, args, kwargs = cron.action, cron.args, cron.kwargs
        else:
            target, args, kwargs = entry.target, entry.args, entry.kwargs
        try:
            func = find(target)
            with _bound(heap, target[0], True):
                # Copies: an action that changes its arguments would change the entry
                # cached here (a cron's next ticks would get them changed), unseen.
                func(*_fresh(args), **_fresh(kwargs))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            raise _ActionFailed(exc) from exc
        return 1

    # Rung by another process's commit (over ZEO): what it added is in this process's
    # view already, so the round then begins its first transaction without asking the
    # server for later commits (`_zeo.trusting_pushed`), and so does the wake it finds.
    rung = heap._wf_rung is not None
    try:
        with heap.activate(), trusting_pushed() if rung else contextlib.nullcontext():
            done = _txn(heap, fire, "durable_heap: fire a timer")
    except _ActionFailed as failed:
        _failed(heap, state["key"], state["entry"], failed.exc)
        return 1
    except ConflictError as exc:  # it stays due: tried again at a later round
        _log.warning("timer %s: %s", state.get("key", ("", "?"))[1], exc)
        return 0
    if "run" in state:
        try:
            with trusting_pushed() if rung else contextlib.nullcontext():
                _execute(heap, state["run"], claim=state["key"], known=state["known"])
        except WorkflowError:
            _log.exception("workflow %s could not run", state["run"])
        except (ConflictError, StorageError) as exc:
            # Not the workflow's failure: its lease (or its timer) brings it back.
            _log.warning("workflow %s stopped: %s", state["run"], exc)
    return done  # type: ignore[no-any-return]


#: Journals dropped at most per transaction (`_prune_due`).
PRUNE_BATCH = 100


def _prune_due(conn: Any, now: float) -> int:
    """Drop the journals of the ended workflows whose retention has passed (up to
    `PRUNE_BATCH`, in the transaction in progress); how many entries went."""
    kept = _peek(conn, RETENTION_KEY)
    if not kept or kept.minKey()[0] > now:  # a BTree's truth and minKey: O(1), O(log n)
        return 0
    keys = list(itertools.islice(kept.keys(max=(now, "\uffff")), PRUNE_BATCH))
    wfs = _peek(conn, WORKFLOWS_KEY)
    for key in keys:
        del kept[key]
        if len(key) > 2:  # (deadline, name, PROMISE_KEPT): a resolve nobody waited for
            drop_promise(conn, key[1])
            continue
        rec = wfs.get(key[1]) if wfs is not None else None
        if rec is not None and rec.retained == key:  # (not retried since)
            rec.retained = None
            drop_journal(rec, conn)
    return len(keys)


def _take_over(heap: Any) -> int:
    """Run the workflows whose runner died between two transactions: "running", with no
    timer pending, and not seen for a lease (`last_seen`); how many were taken over.

    Read from the status index (its "running" set is small: the workflows running
    now), at most once a second of the heap's clock: a takeover waits for its lease
    anyway. Claimed by writing the record's heartbeat, so that of several schedulers
    exactly one takes each (the others conflict on it, then see it fresh); its runner,
    if it was only slow, stops at its next transaction (the journal moved on).
    """
    now = _clock(heap)
    last = heap._wf_leases_at
    if last is not None and last <= now < last + 1.0:
        return 0
    heap._wf_leases_at = now

    def expired(conn: Any) -> list[str]:
        by_status, wfs = _peek(conn, STATUS_KEY), _peek(conn, WORKFLOWS_KEY)
        running = by_status.get("running") if by_status is not None else None
        out = []
        for _, wid in running.keys() if running is not None and wfs is not None else ():
            rec = wfs.get(wid)
            if rec is not None and rec.status == "running" and rec.timer is None and \
                    last_seen(rec) + heap.lease <= now:
                out.append(wid)
        return out

    count = 0
    for wid in _txn(heap, expired, "durable_heap: expired leases"):
        def claim(conn: Any, wid: str = wid) -> tuple[Any, ...] | None:
            rec = _tree(conn, WORKFLOWS_KEY).get(wid)
            at = _clock(heap)
            if rec is None or rec.status != "running" or rec.timer is not None or \
                    last_seen(rec) + heap.lease > at:
                return None  # finished, or taken over elsewhere meanwhile
            rec.heartbeat = at
            return _known(conn, rec)
        try:
            known = _txn(heap, claim, f"workflow {wid}: take over (its lease ran out)")
        except ConflictError:
            continue  # another scheduler took it
        if known is None:
            continue
        _log.warning("workflow %s: its runner was not seen for %.0f s: taken over", wid, heap.lease)
        count += 1
        try:
            _execute(heap, wid, known=known)
        except WorkflowError:
            _log.exception("workflow %s could not run", wid)
        except (ConflictError, StorageError) as exc:
            _log.warning("workflow %s stopped: %s", wid, exc)
    return count


def _failed(heap: Any, key: tuple[float, str], entry: TimerEntry, exc: BaseException) -> None:
    """Retry a failed timer with backoff; after `TIMER_ATTEMPTS`, keep it as a dead letter."""
    _log.warning("timer %s (%s %r) failed: %s", key[1], entry.kind, entry.target, _describe(_pack_error(exc)))

    def work(conn: Any) -> None:
        timers = _tree(conn, TIMERS_KEY)
        if key in timers:
            del timers[key]
        now = _clock(heap)
        if entry.kind == "cron":
            entry.target = entry.target  # the cron's next tick is already set; this tick is retried
        entry.attempts += 1
        entry.error = _describe(_pack_error(exc))
        if entry.attempts >= TIMER_ATTEMPTS:
            _tree(conn, DEAD_KEY)[key[1]] = entry
        else:
            _add_timer(conn, now + min(3600.0, 2.0 ** entry.attempts), entry, key[1])

    if entry.kind == "cron":
        # The tick's next occurrence was scheduled with the failed firing, which was
        # aborted: schedule it again, and retry this tick as a plain call.
        def work_cron(conn: Any) -> None:
            cron = _tree(conn, CRONS_KEY).get(entry.target)
            timers = _tree(conn, TIMERS_KEY)
            if key in timers:
                del timers[key]
            if cron is None:
                return
            now = _clock(heap)
            _, nxt = _cron.plan(cron.spec, cron.tz, cron.missed, key[0], now)
            cron.key = _add_timer(conn, nxt, TimerEntry("cron", entry.target, created=now, origin="cron"))
            _tree(conn, CRONS_KEY)[entry.target] = cron
            call = TimerEntry("call", cron.action, cron.args, cron.kwargs, created=now,
                              origin=f"cron {entry.target}")
            call.attempts, call.error = 1, _describe(_pack_error(exc))
            _add_timer(conn, now + 2.0, call)
        _txn(heap, work_cron, f"timer {key[1]} failed")
        return
    _txn(heap, work, f"timer {key[1]} failed")


#: Seconds `run_scheduler` sleeps at most when nothing rings it (``poll=None``), on a
#: storage whose commits ring it: a commit of this process does (`_after_commit`), and
#: over ZEO so does one of another process (`_ring_on_invalidation`); the poll is only
#: a safety net there (and sets how often the worker looks for a new deploy and for
#: workflows whose runner died). Each poll is two transactions (over ZEO, round trips):
#: at 5 ms, the old default, an idle process spent about 0.08 of a core on them.
DEFAULT_POLL = 1.0
#: The same on PostgreSQL, which pushes nothing: another process's work (a resolve,
#: a start, a timer due first) is seen at the next poll.
UNRUNG_POLL = 0.1
#: At most this many records of a commit that rang the scheduler over ZEO are prefetched.
PREFETCH = 32
#: Seconds between looks at `run_scheduler`'s `stop` while it sleeps (no transaction).
STOP_CHECK = 0.1
#: The same under a test clock (`durable_heap.testing.Clock`), which moves without
#: ringing anything.
TEST_CLOCK_POLL = 0.005


def default_poll(heap: Any) -> float:
    """`run_scheduler`'s poll when none is given: by what rings the heap's scheduler."""
    if heap.clock is not time.time:
        return TEST_CLOCK_POLL
    return UNRUNG_POLL if heap.target.scheme == "postgresql" else DEFAULT_POLL


class _Stopped(BaseException):  # noqa: N818 - control flow: SIGTERM while blocked on a lost server
    """Raised by the scheduler's signal handler out of a wait for a lost ZEO server."""


def _stop_now(stop: threading.Event, wake: threading.Event) -> None:
    stop.set()
    wake.set()  # out of its sleep at once, whatever `poll` is


def _server_lost(heap: Any) -> bool:
    """True when the heap's ZEO client has no server now (its calls wait for one)."""
    # -- PROTECTED: ZEO.ClientStorage.is_connected() (public, but ZEO's only) --
    connected = getattr(getattr(heap.db, "storage", None), "is_connected", None)
    try:
        return connected is not None and not connected()
    except Exception:  # noqa: BLE001 - a storage closing meanwhile: not blocked on a server
        return False


def _on_signal(heap: Any, stop: threading.Event) -> Callable[..., None]:
    """The scheduler's SIGTERM/SIGINT handler: stop after the item in hand.

    With its ZEO server gone, the main thread sits in ZEO's wait for a reconnect
    (up to the target's ``wait_timeout``, 30 s by default, then again at the next
    round): a handler that only sets `stop` runs, and the wait goes on. Nothing
    can commit without a server, so then the handler raises out of that wait.
    """
    def handler(signum: int, frame: Any) -> None:
        _stop_now(stop, heap._wf_wake)
        if stop is heap._wf_stopping and _server_lost(heap):
            raise _Stopped
    return handler


def _front_oids(conn: Any, timers: Any) -> frozenset[bytes]:
    """The oids a commit changes when it adds a timer due before every pending one.

    Timers due now or soon are keyed before the others, so they land in the tree's
    first bucket (or, inline, in the tree itself, or split it: a change to the nodes
    on the way there). Without a tree: the root, where it will be made.
    """
    if timers is None:
        return frozenset({conn.root()._p_oid})
    oids = {timers._p_oid}
    node = timers
    while True:
        node._p_activate()
        state = node.__getstate__()
        if not state or len(state) < 2:  # empty, or one bucket stored inline
            break
        node = state[0][0]  # the first child: a tree (go on down) or the first bucket
        oids.add(node._p_oid)
        if type(node) is not type(timers):  # a bucket (a subtree is of the tree's class)
            break
    return frozenset(oids)


def _prefetch(heap: Any, oids: list[bytes], tid: bytes) -> bool:
    """Ask the ZEO server now for `oids` as of commit `tid` (in ZEO's IO thread, as it
    reports that commit): the records the rung round's transaction loads first. Keyed
    as that transaction's loads are (``loadBefore(oid, tid + 1)``: it sees `tid` and no
    later commit, unless one arrives meanwhile, when it just loads again), so a load
    whose answer is still on its way waits for it instead of asking again. False when
    not asked (another storage, or a client closing): the round prefetches them."""
    # -- PROTECTED: ZEO.ClientStorage.prefetch(oids, tid) (ZEO's own, not ZODB's API):
    # it only queues the loads on the IO thread's loop, so it may be called from there. --
    prefetch = getattr(getattr(heap.db, "storage", None), "prefetch", None)
    if prefetch is None:
        return False
    try:
        prefetch(oids, (int.from_bytes(tid, "big") + 1).to_bytes(8, "big"))
    except Exception:  # noqa: BLE001 - disconnected or closing: the round loads them itself
        return False
    return True


def _ring_on_invalidation(heap: Any) -> None:
    """Wake `heap`'s scheduler when another process's commit changed the start of the timers tree.

    Over ZEO the server pushes each commit's changed oids to every other client as it
    commits (``ClientStorage.invalidateTransaction``, in ZEO's IO thread, calling
    ``invalidate`` on the DB's MVCC adapter): a wake resolved elsewhere is seen at
    once instead of at the next poll. FileStorage and PostgreSQL push nothing here
    (in-process commits ring through `_after_commit`).
    """
    if heap._wf_ringing:
        return
    heap._wf_ringing = True
    # -- PROTECTED: ZODB's DB._mvcc_storage (the MVCCAdapter its storage calls
    # ``invalidate(tid, oids)`` on); an instance attribute shadows the method. --
    adapter = getattr(heap.db, "_mvcc_storage", None)
    original = getattr(adapter, "invalidate", None)
    if original is None:
        return  # another ZODB: the scheduler polls
    wake = heap._wf_wake

    def invalidate(tid: bytes, oids: Any) -> None:
        original(tid, oids)
        watched = heap._wf_watched
        if watched is None or not watched.isdisjoint(oids):
            # What the woken round will read first (a resolve's wake: the timers'
            # bucket, the workflow's record, the promise): fetched at once, together,
            # from here (ZEO's IO thread), while the scheduler's thread wakes up.
            rung = list(oids)[:PREFETCH]
            heap._wf_rung = [] if _prefetch(heap, rung, tid) else rung
            wake.set()

    adapter.invalidate = invalidate  # type: ignore[union-attr]
    # After a reconnect ZEO may drop its whole cache instead of naming what changed
    # meanwhile (``ClientStorage`` cache verification calls ``invalidateCache``).
    flush = getattr(adapter, "invalidateCache", None)
    if flush is not None:
        def invalidate_cache() -> None:
            flush()
            wake.set()

        adapter.invalidateCache = invalidate_cache  # type: ignore[union-attr]


# --- heap methods ------------------------------------------------------------------------------------


class WorkflowMethods:
    """The heap's durable-execution methods (mixed into the public `Heap`)."""

    clock: Callable[[], float]
    lease: float
    retention: float
    _wf_wake: threading.Event
    _wf_declared: tuple[Any, set[Any]] | None
    _wf_watched: frozenset[bytes] | None
    _wf_ringing: bool

    def __init__(self, *args: Any, clock: Callable[[], float] | None = None,
                 lease: float = DEFAULT_LEASE, retention: float = DEFAULT_RETENTION,
                 **kwargs: Any) -> None:
        #: The heap's time (epoch seconds): `time.time`, or a test's `durable_heap.testing.Clock`.
        self.clock = clock if clock is not None else time.time
        self.lease = float(lease)
        self.retention = float(retention)
        self._wf_wake = threading.Event()
        self._wf_leases_at: float | None = None  # the heap clock's time of the last `_take_over`
        self._wf_schedulers = 0  # `run_scheduler` loops running in this process
        # Over ZEO, the oids of the commit that last rang it, for its next round to prefetch
        # ([] when they were asked for at once); None: not rung by another process.
        self._wf_rung: list[bytes] | None = None
        self._wf_stopping: threading.Event | None = None  # the `stop` of the one in the main thread
        # Per thread: the `stop` of the `run_scheduler` loop running in it (``.stop``), which
        # `run_due` and a workflow's next step look at (`_workflows.scheduler_stopping`).
        self._wf_thread = threading.local()
        # Wakes handed over by this process's resolves: (id, timer key, what `_known` reads).
        self._wf_handed: collections.deque[tuple[str, tuple[float, str], tuple[Any, ...]]] = \
            collections.deque()
        self._wf_watched = None  # see `_next_deadline`; None: any invalidation rings
        self._wf_ringing = False  # `_ring_on_invalidation` installed
        self._wf_declared = None  # (transaction, crons and subscriptions it declared): `_declared_in`
        super().__init__(*args, **kwargs)

    def workflow(self, func: Callable[..., Any] | None = None, /, *,
                 retention: float | None = None) -> Any:
        """Decorator: a workflow of this heap (see `durable_heap._workflows`).

        >>> import durable_heap as dh
        >>> heap = dh.open("memory://")
        >>> @heap.workflow
        ... def hello(name):
        ...     return f"hello {name}"
        >>> hello("ann").result()
        'hello ann'
        >>> heap.close()
        """
        def decorate(f: Callable[..., Any]) -> WorkflowFunction:
            return WorkflowFunction(f, self, retention=retention)
        return decorate(func) if func is not None else decorate

    def on(self, topic: str) -> Callable[[Callable[..., Any]], Any]:
        """Decorator: subscribe an action to `topic`; each `emit` reaches it once."""
        if not isinstance(topic, str) or not topic:  # (the subscriptions tree is keyed by str)
            raise WorkflowError(f"an event's topic is a non-empty str, not {topic!r}")

        def decorate(func: Callable[..., Any]) -> Any:
            action = func if hasattr(func, "invoke_in") else self.action(func)  # type: ignore[attr-defined]
            name = name_of(func, f"@heap.on({topic!r})")
            _warn_if_main(name, f"a subscription to {topic!r}")
            try:  # each delivery calls it with the payload alone
                check_call(func, name[1], (None,), {})
            except TypeError as exc:
                raise TypeError(f"a subscriber of {topic!r} is called with the event's payload, one "
                                f"argument: {exc}") from None

            def subscribe(conn: Any) -> None:
                subs = _peek(conn, SUBSCRIPTIONS_KEY)
                if subs is not None and name in subs.get(topic, ()):
                    return
                subs = _tree(conn, SUBSCRIPTIONS_KEY)
                subs[topic] = (*subs.get(topic, ()), name)

            _read_then_write(self, f"subscribe {name[1]} to {topic}", subscribe)
            _declare(self, (topic, name))
            return action
        return decorate

    def run_due(self, limit: int | None = None) -> int:
        """Run everything due now (timers, wakes, event deliveries); return how many ran."""
        if self.in_transaction:  # type: ignore[attr-defined]
            raise WorkflowError(
                "run_due() runs each due item in a transaction of its own, so it cannot run "
                "inside a transaction or an action: call it outside them"
            )
        if _current.get() is not None:
            raise WorkflowError(
                "run_due() cannot run in a workflow's body: each replay would run it again, "
                "and what it runs would count as the body's own changes. A scheduler runs it"
            )
        count = _take_over(self)
        idle = 0
        while (limit is None or count < limit) and not scheduler_stopping(self):  # (then: no next item)
            done = _fire_one(self)
            if done is None:
                break
            count += done
            idle = idle + 1 if not done else 0
            if idle > 1000:
                break  # only stale timers: the rest next time
        return count

    def run_scheduler(self, *, stop: threading.Event | None = None, poll: float | None = None,
                      tick: Callable[[], Any] | None = None) -> None:
        """Run due work until `stop` is set (or SIGTERM / SIGINT in the main thread).

        Between rounds it sleeps until the next deadline, or until a commit adds
        work: one of this process (`_after_commit`), or over ZEO one of another
        process that changed the start of the timers tree (`_ring_on_invalidation`);
        at most `poll` seconds (storages that push no invalidations, PostgreSQL,
        are seen at the next poll). ``poll=None``: `default_poll` (1 s; 0.1 s on
        PostgreSQL). `tick` is called about once a second (the worker loads a
        newly deployed version there).
        """
        stop = stop or threading.Event()
        poll = default_poll(self) if poll is None else float(poll)
        handlers: list[tuple[signal.Signals, Any]] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers.append((sig, signal.signal(sig, _on_signal(self, stop))))
        _ring_on_invalidation(self)
        ticked = time.monotonic()
        self._wf_schedulers += 1
        if handlers:  # its handler may raise `_Stopped` only while this loop runs
            self._wf_stopping = stop
        outer, self._wf_thread.stop = getattr(self._wf_thread, "stop", None), stop
        try:
            while not stop.is_set():
                if tick is not None and time.monotonic() - ticked >= 1.0:
                    ticked = time.monotonic()
                    tick()
                self._wf_wake.clear()
                try:
                    if self._run_handed() + self.run_due(limit=100):
                        continue
                    nxt = self._next_deadline()
                except DurableHeapError as exc:  # a lost ZEO server, a full disk: keep going
                    _log.error("scheduler round failed (retrying in a second): %s", exc)
                    stop.wait(1.0)
                    continue
                wait = poll if nxt is None else max(0.0, min(poll, nxt - _clock(self)))
                if self.clock is not time.time:
                    wait = poll  # a test clock moves by itself: poll
                self._sleep(stop, wait)
        except _Stopped:
            pass  # SIGTERM while waiting for a lost server (see `_on_signal`)
        finally:
            self._wf_thread.stop = outer
            if handlers:
                self._wf_stopping = None
            self._wf_schedulers -= 1
            for sig, old in handlers:
                signal.signal(sig, old)

    def _sleep(self, stop: threading.Event, seconds: float) -> None:
        """Sleep up to `seconds`: until rung (`_wf_wake`), or `stop` is set. A `stop` set
        by another thread rings nothing, so it is looked at every `STOP_CHECK` s (no
        transaction: a poll of the storage comes only at the end of the sleep)."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0 or self._wf_wake.wait(min(left, STOP_CHECK)):
                return

    def _run_handed(self) -> int:
        """Run the wakes that resolves of this process handed over (`_workflows._hand_over`):
        what the scheduler would read again to run them (the journal, the promise's
        value) came with them. Each one's first transaction claims its timer, as a
        fired timer's does, so a wake that another scheduler ran meanwhile stops there."""
        count = 0
        handed = self._wf_handed
        while handed:
            wid, key, known = handed.popleft()
            count += 1
            try:
                _execute(self, wid, claim=key, known=known)
            except WorkflowError:
                _log.exception("workflow %s could not run", wid)
            except (ConflictError, StorageError) as exc:  # its timer stays: fired later
                _log.warning("workflow %s stopped: %s", wid, exc)
        return count

    def _next_deadline(self) -> float | None:
        """The first timer's deadline; and it notes (`_wf_watched`) the oids whose change
        by another process may add work due before it (see `_ring_on_invalidation`)."""
        def read(conn: Any) -> float | None:
            timers = _peek(conn, TIMERS_KEY)
            self._wf_watched = _front_oids(conn, timers)
            kept = _peek(conn, RETENTION_KEY)
            firsts = [t.minKey()[0] for t in (timers, kept) if t]
            return min(firsts) if firsts else None
        return _txn(self, read, "durable_heap: next deadline")  # type: ignore[no-any-return]

    def workflows(self, status: str | None = None) -> list[Workflow]:
        """Handles on the heap's workflows (those of one `status`), oldest first."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")

        listed = _txn(self, lambda conn: _listed(conn, status), "durable_heap: list workflows")
        return [Workflow(self, wid) for _, wid in listed]

    def workflow_by_id(self, wid: str) -> Workflow:
        """The handle of workflow `wid` (`WorkflowError` if there is none)."""
        handle = Workflow(self, wid)
        handle.status  # noqa: B018 - raises for an unknown id
        return handle

    def timers(self, *, dead: bool | None = None) -> list[Timer]:
        """Pending timers by due time, then dead letters (`dead`: only those, or none)."""
        def read(conn: Any) -> list[Timer]:
            out: list[Timer] = []
            crons = _peek(conn, CRONS_KEY) or {}
            by_key = {c.key: cid for cid, c in crons.items()}
            if dead is not True:
                timers = _peek(conn, TIMERS_KEY)
                for key, entry in (timers.items() if timers is not None else ()):
                    out.append(Timer(self, key, cron=by_key.get(key), entry=entry))
                kept = _peek(conn, RETENTION_KEY)
                if kept:  # the ended workflows' journals to drop: "prune" timers, as listed before
                    out += [Timer(self, key, entry=TimerEntry("prune", key[1], origin=(
                                "retention" if len(key) == 2 else "unawaited promise")))
                            for key in kept.keys()]
                    out.sort(key=lambda t: t.key)
            if dead is not False:
                letters = _peek(conn, DEAD_KEY)
                for seq, entry in (letters.items() if letters is not None else ()):
                    out.append(Timer(self, (0.0, seq), entry=entry, dead=True))
            return out
        return _txn(self, read, "durable_heap: list timers")  # type: ignore[no-any-return]
