"""The watch: in-place changes to plain objects are not lost; writes need a transaction.

A plain object (a dataclass instance, an ``OrderedDict``...) is pickled inside
the record of the durable object that holds it, so an in-place change
(``state.cfg.retries = 3``) does not set ``_p_changed`` -- the classic ZODB
trap. We close it like this: every durable object whose record holds a watched
value registers with the `_Watch` of its connection when it is loaded (with a
snapshot of its state) and when it is saved; before each commit the watch
re-pickles the registered objects that still look clean and marks the ones
whose bytes differ as changed; after the transaction ends (commit or abort) it
turns them back into ghosts, so that the next transaction that touches them
loads them again and is watched too, and an aborted in-place change is dropped
instead of lingering in memory.

The cost is therefore paid only by records that hold watched values: one
snapshot pickle when loaded, one when committing, one reload per transaction.

Also here, as they run on the same per-connection bookkeeping: the class notes
of the transaction in progress (registered before its commit), `check_before_commit`
(name an unstorable value before ZODB's commit swallows which one it was),
`check_writable` and `view_changes` (writes outside a transaction, or into a
read-only view).
"""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any

import transaction.interfaces
from transaction._transaction import (
    Status,  # the one place it is defined; not re-exported
    Transaction,
)

from ._errors import NoTransactionError, StaleReferenceError, StorageError
from ._kinds import is_atomic
from ._paths import durable_children, path_of
from ._registry import class_paths, ensure_registry, per_thread, stored_classes
from ._snapshot import snapshot
from ._storable import unpicklable_error
from ._zones import ensure as ensure_zones

__all__ = [
    "BEFORE_COMMIT",
    "ORPHANS_MAX",
    "changed_outside",
    "changed_path",
    "check_writable",
    "forget_reads",
    "notes_of",
    "check_before_commit",
    "remember_reads",
    "reset_watch",
    "snapshot_for",
    "view_changes",
    "watch",
    "watched_plain_ids",
    "watched_records",
]


def notes_of(jar: Any) -> set[str] | None:
    """The class notes of the transaction in progress on connection `jar`."""
    w = _watch_of(jar)
    return w.noted if w is not None else None


def snapshot_for(jar: Any, obj: Any) -> bytes:
    """`snapshot`, noting the classes it meets for `jar`'s transaction (with `jar`
    None: nowhere, for a snapshot only compared, never stored)."""
    local = per_thread
    sink = local.sink
    notes = notes_of(jar) if jar is not None else None
    local.sink = notes if notes is not None else set()
    try:
        return snapshot(obj, note=notes is not None)
    finally:
        local.sink = sink


def register_pending(conn: Any) -> None:
    """Add the class paths noted for this transaction that the registry lacks
    (a before-commit hook; see `note_class`)."""
    w = _watch_of(conn)
    if w is None or not w.noted or conn.isReadOnly():
        return
    known: set[str] | None = conn.__dict__.get("_dh_classes")
    if known is None:
        known = conn._dh_classes = stored_classes(conn)
    new = w.noted - known
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
            self.noted = set()  # aborted: nothing was stored (see `register_pending`)
        self.forget_reads()
        items, self.items, self.hooked = self.items, {}, None
        if not items:  # nothing watched (most commits): nothing to ghost, no orphan made
            return
        # Ghost them: the next transaction reloads (and watches) them, and an aborted
        # in-place change does not survive in memory.
        self.ghost([obj for obj, _ in items.values()])

    def ghost(self, records: list[Any]) -> None:
        """Turn `records` into ghosts; the plain values of theirs that user code still
        holds become orphans: changed later, they are refused (`_check_orphans`)."""
        values: list[tuple[Any, bytes, str]] = []
        for obj in records:
            if obj._p_jar is not None and obj._p_oid is not None:
                values += [(v, obj._p_oid, acc) for acc, v in _plain_values(obj)]
                obj._p_invalidate()
        # A value still referenced after the ghosting is held by user code, which
        # may change it later believing it still part of state.
        # CPython counts the references: ours are the entry tuple (and below the
        # loop variable), plus one for getrefcount's own argument. Trap:
        # ``sys.getrefcount`` is CPython's (PyPy has no reference counts, and its
        # getrefcount is not meaningful): this check, and `_check_orphans`, assume
        # CPython, the only interpreter durable_heap supports (ZODB's C extensions).
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
                    self.orphans.append(_Orphan(value, snapshot_for(None, value), entry[1], entry[2]))
                except Exception:  # noqa: BLE001,S112 - unpicklable now: nothing to compare
                    continue
        del values
        del self.orphans[:-ORPHANS_MAX]

    def _hook(self, txn: Any) -> None:
        if self.hooked is not txn:
            txn.addBeforeCommitHook(self._before_commit)
            self.hooked = txn

    def _before_commit(self) -> None:
        ensure_zones()  # a ZoneInfo made since the last commit pickles by key (see `_zones`)
        if self.orphans:
            self._check_orphans()
        if self.items:  # most commits watch nothing
            for obj, base in list(self.items.values()):
                if obj._p_changed is not False:
                    continue  # saved anyway, or a ghost again
                try:
                    now = snapshot_for(obj._p_jar, obj.__getstate__())
                except Exception as exc:  # noqa: BLE001 - report which value it is
                    raise unpicklable_error(obj, exc) from None
                if now != base:
                    obj._p_changed = True
        jar = self.jar()
        if jar is not None:
            for hook in BEFORE_COMMIT:
                hook(jar)
            if self.noted:  # (`register_pending` has nothing to do otherwise)
                register_pending(jar)  # last: the snapshots above may note classes


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
                unchanged = snapshot_for(None, value) == orphan.snapshot
            except Exception:  # noqa: BLE001 - changed into something unpicklable
                unchanged = False
            if unchanged:
                alive.append(orphan)
                continue
            self.orphans = alive + [o for o in self.orphans[len(alive) + 1:] if o is not orphan]
            raise _stale(orphan, value, self.jar())
        self.orphans = alive


#: Registered by layers above (`_inline.note_inline`): called with the connection
#: before each of its commits, after the watch's own checks.
BEFORE_COMMIT: list[Any] = []

#: Plain objects held from ghosted records that a watch keeps checking.
ORPHANS_MAX = 1_000


class _Orphan:
    __slots__ = ("value", "snapshot", "oid", "accessor")

    def __init__(self, value: Any, snap: bytes, oid: bytes, accessor: str) -> None:
        self.value, self.snapshot, self.oid, self.accessor = value, snap, oid, accessor


def _plain_values(obj: Any) -> list[tuple[str, Any]]:
    """The watched plain values of a record in memory, with their accessors."""
    return [(acc, v) for acc, v in durable_children(obj) if not is_atomic(v)]


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


def check_before_commit(conn: Any) -> None:
    """Before a commit: name any value that will not pickle, while it still can be.

    Only records holding watched values can fail (everything else was checked
    on assignment), so only those are trial-pickled. After a failed commit ZODB
    has already rolled the objects back, so this is the last moment to say which
    value it was. Reads ZODB's private lists of changed and added objects
    (`changed_objects`).
    """
    ensure_zones()  # before any trial pickling below (see `_zones`)
    changed = changed_objects(conn)
    w = _watch_of(conn)
    if w is not None:
        types = set(map(type, changed))  # in C: a comprehension runs bytecode per object
        if not types <= _LIBRARY_TYPES:
            w.noted.update(class_paths(types - _LIBRARY_TYPES))
            _LIBRARY_TYPES.update(t for t in types if t.__module__.partition(".")[0] in _LIBRARY_ROOTS)
    # After the watch's own hook, which may snapshot (and note) more values: that hook
    # registers them itself at its end, so another pass is needed only when hooks
    # added after it (in the transaction's body) run later still.
    last = None
    for last in conn.transaction_manager.get().getBeforeCommitHooks():  # noqa: B007 - the last one
        pass
    if last is None or w is None or last[0] != w._before_commit:
        conn.transaction_manager.get().addBeforeCommitHook(register_pending, (conn,))
    for obj in changed:
        watched = getattr(type(obj), "_dh_watched", None)
        if watched is None or obj._p_changed is None or not watched(obj):
            continue
        try:
            snapshot_for(conn, obj.__getstate__())
        except Exception as exc:  # noqa: BLE001 - name the value that fails
            raise unpicklable_error(obj, exc) from None


#: Module roots whose classes are never registered (`_registry.note_class`: the
#: library's and ZODB's family's, which no program can be named after), and the
#: types of changed records from them met so far: `check_before_commit` skips them.
_LIBRARY_ROOTS = frozenset({"durable_heap", "BTrees", "persistent", "ZODB"})
_LIBRARY_TYPES: set[type] = set()


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


class _WatchedSavepoint:
    """A transaction's savepoint that the watch takes part in (`_savepoint`).

    ZODB's savepoint stores the records marked changed, and its rollback reloads
    those changed since; a plain value changed in place is in neither (nothing marks
    its record), and the per-transaction read caches know nothing of either. So:

    * **At the savepoint** (`_savepoint`), records changed in place so far are marked changed (as
      before a commit), so that their connection joins the transaction and the
      savepoint stores them; their saved state is then their snapshot (ZODB's store
      calls ``__getstate__`` on a changed record).
    * **At the rollback**, records changed in place since (their snapshot differs)
      are turned into ghosts first, so they load again as they were at the
      savepoint (or as stored); then ZODB's rollback; then the read caches go.
    """

    __slots__ = ("inner", "watches")

    def __init__(self, inner: Any, watches: list[_Watch]) -> None:
        self.inner, self.watches = inner, watches

    @property
    def valid(self) -> bool:
        return bool(self.inner.valid)

    def rollback(self) -> None:
        for w in self.watches:
            _ghost_changed_in_place(w)
        self.inner.rollback()
        for w in self.watches:
            w.forget_reads()


def _mark_changed_in_place(w: _Watch) -> None:
    """Mark the watched records whose plain values were changed in place as changed."""
    for obj, base in list(w.items.values()):
        if obj._p_changed is False and _changed_in_place(obj, base) is not None:
            obj._p_changed = True


def _ghost_changed_in_place(w: _Watch) -> None:
    """Turn the watched records whose plain values were changed in place into ghosts:
    loaded again, as the storage (or the savepoint) has them, and watched again."""
    changed = [key for key, (obj, base) in w.items.items() if _changed_in_place(obj, base) is not None]
    if changed:
        w.ghost([w.items.pop(key)[0] for key in changed])


# -- PROTECTED: transaction's Transaction.savepoint, replaced on the class (once, here),
# and its ``_synchronizers`` (the manager's weak set, with ``map``), where a connection's
# `_Watch` is registered: a savepoint of a transaction with watched connections marks
# their in-place changes first and returns a `_WatchedSavepoint`; any other's is the
# original's. Found at the savepoint, not noted at each begin: anything stored on the
# transaction there cost about 15k instructions a commit (measured with callgrind).
# tests/test_zodb_internals.py pins both. --
_TRANSACTION_SAVEPOINT = Transaction.savepoint


def _savepoint(txn: Any, optimistic: bool = False) -> Any:
    """``Transaction.savepoint`` with the watches of its connections (`_WatchedSavepoint`)."""
    watches: list[_Watch] = []
    txn._synchronizers.map(lambda s: watches.append(s) if type(s) is _Watch and s.hooked is txn else None)
    if not watches:
        return _TRANSACTION_SAVEPOINT(txn, optimistic)
    for w in watches:
        _mark_changed_in_place(w)
    return _WatchedSavepoint(_TRANSACTION_SAVEPOINT(txn, optimistic), watches)


Transaction.savepoint = _savepoint  # type: ignore[method-assign]


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
    records += changed_objects(jar)
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
    # Trap: ``__getstate__`` is not only ZODB storing the record. A copy, a pickle or
    # a check (`changed_path`) calls it too, on a record that is not marked changed
    # (``_p_changed`` False) although a plain value in it was changed in place: taking
    # that state as the new snapshot would make the commit find nothing changed, and
    # the change would be silently lost. The snapshot of such a record stays; ZODB
    # stores only records marked changed (True) or new (not watched yet), and a load
    # runs ``__setstate__`` with ``_p_changed`` True.
    old = w.items.get(id(obj))
    if old is not None and old[0] is obj and obj._p_changed is False:
        return
    tm = w.tm
    w.items[id(obj)] = (obj, snapshot_for(jar, state))
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
    changed = list(jar._registered_objects)  # PROTECTED ZODB internal, see `changed_objects`
    if changed:
        return path_of(changed[0])
    w = jar.__dict__.get("_dh_watch")
    for obj, base in list(w.items.values()) if w is not None else ():
        path = _changed_in_place(obj, base)
        if path is not None:
            return path
    return None


def changed_path(jar: Any) -> str | None:
    """The path of an object changed (or added) in `jar`'s transaction so far, or None:
    ZODB's lists of them (`changed_objects`), then the watched records' snapshots (a
    plain object changed in place is in neither until the watch finds it before the
    commit, see `view_changes`)."""
    changed = changed_objects(jar)
    return path_of(changed[0]) if changed else view_changes(jar)


def _changed_in_place(obj: Any, base: bytes) -> str | None:
    """The path of the plain value of watched record `obj` changed in place since its
    snapshot `base` was taken, or None (unchanged, saved anyway, or a ghost again)."""
    if obj._p_changed is not False:
        return None
    try:
        same = snapshot(obj.__getstate__()) == base
    except Exception:  # noqa: BLE001 - changed into something unpicklable
        same = False
    if same:
        return None
    plain = _plain_values(obj)
    return path_of(obj) + (plain[0][0] if len(plain) == 1 else "")


def watched_records(jar: Any) -> frozenset[int]:
    """Ids of the records `jar`'s watch holds now (to leave to `changed_outside` later)."""
    w = jar.__dict__.get("_dh_watch")
    return frozenset(w.items) if w is not None and w.items else frozenset()


def changed_outside(jar: Any, keep: frozenset[int] = frozenset()) -> str | None:
    """The path of a plain value changed in place outside any transaction, or None.

    A plain object (a dataclass) cannot refuse a change as durable objects do
    (`check_writable`): one read from state outside a transaction and changed
    there would be saved by the next transaction of the thread, which the watch
    hooks (concepts.md says so). A workflow body must not change state at all
    (`durable_heap._workflows`): before each transaction begun in one, this finds
    such a change by its record's snapshot and drops it, ghosting the record (the
    next read loads it afresh), so that no commit can save it. `keep`: ids of
    records watched before (`watched_records`), not looked at.
    """
    w = jar.__dict__.get("_dh_watch")
    if w is None or not w.items:  # the common case: nothing read outside a transaction
        return None
    found = None
    for key, (obj, base) in list(w.items.items()):
        if key in keep:
            continue
        path = _changed_in_place(obj, base)
        if path is not None:
            found = found or path
            del w.items[key]
            obj._p_invalidate()
    return found


# -- PROTECTED: ZODB's private Connection attributes we read ----------------------------------
# (ZODB 6: ``ZODB.Connection.Connection.__init__``; tests/test_zodb_internals.py pins them.)
# Read directly, never through ``getattr`` defaults: were ZODB to rename them, a
# default would silently switch the checks off (`check_before_commit` would name no value,
# `watched_plain_ids` would miss records); an AttributeError fails loudly instead.


def changed_objects(conn: Any) -> list[Any]:
    """The objects of the transaction in progress on `conn` that its commit will store.

    ``Connection._registered_objects``: the loaded objects marked changed (a
    list); ``Connection._added``: the new ones (oid -> object) added to it.
    """
    return [*conn._registered_objects, *conn._added.values()]
