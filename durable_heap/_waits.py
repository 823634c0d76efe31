"""A thread's waits on the disk or the network, announced: ``durable-heap serve`` lets
another call use the CPU meanwhile (`durable_heap._callpool`).

FileStorage's group commit calls the thread's hooks around a commit's wait for
its fsync (`durable_heap._groupcommit`); a retry's pause does the same (`waiting`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["durability_waits", "waiting"]


class _Waits(threading.local):
    hooks: tuple[Callable[[], Any], Callable[[], Any]] | None = None


_waits = _Waits()


@contextlib.contextmanager
def durability_waits(before: Callable[[], Any], after: Callable[[], Any]) -> Iterator[None]:
    """Call `before` when a commit of this thread starts waiting for its fsync, `after`
    when the wait is over (durable or failed): ``durable-heap serve`` gives up a call's
    CPU slot for that time (`durable_heap._serve`)."""
    saved = _waits.hooks
    _waits.hooks = (before, after)
    try:
        yield
    finally:
        _waits.hooks = saved


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """A wait of this thread's other than an fsync's (a retry's pause): the same hooks."""
    hooks = _waits.hooks
    if hooks is not None:
        hooks[0]()
    try:
        yield
    finally:
        if hooks is not None:
            hooks[1]()
