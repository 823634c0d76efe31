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
    NotAHeapError,
    NotPersistableError,
    NoTransactionError,
    ProgramError,
    ProgramNotFoundError,
    ReadOnlyRequestError,
    ServerUnavailableError,
    StaleReferenceError,
    StorageError,
    TransactionOwnerError,
    UnknownTargetError,
    VersionNotFoundError,
)
from ._facade import Heap, open  # noqa: A004 - dh.open is the API
from ._heap import HeapStatus, active_heap, state
from ._http import Request, Response
from ._notes import redact
from ._state import Object, State
from ._types import typed_state
from ._versions import Program, Version

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
    "NotAHeapError",
    "NotPersistableError",
    "Object",
    "Program",
    "ProgramError",
    "ProgramNotFoundError",
    "ReadOnlyRequestError",
    "Request",
    "Response",
    "ServerUnavailableError",
    "Set",
    "StaleReferenceError",
    "State",
    "StorageError",
    "TransactionOwnerError",
    "UnknownTargetError",
    "Version",
    "VersionNotFoundError",
    "active_heap",
    "open",
    "redact",
    "state",
    "to_builtin",
    "typed_state",
]
