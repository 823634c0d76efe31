"""Paths for messages: ``state.users['ann'].tags[2]``, found through objects in memory only."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from persistent import Persistent

from ._format import ROOT_KEY
from ._kinds import ATOMIC, plain_children

__all__ = ["current_root", "holder_path", "path_of"]


def durable_children(obj: Any) -> Iterator[tuple[str, Any]]:
    """(accessor, value) pairs of `obj` that are in memory, loading nothing."""
    children = getattr(type(obj), "_dh_children", None)
    if children is not None:
        yield from children(obj)
    elif isinstance(obj, Persistent):
        if obj._p_changed is None:
            return
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            for k, v in list(d.items()):
                if not k.startswith(("_p_", "_v_")):
                    yield f".{k}", v
    else:
        yield from plain_children(obj)


#: Set by the heap layer: the `State` of the active heap, for objects not yet stored.
current_root: Callable[[], Any] | None = None


def holder_path(obj: Any) -> str:
    """`path_of`, or ``Dict(...)`` for an object that is not (yet) reachable from state."""
    path = path_of(obj)
    return f"{type(obj).__name__}(...)" if path.startswith("<") else path


def path_of(obj: Any, limit: int = 200_000) -> str:
    """The path from ``state`` to `obj` through objects in memory, or a description.

    Used only to word error messages, so it may be slow; it never loads a ghost.
    """
    link = getattr(obj, "_v_inline", None)  # a view of an inline value (`_inline`): its holder's path
    if link is not None and link.parent is not None:
        return path_of(link.parent, limit) + f"[{link.key!r}]"
    jar = obj._p_jar if isinstance(obj, Persistent) else None
    name = type(obj).__name__
    state = None
    try:
        if jar is not None:
            state = jar.root().get(ROOT_KEY)
        elif current_root is not None:
            state = current_root()  # a new object may already hang from state
    except Exception:  # noqa: BLE001 - closed, or no heap: just describe it
        state = None
    if state is None:
        return f"<{name} oid {_oid(obj)}>"
    if obj is state:
        return "state"
    queue = collections.deque([(state, "state")])
    seen = {id(state)}
    while queue and len(seen) < limit:
        current, path = queue.popleft()
        for accessor, child in durable_children(current):
            if child is obj:
                return path + accessor
            if id(child) in seen or type(child) in ATOMIC:
                continue
            if isinstance(child, Persistent) and child._p_changed is None:
                continue
            seen.add(id(child))
            queue.append((child, path + accessor))
    return f"<{name} oid {_oid(obj)}>"


def _oid(obj: Any) -> str:
    oid = getattr(obj, "_p_oid", None)
    return "0x" + oid.hex().lstrip("0") if oid else "?"
