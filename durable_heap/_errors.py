"""The exceptions durable_heap raises, and the one place that translates ZODB's.

Hierarchy::

    DurableHeapError
     ├── NotPersistableError (also TypeError)   a value that cannot be stored
     ├── NoTransactionError (also RuntimeError) a change made outside a transaction
 ├── StaleReferenceError (also RuntimeError) a plain object changed after it left state
     ├── TransactionOwnerError (also RuntimeError)  an asyncio task used another's transaction
     ├── WorkflowError (also RuntimeError)      durable execution misused (see `_workflows`)
     │    └── NonDeterminismError               a workflow's code no longer matches its journal
     ├── PromiseTimeout (also TimeoutError)     a promise's wait ran out of time
     ├── ReadOnlyRequestError (also RuntimeError)   a GET (or other read-only request) changed state
     ├── ConflictError                          concurrent changes, retries used up
     ├── JSONFormError (also ValueError)        a value that tagged JSON cannot carry, or bad tagged JSON
     ├── NoActiveHeapError (also RuntimeError)  `state` used with no heap open
     ├── HeapClosedError (also RuntimeError)    a closed heap was used
     ├── StorageError                           the storage cannot be opened or used
     │    ├── HeapLockedError                   the FileStorage is held by a process
     │    ├── NotAHeapError                     the file is not a FileStorage
     │    ├── UnknownTargetError (also ValueError)  a target string we cannot parse
     │    ├── ServerUnavailableError (also ConnectionError)  no ZEO server answers
     │    ├── CorruptHeapError                  a damaged record or file (never read as whole)
     │    └── ClassNotAllowedError              a stored record names a class outside the allowlist
     └── ProgramError                           a program cannot be loaded or run
          ├── ProgramNotFoundError (also FileNotFoundError)
          ├── FunctionNotFoundError (also AttributeError)
          ├── VersionNotFoundError (also LookupError)  no such deployed version
          └── DeployError                       a deploy failed; nothing was committed

Everything a user can cause ends as one of these, with a message that says what
went wrong and what to do. ZODB's, ZEO's, zc.lockfile's and the OS's errors are
mapped to these in one place, `durable_heap._errormap.translate_storage_error`
(most specific first), which also holds the classifiers the heap's transaction
runner uses to tell a fault from a conflict; the runner words a fault that cut a
transaction off itself, since that depends on the heap's state.
"""

from __future__ import annotations

__all__ = [
    "ClassNotAllowedError",
    "ConflictError",
    "CorruptHeapError",
    "DeployError",
    "DurableHeapError",
    "FunctionNotFoundError",
    "HeapClosedError",
    "HeapLockedError",
    "JSONFormError",
    "NoActiveHeapError",
    "NoTransactionError",
    "NonDeterminismError",
    "NotAHeapError",
    "NotPersistableError",
    "ProgramError",
    "ProgramNotFoundError",
    "PromiseTimeout",
    "ReadOnlyRequestError",
    "ServerUnavailableError",
    "StaleReferenceError",
    "StorageError",
    "TransactionOwnerError",
    "UnknownTargetError",
    "VersionNotFoundError",
    "WorkflowError",
]


class DurableHeapError(Exception):
    """Base class of every error durable_heap raises on purpose."""


class NotPersistableError(DurableHeapError, TypeError):
    """A value that cannot be stored: a lambda, generator, lock, socket, file...

    `path` names where it was found, starting at ``state`` when known
    (``state.users['ann'].callback``); `value_type` is the offending type.
    """

    def __init__(self, path: str, value: object, reason: str = "") -> None:
        self.path = path
        self.value_type = type(value)
        tname = _type_name(type(value))
        why = f" ({reason})" if reason else ""
        msg = (
            f"{path} cannot be stored: a {tname} is not persistable{why}. "
            "Store plain data (numbers, strings, containers, dataclasses, "
            "durable_heap.Object instances) and keep functions, open files, "
            "locks and connections out of state."
        )
        super().__init__(msg)


class NoTransactionError(DurableHeapError, RuntimeError):
    """A durable object was changed outside any transaction."""


class StaleReferenceError(DurableHeapError, RuntimeError):
    """A plain object kept from an earlier transaction was changed: the change
    would not reach state, so the transaction is aborted instead."""


class TransactionOwnerError(DurableHeapError, RuntimeError):
    """A transaction was used by code that does not own it, so it was not shared.

    A transaction belongs to one thread or one asyncio task. An asyncio task (or
    callback) created inside another task's transaction inherits its context, and
    is refused that transaction; an async transaction outside an asyncio task has
    no owner at all.
    """


class WorkflowError(DurableHeapError, RuntimeError):
    """Durable execution was misused: a wait outside a workflow, a change to state in a
    workflow's body outside a step, a closure given to a timer, an unknown workflow..."""


class NonDeterminismError(WorkflowError):
    """A workflow's code no longer matches its journal: replay met another step.

    `step` is the step number (from 1), `expected` what the journal holds there
    and `found` what the code did instead.
    """

    def __init__(self, message: str, *, step: int = 0, expected: str = "", found: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.expected = expected
        self.found = found


class PromiseTimeout(DurableHeapError, TimeoutError):  # noqa: N818 - the contract's name
    """``promise.wait(timeout=...)`` ran out of time before the promise was resolved."""

class ReadOnlyRequestError(DurableHeapError, RuntimeError):
    """A request of a read-only method (GET, HEAD, OPTIONS by default) changed state.

    The transaction middlewares (`durable_heap.asgi`, `durable_heap.wsgi`) never
    commit such a request: its changes were dropped, and it is answered 500.
    """


class ConflictError(DurableHeapError):
    """Concurrent transactions kept conflicting and the retries were used up."""


class JSONFormError(DurableHeapError, ValueError):
    """A value cannot be written as tagged JSON (a function, an unknown kind of
    object), or a text is not valid tagged JSON (a malformed or unknown tag).

    The message names the place (``value['users'][2]``); see `durable_heap._jsonform`.
    """


class NoActiveHeapError(DurableHeapError, RuntimeError):
    """`durable_heap.state` was used while no heap is open."""


class HeapClosedError(DurableHeapError, RuntimeError):
    """A heap was used after `close()`."""


class StorageError(DurableHeapError):
    """The storage behind a heap cannot be opened or used.

    Raised for a transaction that a fault cut off (a lost ZEO server, a failed
    write), `outcome_unknown` says whether it may have been committed: False when
    nothing of it was (it can simply run again), True when the fault came after
    the storage had accepted it (check before repeating it). The message says the same.
    """

    def __init__(self, *args: object, outcome_unknown: bool = False) -> None:
        super().__init__(*args)
        self.outcome_unknown = outcome_unknown


class HeapLockedError(StorageError):
    """The FileStorage is open in another process (or elsewhere in this one)."""


class NotAHeapError(StorageError):
    """The file exists but is not a ZODB FileStorage; it was left untouched."""


class UnknownTargetError(StorageError, ValueError):
    """A target string names a scheme durable_heap does not know, or bad options."""


class ServerUnavailableError(StorageError, ConnectionError):
    """The ZEO server of a ``zeo://`` heap did not answer in time, or went away
    during a transaction (which was then aborted)."""


class CorruptHeapError(StorageError):
    """A record or the heap file is damaged: it is never opened or read as if whole.

    The message names the place (file, offset, oid, class where known) and the way
    to recover; `oid` (bytes or None) and `offset` (int or None) carry the same.
    """

    def __init__(self, message: str, *, oid: bytes | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.oid = oid
        self.offset = offset


class ClassNotAllowedError(StorageError):
    """A stored record names a global (class or callable) outside the allowlist.

    Loading it could run arbitrary code, so it is refused; `name` is the dotted
    name and `oid` the record's oid where known. Allow trusted classes with
    ``durable_heap.open(target, allow=["pkg.module.Class", "pkg.*"])``.
    """

    def __init__(self, message: str, *, name: str = "", oid: bytes | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.oid = oid


class ProgramError(DurableHeapError):
    """A program file cannot be loaded, or its function cannot be run."""


class ProgramNotFoundError(ProgramError, FileNotFoundError):
    """The program file does not exist."""


class FunctionNotFoundError(ProgramError, AttributeError):
    """The program has no function of that name."""


class VersionNotFoundError(ProgramError, LookupError):
    """The program has no deployed version of that number."""


class DeployError(ProgramError):
    """A deploy failed and committed nothing: the previous version stays in force.

    `cause` is the exception behind it (a syntax error, what the top level or
    ``migrate`` raised), or None; `removed` lists the stored class paths the new
    version no longer defines when that is why it was refused.
    """

    def __init__(self, message: str, cause: BaseException | None = None,
                 removed: list[str] | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.removed = removed or []


def _type_name(tp: type) -> str:
    mod = getattr(tp, "__module__", "")
    qual = getattr(tp, "__qualname__", tp.__name__)
    if mod in ("builtins", None, ""):
        return qual
    return f"{mod}.{qual}"
