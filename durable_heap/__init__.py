"""durable_heap: durable state for Python programs, with no save step.

Keep your data in ordinary Python objects reachable from `state`; every change
is persisted, incrementally and atomically, at the end of each transaction.

>>> import durable_heap as dh
>>> heap = dh.open("memory://")          # or "data/app.fs"
>>> with heap.transaction() as state:
...     state.users = {"ann": {"tags": []}}
>>> @heap.action
... def tag(name, tag):
...     heap.state.users[name]["tags"].append(tag)
>>> tag("ann", "admin")
>>> dh.to_builtin(heap.state.users)
{'ann': {'tags': ['admin']}}
>>> heap.close()
"""

from typing import Any

from . import _heap
from ._containers import Dict, List, Set, to_builtin
from ._counter import Counter
from ._errors import (
    ClassNotAllowedError,
    ConflictError,
    CorruptHeapError,
    DeployError,
    DurableHeapError,
    FunctionNotFoundError,
    HeapClosedError,
    HeapLockedError,
    NoActiveHeapError,
    NonDeterminismError,
    NotAHeapError,
    NotPersistableError,
    NoTransactionError,
    ProgramError,
    ProgramNotFoundError,
    PromiseTimeout,
    ServerUnavailableError,
    StaleReferenceError,
    StorageError,
    TransactionOwnerError,
    UnknownTargetError,
    VersionNotFoundError,
    WorkflowError,
)
from ._heap import HeapStatus, active_heap, state
from ._state import Object, State
from ._types import typed_state
from ._versions import Program, Version
from ._workflows import (
    Promise,
    Timer,
    Workflow,
    WorkflowMethods,
    emit,
    now,
    on,
    patched,
    promise,
    random,
    resolve,
    sleep,
    step_key,
    uuid4,
    workflow,
)


class Heap(WorkflowMethods, _heap.Heap):
    """A durable heap: open with `durable_heap.open`, use from any thread or asyncio task.

    The engine's transactions (`durable_heap._heap.Heap`) with durable
    execution's methods (`durable_heap._workflows.WorkflowMethods`).

    >>> import durable_heap as dh
    >>> with dh.open("memory://") as heap:
    ...     with heap.transaction() as state:
    ...         state.count = 1
    ...     heap.state.count
    1
    """

    def __enter__(self) -> "Heap":  # noqa: UP037 - no __future__ import here
        return self


_heap.heap_class = Heap


def open(target: Any = None, **options: Any) -> Heap:  # noqa: A001 - dh.open is the API
    return _heap.open(target, **options)  # type: ignore[return-value]  # it builds `heap_class`


open.__doc__ = (_heap.open.__doc__ or "") + """
    `clock` (a callable giving epoch seconds, such as `durable_heap.testing.Clock`)
    is the time of workflows and timers; `lease` how many seconds a workflow's
    runner holds it between transactions; `retention` how long a finished
    workflow keeps its journal (see docs/workflows.md).
    """

__version__ = "0.3.0"

__all__ = [
    "ClassNotAllowedError",
    "ConflictError",
    "CorruptHeapError",
    "Counter",
    "DeployError",
    "Dict",
    "DurableHeapError",
    "FunctionNotFoundError",
    "Heap",
    "HeapClosedError",
    "HeapLockedError",
    "HeapStatus",
    "List",
    "NoActiveHeapError",
    "NoTransactionError",
    "NonDeterminismError",
    "NotAHeapError",
    "NotPersistableError",
    "Object",
    "Program",
    "ProgramError",
    "ProgramNotFoundError",
    "Promise",
    "PromiseTimeout",
    "ServerUnavailableError",
    "Set",
    "StaleReferenceError",
    "State",
    "StorageError",
    "Timer",
    "TransactionOwnerError",
    "UnknownTargetError",
    "Version",
    "VersionNotFoundError",
    "Workflow",
    "WorkflowError",
    "active_heap",
    "emit",
    "now",
    "on",
    "open",
    "patched",
    "promise",
    "random",
    "resolve",
    "sleep",
    "state",
    "step_key",
    "to_builtin",
    "typed_state",
    "uuid4",
    "workflow",
]
