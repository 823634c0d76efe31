"""The one retry policy: which errors are retried, how long to back off, what a
transaction's note says, and the error once the attempts are used up.

Every loop that re-runs a transaction goes through here: `retry` (sync:
``heap.run``, ``@heap.action``, opening a heap, a deploy), `aretry` (``async
def`` actions: the pause is ``asyncio.sleep``, so the loop runs meanwhile), and
``heap.attempts()`` (a ``for`` loop around a ``with`` block, which uses `pause`
and `conflict` itself). What is retried is transaction's own classifier,
``transaction.interfaces.TransientError`` (ZODB's ConflictError is one), as
``TransactionManager.attempts()`` does; faults (a lost server, a failed write)
are never retried, because a retry could commit twice (see `_heap`).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import transaction.interfaces

from . import _notes
from ._errors import ConflictError
from ._paths import path_of

__all__ = [
    "ACTION_ATTEMPTS",
    "DEFAULT_ATTEMPTS",
    "LOOP_ATTEMPTS",
    "MORE_ATTEMPTS",
    "RETRIED",
    "RetryQueue",
    "aretry",
    "backoff_delay",
    "call_note",
    "conflict",
    "pause",
    "retry",
]

T = TypeVar("T")

#: How often a transaction is tried by default (``durable_heap.open(attempts=N)``).
DEFAULT_ATTEMPTS = 10
#: What is retried: transaction's classifier of errors that a new try may not meet.
RETRIED = transaction.interfaces.TransientError

#: Where a message says to allow more attempts (`conflict`'s ``how``).
MORE_ATTEMPTS = "durable_heap.open(target, attempts=N)"
ACTION_ATTEMPTS = "@heap.action(attempts=N), or durable_heap.open(target, attempts=N) for every action"
LOOP_ATTEMPTS = "a larger N in heap.attempts(N)"



class RetryQueue:
    """A process's queue for the retries of calls that conflicted (`durable-heap
    serve`'s calls, the WSGI middleware's requests; the ASGI middleware keeps one of
    its own per event loop).

    A call's retries hold `lock`: one at a time in the process. While `hot` calls
    are between their first conflict and their end (`enter`, `leave`), new calls'
    first tries take the lock too; otherwise a first try takes no lock, so while
    nothing conflicts no call waits (`_serve.Service._call` says why).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hot = 0
        self._count = threading.Lock()

    def enter(self) -> None:
        """A call of this process met its first conflict."""
        with self._count:
            self.hot += 1

    def leave(self) -> None:
        """A call that had entered ended."""
        with self._count:
            self.hot -= 1


def backoff_delay(attempt: int) -> float:
    """A random time that grows with the attempt: conflicting processes spread out."""
    return random.uniform(0, min(0.5, 0.002 * 2**attempt))


def pause(attempt: int) -> None:
    """Back off after failed attempt number `attempt` (blocks the thread)."""
    time.sleep(backoff_delay(attempt))


def retry(func: Callable[[], T], *, attempts: int, note: str | None, how: str = MORE_ATTEMPTS,
          name_record: bool = False, conn: Callable[[], Any] | None = None) -> T:
    """``func()``, tried up to `attempts` times while it raises `RETRIED`, backing off between.

    Then `conflict` (`note`, `how`); with `name_record` it names the contended
    record (found in memory through ``conn()`` when given).
    """
    for n in range(1, attempts + 1):
        try:
            return func()
        except RETRIED as exc:
            if n == attempts:
                raise _exhausted(n, note, exc, how, name_record, conn) from exc
        pause(n)  # a sync function cannot await: in a coroutine, this blocks the loop
    raise AssertionError("unreachable")


async def aretry(func: Callable[[], Awaitable[T]], *, attempts: int, note: str | None,
                 how: str = MORE_ATTEMPTS, name_record: bool = False,
                 sleep: Callable[[float], Awaitable[Any]]) -> T:
    """`retry` for a coroutine function: backs off with ``await sleep(delay)``."""
    for n in range(1, attempts + 1):
        try:
            return await func()
        except RETRIED as exc:
            if n == attempts:
                raise _exhausted(n, note, exc, how, name_record, None) from exc
        await sleep(backoff_delay(n))
    raise AssertionError("unreachable")


def _exhausted(n: int, note: str | None, exc: BaseException, how: str, name_record: bool,
               conn: Callable[[], Any] | None) -> ConflictError:
    if not name_record:
        return conflict(n, note, how=how)
    return conflict(n, note, exc, conn() if conn is not None else None, how=how)


def conflict(attempts: int, note: str | None, cause: BaseException | None = None,
             conn: Any = None, *, retried: bool = True, how: str = MORE_ATTEMPTS) -> ConflictError:
    """The error for a transaction that kept conflicting.

    `cause` (ZODB's ConflictError) names the contended record; `retried`: False
    for a single ``heap.transaction()``, which is advised to retry; `how` says
    where to allow more attempts.
    """
    what = f" in {note}" if note else ""
    tries = "once" if attempts == 1 else f"{attempts} times"
    if not retried:
        advice = ("Run it through @heap.action or heap.attempts(n) to retry, with more "
                  "attempts if this keeps happening.")
    else:
        advice = (
            "If it is a counter that every call increments, make it a durable_heap.Counter, "
            "whose concurrent increments merge instead of conflicting; otherwise let "
            "concurrent transactions change different objects, or allow more attempts "
            f"({how})."
        )
    return ConflictError(
        f"a concurrent transaction changed the same object{_contended(cause, conn)}{what}, "
        f"and the transaction was tried {tries}. {advice}"
    )


def _contended(cause: BaseException | None, conn: Any) -> str:
    """`` (state: durable_heap._state.State, oid 0x1)``, as far as cheaply known, or ''.

    ZODB's ConflictError carries the record's oid and class; the path is found
    only among objects in memory (`path_of` loads nothing).
    """
    oid = getattr(cause, "oid", None)
    class_name = getattr(cause, "class_name", None)
    path = ""
    if isinstance(oid, bytes) and conn is not None:
        with contextlib.suppress(Exception):
            obj = conn._cache.get(oid)
            found = path_of(obj) if obj is not None else "<"
            path = "" if found.startswith("<") else found
    if isinstance(class_name, str) and class_name.startswith("durable_heap._"):
        class_name = "durable_heap." + class_name.rpartition(".")[2]  # its public name
    record = [str(class_name)] if class_name else []
    if isinstance(oid, bytes):
        record.append(f"oid 0x{oid.hex().lstrip('0') or '0'}")
    inner = ", ".join(record)
    if path:
        inner = f"{path}: {inner}" if inner else path
    return f" ({inner})" if inner else ""


def call_note(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], func: Any = None) -> str:
    """``name('arg', n=2)``, arguments shortened (and hidden where `func` is marked with
    `durable_heap.redact`): the note of an action's transaction (see `_notes`)."""
    return _notes.call_note(name, args, kwargs, func)
