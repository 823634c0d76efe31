"""A read-only FileStorage that follows the commits of the process writing the file.

ZODB's FileStorage reads its file's index once, when it opens: opened read-only
beside a writer process, it serves the state of that moment forever (ZODB has no
feature to follow another process's appends). `FollowingFileStorage` catches up
at each transaction start instead, cheaply and without reopening:

* ZODB calls ``storage.sync()`` when a connection starts a transaction (and
  `Heap.state` does outside one). That costs one ``stat`` of the path and one
  ``fstat`` of the open file when nothing changed.
* When the file grew, only the new bytes are scanned, from the end of the last
  transaction known, with the checked scan the open makes (`_integrity.scan`,
  which does what FileStorage's `read_index` does and refuses damage). It stops
  before a transaction still being written (status ``c``, or shorter than its
  header says) and resumes there next time, so only whole, committed
  transactions are seen.
* The changed oids are passed to ZODB's invalidation hook (``registerDB``), as a
  ZEO client does, so connection caches drop exactly what changed; the index is
  updated before the invalidations, and `lastTransaction` after them, so a
  connection polling meanwhile sees either the old snapshot or the new one whole.
* When the path names another file (a pack or a restore renamed one over it) or
  the file shrank, the index is rebuilt from the new file and every cache dropped.

The data readers stay on the open file: ZODB's `FilePool` opens more handles by
name, which after a pack's rename would be a different file read at the old
file's offsets; on Linux they are opened through ``/proc/self/fd`` instead. They
are emptied at each catch-up, since a handle's read buffer may hold bytes of a
transaction that was still being written (or was aborted and overwritten).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ZODB.FileStorage.FileStorage import FilePool, read_index
from ZODB.utils import u64, z64

from ._errormap import translate_storage_error
from ._errors import CorruptHeapError
from ._integrity import CheckedFileStorage, scan

__all__ = ["FollowingFileStorage"]


# -- PROTECTED: ZODB.FileStorage.FileStorage internals (ZODB 6.4) --
# Catching up moves FileStorage's own state forward (declared below: ``_file``,
# ``_files`` (FilePool: ``write_lock``, ``empty``, ``name``, ``close``), ``_index``,
# ``_pos``, ``_oid``, ``_ltid``, ``_lock``, ``_file_name``) and rebuilds it with
# its own ``_newIndexes``, ``_restore_index``, ``_initIndex`` and the module's
# ``read_index`` and ``FilePool``: ZODB has no public way to re-read a file
# another process appends to. tests/test_zodb_internals.py pins every one.
class FollowingFileStorage(CheckedFileStorage):
    """A FileStorage opened read-only that sees the writer's later commits (see the module).

    Its opening scan, and each catch-up's, is durable_heap's checked one (`scan`):
    damage in the new part is a `CorruptHeapError`, never a record filed under
    the wrong object or a follower that silently stops following.
    """

    # FileStorage's own state, which catching up moves forward (ZODB is untyped).
    _file: Any  # the open data file: scans and `_last_tid` read it, under `_lock`
    _files: Any  # FilePool: the handles loads read through
    _index: Any  # fsIndex: oid -> offset of its newest record
    _pos: int  # end of the last whole committed transaction
    _oid: bytes  # largest oid
    _ltid: bytes  # tid of the last whole committed transaction
    _lock: Any
    _file_name: str

    def __init__(self, file_name: str) -> None:
        super().__init__(file_name, read_only=True)
        # Serializes catch-ups; taken before the storage's own `_lock`.
        self._follow_lock = threading.Lock()
        # ZODB's MVCC adapter, told of the oids each catch-up finds changed.
        self._dh_db: Any = None
        self._dh_identity = _identity(os.fstat(self._file.fileno()))
        # read_index returns the tid of the last header it read, which may be a
        # transaction still being written when we opened: the last whole one is ours.
        self._ltid = _last_tid(self._file, self._pos)
        self._files.close()
        self._files = FilePool(_same_file(self._file, self._file_name))

    # -- ZODB's storage API -----------------------------------------------------------

    def registerDB(self, db: Any) -> None:  # noqa: N802 - ZODB's name
        self._dh_db = db

    def sync(self, force: bool = True) -> None:
        """Catch up with the transactions committed since the last call."""
        with self._follow_lock:
            try:
                st = os.stat(self._file_name)
            except OSError:
                return  # moved away for a moment (a pack renames): next time
            if _identity(st) != self._dh_identity or st.st_size < self._pos:
                self._reload()
            elif st.st_size > self._pos:
                self._catch_up()

    def close(self) -> None:
        self._files.close()  # first: its handles are named after our file's descriptor
        super().close()

    # -- catching up --------------------------------------------------------------------

    def _catch_up(self) -> None:
        with self._lock:
            changes = _Changes(self._index)
            try:
                reached = scan(self._file, self._file_name, changes, self._pos, self._ltid)
            except CorruptHeapError as exc:
                raise translate_storage_error(exc, self._file_name, action="follow",
                                              offset=exc.offset or self._pos) from exc
            pos = self._pos if reached is None else reached[0]
            if pos == self._pos:
                return  # only a transaction still being written
            ltid = _last_tid(self._file, pos)
            # No load runs while the index changes, and none reuses a read buffer.
            with self._files.write_lock():
                self._files.empty()
                self._index.update(changes.new)
            if changes.new and self._dh_db is not None:
                self._dh_db.invalidate(ltid, list(changes.new))
            self._pos = pos
            if changes.new:
                self._oid = max(self._oid, max(changes.new))
            self._ltid = ltid

    def _reload(self) -> None:
        """The path names another file now, or the file shrank: read it afresh."""
        new = open(self._file_name, "rb")  # noqa: SIM115 - kept open as the storage's file
        with self._lock:
            old = self._file
            self._file = new  # `_restore_index` reads through self._file
            try:
                index, tindex = self._newIndexes()
                restored = self._restore_index()
                start, ltid = 4, z64
                if restored is not None:
                    index, start, ltid = restored
                pos, maxoid, _ = read_index(new, self._file_name, index, tindex, start=start,
                                            ltid=ltid, read_only=1)
            except Exception as exc:
                self._file = old
                new.close()
                raise translate_storage_error(exc, self._file_name, action="follow", offset=0) from exc
            with self._files.write_lock():
                self._files.empty()
                self._files.name = _same_file(new, self._file_name)
                self._initIndex(index, tindex)
            old.close()
            if self._dh_db is not None:
                self._dh_db.invalidateCache()
            self._dh_identity = _identity(os.fstat(new.fileno()))
            self._pos, self._oid, self._ltid = pos, maxoid, _last_tid(new, pos)


# -- end PROTECTED --


class _Changes:
    """What a scan (`read_index`, `scan`) updates, collected apart from the live index.

    It reads previous positions through ``get`` (to check back pointers) and
    calls ``update`` once per transaction; the live index changes only after.
    """

    def __init__(self, index: Any) -> None:
        self.index = index
        self.new: dict[bytes, int] = {}

    def get(self, oid: bytes, default: Any = None) -> Any:
        found = self.new.get(oid)
        return found if found is not None else self.index.get(oid, default)

    def update(self, tindex: dict[bytes, int]) -> None:
        self.new.update(tindex)

    def maxKey(self) -> bytes:  # noqa: N802 - fsIndex's name
        return max(self.new) if self.new else self.index.maxKey()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _same_file(f: Any, name: str) -> str:
    """A name that opens the same file as `f`, even after a rename over its path."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else name


def _last_tid(f: Any, pos: int) -> bytes:
    """The tid of the transaction that ends at `pos` (its trailer holds its length)."""
    if pos <= 4:
        return bytes(z64)  # an empty file: just the magic
    f.seek(pos - 8)
    length = u64(f.read(8))
    f.seek(pos - 8 - length)
    return bytes(f.read(8))
