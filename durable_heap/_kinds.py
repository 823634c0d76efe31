"""Value kinds: which values are atomic, which are converted, which are watched, which refused.

Three kinds of values live in durable objects:

* *atomic* values are immutable (numbers, strings, bytes, None, dates, enums,
  tuples and frozensets of atomic values, named functions and classes) or are
  references to other persistent objects. Nothing about them can change behind
  our back.
* plain ``dict``, ``list`` and ``set`` values are *converted* on assignment into
  the durable containers (`Dict`, `List`, `Set`; `CONVERTERS`, filled by
  `_containers`), which track their own changes.
* anything else (dataclass instances, ordinary objects, ``OrderedDict``,
  ``bytearray``...) is *watched*: it is pickled inside the record of the durable
  object that holds it (see `_watch`).

Some types can never be stored (`REFUSED`); `_storable` says why, `_values`
turns a value into what it becomes when stored.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import io
import pathlib
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from persistent import Persistent

__all__ = ["CONVERTERS", "BadValue", "SharedInline", "holds_watched", "is_atomic"]


ATOMIC: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        decimal.Decimal,
        fractions.Fraction,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
        range,
        slice,
        type(Ellipsis),
        type(NotImplemented),
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    }
)

#: Filled by `_containers`: exact builtin type -> (make an empty durable twin,
#: fill the twin from the plain value). Two steps, so that a value met again
#: while its twin is being filled (a list that contains itself) becomes that twin.
CONVERTERS: dict[type, tuple[Callable[[], Any], Callable[[Any, Any], None]]] = {}

# Types that can never be stored, with the reason shown to the user.
REFUSED: dict[type, str] = {
    types.GeneratorType: "a generator cannot be pickled; store the data it yields",
    types.CoroutineType: "a coroutine cannot be pickled",
    types.AsyncGeneratorType: "an async generator cannot be pickled",
    types.ModuleType: "store the values you need from the module, not the module",
    types.FrameType: "frames belong to a running program",
    types.TracebackType: "tracebacks belong to a running program",
    types.MethodType: "a bound method would copy its object; store the object",
    types.BuiltinMethodType: "a bound method would copy its object; store the object",
    type(threading.Lock()): "locks belong to a running process",
    type(threading.RLock()): "locks belong to a running process",
    threading.Thread: "threads belong to a running process",
    threading.Event: "events belong to a running process",
    threading.Condition: "conditions belong to a running process",
    weakref.ref: "weak references belong to a running process",
}
REFUSED_BASES: tuple[tuple[type, str], ...] = (
    (io.IOBase, "an open file or stream belongs to a running process; store its path"),
    (threading.Thread, "threads belong to a running process"),
)


# Refused without importing their modules: `import durable_heap` stays light.
REFUSED_BY_NAME: dict[str, str] = {
    "socket.socket": "a socket belongs to a running process; store its address",
    "ssl.SSLSocket": "a socket belongs to a running process; store its address",
    "sqlite3.Connection": "a database connection belongs to a running process",
    "sqlite3.Cursor": "a database cursor belongs to a running process",
    "subprocess.Popen": "a child process belongs to a running process; store its pid",
    "selectors.DefaultSelector": "a selector belongs to a running process",
}


def is_atomic(value: Any) -> bool:
    """True when `value` can never change in place (or is a persistent reference)."""
    tp = type(value)
    if tp in ATOMIC:
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(is_atomic(v) for v in value)
    if isinstance(value, (Persistent, enum.Enum)):
        return True
    if tp is types.FunctionType or tp is types.BuiltinFunctionType or isinstance(value, type):
        return True  # pickled by name; stored_form() has refused the local ones
    return False


def holds_watched(values: Iterable[Any]) -> bool:
    """True when any of `values` is neither atomic nor a durable container.

    Runs on every load and save of a record: the common case (only atomic
    types) is decided by one set of types built at C speed.
    """
    if not isinstance(values, (list, tuple)):
        values = list(values)
    if set(map(type, values)) <= ATOMIC:
        return False
    return any(not is_atomic(v) for v in values if type(v) not in ATOMIC)


class SharedInline(Exception):
    """Internal: a plain dict or list met twice in one stored value, once copied inline.

    Raised by `_inline` while `stored_form` converts a value; `stored_form` then
    converts the whole value again without inline copies, so that the container
    stays one shared object (a record), as it is in the value.
    """


class BadValue(Exception):
    """Internal: an unstorable value, with the accessors that lead to it.

    Raised deep inside conversions; the outermost holder turns it into the public
    `NotPersistableError` once it knows the full path (see `public_error`).
    """

    def __init__(self, value: Any, reason: str, parts: list[str] | None = None) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.parts: list[str] = parts if parts is not None else []

    def prefixed(self, accessor: str) -> BadValue:
        self.parts.insert(0, accessor)
        return self


def plain_children(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield f"[{i}]", v
    elif isinstance(value, dict):
        for k, v in value.items():
            yield f"[{k!r}]", v
    elif isinstance(value, (set, frozenset)):
        for v in value:
            yield "{...}", v
    else:
        d = getattr(value, "__dict__", None)
        if isinstance(d, dict):
            for k, v in d.items():
                yield f".{k}", v
