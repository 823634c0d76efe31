"""A faster pickling of records that hold only plain atoms (issue 18, the one-entry commit).

ZODB's pickler (``ZODB.serialize.ObjectWriter``) calls its ``persistent_id``, a
Python method, for every object it pickles: the C pickler has no other hook
(zodbpickle's ``save`` calls it before looking at the type, ints and strs
included). A bucket of a `Dict`'s entries holds about 20 entries of
``seq: (key, value)``: some 85 objects, so those calls were most of the cost of
pickling it (measured: 41 us against 5 us with no ``persistent_id``), and the
largest single difference between our one-entry commit and raw ZODB's, which
rewrites a tiny ``Persistent`` item of 4 objects.

A class whose records are often made of plain atoms says so with a
``_dh_plain_refs(state)`` static method: it returns the persistent objects the
state references (the next bucket of a bucket), or None when the state holds
anything else. For such a state ZODB's own ``persistent_id`` is called once per
referenced object (assigning oids to new ones and queueing them to be stored,
exactly as it would while pickling), and the pickler then uses the C method
``dict.get`` of a table of those answers: ``None`` for every atom, as ZODB's
method returns for them, and the same reference for the persistent objects. The
record is byte for byte what ZODB writes (tests/test_fastpickle.py).

A class that cannot carry the method (a C type: the ``IOBucket`` records of a
workflow's journal) is given one with `register`.

Why the atoms must be hashable and exact: ``dict.get`` hashes what it is given,
so only exact builtin atoms (`PLAIN_ATOMS`) and tuples of them qualify; a state
holding anything else (a list, an inline dict, a user's object, a `Dict`) is
pickled by ZODB's own method, unchanged. A state that references no persistent
object anywhere (``_dh_plain_refs`` returns `NO_REFS`) is pickled with a C callable that
answers None to anything, hashable or not: such a class may accept more than atoms, as
long as ZODB's method answers None for each object (the heap's timer buckets: entries
whose arguments are plain, with their empty kwargs dicts, `_workflows`).
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable
from itertools import chain
from typing import Any

from BTrees.OOBTree import OOBTree, OOBucket
from ZODB._compat import PersistentUnpickler
from ZODB.serialize import ObjectReader, ObjectWriter

__all__ = ["NO_REFS", "PLAIN_ATOMS", "BufferedObjectReader", "plain_bucket_refs", "plain_tree_refs",
           "plain_values", "register", "speed_up"]

#: Exact types that ZODB's ``persistent_id`` answers None for and that hash
#: without calling user code.
PLAIN_ATOMS: frozenset[type] = frozenset({int, str, float, bool, bytes, type(None)})

_dump = ObjectWriter._dump

_PLAIN_TUPLE = PLAIN_ATOMS | {tuple}

class _NoRefs(tuple):  # type: ignore[type-arg]
    """The type of `NO_REFS` (an empty tuple told apart from ``()`` by identity)."""

    __slots__ = ()


#: What a ``_dh_plain_refs`` rule returns for a state it has checked holds no
#: persistent object, type or weak reference anywhere (inside dicts and lists too):
#: ZODB's ``persistent_id`` answers None for each of its objects, hashable or not.
#: (A rule that returns ``()`` promises less: the state's hashable objects are plain; an
#: unhashable one, unlooked into, makes the table fail and ZODB pickle the record.)
NO_REFS: tuple[Any, ...] = _NoRefs()

#: A C callable that takes any one object and returns None, keeping nothing: ZODB's
#: ``persistent_id`` answer for every object of a state that references no persistent
#: object (see `speed_up`).
_answer_none: Callable[[Any], None] = deque(maxlen=0).append

#: ``_dh_plain_refs`` of classes that cannot carry it (C types), by class (`register`).
_registered: dict[type, Callable[[Any], tuple[Any, ...] | None]] = {}


def register(cls: type, plain_refs: Callable[[Any], tuple[Any, ...] | None]) -> None:
    """Give `cls` (a C type, which takes no new attribute) a ``_dh_plain_refs``."""
    _registered[cls] = plain_refs


def plain_values(values: Any, depth: int = 0) -> bool:
    """Whether every one of `values` is an exact plain atom or a tuple of them (nested).

    A tuple must be looked into: one holding a persistent object is pickled as a
    reference by ZODB, so the table (which answers None for what it does not hold)
    would pickle that object by value instead.
    """
    kinds = set(map(type, values))
    if kinds <= PLAIN_ATOMS:
        return True
    if not kinds <= _PLAIN_TUPLE or depth >= 8:
        return False
    # The tuples among them, flattened one level and looked into together: one call per
    # level, not one per tuple (a bucket of 30 tuple keys: 8 us, not 14).
    return plain_values(tuple(chain.from_iterable([v for v in values if type(v) is tuple])), depth + 1)


def plain_bucket_refs(state: Any) -> tuple[Any, ...] | None:
    """``_dh_plain_refs`` of ``OOBucket``, state ``((key, value, ...), [next bucket])``:
    its next bucket, when every key and value is plain; else None (ZODB's way)."""
    return state[1:] if plain_values(state[0]) else None  # type: ignore[no-any-return]


def plain_tree_refs(state: Any) -> tuple[Any, ...] | None:
    """``_dh_plain_refs`` of ``OOBTree``: nothing, when it is empty or one bucket held
    inline, ``((((key, value, ...),),),)``, of plain keys and values; else None. A split
    tree, ``((bucket, key, bucket, ...), first bucket)``, names its first bucket twice,
    which ZODB pickles as two references (the table would give one, memoized: other
    bytes), so it is left to ZODB (and is written only at a split)."""
    if state is None:
        return ()
    if len(state) == 1 and plain_values(state[0][0][0]):
        return ()
    return None


# The heap's own trees are plain ``OOBTree``s (workflows' status and waiting indexes,
# their members, the class registry, ...) of plain keys and values: a workflow's start
# and end rewrite several of their buckets (about 30 entries, 150 objects each).
# Exact classes only (`speed_up` looks them up by class): a subclass is not covered.
# (`_workflows` registers rules that extend these, for the timers' buckets.)
register(OOBucket, plain_bucket_refs)
register(OOBTree, plain_tree_refs)


# -- PROTECTED: ZODB.serialize.ObjectWriter internals (ZODB 6.4) --
# ``serialize(obj)`` ends in ``self._dump(classmeta, state)``, looked up on the
# instance; ``_p`` is its pickler, whose ``persistent_id`` attribute is the
# callback (zodbpickle's C pickler: any callable); ``persistent_id`` is ZODB's
# method. tests/test_zodb_internals.py pins them.
def speed_up(writer: Any) -> None:
    """Make `writer` (an ``ObjectWriter`` about to store records) pickle plain states fast."""

    def dump(classmeta: Any, state: Any) -> bytes:
        # Format 1: meta is the class; (class, args) for one with __getnewargs__ (not
        # looked up: its args may not hash).
        plain_refs = _registered.get(classmeta) if classmeta.__class__ is not tuple else None
        if plain_refs is None:
            plain_refs = getattr(classmeta, "_dh_plain_refs", None)
        refs = plain_refs(state) if plain_refs is not None else None
        if refs is None:
            return _dump(writer, classmeta, state)  # type: ignore[no-any-return]
        pid = writer.persistent_id
        pickler = writer._p
        if refs is NO_REFS and pid(classmeta) is None:
            # A state its rule checked through and through (`NO_REFS`): every answer is
            # None, so a C callable that answers None to anything, which also takes what
            # the table cannot hash (a timer's kwargs dict).
            pickler.persistent_id = _answer_none
            try:
                return _dump(writer, classmeta, state)  # type: ignore[no-any-return]
            finally:
                pickler.persistent_id = pid
        try:
            table = {classmeta: pid(classmeta)}
            for ref in refs:
                table[ref] = pid(ref)
        except TypeError:  # an unhashable reference: ZODB's way (pid did nothing twice)
            return _dump(writer, classmeta, state)  # type: ignore[no-any-return]
        pickler.persistent_id = table.get
        try:
            return _dump(writer, classmeta, state)  # type: ignore[no-any-return]
        except TypeError:  # something unhashable after all: ZODB's way (``_dump`` starts afresh)
            pass
        finally:
            pickler.persistent_id = pid
        return _dump(writer, classmeta, state)  # type: ignore[no-any-return]

    writer._dump = dump
# -- end PROTECTED --


# -- PROTECTED: ZODB.serialize.ObjectReader internals (ZODB 6.4) --
# ``_get_unpickler(pickle)`` makes the unpickler every load goes through
# (``getClassName``, ``getGhost``, ``getState``, ``setGhostState``), from
# ``self._factory``, ``self._conn`` and ``self._persistent_load``; it is copied
# below with one change. ``Connection.__init__`` makes the connection's
# ``_reader``. tests/test_zodb_internals.py pins them.
class BufferedObjectReader(ObjectReader):  # type: ignore[misc]
    """ZODB's ObjectReader, whose unpickler reads the record through a buffered stream.

    ZODB trap: ZODB hands zodbpickle's C unpickler an ``io.BytesIO``, which has no
    ``peek``: the unpickler then calls the stream's ``read`` (a Python-level call,
    arguments built with ``Py_BuildValue``) for every opcode it reads. Given a
    stream with ``peek`` (``io.BufferedReader``) it takes what is there at once
    and reads from memory, then moves the stream on by what it consumed, so the
    second ``load()`` of a record (class, then state) starts where the first
    ended: the same objects, about half the cost of unpickling a bucket of
    entries (measured: 44 us against 24 us for one of 40 entries). Loads are
    most of what a connection pays for the commits of the others (each reloads
    the records they invalidated: a bucket per one-entry commit of another of
    serve's 16 threads, or of another worker over ZEO).
    """

    def _get_unpickler(self, pickle: bytes) -> Any:
        file = io.BufferedReader(io.BytesIO(pickle))  # ZODB's: ``BytesIO(pickle)``

        factory = self._factory
        conn = self._conn

        def find_global(modulename: str, name: str) -> Any:
            return factory(conn, modulename, name)

        return PersistentUnpickler(find_global, self._persistent_load, file)
# -- end PROTECTED --
