"""Small values stored inline: a small dict or list lives in its holder's record.

Without this, every dict or list stored into a `Dict` or `List` became a durable
container of its own, one record each: a 100k-entry bulk load of values shaped
like ``{"i": i, "tags": ["a", "b"]}`` wrote 300k records. Now a value small
enough (`fits`) is kept as a plain builtin *inside the record that holds it* (a
`Dict`'s small dict or `_EntryBucket`, a `List`'s tail or `_Leaf`): the *raw*
form. Raw dicts and lists appear nowhere else in stored states, so a plain
``dict`` or ``list`` value in a container's state always means "inline".

A value is inline when, as it is stored into a `Dict` or `List`:

* it is a plain ``dict`` or ``list`` of at most `INLINE_ITEMS` items;
* its keys (for a dict) and items are ``None``, ``bool``, ``int``, ``float``,
  ``str`` or ``bytes`` (exact types), or plain dicts and lists that fit too, at
  most `INLINE_DEPTH` levels deep;
* its size as marshal writes it (close to the pickle's) is at most `INLINE_BYTES`;
* it holds no container twice (a list shared inside it keeps today's records).

Changed through a view, it may also come to hold references to durable objects
(a `Counter`, an inner view promoted): those pickle as references (`fits`).

``State`` / ``Object`` attributes and ``Set`` members are never inline.

Reading gives a *view*: a real `Dict` or `List` whose storage is the raw value
itself, in *inline mode* (`Link` in its ``_v_inline`` slot: the container that
holds the raw value and where). Views are cached by the holder, so
``d["a"] is d["a"]`` while the holder stays in memory. A change through a view
(every mutator checks writability first, `before_write`) marks the record that
holds the raw value changed, walking up through views of views; after the change
(`after_write`) a view that no longer fits becomes its own record (it is
*promoted*: the holder now references the view object itself, so it stays the
same object). A view stored into a second place is promoted too (`stored_elsewhere`),
so ``x = d["a"]; d["b"] = x`` makes one record both entries reference, never two
copies. A view whose raw value is no longer where it was read (its holder was
reloaded after the transaction that read it ended) refuses changes with a
`StaleReferenceError` instead of losing them. A value removed from its holder
(``pop``, ``del``, overwritten) detaches its view, which is then a plain
unstored container, as a removed record would be.

A heap that holds inline values has format `_format.INLINE_FORMAT` (3): raised
by the first transaction that stores one (`note_inline`), so heaps that never do
stay readable by older versions, and older versions refuse the ones that do.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import operator
import sys
import threading
from collections.abc import Callable, Iterator
from itertools import chain, compress, repeat
from typing import Any

from persistent import Persistent

from ._errors import DurableHeapError, StaleReferenceError
from ._format import FORMAT_KEY, INLINE_FORMAT
from ._kinds import ATOMIC, SharedInline, is_atomic
from ._paths import durable_children, path_of
from ._registry import per_thread
from ._watch import changed_objects

__all__ = [
    "INLINE_BYTES",
    "INLINE_DEPTH",
    "INLINE_ITEMS",
    "RAW",
    "Link",
    "after_write",
    "before_write",
    "bulk_raw",
    "detach",
    "fits",
    "gc_paused",
    "holds_watched",
    "inline_value",
    "is_view",
    "note_inline",
    "pinned",
    "pinned_entries",
    "stored_elsewhere",
    "taken",
    "view",
]

#: Items (entries) of one inline dict or list.
INLINE_ITEMS = 8
#: Levels of nesting: a dict of lists is 2.
INLINE_DEPTH = 2
#: Estimated pickled size of one inline value, nested levels included.
INLINE_BYTES = 256

#: The raw (inline) forms.
RAW = frozenset({dict, list})
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_ATOMIC_OR_RAW = ATOMIC | RAW
_MISSING: Any = object()
_second = operator.itemgetter(1)

#: Filled by `_containers`: raw type -> make a view ``(raw, link) -> Dict | List``.
MAKERS: dict[type, Callable[[Any, Link | None], Any]] = {}

#: Views a holder caches before it drops those nobody else holds.
CACHE_MAX = 1024


class Link:
    """The ``_v_inline`` of a container: where its raw value is held, and its views.

    ``parent`` is the container whose storage holds ``raw`` (at dict key or list
    index ``key``; for a List an index hint, found again by identity), or None
    for a container that is not a view. ``views`` maps id(raw value) -> view for
    the raw values this container holds (the view keeps the raw value alive, so
    the id is not reused meanwhile).
    """

    __slots__ = ("parent", "key", "raw", "depth", "views", "prune_at")

    def __init__(self, parent: Any = None, key: Any = None, raw: Any = None, depth: int = 0) -> None:
        self.parent = parent
        self.key = key
        self.raw = raw
        self.depth = depth
        self.views: dict[int, Any] | None = None
        #: `views` is pruned when it reaches this size: CACHE_MAX, or twice what a
        #: prune kept (views still in use), so that keeping many costs O(1) each.
        self.prune_at = CACHE_MAX


def _link(obj: Any) -> Link | None:
    # ZODB trap: reading any attribute of a ghost but its _p_ ones loads it, _v_ names
    # too; a ghost is never a view (a view has no record of its own), so it is not
    # loaded here. Loading it could even break it: a program's top level that reads
    # state before its classes are defined would make its objects broken ones.
    if getattr(obj, "_p_changed", False) is None:
        return None
    return getattr(obj, "_v_inline", None)


def is_view(obj: Any) -> bool:
    """Whether `obj` is a container in inline mode (a view of a raw value)."""
    link = _link(obj)
    return link is not None and link.parent is not None


def moved(obj: Any) -> Any:
    """What to store for `obj` taken out of a holder that goes in the same transaction
    (``durable-heap import``'s staged container): a view's raw value, a plain dict or
    list that is copied inline again where it is stored (stored as the view, it would
    become a record of its own, as a value stored into a second place does); anything
    else as it is."""
    link = _link(obj)
    return link.raw if link is not None and link.parent is not None else obj


def _depth(holder: Any) -> int:
    link = _link(holder)
    return link.depth if link is not None and link.parent is not None else 0


# --- which values fit -------------------------------------------------------------


def _size(value: Any) -> int:
    tp = type(value)
    if tp is str or tp is bytes:
        return len(value) + 2
    if tp is int:
        return 2 + int(value.bit_length()) // 8
    return 9 if tp is float else 1


_SCALARS_OR_RAW = _SCALARS | RAW


def _copy(value: Any, depth: int, seen: list[int]) -> Any:
    """A copy of the plain dict or list `value` if its shape fits inline, else _MISSING.

    Items, depth, types and sharing are checked here (the size by `_raw_copy`).
    Bulk loads run this once per value, so the common shapes are decided by
    C-speed set and copy operations, and an inner container of scalars is
    copied in the loop without a call.
    """
    if len(value) > INLINE_ITEMS or depth > INLINE_DEPTH:
        return _MISSING
    seen.append(id(value))
    if type(value) is dict:
        if not set(map(type, value)) <= _SCALARS:
            return _MISSING
        out: Any = value.copy()
        kinds = set(map(type, out.values()))
        if kinds <= _SCALARS:
            return out
        if not kinds <= _SCALARS_OR_RAW:
            return _MISSING
        pairs: Any = out.items()
    else:
        out = value.copy()
        kinds = set(map(type, out))
        if kinds <= _SCALARS:
            return out
        if not kinds <= _SCALARS_OR_RAW:
            return _MISSING
        pairs = enumerate(out)
    inner = depth + 1
    for k, v in pairs:
        tv = type(v)
        if tv is list or tv is dict:
            if id(v) in seen:
                return _MISSING  # held twice in the value (or itself): records keep it one
            if (inner <= INLINE_DEPTH and len(v) <= INLINE_ITEMS and tv is list
                    and set(map(type, v)) <= _SCALARS):
                seen.append(id(v))
                out[k] = v.copy()  # a value replaced, no key added: iterating goes on
                continue
            v = _copy(v, inner, seen)
            if v is _MISSING:
                return _MISSING
            out[k] = v
    return out


def fits(raw: Any, depth: int) -> bool:
    """Whether the raw value of a view (changed through it) may stay inline.

    As at storing, plus references to durable objects (a promoted inner view,
    a `Counter`): those pickle as references, so the record stays small.
    """
    if not _fits(raw, depth, [sys.maxsize]):  # the shape
        return False
    try:
        return len(marshal.dumps(raw)) <= INLINE_BYTES  # the size, as `_raw_copy` measures it
    except ValueError:  # it holds references: estimated
        return _fits(raw, depth, [INLINE_BYTES])


def _fits(raw: Any, depth: int, budget: list[int]) -> bool:
    tp = type(raw)
    if tp not in RAW or depth > INLINE_DEPTH or len(raw) > INLINE_ITEMS:
        return False
    left = budget[0] - 4
    values = raw.values() if tp is dict else raw
    if tp is dict:
        for k in raw:
            if type(k) not in _SCALARS:
                return False
            left -= _size(k)
    for v in values:
        tv = type(v)
        if tv in _SCALARS:
            left -= _size(v)
        elif tv in RAW:
            budget[0] = left
            if not _fits(v, depth + 1, budget):
                return False
            left = budget[0]
        elif isinstance(v, Persistent) and not is_view(v):
            left -= 12
        else:
            return False
    budget[0] = left
    return left >= 0


def inline_value(value: Any, holder: Any, key: Any, rebuild: bool = False) -> Any:
    """What `value` stored into `holder` (at `key`) becomes if it is inline, else None.

    A plain dict or list that fits: its raw copy. A view of `holder`'s own raw
    value put back at its own place (``d[k] = d[k]``), or anywhere while
    `rebuild` (``l.sort()`` storing the same values again): that raw value. Any
    other view: it is promoted to its own record (`stored_elsewhere`), and the
    caller stores it as it does any durable object.
    """
    tp = type(value)
    if tp is dict or tp is list:
        raw = _raw_copy(value, _depth(holder) + 1)
        if raw is not None:
            _stored_into(holder)
        return raw
    link = _link(value)
    if link is not None and link.parent is not None:
        if link.parent is holder and (rebuild or (holder._dh_holds_raw(link) and link.key == key)):
            return link.raw
        stored_elsewhere(value)
    return None


def raw_copy(value: Any, holder: Any) -> Any:
    """The raw copy of the plain dict or list `value` stored into `holder`, or None
    when it does not fit inline."""
    link = holder._v_inline
    raw = _raw_copy(value, 1 if link is None or link.parent is None else link.depth + 1)
    if raw is not None:
        _stored_into(holder)
    return raw


def _raw_copy(value: Any, depth: int) -> Any:
    local = per_thread
    if local.no_inline:
        return None
    memo = local.memo
    if memo is None and depth == 1 and type(value) is dict:
        raw = _flat_dict_copy(value)
        if raw is not None:
            return raw if len(marshal.dumps(raw)) <= INLINE_BYTES else None
    seen: list[int] = []
    raw = _copy(value, depth, seen)
    # The size, as marshal (C, exact types only, as `_copy` checked) writes it:
    # close to the pickle's, in one call.
    if raw is _MISSING or len(marshal.dumps(raw)) > INLINE_BYTES:
        return None
    if memo is not None:
        # Inside one outermost stored_form: a container met again must stay one
        # object. Already converted into a record: let stored_form return that one.
        if any(i in memo for i in seen):
            return None
        inlined = local.inlined
        if inlined is None:
            inlined = local.inlined = {}
        elif any(i in inlined for i in seen):
            raise SharedInline  # copied inline once already: stored_form starts over without
        inlined.update(dict.fromkeys(seen, value))  # keeps `value` (and so the ids) alive
    return raw


def bulk_raw(source: dict[Any, Any], holder: Any) -> list[tuple[Any, Any]] | None:
    """``(key, raw copy)`` for every item of `source`, whose values are all dicts, when
    every one fits inline as a dict of scalars and lists of scalars; else None (the
    caller converts item by item).

    The bulk load's fast path: every check is a C-level pass over all values at
    once (no Python frame per item), and the copies are made by marshal, which
    writes exactly these types and reads them back as new objects.
    """
    local = per_thread
    if local.no_inline:
        return None
    values = list(source.values())
    if not values or max(map(len, values)) > INLINE_ITEMS:
        return None
    if not set(map(type, chain.from_iterable(values))) <= _SCALARS:  # the keys
        return None
    inner = list(chain.from_iterable(map(dict.values, values)))
    kinds = set(map(type, inner))
    if not kinds <= _SCALARS_OR_LIST:
        return None
    if list in kinds:
        lists = list(compress(inner, map(operator.is_, map(type, inner), repeat(list))))
        if (max(map(len, lists)) > INLINE_ITEMS
                or not set(map(type, chain.from_iterable(lists))) <= _SCALARS
                or len(set(map(id, lists))) != len(lists)):  # one list held twice: one by one
            return None
    else:
        lists = []
    blobs = list(map(marshal.dumps, values))
    if max(map(len, blobs)) > INLINE_BYTES:
        return None
    memo = local.memo
    if memo is not None:
        # Inside one outermost stored_form (``state.users = {...}``): as in `_raw_copy`,
        # a container met again must stay one object. A value held twice here, or
        # converted already: item by item (which keeps it one record). Met again
        # later: stored_form starts over without inline copies (`SharedInline`).
        copied = dict(zip(map(id, values), values, strict=True))
        copied.update(zip(map(id, lists), lists, strict=True))
        if len(copied) != len(values) + len(lists) or not memo.keys().isdisjoint(copied):
            return None
        inlined = local.inlined
        if inlined is None:
            inlined = local.inlined = {}
        elif not inlined.keys().isdisjoint(copied):
            raise SharedInline
        inlined.update(copied)  # keeps the values (and so the ids) alive
    _stored_into(holder)
    with gc_paused():
        return list(zip(source, map(marshal.loads, blobs), strict=True))


#: Threads inside `gc_paused` now, and whether the first of them turned the GC off
#: (it was on): the last one out turns it back on. Guarded by `_pause_lock`.
_pausers = 0
_paused_by_us = False
_pause_lock = threading.Lock()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC paused, for C-level bulk work on plain data (no user code runs).

    Hundreds of thousands of new containers (and the tuples and buckets that hold
    them) would run the collector over and over, each full pass walking every
    live container: a third of a bulk load's time. Nothing made meanwhile is
    garbage, so nothing is left for later.

    Python's GC switch is process-wide: while one thread bulk-loads, no thread's
    cycles are collected (they are at the next collection after it; reference
    counting frees everything else as usual). So the pause is counted: with
    several threads bulk-loading at once, the GC comes back on when the last one
    is done, not when the first one is (which would run the collector inside the
    others' loads), and only if it was on before the first one paused it. A GC
    the program switched off before stays off.
    """
    global _pausers, _paused_by_us
    with _pause_lock:
        if _pausers == 0:
            _paused_by_us = gc.isenabled()
        _pausers += 1
        gc.disable()
    try:
        yield
    finally:
        with _pause_lock:
            _pausers -= 1
            if _pausers == 0 and _paused_by_us:
                _paused_by_us = False
                gc.enable()


def _flat_dict_copy(value: dict[Any, Any]) -> Any:
    """`_copy` of the shape bulk loads are made of: a dict of scalars and at most one
    list of scalars, in one frame; None for any other shape (then `_copy` decides)."""
    if len(value) > INLINE_ITEMS or not set(map(type, value)) <= _SCALARS:
        return None
    out = value.copy()
    kinds = set(map(type, out.values()))
    if kinds <= _SCALARS:
        return out
    if not kinds <= _SCALARS_OR_LIST:
        return None
    inner = None
    for k, v in out.items():
        if type(v) is list:
            if inner is not None or len(v) > INLINE_ITEMS or not set(map(type, v)) <= _SCALARS:
                return None  # two lists (maybe one, twice), or a longer or deeper one
            inner = k
    out[inner] = out[inner].copy()
    return out


_SCALARS_OR_LIST = _SCALARS | {list}


def stored_elsewhere(obj: Any) -> None:
    """`obj`, a view, is being stored into a second place: make it its own record.

    Called by `stored_form` (through ``_dh_stored``) and by `inline_value`.
    """
    if is_view(obj):
        _promote(obj)


# --- views ---------------------------------------------------------------------------


def view(holder: Any, raw: Any, key: Any) -> Any:
    """The view of `raw`, held by `holder` at `key` (cached: the same object each time)."""
    link = _link(holder)
    if link is None:
        link = Link()
        holder._v_inline = link
    views = link.views
    if views is None:
        views = link.views = {}
    else:
        found = views.get(id(raw))
        if found is not None:
            return found
        if len(views) >= link.prune_at:
            _prune(views)
            link.prune_at = max(CACHE_MAX, 2 * len(views))
    depth = link.depth + 1 if link.parent is not None else 1
    made = MAKERS[type(raw)](raw, Link(holder, key, raw, depth))
    views[id(raw)] = made
    return made


def _prune(views: dict[int, Any]) -> None:
    """Drop the views only the cache holds: nobody can compare them any more.

    Trap: ``sys.getrefcount`` is CPython's (the only interpreter durable_heap
    supports, see `_watch`): here the dict's reference and the argument's. Not over
    ``views.items()``: its iterator keeps the (key, view) tuple it reuses, one more
    reference, so no view was ever found unused (the cache grew without bound, and
    from CACHE_MAX on each new view scanned all of them).
    """
    for k in list(views):
        if sys.getrefcount(views[k]) <= 2:
            del views[k]


def taken(holder: Any, raw: Any) -> Any:
    """`raw` was removed from `holder` (``pop``): a container of its own, no view any more."""
    found = detach(holder, raw)
    if found is not None:
        return found
    return MAKERS[type(raw)](raw, None)


def detach(holder: Any, raw: Any) -> Any:
    """`raw` left `holder` (removed or overwritten): its view, if any, stands alone now."""
    link = _link(holder)
    if link is None or link.views is None:
        return None
    found = link.views.pop(id(raw), None)
    if found is not None:
        found._v_inline = None
    return found


def detach_all(holder: Any, keep: Any = None) -> None:
    """Every raw value of `holder` left it (``clear``), or all but those in `keep`."""
    link = _link(holder)
    if link is None or not link.views:
        return
    kept = {id(v) for v in keep} if keep is not None else set()
    for k in [k for k in link.views if k not in kept]:
        link.views.pop(k)._v_inline = None


def pinned(items: list[Any]) -> bool:
    """Whether a raw value among a record's `items` has a view alive: then the record
    must not be ghosted after streaming through it (the view's changes would go to
    a raw value no longer held).

    Trap: ``sys.getrefcount`` (CPython): a raw value nobody views is referenced by
    `items`, the loop variable and the argument only; a view adds three.
    """
    if RAW.isdisjoint(map(type, items)):  # the common case, at C speed
        return False
    for v in items:
        if type(v) in RAW and sys.getrefcount(v) > 3:
            return True
    return False


def pinned_entries(entries: Any) -> bool:
    """`pinned` for the ``(key, value)`` entries of a bucket."""
    if RAW.isdisjoint(map(type, map(_second, entries))):  # the common case, at C speed
        return False
    for entry in entries:
        v = entry[1]
        if type(v) in RAW and sys.getrefcount(v) > 3:  # the entry, `v`, the argument
            return True
    return False


def holds_watched(values: Any) -> bool:
    """`_kinds.holds_watched`, for a container's storage: raw values are not watched
    (they hold only scalars, raw values and references, see `fits`)."""
    if not isinstance(values, (list, tuple)):
        values = list(values)
    if set(map(type, values)) <= _ATOMIC_OR_RAW:
        return False
    return any(not is_atomic(v) for v in values if type(v) not in _ATOMIC_OR_RAW)


# --- changes through views -------------------------------------------------------------


def _stale(obj: Any) -> StaleReferenceError:
    name = type(obj).__name__
    return StaleReferenceError(
        f"a {name} stored inline in its holder's record was changed through a reference "
        "kept from an earlier transaction, and that record has been loaded afresh since: "
        "the change would be lost, so it was refused. Read the value from state inside "
        "the transaction that changes it."
    )


def before_write(obj: Any, check: Callable[[Any], None], changed: Any = None) -> None:
    """`obj`, a view, is about to change: check it may, and mark its record changed.

    `check` is the writability check of a durable object (`_watch.check_writable`),
    applied to the first holder that is not a view.
    """
    link = _link(obj)
    assert link is not None
    parent = link.parent
    if not parent._dh_holds_raw(link):
        raise _stale(obj)
    if is_view(parent):
        before_write(parent, check, obj if changed is None else changed)  # up the chain
        return
    try:
        check(parent)
    except DurableHeapError as err:  # name the value changed, not only its holder
        held, own = path_of(parent), path_of(obj if changed is None else changed)
        raise type(err)(str(err).replace(held, own, 1)) from None
    parent._dh_mark_raw(link)


def after_write(obj: Any) -> None:
    """`obj` (a view) changed: promote it when it no longer fits inline."""
    link = _link(obj)
    if link is None or link.parent is None:
        return
    if not fits(obj._dh_raw_now(), link.depth) or obj._dh_raw_now() is not link.raw:
        _promote(obj)


def _promote(obj: Any) -> None:
    """Make the view `obj` its own record: its holder now references `obj` itself."""
    link = _link(obj)
    assert link is not None and link.parent is not None
    parent = link.parent
    if not parent._dh_holds_raw(link):
        raise _stale(obj)
    if is_view(parent):
        before_write(parent, _no_check)
    parent._dh_put_raw(link, obj)
    views = _link(parent).views  # type: ignore[union-attr]
    if views is not None:
        views.pop(id(link.raw), None)
    obj._v_inline = Link() if link.views is None else _own_views(link)


def _own_views(link: Link) -> Link:
    kept = Link()
    kept.views = link.views
    return kept


def _no_check(obj: Any) -> None:
    pass


# --- the format marker -------------------------------------------------------------------

#: Filled by `_containers`: the classes whose storage may hold raw values.
HOLDERS: tuple[type, ...] = ()


class _Maybe(threading.local):
    #: A container in no heap yet was given an inline value in this thread.
    jarless = False


_maybe = _Maybe()


def _stored_into(holder: Any) -> None:
    """A raw value was made for `holder`: its heap's next commit checks the format marker."""
    while True:
        link = _link(holder)
        if link is None or link.parent is None:
            break
        holder = link.parent
    jar = holder._p_jar
    if jar is None:
        _maybe.jarless = True
    elif not jar.__dict__.get("_dh_inline_format"):
        jar._dh_inline_maybe = True


def note_inline(jar: Any) -> None:
    """Before a commit on `jar`: raise the heap's format marker if inline values go in.

    A before-commit hook (`_watch.BEFORE_COMMIT`), so it sees every way of
    committing. It costs one lookup unless an inline value was made since the
    last commit (`_stored_into`) and the committed marker is not yet
    `INLINE_FORMAT`; then the changed records and the new objects they reach
    are scanned for raw values (a new `Dict` filled before it was stored
    reaches the heap only through its holder). An older durable_heap then
    refuses to open the heap instead of misreading it.
    """
    state = jar.__dict__
    if state.get("_dh_inline_format"):
        return
    maybe = state.pop("_dh_inline_maybe", False)
    if not (maybe or _maybe.jarless) or jar.isReadOnly():
        return
    root = jar.root()
    found = root.get(FORMAT_KEY, 1)
    if not isinstance(found, int) or found >= INLINE_FORMAT:
        if root._p_changed is False:  # the committed marker: ask no more
            jar._dh_inline_format = True
        return
    if _reaches_raw(changed_objects(jar)):
        root[FORMAT_KEY] = INLINE_FORMAT
        _maybe.jarless = False


def _reaches_raw(objects: list[Any]) -> bool:
    """Whether a container among `objects`, or new ones they hold, stores a raw value."""
    todo = list(objects)
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        holder = isinstance(obj, HOLDERS)
        for _, v in durable_children(obj):
            tv = type(v)
            if tv in RAW:
                if holder:
                    return True
            elif tv in ATOMIC:
                continue
            elif isinstance(v, Persistent):
                if v._p_jar is None and id(v) not in seen:
                    seen.add(id(v))
                    todo.append(v)
            elif tv is tuple and id(v) not in seen:
                seen.add(id(v))
                todo.append(v)
    return False
