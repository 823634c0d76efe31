"""Group commit for FileStorage: one fsync makes many concurrent commits durable.

ZODB's FileStorage fsyncs every transaction inside ``tpc_finish``, holding its
commit lock (and its file pool's write lock, which stops every load) across the
fsync, so N threads commit at most once per fsync between them. Here
``_finish_finish`` only flushes the transaction to the OS; once the locks are
released, each committer waits until some fsync has covered its transaction. The
first to find no fsync running becomes the leader: it fsyncs everything written so
far (its own transaction and every one that finished meanwhile) while the next
transactions are written, then wakes the ones it covered. The file format is
FileStorage's, byte for byte: existing heaps use it, and a heap written with it
opens without it.

The contract (docs/performance.md, "Group commit"):

* **Acknowledged means fsynced.** ``tpc_finish`` (so ``transaction.commit()``, a
  ``heap.transaction()`` block, an action) returns only after ``os.fsync`` of the
  data file returned for a range that includes the transaction. SIGKILL loses only
  the page cache of a process the kernel survives, so it loses nothing written;
  a power loss loses only what was never fsynced, which was never acknowledged.
* **Durable before visible.** A commit's invalidations reach the other connections
  of the process, and ``lastTransaction()`` moves to it, only once it is durable:
  the leader delivers them after its fsync, in commit order (ZODB's order: the
  invalidations, then the last transaction id). So no connection reads, and no
  answer can show, a commit that a power loss could still take back. The next
  committer does see it at once where it must: FileStorage's index (conflict
  detection, ``loadSerial`` for conflict resolution) is updated under the commit
  lock as before, so a commit that would overwrite it gets a ConflictError (a
  retry, or a merge by ``_p_resolveConflict``), never a lost update. A process
  that reads the same file (`durable_heap._follow`) sees what the OS has been
  given, as with ZODB's own FileStorage during its fsync.
* **A failed fsync fails every waiter.** The file's durable state is unknown then:
  every transaction the failed fsync was to cover raises the OSError (its outcome
  is unknown), the storage is closed (as ZODB's ``_finish`` closes it), and every
  later commit fails; the heap layer reports that the heap must be opened again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ZODB.FileStorage import FileStorage as _ZFileStorage

from ._waits import _waits

__all__ = ["GroupCommitFileStorage"]

logger = logging.getLogger("durable_heap.groupcommit")

_Callback = Callable[[bytes], Any]


# -- PROTECTED: ZODB.FileStorage.FileStorage internals (ZODB 6.4) --
# ``tpc_finish`` calls ``f(tid)`` (the invalidations) under ``_files.write_lock()``
# and ``_lock``, then ``_finish``, which writes the status byte and calls
# ``_finish_finish`` (flush, fsync, then ``_pos``, ``_index``, ``_ltid``,
# ``_blob_tpc_finish``), and releases ``_commit_lock``; ``_nextpos`` and ``_tindex``
# hold the finished transaction's end and records; ``_file`` is the data file
# (replaced by pack and by `_filestorage`'s recovery: hence the fsync of a dup of
# its descriptor, taken under ``_lock``). ``lastTransaction()`` reads ``_ltid``.
# ``pack`` calls the static ``packer(storage, referencesf, stop, gc)``, which returns
# holding the commit lock with ``NAME.pack`` written and closed, then renames it.
# tests/test_group_commit.py (test_the_zodb_internals_group_commit_relies_on) pins them.
class GroupCommitFileStorage(_ZFileStorage):  # type: ignore[misc]
    """FileStorage whose concurrent commits share one fsync (see the module)."""

    _file: Any
    _lock: Any
    _ltid: bytes
    _pos: int
    _nextpos: int
    _index: Any
    _tindex: dict[bytes, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # All under _dh_cond: _dh_finished counts the transactions flushed to the OS
        # (numbered in commit order), _dh_synced those covered by a finished fsync;
        # _dh_pending holds (number, tid, invalidation callback) of each flushed
        # transaction not yet delivered; _dh_leading is True while a leader fsyncs;
        # _dh_failed is the OSError of a failed fsync (every later wait raises it).
        # _dh_lock is _dh_cond's own lock: ``with self._dh_lock`` is the same mutual
        # exclusion without Condition's Python-level __enter__/__exit__ (the hot path
        # takes it twice per commit); _dh_waiting counts the threads in _dh_cond.wait(),
        # so that a leader wakes no one (notify_all costs three Python calls) when no
        # one waits.
        self._dh_lock = threading.Lock()
        self._dh_cond = threading.Condition(self._dh_lock)
        self._dh_waiting = 0
        self._dh_finished = 0
        self._dh_synced = 0
        self._dh_pending: collections.deque[tuple[int, bytes, _Callback | None]] = collections.deque()
        self._dh_leading = False
        self._dh_failed: OSError | None = None
        self._dh_closed = False
        # The dup of the data file's descriptor that the leader fsyncs, the file
        # object it was taken from and its inode (only the leader touches these, and
        # close once no leader runs).
        self._dh_fd = -1
        self._dh_fd_of: Any = None
        self._dh_ino = -1
        # A data file this open creates: its folder is fsynced with the first commit.
        name = args[0] if args else kwargs.get("file_name", "")
        self._dh_created = bool(kwargs.get("create")) or not os.path.exists(name)
        # The invalidation callback, the waiter's slot and whether it may lead, of the
        # transaction being finished: set by `defer` (in `tpc_finish_nowait`) and used
        # by `_finish_finish`, both under the locks.
        self._dh_callback: tuple[_Callback | None, list[Any], bool] | None = None
        # The tid of the last transaction written (None: none since the open).
        self._dh_written: bytes | None = None
        super().__init__(*args, **kwargs)

    # -- IStorage: the commit ---------------------------------------------------------------

    def tpc_finish(self, transaction: Any, f: _Callback | None = None) -> Any:
        """Finish the transaction and return its tid once it is durable (see the module).

        The single committer's fast path: a transaction written while no fsync runs
        and none waits takes the lead already in `_finish_finish` (under the locks),
        and fsyncs here, after the locks are released, with no wait on the
        condition: the same steps as a leader found in `_wait_durable`, for the
        commit of one thread at a time (`_lead`).
        """
        tid, slot = self._finish_nowait(transaction, f, True)
        if slot:
            hooks = _waits.hooks
            if hooks is not None:
                hooks[0]()  # e.g. this thread's CPU slot, free while it waits (`durable_heap._waits`)
            try:
                if slot[1]:
                    self._lead()
                else:
                    self._wait_durable(slot[0])
            finally:
                if hooks is not None:
                    hooks[1]()
        return tid

    def tpc_finish_nowait(self, transaction: Any, f: _Callback | None = None) -> tuple[bytes, int]:
        """Finish the transaction without waiting for its fsync: ``(tid, number)``.

        The commit lock is released on return; the transaction is durable once
        ``wait_durable(number)`` returned, and ``f(tid)`` is called then, in commit
        order, by whichever thread ran the fsync that covered it (never if that
        fsync failed). The ZEO server (`durable_heap._zeo_pipeline`) answers its
        client from `f` and runs `wait_durable` off its event loop.
        """
        tid, slot = self._finish_nowait(transaction, f, False)
        # Finished (FileStorage raised otherwise); no slot: nothing to wait for.
        return tid, slot[0] if slot else 0

    def _finish_nowait(
        self, transaction: Any, f: _Callback | None, may_lead: bool
    ) -> tuple[bytes, list[Any]]:
        """FileStorage's tpc_finish with `f` deferred: ``(tid, [number, leads])``,
        or an empty list if the transaction was not finished (FileStorage raised)."""
        slot: list[Any] = []

        def defer(tid: bytes) -> None:
            # Called by FileStorage under its locks, where it would invalidate.
            self._dh_callback = (f, slot, may_lead)

        try:
            tid = super().tpc_finish(transaction, defer)
        except BaseException:
            if slot and slot[1]:  # written, then FileStorage raised: give the lead back
                self._dh_callback = None
                with self._dh_lock:
                    self._dh_leading = False
                    if self._dh_waiting:
                        self._dh_cond.notify_all()
            raise
        return tid, slot

    def wait_durable(self, number: int) -> None:
        """Return once transaction `number` (from `tpc_finish_nowait`) is durable.

        Raises the OSError of a failed fsync that was to cover it (the storage is
        closed then), or OSError if the storage was closed before its fsync.
        """
        self._wait_durable(number)

    #: Whether `tpc_abort` waits for the commits written before it to be visible. The
    #: ZEO server (`durable_heap._zeo_pipeline`) turns it off: there the abort runs on
    #: the event loop, which the wait would stop for an fsync, and a ZEO client's retry
    #: starts from the invalidations it receives, not from this storage's snapshot.
    abort_waits = True

    def tpc_abort(self, transaction: Any) -> None:
        """Abort; then wait until the commits written before are visible.

        A transaction aborted in the storage is most often one that hit a conflict
        (``store``: a ConflictError, unless ``_p_resolveConflict`` merged it) with a
        commit that may not be durable, so not visible, yet: its retry would start
        from the same snapshot and conflict again. Waiting here (the commit lock is
        released: about one fsync) gives the retry a snapshot that includes it.
        """
        mine = transaction is self._transaction  # only we can change it: we hold the commit lock
        super().tpc_abort(transaction)
        if mine and self.abort_waits:
            with self._dh_lock:
                target = self._dh_finished
            with contextlib.suppress(OSError):  # a failed fsync: every later commit fails anyway
                self._wait_durable(target)

    def _finish_finish(self, tid: bytes) -> None:
        # FileStorage's, without the fsync and with the last transaction id left to
        # the leader. Flush first: a failed flush is a failed _finish (closed).
        self._file.flush()
        self._pos = self._nextpos
        self._index.update(self._tindex)
        self._blob_tpc_finish()
        callback, slot, may_lead = self._dh_callback or (None, [], False)
        self._dh_callback = None
        self._dh_written = tid
        with self._dh_lock:
            self._dh_finished += 1
            self._dh_pending.append((self._dh_finished, tid, callback))
            # The lead, if no fsync runs (nor failed, nor the storage closed): the
            # committer fsyncs once the locks are released (`tpc_finish`, `_lead`).
            lead = may_lead and not self._dh_leading and self._dh_failed is None and not self._dh_closed
            if lead:
                self._dh_leading = True
            slot += (self._dh_finished, lead)

    def last_written(self) -> bytes:
        """The id of the last transaction written, durable or not: no record in the
        file is later (`durable_heap._integrity` checks loads against it)."""
        # No lock: it is read on loads, while committers hold _lock through conflict
        # resolution; both attributes only move forward, each read is atomic.
        w, last = self._dh_written, self._ltid
        return w if w is not None and w > last else last

    @staticmethod
    def packer(storage: Any, referencesf: Any, stop: Any, gc: Any) -> Any:
        """FileStorage's packer; then the packed copy is fsynced, before pack renames it
        over the file (and its transactions, some acknowledged by an fsync of the old
        file only, become the heap's).

        ZODB trap: FileStorage's pack renames ``NAME.pack`` over the file without an
        fsync of it: a power loss after a rename that reached the disk could leave a
        file whose data never did. The packer returns holding the commit lock, with
        everything copied and the copy closed: nothing is written in between.
        """
        r = _ZFileStorage.packer(storage, referencesf, stop, gc)
        if r is not None:
            _fsync_path(storage._file_name + ".pack")
        return r

    def pack(self, *args: Any, **kwargs: Any) -> Any:
        # The packed file replaced the data file: the next fsync (here) is of the new
        # file and of its folder (`_sync`), so that the rename is durable too.
        r = super().pack(*args, **kwargs)
        with self._dh_cond:
            self._dh_finished += 1  # a pseudo-transaction: the packed file itself
            target = self._dh_finished
        self._wait_durable(target)
        return r

    def close(self) -> None:
        # Make durable what was written (each waiter then returns), then close.
        with self._dh_cond:
            target = self._dh_finished
            failed = self._dh_failed is not None or self._dh_closed
        # ZODB trap: after a failed write of a transaction's status byte, ZODB's
        # `_finish` calls close() holding `_lock`, which a leader needs to deliver:
        # waiting for it here waited for ever (tests/test_finish_failure.py). The file's
        # state is unknown then: nothing more is waited for; the running leader still
        # acknowledges what its fsync covers, every other waiter fails ("closed").
        owned = getattr(self._lock, "_is_owned", None)  # threading.RLock's
        if owned is not None and owned():
            failed = True
        if not failed and target and not self._is_read_only:
            try:
                self._wait_durable(target)
            except OSError:
                logger.exception("The last fsync before closing %s failed", self._file_name)
        with self._dh_cond:
            self._dh_closed = True
            self._dh_cond.notify_all()
            # A leader that began meanwhile (a commit written after `target`) is
            # fsyncing the descriptor: it closes it when done. Closed under its feet,
            # its fsync would fail, or fsync whatever file took the number.
            if not self._dh_leading:
                self._close_fd()
        super().close()

    def _close_fd(self) -> None:
        """Close the duplicate descriptor (under _dh_cond, no leader running)."""
        if self._dh_fd >= 0:
            os.close(self._dh_fd)
            self._dh_fd = -1

    # -- the group commit -------------------------------------------------------------------

    def _wait_durable(self, number: int) -> None:
        """Return once transaction `number` is durable, fsyncing as the leader if none is."""
        with self._dh_lock:
            while True:
                if self._dh_synced >= number:
                    return
                if self._dh_failed is not None:
                    raise _failed_again(self._dh_failed)
                if self._dh_closed:
                    raise OSError(f"{self._file_name} was closed before its fsync")
                if not self._dh_leading:
                    break
                self._dh_waiting += 1
                try:
                    self._dh_cond.wait()
                finally:
                    self._dh_waiting -= 1
            self._dh_leading = True
        self._lead()

    def _lead(self) -> None:
        """As the leader (``_dh_leading`` set by the caller): fsync everything written so
        far, deliver it in commit order, then hand the lead back and wake the waiters."""
        with self._dh_lock:
            target = self._dh_finished  # every transaction flushed so far
        try:
            self._sync()
        except OSError as exc:
            with self._dh_lock:
                self._dh_failed = exc
                self._dh_leading = False
                self._dh_pending.clear()  # never delivered: not durable
                self._dh_cond.notify_all()
            logger.critical("fsync of %s failed: closing it", self._file_name, exc_info=True)
            self.close()
            raise
        except BaseException:
            with self._dh_lock:
                self._dh_leading = False
                if self._dh_closed:
                    self._close_fd()
                self._dh_cond.notify_all()
            raise
        pending = self._dh_pending
        try:
            # Make the durable transactions visible, in commit order: invalidations,
            # then the tid. Only the leader pops (committers append, under _dh_lock).
            while pending and pending[0][0] <= target:
                _, tid, callback = pending.popleft()
                with self._lock:
                    try:
                        if callback is not None:
                            callback(tid)
                    except Exception:  # the commit is durable: deliver the others all the same
                        logger.exception("Delivering the invalidations of a durable commit failed")
                    self._ltid = tid
        finally:
            with self._dh_lock:
                self._dh_synced = max(self._dh_synced, target)
                self._dh_leading = False
                if self._dh_closed:  # closed while this fsync ran (see close)
                    self._close_fd()
                if self._dh_waiting:
                    self._dh_cond.notify_all()

    def _sync(self) -> None:
        """fsync the data file (a dup of its descriptor: pack or a recovery may replace it).

        A data file that is another file than the last one fsynced (pack renamed its
        packed copy over it), or that this open created, has its folder fsynced first:
        its name is then durable too, and no commit written to it is acknowledged
        before (an fsync of a file does not make its directory entry durable).
        """
        new_name = False
        with self._lock:
            if self._file is not self._dh_fd_of:
                fd = os.dup(self._file.fileno())
                ino = os.fstat(fd).st_ino
                if self._dh_fd >= 0:
                    os.close(self._dh_fd)
                new_name = ino != self._dh_ino if self._dh_ino != -1 else self._dh_created
                self._dh_fd, self._dh_fd_of, self._dh_ino = fd, self._file, ino
            fd = self._dh_fd
        if new_name:
            _fsync_path(os.path.dirname(self._file_name), folder=True)
        os.fsync(fd)  # looked up at each call: a test may make it fail (tests/test_group_commit.py)

# -- end PROTECTED --


def _fsync_path(path: str, *, folder: bool = False) -> None:
    """fsync a file or a folder by its path (a folder: the names in it are then durable).

    A file system that cannot fsync a folder says EINVAL (POSIX allows it): nothing
    more can be done there, and it is not a failed fsync.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # looked up at each call, as in _sync
    except OSError as exc:
        if not (folder and exc.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _failed_again(exc: OSError) -> OSError:
    """The error of a waiter whose fsync failed in another thread: the same errno."""
    again = OSError(exc.errno, exc.strerror)
    again.filename = getattr(exc, "filename", None)
    return again
