"""The ZODB, ZEO, transaction and BTrees internals durable_heap relies on, pinned.

Each use sits under a ``# -- PROTECTED: ... --`` banner in the package (or in a
docstring that says which internal it reads). Several are read through
``getattr(..., default)`` or inside a ``try``, so a rename upstream would not
fail there: it would silently switch a guard off (``precheck`` would check
nothing, a fault's outcome would always read "unknown"). This file fails
instead, naming what moved: when it does, fix the use and its banner, then this.

Checked on real objects where that is cheap (a FileStorage in a temporary
folder, a ZEO server), on signatures and sources where the use is an override.
"""

from __future__ import annotations

import inspect
import io
import sys
from pathlib import Path
from typing import Any

import BTrees.OOBTree
import persistent.mapping
import pytest
import transaction
import transaction._transaction
import ZODB
import ZODB.ConflictResolution
import ZODB.Connection
import ZODB.DB
import ZODB.FileStorage
import ZODB.serialize
from ZODB.Connection import TransactionMetaData

from durable_heap.testing import ZeoServer

FS_MODULE = sys.modules["ZODB.FileStorage.FileStorage"]  # the package shadows the module's name


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


@pytest.fixture
def db(tmp_path: Path) -> Any:
    """Raw ZODB on a real FileStorage (ZODB's own classes, as upstream ships them)."""
    database = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "raw.fs")))
    try:
        yield database
    finally:
        database.close()


# --- ZODB.Connection and ZODB.DB (used by _heap, _values, _integrity, _allow) ----------------


def test_connection_change_lists(db: Any) -> None:
    """``_values.precheck``, ``watched_plain_ids``, ``culprit`` and ``_requests.changed_in``
    (the middlewares' read-only check) read these two lists;
    a rename would make precheck check nothing, silently."""
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(tm)
    tm.begin()
    root = conn.root()
    assert conn._registered_objects == []
    root["n"] = 1  # a change registers the root
    assert isinstance(conn._registered_objects, list) and conn._registered_objects[0] is root
    new = persistent.mapping.PersistentMapping()
    conn.add(new)  # an object added in this transaction
    assert isinstance(conn._added, dict) and conn._added[new._p_oid] is new
    tm.abort()
    conn.close()


def test_connection_pool_and_release(db: Any) -> None:
    """``Heap._discard`` takes a connection out of ``db.pool.all`` under ``db._lock``,
    ghosts its cache (``_cache.cache_data``, ``invalidate``), releases it
    (``_release_resources``) and clears ``opened``; ``_drop_cache`` calls ``_resetCache``."""
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(tm)
    assert conn in db.pool.all and hasattr(db.pool.all, "discard")
    with db._lock:
        pass
    assert conn.opened is not None
    tm.begin()
    conn.root()["x"] = persistent.mapping.PersistentMapping()
    tm.commit()
    cache = conn._cache
    assert len(list(cache.cache_data)) >= 1
    cache.invalidate(list(cache.cache_data))
    assert _params(ZODB.Connection.Connection._release_resources) == ["self"]
    assert callable(conn._resetCache)
    # The pool evicts connections the way _discard copies.
    assert "_release_resources()" in inspect.getsource(sys.modules["ZODB.DB"])
    # close() skips the pool and the cache for a connection whose `opened` is None.
    assert "self.opened" in inspect.getsource(ZODB.Connection.Connection.close)
    conn.close()


def test_new_transaction_and_storage_attributes(db: Any) -> None:
    """``Heap.state`` calls the synchronizer hook ``newTransaction(None)`` outside a
    transaction (what a transaction manager's ``begin`` calls; ``sync()`` would begin
    an explicit manager's transaction); `CheckedConnection` reads ``_storage``,
    ``_reader.getState``, ``_db`` and ``before``."""
    assert _params(ZODB.Connection.Connection.newTransaction)[:3] == ["self", "transaction", "sync"]
    assert ".newTransaction(" in inspect.getsource(sys.modules["transaction._manager"])
    conn = db.open(transaction.TransactionManager(explicit=True))
    conn.newTransaction(None)
    assert conn._db is db and conn.before is None
    assert isinstance(conn._reader, ZODB.serialize.ObjectReader)
    data, _ = conn._storage.load(b"\0" * 8)
    assert isinstance(conn._reader.getState(data), dict)
    conn.close()


def test_db_klass_and_the_load_hooks() -> None:
    """`_allow.DB` and `_integrity.CheckedDB` set ``DB.klass``; their connections
    override ``setstate`` and ``get``; `_allow` filters ZODB's failed-load log line."""
    assert ZODB.DB.klass is ZODB.Connection.Connection
    assert "self.klass(" in inspect.getsource(ZODB.DB.open)
    assert {"setstate", "get"} <= set(vars(ZODB.Connection.Connection))
    assert _params(ZODB.Connection.Connection.setstate) == ["self", "obj"]
    assert _params(ZODB.Connection.Connection.get) == ["self", "oid"]
    assert "Couldn't load state" in inspect.getsource(ZODB.Connection.Connection.setstate)


def test_object_writer_internals_of_fastpickle(db: Any) -> None:
    """`_fastpickle.speed_up` replaces ``_dump`` on an ObjectWriter that
    ``Connection._store_objects`` gets, and swaps its pickler's ``persistent_id``."""
    assert _params(ZODB.Connection.Connection._store_objects) == ["self", "writer", "transaction"]
    assert "self._store_objects(ObjectWriter(obj), transaction)" in inspect.getsource(
        ZODB.Connection.Connection._commit)
    assert "writer.serialize(obj)" in inspect.getsource(ZODB.Connection.Connection._store_objects)
    assert _params(ZODB.serialize.ObjectWriter._dump) == ["self", "classmeta", "state"]
    assert "self._dump(meta, obj.__getstate__())" in inspect.getsource(ZODB.serialize.ObjectWriter.serialize)
    conn = db.open()
    try:
        obj = conn.root()
        writer = ZODB.serialize.ObjectWriter(obj)
        assert writer._p.persistent_id == writer.persistent_id
        table: dict[Any, Any] = {}
        writer._p.persistent_id = table.get  # a C callable is accepted
        assert writer._p.persistent_id == table.get
    finally:
        conn.close()


def test_object_reader_internals_of_fastpickle(db: Any) -> None:
    """`_fastpickle.BufferedObjectReader` overrides ``ObjectReader._get_unpickler`` (a copy
    of ZODB's with a buffered stream); `_allow.Connection` sets it as the class of the
    ``_reader`` that ``Connection.__init__`` makes; every load goes through it."""
    import ZODB.serialize

    from durable_heap._fastpickle import BufferedObjectReader

    source = inspect.getsource(ZODB.serialize.ObjectReader._get_unpickler)
    for part in ("file = BytesIO(pickle)", "factory = self._factory", "conn = self._conn",
                 "return factory(conn, modulename, name)",
                 "PersistentUnpickler(\n            find_global, self._persistent_load, file)"):
        assert part in source, part
    assert _params(ZODB.serialize.ObjectReader.__init__)[:4] == ["self", "conn", "cache", "factory"]
    assert "self._reader = ObjectReader(self, self._cache, self._db.classFactory)" in inspect.getsource(
        ZODB.Connection.Connection.__init__)
    for method in ("getClassName", "getGhost", "getState"):
        source = inspect.getsource(getattr(ZODB.serialize.ObjectReader, method))
        assert "self._get_unpickler(pickle)" in source, method
    assert "self.getState(pickle)" in inspect.getsource(ZODB.serialize.ObjectReader.setGhostState)
    conn = db.open()
    try:
        assert type(conn._reader) is ZODB.serialize.ObjectReader  # ZODB's own connection: unchanged
        conn._reader.__class__ = BufferedObjectReader
        root = conn._storage.load(b"\0" * 8)[0]
        assert conn._reader.getClassName(root) == "persistent.mapping.PersistentMapping"
    finally:
        conn.close()


def test_pickler_and_unpickler_of_zodb_compat() -> None:
    """`_allow` pickles and reads records with ZODB's own (zodbpickle) classes."""
    from ZODB._compat import PersistentPickler, PersistentUnpickler

    buf = io.BytesIO()
    PersistentPickler(lambda obj: None, buf, 3).dump(BTrees.OOBTree.OOBTree)
    buf.seek(0)
    found = PersistentUnpickler(lambda module, name: f"{module}.{name}", lambda ref: ref, buf).load()
    assert found == "BTrees.OOBTree.OOBTree"


def test_conflict_resolution_hooks() -> None:
    """`_allow.guard_conflicts` replaces ``tryToResolveConflict`` per instance (storages
    call it on themselves) and reads records through ``_crs_untransform_record_data``;
    `_containers` matches ``PersistentReference`` by class name."""
    crs = ZODB.ConflictResolution.ConflictResolvingStorage
    assert callable(crs.tryToResolveConflict) and callable(crs._crs_untransform_record_data)
    assert "self.tryToResolveConflict(" in inspect.getsource(FS_MODULE.FileStorage.store)
    assert ZODB.ConflictResolution.PersistentReference.__name__ == "PersistentReference"


# --- transaction (used by _heap via _errormap.outcome_unknown, and by _values) ----------------


def test_transaction_status_values() -> None:
    """`_values` imports ``Status`` from ``transaction._transaction`` and compares
    ``txn.status`` with ``Status.COMMITTED``."""
    status = transaction._transaction.Status
    assert {"ACTIVE", "COMMITTING", "COMMITTED", "DOOMED", "COMMITFAILED"} <= set(vars(status))
    tm = transaction.TransactionManager(explicit=True)
    txn = tm.begin()
    assert txn.status == status.ACTIVE
    tm.commit()
    assert txn.status == status.COMMITTED


def test_the_transactions_savepoint_is_the_watchs() -> None:
    """`_watch` replaces ``Transaction.savepoint`` on the class, and the transaction
    manager's ``savepoint()`` must go through it: were the manager to make savepoints
    another way, the watch would take no part in them (in-place changes surviving a
    rollback). A transaction with no watched connection gets the original's savepoint."""
    import durable_heap._watch as watch

    assert transaction._transaction.Transaction.savepoint is watch._savepoint
    tm = transaction.TransactionManager(explicit=True)

    class Synch:
        def newTransaction(self, txn: Any) -> None: ...  # noqa: N802 - transaction's names
        def beforeCompletion(self, txn: Any) -> None: ...  # noqa: N802
        def afterCompletion(self, txn: Any) -> None: ...  # noqa: N802

    synch = Synch()
    tm.registerSynch(synch)
    txn = tm.begin()
    seen: list[Any] = []
    txn._synchronizers.map(seen.append)  # where `_savepoint` finds the connections' watches
    assert seen == [synch]
    assert type(tm.savepoint()).__name__ == "Savepoint"  # transaction's own: no watch in it
    tm.abort()


class _Resource:
    """A data manager that looks at the transaction's vote book as it finishes."""

    def __init__(self, tm: Any) -> None:
        self.transaction_manager = tm
        self.seen: tuple[bool, bool] | None = None

    def sortKey(self) -> str:  # noqa: N802 - transaction's name
        return "durable_heap-test"

    def tpc_finish(self, txn: Any) -> None:
        self.seen = (id(self) in txn._voted, self in txn._resources)

    def abort(self, txn: Any) -> None: ...
    def tpc_begin(self, txn: Any) -> None: ...
    def commit(self, txn: Any) -> None: ...
    def tpc_vote(self, txn: Any) -> None: ...
    def tpc_abort(self, txn: Any) -> None: ...


def test_transaction_vote_book() -> None:
    """`_errormap.outcome_unknown` reads ``Transaction._voted`` (id -> True) and
    ``_resources`` (a list) with defaults: a rename would make every fault "unknown"."""
    from durable_heap._errormap import outcome_unknown

    tm = transaction.TransactionManager(explicit=True)
    txn = tm.begin()
    rm = _Resource(tm)
    txn.join(rm)
    assert isinstance(txn._voted, dict) and isinstance(txn._resources, list)
    assert not outcome_unknown(txn)  # joined, not voted yet
    tm.commit()
    assert rm.seen == (True, True)


# --- FileStorage (used by _integrity, _filestorage, _follow, _storage) -------------------------


def test_filestorage_internals(tmp_path: Path) -> None:
    fs = ZODB.FileStorage.FileStorage(str(tmp_path / "app.fs"))
    try:
        db = ZODB.DB(fs)  # writes the root record
        oid = b"\0" * 8
        # The state the checked open, the follower and the failed-write fix read and move.
        assert fs._file.seekable() and fs._tfile.seekable()
        assert isinstance(fs._files, FS_MODULE.FilePool)
        assert all(callable(getattr(fs._files, m)) for m in ("write_lock", "empty", "flush", "close"))
        assert isinstance(fs._files.name, str)
        assert isinstance(fs._tfmt, FS_MODULE.TempFormatter) and isinstance(fs._tindex, dict)
        assert isinstance(fs._pos, int) and fs._pos > 4
        assert isinstance(fs._oid, bytes) and isinstance(fs._ltid, bytes)
        assert fs._ltid == fs.lastTransaction()
        assert fs._file_name == str(tmp_path / "app.fs") and fs._is_read_only is False
        assert fs._lock_file is not None
        with fs._lock:
            pos = fs._lookup_pos(oid)
            header = fs._read_data_header(pos, oid)
        assert header.oid == oid and header.tid == fs._ltid and isinstance(header.prev, int)
        index, tindex = fs._newIndexes()
        assert hasattr(index, "maxKey") and isinstance(tindex, dict)
        assert _params(FS_MODULE.FileStorage._initIndex) == ["self", "index", "tindex"]
        assert callable(fs._save_index) and callable(fs._clear_temp)
        assert _params(FS_MODULE.FileStorage.tpc_vote) == ["self", "transaction"]
        assert _params(FS_MODULE.FilePool.__init__) == ["self", "file_name"]
        assert _params(FS_MODULE.TempFormatter.__init__) == ["self", "afile"]
        db.close()
    finally:
        fs.close()


def test_filestorage_open_sequence_and_scan() -> None:
    """The constructor asks ``_restore_index`` for the index, then ``read_index`` scans
    after it (`CheckedFileStorage` hooks the first); `_follow` calls ``read_index``
    with these keywords; FileStorage files start with ``packed_version``."""
    init = inspect.getsource(FS_MODULE.FileStorage.__init__)
    assert "self._restore_index()" in init and init.index("_restore_index") < init.index("read_index(")
    assert _params(FS_MODULE.FileStorage._restore_index) == ["self"]
    assert _params(FS_MODULE.read_index)[:4] == ["file", "name", "index", "tindex"]
    assert {"start", "ltid", "read_only"} <= set(_params(FS_MODULE.read_index))
    assert FS_MODULE.packed_version in (b"FS30", b"FS21")
    # _storage quiets this one log line by its format string.
    assert '"Ignoring index for %s"' in inspect.getsource(FS_MODULE)


# --- ZEO (used by _zeo._client_class and _zeo_server) --------------------------------------------


def test_client_storage_overrides_match() -> None:
    """`_zeo._client_class` overrides ``notify_connected(conn, info)`` and
    ``tpc_abort(txn, timeout)``, and reads ``_oids`` (the prefetched oids, used by
    ``new_oid``) and the connection generation recorded by ``tpc_begin``."""
    import ZEO.asyncio.client
    import ZEO.ClientStorage
    import ZEO.TransactionBuffer

    cs = ZEO.ClientStorage.ClientStorage
    assert _params(cs.notify_connected) == ["self", "conn", "info"]
    assert _params(cs.tpc_abort) == ["self", "txn", "timeout"]
    assert _params(cs.tpc_end) == ["self", "txn"]
    assert "self._oids" in inspect.getsource(cs.new_oid)
    assert "connection_generation" in inspect.getsource(cs.tpc_begin)
    assert ".notify_connected(" in inspect.getsource(ZEO.asyncio.client)
    assert _params(ZEO.TransactionBuffer.TransactionBuffer.__init__) == ["self", "connection_generation"]


@pytest.mark.slow
def test_client_storage_state_on_a_live_server(zeo_server: ZeoServer) -> None:
    """The same on a connected client: the list it prefetches into, and a transaction
    buffer that records the generation of the connection it began on."""
    import durable_heap as dh
    from durable_heap._zeo import _client_class

    with dh.open(zeo_server.url) as heap:
        storage = heap.db.storage
        assert type(storage) is _client_class()
        assert isinstance(storage._oids, list)
        assert isinstance(storage._connection_generation, int)
        meta = TransactionMetaData()
        storage.tpc_begin(meta)
        buf = meta.data(storage)
        assert buf.connection_generation == storage._connection_generation
        storage.tpc_abort(meta)


def test_storage_server_acceptor() -> None:
    """`_zeo_server.run_server` reads the bound address and the event loop from
    ``StorageServer.acceptor``."""
    from ZEO.StorageServer import StorageServer
    from ZODB.MappingStorage import MappingStorage

    server = StorageServer(("127.0.0.1", 0), {"1": MappingStorage()})
    try:
        host, port = server.acceptor.addr[:2]
        assert host == "127.0.0.1" and port > 0
        assert callable(server.acceptor.event_loop.add_signal_handler)
        assert callable(server.loop)
    finally:
        server.close()


def test_conflict_resolution_steps_the_guards_resolver_repeats() -> None:
    """`_allow._resolve_checked` is ZODB's ``tryToResolveConflict`` step by step (with
    each global checked as it is unpickled): the steps it repeats are these."""
    import ZODB._compat

    source = inspect.getsource(ZODB.ConflictResolution.tryToResolveConflict)
    for step in ("newpickle = self._crs_untransform_record_data(newpickle)",
                 "find_global, prfactory.persistent_load, file)",
                 "klass = find_global(*klass)", "if klass in _unresolvable:",
                 "inst = klass.__new__(klass, *newargs)", "resolve = inst._p_resolveConflict",
                 "oldData = self.loadSerial(oid, oldSerial)",
                 "committedData = self.loadSerial(oid, committedSerial)",
                 "resolved = resolve(old, committed, newstate)",
                 "pickler = PersistentPickler(persistent_id, file, _protocol)",
                 "pickler.dump(meta)", "pickler.dump(resolved)",
                 "return self._crs_transform_record_data(file.getvalue())",
                 "except (ConflictError, BadClassName) as e:",
                 "raise ConflictError(oid=oid, serials=(committedSerial, oldSerial),"):
        assert step in source, step
    state = inspect.getsource(ZODB.ConflictResolution.state)
    assert "p = self._crs_untransform_record_data(p)" in state and "unpickler.load()  # skip" in state
    assert ZODB.ConflictResolution.ConflictResolvingStorage.tryToResolveConflict is (
        ZODB.ConflictResolution.tryToResolveConflict)
    assert ZODB._compat._protocol == 3
    ref = ZODB.ConflictResolution.PersistentReference((b"\0" * 8, None))
    assert ZODB.ConflictResolution.persistent_id(ref) is ref.data
    assert ZODB.ConflictResolution.persistent_id(1) is None


def test_filestorage_store_and_finish_as_recent_revisions_uses_them() -> None:
    """`_revisions.RecentRevisions` keeps what ``store`` wrote as the revision of ``_tid``
    (the merge when the oid was appended to ``_resolved``) once ``_finish(tid, ...)``
    ran: the internals it reads are these."""
    store = inspect.getsource(ZODB.FileStorage.FileStorage.store)
    for step in ("data = self.tryToResolveConflict(oid, committed_tid,", "self._resolved.append(oid)",
                 "new = DataHeader(oid, self._tid, old, pos, 0, len(data))", "self._tfile.write(data)"):
        assert step in store, step
    finish = inspect.getsource(ZODB.FileStorage.FileStorage._finish)
    assert "def _finish(self, tid, u, d, e):" in finish and "self._finish_finish(tid)" in finish
    tpc_finish = inspect.getsource(ZODB.FileStorage.FileStorage.tpc_finish)
    assert "with self._lock:" in tpc_finish and "tid = self._tid" in tpc_finish
    assert "self._finish(tid, *self._ude)" in tpc_finish
