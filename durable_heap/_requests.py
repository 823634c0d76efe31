"""What the ASGI and WSGI transaction middlewares share: the request scope and its threads.

A request of an ASGI app runs in one asyncio task, in that task's own
transaction. Frameworks run *sync* views in a thread pool (Starlette's
``run_in_threadpool``, asgiref's ``sync_to_async``), with the task's context
copied into the thread. The heap's rule is that such a thread never uses the
task's transaction; so the request scope (a context variable set by the
middleware, copied into those threads with the rest of the context) gives each
such thread **its own transaction**, opened at its first use of the heap
(`_thread_slot`, registered with `_heap.set_thread_hook`) and held by the
scope, not by the thread: a pool thread may serve another request meanwhile.
The middleware commits (or rolls back) those transactions together with the
request's own, before the response is sent, from the task's thread: each
connection is used by one thread at a time (the view has returned by then).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import transaction

from . import _heap
from ._errors import ConflictError
from ._heap import HeapEngine, _close_quietly, _TaskSlot
from ._retry import conflict
from ._watch import changed_path

__all__ = ["RequestScope", "changed_in", "excluder", "read_only_answer", "request_note"]

_scope: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "durable_heap_request", default=None)


def request_note(method: str, path: str) -> str:
    """The transaction note of a request: ``GET /items``."""
    return f"{method} {path[:200]}"


R = TypeVar("R")


#: The path of an object changed (or added) in a connection's transaction so far, or None:
#: a read-only request that changed one is refused, not silently dropped (`_watch.changed_path`).
changed_in = changed_path


def excluder(exclude: Iterable[str] | Callable[[R], bool], path: Callable[[R], str]) -> Callable[[R], bool]:
    """The middlewares' `exclude` option as a predicate on a request (a scope, an environ).

    A callable is used as it is; path prefixes are matched against `path(request)`.
    """
    if callable(exclude):
        return exclude
    prefixes = tuple(exclude)
    return lambda request: bool(prefixes) and path(request).startswith(prefixes)


def read_only_answer(method: str, changed: str) -> str:
    """The message of a read-only request that changed `changed` (a path from ``state``)."""
    return (
        f"a {method} request changed {changed}: {method} requests are read-only (they never "
        "commit), so the change was dropped. Change state in a POST (or PUT, PATCH, DELETE) "
        "request, or pass read_only_methods=... to TransactionMiddleware."
    )


class RequestScope:
    """One request of an ASGI app, and the transactions of the threads its sync views ran in."""

    def __init__(self, heap: HeapEngine, note: str) -> None:
        self.heap = heap
        self.note = note
        self.owner = threading.get_ident()  # the event loop's thread: its task's transaction
        self._lock = threading.Lock()
        #: thread id -> (slot, the transaction's context manager, entered): one per pool thread
        self._threads: dict[int, tuple[_TaskSlot, Any]] = {}

    def enter(self) -> contextvars.Token[RequestScope | None]:
        return _scope.set(self)

    def exit(self, token: contextvars.Token[RequestScope | None]) -> None:
        self.abort_threads()  # whatever is left (an exception on the way out)
        _scope.reset(token)

    # -- PROTECTED: the heap engine's HeapEngine._transaction, _new_slot, _TaskSlot ---------
    # and _close_quietly (durable_heap._heap): a thread's slot is a task slot run by the
    # heap's own outermost-transaction runner, so its faults are handled as the heap's are.

    def slot(self) -> _TaskSlot | None:
        """The transaction slot of this (pool) thread, opened now if it has none yet."""
        me = threading.get_ident()
        if me == self.owner:
            return None  # the task's thread: the task's own transaction
        with self._lock:
            held = self._threads.get(me)
            if held is not None and held[0].conn is not None:
                return held[0]
            heap = self.heap
            slot = heap._new_slot(None)
            # The heap's own outermost-transaction runner (begin now; commit or abort,
            # with its fault handling, when the request ends).
            cm = heap._transaction(slot, f"{self.note} (thread)")
            cm.__enter__()
            self._threads[me] = (slot, cm)
            return slot

    def changed(self, *, threads: bool = True) -> str | None:
        """The path of an object this request changed (its task's, or a thread's), or None."""
        conns = [self.heap.connection]
        if threads:
            conns += [s.conn for s, _ in self._threads.values() if s.conn is not None]
        for conn in conns:
            changed = changed_in(conn)
            if changed is not None:
                return changed
        return None

    def commit_threads(self, *, after_changes: bool) -> None:
        """Commit the threads' transactions (after the task's; `after_changes`: it changed state).

        A conflict raises `ConflictError`: the middleware runs the request again
        when nothing of it was committed yet; otherwise the message says so.
        """
        committed = after_changes
        try:
            while self._threads:
                _, (slot, cm) = self._threads.popitem()
                wrote = slot.conn is not None and changed_in(slot.conn) is not None
                try:
                    cm.__exit__(None, None, None)
                except transaction.interfaces.TransientError as exc:
                    err = ConflictError(
                        f"a concurrent transaction changed the same objects as {self.note} (in a "
                        "thread of the app's thread pool)"
                        + (": the rest of the request was committed already, so it is not run again"
                           if committed else "")
                    )
                    err.partial = committed  # type: ignore[attr-defined]
                    raise err from exc
                finally:
                    self._close(slot)
                committed = committed or wrote
        finally:
            self.abort_threads()

    def abort_threads(self) -> None:
        while self._threads:
            _, (slot, cm) = self._threads.popitem()
            try:
                cm.__exit__(_Dropped, _Dropped(), None)
            except _Dropped:
                pass
            finally:
                self._close(slot)

    def _close(self, slot: _TaskSlot) -> None:
        conn, slot.conn, slot.state = slot.conn, None, None
        if conn is None:  # thrown away after a fault
            return
        with self.heap._lock:
            self.heap._conns.discard(conn)
        _close_quietly(conn)


def conflict_after(exc: ConflictError, attempts: int, note: str) -> ConflictError:
    """A middleware's 409 after its last try: how many tries and what to do.

    `exc` is the last try's error, which says "tried once, use @heap.action":
    advice for a lone transaction, wrong for a request the middleware retried.
    """
    err = conflict(attempts, note, exc.__cause__, how="TransactionMiddleware(app, heap, attempts=N)")
    return ConflictError(f"{err} Nothing of the request was committed.")


class _Dropped(Exception):
    """Internal: makes the heap's transaction runner abort a thread's transaction."""


def _thread_slot(heap: HeapEngine) -> _TaskSlot | None:
    scope = _scope.get()
    if scope is None or scope.heap is not heap:
        return None
    return scope.slot()


_heap.set_thread_hook(_thread_slot)
