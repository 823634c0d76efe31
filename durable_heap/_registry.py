"""The class registry: which classes and functions objects were stored with (a root record).

Noted as values are stored (`note_class`), registered before each commit (by
the watch's hook, `_watch.register_pending`), read by a deploy (`stored_classes`:
which classes a new version must keep) and by the allowlist (`registered`). A
heap from before 0.3 is scanned once for the classes its records name
(`scan_classes`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

from ._allow import record_globals, registrable
from ._format import CLASSES_KEY, COMPLETE_KEY

__all__ = [
    "CLASSES_KEY",
    "COMPLETE_KEY",
    "adopt_loose",
    "class_paths",
    "ensure_registry",
    "note_class",
    "program_roots",
    "registered",
    "stored_classes",
]


class _Local(threading.local):
    """Per thread: where class notes go (`note_class`), and the memo of the outermost `stored_form`."""

    #: During one outermost `stored_form`: id(plain value) -> (value, what it became).
    #: The value is kept so that its id cannot be reused meanwhile.
    memo: dict[int, tuple[Any, Any]] | None = None
    #: Where `note_class` adds paths: the notes of the connection whose records
    #: are being built or pickled (see `notes_of`), or None for `loose`.
    sink: set[str] | None = None
    #: During one outermost `stored_form`: id -> plain dict or list copied inline
    #: (see `_inline`), to tell a container met twice.
    inlined: dict[int, Any] | None = None
    #: Set while `stored_form` converts a value again without inline copies.
    no_inline: bool = False

    def __init__(self) -> None:
        #: Paths noted for objects in no heap yet (built before they were
        #: stored): registered by every commit of this thread that lacks them.
        self.loose: set[str] = set()


per_thread = _Local()


# --- the class registry ----------------------------------------------------------
#
# A deploy must know whether stored objects use a class that the new version
# removes, without scanning the heap; and the allowlist (`_allow`) lets records
# load the classes that were stored through this API. So the classes of
# programs' and users' modules (not the standard library's or ZODB's) are
# noted as values are stored: at assignment (`stored_form`), in the snapshots the
# watch takes of records holding plain objects, and for `Object` records when
# they are saved. Before each commit the paths not yet registered are added to
# one small record (`CLASSES_KEY` in the ZODB root). The registry only grows:
# a path stays listed after its last object is gone (a deploy then needs
# ``force``). Heaps written before 0.3 registered program classes only:
# `COMPLETE_KEY` marks a registry that lists every class stored through the
# API, and until it is set a one-time scan of the records stands in for it.

# Its keys in the ZODB root: `CLASSES_KEY` and `COMPLETE_KEY` (see `_format`).
#: Top-level module names of the programs loaded in this process: their classes
#: are registered, as are those of users' modules (the library's and the standard
#: library's never go away, and load by the allowlist's exact names).
program_roots: set[str] = set()
#
# The notes belong to one transaction: each connection's `_Watch` holds those of
# the transaction in progress on it (`_Watch.noted`), filled while that
# connection's objects take values (`stored_form` with their jar) or are pickled (the
# watch's snapshots, `check_before_commit`). The commit registers them in that transaction;
# an abort drops them, and storing the class again notes it again. A note made
# for an object in no heap yet (``User()`` whose ``__init__`` sets attributes) goes
# to its thread's `_Local.loose`; when the thread stores an object that is in no
# heap yet into a heap's object (`adopt_loose`, from `stored_form`), all of them join
# that transaction's notes. So a heap that is given such an object registers every
# class the thread noted outside a heap (at worst one it never stored: a deploy
# removing it then needs ``force``), never misses one it did; a heap that is given
# none registers none of them (they used to go into every later commit of the
# thread, in any heap). Not covered: an object built in one thread and stored by
# another (its notes are the first thread's).


def note_class(cls: Any) -> None:
    """Remember that an instance of `cls` (or the function `cls`) is being stored:
    classes of programs and of users' modules, not the standard library's or ZODB's."""
    paths = _class_paths(cls)
    if paths:
        sink = per_thread.sink
        (sink if sink is not None else per_thread.loose).update(paths)


def adopt_loose() -> None:
    """An object in no heap yet is being stored into a heap's object: the notes this thread
    made outside any heap join the notes of the transaction being built (see above)."""
    local = per_thread
    if local.loose and local.sink is not None:
        local.sink.update(local.loose)


def _class_paths(cls: Any) -> tuple[str, ...]:
    """The registry paths of `cls` if the registry lists it (see `note_class`), else ()."""
    module = getattr(cls, "__module__", None) or ""
    if not (registrable(module) or module.partition(".")[0] in program_roots):
        return ()
    if cls.__name__ != cls.__qualname__:  # a nested class exported as module.name:
        return (f"{module}.{cls.__qualname__}", f"{module}.{cls.__name__}")  # the path ZODB's pickles name
    return (f"{module}.{cls.__qualname__}",)


def class_paths(classes: Iterable[type]) -> set[str]:
    """The registry paths of `classes` (as `note_class` notes them)."""
    return {path for cls in classes for path in _class_paths(cls)}


def stored_classes(conn: Any) -> set[str]:
    """Every program class path that objects were ever stored with (see `note_class`).

    A heap written before the registry existed has none: its records are
    scanned once for the classes they name (see `scan_classes`).
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
        found = db._dh_scanned = scan_classes(db.storage)
    return found


# GLOBAL opcodes of protocol-3 pickles: ``c<module>\n<name>\n``.
_GLOBAL = re.compile(rb"c([A-Za-z_][\w.]*)\n([A-Za-z_][\w.]*)\n")
_LIBRARY_ROOTS = frozenset({
    "builtins", "__builtin__", "copyreg", "copy_reg", "durable_heap", "BTrees", "persistent",
    "ZODB", "zodbpickle", "datetime", "decimal", "fractions", "uuid", "pathlib", "collections",
    "enum", "_codecs",
})


def scan_classes(storage: Any) -> set[str]:
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
