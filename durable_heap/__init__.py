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

import importlib

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

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # the real imports, for type checkers; at run time they are lazy
    from ._containers import (
        Dict,
        List,
        Set,
        to_builtin,
    )
    from ._counter import Counter
    from ._facade import Heap, open  # noqa: A004 - dh.open is the API
    from ._heap import HeapStatus, active_heap, state
    from ._http import Request, Response
    from ._migrations import migration
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

#: Public name -> the module that defines it, imported on first use (PEP 562), so
#: that ``import durable_heap`` costs almost nothing and each operation imports only
#: what it needs: opening a heap brings in ZODB and BTrees, ``Program`` the program
#: layer, a workflow durable execution. tools/import_graph.py reads this table as
#: import edges (a lazy import is still an import).
_LAZY: dict[str, str] = {
    "Dict": "_containers",
    "List": "_containers",
    "Set": "_containers",
    "to_builtin": "_containers",
    "Counter": "_counter",
    "Heap": "_facade",
    "open": "_facade",
    "HeapStatus": "_heap",
    "active_heap": "_heap",
    "state": "_heap",
    "Request": "_http",
    "Response": "_http",
    "migration": "_migrations",
    "redact": "_notes",
    "Object": "_state",
    "State": "_state",
    "Timer": "_timers",
    "typed_state": "_types",
    "Program": "_versions",
    "Version": "_versions",
    "Promise": "_workflows",
    "Workflow": "_workflows",
    "emit": "_workflows",
    "now": "_workflows",
    "on": "_workflows",
    "patched": "_workflows",
    "promise": "_workflows",
    "random": "_workflows",
    "resolve": "_workflows",
    "sleep": "_workflows",
    "step_key": "_workflows",
    "uuid4": "_workflows",
    "workflow": "_workflows",
}

if not TYPE_CHECKING:  # hidden from type checkers: they see the imports above, typos stay errors

    def __getattr__(name: str) -> object:
        """A public name, imported from its module on first use (then a plain attribute)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'durable_heap' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))


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
    "migration",
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
