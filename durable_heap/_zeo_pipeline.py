"""The ZEO server's commits, pipelined: the fsync runs off the event loop.

ZEO's server (``ZEO.StorageServer``) runs every client's requests on one asyncio
event loop, and its ``tpc_finish`` calls the storage's ``tpc_finish`` there: with
group commit (`durable_heap._groupcommit`) that call waits for the fsync, so the
loop (every client's loads, votes and finishes) stands still for each fsync, and
no two commits ever share one. Here a commit is finished in two halves:

* **On the loop, as before:** the storage finishes the transaction
  (``tpc_finish_nowait``: written and flushed to the OS, FileStorage's index
  updated, its commit lock released) and ZEO's commit lock is released, so the
  next client's vote runs at once. The client is not answered yet.
* **Off the loop:** one thread per served storage (`_Syncer`) waits for each
  finished transaction to be durable (``wait_durable``: it runs the fsync, which
  covers every transaction finished so far). The storage then calls the
  transaction's callback, in commit order, which hands it back to the loop
  (``call_soon_threadsafe``, first in, first out): there the invalidations go to
  the other clients and then the committing client's ``tpc_finish`` answer.

So the contract of `_groupcommit` holds over ZEO:

* **Acknowledged means fsynced:** a client's ``tpc_finish`` returns only after an
  fsync that covered its transaction returned.
* **Durable before visible:** other clients receive the invalidations (and
  ``lastTransaction()`` moves) only then; a client that was answered and then
  tells another (which syncs with the server, as durable_heap's ZEO clients do
  before each transaction) finds the commit there, because the invalidations were
  written to that client's connection before the answer was written to the first.
* **A client's reads show no commit before it is durable:** ``loadBefore``
  (a ZEO client's ``load()`` asks for the revision before the largest tid; FileStorage
  already has the record in its index), ``lastTransaction`` and ``register`` (what a
  client connecting meanwhile starts from), ``getTid``, ``history`` and
  ``iterator_start`` answer from the last transaction made visible on the loop
  (`PipelinedStorageServer.visible`), as ZEO's own server would answer before the
  commit was written. ``new_oid`` and the invalidation queue that
  ``getInvalidations`` reads show nothing of a pending commit (the queue is filled
  on the loop once it is durable). What does see it: conflict detection and
  resolution on the server, as they must (no lost update), and the whole-heap scan
  ``record_iternext`` and ``undoLog``/``undoInfo`` (tools, not a transaction's
  reads); whatever is committed from them comes after the pending commit in the
  file, so an fsync that covers it covers the pending one too, and a failed one
  fails both.
* **A failed fsync fails every client waiting on it:** each gets the OSError as
  the error of its ``tpc_finish`` (so durable_heap's "may or may not have been
  committed"), and the storage closes itself, as in one process. The server then
  stops (`PipelinedStorageServer.failure`): ``durable-heap zeo`` exits non-zero, so
  that a service manager restarts it on the reopened file, instead of serving a
  closed heap that fails every commit.

``DURABLE_HEAP_ZEO_PIPELINE=0`` in the server's environment turns this off (the
fsync on the loop, as ZEO does it): for the side-by-side benchmark only
(``python -m benchmarks.serve --compare-zeo-pipeline``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from typing import Any

from ZEO.asyncio.server import Delay
from ZEO.StorageServer import StorageServer, ZEOStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import maxtid, p64, u64

__all__ = ["PipelinedStorageServer", "pipelining_enabled"]

logger = logging.getLogger("durable_heap.zeo")


def pipelining_enabled() -> bool:
    """False when ``DURABLE_HEAP_ZEO_PIPELINE=0`` (the benchmark's "before")."""
    return os.environ.get("DURABLE_HEAP_ZEO_PIPELINE", "1") != "0"


class _Syncer:
    """The thread that waits, in commit order, for each finished transaction's fsync.

    One thread is enough to group commits: while its fsync runs, the loop
    finishes more transactions, and the next ``wait_durable`` covers them all.
    """

    def __init__(self, storage: Any, name: str, on_failure: Any) -> None:
        self.storage = storage
        self.on_failure = on_failure
        self.jobs: queue.SimpleQueue[tuple[int, Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"durable-heap fsync ({name})", daemon=True)
        self.thread.start()

    def put(self, number: int, failed: Any) -> None:
        """Wait for transaction `number`; on an error call ``failed(exc)`` (in this thread)."""
        self.jobs.put((number, failed))

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            number, failed = job
            try:
                self.storage.wait_durable(number)
            except Exception as exc:  # noqa: BLE001 - the fsync's OSError, or the storage closed
                failed(exc)
                # Every later wait fails at once (the storage is closed): the server stops
                # once each client waiting was told (its error queued on the loop first).
                if self.jobs.empty():
                    self.on_failure(exc)


# -- PROTECTED: ZEO.StorageServer internals (ZEO 6.2) --
# ``ZEOStorage.tpc_finish`` (``_check_tid``, ``locked``, ``stats.commits``, the
# ``info`` message, then ``Result(tid, self._clear_transaction)``), which this
# replaces; ``_clear_transaction`` releases ZEO's commit lock (``lock_manager``)
# and forgets the transaction; ``invalidated`` holds the oids the transaction
# stored; ``StorageServer.invalidate(zs, storage_id, tid, oids)`` queues the
# invalidations to every client but `zs` through ``async_threadsafe`` (the loop's
# ``call_soon_threadsafe``: first in, first out), walking ZEO's list of
# connections, which the loop changes: so it is called on the loop only, and so
# is ``Delay.reply``; ``call_soon_threadsafe`` is the connection's.
# ``StorageServer.create_client_handler`` makes the ZEOStorage of each connection.
# A method may return a ``Delay`` (``ZEO.asyncio.server``): the loop registers it
# (``set_sender``) when it would have sent the answer, and ``reply``/``error``,
# called on the loop later, send it. ZODB trap: a ZEO client's cache refuses a
# last tid lower than one it has seen (``ClientCache.setLastTid`` raises
# ValueError), so a client must never receive a later transaction's invalidations
# before its own ``tpc_finish`` answer: answers and invalidations go out
# transaction by transaction, in commit order, from the storage's callback.
# Reads: ``ZEOStorage.setup_delegation`` (called by ``register``, which returns
# ``self.lastTransaction()``) binds ``lastTransaction`` and ``getTid`` to the
# storage's own on the instance, so they are bound again after it; ``loadBefore``
# counts ``stats.loads``; ``history`` and ``iterator_start(start, stop)`` call the
# storage's. ``acceptor.event_loop`` is the loop every connection runs on.
# tests/test_zeo_pipeline.py (test_the_zeo_internals_the_pipeline_relies_on) pins them.
class _PipelinedZEOStorage(ZEOStorage):  # type: ignore[misc]
    """ZEO's per-connection handler whose ``tpc_finish`` answers once durable."""

    server: PipelinedStorageServer

    # -- reads: from the last transaction made visible (see the module) --------------------

    def setup_delegation(self) -> None:
        super().setup_delegation()  # binds these to the storage's own, on the instance
        if self.server.syncer_for(self.storage_id) is not None:
            self.lastTransaction = self._last_visible
            self.getTid = self._get_tid

    def _last_visible(self) -> bytes:
        # Not the storage's lastTransaction(): group commit moves it in the syncer
        # thread before the loop has sent the invalidations (see `made_visible`).
        return self.server.visible[self.storage_id][0]

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:
        visible = self.server.visible.get(self.storage_id)
        if visible is None:
            return super().loadBefore(oid, tid)
        self.stats.loads += 1
        last, limit = visible
        r = self.storage.loadBefore(oid, limit if tid > limit else tid)
        if r is not None and r[2] is not None and r[2] > last:
            # Its next revision is a commit waiting for its fsync: to the client this
            # one is current (as ZEO's server would say before that commit was
            # written); the commit's invalidation, sent once durable, comes after
            # this answer on the connection, so the client's cache moves on then.
            r = (r[0], r[1], None)
        return r

    def _get_tid(self, oid: bytes) -> bytes:
        r = self.loadBefore(oid, maxtid)
        if r is None:
            raise POSKeyError(oid)
        return bytes(r[1])

    def history(self, oid: bytes, size: int = 1) -> Any:
        entries = super().history(oid, size)
        visible = self.server.visible.get(self.storage_id)
        if visible is None:
            return entries
        return [e for e in entries if e["tid"] <= visible[0]]

    def iterator_start(self, start: Any, stop: Any) -> Any:
        visible = self.server.visible.get(self.storage_id)
        if visible is not None and (stop is None or stop > visible[0]):
            stop = visible[0]  # FileStorage's iterator stops after the transaction `stop`
        return super().iterator_start(start, stop)

    # -- the commit -------------------------------------------------------------------------

    def tpc_finish(self, id: bytes) -> Any:  # noqa: A002 - ZEO's name
        syncer = self.server.syncer_for(self.storage_id)
        if syncer is None:  # not a group-committing storage, or turned off: ZEO's own
            return super().tpc_finish(id)
        if not self._check_tid(id):
            return None
        assert self.locked, "finished called wo lock"
        self.stats.commits += 1
        delay = Delay()
        invalidated = self.invalidated  # the next tpc_begin makes a new list
        call_soon = self.call_soon_threadsafe
        server, storage_id = self.server, self.storage_id

        def durable(tid: bytes) -> None:
            # Called in commit order by the thread whose fsync covered the transaction
            # (the syncer, or the loop's own in a tpc_abort): the rest runs on the loop.
            call_soon(visible, tid)

        def visible(tid: bytes) -> None:
            # On the loop, where ZEO keeps its lists of clients and invalidations
            # (StorageServer.invalidate walks the list that connections join and
            # leave: from another thread a client leaving could make it skip one).
            # Both are queued (first in, first out): the others' invalidations
            # go out first, then this client's answer.
            server.made_visible(storage_id, tid)  # before anything can tell of it
            server.invalidate(self, storage_id, tid, invalidated)
            call_soon(delay.reply, tid)

        def failed(exc: BaseException) -> None:
            # The fsync's OSError (group commit logged it and closed the storage), or
            # the storage closed first. A ZEO client rebuilds only ZODB's errors; any
            # other arrives as ServerException(class, args): the args carry the words.
            errno = getattr(exc, "errno", None)
            why = getattr(exc, "strerror", None) or str(exc)
            told = OSError(errno, f"{why}: the ZEO server could not make this commit durable (its "
                           "fsync failed or the heap was closed first); the server closed the heap: "
                           "fix the disk, restart the server")
            call_soon(delay.error, (OSError, told, exc.__traceback__))

        try:
            _, number = self.storage.tpc_finish_nowait(self.transaction, durable)
        except Exception as exc:
            # ZODB's _finish closed the storage ("Failure in _finish. Closing."): a failed
            # flush of the status byte. Like a failed fsync, it stops the server.
            self.server.failed(exc)
            raise
        self.async_("info", self.get_size_info())
        self._clear_transaction()  # ZEO's commit lock: the next vote may run now
        syncer.put(number, failed)
        return delay


def _abort_without_wait(storage: Any) -> None:
    """Turn off the group-commit storage's wait in ``tpc_abort`` (it runs on the loop
    here, which the wait would stop for an fsync): set on the storage itself, under
    the wrappers (`_integrity.ChecksumStorage`) that pass attribute reads through."""
    while not hasattr(type(storage), "abort_waits") and hasattr(storage, "base"):
        storage = storage.base
    if hasattr(type(storage), "abort_waits"):
        storage.abort_waits = False


class PipelinedStorageServer(StorageServer):  # type: ignore[misc]
    """ZEO's StorageServer whose commits wait for their fsync off the event loop."""

    def __init__(self, *args: Any, pipeline: bool = True, **kwargs: Any) -> None:
        # Made before ZEO's constructor: it listens (and may accept) at its end.
        self._dh_syncers: dict[str, _Syncer] = {}
        #: Per pipelined storage: (the last transaction made visible, the tid just
        #: after it). Only the loop changes it (`made_visible`), in commit order.
        self.visible: dict[str, tuple[bytes, bytes]] = {}
        #: The error that stopped the server: a failed fsync (or a failed finish),
        #: after which the storage is closed. None while it serves.
        self.failure: BaseException | None = None
        self._dh_failing = threading.Lock()
        storages = args[1] if len(args) > 1 else kwargs["storages"]
        if pipeline:
            for name, storage in storages.items():
                if hasattr(storage, "tpc_finish_nowait") and not storage.isReadOnly():
                    self._dh_syncers[name] = _Syncer(storage, name, self.failed)
                    self.made_visible(name, storage.lastTransaction())
                    _abort_without_wait(storage)
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._stop_syncers()
            raise

    def made_visible(self, storage_id: str, tid: bytes) -> None:
        """Transaction `tid` is durable and about to be told of (on the loop)."""
        self.visible[storage_id] = (tid, p64(u64(tid) + 1))

    def failed(self, exc: BaseException) -> None:
        """The storage could not make a commit durable and closed itself: stop serving
        (any thread). The clients waiting were told first: their errors are queued on
        the loop before the stop. ``durable-heap zeo`` then exits non-zero."""
        with self._dh_failing:
            if self.failure is not None:
                return
            self.failure = exc
        logger.critical("The heap could not make a commit durable (%s: %s) and was closed: "
                        "the server stops (restart it once the disk is fixed)",
                        type(exc).__name__, exc)
        acceptor = self.acceptor  # None once closed (ZEO's close drops it)
        if acceptor is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                acceptor.event_loop.call_soon_threadsafe(self.close)

    def create_client_handler(self) -> ZEOStorage:
        return _PipelinedZEOStorage(self, self.read_only)

    def syncer_for(self, storage_id: str) -> _Syncer | None:
        return self._dh_syncers.get(storage_id)

    def close(self, join_timeout: int = 1) -> None:
        # ZEO's close closes the storages, which fsync what was written (each
        # waiting transaction is then durable and its callback queued).
        try:
            super().close(join_timeout)
        finally:
            self._stop_syncers()

    def _stop_syncers(self) -> None:
        for syncer in self._dh_syncers.values():
            syncer.stop()
        self._dh_syncers = {}


# -- end PROTECTED --
