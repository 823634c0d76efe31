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
    JSONFormError,
    NoActiveHeapError,
    NonDeterminismError,
    NotAHeapError,
    NotPersistableError,
    NoTransactionError,
    ProgramError,
    ProgramNotFoundError,
    PromiseTimeout,
    ReadOnlyRequestError,
    ServerUnavailableError,
    StaleReferenceError,
    StorageError,
    TransactionOwnerError,
    UnknownTargetError,
    VersionNotFoundError,
    WorkflowError,
)
from ._facade import Heap, open  # noqa: A004 - dh.open is the API
from ._heap import HeapStatus, active_heap, state
from ._http import Request, Response
from ._notes import redact
from ._state import Object, State
from ._timers import Timer
from ._types import typed_state
from ._versions import Program, Version
from ._workflows import (
    Promise,
    Workflow,
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
    "JSONFormError",
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
    "ReadOnlyRequestError",
    "Request",
    "Response",
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
    "redact",
    "resolve",
    "sleep",
    "state",
    "step_key",
    "to_builtin",
    "typed_state",
    "uuid4",
    "workflow",
]
