"""Whether a value can be stored, and the error that names the one that cannot.

`refuse_or_accept` refuses what can never be stored (generators, locks,
sockets, lambdas, local classes...) and trial-pickles plain objects, so that
`NotPersistableError` names the place a value was assigned; `unpicklable_error` names the
value of a record that fails to pickle at commit.
"""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterable
from typing import Any

from ._errors import NotPersistableError
from ._kinds import ATOMIC, REFUSED, REFUSED_BASES, REFUSED_BY_NAME, BadValue, plain_children
from ._paths import durable_children, holder_path, path_of
from ._registry import note_class
from ._snapshot import snapshot

__all__ = ["unpicklable_error", "public_error", "refuse_or_accept"]


def public_error(err: BadValue, holder: Any, base: str | None = None) -> NotPersistableError:
    """The user-facing error for `err`, its path starting at ``state`` when known."""
    if base is None:
        base = holder_path(holder) if holder is not None else "value"
    return NotPersistableError(base + "".join(err.parts), err.value, err.reason)


def unnamed(obj: Any) -> str | None:
    """Why the function or class `obj` cannot be stored by name (ZODB pickles
    ``module.__name__``, so it must be a module-level name), or None."""
    qual = getattr(obj, "__qualname__", "")
    kind = "a class" if isinstance(obj, type) else "a function"
    if "<lambda>" in qual:
        return "a lambda has no name to be stored by; use a module-level function"
    if "<locals>" in qual:
        return f"{kind} defined inside a function cannot be stored by name"
    if "." in qual and getattr(sys.modules.get(obj.__module__), obj.__name__, None) is not obj:
        return (f"{kind} nested in a class ({qual}) cannot be found again by ZODB, which stores "
                f"module.name: define {qual.rpartition('.')[2]} at the top level of its module "
                f"(or export it there as {obj.__name__})")
    return None


def refuse_or_accept(value: Any, seen: set[int] | None = None) -> None:
    """Raise `BadValue` if `value` cannot be stored; plain objects are trial-pickled.

    `seen` holds the ids of the plain objects whose failing part is being looked
    for (see `_locate`), so that a cycle among them ends the search.
    """
    tp = type(value)
    if tp is types.BuiltinFunctionType:
        bound = not isinstance(value.__self__, (types.ModuleType, type(None)))
        # Stored by name, found in a module as pickle does (random.random is; [].append is not).
        if bound and not any(getattr(m, value.__name__, None) is value for m in list(sys.modules.values())):
            raise BadValue(value, REFUSED[types.BuiltinMethodType])
        note_class(value)  # stored by name
        return
    if tp is types.FunctionType:
        why = unnamed(value)
        if why is not None:
            raise BadValue(value, why)
        note_class(value)  # stored by name, like a class
        return
    if isinstance(value, type):
        why = unnamed(value)
        if why is not None:
            raise BadValue(value, why)
        note_class(value)
        return
    if isinstance(value, enum.Enum):
        why = unnamed(tp)
        if why is not None:
            raise BadValue(value, f"its class: {why}")
        note_class(tp)
        return
    reason = REFUSED.get(tp) or REFUSED_BY_NAME.get(f"{tp.__module__}.{tp.__qualname__}")
    if reason is None:
        for base, why in REFUSED_BASES:
            if isinstance(value, base):
                reason = why
                break
    if reason is not None:
        raise BadValue(value, reason)
    if "<locals>" in tp.__qualname__:
        raise BadValue(value, f"its class {tp.__qualname__} is defined inside a function")
    # Pickled with a reference to its class (not by a __reduce__ of its own):
    # that class must be a module-level name.
    default_reduce = (getattr(tp, "__reduce_ex__", None) is object.__reduce_ex__
                      and getattr(tp, "__reduce__", None) is object.__reduce__)
    why = unnamed(tp) if default_reduce else None
    if why is not None:
        raise BadValue(value, f"its class: {why}")
    try:
        snapshot(value, note=True)  # also notes the classes it holds, for the registry
    except BadValue:
        raise
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's value
        raise _locate(value, exc, seen) from None


def _first_bad(children: Iterable[tuple[str, Any]]) -> BadValue | None:
    """The first of (accessor, value) pairs that cannot be stored, as a BadValue."""
    return _search(children, set())[0]


class _ThroughCycle(Exception):
    """Internal: a plain object fails to pickle only through an object around it in a cycle."""


def _search(children: Iterable[tuple[str, Any]], seen: set[int]) -> tuple[BadValue | None, bool]:
    """`_first_bad`, and whether a child was skipped as part of a cycle."""
    cyclic = False
    for accessor, child in children:
        if type(child) in ATOMIC:
            continue
        if id(child) in seen:
            cyclic = True  # an object around us in a cycle: being searched already
            continue
        try:
            refuse_or_accept(child, seen)
        except _ThroughCycle:
            cyclic = True
        except BadValue as e:
            return e.prefixed(accessor), cyclic
    return None, cyclic


def _locate(value: Any, exc: BaseException, seen: set[int] | None = None) -> BadValue:
    """Find the part of `value` that does not pickle, for a precise path.

    Pickle copes with cycles among plain objects (a dataclass that holds
    itself) but this search walks them: `seen` ends it at the first repeat,
    and a part that fails only through the cycle is passed over for the
    sibling that really fails (``state.box.lock``, not ``state.box.inner``).
    """
    outermost = not seen
    seen = set() if seen is None else seen
    seen.add(id(value))
    bad, cyclic = _search(plain_children(value), seen)
    if bad is not None:
        return bad
    if cyclic and not outermost:
        raise _ThroughCycle
    return BadValue(value, f"pickling failed: {exc}")


def unpicklable_error(holder: Any, exc: BaseException) -> NotPersistableError:
    """The error naming the value of `holder` that does not pickle."""
    base = path_of(holder)  # first: walking the path also teaches List leaves their offsets
    bad = _first_bad(durable_children(holder))
    return public_error(bad or BadValue(holder, f"pickling failed: {exc}"), holder, base=base)
