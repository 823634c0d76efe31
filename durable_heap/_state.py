"""`Object`, the base of durable user classes, and `State`, the root of a heap.

Both are `persistent.Persistent` objects: each instance is its own record, and
assigning an attribute marks it changed. On top of ZODB's rules they add:

* values take their *stored form* on assignment (plain dict/list/set become `Dict`/`List`/
  `Set`; values that cannot be stored are refused at once, with their path);
* a change outside a transaction is refused (`NoTransactionError`) instead of
  being silently kept in memory only;
* records that hold plain user objects (dataclass instances...) are watched, so
  that ``state.cfg.retries = 3`` is saved although ``cfg`` is not persistent
  (see `_values`).
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from typing import Any

from persistent import Persistent

from ._defaults import dataclass_defaults, fill_defaults
from ._kinds import BadValue, holds_watched
from ._storable import public_error
from ._values import stored_form
from ._watch import check_writable, watch

__all__ = ["Object", "State"]

_MISSING: Any = object()


def _state_values(state: Any) -> list[Any]:
    """Attribute values in a Persistent state: a dict, or (dict, slots) with __slots__."""
    if isinstance(state, dict):
        return list(state.values())
    if isinstance(state, tuple) and len(state) == 2:
        return [v for part in state if isinstance(part, dict) for v in part.values()]
    return []


def _slot(cls: type, name: str) -> Any:
    """The member descriptor of slot `name` (set directly: not a change)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    raise AttributeError(name)


class Object(Persistent):
    """Base class for your own durable classes: every instance is its own record.

    Subclass it for objects that are shared between several places in state,
    or that are big or change often: a change rewrites only that object.
    Attribute assignment is all it takes to persist a change.

    >>> class User(Object):
    ...     email = None                # a class default serves old instances
    ...     def __init__(self, name):
    ...         self.name = name
    ...         self.tags = []          # becomes a durable List
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith(("_p_", "_v_")):
            Persistent.__setattr__(self, name, value)
            return
        check_writable(self)
        if isinstance(value, Persistent) and getattr(self, name, _MISSING) is value:
            # ``state.hits += 1`` on a Counter assigns the same object back: the
            # record is unchanged, and leaving it clean keeps concurrent increments
            # from conflicting on it.
            return
        try:
            value = stored_form(value, self._p_jar)
        except BadValue as err:
            raise public_error(err.prefixed(f".{name}"), self) from None
        Persistent.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if not name.startswith(("_p_", "_v_")):
            check_writable(self)
        Persistent.__delattr__(self, name)

    def __getstate__(self) -> Any:
        state = Persistent.__getstate__(self)
        if holds_watched(_state_values(state)):
            watch(self, state)
        return state

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            # (dict, slots) of a subclass with __slots__: set the slots directly,
            # since loading is not a change (our __setattr__ would treat it as one).
            attrs, slots = state
            Persistent.__setstate__(self, attrs or {})
            for name, value in (slots or {}).items():
                _slot(type(self), name).__set__(self, value)
        else:
            Persistent.__setstate__(self, state)
        if dataclass_defaults(type(self)):  # a dataclass Object stored before a field existed
            fill_defaults(self, self.__dict__)
        if holds_watched(_state_values(state)):
            watch(self, state)

    def _dh_watched(self) -> bool:
        return holds_watched(_state_values(Persistent.__getstate__(self)))

    def _dh_as_dict(self) -> dict[str, Any]:
        """The stored attributes, in assignment order."""
        self._p_activate()
        return {k: v for k, v in self.__dict__.items() if not k.startswith(("_p_", "_v_"))}

    @reprlib.recursive_repr("...")
    def __repr__(self) -> str:
        if self._p_changed is None and self._p_jar is not None:
            self._p_activate()
        fields = ", ".join(f"{k}={v!r}" for k, v in self._dh_as_dict().items())
        return f"{type(self).__name__}({fields})"


class State(Object):
    """The root object of a heap: what ``state`` and ``heap.state`` refer to.

    Names are attributes (``state.count``) and also items (``state["count"]``);
    ``get``, ``setdefault``, ``in``, ``del`` and iteration over the names work as
    on a dict. ``setdefault`` is the idiom for a program's top level, which runs
    at every load: it initialises a name once and leaves it alone afterwards.

    >>> import durable_heap as dh
    >>> with dh.open("memory://") as heap, heap.transaction() as state:
    ...     state.setdefault("count", 0), state.setdefault("count", 5), state["count"]
    (0, 0, 0)
    """

    def _names(self) -> dict[str, Any]:
        self._p_activate()
        return self.__dict__  # type: ignore[no-any-return]

    def get(self, name: str, default: Any = None) -> Any:
        """The value stored under `name`, or `default`."""
        return self._names().get(name, default)

    def setdefault(self, name: str, default: Any = None) -> Any:
        """Store `default` under `name` unless something is there; return the value."""
        value = self._names().get(name, _MISSING)
        if value is not _MISSING:
            return value
        self[name] = default
        return self._names()[name]

    def __getitem__(self, name: str) -> Any:
        try:
            return self._names()[name]
        except KeyError:
            raise KeyError(name) from None

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"state names are strings, not {type(name).__name__}")
        if name.startswith(("_p_", "_v_")):
            raise ValueError(f"{name!r}: names starting with _p_ or _v_ are reserved by ZODB")
        setattr(self, name, value)

    def __delitem__(self, name: str) -> None:
        if name not in self._names():
            raise KeyError(name)
        delattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._dh_as_dict()))

    def __len__(self) -> int:
        return len(self._dh_as_dict())
