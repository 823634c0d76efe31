"""The public `Heap`, assembled at the top: the engine plus the methods of the layers above it.

The engine (`_heap.HeapEngine`: the database, connections, transactions,
retries, close, status) knows nothing above it. Each layer above adds its
methods as a mixin that subclasses the engine, and registers its policy by
overriding one of the engine's hook methods (the version layer overrides
`HeapEngine.install_definitions`, the class lookup's hook, as ZODB's
``class_factory`` is one). The facade lists the mixins, highest layer first,
the engine last; Python's method order then runs each layer's override before
the ones below it.

The mixins are imported on demand (`_LazyHeap`, `_full_class`): `open` makes a
heap of the engine alone, which takes on the mixins in place at the first use of
one of their attributes, so a script that only reads and commits never imports
the version layer or durable execution. A new layer adds one base (and its
import) in `_full_class`, as the durable-execution layer (`_workflows` and
`_timers`, between the engine and the version layer) does::

    from ._timers import WorkflowMethods

    class _FullHeap(Versions, WorkflowMethods, _LazyHeap):

and in the ``TYPE_CHECKING`` definition of `Heap` (what type checkers see), and
the layer below never imports this module (it receives the heap as ``self``; for
type hints only, under ``if TYPE_CHECKING:``). A mixin may subclass `HeapEngine`
(as `Versions` does, so that type checkers know what ``self`` has) or not; one
with options of its own takes them in its ``__init__`` and passes the rest on
(``super().__init__(target, **rest)``), and adds ``**options`` to `open` and to
`_LazyHeap.__init__`, which keeps them for the upgrade (the engine takes none).
A hook the engine calls while records load, before any upper attribute was used,
is overridden in `_LazyHeap` itself with a lazy import (`install_definitions`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

# Imported for what it registers, before any heap opens: the converters of plain dicts,
# lists and sets into Dict, List and Set (`_kinds.CONVERTERS`) and the inline values'
# before-commit hook. Without it, a plain dict stored into state stays a plain (watched)
# dict. The version layer used to import it; it is no longer imported by `open`.
from . import _containers  # noqa: F401
from ._allow import env_patterns
from ._heap import DEFAULT_CACHE_SIZE, DEFAULT_MAX_ASYNC_TRANSACTIONS, HeapEngine
from ._retry import DEFAULT_ATTEMPTS
from ._targets import parse_target, target_read_only

if TYPE_CHECKING:
    from ._timers import WorkflowMethods
    from ._versions import Versions

__all__ = ["Heap", "open"]

# Defaults of the durable-execution options, as `_workflows` has them (DEFAULT_LEASE,
# DEFAULT_RETENTION): repeated here so that `open` does not import that layer;
# tests/test_layers.py checks that they are the same.
DEFAULT_LEASE = 60.0
DEFAULT_RETENTION = 7 * 86400.0

#: Passed as the target while a heap takes on the upper layers (`_upgrade`): their
#: ``__init__`` chain then ends at `_LazyHeap.__init__` without opening anything again.
_UPGRADING: Any = object()


class _LazyHeap(HeapEngine):
    """The public `Heap` as `open` makes it: the engine, with the layers above imported on demand.

    ``dh.open(...)`` plus reads and commits need only the engine and the
    containers: the version layer (programs, deploys) and durable execution
    (workflows, timers) cost a cold start tens of milliseconds of imports (issue
    18, part 4). So the heap starts as this class; the first use of anything the
    upper layers add (``heap.load``, ``heap.workflow``, ``heap.run_due``... any
    attribute the engine lacks) imports them and turns the heap, in place, into
    `_FullHeap` (their mixins over this class: every heap is still an instance of
    `Heap`). The engine's one hook that needs an upper layer while records load,
    `install_definitions` (a record of a deployed program's class), imports the
    version layer itself; `action` upgrades first, so that every action gets the
    durable-execution attributes (``invoke_in``, ``invoke_at``, ``cron``).
    """

    def __init__(self, target: Any, *, clock: Callable[[], float] | None = None,
                 lease: float = DEFAULT_LEASE, retention: float = DEFAULT_RETENTION,
                 **engine_options: Any) -> None:
        if target is _UPGRADING:
            return  # the end of the upper layers' __init__ chain in `_upgrade`
        #: The durable-execution options, for `_upgrade` (checked now: a bad one fails `open`).
        self._upper_options = {"clock": clock, "lease": float(lease), "retention": float(retention)}
        super().__init__(target, **engine_options)

    def __getattr__(self, name: str) -> Any:
        # Only for names the instance and its class lack: an upper layer's (or none).
        if name.startswith("__") or name == "_upper_options":
            raise AttributeError(f"'Heap' object has no attribute {name!r}")
        if type(self) is _LazyHeap:
            _upgrade(self)
        else:
            with _upgrade_lock:  # another thread may be upgrading this heap right now
                pass
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            raise AttributeError(f"'Heap' object has no attribute {name!r}") from None

    def install_definitions(self, conn: Any, root: str) -> str:
        """The engine's hook (`HeapEngine.install_definitions`): from the heap's stored
        versions, importing the version layer on first use (see `_versions.Versions`)."""
        from ._versions import install_stored_definitions

        return install_stored_definitions(self, conn, root)

    def action(self, func: Any = None, /, **options: Any) -> Any:  # type: ignore[override]  # noqa: D102
        _upgrade(self)
        return HeapEngine.action(self, func, **options)

    action.__doc__ = HeapEngine.action.__doc__


_upgrade_lock = threading.RLock()
_full: list[type] = []  # the one `_FullHeap` class, made on first use


def _full_class() -> type:
    if not _full:
        from ._timers import WorkflowMethods
        from ._versions import Versions

        class _FullHeap(Versions, WorkflowMethods, _LazyHeap):  # type: ignore[misc]
            """`Heap` with the upper layers' methods (see `_LazyHeap`)."""

        _FullHeap.__name__ = _FullHeap.__qualname__ = "Heap"
        _FullHeap.__module__ = _LazyHeap.__module__
        _full.append(_FullHeap)
    return _full[0]


def _upgrade(heap: Any) -> None:
    """Give `heap` the upper layers' methods and state, in place, once (any thread)."""
    if type(heap) is not _LazyHeap:
        return
    with _upgrade_lock:
        if type(heap) is not _LazyHeap:
            return
        full = _full_class()
        heap.__class__ = full
        # The mixins' own fields (WorkflowMethods' clock, lease...): their __init__
        # chain, which ends at _LazyHeap.__init__ without opening the heap again.
        full.__init__(heap, _UPGRADING, **object.__getattribute__(heap, "_upper_options"))  # type: ignore[misc]


if TYPE_CHECKING:
    class Heap(Versions, WorkflowMethods, _LazyHeap):  # type: ignore[misc]
        """A durable heap: open with `durable_heap.open`, use from any thread or asyncio task."""
else:
    Heap = _LazyHeap
    Heap.__name__ = Heap.__qualname__ = "Heap"
    Heap.__doc__ = """A durable heap: open with `durable_heap.open`, use from any thread or asyncio task.

    >>> import durable_heap as dh
    >>> with dh.open("memory://") as heap:
    ...     with heap.transaction() as state:
    ...         state.count = 1
    ...     heap.state.count
    1

    """ + _LazyHeap.__doc__.partition("\n\n")[2]


def open(  # noqa: A001 - durable_heap.open is the public name
    target: str | Any = None,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    cache_size: int = DEFAULT_CACHE_SIZE,
    read_only: bool = False,
    max_async_transactions: int = DEFAULT_MAX_ASYNC_TRANSACTIONS,
    allow: Iterable[str] = (),
    clock: Callable[[], float] | None = None,
    lease: float = DEFAULT_LEASE,
    retention: float = DEFAULT_RETENTION,
) -> Heap:
    """Open (creating if needed) the heap at `target` and make it the active one.

    `target` is a path (``data/app.fs``), ``file:///abs/app.fs``,
    ``zeo://host:port`` or ``zeo:///path/to/socket`` (a heap served by
    ``durable-heap zeo``, shared by processes), ``postgresql://user@host/db``
    (a PostgreSQL database, for several machines) or ``memory://``; without one,
    ``$DURABLE_HEAP_STORAGE`` or ``.durable-heap/heap.fs``. `attempts` is how
    often actions are tried when they conflict; `cache_size` how many objects
    each thread keeps in memory; `max_async_transactions` how many asyncio
    transactions may be open at once per event loop (more wait for a place).
    `allow` names more classes its records may load (``"pkg.module.Class"``, or
    ``"pkg.*"`` for your own module ``pkg``), as does ``$DURABLE_HEAP_ALLOW``;
    see docs/api.md. `clock` (a callable giving epoch seconds, such as
    `durable_heap.testing.Clock`) is the time of workflows and timers; `lease`
    how many seconds a workflow's runner holds it between two transactions
    before a scheduler takes it over; `retention` how long a finished workflow
    keeps its journal (see docs/workflows.md).

    >>> import durable_heap as dh
    >>> heap = dh.open("memory://")
    >>> heap.close()
    """
    parsed = parse_target(target)
    read_only = read_only or target_read_only(parsed)  # ?read_only=1, for every scheme
    return Heap(parsed, attempts=attempts, cache_size=cache_size, read_only=read_only,
                max_async_transactions=max_async_transactions,
                allow=[*([allow] if isinstance(allow, str) else allow), *env_patterns()],
                clock=clock, lease=lease, retention=retention)
