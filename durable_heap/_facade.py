"""The public `Heap`, assembled at the top: the engine plus the methods of the layers above it.

The engine (`_heap.HeapEngine`: the database, connections, transactions,
retries, close, status) knows nothing above it. Each layer above adds its
methods as a mixin that subclasses the engine, and registers its policy by
overriding one of the engine's hook methods (the version layer overrides
`HeapEngine.install_definitions`, the class lookup's hook, as ZODB's
``class_factory`` is one). The facade lists the mixins, highest layer first,
the engine last; Python's method order then runs each layer's override before
the ones below it.

A new layer adds one base (and its import) here, as the durable-execution layer
(`_workflows` and `_timers`, between the engine and the version layer) does::

    from ._timers import WorkflowMethods

    class Heap(Versions, WorkflowMethods, HeapEngine):

and the layer below never imports this module (it receives the heap as
``self``; for type hints only, under ``if TYPE_CHECKING:``). A mixin may
subclass `HeapEngine` (as `Versions` does, so that type checkers know what
``self`` has) or not; one with options of its own takes them in its
``__init__`` and passes the rest on (``super().__init__(target, **rest)``),
and adds ``**options`` to `open`, which passes them to `Heap` (the engine takes none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._allow import env_patterns
from ._heap import DEFAULT_CACHE_SIZE, DEFAULT_MAX_ASYNC_TRANSACTIONS, HeapEngine
from ._retry import DEFAULT_ATTEMPTS
from ._targets import parse_target, target_read_only
from ._timers import WorkflowMethods
from ._versions import Versions
from ._workflows import DEFAULT_LEASE, DEFAULT_RETENTION

__all__ = ["Heap", "open"]


class Heap(Versions, WorkflowMethods, HeapEngine):
    """A durable heap: open with `durable_heap.open`, use from any thread or asyncio task.

    >>> import durable_heap as dh
    >>> with dh.open("memory://") as heap:
    ...     with heap.transaction() as state:
    ...         state.count = 1
    ...     heap.state.count
    1
    """


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
