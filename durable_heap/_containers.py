"""Durable `Dict`, `List` and `Set`: builtin behaviour, commits that cost what changed.

Small containers live in one record (like ``PersistentMapping``). Past a few dozen
entries they grow into a tree form whose records are small and independent, so a
one-entry change rewrites one bucket, never the whole container:

`Dict` / `Set` (tree form)
    ``_entries``  LOBTree: insertion sequence number -> ``(key, value)``
                  (gives insertion order and streams in order)
    ``_index``    LLBTree: 64-bit *stable* hash of the key -> sequence number
    ``_coll``     LOBTree: hash -> tuple of sequence numbers, for the rare hashes
                  that several keys share (``_index`` then holds ``COLLIDED``)
    ``_len``      ``BTrees.Length``: O(1) ``len`` whose concurrent changes merge

    Python's own ``hash`` of ``str`` and ``bytes`` changes from process to process,
    so the index uses `stable_hash`, equal for equal keys in every process. A
    ``Set`` is the same structure with ``None`` values.

`List` (tree form)
    ``_tail`` a plain list of the last items, in the List's own record: ``append``
              and ``pop`` touch only this record
    ``_root`` a counted B+tree of `_Leaf` (plain lists) and `_Branch` nodes (child
              references and cumulative counts) holding the items before the tail:
              indexing, changing, inserting and deleting are O(log n) records.

All BTrees buckets resolve concurrent changes to different entries (ZODB calls
``_p_resolveConflict``), and two concurrent appends to a List merge too.
"""

from __future__ import annotations

import collections.abc as cabc
import datetime
import enum
import hashlib
import io
import numbers
import operator
import pathlib
import pickle
import reprlib
import struct
import sys
import uuid
import weakref
from _thread import get_ident
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from random import getrandbits
from types import GenericAlias, MappingProxyType
from typing import Any, TypeVar

from BTrees.Length import Length
from BTrees.LLBTree import LLBTree
from BTrees.LOBTree import LOBTree, LOBucket
from BTrees.OLBTree import OLBTree
from persistent import Persistent
from ZODB.POSException import ConflictError as _ZConflictError

from . import _inline
from ._counter import Counter
from ._fastpickle import PLAIN_ATOMS
from ._inline import holds_watched  # raw (inline) values in a container's storage are not watched
from ._kinds import ATOMIC, CONVERTERS, BadValue
from ._storable import public_error
from ._values import stored_form
from ._watch import BEFORE_COMMIT, remember_reads, watch
from ._watch import check_writable as _check_writable

__all__ = ["Dict", "List", "Set", "stable_hash", "to_builtin"]

#: Entries a Dict or Set keeps in its own record before growing into the tree form.
SMALL_MAX = 32
#: Items a List keeps in its own record (its tail) before moving a leaf into the tree.
TAIL_MAX = 64
#: Items in one List leaf, and children in one List branch.
LEAF_MAX = 64
BRANCH_MAX = 64
#: Marks an ``_index`` hash that several keys share (real sequence numbers are >= 1).
COLLIDED = -1

_MISSING: Any = object()
_NOTHING: Any = ()


# --- stable hashing ------------------------------------------------------------

_blake = hashlib.blake2b
_pack_q = struct.Struct("<q").pack


def _digest(tag: bytes, data: bytes) -> int:
    return int.from_bytes(_blake(tag + data, digest_size=8).digest(), "little", signed=True)


def _combine(tag: bytes, hashes: Iterable[int]) -> int:
    return _digest(tag, b"".join(_pack_q(h) for h in hashes))


def stable_hash(key: Any) -> int:
    """A 64-bit hash of `key` that is the same in every process.

    Equal keys get equal hashes, as Python requires of ``hash`` (``1``, ``1.0``
    and ``True`` hash alike). Numbers use Python's numeric hash, which is not
    randomized; strings and bytes a keyed BLAKE2b digest. Keys of types this
    function does not know share one hash per type: still correct, but such
    keys are found by a linear scan of that chain.
    """
    tp = type(key)
    if tp is str:
        return _digest(b"s", key.encode("utf-8", "surrogatepass"))
    if tp is int or tp is bool:
        return hash(key)
    if tp is float:
        return hash(key) if key == key else 0x4E614E  # NaN: hash() is per object
    if tp is bytes:
        return _digest(b"b", key)
    if tp is tuple:
        return _combine(b"t", [stable_hash(k) for k in key])
    if key is None:
        return 0x4E6F6E65
    return _other_hash(key)


def _other_hash(key: Any) -> int:
    if isinstance(key, str):  # str() of a subclass may differ (str enums): take the value
        return _digest(b"s", str.encode(key, "utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return _digest(b"b", bytes(memoryview(key)))
    if isinstance(key, enum.Enum) and not isinstance(key, numbers.Number):
        tp = type(key)
        return _digest(b"e", f"{tp.__module__}.{tp.__qualname__}.{key._name_}".encode())
    if isinstance(key, numbers.Number):
        if key != key:  # NaN-like
            return 0x4E614E
        return hash(key)  # numeric hashes are deterministic
    if isinstance(key, tuple):
        return _combine(b"t", [stable_hash(k) for k in key])
    if isinstance(key, frozenset):
        total = 0
        for k in key:
            total = (total + stable_hash(k)) & 0xFFFFFFFFFFFFFFFF
        return _digest(b"f", total.to_bytes(8, "little"))
    if isinstance(key, datetime.datetime):
        offset = key.utcoffset()
        if offset is not None:
            key = (key - offset).replace(tzinfo=None)
        return _digest(b"D", key.isoformat().encode())
    if isinstance(key, datetime.date):
        return _digest(b"d", key.isoformat().encode())
    if isinstance(key, datetime.timedelta):
        return hash(key)  # hash of a tuple of ints: deterministic
    if isinstance(key, uuid.UUID):
        return hash(key.int)
    if isinstance(key, pathlib.PurePosixPath):
        return _digest(b"p", str(key).encode("utf-8", "surrogateescape"))
    hash(key)  # raise TypeError for unhashable keys, as dict does
    tp = type(key)
    return _digest(b"?", f"{tp.__module__}.{tp.__qualname__}".encode())


# --- tree classes ----------------------------------------------------------------


#: Children of an inner node of the Dict and Set trees. 128 rather than 64 (issue 18):
#: BTrees split a full node in two halves and our keys arrive in order, so nodes
#: hold about half this; fewer inner nodes to load on a cold commit (a round trip
#: each over ZEO), while an insert that rewrites one stays under 2 KB. Changing it
#: is safe for trees already stored: BTrees read it only when a child grows
#: (``_BTree_set`` splits a node once it holds more than this; ``__setstate__``
#: takes whatever length was stored), so old nodes of up to 64 just grow further,
#: and a process of an older version splits a bigger node at its next insert.
INNER_FANOUT = 128


class _Index(LLBTree):
    """Stable hash -> sequence number. Smaller buckets: fewer bytes per commit."""

    max_leaf_size = 64
    max_internal_size = INNER_FANOUT


class _EntryBucket(LOBucket):
    """A bucket of ``(key, value)`` entries that watches the plain objects it holds."""

    def __setstate__(self, state: Any) -> None:
        LOBucket.__setstate__(self, state)
        if state and _entries_watched(state):
            watch(self, state)

    def __getstate__(self) -> Any:
        state = LOBucket.__getstate__(self)
        if state:
            if _scanned_plain(state[0]):  # `_dh_watched` found these very entries plain
                _PLAIN_STATE[0] = state
                return state
            kinds = _entry_kinds(state)
            if kinds <= PLAIN_ATOMS:  # nothing watched; and `_dh_plain_refs` need not look again
                _PLAIN_STATE[0] = state
            elif not kinds <= _ATOMIC_OR_RAW and holds_watched(_bucket_values(state)):
                watch(self, state)
        return state

    @staticmethod
    def _dh_plain_refs(state: Any) -> tuple[Any, ...] | None:
        """For `_fastpickle`: the next bucket (or nothing), when every key and value is
        a plain atom; None when the state holds anything else.

        Entries are ``(key, value)`` tuples (ours: nothing else makes them); were one
        not hashable, the fast pickling fails and ZODB's pickles the record instead.
        """
        if state is _PLAIN_STATE[0]:  # just made by __getstate__, which looked
            _PLAIN_STATE[0] = None
            return state[1:]  # type: ignore[no-any-return]  # ((seq, entry, ...), next): (next,)
        if _entry_kinds(state) <= PLAIN_ATOMS:
            return state[1:]  # type: ignore[no-any-return]
        return None

    def _dh_watched(self) -> bool:
        state = LOBucket.__getstate__(self)
        if not state:
            return False
        kinds = _entry_kinds(state)
        if kinds <= PLAIN_ATOMS:  # for the pickling that follows (`_scanned_plain`)
            _PLAIN_ITEMS[0] = state[0]
            return False
        return not kinds <= _ATOMIC_OR_RAW and holds_watched(_bucket_values(state))

    def _p_resolveConflict(self, old: Any, committed: Any, new: Any) -> Any:
        """BTrees' merge of changes to different entries, checked strictly.

        The C merge decides what changed with ``==``; a change to an equal but
        different value (``True`` for ``1``, an entity equal by id) would be
        dropped. So it runs on entries that compare exactly: a bucket of plain
        values of one type each (`_uniform_exact`: a Dict of ints) as it is, any
        other on exact tokens (`_Tokens`); and each entry of the merge must be
        exactly what one side made, checked on those. Issue 18: pickling every
        entry to compare it made a merge of 40 ints cost about 0.9 ms, most of the
        CPU of a commit of threads changing neighbouring keys; now about 0.05 ms.
        """
        states = (old, committed, new)
        if _uniform_exact(states):  # compared as they are: exactly, without tokens
            tokens, (was, theirs, ours) = None, states
        else:
            tokens = _Tokens()
            was, theirs, ours = tokens.buckets(states)
        # On a plain LOBucket: the C merge builds instances of its argument's class,
        # and ours would watch the token states.
        merged = LOBucket._p_resolveConflict(LOBucket(), was, theirs, ours)
        before, other, mine = _bucket_dict(was), _bucket_dict(theirs), _bucket_dict(ours)
        # Entries compare exactly here (tokens, or pairs of one `_EXACT` type each):
        # the seqs each side changed, added or removed, and the merge must hold each
        # entry from the side that did.
        by_mine = {seq for seq, _ in before.items() ^ mine.items()}
        by_other = {seq for seq, _ in before.items() ^ other.items()}
        if by_mine & by_other:
            raise _ZConflictError("concurrent changes to the same entry")
        expected = dict(before)
        for seq, side in chain(((s, other) for s in by_other), ((s, mine) for s in by_mine)):
            if seq in side:
                expected[seq] = side[seq]
            else:
                del expected[seq]
        if _bucket_dict(merged) != expected:
            raise _ZConflictError("a merge that is not exactly the changes each side made")
        return merged if tokens is None else _bucket_tokens(merged, tokens.back.__getitem__)

    def _dh_children(self) -> Iterator[tuple[str, Any]]:
        """For error paths: the entries, if this bucket is in memory."""
        if self._p_changed is not None:
            state = LOBucket.__getstate__(self)
            for k, v in state[0][1::2] if state else ():
                yield f"[{k!r}]", v


class _Entries(LOBTree):
    """Sequence number -> ``(key, value)``, in insertion order."""

    _bucket_type = _EntryBucket
    max_leaf_size = 40
    max_internal_size = INNER_FANOUT

    def _p_resolveConflict(self, old: Any, committed: Any, new: Any) -> Any:
        """BTrees' merge; entries of a bucket kept inline are compared as `_EntryBucket`'s are."""
        return _tokens_merged(LOBTree._p_resolveConflict, LOBTree(), old, committed, new, _tree_tokens)

    # Until it holds more than one bucket, a BTree keeps its only bucket inline,
    # in the tree's own record: then the tree must watch the plain objects itself.

    def __setstate__(self, state: Any) -> None:
        LOBTree.__setstate__(self, state)
        if _inline_watched(state):
            watch(self, state)

    def __getstate__(self) -> Any:
        state = LOBTree.__getstate__(self)
        if _inline_watched(state):
            watch(self, state)
        return state

    def _dh_watched(self) -> bool:
        return _inline_watched(LOBTree.__getstate__(self))

    def _dh_children(self) -> Iterator[tuple[str, Any]]:
        """For error paths: the nodes in memory (a small tree keeps entries inline)."""
        if self._p_changed is None:
            return
        state = LOBTree.__getstate__(self)
        if not state:
            return
        if len(state) == 1:  # one bucket, inline: (((k, v, ...),),)
            for k, v in state[0][0][0][1::2]:
                yield f"[{k!r}]", v
            return
        for node in state[0][0::2]:
            yield "", node


#: Above every sequence number an entries tree holds (LOBTree keys are signed 64-bit).
_SEQ_MAX = 2**63 - 1


def _last_seq(entries: Any) -> int:
    """``entries.maxKey()``, by the path that survives a failed load; ValueError if empty.

    BTrees trap (BTrees 6.5, ``BTree_maxminKey`` without a key): it uses what
    ``BTree_lastBucket`` returns without checking it, so when loading an inner
    node on the way to the last bucket fails (a lost ZEO server, a missing
    record), the process dies of a segfault (an assertion in debug builds)
    instead of raising. With a bound the search goes through
    ``BTree_findRangeEnd``, which checks. Trees of more than about 5,000 entries
    have such inner nodes (a root splits at twice INNER_FANOUT buckets of about 20).
    """
    return entries.maxKey(_SEQ_MAX)  # type: ignore[no-any-return]


class _Tokens:
    """Exact tokens of the entries met in one merge: equal ints for the same entry.

    Two entries get one token when they are the same (`_same`): an entry of exact
    ints, strings, bytes, bools or None (key and value, each of exactly one of
    those types, as `_EXACT` says) by its types and values, at the cost of a dict
    lookup; any other entry by its pickle. The two kinds never meet: a tuple key
    never equals a bytes one, and which kind an entry takes depends on the entry
    alone.
    """

    __slots__ = ("back", "table")

    def __init__(self) -> None:
        self.table: dict[Any, int] = {}
        self.back: list[Any] = []

    def token(self, entry: Any) -> int:
        """The token of `entry` (ConflictError for an entry that cannot be pickled)."""
        key = _entry_key(entry)
        found = self.table.get(key)
        if found is None:
            found = self.table[key] = len(self.back)
            self.back.append(entry)
        return found

    def buckets(self, states: Iterable[Any]) -> list[Any]:
        """Bucket states ``((seq, entry, ...), [next])`` with each entry's token, for
        states met first (`back` is then complete): for a bucket of plain entries
        the keys are found by C loops (``map``, ``zip``) rather than entry by entry."""
        found = []
        for state in states:
            entries = state[0][1::2] if state else ()
            keys = _exact_keys(entries)
            found.append((state, entries, [_entry_key(e) for e in entries] if keys is None else keys))
        # key -> an entry with that key (the last one met: all of them are the same);
        # in the order keys were first met, so the n-th key's token is n.
        one = dict(zip(chain.from_iterable(f[2] for f in found),
                       chain.from_iterable(f[1] for f in found), strict=True))
        self.back = list(one.values())
        self.table = {key: n for n, key in enumerate(one)}
        out = []
        for state, _, keys in found:
            if not state:
                out.append(state)
                continue
            items = list(state[0])
            items[1::2] = map(self.table.__getitem__, keys)
            out.append((tuple(items), *state[1:]))
        return out


def _entry_key(entry: Any) -> Any:
    """What `_Tokens` tells entries apart by: types and values, or else the pickle."""
    if type(entry) is tuple and len(entry) == 2:
        k, v = entry
        tk, tv = type(k), type(v)
        if tk in _EXACT and tv in _EXACT:
            return (tk, k, tv, v)
    return _pickled(entry)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _uniform_exact(states: Iterable[Any]) -> bool:
    """Whether every entry of these bucket states is a pair ``(key, value)`` whose keys
    are all of one `_EXACT` type and whose values are all of one (maybe another).

    Then BTrees' C merge compares entries exactly and without error: ``==`` between
    two values of exactly one of these types is sameness, and ``<`` (tuples order
    by their first unequal item) only ever meets two values of one type, which
    order (``None`` is never unequal to ``None``). A Dict of ints, or of strings.
    """
    key_types: set[type] = set()
    value_types: set[type] = set()
    for state in states:
        entries = state[0][1::2] if state else ()
        if not entries:
            continue
        if set(map(type, entries)) != {tuple} or set(map(len, entries)) != {2}:
            return False
        key_types.update(map(type, map(_first, entries)))
        value_types.update(map(type, map(_second, entries)))
    return len(key_types) <= 1 and len(value_types) <= 1 and key_types | value_types <= _EXACT


def _exact_keys(entries: Any) -> list[Any] | None:
    """`_entry_key` of each entry when every entry is a pair of `_EXACT` types, else None."""
    if not entries:
        return []
    if set(map(type, entries)) != {tuple} or set(map(len, entries)) != {2}:
        return None
    ks, vs = list(map(_first, entries)), list(map(_second, entries))
    tks, tvs = list(map(type, ks)), list(map(type, vs))
    if not set(tks).union(tvs) <= _EXACT:
        return None
    return list(zip(tks, ks, tvs, vs, strict=True))


def _pickled(entry: Any) -> bytes:
    """`entry`'s pickle as `_same` compares it; what cannot be compared conflicts."""
    try:
        buf = io.BytesIO()
        _RefPickler(buf, protocol=3).dump(entry)
    except Exception:  # noqa: BLE001 - what cannot be compared conflicts
        raise _ZConflictError("an entry that cannot be compared") from None
    return buf.getvalue()


def _tokens_merged(merge: Any, obj: Any, old: Any, committed: Any, new: Any, where: Any) -> Any:
    """Run BTrees' C `merge` over states whose entries are replaced by exact tokens.

    The C merge orders and compares values (``<``, ``==``): entries holding inline
    values (plain dicts, `_inline`) do not order, and ``==`` would hide changes to
    equal values. Each distinct entry (as `_same` compares, `_Tokens`) becomes
    an int, merged, then turned back.
    """
    tokens = _Tokens()
    merged = merge(obj, where(old, tokens.token), where(committed, tokens.token), where(new, tokens.token))
    return where(merged, tokens.back.__getitem__)


def _map_items(items: Any, fn: Any) -> tuple[Any, ...]:
    out = list(items)
    out[1::2] = [fn(v) for v in out[1::2]]
    return tuple(out)


def _bucket_tokens(state: Any, fn: Any) -> Any:
    """A bucket state ``((seq, entry, ...), [next])`` with `fn` applied to each entry."""
    if not state:
        return state
    return (_map_items(state[0], fn), *state[1:])


def _tree_tokens(state: Any, fn: Any) -> Any:
    """A BTree state: only its one bucket kept inline ``(((seq, entry, ...),),)`` holds entries."""
    if state and len(state) == 1 and len(state[0]) == 1:
        return ((_bucket_tokens(state[0][0], fn),),)
    return state


def _entries_watched(state: Any) -> bool:
    """`holds_watched` over a bucket state's keys and values, on every load and save.

    The common case, every key and value atomic, is decided in one pass over the
    entries, without first copying them into a list (issue 18: the copy and the
    walk were 7.5% of a bucket's load time).
    """
    if _entry_kinds(state) <= _ATOMIC_OR_RAW:  # raw: inline
        return False
    return holds_watched(_bucket_values(state))


def _entry_kinds(state: Any) -> set[type]:
    """The types of the keys and values of a bucket state, in one pass in C (a set
    comprehension ran bytecode per item: 4 such passes were about 5% of a commit)."""
    return set(map(type, chain.from_iterable(state[0][1::2])))


_ATOMIC_OR_RAW = ATOMIC | _inline.RAW

#: The last state `_EntryBucket.__getstate__` found to hold plain atoms only, for the
#: pickling that follows (`_dh_plain_refs`). One slot for all threads: a state another
#: thread put there instead only makes `_dh_plain_refs` look again.
_PLAIN_STATE: list[Any] = [None]

#: The items ``(seq, entry, ...)`` of the last bucket state `_EntryBucket._dh_watched`
#: found to hold plain atoms only: `check_before_commit` scans each changed bucket, and
#: the pickling of the same commit would scan it again (issue 18: each scan, a type per
#: key and value, was about 28k instructions of a one-entry commit). One slot for all
#: threads, like `_PLAIN_STATE`; it holds no persistent object (plain atoms only).
_PLAIN_ITEMS: list[Any] = [None]


def _scanned_plain(items: tuple[Any, ...]) -> bool:
    """Whether `items` hold the very entries `_PLAIN_ITEMS` was found to hold (so plain
    atoms only); takes it. Identity, not ``==``: an entry that compares equal may hold
    other types (``(k, 1) == (k, True)``, or a value whose ``__eq__`` says so). Entries
    are tuples, and the slot keeps the ones it saw alive, so an entry that is the same
    object holds the same key and value, whose types cannot change."""
    seen = _PLAIN_ITEMS[0]
    if seen is None or len(seen) != len(items):
        return False
    _PLAIN_ITEMS[0] = None
    return all(map(operator.is_, seen[1::2], items[1::2]))


def _bucket_values(state: Any) -> list[Any]:
    """Keys and values of a bucket state ``((seq, (key, value), ...), [next])``."""
    return list(chain.from_iterable(state[0][1::2]))


def _bucket_dict(state: Any) -> dict[int, Any]:
    items = state[0] if state else ()
    return dict(zip(items[0::2], items[1::2], strict=True))


def _inline_watched(state: Any) -> bool:
    """Whether a BTree state keeps its one bucket inline, holding watched values."""
    return bool(state) and len(state) == 1 and holds_watched(_bucket_values(state[0][0]))


def _replace_entry(tree: Any, seq: int, entry: Any) -> None:
    """``tree[seq] = entry`` for a `seq` the tree holds, without ``readCurrent`` of inner nodes.

    BTrees' own set calls ``readCurrent`` on every inner node on the way down
    (BTreeTemplate.c, ``_BTree_set``): an insert must not land in a bucket that a
    concurrent split has just narrowed. That costs one
    ``checkCurrentSerialInTransaction`` per tree level at every commit (a message
    each over ZEO, three at 100k entries). Replacing the value of a key already
    there needs no such guard: a concurrent change that moves or removes the key
    (a split, a delete) rewrites its bucket, so the two commits conflict on the
    bucket, and the bucket merge refuses a change to a key the other side removed.
    Callers pass a `seq` they have just found in this tree (`_Hashed._find`): a
    missing one would be an insert, which needs the guard.

    ZODB trap used on purpose: persistent's C ``readCurrent`` (what BTrees call)
    looks ``readCurrent`` up as an attribute of the connection, so an instance
    attribute shadows the method for the duration of this one set. BTrees then
    find the bucket in C; walking the inner nodes by hand (``__getstate__`` of
    each, a tuple of up to 255 items) cost about 17 us more per commit at 100k.
    """
    jar = tree._p_jar
    if jar is None or "readCurrent" in jar.__dict__:  # not stored; or shadowed already
        tree[seq] = entry
        return
    jar.readCurrent = _no_read_current
    try:
        tree[seq] = entry
    finally:
        del jar.readCurrent


def _no_read_current(obj: Any) -> None:
    """`_replace_entry`'s stand-in for ``Connection.readCurrent``: nothing to check."""


def _walk_buckets(tree: Any) -> Iterator[Any]:
    """Items tuples of a BTree's buckets in key order, streaming.

    A bucket loaded only for this walk becomes a ghost again once passed (its
    successor is read first), so memory stays bounded on huge trees.
    """
    tree._p_activate()
    bucket = tree._firstbucket
    while bucket is not None:
        was_ghost = bucket._p_changed is None
        state = LOBucket.__getstate__(bucket)
        following = state[1] if state and len(state) > 1 else None
        if state:
            yield bucket, state[0]
        _deactivate_if_idle(bucket, was_ghost)
        bucket = following


def _deactivate_if_idle(obj: Any, was_ghost: bool) -> None:
    """Ghost `obj` again after streaming through it, unless it may be changed."""
    if was_ghost and obj._p_changed is False and not _is_watched(obj) and not _pinned(obj):
        obj._p_deactivate()


def _pinned(node: Any) -> bool:
    """Whether a List leaf or an entries bucket holds a raw value that a view reads."""
    if type(node) is _Leaf:
        return _inline.pinned(node.items)
    if not isinstance(node, LOBucket):
        return False  # a List branch: references only
    state = LOBucket.__getstate__(node)
    return bool(state) and _inline.pinned_entries(state[0][1::2])


def _is_watched(obj: Any) -> bool:
    jar = obj._p_jar
    w = jar.__dict__.get("_dh_watch") if jar is not None else None
    return w is not None and id(obj) in w.items


def _touch(obj: Any) -> None:
    """Mark a persistent object changed (typed Any: persistent ships no types).

    Every change to a Dict's small form or a List's tail ends here: a view of an
    inline value (`_inline`) that no longer fits becomes its own record.
    """
    obj._p_changed = True
    if getattr(obj, "_v_inline", None) is not None:
        _inline.after_write(obj)


def check_writable(obj: Any) -> None:
    """`_watch.check_writable`; for a view of an inline value, its holder's record is
    checked and marked changed (`_inline.before_write`), before the change."""
    link = getattr(obj, "_v_inline", None)
    if link is not None and link.parent is not None:
        _inline.before_write(obj, _check_writable)
        return
    _check_writable(obj)


_RAW = _inline.RAW


def _changed_size(kind: str) -> RuntimeError:
    return RuntimeError(f"{kind} changed size during iteration")


# --- Dict and Set: the hashed core -------------------------------------------------


class _KeyIndex(OLBTree):
    """``str`` key -> sequence number: the index while every key is a ``str``.

    Strings have a total order, so they can index themselves: no hashing, and
    lookups are one C call. The first key of another type turns the index into
    an `_Index` of stable hashes, once (`_Hashed._rehash`).
    """

    max_leaf_size = 40
    # Not INNER_FANOUT: its str keys make an inner node about 40% bigger than one of
    # int keys (28 B a child), and the node is rewritten at every split of a child:
    # at 128 (or 96) an insert at 1M entries wrote 2,055 B per commit on average,
    # over the 2 KB that tests/test_scale.py holds it to.
    max_internal_size = 64


#: Values a Dict remembers per transaction, so repeated reads skip the trees.
HOT_MAX = 4096


def _cacheable(value: Any) -> bool:
    """Values the per-transaction read cache may hold: never a watched object."""
    return type(value) in _PLAIN or isinstance(value, Persistent)


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, complex})
_ONLY_DICT = {dict}


def _refuse_unstored_attributes(cls: type) -> None:
    """Make a user's subclass of `Dict`, `Set` or `List` refuse instance attributes.

    ZODB trap: Persistent marks the record changed on any attribute assignment, but
    the containers' ``__getstate__`` stores their items only, so ``tags.label = "x"``
    on a subclass instance (which has a ``__dict__``, or slots of its own) was
    accepted and silently gone at the next load. Refused with a clear error instead;
    our own slots, ``_p_``/``_v_`` names and properties (their setters decide) pass.
    """
    if cls.__module__ == __name__ or "__setattr__" in cls.__dict__:
        return
    own = frozenset(name for base in cls.__mro__ if base.__module__ in (__name__, "persistent")
                    for name in getattr(base, "__slots__", ()))
    kind = next(b.__name__ for b in cls.__mro__
                if b.__module__ == __name__ and not b.__name__.startswith("_"))

    def refuse(self: Any, name: str, value: Any) -> None:
        if (name in own or name.startswith(("_p_", "_v_"))
                or isinstance(getattr(type(self), name, None), property)):
            Persistent.__setattr__(self, name, value)
            return
        raise AttributeError(
            f"{type(self).__qualname__}.{name} cannot be set: a {kind} subclass stores its "
            f"items, not attributes of its instances, so {name!r} would be lost at the next "
            f"load. Keep it as an item, or in a durable_heap.Object that holds the {kind}"
        )

    cls.__setattr__ = refuse  # type: ignore[method-assign,assignment]


class _Hashed(Persistent):
    """Storage shared by `Dict` and `Set`: small form, or the hashed tree form."""

    __slots__ = ("_small", "_index", "_entries", "_coll", "_len", "_v_hot", "_v_mods", "_v_inline")
    __hash__ = None  # type: ignore[assignment]  # mutable, like dict and set
    _kind = "dictionary"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_unstored_attributes(cls)

    def _init_empty(self) -> None:
        self._small: dict[Any, Any] | None = {}
        self._index: Any = None
        self._entries: Any = None
        self._coll: Any = None
        self._len: Any = None
        # Read cache: the small dict itself, or in tree form the values read in
        # this transaction (`_remember`). Volatile: never stored, gone on ghosting.
        self._v_hot: dict[Any, Any] | None = self._small
        self._v_mods = 0  # counts values replaced in the tree form (for iterators)
        self._v_inline: Any = None  # `_inline.Link`: views of the inline values it holds

    # -- record format ---------------------------------------------------------
    # Format 1, small: (dict,)      Format 1, tree: (None, index, entries, coll, len)
    # where index is a _KeyIndex (all keys str) or an _Index (stable hashes).

    def __getstate__(self) -> Any:
        small = self._small
        if small is None:
            return (None, self._index, self._entries, self._coll, self._len)
        state = (small,)
        if self._dh_watched():
            watch(self, state)
        return state

    def __setstate__(self, state: Any) -> None:
        small = state[0]
        self._small = self._v_hot = small
        self._v_mods = 0
        self._v_inline = None
        if small is None:
            _, self._index, self._entries, self._coll, self._len = state
        else:
            self._index = self._entries = self._coll = self._len = None
            if self._dh_watched():
                watch(self, state)

    def _dh_watched(self) -> bool:
        small = self._small
        return small is not None and (holds_watched(small) or holds_watched(small.values()))

    # -- lookups ------------------------------------------------------------------

    def _find(self, key: Any) -> tuple[Any, int, Any]:
        """(index key, seq, entry) of `key` in the tree form; seq is 0 when absent.

        The index key is None for a key the current index cannot hold (a non-str
        key while all keys are str).
        """
        index = self._index
        if type(index) is _KeyIndex:
            if isinstance(key, str):
                seq = index.get(key)
                return (key, seq, self._entries[seq]) if seq is not None else (key, 0, None)
            hash(key)  # unhashable keys raise TypeError, as in a dict
            return None, 0, None
        h = stable_hash(key)
        seq = index.get(h)
        if seq is None:
            return h, 0, None
        if seq == COLLIDED:
            for s in self._coll[h]:
                entry = self._entries[s]
                k = entry[0]
                if k is key or k == key:
                    return h, s, entry
            return h, 0, None
        entry = self._entries[seq]
        k = entry[0]
        if k is key or k == key:
            return h, seq, entry
        return h, 0, None

    def _get(self, key: Any, default: Any) -> Any:
        hot = self._v_hot
        if hot is not None:
            value = hot.get(key, _MISSING)
            if value is not _MISSING:
                return _inline.view(self, value, key) if type(value) in _RAW else value
        small = self._small
        if small is not None:
            return small.get(key, default)
        _, seq, entry = self._find(key)
        if not seq:
            return default
        value = entry[1]
        if type(value) in _RAW:
            return _inline.view(self, value, key)
        self._remember(key, value)
        return value

    def _has(self, key: Any) -> bool:
        hot = self._v_hot
        if hot is not None and key in hot:
            return True
        small = self._small
        if small is not None:
            return key in small
        _, seq, entry = self._find(key)
        if seq:
            self._remember(key, entry[1])
        return seq != 0

    def _dh_forget_reads(self) -> None:
        """The transaction ended: what was read may have changed since."""
        self._v_hot = self._small

    def _remember(self, key: Any, value: Any) -> None:
        """Keep a read value for the rest of this transaction (see `forget_reads`)."""
        if not _cacheable(value):
            return
        hot = self._v_hot
        if hot is None:
            if self._p_jar is None:
                return
            hot = self._v_hot = {}
            remember_reads(self)
        if len(hot) < HOT_MAX:
            hot[key] = value

    def __len__(self) -> int:
        small = self._small
        if small is not None:
            return len(small)
        return self._len()  # type: ignore[no-any-return]

    # -- changes (callers have checked writability and put the values in their stored form) --------

    def _put(self, key: Any, value: Any) -> None:
        small = self._small
        if small is not None:
            old = small.get(key, _MISSING)
            if old is value and isinstance(value, Persistent):
                return  # the same record put back (``d[k] += 1`` on a Counter): no change
            small[key] = value
            if type(old) in _RAW and old is not value:
                _inline.detach(self, old)
            _touch(self)
            if len(small) > SMALL_MAX:
                self._grow()
            return
        ikey, seq, entry = self._find(key)
        if seq:
            old = entry[1]
            if old is not value or type(old) in _RAW:
                _replace_entry(self._entries, seq, (entry[0], value))
                self._v_mods += 1
                if type(old) in _RAW and old is not value:
                    _inline.detach(self, old)
        else:
            self._add_new(ikey, key, value)
        hot = self._v_hot
        if hot is not None:
            if _cacheable(value):
                hot[key] = value
            else:
                hot.pop(key, None)

    def _guard(self) -> None:
        """Index changes assume the index this record points to is still current.

        A concurrent `_rehash` (or `_grow`) replaces it in this record only: with
        ``readCurrent`` that commit conflicts with ours instead of leaving our
        change in an index nobody uses any more.
        """
        jar = self._p_jar
        if jar is not None and self._p_oid is not None:
            jar.readCurrent(self)

    def _add_new(self, ikey: Any, key: Any, value: Any) -> None:
        self._guard()
        if ikey is None:  # the first key that is not a str
            self._rehash()
            ikey = stable_hash(key)
        entries = self._entries
        try:
            last = _last_seq(entries)
        except ValueError:
            last = 0
        # A small random gap: two processes appending at once rarely pick the
        # same number, so BTrees can merge their inserts instead of conflicting.
        seq = last + 1 + getrandbits(8)
        entries[seq] = (key, value)
        self._link(ikey, seq)
        self._len.change(1)

    def _link(self, ikey: Any, seq: int) -> None:
        index = self._index
        current = index.get(ikey)
        if current is None or type(index) is _KeyIndex:
            index[ikey] = seq
            return
        coll = self._coll
        if coll is None:
            coll = self._coll = LOBTree()
            _touch(self)
        if current == COLLIDED:
            coll[ikey] = coll[ikey] + (seq,)
        else:
            coll[ikey] = (current, seq)
            index[ikey] = COLLIDED

    def _link_many(self, pairs: list[tuple[Any, int]]) -> None:
        """Index (key, seq) pairs of entries already stored: batched C updates."""
        index = self._index
        if type(index) is _KeyIndex:
            if all(type(k) is str for k, _ in pairs):
                index.update(pairs)
                return
            self._rehash()  # indexes every stored entry, these included
            return
        batch: dict[int, int] = {}
        for key, seq in pairs:
            h = stable_hash(key)
            if h in batch or h in index:
                index.update(batch)  # a shared hash goes through the collision table
                batch.clear()
                self._link(h, seq)
            else:
                batch[h] = seq
        index.update(batch)

    def _unlink(self, ikey: Any, seq: int) -> None:
        index = self._index
        if type(index) is _KeyIndex or index[ikey] != COLLIDED:
            del index[ikey]
            return
        rest = tuple(s for s in self._coll[ikey] if s != seq)
        if len(rest) == 1:
            del self._coll[ikey]
            index[ikey] = rest[0]
        else:
            self._coll[ikey] = rest

    def _rehash(self) -> None:
        """Replace a str-keyed index by an index of stable hashes (once, O(n))."""
        self._index = _Index()
        self._coll = None
        _touch(self)
        pairs: list[tuple[Any, int]] = []
        for seq, entry in self._entries.items():
            pairs.append((entry[0], seq))
            if len(pairs) >= 50_000:
                self._link_many(pairs)
                pairs = []
        self._link_many(pairs)

    def _take(self, key: Any) -> Any:
        """Remove `key`; return its value or _MISSING."""
        small = self._small
        if small is not None:
            value = small.pop(key, _MISSING)
            if value is not _MISSING:
                _touch(self)
                if type(value) in _RAW:
                    return _inline.taken(self, value)
            return value
        ikey, seq, entry = self._find(key)
        if not seq:
            return _MISSING
        self._guard()
        del self._entries[seq]
        self._unlink(ikey, seq)
        self._len.change(-1)
        if self._v_hot is not None:
            self._v_hot.pop(key, None)
        value = entry[1]
        return _inline.taken(self, value) if type(value) in _RAW else value

    def _take_last(self) -> tuple[Any, Any]:
        small = self._small
        if small is not None:
            item = small.popitem()
            _touch(self)
            if type(item[1]) in _RAW:
                return item[0], _inline.taken(self, item[1])
            return item
        self._guard()
        entries = self._entries
        seq = _last_seq(entries)
        key, value = entries[seq]
        del entries[seq]
        self._unlink(key if type(self._index) is _KeyIndex else stable_hash(key), seq)
        self._len.change(-1)
        if self._v_hot is not None:
            self._v_hot.pop(key, None)
        if type(value) in _RAW:
            return key, _inline.taken(self, value)
        return key, value

    def _reset(self) -> None:
        _inline.detach_all(self)
        if _inline.is_view(self):
            self._small.clear()  # type: ignore[union-attr]  # its raw value, in place: the holder stores it
            _touch(self)
        elif self._small is None or self._small:
            self._init_empty()
            _touch(self)

    def _grow(self) -> None:
        """Move the entries of the small form into a new tree form."""
        small = self._small
        assert small is not None
        self._index = _KeyIndex() if all(type(k) is str for k in small) else _Index()
        self._entries = _Entries()
        self._coll = None
        self._len = Length(0)
        self._small = self._v_hot = None
        _touch(self)
        self._bulk_add(small.items())

    def _bulk_add(self, items: Iterable[tuple[Any, Any]]) -> None:
        """Add entries whose keys are known to be new and distinct, in order.

        Chunks go to the trees through their C ``update``: the fast path for
        building a big container in one transaction.
        """
        entries = self._entries
        try:
            seq = _last_seq(entries)
        except ValueError:
            seq = 0
        it = iter(items)
        total = 0
        while True:
            chunk = list(islice(it, 50_000))
            if not chunk:
                break
            seqs = range(seq + 1, seq + 1 + len(chunk))
            seq += len(chunk)
            entries.update(list(zip(seqs, chunk, strict=True)))
            self._link_many(list(zip([k for k, _ in chunk], seqs, strict=True)))
            total += len(chunk)
        self._len.change(total)

    # -- iteration -------------------------------------------------------------------

    def _iter_entries(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) in insertion order; streams the tree form bucket by bucket."""
        small = self._small
        if small is not None:
            n = len(small)
            for item in small.items():
                if type(item[1]) in _RAW:
                    item = (item[0], _inline.view(self, item[1], item[0]))
                yield item
                if self._small is not small or len(small) != n:
                    raise _changed_size(self._kind)
            return
        n = self._len()
        for bucket, items in _walk_buckets(self._entries):
            mods = self._v_mods
            i = 1
            while i < len(items):
                item = items[i]
                if type(item[1]) in _RAW:
                    item = (item[0], _inline.view(self, item[1], item[0]))
                yield item
                if self._v_mods != mods:  # a value was replaced meanwhile: read it live
                    mods = self._v_mods
                    fresh = LOBucket.__getstate__(bucket)[0]
                    i = 2 * bisect_right(fresh[0::2], items[i - 1]) - 1
                    items = fresh
                i += 2
            if self._len() != n:
                raise _changed_size(self._kind)

    def _reversed_keys(self) -> Iterator[Any]:
        small = self._small
        if small is not None:
            yield from reversed(list(small))
            return
        entries = self._entries
        if not entries:
            return
        seq = _last_seq(entries)
        while True:
            yield entries[seq][0]
            try:
                seq = entries.maxKey(seq - 1)
            except ValueError:
                return

    def _dh_children(self) -> Iterator[tuple[str, Any]]:
        """What `path_of` may walk through: entries in memory only."""
        if self._p_changed is None:
            return
        if self._small is not None:
            for k, v in list(self._small.items()):
                yield f"[{k!r}]", v
        else:
            yield "", self._entries

    # -- inline values (`_inline`): this container holds raw values; views ask it ----------

    def _dh_holds_raw(self, link: Any) -> bool:
        small = self._small
        if small is not None:
            return small.get(link.key, _MISSING) is link.raw
        _, seq, entry = self._find(link.key)
        return bool(seq) and entry[1] is link.raw

    def _dh_mark_raw(self, link: Any) -> None:
        if self._small is not None:
            _touch(self)  # not a view (those mark their holder): only marks it changed
            return
        _, seq, entry = self._find(link.key)
        _replace_entry(self._entries, seq, entry)  # the same entry again: its bucket is marked changed

    def _dh_put_raw(self, link: Any, new: Any) -> None:
        small = self._small
        if small is not None:
            small[link.key] = new
            _touch(self)
            return
        _, seq, entry = self._find(link.key)
        _replace_entry(self._entries, seq, (entry[0], new))
        self._v_mods += 1
        if self._v_hot is not None:
            self._v_hot.pop(link.key, None)

    def _dh_raw_now(self) -> Any:
        small = self._small  # None (a view that grew into the tree form must be promoted)
        return small if small is not None and len(small) <= SMALL_MAX else None

    def _dh_stored(self) -> None:
        _inline.stored_elsewhere(self)


# --- Dict ----------------------------------------------------------------------------


class _View:
    """What dict's views have beyond the ABC's: ``view.mapping``, a read-only proxy."""

    __slots__ = ()
    _mapping: Any  # set by collections.abc.MappingView

    @property
    def mapping(self) -> MappingProxyType[Any, Any]:
        return MappingProxyType(self._mapping)


# The views read the Dict's own storage, never a subclass's __getitem__ or
# __contains__ (dict's views do not call them either).


class _DictKeys(_View, cabc.KeysView):  # type: ignore[type-arg]
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        for k, _ in self._mapping._iter_entries():
            yield k

    def __contains__(self, key: object) -> bool:
        return self._mapping._has(key)  # type: ignore[no-any-return]

    def __reversed__(self) -> Iterator[Any]:
        return self._mapping._reversed_keys()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"dict_keys({list(self)!r})"


class _DictValues(_View, cabc.ValuesView):  # type: ignore[type-arg]
    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        for _, v in self._mapping._iter_entries():
            yield v

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for _, v in self._mapping._iter_entries())

    def __reversed__(self) -> Iterator[Any]:
        m = self._mapping
        for k in m._reversed_keys():
            yield Dict.__getitem__(m, k)

    def __repr__(self) -> str:
        return f"dict_values({list(self)!r})"


class _DictItems(_View, cabc.ItemsView):  # type: ignore[type-arg]
    __slots__ = ()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self._mapping._iter_entries()  # type: ignore[no-any-return]

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False  # only a pair can be an item (dict_items says False, not an error)
        value = self._mapping._get(item[0], _MISSING)
        return value is not _MISSING and (value is item[1] or value == item[1])

    def __reversed__(self) -> Iterator[tuple[Any, Any]]:
        m = self._mapping
        for k in m._reversed_keys():
            yield k, Dict.__getitem__(m, k)

    def __repr__(self) -> str:
        return f"dict_items({list(self)!r})"


class Dict(_Hashed, cabc.MutableMapping):  # type: ignore[type-arg,misc]
    """A durable ``dict``: insertion-ordered, any hashable keys, scales to millions.

    Plain ``dict`` values stored into durable objects become `Dict`; values put
    into it are converted the same way. Equal to any mapping with equal items.

    >>> d = Dict({"a": 1})
    >>> d["b"] = [2]
    >>> d == {"a": 1, "b": [2]}
    True
    """

    __slots__ = ()
    __class_getitem__ = classmethod(GenericAlias)  # type: ignore[var-annotated]

    def __init__(self, /, *args: Any, **kwargs: Any) -> None:  # Dict(self=1), as dict(self=1)
        try:
            self._small  # noqa: B018 - called again on a Dict: dict.__init__ then only updates
        except AttributeError:
            self._init_empty()
        if args or kwargs:
            try:
                self._update(args, kwargs)
            except BadValue as err:
                raise public_error(err, None, base="Dict(...)") from None

    @classmethod
    def _blank(cls) -> Dict:
        """An empty twin for `stored_form`, filled by `_fill` (errors stay internal, to gain a path)."""
        self = cls.__new__(cls)
        self._init_empty()
        return self

    def _fill(self, value: dict[Any, Any]) -> None:
        self._update((value,), {})

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Dict:  # type: ignore[override,misc]
        """As ``dict.fromkeys``: ``cls()``, then ``d[key] = value`` for each key.

        A subclass's constructor is called without arguments and its
        ``__setitem__`` runs, as for a subclass of dict.
        """
        if cls is Dict:
            return cls((k, value) for k in iterable)
        d = cls()
        for k in iterable:
            d[k] = value
        return d

    # -- reads -------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        hot = self._v_hot  # the small dict itself, or values read in this transaction
        if hot is not None:
            try:
                value = hot[key]
            except KeyError:
                pass
            else:
                return _inline.view(self, value, key) if type(value) in _RAW else value
        small = self._small
        if small is not None:
            return small[key]
        _, seq, entry = self._find(key)
        if seq:
            value = entry[1]
            if type(value) in _RAW:
                return _inline.view(self, value, key)
            self._remember(key, value)
            return value
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._get(key, default)

    def __contains__(self, key: object) -> bool:
        return self._has(key)

    def __iter__(self) -> Iterator[Any]:
        for k, _ in self._iter_entries():
            yield k

    def __reversed__(self) -> Iterator[Any]:
        return self._reversed_keys()

    def keys(self) -> _DictKeys:  # type: ignore[override,misc]
        return _DictKeys(self)

    def values(self) -> _DictValues:  # type: ignore[override,misc]
        return _DictValues(self)

    def items(self) -> _DictItems:  # type: ignore[override,misc]
        return _DictItems(self)

    def copy(self) -> dict[Any, Any]:
        """A plain ``dict`` with the same items (a shallow copy)."""
        return dict(self._iter_entries())

    def __copy__(self) -> Dict:
        """``copy.copy``: a new Dict of the same type with the same items.

        Without it, copy.copy would go through persistent's ``__reduce__`` and give
        the copy the original's own small dict or trees: changing one changed both.
        """
        new = type(self)._blank()
        new._update((dict(self._iter_entries()),), {})
        return _with_attrs(self, new, None)

    def __deepcopy__(self, memo: dict[int, Any]) -> Dict:
        from copy import deepcopy

        new = memo[id(self)] = type(self)._blank()
        new._update(([(deepcopy(k, memo), deepcopy(v, memo)) for k, v in self._iter_entries()],), {})
        return _with_attrs(self, new, memo)

    @reprlib.recursive_repr("{...}")
    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self._iter_entries()) + "}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, cabc.Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        for k, v in self._iter_entries():
            ov = other.get(k, _MISSING)  # not other[k]: a defaultdict would grow
            if ov is _MISSING or not (ov is v or ov == v):
                return False
        return True

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __or__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, cabc.Mapping):
            return NotImplemented
        result = self.copy()
        result.update(other)
        return result

    def __ror__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, cabc.Mapping):
            return NotImplemented
        result = dict(other)
        result.update(self._iter_entries())
        return result

    def __ior__(self, other: Any) -> Dict:
        self.update(other)
        return self

    # -- changes ------------------------------------------------------------------------

    def _stored_item(self, key: Any, value: Any, inline: bool = True) -> Any:
        if type(key) in _PLAIN:
            tv = type(value)
            if tv in _PLAIN:
                return value  # the common case, checked in one step
            if inline and (tv is dict or tv is list):  # small ones are stored inline (`_inline`)
                raw = _inline.raw_copy(value, self)
                if raw is not None:
                    return raw
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"unhashable type: {type(key).__name__!r}") from None
        if type(key) in _PLAIN and type(value) is not dict and type(value) is not list:
            raw = _inline.inline_value(value, self, key)  # a view put back, or promoted
            if raw is not None:
                return raw
        try:
            jar = self._p_jar
            stored_form(key, jar)
            return stored_form(value, jar)
        except BadValue as err:
            raise err.prefixed(f"[{key!r}]") from None

    def _stored_items(self, pairs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        raw_copy = _inline.raw_copy
        for pair in pairs:
            key, value = pair
            if type(key) in _PLAIN:
                tv = type(value)
                if tv in _PLAIN:
                    yield pair
                    continue
                if tv is dict or tv is list:  # bulk loads: the inline attempt, once, here
                    raw = raw_copy(value, self)
                    if raw is not None:
                        yield key, raw
                        continue
            yield key, self._stored_item(key, value, inline=False)

    def __setitem__(self, key: Any, value: Any) -> None:
        check_writable(self)
        try:
            value = self._stored_item(key, value)
        except BadValue as err:
            raise public_error(err, self) from None
        self._put(key, value)

    def __delitem__(self, key: Any) -> None:
        check_writable(self)
        if self._take(key) is _MISSING:
            hash(key)  # unhashable: TypeError, as del of a dict (dict.pop of an empty one skips it)
            raise KeyError(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        check_writable(self)
        value = self._take(key)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last inserted (key, value) pair (LIFO, as dict)."""
        check_writable(self)
        if not len(self):
            raise KeyError("popitem(): dictionary is empty")
        return self._take_last()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        value = self._get(key, _MISSING)
        if value is not _MISSING:
            return value
        Dict.__setitem__(self, key, default)  # not a subclass's: dict.setdefault calls none
        return self._get(key, None)

    def clear(self) -> None:
        check_writable(self)
        self._reset()

    def update(self, /, *args: Any, **kwargs: Any) -> None:  # type: ignore[override,misc]
        check_writable(self)
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(args)}")
        try:
            self._update(args, kwargs)
        except BadValue as err:
            raise public_error(err, self) from None

    def _update(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) > 1:
            raise TypeError(f"expected at most 1 argument, got {len(args)}")
        pairs: Iterable[Any]
        if args:
            source = args[0]
            # As dict.update: a dict or Dict that keeps its own iteration is read
            # directly (overrides of keys/__getitem__ are not called, as in CPython's
            # dict_merge); anything else with keys() is read by keys() and [key];
            # the rest is an iterable of pairs.
            distinct = 0
            if isinstance(source, dict) and type(source).__iter__ is dict.__iter__:
                pairs = dict.items(source)
                distinct = len(pairs)
            elif isinstance(source, Dict) and type(source).__iter__ is Dict.__iter__:
                pairs = source._iter_entries()
                distinct = Dict.__len__(source)
            elif hasattr(source, "keys"):
                pairs = ((k, source[k]) for k in source.keys())
            else:
                pairs = source
            self._update_pairs(pairs, distinct, source)
        if kwargs:
            self._update_pairs(kwargs.items(), len(kwargs))

    def _update_pairs(self, pairs: Iterable[Any], distinct: int, source: Any = None) -> None:
        """Store `pairs`; `distinct` > 0 counts them when their keys are distinct."""
        if distinct > SMALL_MAX and not len(self):
            # Bulk load into an empty Dict: the fast path for big imports.
            if self._small is not None:
                self._grow()
            plain = type(source) is dict and set(map(type, source)) <= _PLAIN
            kinds = set(map(type, source.values())) if plain else None
            if kinds is not None and kinds <= _PLAIN:  # decided at C speed: nothing to convert
                with _inline.gc_paused():
                    self._bulk_add(source.items())
                return
            if kinds == _ONLY_DICT and not _inline.is_view(self):
                items = _inline.bulk_raw(source, self)  # small dicts copied inline, in C-level passes
                if items is not None:
                    with _inline.gc_paused():
                        self._bulk_add(items)
                    return
            self._bulk_add(self._stored_items(pairs))
            return
        adopted = []  # all of them first: a refused value changes nothing
        for i, pair in enumerate(pairs):
            k, v = pair if type(pair) is tuple and len(pair) == 2 else _pair(i, pair)
            adopted.append((k, self._stored_item(k, v)))
        for k, v in adopted:
            self._put(k, v)


def _pair(i: int, element: Any) -> Any:
    """Element #i of a dict update sequence as a (key, value) pair, or dict's error."""
    try:
        it = iter(element)
    except TypeError:
        msg = f"cannot convert dictionary update sequence element #{i} to a sequence"
        raise TypeError(msg) from None
    pair = list(it)
    if len(pair) != 2:
        msg = f"dictionary update sequence element #{i} has length {len(pair)}; 2 is required"
        raise ValueError(msg)
    return pair


_C = TypeVar("_C")


def _with_attrs(old: Any, new: _C, memo: dict[int, Any] | None) -> _C:
    """`new` with a subclass instance's own attributes copied from `old` (deeply with a memo)."""
    attrs = getattr(old, "__dict__", None)
    if attrs:
        if memo is not None:
            from copy import deepcopy

            attrs = deepcopy(attrs, memo)
        new.__dict__.update(attrs)
    return new


# --- Set ------------------------------------------------------------------------------


def _set_operand(other: Any) -> bool:
    """What ``set``'s operators take: another set (the methods take any iterable)."""
    return isinstance(other, (set, frozenset, Set))


def _as_set(other: Any) -> Any:
    return other if isinstance(other, (set, frozenset)) else set(other)


#: (id, thread) of the Sets whose repr is being built: a Set reached again is "set(...)".
_SET_REPRS: set[tuple[int, int]] = set()


def _in_place(method: str) -> Any:
    """``s |= other`` and friends: the named update, only with another set, as set does."""

    def operator(self: Set, other: Any) -> Any:
        if not isinstance(other, cabc.Set):
            return NotImplemented
        getattr(self, method)(other)
        return self

    operator.__name__ = f"__i{method[:3]}__"
    return operator


class Set(_Hashed, cabc.MutableSet):  # type: ignore[type-arg,misc]
    """A durable ``set`` of any hashable members, scaling to millions.

    Plain ``set`` values stored into durable objects become `Set`. Operators that
    build a new set (``|``, ``&``, ``-``, ``^``) return a plain ``set``.

    >>> s = Set({1, 2})
    >>> s |= {3}
    >>> s == {1, 2, 3}
    True
    """

    # A set can be weakly referenced. Not part of the record: ``__getstate__`` is
    # our own, and persistent's slot handling (copyreg._slotnames) skips __weakref__.
    __slots__ = ("__weakref__",)
    __class_getitem__ = classmethod(GenericAlias)  # type: ignore[var-annotated]
    _kind = "Set"

    def __init__(self, iterable: Iterable[Any] = ()) -> None:
        self._init_empty()
        try:
            self._add_all(iterable)
        except BadValue as err:
            raise public_error(err, None, base="Set(...)") from None

    @classmethod
    def _blank(cls) -> Set:
        self = cls.__new__(cls)
        self._init_empty()
        return self

    def _fill(self, value: set[Any]) -> None:
        self._add_all(value)

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> set[Any]:
        return set(it)  # results of set algebra are plain sets, as copy() is

    def _store_member(self, member: Any) -> None:
        try:
            hash(member)
        except TypeError:
            raise TypeError(f"unhashable type: {type(member).__name__!r}") from None
        try:
            stored_form(member, self._p_jar)
        except BadValue as err:
            raise err.prefixed("{" + repr(member) + "}") from None

    def _add_all(self, iterable: Iterable[Any]) -> None:
        if isinstance(iterable, (set, frozenset, Set)) and self._small is not None and not self._small:
            members = list(iterable)
            for m in members:
                self._store_member(m)
            if len(members) > SMALL_MAX:
                self._grow()
                self._bulk_add((m, None) for m in members)
                return
        for m in iterable:
            self._store_member(m)
            if not self._has(m):
                self._put(m, None)

    # -- reads ------------------------------------------------------------------------

    def __contains__(self, member: object) -> bool:
        try:
            return self._has(member)
        except TypeError:
            if isinstance(member, (set, Set)):
                return self._has(frozenset(member))  # as set does
            raise

    def __iter__(self) -> Iterator[Any]:
        for k, _ in self._iter_entries():
            yield k

    def copy(self) -> set[Any]:
        """A plain ``set`` with the same members."""
        return set(self)

    def __copy__(self) -> Set:
        """``copy.copy``: a new Set of the same type (see `Dict.__copy__`)."""
        new = type(self)._blank()
        new._add_all([k for k, _ in self._iter_entries()])
        return _with_attrs(self, new, None)

    def __deepcopy__(self, memo: dict[int, Any]) -> Set:
        from copy import deepcopy

        new = memo[id(self)] = type(self)._blank()
        new._add_all([deepcopy(k, memo) for k, _ in self._iter_entries()])
        return _with_attrs(self, new, memo)

    def __repr__(self) -> str:
        # As set's: "set()", "{1, 2}", "set(...)" when it contains itself; a subclass
        # names itself ("Tags({1})"), as a subclass of set does.
        name = "set" if type(self) is Set else type(self).__name__
        key = (id(self), get_ident())
        if key in _SET_REPRS:
            return f"{name}(...)"
        _SET_REPRS.add(key)
        try:
            if not len(self):
                return f"{name}()"
            body = "{" + ", ".join(repr(k) for k, _ in self._iter_entries()) + "}"
        finally:
            _SET_REPRS.discard(key)
        return body if name == "set" else f"{name}({body})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, cabc.Set):
            return NotImplemented
        return len(self) == len(other) and all(m in other for m in self)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def issubset(self, other: Iterable[Any]) -> bool:
        return self <= (other if isinstance(other, cabc.Set) else set(other))

    def issuperset(self, other: Iterable[Any]) -> bool:
        return self >= (other if isinstance(other, cabc.Set) else set(other))

    def union(self, *others: Iterable[Any]) -> set[Any]:
        return set(self).union(*others)

    def intersection(self, *others: Iterable[Any]) -> set[Any]:
        return set(self).intersection(*others)

    def difference(self, *others: Iterable[Any]) -> set[Any]:
        return set(self).difference(*others)

    def symmetric_difference(self, other: Iterable[Any]) -> set[Any]:
        return set(self).symmetric_difference(other)

    # The operators take only sets, as set's do (``Set() | [1]`` is a TypeError);
    # NotImplemented lets the other operand's reflected operator answer (dict views,
    # other set types). A reflected result takes the type of the left operand, as
    # ``frozenset | set`` is a frozenset.

    def __or__(self, other: Any) -> Any:
        return set(self).union(other) if _set_operand(other) else NotImplemented

    def __ror__(self, other: Any) -> Any:
        return _as_set(other) | set(self) if _set_operand(other) else NotImplemented

    def __and__(self, other: Any) -> Any:
        if not _set_operand(other):
            return NotImplemented
        return {m for m in other if m in self} if len(other) < len(self) else set(self) & _as_set(other)

    def __rand__(self, other: Any) -> Any:
        return _as_set(other) & set(self) if _set_operand(other) else NotImplemented

    def __sub__(self, other: Any) -> Any:
        return set(self).difference(other) if _set_operand(other) else NotImplemented

    def __rsub__(self, other: Any) -> Any:
        return _as_set(other) - set(self) if _set_operand(other) else NotImplemented

    def __xor__(self, other: Any) -> Any:
        return set(self).symmetric_difference(other) if _set_operand(other) else NotImplemented

    def __rxor__(self, other: Any) -> Any:
        return _as_set(other) ^ set(self) if _set_operand(other) else NotImplemented

    # -- changes ------------------------------------------------------------------------

    def add(self, member: Any) -> None:
        check_writable(self)
        try:
            self._store_member(member)
        except BadValue as err:
            raise public_error(err, self) from None
        if not self._has(member):
            self._put(member, None)

    def _take_member(self, member: Any) -> Any:
        try:
            hash(member)  # first: dict.pop of an empty small form would not hash it
        except TypeError:
            if isinstance(member, (set, Set)):
                return self._take(frozenset(member))  # as set does
            raise
        return self._take(member)

    def discard(self, member: Any) -> None:
        check_writable(self)
        self._take_member(member)

    def remove(self, member: Any) -> None:
        check_writable(self)
        if self._take_member(member) is _MISSING:
            raise KeyError(member)

    def pop(self) -> Any:
        check_writable(self)
        if not len(self):
            raise KeyError("pop from an empty set")
        return self._take_last()[0]

    def clear(self) -> None:
        check_writable(self)
        self._reset()

    def update(self, *others: Iterable[Any]) -> None:
        check_writable(self)
        members = [list(other) for other in others]
        try:
            for group in members:  # all of them first: a refused member changes nothing
                for m in group:
                    self._store_member(m)
            for group in members:
                self._add_all(group)
        except BadValue as err:
            raise public_error(err, self) from None

    def intersection_update(self, *others: Iterable[Any]) -> None:
        keep = set(self).intersection(*others)
        for m in [m for m in self if m not in keep]:
            self.discard(m)

    def difference_update(self, *others: Iterable[Any]) -> None:
        for other in others:
            if other is self:
                self.clear()
                continue
            for m in other:
                self.discard(m)

    def symmetric_difference_update(self, other: Iterable[Any]) -> None:
        for m in set(other):
            if m in self:
                self.discard(m)
            else:
                self.add(m)

    __ior__ = _in_place("update")
    __iand__ = _in_place("intersection_update")
    __isub__ = _in_place("difference_update")
    __ixor__ = _in_place("symmetric_difference_update")


# --- List -------------------------------------------------------------------------------


class _Leaf(Persistent):
    """A run of consecutive List items (a plain list in one record)."""

    __slots__ = ("items", "__weakref__")

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __getstate__(self) -> Any:
        if holds_watched(self.items):
            watch(self, self.items)
        return self.items

    def __setstate__(self, state: Any) -> None:
        self.items = state
        if holds_watched(state):
            watch(self, state)

    def _size(self) -> int:
        return len(self.items)

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        """Merge changes to different items of this leaf (inline values changed in place).

        A side that stored it unchanged touched it on purpose (`List._replace`,
        `_pull_leaf`: the leaf left the tree), so that a concurrent change conflicts
        instead of going into a leaf no longer used: that stays a conflict.
        """
        if len(old) == len(saved) == len(new) and not _prefix(old, saved) and not _prefix(old, new):
            merged = _merge_items(old, saved, new)
            if merged is not None:
                return merged
        raise _ZConflictError("concurrent changes to one List leaf other than to different items")

    def _dh_watched(self) -> bool:
        return holds_watched(self.items)

    def _dh_children(self) -> Iterator[tuple[str, Any]]:
        if self._p_changed is not None:
            offset = _LEAF_OFFSETS.get(self)
            for j, v in enumerate(list(self.items)):
                yield (f"[{offset + j}]" if offset is not None else "[?]"), v


class _Branch(Persistent):
    """Children of a List tree with cumulative counts: ``ends[i]`` items in kids[:i+1]."""

    __slots__ = ("kids", "ends")

    def __init__(self, kids: list[Any], ends: list[int]) -> None:
        self.kids = kids
        self.ends = ends

    def __getstate__(self) -> Any:
        return (self.kids, self.ends)

    def __setstate__(self, state: Any) -> None:
        self.kids, self.ends = state

    def _size(self) -> int:
        return self.ends[-1] if self.ends else 0


class _RefPickler(pickle.Pickler):
    """Pickles states met in conflict resolution, references by their oid."""

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle protocol
        # Trap: matched by class name (ZODB.ConflictResolution.PersistentReference,
        # what conflict resolution unpickles references as), not by isinstance: were
        # ZODB to rename it, references would silently stop pickling as their oids.
        oid = getattr(obj, "oid", None) if type(obj).__name__ == "PersistentReference" else None
        return oid


#: Types whose `==` between two values of exactly that type (not a subclass) is
#: sameness: what the pickles would say, at a fraction of the cost (conflict merges
#: of many entries compare every one). Not float: ``0.0 == -0.0``.
_EXACT = frozenset({int, str, bytes, bool, type(None)})


def _same(a: Any, b: Any) -> bool:
    """Exact sameness of two values in conflict resolution.

    Not ``==``: ``1 == True`` and an entity whose ``__eq__`` compares ids would
    hide a real change, and the merge would silently drop it. Same type and the
    same pickle, or it is a conflict (which the action then retries).
    """
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t in _EXACT:  # `==` between two of exactly one of these types is sameness
        return a == b  # type: ignore[no-any-return]
    if t is tuple and len(a) == len(b) and all(
        type(x) is type(y) and type(x) in _EXACT for x, y in zip(a, b, strict=True)
    ):  # a bucket's (key, value) entries; types matched place by place (1 is not True)
        return a == b  # type: ignore[no-any-return]
    try:
        buf_a, buf_b = io.BytesIO(), io.BytesIO()
        _RefPickler(buf_a, protocol=3).dump(a)
        _RefPickler(buf_b, protocol=3).dump(b)
    except Exception:  # noqa: BLE001 - what cannot be compared is not the same
        return False
    return buf_a.getvalue() == buf_b.getvalue()


def _prefix(old: list[Any], new: list[Any]) -> bool:
    # `new` may be longer: it extends `old`
    return len(new) >= len(old) and all(_same(a, b) for a, b in zip(old, new, strict=False))


def _merge_items(old: list[Any], saved: list[Any], new: list[Any]) -> list[Any] | None:
    """Items of two concurrent changes to one run of List items, or None (a conflict).

    Each side may change items in place and append; an item changed by both
    conflicts. Items are compared exactly (`_same`). With the same length on
    every side nothing was inserted or deleted there; a delete plus an append
    that keeps the length changes every item after the delete, so any
    concurrent change to those conflicts.
    """
    k = len(old)
    if len(saved) < k or len(new) < k:
        return None
    merged = []
    for a, b, c in zip(old, saved, new, strict=False):
        if _same(b, a):
            merged.append(c)
        elif _same(c, a):
            merged.append(b)
        else:
            return None
    return merged + list(saved[k:]) + list(new[k:])


class List(Persistent, cabc.MutableSequence):  # type: ignore[type-arg,misc]
    """A durable ``list`` with O(log n) indexing, append, pop and in-place changes.

    Plain ``list`` values stored into durable objects become `List`. Slicing,
    ``copy()``, ``+`` and ``*`` return plain lists, as they build new lists.

    >>> items = List([1, 2])
    >>> items.append(3)
    >>> items[-1], len(items), items == [1, 2, 3]
    (3, 3, True)
    """

    __slots__ = ("_tail", "_root", "_size", "_v_inline")
    __hash__ = None  # type: ignore[assignment]
    __class_getitem__ = classmethod(GenericAlias)  # type: ignore[var-annotated]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_unstored_attributes(cls)

    def __init__(self, iterable: Iterable[Any] = _NOTHING) -> None:
        self._tail: list[Any] = []
        self._root: Any = None
        self._size = 0
        self._v_inline: Any = None  # `_inline.Link`: views of the inline values it holds
        if iterable is not _NOTHING:
            try:
                self._extend(iterable)
            except BadValue as err:
                raise public_error(err, None, base="List(...)") from None

    @classmethod
    def _blank(cls) -> List:
        self = cls.__new__(cls)
        self._tail, self._root, self._size, self._v_inline = [], None, 0, None
        return self

    def _fill(self, value: list[Any]) -> None:
        self._extend(value)

    # -- record format: format 1 is (tail,) when small, (tail, root, size) otherwise --

    def __getstate__(self) -> Any:
        state = (self._tail,) if self._root is None else (self._tail, self._root, self._size)
        if holds_watched(self._tail):
            watch(self, state)
        return state

    def __setstate__(self, state: Any) -> None:
        self._tail = state[0]
        self._v_inline = None
        if len(state) == 1:
            self._root, self._size = None, 0
        else:
            self._root, self._size = state[1], state[2]
        if holds_watched(self._tail):
            watch(self, state)

    def _dh_watched(self) -> bool:
        return holds_watched(self._tail)

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        """Merge two transactions that appended to the tail, or changed different items
        of it in place (inline values changed through their views, `_inline`)."""
        if len(old) == len(saved) == len(new) and all(
            _same(a, b) and _same(a, c) for a, b, c in zip(old[1:], saved[1:], new[1:], strict=True)
        ):
            merged = _merge_items(old[0], saved[0], new[0])
            if merged is not None:
                return (merged,) + tuple(saved[1:])
        raise _ZConflictError("concurrent List changes other than appends or to different items")

    # -- reads ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size + len(self._tail)

    def _index(self, i: Any, out: str = "list index out of range") -> int:
        try:
            i = i.__index__()
        except AttributeError:
            raise TypeError(
                f"list indices must be integers or slices, not {type(i).__name__}"
            ) from None
        n = self._size + len(self._tail)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            if not -sys.maxsize - 1 <= i <= sys.maxsize:
                raise IndexError("cannot fit 'int' into an index-sized integer")  # as list
            raise IndexError(out)
        return int(j)

    def __getitem__(self, i: Any) -> Any:
        if type(i) is int and 0 <= i < self._size:
            node = self._root  # the common case first: a plain index into the tree
        elif isinstance(i, slice):
            return self._slice(i)
        else:
            i = self._index(i)
            size = self._size
            if i >= size:
                value = self._tail[i - size]
                return _inline.view(self, value, i) if type(value) in _RAW else value
            node = self._root
        at = i
        while type(node) is _Branch:
            ends = node.ends
            k = bisect_right(ends, i)
            if k:
                i -= ends[k - 1]
            node = node.kids[k]
        value = node.items[i]
        return _inline.view(self, value, at) if type(value) in _RAW else value

    def _slice(self, s: slice) -> list[Any]:
        start, stop, step = s.indices(List.__len__(self))
        if step == 1:
            return list(islice(self._iter_from(start), max(0, stop - start)))
        get = List.__getitem__
        return [get(self, i) for i in range(start, stop, step)]

    # Iteration, and every method that reads all items, uses the List's own
    # __getitem__ and __len__, never a subclass's overrides: list's iterator and
    # methods (==, repr, count, index, copy, +, *, sort) ignore them too. A
    # subclass's __iter__ is used only by what calls iter() (list(sub), sorted).

    def __iter__(self) -> Iterator[Any]:
        return self._iter_from(0)

    def _plain(self) -> list[Any]:
        """The items as a plain list (List's own iteration, see above)."""
        return list(self._iter_from(0))

    def _iter_from(self, start: int) -> Iterator[Any]:
        get, size = List.__getitem__, List.__len__
        n = size(self)
        i = start
        if self._root is not None and start < self._size:
            for item in _walk(self._root, start):
                yield _inline.view(self, item, i) if type(item) in _RAW else item
                i += 1
                if size(self) != n:
                    break  # changed under us: go on by index, as list does
        while i < size(self):
            yield get(self, i)
            i += 1

    def __reversed__(self) -> Iterator[Any]:
        get, size = List.__getitem__, List.__len__
        for i in range(size(self) - 1, -1, -1):
            if i < size(self):
                yield get(self, i)

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self._iter_from(0))

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        n = List.__len__(self)
        start, stop, _ = slice(start, stop).indices(n)
        for i, v in enumerate(islice(self._iter_from(start), stop - start), start):
            if v is value or v == value:
                return i
        raise ValueError(f"{value!r} is not in list")

    def count(self, value: Any) -> int:
        return sum(1 for v in self._iter_from(0) if v is value or v == value)

    def copy(self) -> list[Any]:
        """A plain ``list`` with the same items (a shallow copy)."""
        return self._plain()

    def __copy__(self) -> List:
        """``copy.copy``: a new List of the same type (see `Dict.__copy__`)."""
        new = type(self)._blank()
        new._extend(self._plain())
        return _with_attrs(self, new, None)

    def __deepcopy__(self, memo: dict[int, Any]) -> List:
        from copy import deepcopy

        new = memo[id(self)] = type(self)._blank()
        new._extend([deepcopy(v, memo) for v in self._iter_from(0)])
        return _with_attrs(self, new, memo)

    @reprlib.recursive_repr("[...]")
    def __repr__(self) -> str:
        return "[" + ", ".join(repr(v) for v in self._iter_from(0)) + "]"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, List):
            theirs: Iterable[Any] = other._iter_from(0)
            n = List.__len__(other)
        elif isinstance(other, list):
            theirs, n = other, list.__len__(other)
        else:
            return NotImplemented
        if List.__len__(self) != n:
            return False
        return all(a is b or a == b for a, b in zip(self._iter_from(0), theirs, strict=True))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def _cmp_other(self, other: object) -> list[Any] | None:
        if isinstance(other, List):
            return other._plain()
        if isinstance(other, list):
            return other
        return None

    def __lt__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._plain() < o

    def __le__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._plain() <= o

    def __gt__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._plain() > o

    def __ge__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._plain() >= o

    def __add__(self, other: Any) -> list[Any]:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._plain() + o

    def __radd__(self, other: Any) -> list[Any]:
        if not isinstance(other, list):
            return NotImplemented
        return other + self._plain()

    def __mul__(self, n: Any) -> list[Any]:
        result: list[Any] = self._plain() * n
        return result

    __rmul__ = __mul__

    # -- changes -------------------------------------------------------------------------

    def _adopt_at(self, where: str, value: Any, at: int = -1, rebuild: bool = False) -> Any:
        raw = _inline.inline_value(value, self, at, rebuild)
        if raw is not None:
            return raw
        try:
            return stored_form(value, self._p_jar)
        except BadValue as err:
            raise err.prefixed(where) from None

    def _public(self, fn: Any, *args: Any) -> Any:
        check_writable(self)
        try:
            return fn(*args)
        except BadValue as err:
            raise public_error(err, self) from None

    def append(self, value: Any) -> None:
        self._public(self._append, value)

    def _append(self, value: Any) -> None:
        tail = self._tail
        tail.append(self._adopt_at(f"[{self._size + len(tail)}]", value))
        _touch(self)
        if len(tail) > TAIL_MAX:
            self._spill()

    def extend(self, values: Iterable[Any]) -> None:
        self._public(self._extend, values)

    def _extend(self, values: Iterable[Any]) -> None:
        # all of them first: a refusal changes nothing
        self._extend_stored(self._adopt_all(values, List.__len__(self)))

    def _extend_stored(self, items: list[Any]) -> None:
        tail = self._tail
        for start in range(0, len(items), LEAF_MAX):
            tail.extend(items[start:start + LEAF_MAX])
            if len(tail) > TAIL_MAX:
                self._spill()
        _touch(self)

    def _adopt_all(self, values: Iterable[Any], first: int, rebuild: bool = False) -> list[Any]:
        # Not list(values): it sizes its array by __length_hint__ first, and a wrong
        # huge hint is a MemoryError (list.extend ignores one only when it would
        # overflow). chain() has no hint, so the list grows as items come.
        items = list(values) if type(values) in (list, tuple) else list(chain(values))
        if set(map(type, items)) <= _PLAIN:  # decided at C speed: nothing to convert
            return items
        return [self._adopt_at(f"[{i}]", v, i, rebuild) for i, v in enumerate(items, first)]

    def __iadd__(self, values: Iterable[Any]) -> List:  # type: ignore[override,misc]
        self.extend(values)
        return self

    def __imul__(self, n: int) -> List:  # type: ignore[misc]
        items = self._plain() * n
        if n.__index__() > 1:  # each value n times: inline ones become records, shared
            for v in items:
                _inline.stored_elsewhere(v)
        self._public(self._replace, items)
        return self

    def insert(self, i: int, value: Any) -> None:
        self._public(self._insert, i, value)

    def _insert(self, i: int, value: Any) -> None:
        n = List.__len__(self)
        i = _as_index(i)
        if i < 0:
            i = max(0, i + n)
        i = min(i, n)
        value = self._adopt_at(f"[{i}]", value)
        size = self._size
        if i >= size:
            self._tail.insert(i - size, value)
            _touch(self)
            if len(self._tail) > TAIL_MAX:
                self._spill()
            return
        path, leaf, j = self._locate(i)
        leaf.items.insert(j, value)
        leaf._p_changed = True
        self._count(path, 1)
        if len(leaf.items) > LEAF_MAX:
            half = len(leaf.items) // 2
            right = _Leaf(leaf.items[half:])
            del leaf.items[half:]
            self._split(path, leaf, right)

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, slice):
            self._public(self._set_slice, i, value)
            return
        check_writable(self)
        i = self._index(i, "list assignment index out of range")
        try:
            value = self._adopt_at(f"[{i}]", value, i)
        except BadValue as err:
            raise public_error(err, self) from None
        size = self._size
        if i >= size:
            items, j = self._tail, i - size
        else:
            _, leaf, j = self._locate(i)
            items = leaf.items
        old = items[j]
        items[j] = value
        if type(old) in _RAW and old is not value:
            _inline.detach(self, old)
        if i >= size:
            _touch(self)
        else:
            leaf._p_changed = True

    def __delitem__(self, i: Any) -> None:
        check_writable(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(List.__len__(self))
            indexes = range(start, stop, step)
            if len(indexes) > LEAF_MAX:
                items = self._plain()
                del items[i]
                self._replace(items)
                return
            for k in sorted(indexes, reverse=True):
                self._delete(k)
            return
        self._delete(self._index(i, "list assignment index out of range"))

    def _delete(self, i: int) -> Any:
        size = self._size
        if i >= size:
            value = self._tail.pop(i - size)
            _touch(self)
            return _inline.taken(self, value) if type(value) in _RAW else value
        path, leaf, j = self._locate(i)
        value = leaf.items.pop(j)
        leaf._p_changed = True
        self._count(path, -1)
        if not leaf.items:
            self._unhook(path)
        return _inline.taken(self, value) if type(value) in _RAW else value

    def pop(self, i: int = -1) -> Any:
        check_writable(self)
        i = _as_index(i)
        if not List.__len__(self):
            raise IndexError("pop from empty list")
        if i == -1:
            if not self._tail:
                self._pull_leaf()
            value = self._tail.pop()
            _touch(self)
            return _inline.taken(self, value) if type(value) in _RAW else value
        return self._delete(self._index(i, "pop index out of range"))

    def remove(self, value: Any) -> None:
        check_writable(self)
        for i, v in enumerate(self._iter_from(0)):
            if v is value or v == value:
                self._delete(i)
                return
        raise ValueError("list.remove(x): x not in list")

    def clear(self) -> None:
        check_writable(self)
        _inline.detach_all(self)
        if self._root is not None or self._tail:  # an empty List keeps its tail (see sort)
            self._tail.clear()  # in place: a view's tail is its raw value, which its holder stores
            self._root, self._size = None, 0
        _touch(self)

    def reverse(self) -> None:
        check_writable(self)
        items = self._plain()
        items.reverse()
        self._replace(items)

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        """Sort in place, as ``list.sort``: stable; ``key`` and the comparisons see an
        empty list meanwhile, and a change to it raises ``ValueError`` (the sorted
        items are kept; the change is dropped)."""
        check_writable(self)
        original = self._plain()
        items = list(original)  # sorted by list.sort itself: its order on any error too
        saved = self._tail, self._root, self._size
        meanwhile = _Sorting()
        self._tail, self._root, self._size = meanwhile, None, 0
        try:
            items.sort(key=key, reverse=reverse)
        except BaseException:
            self._tail, self._root, self._size = saved
            if any(a is not b for a, b in zip(items, original, strict=True)):
                self._replace(items)  # a failed comparison leaves list.sort's partial work
            raise
        # Changed since: the tail grew (even if emptied again: list.sort notices
        # any growth too) or was replaced. Changes that leave an empty list as it
        # was (clear, reverse, sort) are none, as for list.sort.
        changed = meanwhile.grown or self._tail is not meanwhile or self._root is not None
        self._tail, self._root, self._size = saved
        self._replace(items)
        if changed:
            raise ValueError("list modified during sort")

    def _set_slice(self, s: slice, values: Iterable[Any]) -> None:
        try:
            iter(values)
        except TypeError:
            extended = s.step not in (None, 1)
            msg = "must assign iterable to extended slice" if extended else "can only assign an iterable"
            raise TypeError(msg) from None
        values = list(values) if type(values) in (list, tuple) else list(chain(values))
        for v in values:
            _inline.stored_elsewhere(v)  # a view stored again here: one record, not two copies
        items = self._plain()
        start, stop, step = s.indices(List.__len__(self))
        new = self._adopt_all(values, start)  # all of them first: a refusal changes nothing
        items[s] = new  # raises exactly as list does (extended-slice sizes, ...)
        if step == 1 and len(new) + max(0, stop - start) <= LEAF_MAX:
            for _ in range(max(0, stop - start)):
                self._delete(start)
            for k, v in enumerate(new):
                self._insert(start + k, v)
            return
        self._replace(items)

    def _replace(self, items: list[Any]) -> None:
        """Rebuild from `items` (sort, reverse, big slice changes).

        The old nodes are touched: a concurrent change to one of them must
        conflict with this rebuild, not be committed into a node no longer used.
        """
        new = self._adopt_all(items, 0, rebuild=True)  # before clearing: views of ours stay inline
        for node in _nodes(self._root):
            node._p_changed = True
        _inline.detach_all(self, keep=items)
        if self._root is not None or self._tail:  # an empty List keeps its tail (see sort)
            self._tail.clear()  # in place: a view's tail is its raw value, which its holder stores
            self._root, self._size = None, 0
        self._extend_stored(new)

    # -- the tree ------------------------------------------------------------------------

    def _locate(self, i: int) -> tuple[list[tuple[_Branch, int]], _Leaf, int]:
        """Path of (branch, child index) to the leaf holding tree index `i`."""
        path = []
        node = self._root
        while type(node) is _Branch:
            ends = node.ends
            k = bisect_right(ends, i)
            if k:
                i -= ends[k - 1]
            path.append((node, k))
            node = node.kids[k]
        return path, node, i

    def _count(self, path: list[tuple[_Branch, int]], delta: int) -> None:
        for branch, k in path:
            ends = branch.ends
            for x in range(k, len(ends)):
                ends[x] += delta
            branch._p_changed = True
        self._size += delta
        self._p_changed = True

    def _split(self, path: list[tuple[_Branch, int]], left: Any, right: Any) -> None:
        """`left` (child k of the last branch in `path`) was split; `right` follows it."""
        while True:
            n_left, n_right = left._size(), right._size()
            if not path:
                self._root = _Branch([left, right], [n_left, n_left + n_right])
                self._p_changed = True
                return
            branch, k = path.pop()
            base = branch.ends[k - 1] if k else 0
            branch.kids.insert(k + 1, right)
            branch.ends[k] = base + n_left
            branch.ends.insert(k + 1, base + n_left + n_right)
            branch._p_changed = True
            if len(branch.kids) <= BRANCH_MAX:
                return
            half = len(branch.kids) // 2
            cut = branch.ends[half - 1]
            new = _Branch(branch.kids[half:], [e - cut for e in branch.ends[half:]])
            del branch.kids[half:]
            del branch.ends[half:]
            left, right = branch, new

    def _unhook(self, path: list[tuple[_Branch, int]]) -> None:
        """Remove the empty node at the end of `path` (and any branch it empties)."""
        while path:
            branch, k = path.pop()
            del branch.kids[k]
            del branch.ends[k]
            branch._p_changed = True
            if branch.kids:
                break
        else:
            self._root = None
        root = self._root
        while type(root) is _Branch and len(root.kids) == 1:
            root = root.kids[0]
        if type(root) is _Branch and not root.kids:
            root = None
        if root is not self._root:
            self._root = root
        self._p_changed = True

    def _spill(self) -> None:
        """Move full leaves from the front of the tail to the end of the tree."""
        tail = self._tail
        while len(tail) > TAIL_MAX:
            leaf = _Leaf(tail[:LEAF_MAX])
            del tail[:LEAF_MAX]
            self._push_leaf(leaf)
        self._p_changed = True

    def _push_leaf(self, leaf: _Leaf) -> None:
        """Add `leaf` after the last leaf of the tree."""
        self._size += len(leaf.items)
        if self._root is None:
            self._root = leaf
            return
        path = []
        node = self._root
        while type(node) is _Branch:
            path.append((node, len(node.kids) - 1))
            node = node.kids[-1]
        for branch, _ in path[:-1]:
            branch.ends[-1] += len(leaf.items)
            branch._p_changed = True
        self._split(path, node, leaf)  # inserts it after `node`, counting the pair

    def _pull_leaf(self) -> None:
        """Move the tree's last leaf into the (empty) tail."""
        path = []
        node = self._root
        while type(node) is _Branch:
            path.append((node, len(node.kids) - 1))
            node = node.kids[-1]
        items = list(node.items)
        node._p_changed = True  # a concurrent change to this leaf must conflict, not vanish
        self._count(path, -len(items))
        self._unhook(path)
        self._tail = items
        self._p_changed = True

    def _dh_children(self) -> Iterator[tuple[str, Any]]:
        if self._p_changed is None:
            return
        if self._root is not None:
            yield from _loaded_nodes(self._root, 0)
        for i, v in enumerate(list(self._tail), self._size):
            yield f"[{i}]", v

    # -- inline values (`_inline`): this List holds raw values; views ask it ---------------

    def _find_raw(self, link: Any) -> tuple[Any, list[Any], int] | None:
        """(record, its item list, position) of a view's raw value, found by identity."""
        raw, hint, tail, size = link.raw, link.key, self._tail, self._size
        j = hint - size
        if 0 <= j < len(tail) and tail[j] is raw:
            return self, tail, j
        for j, v in enumerate(tail):
            if v is raw:
                link.key = size + j
                return self, tail, j
        root = self._root
        if root is None:
            return None
        if 0 <= hint < size:
            _, leaf, j = self._locate(hint)
            if leaf.items[j] is raw:
                return leaf, leaf.items, j
        for offset, leaf in _loaded_leaves(root, 0):
            for j, v in enumerate(leaf.items):
                if v is raw:
                    link.key = offset + j
                    return leaf, leaf.items, j
        return None

    def _dh_holds_raw(self, link: Any) -> bool:
        return self._find_raw(link) is not None

    def _dh_mark_raw(self, link: Any) -> None:
        found = self._find_raw(link)
        if found is not None:
            found[0]._p_changed = True

    def _dh_put_raw(self, link: Any, new: Any) -> None:
        found = self._find_raw(link)
        if found is not None:
            record, items, j = found
            items[j] = new
            record._p_changed = True

    def _dh_raw_now(self) -> Any:
        # None once it would spill into leaves: promoted first, so that the leaves are its own
        return self._tail if self._root is None and len(self._tail) <= TAIL_MAX else None

    def _dh_stored(self) -> None:
        _inline.stored_elsewhere(self)


def _as_index(i: Any) -> int:
    """`i` as list.insert and list.pop take it: an integer that fits a C ssize_t."""
    n: int = operator.index(i)  # TypeError: 'str' object cannot be interpreted as an integer
    if not -sys.maxsize - 1 <= n <= sys.maxsize:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


class _Sorting(list):  # type: ignore[type-arg]
    """The empty tail a List shows while it sorts: notes growth (see List.sort).

    Items reach an empty List's tail only by these three methods. Pickled as a
    plain list, should a savepoint happen in a key function.
    """

    __slots__ = ("grown",)

    def __init__(self) -> None:
        super().__init__()
        self.grown = False

    def append(self, value: Any) -> None:
        self.grown = True
        super().append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.grown = True
        super().extend(values)

    def insert(self, i: Any, value: Any) -> None:
        self.grown = True
        super().insert(i, value)

    def __reduce__(self) -> Any:
        return (list, (list(self),))


def _walk(node: Any, start: int) -> Iterator[Any]:
    """Items of the subtree `node` from index `start`, leaf by leaf."""
    was_ghost = node._p_changed is None
    if type(node) is _Leaf:
        items = node.items
        yield from items[start:] if start else items
        _deactivate_if_idle(node, was_ghost)
        return
    ends = node.ends
    k = bisect_right(ends, start) if start else 0
    offset = ends[k - 1] if k else 0
    kids = node.kids
    for idx in range(k, len(kids)):
        yield from _walk(kids[idx], start - offset if idx == k else 0)
    _deactivate_if_idle(node, was_ghost)


def _loaded_leaves(node: Any, offset: int) -> Iterator[tuple[int, Any]]:
    """(list index of its first item, leaf) of the leaves in memory under `node`."""
    if node._p_changed is None:
        return
    if type(node) is _Leaf:
        yield offset, node
        return
    prev = 0
    for kid, end in zip(list(node.kids), list(node.ends), strict=True):
        yield from _loaded_leaves(kid, offset + prev)
        prev = end


def _nodes(node: Any) -> Iterator[Any]:
    """Every node of a List tree."""
    if node is None:
        return
    yield node
    if type(node) is _Branch:
        for kid in node.kids:
            yield from _nodes(kid)


#: Error paths only: the list index of each leaf's first item, found while
#: `path_of` walks a List, so that a leaf can name its items' indexes.
_LEAF_OFFSETS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _loaded_nodes(node: Any, offset: int) -> Iterator[tuple[str, Any]]:
    """The tree nodes in memory under `node`, noting each leaf's offset."""
    if node._p_changed is None:
        return
    if type(node) is _Leaf:
        _LEAF_OFFSETS[node] = offset
        yield "", node
        return
    prev = 0
    for kid, end in zip(list(node.kids), list(node.ends), strict=True):
        yield from _loaded_nodes(kid, offset + prev)
        prev = end


# --- conversions --------------------------------------------------------------------------

CONVERTERS[dict] = (Dict._blank, Dict._fill)
CONVERTERS[list] = (List._blank, List._fill)
CONVERTERS[set] = (Set._blank, Set._fill)


def _dict_view(raw: dict[Any, Any], link: Any) -> Dict:
    """A Dict whose storage is `raw` (a view when `link` says where it is held)."""
    self = Dict.__new__(Dict)
    self._small = self._v_hot = raw
    self._index = self._entries = self._coll = self._len = None
    self._v_mods = 0
    self._v_inline = link
    return self


def _list_view(raw: list[Any], link: Any) -> List:
    """A List whose storage is `raw` (a view when `link` says where it is held)."""
    self = List.__new__(List)
    self._tail, self._root, self._size = raw, None, 0
    self._v_inline = link
    return self


_inline.MAKERS[dict] = _dict_view
_inline.MAKERS[list] = _list_view
_inline.HOLDERS = (_Hashed, _Entries, _EntryBucket, List, _Leaf)
BEFORE_COMMIT.append(_inline.note_inline)


def to_builtin(obj: Any) -> Any:
    """A deep copy of `obj` made of plain builtins: `Dict` -> dict, `List` -> list,
    `Set` -> set, `Counter` -> int, and `State`/`Object` -> dict of their attributes.

    For JSON, exports and tests. Other values are returned as they are. A
    container met twice is copied once, so a `List` that contains itself
    becomes a list that contains itself (as ``copy.deepcopy`` does).

    >>> to_builtin(Dict({"a": List([1, Set({2})])}))
    {'a': [1, {2}]}
    """
    return _to_builtin(obj, {})


def _to_builtin(obj: Any, memo: dict[int, tuple[Any, Any]]) -> Any:
    # id -> (original, copy): the original is kept so that its id is not reused
    # meanwhile (a List walk ghosts the leaves it has passed).
    done = memo.get(id(obj))
    if done is not None:
        return done[1]
    if isinstance(obj, (Dict, dict)):
        as_dict: dict[Any, Any] = {}
        memo[id(obj)] = (obj, as_dict)
        as_dict.update((k, _to_builtin(v, memo)) for k, v in obj.items())
        return as_dict
    if isinstance(obj, (List, list)):
        as_list: list[Any] = []
        memo[id(obj)] = (obj, as_list)
        as_list.extend(_to_builtin(v, memo) for v in obj)
        return as_list
    if isinstance(obj, (Set, set)):
        return {_to_builtin(v, memo) for v in obj}  # members are hashable: never itself
    if type(obj) is tuple:
        return tuple(_to_builtin(v, memo) for v in obj)
    if isinstance(obj, Counter):
        return obj.value
    attrs = getattr(type(obj), "_dh_as_dict", None)
    if attrs is not None:
        as_attrs: dict[str, Any] = {}
        memo[id(obj)] = (obj, as_attrs)
        as_attrs.update((k, _to_builtin(v, memo)) for k, v in attrs(obj).items())
        return as_attrs
    return obj
