"""Snapshots: the bytes a value pickles to inside its record, to see whether it changed.

Pickled as ZODB pickles a record (persistent objects as references), noting
the classes met for the registry (`_registry.note_class`).
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

from persistent import Persistent

from ._kinds import ATOMIC
from ._registry import adopt_loose, note_class, program_roots

__all__ = ["snapshot"]


class _SnapshotPickler(pickle.Pickler):
    """Pickles like ZODB does for comparison: persistent objects as references."""

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle protocol
        if isinstance(obj, Persistent) and not isinstance(obj, type):
            note_class(type(obj))
            stored = getattr(type(obj), "_dh_stored", None)
            if stored is not None:
                # An inline value held by a plain object (a dataclass) is stored in a
                # second place: it becomes one record (`_inline`) before the commit
                # writes this reference, never a copy that diverges.
                stored(obj)
            oid = obj._p_oid
            if obj._p_jar is None:
                # In no heap yet, held by a plain object stored now (a dataclass): the
                # notes made for it come along, as in `stored_form` (see `_registry`).
                adopt_loose()
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
        if tp not in ATOMIC and _reduces_itself(tp):
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
