"""The value model: what can be stored, what plain values become, and the watch
that keeps in-place changes to plain objects from being lost.

Three kinds of values live in durable objects:

* *atomic* values are immutable (numbers, strings, bytes, None, dates, enums,
  tuples and frozensets of atomic values, named functions and classes) or are
  references to other persistent objects. Nothing about them can change behind
  our back.
* plain ``dict``, ``list`` and ``set`` values are *converted* on assignment into
  the durable containers (`Dict`, `List`, `Set`), which track their own changes.
* anything else (dataclass instances, ordinary objects, ``OrderedDict``,
  ``bytearray``...) is *watched*: it is pickled inside the record of the durable
  object that holds it, so an in-place change (``state.cfg.retries = 3``) does
  not set ``_p_changed`` -- the classic ZODB trap. We close it like this: every
  durable object whose record holds a watched value registers with the `_Watch`
  of its connection when it is loaded (with a snapshot of its state) and when it
  is saved; before each commit the watch re-pickles the registered objects that
  still look clean and marks the ones whose bytes differ as changed; after the
  transaction ends (commit or abort) it turns them back into ghosts, so that the
  next transaction that touches them loads them again and is watched too, and an
  aborted in-place change is dropped instead of lingering in memory.

  The cost is therefore paid only by records that hold watched values: one
  snapshot pickle when loaded, one when committing, one reload per transaction.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import gc
import io
import pathlib
import pickle
import re
import sys
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import transaction.interfaces
from persistent import Persistent
from transaction._transaction import Status  # the one place it is defined; not re-exported

from ._allow import record_globals, registrable
from ._errors import NotPersistableError, NoTransactionError, StaleReferenceError, StorageError

__all__ = [
    "CLASSES_KEY",
    "COMPLETE_KEY",
    "CONVERTERS",
    "ROOT_KEY",
    "BadValue",
    "adopt",
    "check_writable",
    "forget_reads",
    "culprit",
    "dataclass_defaults",
    "ensure_registry",
    "fill_defaults",
    "serve_defaults",
    "holder_path",
    "holds_watched",
    "is_atomic",
    "note_class",
    "program_roots",
    "path_of",
    "precheck",
    "public_error",
    "registered",
    "remember_reads",
    "reset_watch",
    "snapshot",
    "stored_classes",
    "view_changes",
    "watch",
    "watched_plain_ids",
]

#: Key of the `State` object in the ZODB root mapping.
ROOT_KEY = "durable_heap.state"

_ATOMIC: frozenset[type] = frozenset(
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
_REFUSED: dict[type, str] = {
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
_REFUSED_BASES: tuple[tuple[type, str], ...] = (
    (io.IOBase, "an open file or stream belongs to a running process; store its path"),
    (threading.Thread, "threads belong to a running process"),
)


# Refused without importing their modules: `import durable_heap` stays light.
_REFUSED_BY_NAME: dict[str, str] = {
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
    if tp in _ATOMIC:
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(is_atomic(v) for v in value)
    if isinstance(value, (Persistent, enum.Enum)):
        return True
    if tp is types.FunctionType or tp is types.BuiltinFunctionType or isinstance(value, type):
        return True  # pickled by name; adopt() has refused the local ones
    return False


def holds_watched(values: Iterable[Any]) -> bool:
    """True when any of `values` is neither atomic nor a durable container.

    Runs on every load and save of a record: the common case (only atomic
    types) is decided by one set of types built at C speed.
    """
    if not isinstance(values, (list, tuple)):
        values = list(values)
    if set(map(type, values)) <= _ATOMIC:
        return False
    return any(not is_atomic(v) for v in values if type(v) not in _ATOMIC)


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


def public_error(err: BadValue, holder: Any, base: str | None = None) -> NotPersistableError:
    """The user-facing error for `err`, its path starting at ``state`` when known."""
    if base is None:
        base = holder_path(holder) if holder is not None else "value"
    return NotPersistableError(base + "".join(err.parts), err.value, err.reason)


def adopt(value: Any, jar: Any = None) -> Any:
    """Return what `value` becomes when stored: a durable twin, or itself.

    Raises `BadValue` for values that cannot be stored. Plain objects are
    trial-pickled here so that the error names the place it was assigned.
    `jar` is the connection of the object it is stored into (None while that
    object is in no heap yet): the program classes found are noted for the
    transaction in progress there (see `note_class`).

    Within one call, a plain container met twice becomes one twin: a list that
    contains itself becomes a `List` that contains itself (a persistent
    reference to its own record, which ZODB stores like any other), and a list
    held twice stays one shared `List`, as pickle would keep it.
    """
    tp = type(value)
    if tp in _ATOMIC or (tp is tuple and set(map(type, value)) <= _ATOMIC):
        return value  # the common cases, decided at C speed
    local = _local
    memo = local.memo
    if memo is not None:
        return _adopt(value, tp, memo)
    memo = local.memo = {}
    sink = local.sink
    local.sink = _notes_of(jar) if jar is not None else None
    try:
        return _adopt(value, tp, memo)
    except RecursionError:
        # Not a cycle (those end at the memo): nesting deeper than the stack.
        # Unwound to here, the stack is free again to build the error.
        raise BadValue(value, "it is nested too deeply to be stored; flatten it, or store "
                       "the inner levels as durable_heap.Object attributes") from None
    finally:
        local.memo = None
        local.sink = sink


class _Local(threading.local):
    """Per thread: the state of the outermost `adopt`, and where class notes go."""

    #: During one outermost `adopt`: id(plain value) -> (value, what it became).
    #: The value is kept so that its id cannot be reused meanwhile.
    memo: dict[int, tuple[Any, Any]] | None = None
    #: Where `note_class` adds paths: the notes of the connection whose records
    #: are being built or pickled (see `_notes_of`), or None for `loose`.
    sink: set[str] | None = None

    def __init__(self) -> None:
        #: Paths noted for objects in no heap yet (built before they were
        #: stored): registered by every commit of this thread that lacks them.
        self.loose: set[str] = set()


_local = _Local()


def _adopt(value: Any, tp: type, memo: dict[int, tuple[Any, Any]]) -> Any:
    if tp in _ATOMIC:
        return value
    seen = memo.get(id(value))
    if seen is not None:
        return seen[1]
    conv = CONVERTERS.get(tp)
    if conv is not None:
        blank, fill = conv
        twin = blank()
        memo[id(value)] = (value, twin)  # before filling: the value may contain itself
        fill(twin, value)
        return twin
    if isinstance(value, Persistent):
        why = _unnamed(tp)
        if why is not None:
            raise BadValue(value, why)
        note_class(tp)
        return value
    if isinstance(value, tuple):
        items = []
        changed = False
        for i, v in enumerate(value):
            try:
                a = _adopt(v, type(v), memo)
            except BadValue as e:
                raise e.prefixed(f"[{i}]") from None
            changed = changed or a is not v
            items.append(a)
        if tp is not tuple:
            note_class(tp)  # a namedtuple's class is named in the record
        if not changed:
            return value
        # A tuple can be met again only through a list or dict inside it, whose
        # filling then built this tuple's twin already (see below): reuse it.
        seen = memo.get(id(value))
        if seen is not None:
            return seen[1]
        if tp is tuple:
            twin = tuple(items)
        else:
            make = getattr(tp, "_make", None)  # a namedtuple
            twin = make(items) if make is not None else tp(items)
        memo[id(value)] = (value, twin)
        return twin
    if isinstance(value, frozenset):
        for v in value:
            _adopt(v, type(v), memo)
        if tp is not frozenset:
            note_class(tp)
        return value
    _refuse_or_accept(value)
    return value


def _unnamed(obj: Any) -> str | None:
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


def _refuse_or_accept(value: Any, seen: set[int] | None = None) -> None:
    """Raise `BadValue` if `value` cannot be stored; plain objects are trial-pickled.

    `seen` holds the ids of the plain objects whose failing part is being looked
    for (see `_locate`), so that a cycle among them ends the search.
    """
    tp = type(value)
    if tp is types.BuiltinFunctionType:
        bound = not isinstance(value.__self__, (types.ModuleType, type(None)))
        # Stored by name, found in a module as pickle does (random.random is; [].append is not).
        if bound and not any(getattr(m, value.__name__, None) is value for m in list(sys.modules.values())):
            raise BadValue(value, _REFUSED[types.BuiltinMethodType])
        note_class(value)  # stored by name
        return
    if tp is types.FunctionType:
        why = _unnamed(value)
        if why is not None:
            raise BadValue(value, why)
        note_class(value)  # stored by name, like a class
        return
    if isinstance(value, type):
        why = _unnamed(value)
        if why is not None:
            raise BadValue(value, why)
        note_class(value)
        return
    if isinstance(value, enum.Enum):
        why = _unnamed(tp)
        if why is not None:
            raise BadValue(value, f"its class: {why}")
        note_class(tp)
        return
    reason = _REFUSED.get(tp) or _REFUSED_BY_NAME.get(f"{tp.__module__}.{tp.__qualname__}")
    if reason is None:
        for base, why in _REFUSED_BASES:
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
    why = _unnamed(tp) if default_reduce else None
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
        if type(child) in _ATOMIC:
            continue
        if id(child) in seen:
            cyclic = True  # an object around us in a cycle: being searched already
            continue
        try:
            _refuse_or_accept(child, seen)
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
    bad, cyclic = _search(_plain_children(value), seen)
    if bad is not None:
        return bad
    if cyclic and not outermost:
        raise _ThroughCycle
    return BadValue(value, f"pickling failed: {exc}")


def _plain_children(value: Any) -> Iterator[tuple[str, Any]]:
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


# --- dataclass defaults for objects stored before a field existed -------------

_DEFAULTS: dict[type, tuple[tuple[str, Any, Any], ...]] = {}


def dataclass_defaults(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, default, factory) of each field of dataclass `cls` that has a default."""
    found = _DEFAULTS.get(cls)
    if found is None:
        found = ()
        if dataclasses.is_dataclass(cls):
            found = tuple(
                (f.name, f.default, None if f.default_factory is dataclasses.MISSING else f.default_factory)
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
        _DEFAULTS[cls] = found
    return found


def fill_defaults(obj: Any, attrs: dict[str, Any]) -> None:
    """Give an object loaded from an older shape the defaults of its newer fields."""
    for name, default, factory in dataclass_defaults(type(obj)):
        if name not in attrs:
            attrs[name] = factory() if factory is not None else default


def _setstate_with_defaults(self: Any, state: Any) -> None:
    attrs = state[0] if isinstance(state, tuple) else state
    if attrs:
        self.__dict__.update(attrs)
    if isinstance(state, tuple) and state[1]:
        for name, value in state[1].items():
            object.__setattr__(self, name, value)
    fill_defaults(self, self.__dict__)


def serve_defaults(module: types.ModuleType) -> None:
    """Let the plain dataclasses of a program module fill new fields' defaults on load.

    A dataclass that gains ``tags: list = field(default_factory=list)`` would
    otherwise load old instances without ``tags``. Classes that define their own
    ``__setstate__`` or use slots are left alone.
    """
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and dataclasses.is_dataclass(value)
            and not issubclass(value, Persistent)
            and "__slots__" not in value.__dict__
            and all("__setstate__" not in k.__dict__ for k in value.__mro__[:-1])
        ):
            value.__setstate__ = _setstate_with_defaults  # type: ignore[attr-defined]


# --- snapshots ---------------------------------------------------------------


class _SnapshotPickler(pickle.Pickler):
    """Pickles like ZODB does for comparison: persistent objects as references."""

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle protocol
        if isinstance(obj, Persistent) and not isinstance(obj, type):
            note_class(type(obj))
            oid = obj._p_oid
            return oid if oid is not None else id(obj)
        return None


def _class_path(module: str, qualname: str) -> str:
    return f"{module}.{qualname}"


class _NotingPickler(_SnapshotPickler):
    """A snapshot pickler that also notes the program classes it pickles.

    Classes are pickled by their path, not looked up: after a deploy replaced a
    program's classes, instances of the old ones still snapshot (and compare)
    as they did, so changes made through references kept from before are still
    caught (see `_Watch._check_orphans`).
    """

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102 - pickle protocol
        if isinstance(obj, type):
            note_class(obj)
            if obj.__module__.partition(".")[0] in program_roots:
                return _class_path, (obj.__module__, obj.__qualname__)
            return NotImplemented
        tp = type(obj)
        if tp is types.FunctionType or tp is types.BuiltinFunctionType:
            note_class(obj)  # stored by name
            return NotImplemented
        note_class(tp)
        if tp not in _ATOMIC and _reduces_itself(tp):
            _note_reduce(obj)
        return NotImplemented


def _reduces_itself(tp: type) -> bool:
    """Whether `tp` pickles through a ``__reduce__`` of its own (cached per class)."""
    found = _OWN_REDUCE.get(tp)
    if found is None:
        found = _OWN_REDUCE[tp] = (getattr(tp, "__reduce_ex__", None) is not object.__reduce_ex__
                                   or getattr(tp, "__reduce__", None) is not object.__reduce__)
    return found


_OWN_REDUCE: dict[type, bool] = {}


def _note_reduce(obj: Any) -> None:
    """Note the function a ``__reduce__`` names: the record names it (``myapp.rebuild``)."""
    try:
        rv = obj.__reduce_ex__(3)
    except Exception:  # noqa: BLE001 - pickling reports it
        return
    if isinstance(rv, tuple) and rv and isinstance(rv[0], (type, types.FunctionType)):
        note_class(rv[0])


def snapshot(obj: Any, *, note: bool = False) -> bytes:
    """Bytes that change whenever the stored form of `obj` would change.

    With `note` (a value about to be stored), the classes it holds are noted
    for the registry; with programs loaded they always are.
    """
    buf = io.BytesIO()
    (_NotingPickler if program_roots or note else _SnapshotPickler)(buf, protocol=3).dump(obj)
    return buf.getvalue()


# --- the class registry ----------------------------------------------------------
#
# A deploy must know whether stored objects use a class that the new version
# removes, without scanning the heap; and the allowlist (`_allow`) lets records
# load the classes that were stored through this API. So the classes of
# programs' and users' modules (not the standard library's or ZODB's) are
# noted as values are stored: at assignment (`adopt`), in the snapshots the
# watch takes of records holding plain objects, and for `Object` records when
# they are saved. Before each commit the paths not yet registered are added to
# one small record (`CLASSES_KEY` in the ZODB root). The registry only grows:
# a path stays listed after its last object is gone (a deploy then needs
# ``force``). Heaps written before 0.3 registered program classes only:
# `COMPLETE_KEY` marks a registry that lists every class stored through the
# API, and until it is set a one-time scan of the records stands in for it.

#: Key of the registry of stored program class paths in the ZODB root.
CLASSES_KEY = "durable_heap.classes"
#: Key of the marker (True) that the registry lists users' classes too (since 0.3).
COMPLETE_KEY = "durable_heap.classes.complete"
#: Top-level module names of the programs loaded in this process: their classes
#: are registered, as are those of users' modules (the library's and the standard
#: library's never go away, and load by the allowlist's exact names).
program_roots: set[str] = set()
#
# The notes belong to one transaction: each connection's `_Watch` holds those of
# the transaction in progress on it (`_Watch.noted`), filled while that
# connection's objects take values (`adopt` with their jar) or are pickled (the
# watch's snapshots, `precheck`). The commit registers them in that transaction;
# an abort drops them, and storing the class again notes it again. A note made
# for an object in no heap yet goes to its thread's `_Local.loose`, which every
# commit of the thread registers where it is missing: at worst a class is
# registered in a heap that never stored it (a deploy removing it then needs
# ``force``), never left out of one that did.


def note_class(cls: Any) -> None:
    """Remember that an instance of `cls` (or the function `cls`) is being stored:
    classes of programs and of users' modules, not the standard library's or ZODB's."""
    paths = _class_paths(cls)
    if paths:
        sink = _local.sink
        (sink if sink is not None else _local.loose).update(paths)


def _class_paths(cls: Any) -> tuple[str, ...]:
    """The registry paths of `cls` if the registry lists it (see `note_class`), else ()."""
    module = getattr(cls, "__module__", None) or ""
    if not (registrable(module) or module.partition(".")[0] in program_roots):
        return ()
    if cls.__name__ != cls.__qualname__:  # a nested class exported as module.name:
        return (f"{module}.{cls.__qualname__}", f"{module}.{cls.__name__}")  # the path ZODB's pickles name
    return (f"{module}.{cls.__qualname__}",)


def _paths(classes: Iterable[type]) -> set[str]:
    """The registry paths of `classes` (as `note_class` notes them)."""
    return {path for cls in classes for path in _class_paths(cls)}


def _notes_of(jar: Any) -> set[str] | None:
    """The class notes of the transaction in progress on connection `jar`."""
    w = _watch_of(jar)
    return w.noted if w is not None else None


def _snapshot_for(jar: Any, obj: Any) -> bytes:
    """`snapshot`, noting the classes it meets for `jar`'s transaction (with `jar`
    None: nowhere, for a snapshot only compared, never stored)."""
    local = _local
    sink = local.sink
    notes = _notes_of(jar) if jar is not None else None
    local.sink = notes if notes is not None else set()
    try:
        return snapshot(obj, note=notes is not None)
    finally:
        local.sink = sink


def stored_classes(conn: Any) -> set[str]:
    """Every program class path that objects were ever stored with (see `note_class`).

    A heap written before the registry existed has none: its records are
    scanned once for the classes they name (see `_scan_classes`).
    """
    registry = conn.root().get(CLASSES_KEY)
    if registry is not None:
        return set(registry.keys())
    return set(_scanned(conn))


def ensure_registry(conn: Any) -> Any:
    """The registry record, created (seeded by a scan on an older heap) if missing,
    and completed by that scan once on a heap from before 0.3 (`COMPLETE_KEY`)."""
    root = conn.root()
    registry = root.get(CLASSES_KEY)
    if registry is None:
        from BTrees.OOBTree import OOBTree

        registry = OOBTree()
        registry.update(dict.fromkeys(stored_classes(conn), True))
        root[CLASSES_KEY] = registry
    elif not root.get(COMPLETE_KEY):
        registry.update(dict.fromkeys(_scanned(conn) - set(registry.keys()), True))
    if not root.get(COMPLETE_KEY):
        root[COMPLETE_KEY] = True
    return registry


def registered(conn: Any, path: str) -> bool:
    """Whether a class or function `path` was stored through the API in `conn`'s heap.

    The allowlist's question, asked while a record loads: answered from the
    registry, or on a heap from before 0.3 also from the one-time scan. While
    the root mapping itself loads, nothing can be read yet: no. Without a
    connection (conflict resolution inside the storage): no.
    """
    if conn is None:
        return False
    root = conn.root()
    if root._p_changed and "data" not in root.__dict__:
        return False
    registry = root.get(CLASSES_KEY)
    if registry is not None and path in registry:
        return True
    if root.get(COMPLETE_KEY):
        return False
    return path in _scanned(conn)


def _scanned(conn: Any) -> set[str]:
    """The class paths the current records name, scanned once per database."""
    db = conn.db()
    found: set[str] | None = db.__dict__.get("_dh_scanned")
    if found is None:
        found = db._dh_scanned = _scan_classes(db.storage)
    return found


# GLOBAL opcodes of protocol-3 pickles: ``c<module>\n<name>\n``.
_GLOBAL = re.compile(rb"c([A-Za-z_][\w.]*)\n([A-Za-z_][\w.]*)\n")
_LIBRARY_ROOTS = frozenset({
    "builtins", "__builtin__", "copyreg", "copy_reg", "durable_heap", "BTrees", "persistent",
    "ZODB", "zodbpickle", "datetime", "decimal", "fractions", "uuid", "pathlib", "collections",
    "enum", "_codecs",
})


def _scan_classes(storage: Any) -> set[str]:
    """The class paths named by the current records of `storage` (a one-time, full read)."""
    found: set[str] = set()

    def scan(data: bytes | None) -> None:
        # The regular expression finds candidates fast, but also in string data;
        # a record with one is read opcode by opcode (never unpickled) for the
        # globals it really names: the allowlist trusts what this finds.
        if data and any(m.group(1).partition(b".")[0].decode("ascii", "replace") not in _LIBRARY_ROOTS
                        for m in _GLOBAL.finditer(data)):
            try:
                names = record_globals(data)
            except Exception:  # noqa: BLE001,S112 - a record that does not parse names nothing
                return
            found.update(n for n in names if n != "?" and n.partition(".")[0] not in _LIBRARY_ROOTS)

    if hasattr(storage, "record_iternext"):
        cursor = None
        while True:
            _, _, data, cursor = storage.record_iternext(cursor)
            scan(data)
            if cursor is None:
                break
    else:
        for txn in storage.iterator():
            for record in txn:
                scan(record.data)
    return found


def _register_pending(conn: Any) -> None:
    """Add the class paths noted for this transaction that the registry lacks
    (a before-commit hook; see `note_class`)."""
    w = _watch_of(conn)
    loose = _local.loose
    if w is None or not (w.noted or loose) or conn.isReadOnly():
        return
    known: set[str] | None = conn.__dict__.get("_dh_classes")
    if known is None:
        known = conn._dh_classes = stored_classes(conn)
    new = (w.noted | loose) - known
    # Notes made from here on (ZODB pickling new objects at commit) are kept for
    # the next transaction if this one commits, and dropped with it otherwise.
    w.noted = set()
    if not new:
        return
    registry = ensure_registry(conn)
    for path in new:
        registry[path] = True

    def remember(ok: bool) -> None:
        if ok:
            known.update(new)

    conn.transaction_manager.get().addAfterCommitHook(remember)


# --- the watch ---------------------------------------------------------------


class _Watch:
    """Per connection: durable objects loaded or saved with watched values.

    Registered as a synchronizer of the connection's transaction manager, so it
    sees the end of every transaction, including ones committed with plain
    ``transaction.commit()``.
    """

    __slots__ = ("jar", "tm", "items", "hooked", "hot", "orphans", "noted", "__weakref__")

    def __init__(self, jar: Any) -> None:
        self.jar = weakref.ref(jar)
        self.tm: Any = None
        # id(obj) -> (obj, snapshot of its state when loaded or last saved)
        self.items: dict[int, tuple[Any, bytes]] = {}
        self.hooked: Any = None
        # containers holding values read in this transaction (`remember_reads`)
        self.hot: list[Any] = []
        # plain objects of records ghosted after a transaction that someone still
        # holds: changed later, the change would be lost (see `_check_orphans`)
        self.orphans: list[_Orphan] = []
        # program class paths noted for the transaction in progress (`note_class`)
        self.noted: set[str] = set()

    def forget_reads(self) -> None:
        hot, self.hot = self.hot, []
        for obj in hot:
            if obj._p_changed is not None:  # a ghost has forgotten already
                obj._dh_forget_reads()

    # ISynchronizer
    def newTransaction(self, txn: Any, sync: bool = True) -> None:  # noqa: N802
        self.forget_reads()
        if txn is not None:
            # Always: its hook also registers the classes noted in the transaction,
            # however it is committed (heap.transaction(), or the transaction manager).
            self._hook(txn)

    def beforeCompletion(self, txn: Any) -> None:  # noqa: N802
        pass

    def afterCompletion(self, txn: Any) -> None:  # noqa: N802
        if txn is None or txn.status != Status.COMMITTED:
            self.noted = set()  # aborted: nothing was stored (see `_register_pending`)
        self.forget_reads()
        items, self.items, self.hooked = self.items, {}, None
        values: list[tuple[Any, bytes, str]] = []
        for obj, _ in items.values():
            # Ghost it: the next transaction reloads (and watches) it, and an
            # aborted in-place change does not survive in memory.
            if obj._p_jar is not None and obj._p_oid is not None:
                values += [(v, obj._p_oid, acc) for acc, v in _plain_values(obj)]
                obj._p_invalidate()
        # A value still referenced after the ghosting is held by user code, which
        # may change it later believing it still part of state.
        # CPython counts the references: ours are the entry tuple (and below the
        # loop variable), plus one for getrefcount's own argument.
        held = [entry for entry in values if sys.getrefcount(entry[0]) > 2]
        if held:
            # ZODB's object writers are reference cycles that keep what they
            # pickled alive until the cyclic GC runs: collect the young ones
            # first, so that only references from user code remain.
            gc.collect(1)
        for entry in held:
            value = entry[0]
            if sys.getrefcount(value) > 3:
                try:
                    self.orphans.append(_Orphan(value, _snapshot_for(None, value), entry[1], entry[2]))
                except Exception:  # noqa: BLE001,S112 - unpicklable now: nothing to compare
                    continue
        del values
        del self.orphans[:-ORPHANS_MAX]

    def _hook(self, txn: Any) -> None:
        if self.hooked is not txn:
            txn.addBeforeCommitHook(self._before_commit)
            self.hooked = txn

    def _before_commit(self) -> None:
        if self.orphans:
            self._check_orphans()
        for obj, base in list(self.items.values()):
            if obj._p_changed is not False:
                continue  # saved anyway, or a ghost again
            try:
                now = _snapshot_for(obj._p_jar, obj.__getstate__())
            except Exception as exc:  # noqa: BLE001 - report which value it is
                raise culprit(obj, exc) from None
            if now != base:
                obj._p_changed = True
        jar = self.jar()
        if jar is not None:
            _register_pending(jar)  # last: the snapshots above may note classes


    def _check_orphans(self) -> None:
        """Refuse to commit when a plain object that left state was changed.

        Plain objects are copies inside their holder's record: after the
        transaction the record is ghosted and the next load makes new copies. A
        change through an old reference would be silently lost; say so instead.
        """
        alive = []
        for orphan in self.orphans:
            value = orphan.value
            if sys.getrefcount(value) <= 3:  # the orphan, `value` and the argument: ours only
                continue
            try:
                unchanged = _snapshot_for(None, value) == orphan.snapshot
            except Exception:  # noqa: BLE001 - changed into something unpicklable
                unchanged = False
            if unchanged:
                alive.append(orphan)
                continue
            self.orphans = alive + [o for o in self.orphans[len(alive) + 1:] if o is not orphan]
            raise _stale(orphan, value, self.jar())
        self.orphans = alive


#: Plain objects held from ghosted records that a watch keeps checking.
ORPHANS_MAX = 1_000


class _Orphan:
    __slots__ = ("value", "snapshot", "oid", "accessor")

    def __init__(self, value: Any, snap: bytes, oid: bytes, accessor: str) -> None:
        self.value, self.snapshot, self.oid, self.accessor = value, snap, oid, accessor


def _plain_values(obj: Any) -> list[tuple[str, Any]]:
    """The watched plain values of a record in memory, with their accessors."""
    return [(acc, v) for acc, v in _durable_children(obj) if not is_atomic(v)]


def _stale(orphan: _Orphan, value: Any, jar: Any) -> Exception:
    where = "a record"
    if jar is not None:
        try:
            where = path_of(jar.get(orphan.oid))
        except Exception:  # noqa: BLE001,S110 - only for the message
            pass
    name = type(value).__name__
    return StaleReferenceError(
        f"{where}{orphan.accessor}: a {name} was changed through a reference kept from an "
        "earlier transaction. Plain objects are loaded afresh by each transaction, so that "
        f"{name} is no longer the one in state and the change would be lost; the "
        f"transaction was aborted. Read it from state inside the transaction that changes "
        f"it, or make {name} a durable_heap.Object subclass (those can be kept)."
    )


def culprit(holder: Any, exc: BaseException) -> NotPersistableError:
    """The error naming the value of `holder` that does not pickle."""
    base = path_of(holder)  # first: walking the path also teaches List leaves their offsets
    bad = _first_bad(_durable_children(holder))
    return public_error(bad or BadValue(holder, f"pickling failed: {exc}"), holder, base=base)


def precheck(conn: Any) -> None:
    """Before a commit: name any value that will not pickle, while it still can be.

    Only records holding watched values can fail (everything else was checked
    on assignment), so only those are trial-pickled. After a failed commit ZODB
    has already rolled the objects back, so this is the last moment to say which
    value it was. Reads ZODB's private lists of changed and added objects.
    """
    changed = list(getattr(conn, "_registered_objects", ()))
    changed += list(getattr(conn, "_added", {}).values())
    noted = _notes_of(conn)
    if noted is not None:
        noted.update(_paths(type(obj) for obj in changed))
    # After the watch's own hook, which may snapshot (and note) more values.
    conn.transaction_manager.get().addBeforeCommitHook(_register_pending, (conn,))
    for obj in changed:
        watched = getattr(type(obj), "_dh_watched", None)
        if watched is None or obj._p_changed is None or not watched(obj):
            continue
        try:
            _snapshot_for(conn, obj.__getstate__())
        except Exception as exc:  # noqa: BLE001 - name the value that fails
            raise culprit(obj, exc) from None


def _watch_of(jar: Any) -> _Watch | None:
    """The `_Watch` of a connection, registered with its transaction manager."""
    w: _Watch | None = jar.__dict__.get("_dh_watch")
    if w is None:
        w = jar._dh_watch = _Watch(jar)
    tm = jar.transaction_manager
    if tm is None:
        return None
    if w.tm is not tm:
        if w.tm is not None:
            w.tm.unregisterSynch(w)
        w.tm = tm
        tm.registerSynch(w)
    return w


def remember_reads(obj: Any) -> None:
    """`obj` now caches values read in this transaction: forget them when it ends.

    Snapshot isolation makes such a cache exact within one transaction; the
    next one may see other processes' changes, so the cache goes.
    """
    w = _watch_of(obj._p_jar)
    if w is not None:
        w.hot.append(obj)


def reset_watch(jar: Any) -> None:
    """A connection changes hands (opened from ZODB's pool, or closed into it).

    Whatever the watch holds belongs to the previous user: ghost the watched
    objects, drop the read caches, and follow the connection's current
    transaction manager (a pooled connection comes back with a new one).
    """
    w = _watch_of(jar)
    if w is None:
        return
    w.forget_reads()
    w.afterCompletion(None)


def watched_plain_ids(jar: Any) -> set[int]:
    """Ids of the plain objects held by records loaded or changed in this transaction."""
    w = jar.__dict__.get("_dh_watch")
    records = [obj for obj, _ in w.items.values()] if w is not None else []
    records += getattr(jar, "_registered_objects", [])
    records += getattr(jar, "_added", {}).values()
    return {id(v) for obj in records for _, v in _plain_values(obj)}


def forget_reads(jar: Any) -> None:
    """Drop every per-transaction read cache of a connection (it was synced)."""
    w = jar.__dict__.get("_dh_watch")
    if w is not None:
        w.forget_reads()


def watch(obj: Any, state: Any) -> None:
    """Register `obj`, just loaded from or saved as `state`, which holds watched values.

    The snapshot of `state` is what the commit compares against; after the
    transaction the object is ghosted (see `_Watch`).
    """
    jar = obj._p_jar
    if jar is None or obj._p_oid is None:
        return
    w = _watch_of(jar)
    if w is None:
        return
    tm = w.tm
    w.items[id(obj)] = (obj, _snapshot_for(jar, state))
    try:
        txn = tm.get()
    except transaction.interfaces.NoTransaction:
        return  # loaded outside a transaction: hooked when the next one begins
    w._hook(txn)


# --- transactions ------------------------------------------------------------


def check_writable(obj: Any) -> None:
    """Raise `NoTransactionError` when `obj` is durable and no transaction is open.

    Called by every mutator *before* it changes anything, so that a refused
    change leaves memory as it was.
    """
    jar = obj._p_jar
    if jar is None:
        return
    if getattr(jar, "before", None) is not None:
        # A historical connection (heap.state_at): ZODB itself refuses only at
        # commit, which a view never does, so a change would be silently dropped.
        view = jar.__dict__.get("_dh_view")
        when = f" at {view}" if view else ""
        msg = (
            f"{path_of(obj)} belongs to the read-only view of the state{when} (heap.state_at) "
            "and cannot be changed. Make changes through heap.state, in a transaction."
        )
        raise StorageError(msg)
    tm = jar.transaction_manager
    if tm is None or not tm.explicit:
        return
    try:
        tm.get()
    except transaction.interfaces.NoTransaction:
        msg = (
            f"{path_of(obj)} was changed outside a transaction. Make changes inside "
            "`with heap.transaction():` or a function decorated with `@heap.action` "
            "(programs run by `durable-heap call` are inside one already)."
        )
        raise NoTransactionError(msg) from None


def view_changes(jar: Any) -> str | None:
    """The path of a record changed through the read-only connection `jar`, or None.

    Durable objects refuse changes there (`check_writable`); a plain object held
    in a record (a dataclass) cannot, so its record's snapshot is compared, as the
    watch does before a commit.
    """
    changed = list(getattr(jar, "_registered_objects", ()))
    if changed:
        return path_of(changed[0])
    w = jar.__dict__.get("_dh_watch")
    for obj, base in list(w.items.values()) if w is not None else ():
        if obj._p_changed is False:
            try:
                same = snapshot(obj.__getstate__()) == base
            except Exception:  # noqa: BLE001 - changed into something unpicklable
                same = False
            if not same:
                plain = _plain_values(obj)
                return path_of(obj) + (plain[0][0] if len(plain) == 1 else "")
    return None


# --- paths -------------------------------------------------------------------


def _durable_children(obj: Any) -> Iterator[tuple[str, Any]]:
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
        yield from _plain_children(obj)


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
        for accessor, child in _durable_children(current):
            if child is obj:
                return path + accessor
            if id(child) in seen or type(child) in _ATOMIC:
                continue
            if isinstance(child, Persistent) and child._p_changed is None:
                continue
            seen.add(id(child))
            queue.append((child, path + accessor))
    return f"<{name} oid {_oid(obj)}>"


def _oid(obj: Any) -> str:
    oid = getattr(obj, "_p_oid", None)
    return "0x" + oid.hex().lstrip("0") if oid else "?"
