"""The heap engine under the public `Heap`: one ZODB database, a connection per thread,
and transactions that retry (`HeapEngine`).

What a `Heap` promises:

* ``heap.state`` is the root `State` as this thread sees it. Each thread has its
  own ZODB connection (connections are not thread-safe) with its own explicit
  transaction manager, so a change made outside a transaction is refused
  instead of joining some implicit transaction nobody commits.
* ``with heap.transaction() as state:`` is one atomic transaction: it commits
  on normal exit and aborts on an exception, which propagates unchanged.
  Nested transactions and actions join the outermost one.
* ``@heap.action`` makes each call of a function one such transaction, and
  re-runs it (with a jittered, growing pause) when ZODB reports a conflict with
  another transaction, up to ``attempts`` times; then `ConflictError`.
* The transaction note names the action and its arguments, so the storage's
  history (``heap.db.undoLog()``) reads as a log of calls.
* In asyncio, each task is what a thread is above: its outermost transaction
  (``async with heap.transaction()``, an ``async def`` action, or a sync
  ``with`` inside a coroutine) runs on a connection of its own from ZODB's
  pool, found through a context variable that records its owner (see `_TaskSlot`).
  Another task, or a thread the context was copied into, never shares it.
* A fault during a transaction (a lost ZEO server, a failed write) raises
  `ServerUnavailableError` or `StorageError` saying whether the transaction may
  have been committed (``outcome_unknown``); it is never retried, and the
  connection it used is thrown away, so the next transaction starts clean. A
  local storage whose fsync failed is closed (`HeapStatus.FAILED`): reopen it.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import inspect
import sys
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import transaction
import transaction.interfaces
import ZODB
import ZODB.broken
import ZODB.Connection
import ZODB.POSException

from . import _notes, _paths
from ._allow import Allowlist, guard_conflicts
from ._errormap import disconnected as _disconnected
from ._errormap import is_fault as _is_fault
from ._errormap import outcome_unknown as _voted
from ._errormap import reason as _reason
from ._errormap import remedy, translate_storage_error
from ._errors import (
    DurableHeapError,
    HeapClosedError,
    NoActiveHeapError,
    ServerUnavailableError,
    StorageError,
    TransactionOwnerError,
)
from ._format import FORMAT, FORMAT_KEY, FORMAT_SINCE, NEWEST_FORMAT, ROOT_KEY
from ._integrity import CheckedDB
from ._registry import ensure_registry, program_roots, registered
from ._retry import (
    ACTION_ATTEMPTS,
    DEFAULT_ATTEMPTS,
    LOOP_ATTEMPTS,
    RETRIED,
    aretry,
    call_note,
    conflict,
    pause,
    retry,
)
from ._state import State
from ._storage import open_storage
from ._targets import Target, private_files
from ._watch import check_before_commit, forget_reads, reset_watch

if TYPE_CHECKING:
    import asyncio

    from typing_extensions import Self  # typing.Self from Python 3.11

    from ._facade import Heap  # what every heap opened by durable_heap.open is

__all__ = ["HeapStatus", "active_heap", "state"]  # and, inside the package: HeapEngine, read_transaction

F = TypeVar("F", bound=Callable[..., Any])

#: Objects a connection keeps in memory (ZODB's default of 400 reloads tree
#: nodes of big containers on every transaction).
DEFAULT_CACHE_SIZE = 50_000
#: Async transactions open at once per heap and event loop (each holds a
#: connection and its cache); half of ZODB's pool, leaving room for threads.
DEFAULT_MAX_ASYNC_TRANSACTIONS = 32
#: History `heap.pack()` keeps, in days: the reach of ``inspect --at`` and `state_at` after it.
DEFAULT_PACK_DAYS = 7.0
#: Hooks of the layers above (durable execution registers them; the engine knows no more):
#: `after_commit` hooks run after each outermost transaction committed, with none open;
#: `on_action(heap, func, wrapper)` runs once per `@heap.action` (to add attributes);
#: `call_action(heap, func, args, kwargs, run)`, when set, runs every call of a sync
#: action (`run()` is the plain transaction; a workflow body turns the call into a step).
after_commit: list[Callable[[HeapEngine], None]] = []
on_action: list[Callable[[HeapEngine, Callable[..., Any], Callable[..., Any]], None]] = []
call_action: Callable[..., Any] | None = None
call_async_action: Callable[..., Awaitable[Any]] | None = None  # the same for async actions
#: `begin(heap, conn)`, when set, runs before each outermost transaction begins on `conn`; it
#: may raise (nothing is begun then), and what it returns, if not None, runs before that
#: transaction's commit (a workflow body refuses changes made outside its steps).
begin: Callable[[HeapEngine, Any], Callable[[], None] | None] | None = None


class HeapStatus(enum.Enum):
    """Where a heap is in its life."""

    OPEN = "open"
    CLOSED = "closed"
    #: A write failed in a way that leaves the file's durable state unknown (a
    #: failed fsync): the storage was closed, and the heap must be opened again.
    FAILED = "failed"


class _ThreadSlot(threading.local):
    """This thread's connection to one heap, and where its transactions stand.

    A slot is what transactions run on: this one, or an asyncio task's own
    (`_TaskSlot`, the same attributes).
    """

    conn: Any = None  # this thread's ZODB connection; None until first use, or after `_discard`
    tm: Any = None  # its explicit transaction manager (one per connection)
    state: State | None = None  # the root State as loaded on `conn`, None once its cache was dropped
    depth = 0  # 0 outside a transaction; 1 in the outermost, +1 per nested one joined
    closer: Any = None  # the thread's `_Closer` (None after `_discard`)
    generation = 0  # `HeapEngine._generation` when `conn`'s cache was last current


class _Closer:
    """Dies with the thread's local data; a finalizer on it closes the thread's connection."""


class _TaskSlot:
    """One asyncio task's connection to one heap, for one outermost transaction.

    The same attributes as `_ThreadSlot`, so `Heap._transaction` runs on either. It
    sits in the heap's context variable while the transaction runs. A context
    is copied into every task created meanwhile (``asyncio.create_task``,
    ``gather``), every callback, and every thread a framework runs sync code in
    (``asyncio.to_thread``, Starlette's ``run_in_threadpool``, asgiref's
    ``sync_to_async``): so the slot names its owner, and only the owner task in
    the owner thread uses it. Another thread ignores it (it has its own
    connection); another task of the same thread is refused.
    """

    __slots__ = ("closer", "conn", "depth", "generation", "state", "task", "thread", "tm")

    def __init__(self, conn: Any, tm: Any, task: Any, generation: int) -> None:
        self.conn: Any = conn  # None once the transaction ended: the slot is then inert
        self.tm: Any = tm
        self.state: State | None = None
        self.depth = 0
        self.closer: Any = None  # unused: the task's connection is closed by `_close_task`
        self.generation = generation
        self.thread = threading.get_ident()
        self.task: Any = task


_Slot = _ThreadSlot | _TaskSlot


class _AsyncGate:
    """At most ``heap.max_async_transactions`` task transactions open at once in one event loop.

    Like ``asyncio.Semaphore`` (first come first served, safe against
    cancellation), except that a sync ``with heap.transaction()`` in a task
    takes a place without waiting (`take`), past the bound if need be: it
    cannot wait without blocking the loop, and with it the tasks that hold the
    places and would free them. Used only from its loop's thread.
    """

    __slots__ = ("heap", "open", "waiters")

    def __init__(self, heap: HeapEngine) -> None:
        self.heap = heap
        self.open = 0  # places taken: transactions open, or handed to a waiter about to run
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.open < self.heap.max_async_transactions and not self.waiters:
            self.open += 1
            return
        fut: asyncio.Future[None] = _asyncio().get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a place just as the task was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            raise

    def take(self) -> None:
        self.open += 1

    def release(self) -> None:
        self.open -= 1
        while self.waiters and self.open < self.heap.max_async_transactions:
            fut = self.waiters.popleft()
            if not fut.done():  # a cancelled waiter is skipped
                self.open += 1
                fut.set_result(None)


def _broken_class(module: str, name: str) -> type:
    """ZODB's broken class for ``module.name``, made without importing `module`."""
    key = (module, name)
    cls = ZODB.broken.broken_cache.get(key)
    if cls is None:
        cls = ZODB.broken.broken_cache[key] = type(name, (ZODB.broken.Broken,), {"__module__": module})
    return cls  # type: ignore[no-any-return]


class HeapEngine:
    """The engine under `durable_heap.Heap`: a database, connections, transactions, retries.

    It knows nothing of the layers above it (programs, versions, durable
    execution): the public `Heap` (`_facade`) adds their methods as mixins. Where
    the engine needs an upper layer's policy, it offers a hook method that a
    mixin overrides (`install_definitions`, as ZODB's ``class_factory``).

    PROTECTED (ZODB's habit: private API that other modules of the package use,
    labelled where it is defined): `_thread` (the slot transactions run on here),
    `_transaction` (one outermost transaction on a slot, conflicts propagated),
    `_run` (a function as a retried transaction), used by the layers above
    (`_versions`, and the durable-execution layer). Each carries the label.
    """

    def __init__(
        self,
        target: Target,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        read_only: bool = False,
        pool_size: int = 64,
        max_async_transactions: int = DEFAULT_MAX_ASYNC_TRANSACTIONS,
        allow: Iterable[str] = (),
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.max_async_transactions = max_async_transactions
        #: The globals this heap's records may name (see `durable_heap._allow`).
        self.allowlist = Allowlist(allow, programs=program_roots, registered=registered)
        self.target = target
        self.max_attempts = attempts
        self.read_only = read_only
        self.status = HeapStatus.OPEN
        self._failure = ""  # why the heap is FAILED: part of every later error
        #: Class renames of the loaded program versions: old path -> new path.
        self.renames: dict[str, str] = {}
        self._renames_by_program: dict[str, dict[str, str]] = {}
        self._programs_lock = threading.RLock()
        self._installing: set[str] = set()
        self._failed: set[str] = set()
        # Bumped when loaded classes change (a deploy): connections drop their caches.
        self._generation = 0
        self.db = self._open_db(cache_size, pool_size)
        self._local = _ThreadSlot()
        # The transaction of the asyncio task running here, if it opened one (`_TaskSlot`).
        self._task: contextvars.ContextVar[_TaskSlot | None] = contextvars.ContextVar(
            "durable_heap_task", default=None)
        self._gates: weakref.WeakKeyDictionary[Any, _AsyncGate] = weakref.WeakKeyDictionary()
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        try:
            self._ensure_root()
        except Exception:
            self.close()
            raise
        _open_heaps.append(self)

    # -- lifecycle -----------------------------------------------------------------

    def _open_db(self, cache_size: int, pool_size: int) -> Any:
        """ZODB's DB on a new storage; it creates ZODB's root record in an empty one.

        Under ZEO several processes may do that at the same moment: all but one
        conflict, and open again to find the root the winner made.
        """
        def attempt() -> Any:
            storage = open_storage(self.target, read_only=self.read_only)
            try:
                guard_conflicts(storage, self.allowlist)
                with private_files():
                    return CheckedDB(storage, cache_size=cache_size, pool_size=pool_size,
                                     class_factory=self._find_class)
            except Exception:
                storage.close()
                raise

        return retry(attempt, attempts=self.max_attempts, note="durable_heap: create the heap")

    def _ensure_root(self) -> None:
        """Create the heap in an empty storage; check (and raise) an existing heap's format.

        A heap of an older format opened read-write gets the current marker here,
        at open, in a transaction of its own, rather than at the first commit that
        writes checksummed records (format 2): that needs no hook in the commit
        path, and the marker is then never behind the records, whichever process
        commits first. Read-only opens change nothing. (0.2 reads format 2 as it
        stands, see `_integrity.MARK`; the refusal is for formats to come.)
        """
        local = self._thread()
        tm = local.tm

        def attempt() -> None:
            tm.begin()
            root = local.conn.root()
            if ROOT_KEY in root:
                try:
                    stale = _stale_format(self.target, root)
                except StorageError:
                    tm.abort()
                    raise
                if not stale or self.read_only or local.conn.isReadOnly():
                    tm.abort()
                    return
                # Another process may raise it at the same moment: then look again.
                tm.get().note(f"durable_heap: heap format {root.get(FORMAT_KEY, 1)} -> {FORMAT}")
                root[FORMAT_KEY] = FORMAT
            else:
                if self.read_only:
                    tm.abort()
                    raise StorageError(
                        f"{self.target} holds no durable_heap state yet, and is open read-only")
                # Under ZEO another process may create the heap at the same moment:
                # then use the one it made.
                tm.get().note("durable_heap: create the heap")
                root[FORMAT_KEY] = FORMAT
                root[ROOT_KEY] = State()
                ensure_registry(local.conn)  # empty: a new heap has no classes to scan for
            try:
                tm.commit()
            except RETRIED:
                tm.abort()
                raise

        retry(attempt, attempts=self.max_attempts, note="durable_heap: create the heap")

    def close(self) -> None:
        """Close every thread's connection and the storage. Idempotent."""
        if self.status is HeapStatus.CLOSED:
            return
        failed = self.status is HeapStatus.FAILED
        self.status = HeapStatus.CLOSED
        if self in _open_heaps:
            _open_heaps.remove(self)
        if failed:
            return  # its storage was closed when it failed
        # Trap: this aborts the transaction manager of every thread's (and task's)
        # connection, from this thread, although a manager is otherwise used by its
        # own thread only. Each of ours is an explicit manager of one connection,
        # so nothing else is aborted; a thread still inside a transaction of this
        # heap finds its connection closed, and its next use raises HeapClosedError.
        for conn in list(self._conns):
            _close_quietly(conn)
        with private_files():
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<durable_heap.Heap {str(self.target)!r} {self.status.value}>"

    # -- per-thread (and per-task) connections ----------------------------------------

    # -- PROTECTED: used by the layers above (_versions, _workflows) ------------------------
    def _thread(self) -> _Slot:
        """The slot transactions run on here: this task's while it has one open, else this thread's."""
        task = self._task.get()
        if task is not None and task.conn is not None and task.thread == threading.get_ident():
            if task.task is not _running_task():
                raise self._foreign()
            if self.status is not HeapStatus.OPEN:
                raise self._closed()
            return task
        hook = _thread_hook
        if hook is not None:  # a face (the ASGI middleware) may hand this thread a request's slot
            slot = hook(self)
            if slot is not None:
                if self.status is not HeapStatus.OPEN:
                    raise self._closed()
                return slot
        local = self._local
        if local.conn is None:
            if self.status is not HeapStatus.OPEN:
                raise self._closed()
            tm = transaction.TransactionManager(explicit=True)
            conn = self.db.open(transaction_manager=tm)
            reset_watch(conn)  # it may come from ZODB's pool, used by a finished thread
            local.tm, local.conn = tm, conn
            local.closer = _Closer()
            local.generation = self._generation
            weakref.finalize(local.closer, _close_quietly, conn)
            with self._lock:
                self._conns.add(conn)
        elif self.status is not HeapStatus.OPEN:
            raise self._closed()
        elif local.generation != self._generation and not local.depth:
            self._drop_cache(local)
        return local

    # -- classes ------------------------------------------------------------------------

    def _find_class(self, conn: Any, module: str, name: str) -> Any:
        """ZODB's class factory: ZODB's own lookup, after the programs' rename tables,
        of the globals the allowlist admits (`ClassNotAllowedError` for the others).

        A program this process has not loaded is installed from the heap first
        (`_install_program`), never imported from whatever file ``sys.path`` finds.
        """
        module, name = self._renamed(module, name)
        root = module.partition(".")[0]
        # While another thread installs a program, its module is in sys.modules
        # half-built: wait for it (the lock) rather than read it.
        if self._installing or (root not in sys.modules and root not in program_roots):
            outcome = self._install_program(conn, root)
            if outcome == "installed":
                module, name = self._renamed(module, name)  # its rename table is known now
            elif outcome == "failed" or (outcome == "unknown" and name == "State"):
                # A program's class, but its definitions could not be installed, or
                # the root mapping's reference to a declared State before anything
                # can be read: not from the file on disk either.
                return State if name == "State" else _broken_class(module, name)
        if (module, name) not in self.allowlist.allowed:  # a set lookup, once known
            self.allowlist.check(conn, module, name)  # raises before anything is imported
        found = ZODB.broken.find_global(module, name)
        if name == "State" and isinstance(found, type) and issubclass(found, ZODB.broken.Broken):
            # A root stored as a program's declared State, opened where that program
            # is not loaded (a plain script, another program), or after the program
            # dropped its State class: it loads as a plain State, attributes intact.
            return State
        return found

    def _renamed(self, module: str, name: str) -> tuple[str, str]:
        new = self.renames.get(f"{module}.{name}") if self.renames else None
        if new is None:
            return module, name
        module, _, name = new.rpartition(".")
        return module, name

    def _install_program(self, conn: Any, root: str) -> str:
        """If `root` is a program deployed in this heap, install its stored definitions.

        So that a process that never loaded the program (a plain script) gets its
        classes from the deployed version, not from a file that ``sys.path``
        happens to reach. Once per module name and process; see
        `install_stored_definitions` for the outcomes.
        """
        with self._programs_lock:
            if root in sys.modules or root in program_roots:
                return "installed"
            if root in self._installing:
                return "absent"
            if root in self._failed:
                return "failed"
            self._installing.add(root)
            try:
                if getattr(conn, "before", None) is not None:
                    # A historical connection (`state_at`): the current version is
                    # what the process installs, read through this thread's connection.
                    conn = self.connection
                outcome = self.install_definitions(conn, root)
                if outcome == "failed":
                    self._failed.add(root)  # not tried again at every lookup
                return outcome
            finally:
                self._installing.discard(root)

    def install_definitions(self, conn: Any, root: str) -> str:
        """Hook of the class lookup: install program `root`'s stored definitions, read through `conn`.

        The engine stores no programs, so here: "absent" (ZODB's own lookup
        decides). The version layer overrides it (`_versions.Versions`) to install
        a deployed program's current definitions; it returns "installed",
        "absent", "failed" (they need the program's top level: broken objects) or
        "unknown" (the root mapping itself is loading: nothing can be read yet).
        Called while an object loads, so it never begins or ends a transaction.
        """
        return "absent"

    def set_renames(self, program: str, table: dict[str, str]) -> dict[str, str]:
        """Make `table` the rename table of `program` (replacing its last one); return that."""
        old = self._renames_by_program.get(program, {})
        self._renames_by_program[program] = dict(table)
        merged: dict[str, str] = {}
        for t in self._renames_by_program.values():
            merged.update(t)
        self.renames = merged
        return old

    def classes_changed(self) -> None:
        """Loaded classes were replaced (a deploy): cached objects must be loaded again.

        This thread's connection drops its cache now (call it between
        transactions, or at the start of one before anything changed); other
        threads' connections do so at their next transaction.
        """
        self._generation += 1
        ZODB.Connection.resetCaches()  # connections resting in ZODB's pool (tasks' too)
        local: _Slot = self._own_task() or self._local
        if local.conn is not None:
            self._drop_cache(local)

    def _drop_cache(self, local: _Slot) -> None:
        reset_watch(local.conn)
        local.conn._resetCache()
        local.state = None
        local.generation = self._generation

    def _own_task(self) -> _TaskSlot | None:
        """This task's open transaction slot, or None (no side effects, never raises)."""
        task = self._task.get()
        if (task is not None and task.conn is not None and task.thread == threading.get_ident()
                and task.task is _running_task()):
            return task
        return None

    def _foreign(self) -> TransactionOwnerError:
        return TransactionOwnerError(
            f"this code runs in an asyncio task (or callback) that did not open the transaction "
            f"in progress on the heap {self.target}: it was created inside that transaction "
            "(asyncio.create_task, gather and call_soon copy the context), and a transaction "
            "belongs to one task, so it is not shared. Await the work directly in the task "
            "that opened the transaction to make it part of it, or start the task after that "
            "transaction ends, so that it opens its own."
        )

    def _closed(self) -> DurableHeapError:
        if self.status is HeapStatus.FAILED:
            return StorageError(
                f"the heap {self.target} was closed after {self._failure}, which left the "
                "file's durable state unknown: open it again with durable_heap.open() (it "
                "opens with every acknowledged commit; the transaction that failed may or "
                "may not be in it)."
            )
        return HeapClosedError(f"the heap {self.target} is closed: open it again with durable_heap.open()")

    @property
    def state(self) -> State:
        """The root `State` of this heap, as this thread sees it.

        Inside a transaction, everything read is one consistent snapshot. Outside
        one, each access first catches up with what other threads and processes
        have committed (reads work; changes are refused).
        """
        local = self._thread()
        if not local.depth:
            try:
                local.tm.get()
            except transaction.interfaces.NoTransaction:
                # ZODB trap: ``conn.sync()`` would be the documented call, but it is
                # ``transaction_manager.begin()``, and with our explicit managers that
                # opens a transaction nobody ends (later changes would then be taken
                # in instead of refused). ``newTransaction(None)`` is what begin() asks
                # of the connection (a storage sync and the invalidations since),
                # without a transaction; the managers' synchronizers (our `_Watch`) are
                # not told, so their read caches are dropped by hand below.
                try:
                    local.conn.newTransaction(None)  # see the latest commits
                except Exception as exc:
                    if _is_fault(exc):
                        self._discard(local)  # it may have lost invalidations half-way
                    if _disconnected(exc):
                        raise self._server_lost(None, unknown=False) from exc
                    raise
                forget_reads(local.conn)
        st = local.state
        if st is None:
            st = local.state = local.conn.root()[ROOT_KEY]
        return st

    @property
    def connection(self) -> Any:
        """This thread's ZODB connection, or this task's inside its transaction (for advanced use)."""
        return self._thread().conn

    @property
    def transaction_manager(self) -> Any:
        """This thread's (explicit) transaction manager, or this task's inside its transaction."""
        return self._thread().tm

    @property
    def in_transaction(self) -> bool:
        """True inside `transaction()` or an action, in this thread or asyncio task."""
        task = self._task.get()
        if task is not None and task.conn is not None and task.thread == threading.get_ident():
            return task.task is _running_task() and task.depth > 0  # another task's: not ours
        return self._thread().depth > 0

    @property
    def max_async_transactions(self) -> int:
        """How many async transactions may be open at once per event loop (default 32).

        ``async with heap.transaction()`` and async actions beyond it wait
        (``await``) for a place; each open one holds a connection and its cache.
        """
        return self._max_async

    @max_async_transactions.setter
    def max_async_transactions(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"max_async_transactions must be an int of at least 1, not {n!r}")
        self._max_async = n

    def activate(self) -> _Activation:
        """Make this heap what ``durable_heap.state`` refers to in this context.

        Takes effect at once; used as a context manager, it is undone on exit.
        """
        return _Activation(self)

    # -- transactions -------------------------------------------------------------------

    def transaction(self, note: str | None = None) -> _Block:
        """One atomic transaction: commit on normal exit, abort on an exception.

        ``with heap.transaction() as state:``, or in a coroutine ``async with``
        (which waits for a place under `max_async_transactions`). A conflict
        with a concurrent transaction raises `ConflictError` (a ``with`` block
        cannot be re-run): use `action` or `attempts` to retry. Inside another
        transaction of this heap and thread (or asyncio task), it joins that one.
        Without a `note`, its note names where it was written (``transaction in
        add_user (app.py:12)``), so the heap's history has no blank entries.
        """
        if note is None:  # the caller's code and line only: formatted if it is the outermost
            caller = sys._getframe(1)
            return _Block(self, None, caller.f_code, caller.f_lineno)
        return _Block(self, note)

    @contextlib.asynccontextmanager
    async def _async_block(self, note: str | None) -> AsyncIterator[State]:
        local = self._thread()
        if local.depth:
            local.depth += 1
            try:
                yield self.state
            finally:
                local.depth -= 1
            return
        task = _require_task("async with heap.transaction()")
        gate = self._gate()
        await gate.acquire()
        try:
            with self._task_transaction(task, note, gate):
                yield self.state
        except RETRIED as exc:
            raise conflict(1, note, exc, local.conn, retried=False) from exc

    def _outermost(self, local: _Slot, task: Any,
                   note: str | None) -> contextlib.AbstractContextManager[None]:
        """The outermost transaction here: on this thread's connection, or a task's own."""
        if task is None:
            return self._transaction(local, note)
        return self._task_transaction(task, note, None)

    @contextlib.contextmanager
    def _task_transaction(self, task: Any, note: str | None, gate: _AsyncGate | None) -> Iterator[None]:
        """`task`'s outermost transaction, on a connection of its own from ZODB's pool.

        `gate` holds the place the caller awaited; without one (a sync ``with``
        in a coroutine) a place is taken without waiting (see `_AsyncGate`).
        """
        if gate is None:
            gate = self._gate()
            gate.take()
        try:
            slot = self._open_task(task)
            try:
                with self._transaction(slot, note):
                    yield
            finally:
                self._close_task(slot)
        finally:
            gate.release()

    def _open_task(self, task: Any) -> _TaskSlot:
        if self.status is not HeapStatus.OPEN:
            raise self._closed()
        slot = self._new_slot(task)
        self._task.set(slot)
        return slot

    # -- PROTECTED: also used by the request middleware (_requests: a pool thread's slot) ----
    def _new_slot(self, task: Any) -> _TaskSlot:
        """A slot on a connection of its own, with its own explicit transaction manager."""
        tm = transaction.TransactionManager(explicit=True)
        # A pooled connection's cache was reset by ZODB at this open if classes
        # changed since it was last used (`ZODB.Connection.resetCaches`, called by
        # `classes_changed`): the generation starts current.
        conn = self.db.open(transaction_manager=tm)
        reset_watch(conn)  # from ZODB's pool: what its watch holds belongs to its last user
        slot = _TaskSlot(conn, tm, task, self._generation)
        with self._lock:
            self._conns.add(conn)
        return slot

    def _close_task(self, slot: _TaskSlot) -> None:
        """The task's transaction ended: its connection goes back to ZODB's pool."""
        self._task.set(None)
        conn, slot.conn, slot.task, slot.state = slot.conn, None, None, None
        if conn is None:  # already discarded (a fault)
            return
        with self._lock:
            self._conns.discard(conn)
        _close_quietly(conn)  # nothing is open any more; resets the watch, then back to the pool

    def _gate(self) -> _AsyncGate:
        loop = _asyncio().get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            with self._lock:
                gate = self._gates.setdefault(loop, _AsyncGate(self))
        return gate

    # -- PROTECTED: used by the layers above (_versions: a deploy's transactions) -------------
    def _transaction(self, local: _Slot, note: str | None) -> contextlib.AbstractContextManager[None]:
        """The outermost transaction; TransientError propagates (for retries).

        A fault (`_is_fault`: the storage or the link to it failed) in any phase
        throws the connection away (`_discard`) and raises our error (`_fault`),
        which says whether the transaction may have been committed. Conflicts and
        the program's own errors abort as ZODB intends, on the same connection.
        (`_Transaction`: a class, not a generator, on every commit's path.)
        """
        return _Transaction(self, local, note)

    def _discard(self, local: _Slot) -> None:
        """Throw this thread's connection away after a fault: it is never used again.

        After a fault, above all one that cut off two-phase commit, the
        connection's cache may hold objects of a transaction that did or did not
        commit: ZODB's clean-up (``Transaction._cleanup``: ``abort`` and
        ``tpc_abort`` of each resource) is meant to undo them, but it logs and
        skips whatever raises in turn, and ``Connection.tpc_abort`` invalidates
        its objects only after its storage's ``tpc_abort`` returned. (The
        errors of issue #12 came from reused oids, see `_zeo._client_class`;
        this makes sure no other leftover can surface.) ZODB trap:
        ``Connection.close()`` returns a connection to the DB's pool *with its
        cache*, for the next ``db.open()`` to hand out. So instead its objects are
        ghosted (one the program kept cannot show the failed transaction's
        state), it is taken out of the pool (``DB.pool.all``, under the DB's
        lock), and its storage instance and cache are released, as the pool does
        with connections it evicts (``Connection._release_resources``). The
        thread's next transaction opens a new connection and transaction manager.

        ZEO's own client cache needs nothing: it takes a commit's records only
        once the server has answered ``tpc_finish``, and when that call fails ZEO
        drops the server connection and, on reconnecting, invalidates whatever
        the server committed meanwhile (``ClientStorage.tpc_finish``, ``verify``).
        """
        conn = local.conn
        local.conn = local.tm = local.state = None
        local.depth = 0
        if conn is None:
            return
        with self._lock:
            self._conns.discard(conn)
        tm = conn.transaction_manager
        if tm is not None:
            with contextlib.suppress(Exception):
                tm.abort()  # its clean-up may fail again: the connection goes anyway
        with contextlib.suppress(Exception):
            reset_watch(conn)
        db = self.db
        with db._lock:
            db.pool.all.discard(conn)  # open connections are in `all` only, not `available`
        with contextlib.suppress(Exception):
            cache = conn._cache
            cache.invalidate(list(cache.cache_data))  # ghosts even changed objects
        with contextlib.suppress(Exception):
            conn._release_resources()
        # A later close() (the thread's finalizer below) neither returns it to
        # the pool nor loads: ZODB checks `opened` for both.
        conn.opened = None
        local.closer = None

    def _fault(self, exc: BaseException, note: str | None, *, unknown: bool) -> DurableHeapError:
        """Our error for a fault that cut a transaction off (see `_transaction`).

        `unknown`: the fault came after every vote, so the storage may have
        committed it. A local storage is then closed for good (`_fail`).
        """
        if self.status is not HeapStatus.OPEN:
            closed = self._closed()  # failed (or closed) by another thread meanwhile
            if unknown and self.status is HeapStatus.FAILED:
                # Group commit: this one waited on the same failed fsync (_groupcommit).
                return StorageError(f"{closed} This transaction had been accepted too, and may "
                                    "or may not have been committed: check before repeating it.",
                                    outcome_unknown=True)
            return closed
        if _disconnected(exc):
            return self._server_lost(note, unknown=unknown)
        what = f" during {note}" if note else ""
        reason = _reason(exc)
        if not unknown:
            return StorageError(
                f"writing to the heap {self.target}{what} failed: {reason}. Nothing of the "
                "transaction was committed, and the heap is as it was after its last commit: "
                f"{remedy(exc)}",
                outcome_unknown=False,
            )
        if self.target.scheme in ("zeo", "postgresql"):
            server = "PostgreSQL server" if self.target.scheme == "postgresql" else "ZEO server"
            return StorageError(
                f"the {server} at {self.target} failed{what} after it had accepted the "
                f"transaction: {reason}. The transaction may or may not have been committed; "
                "check before repeating it.",
                outcome_unknown=True,
            )
        self._fail(f"a failed write ({reason})")
        return StorageError(
            f"writing to the heap {self.target}{what} failed while the transaction was being "
            f"made durable: {reason}. The transaction may or may not have been committed; "
            "check before repeating it. The heap was closed, because the file's durable "
            "state is unknown: open it again with durable_heap.open() (it opens with every "
            "acknowledged commit).",
            outcome_unknown=True,
        )

    def _fail(self, why: str) -> None:
        """Close the storage for good: its file's durable state is unknown.

        ZODB's FileStorage has already closed its files (``FileStorage._finish``);
        closing the DB also releases the lock file, so that the heap can be
        opened again in this process. Every later use raises (`_closed`).
        """
        self.status = HeapStatus.FAILED
        self._failure = why
        with private_files(), contextlib.suppress(Exception):
            self.db.close()

    def _server_lost(self, note: str | None, *, unknown: bool) -> ServerUnavailableError:
        what = f" during {note}" if note else ""
        fate = (
            "the transaction may or may not have been committed (the connection was lost "
            "after the server had accepted it): check before repeating it"
            if unknown
            else "the transaction was aborted and nothing of it was committed"
        )
        server = "PostgreSQL server" if self.target.scheme == "postgresql" else "ZEO server"
        return ServerUnavailableError(
            f"lost the connection to the {server} at {self.target}{what}: {fate}. "
            "Later transactions reconnect by themselves once the server is back.",
            outcome_unknown=unknown,
        )

    def attempts(self, attempts: int | None = None, note: str | None = None) -> Iterator[_Attempt]:
        """Retry a ``with`` block on conflicts::

            for attempt in heap.attempts():
                with attempt as state:
                    state.count += 1
        """
        if note is None:  # as for `transaction`: where the loop was written
            caller = sys._getframe(1)
            note = _block_note(caller.f_code, caller.f_lineno)
        total = attempts or self.max_attempts
        for n in range(1, total + 1):
            attempt = _Attempt(self, n, total, note)
            yield attempt
            if attempt.done:
                return
            pause(n)

    def run(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``func(*args, **kwargs)`` as one transaction, retrying on conflicts.

        For an ``async def`` function it returns the coroutine to await.
        """
        if inspect.iscoroutinefunction(func):
            return self._arun(func, args, kwargs, None, self.max_attempts)
        return self._run(func, args, kwargs, None, self.max_attempts)

    # -- PROTECTED: used by the layers above (_versions: program calls) ----------------------
    def _run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        note: str | None,
        attempts: int,
    ) -> Any:
        local = self._thread()
        if local.depth:
            return func(*args, **kwargs)  # nested: joins the outer transaction
        if note is None:
            note = call_note(getattr(func, "__qualname__", repr(func)), args, kwargs, func)
        task = _running_task()  # a sync action called from a coroutine: on the task's own connection

        def attempt() -> Any:
            with self._outermost(local, task, note):
                return func(*args, **kwargs)

        return retry(attempt, attempts=attempts, note=note, how=ACTION_ATTEMPTS, name_record=True,
                     conn=lambda: local.conn)

    async def _arun(
        self,
        func: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        note: str | None,
        attempts: int,
    ) -> Any:
        """`_run` for an ``async def`` function: in this task, backing off with ``asyncio.sleep``."""
        local = self._thread()
        if local.depth:
            return await func(*args, **kwargs)  # nested: joins the outer transaction
        task = _require_task(f"the async action {getattr(func, '__qualname__', func)!s}")
        if note is None:
            note = call_note(getattr(func, "__qualname__", repr(func)), args, kwargs, func)
        gate = self._gate()

        async def attempt() -> Any:
            await gate.acquire()
            with self._task_transaction(task, note, gate):
                return await func(*args, **kwargs)

        # Backing off with asyncio.sleep: the place in the gate is free meanwhile.
        return await aretry(attempt, attempts=attempts, note=note, how=ACTION_ATTEMPTS,
                            name_record=True, sleep=_asyncio().sleep)

    @overload
    def action(self, func: F, /) -> F: ...

    @overload
    def action(
        self, func: None = None, /, *, attempts: int | None = None, note: str | None = None
    ) -> Callable[[F], F]: ...

    def action(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        attempts: int | None = None,
        note: str | None = None,
    ) -> Any:
        """Decorator: every call of the function is one transaction, retried on conflicts.

        On an ``async def`` function the wrapper is ``async def`` too: each call
        is a transaction of the calling asyncio task (see `transaction`).

        >>> import durable_heap as dh
        >>> heap = dh.open("memory://")
        >>> @heap.action
        ... def add_user(name):
        ...     heap.state.setdefault("users", {})[name] = {"tags": []}
        ...     return len(heap.state.users)
        >>> add_user("ann"), add_user("bob")
        (1, 2)
        >>> heap.close()
        """

        def decorate(f: F) -> F:
            if inspect.iscoroutinefunction(f):

                @functools.wraps(f)
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    if call_async_action is not None:
                        return await call_async_action(self, f, args, kwargs, lambda: self._arun(
                            f, args, kwargs, note, attempts or self.max_attempts))
                    return await self._arun(f, args, kwargs, note, attempts or self.max_attempts)

                for hook in on_action:
                    hook(self, f, awrapper)
                return awrapper  # type: ignore[return-value]

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if call_action is not None:
                    return call_action(self, f, args, kwargs, lambda: self._run(
                        f, args, kwargs, note, attempts or self.max_attempts))
                return self._run(f, args, kwargs, note, attempts or self.max_attempts)

            for hook in on_action:
                hook(self, f, wrapper)
            return wrapper  # type: ignore[return-value]

        if func is not None:
            return decorate(func)  # type: ignore[arg-type]
        return decorate

    # -- maintenance -----------------------------------------------------------------------

    def pack(self, days: float = DEFAULT_PACK_DAYS) -> None:
        """Drop revisions older than `days` (default a week) that nothing current refers to."""
        self._thread()
        with private_files():
            self.db.pack(days=days)


@contextlib.contextmanager
def read_transaction(heap: HeapEngine) -> Iterator[Any]:
    """A transaction that only reads, on this thread's (or task's) connection, which it yields.

    Begun here and always aborted, so nothing changed in it is kept; inside a
    transaction in progress here, it joins that one and ends nothing. For the
    layers above (reading version records, rendering state in the CLI, loading a
    program to read its objects). What runs in it as a transaction of its own (an
    action, ``heap.transaction()``, a program's top-level cron or subscription
    declaration) joins it, and is aborted with it.
    """
    local = heap._thread()
    if local.depth:
        yield local.conn
        return
    tm = local.tm
    tm.begin()
    local.depth = 1  # (as `_Transaction`: a nested one joins, instead of ZODB's AlreadyInTransaction)
    try:
        yield local.conn
    finally:
        local.depth = 0
        tm.abort()


class _Attempt:
    """One try of `Heap.attempts`: a context manager around one transaction."""

    def __init__(self, heap: HeapEngine, number: int, total: int, note: str | None) -> None:
        self.heap, self.number, self.total, self.note = heap, number, total, note
        self.done = False
        self._cm: Any = None
        self._conn: Any = None

    def __enter__(self) -> State:
        local = self.heap._thread()
        if local.depth:
            raise RuntimeError("heap.attempts() cannot run inside another transaction")
        self._cm = self.heap._outermost(local, _running_task(), self.note)
        self._cm.__enter__()
        self._conn = self.heap._thread().conn  # a task's own, once its transaction is open
        return self.heap.state

    def __exit__(self, tp: Any, value: Any, tb: Any) -> bool:
        try:
            self._cm.__exit__(tp, value, tb)
        except RETRIED as exc:
            if self.number == self.total:
                raise conflict(self.number, self.note, exc, self._conn, how=LOOP_ATTEMPTS) from exc
            return True  # swallowed: the loop tries again
        if tp is None:
            self.done = True
            return False
        if isinstance(value, RETRIED):
            if self.number == self.total:
                raise conflict(self.number, self.note, value, self._conn, how=LOOP_ATTEMPTS) from value
            return True
        self.done = True
        return False


class _Transaction:
    """`HeapEngine._transaction`'s context manager (see there).

    Written out as ``__enter__``/``__exit__`` rather than a ``contextlib``
    generator: the generator's machinery (its object, ``next``, ``throw``) was
    about a fifth of the ``heap.transaction()`` block's own cost at every commit.
    ``__exit__`` returns None after aborting, so the body's exception goes on
    as it is (as the generator's bare ``raise`` did); the errors it raises
    itself replace it, chained to it.
    """

    __slots__ = ("heap", "local", "note", "tm", "txn")

    def __init__(self, heap: HeapEngine, local: _Slot, note: str | None) -> None:
        self.heap, self.local, self.note = heap, local, note
        self.tm: Any = None
        self.txn: Any = None

    def __enter__(self) -> None:
        heap, local = self.heap, self.local
        self.tm = tm = local.tm
        check = begin(heap, local.conn) if begin is not None else None
        try:
            txn = tm.begin()  # under ZEO, asks the server for the latest commits
        except BaseException as exc:
            # A begin that failed half-way may have dropped invalidations on the floor.
            heap._discard(local)
            if _disconnected(exc) or heap.status is not HeapStatus.OPEN:
                raise heap._fault(exc, self.note, unknown=False) from exc
            raise
        if self.note:
            txn.note(self.note)
        if check is not None:
            txn.addBeforeCommitHook(check)
        self.txn = txn
        local.depth = 1

    def __exit__(self, tp: Any, value: Any, tb: Any) -> None:
        heap, local, note, tm = self.heap, self.local, self.note, self.tm
        local.depth = 0
        if tp is not None:
            if value is None:  # called by hand with a type only
                value = tp()
            if _is_fault(value, in_program=True) or heap.status is not HeapStatus.OPEN:
                heap._discard(local)  # a load failed: nothing was sent to be committed
                if _disconnected(value) or heap.status is not HeapStatus.OPEN:
                    raise heap._fault(value, note, unknown=False) from value
                return
            try:
                tm.abort()
            except BaseException:
                heap._discard(local)
                raise
            return
        txn = self.txn
        try:
            check_before_commit(local.conn)
            tm.commit()
        except RETRIED as exc:
            if _disconnected(exc):  # transient to ZEO, but a retry could commit twice
                unknown = _voted(txn)
                heap._discard(local)
                raise heap._fault(exc, note, unknown=unknown) from exc
            tm.abort()
            raise
        except BaseException as exc:
            if _is_fault(exc) or heap.status is not HeapStatus.OPEN:
                unknown = _voted(txn)
                heap._discard(local)
                raise heap._fault(exc, note, unknown=unknown) from exc
            err = translate_storage_error(exc, str(heap.target), action="commit")
            tm.abort()
            if err is exc:
                raise
            raise err from exc
        for hook in after_commit:
            hook(heap)


class _Block:
    """What `Heap.transaction` returns: a ``with`` block, or an ``async with`` one.

    The sync form runs here rather than in a generator: it is the hot path of
    every thread, and one generator fewer keeps it as cheap as before asyncio.
    """

    __slots__ = ("_async", "_joined", "_sync", "heap", "line", "note", "where")

    def __init__(self, heap: HeapEngine, note: str | None, where: Any = None, line: int = 0) -> None:
        self.heap, self.note = heap, note
        self.where, self.line = where, line  # the caller's code object: a default note (`_notes`)
        self._sync: Any = None  # the outermost transaction's context manager
        self._joined: _Slot | None = None  # or the slot of the outer transaction joined
        self._async: Any = None

    def __enter__(self) -> State:
        if self._sync is not None or self._joined is not None or self._async is not None:
            raise self._in_use()
        heap = self.heap
        local = heap._thread()
        if local.depth:  # nested: joins the outer transaction
            local.depth += 1
            self._joined = local
        else:
            if self.note is None:
                self.note = _block_note(self.where, self.line)
            task = _running_task()
            cm = heap._outermost(local, task, self.note)
            try:
                cm.__enter__()
            except RETRIED as exc:
                raise conflict(1, self.note, exc, None, retried=False) from exc
            self._sync = cm
            if task is None and local.state is not None:
                return local.state  # this thread's slot, in its transaction: what heap.state gives
        try:
            return heap.state
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, tp: Any, value: Any, tb: Any) -> None:
        joined, cm = self._joined, self._sync
        self._joined = self._sync = None
        if joined is not None:
            joined.depth -= 1
            return
        try:
            cm.__exit__(tp, value, tb)  # aborts on an exception, which it never swallows
        except RETRIED as exc:
            raise conflict(1, self.note, exc, None, retried=False) from exc  # a conflict at commit
        if isinstance(value, RETRIED):
            raise conflict(1, self.note, value, None, retried=False) from value  # inside the block

    async def __aenter__(self) -> State:
        if self._sync is not None or self._joined is not None or self._async is not None:
            raise self._in_use()
        if self.note is None:
            self.note = _block_note(self.where, self.line)
        self._async = self.heap._async_block(self.note)
        try:
            return await self._async.__aenter__()  # type: ignore[no-any-return]
        except BaseException:
            self._async = None  # never entered (cancelled while waiting for a place)
            raise

    async def __aexit__(self, tp: Any, value: Any, tb: Any) -> bool | None:
        cm, self._async = self._async, None
        return await cm.__aexit__(tp, value, tb)  # type: ignore[no-any-return]

    def _in_use(self) -> TransactionOwnerError:
        return TransactionOwnerError(
            "this heap.transaction() block is open already (in another task?): a block is one "
            "transaction of one task, so write `with heap.transaction()` for each block, "
            "not one object shared by several"
        )


#: `_block_note`'s cache: (id of the code, line) -> (the code, its note).
_BLOCK_NOTES: dict[tuple[int, int], tuple[Any, str | None]] = {}


def _block_note(code: Any, line: int) -> str | None:
    """`_notes.block_note`, looked up by the code's identity. Its own cache hashes the code
    object, which CPython computes afresh each time over the code's name, bytecode and
    constants: about 14k instructions, 2% of a one-entry commit."""
    key = (id(code), line)
    hit = _BLOCK_NOTES.get(key)
    if hit is not None and hit[0] is code:  # the code is kept alive: its id is not reused
        return hit[1]
    note = _notes.block_note(code, line)
    if len(_BLOCK_NOTES) >= 4096:
        _BLOCK_NOTES.clear()
    _BLOCK_NOTES[key] = (code, note)
    return note


class _Activation:
    def __init__(self, heap: HeapEngine) -> None:
        self._token = _active.set(heap)

    def __enter__(self) -> Heap:
        heap = _active.get()
        assert heap is not None
        return cast("Heap", heap)

    def __exit__(self, *exc: object) -> None:
        _active.reset(self._token)


def _asyncio() -> Any:
    """The asyncio module, imported only where a coroutine runs (``import durable_heap`` stays light)."""
    import asyncio

    return asyncio


def _running_task() -> Any:
    """The asyncio task running in this thread, or None (no loop, or a callback)."""
    aio = sys.modules.get("asyncio")
    if aio is None:  # never imported: no event loop can be running
        return None
    loop = aio._get_running_loop()  # public as asyncio._get_running_loop: None, never raises
    if loop is None:
        return None
    return aio.current_task(loop)


def _require_task(what: str) -> Any:
    task = _running_task()
    if task is None:
        raise TransactionOwnerError(
            f"{what} must run inside an asyncio task (a coroutine run by asyncio.run, a task, "
            "or an asyncio-based framework), which owns the transaction; outside one, use "
            "`with heap.transaction()` or a sync action"
        )
    return task


def _stale_format(target: Target, root: Any) -> bool:
    """Whether an existing heap's format marker is older than this version's.

    A newer one (or one that is not a number) is refused: this version cannot
    know what such a heap holds.
    """
    found = root.get(FORMAT_KEY, 1)  # 0.1 wrote none
    if not isinstance(found, int) or found > NEWEST_FORMAT:
        known = f"durable_heap {FORMAT_SINCE[NEWEST_FORMAT]}"
        raise StorageError(
            f"the heap {target} has heap format {found!r}, written by a newer durable_heap "
            f"than this one ({known}, which reads heap formats 1 to {NEWEST_FORMAT}): upgrade "
            "durable_heap (pip install -U durable-heap) to open it. The heap was not changed. "
            "Under ZEO, upgrade the server and every client together."
        )
    return found < FORMAT


#: Set by `set_thread_hook`: asked by `Heap._thread` for the slot this thread runs on, before
#: the thread's own connection; None (the default) costs one global read.
_thread_hook: Callable[[HeapEngine], _TaskSlot | None] | None = None


def set_thread_hook(hook: Callable[[HeapEngine], _TaskSlot | None] | None) -> None:
    """PROTECTED (for `durable_heap._requests`): register the hook `Heap._thread` asks first.

    An upper layer's policy without an upward import: the request scope of the
    ASGI middleware hands a sync view in a thread pool its own transaction slot.
    """
    global _thread_hook
    _thread_hook = hook


def _close_quietly(conn: Any) -> None:
    try:
        reset_watch(conn)
        tm = conn.transaction_manager
        if tm is not None:
            try:
                tm.abort()
            except transaction.interfaces.NoTransaction:
                pass
        conn.close()
    except Exception:  # noqa: BLE001,S110 - closing at shutdown must not raise
        pass


# --- the active heap and the `state` proxy ------------------------------------------------

_active: contextvars.ContextVar[HeapEngine | None] = contextvars.ContextVar(
    "durable_heap_active", default=None)
#: Heaps open in this process, oldest first: `state` falls back to the newest.
_open_heaps: list[HeapEngine] = []


def active_heap() -> Heap:
    """The heap `state` refers to here: the activated one, else the newest still open.

    Typed as the public `Heap`: every heap is one (`durable_heap.open` makes them);
    the engine itself uses only the engine's part of it.
    """
    heap = _active.get()
    if heap is not None:
        if heap.status is HeapStatus.CLOSED:
            raise HeapClosedError(
                f"state refers to the heap {heap.target}, which is closed: open it again "
                "with durable_heap.open() or activate another heap"
            )
        return cast("Heap", heap)
    if _open_heaps:
        return cast("Heap", _open_heaps[-1])
    raise NoActiveHeapError(
        "no heap is open, so `state` has nothing to refer to: call "
        "durable_heap.open('data/app.fs') first, or run your program with "
        "`durable-heap call program.py function`."
    )


def _active_root() -> Any:
    """For error paths: the state of the active heap in this thread, if any.

    Not `Heap.state`: that would first catch up with other commits.
    """
    local = active_heap()._thread()
    return local.state if local.state is not None else local.conn.root()[ROOT_KEY]


_paths.current_root = _active_root


class _StateProxy:
    """``durable_heap.state``: the `State` of the active heap, for this thread."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # protocol probes (copy, inspect) are not state
        return getattr(active_heap().state, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(active_heap().state, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(active_heap().state, name)

    def __getitem__(self, name: str) -> Any:
        return active_heap().state[name]

    def __setitem__(self, name: str, value: Any) -> None:
        active_heap().state[name] = value

    def __delitem__(self, name: str) -> None:
        del active_heap().state[name]

    def __contains__(self, name: object) -> bool:
        return name in active_heap().state

    def __iter__(self) -> Iterator[str]:
        return iter(active_heap().state)

    def __len__(self) -> int:
        return len(active_heap().state)

    def __dir__(self) -> list[str]:
        try:
            return sorted(set(dir(State)) | set(active_heap().state))
        except NoActiveHeapError:
            return sorted(dir(State))

    def __repr__(self) -> str:
        try:
            return repr(active_heap().state)
        except NoActiveHeapError:
            return "<durable_heap.state: no heap open>"

    def __eq__(self, other: object) -> bool:
        return active_heap().state == other

    __hash__ = object.__hash__


#: The state of the active heap; see `active_heap`.
state: Any = _StateProxy()
