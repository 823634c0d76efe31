"""A value's stored form: what it becomes when it is stored (a durable twin, or itself).

`stored_form` is called by every durable object as a value is assigned into it: plain
``dict``/``list``/``set`` become `Dict`/`List`/`Set` (`_kinds.CONVERTERS`),
atomic values and durable objects stay as they are, plain objects are checked
(`_storable`) and then watched in their holder's record (`_watch`). The classes
met are noted for the registry of the heap they go into (`_registry`).

The value layer is split by concern: `_kinds` (kinds of values), `_paths`
(paths for messages), `_registry` (the class registry), `_snapshot`
(pickling for comparison), `_storable` (refusals and their errors), `_watch`
(the watch, writability), `_defaults` (dataclass defaults). This module
re-exports their names that were imported from here before the split.
"""

from __future__ import annotations

from typing import Any

from persistent import Persistent

from ._defaults import dataclass_defaults, fill_defaults, serve_defaults
from ._format import CLASSES_KEY, COMPLETE_KEY, ROOT_KEY
from ._kinds import ATOMIC, CONVERTERS, BadValue, SharedInline, holds_watched, is_atomic
from ._paths import holder_path, path_of
from ._registry import (
    adopt_loose,
    ensure_registry,
    note_class,
    program_roots,
    registered,
    stored_classes,
)
from ._registry import per_thread as _local  # the name tests and older code know
from ._registry import scan_classes as _scan_classes  # noqa: F401 - likewise (tests)
from ._snapshot import snapshot
from ._storable import public_error, refuse_or_accept, unnamed
from ._storable import unpicklable_error as culprit  # its name before the split
from ._watch import check_before_commit as precheck  # its name before the split
from ._watch import (
    check_writable,
    forget_reads,
    notes_of,
    remember_reads,
    reset_watch,
    view_changes,
    watch,
    watched_plain_ids,
)

__all__ = [
    "CLASSES_KEY",
    "COMPLETE_KEY",
    "CONVERTERS",
    "ROOT_KEY",
    "BadValue",
    "stored_form",
    "check_writable",
    "culprit",
    "dataclass_defaults",
    "ensure_registry",
    "fill_defaults",
    "forget_reads",
    "holder_path",
    "holds_watched",
    "is_atomic",
    "note_class",
    "path_of",
    "precheck",
    "program_roots",
    "public_error",
    "registered",
    "remember_reads",
    "reset_watch",
    "serve_defaults",
    "snapshot",
    "stored_classes",
    "view_changes",
    "watch",
    "watched_plain_ids",
]


def stored_form(value: Any, jar: Any = None) -> Any:
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
    if tp in ATOMIC or (tp is tuple and set(map(type, value)) <= ATOMIC):
        return value  # the common cases, decided at C speed
    local = _local
    memo = local.memo
    if memo is not None:
        return _stored_form(value, tp, memo)
    memo = local.memo = {}
    sink = local.sink
    local.sink = notes_of(jar) if jar is not None else None
    try:
        try:
            return _stored_form(value, tp, memo)
        except SharedInline:
            # A plain container held twice in `value` was copied inline once (`_inline`):
            # convert it all again without inline copies, so that it stays one object.
            local.memo, local.inlined, local.no_inline = {}, None, True
            try:
                return _stored_form(value, tp, local.memo)
            finally:
                local.no_inline = False
    except RecursionError:
        # Not a cycle (those end at the memo): nesting deeper than the stack.
        # Unwound to here, the stack is free again to build the error.
        raise BadValue(value, "it is nested too deeply to be stored; flatten it, or store "
                       "the inner levels as durable_heap.Object attributes") from None
    finally:
        local.memo = local.inlined = None
        local.sink = sink


def _stored_form(value: Any, tp: type, memo: dict[int, tuple[Any, Any]]) -> Any:
    if tp in ATOMIC:
        return value
    seen = memo.get(id(value))
    if seen is not None:
        return seen[1]
    conv = CONVERTERS.get(tp)
    if conv is not None:
        inlined = _local.inlined
        if inlined and id(value) in inlined:
            raise SharedInline  # copied inline already, and met again here: see `stored_form`
        blank, fill = conv
        twin = blank()
        memo[id(value)] = (value, twin)  # before filling: the value may contain itself
        fill(twin, value)
        return twin
    if isinstance(value, Persistent):
        why = unnamed(tp)
        if why is not None:
            raise BadValue(value, why)
        note_class(tp)
        if value._p_jar is None:  # (reading _p_jar never loads a ghost)
            adopt_loose()  # in no heap yet: the notes made for it come along (see `_registry`)
        stored = getattr(tp, "_dh_stored", None)  # on the class: a ghost is not loaded
        if stored is not None:
            stored(value)  # an inline value stored into a second place becomes a record
        return value
    if isinstance(value, tuple):
        items = []
        changed = False
        for i, v in enumerate(value):
            try:
                a = _stored_form(v, type(v), memo)
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
            _stored_form(v, type(v), memo)
        if tp is not frozenset:
            note_class(tp)
        return value
    refuse_or_accept(value)
    return value
