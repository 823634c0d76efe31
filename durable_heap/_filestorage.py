"""ZODB's FileStorage, made to leave nothing behind of a transaction whose write failed.

ZODB trap (ZODB 6.4, ``FileStorage.tpc_vote``): when writing a transaction
fails (ENOSPC, EFBIG from a file-size limit, EIO), FileStorage truncates the
file back to its last transaction through the same buffered file object. Its
buffer still holds the bytes that did not fit, so the truncate (which flushes
first) fails again and the torn bytes stay; each later commit fails at its
first seek (which flushes too), even one that would fit; and once there is room
again that flush writes the stale bytes past the end, where the next commit may
not cover them (measured here: a garbage tail that the next open cuts off into
an ``app.fs.trN`` file). The scratch file (``app.fs.tmp``) has the same buffer.

So after a failed write the buffered file objects are dropped and reopened, and
the data file is cut back to its last whole transaction: the transaction is
aborted cleanly and the next commit starts from a clean file. A failed fsync in
``tpc_finish`` is a different matter: the storage closes itself then (the file's
durable state is unknown; with group commit every transaction the fsync was to
cover fails, see `durable_heap._groupcommit`), and the heap layer reports that
the heap must be reopened.

Two more things are made safe here:

* **A current load shows no commit waiting for its fsync.** Group commit puts a
  finished transaction in FileStorage's index before its fsync, and ZODB's
  ``load(oid)`` reads the index: it returned that record (and the checksum layer,
  which compares with ``lastTransaction()``, called it damaged). `FileStorage.load`
  returns the revision current at ``lastTransaction()`` instead: the one every
  other connection sees (durable before visible, `durable_heap._groupcommit`).
* **A pack cut off between its two renames.** FileStorage's pack renames the file
  to ``NAME.old``, then the packed copy ``NAME.pack`` to ``NAME``: a crash (or a
  power loss) between the two leaves no ``NAME``, and ZODB's FileStorage would then
  create a new, empty heap in its place. Opening refuses instead
  (`interrupted_pack`), and says which file to rename: both hold every acknowledged
  commit (the packed copy was fsynced before the first rename).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ZODB.FileStorage.FileStorage import TempFormatter
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from ._errors import StorageError
from ._groupcommit import GroupCommitFileStorage
from ._revisions import RecentRevisions

__all__ = ["FileStorage", "interrupted_pack"]


def interrupted_pack(file_name: str) -> StorageError | None:
    """The error for a heap file that a pack left renamed away (see the module), or None.

    ``NAME`` missing with both ``NAME.old`` and ``NAME.pack`` present happens only
    between pack's two renames (a finished pack leaves ``NAME`` and ``NAME.old``).
    """
    old, packed = file_name + ".old", file_name + ".pack"
    if os.path.exists(file_name) or not (os.path.exists(old) and os.path.exists(packed)):
        return None
    return StorageError(
        f"{file_name} is missing, and {old} and {packed} are there: a pack was cut off "
        f"between its two renames (a crash or a power loss). Both files hold every "
        f"acknowledged commit. To finish the pack: mv {packed} {file_name}; or, to undo "
        f"it: mv {old} {file_name}. Then open the heap again (it was not opened, so as "
        f"not to create an empty heap in its place)"
    )


# -- PROTECTED: ZODB.FileStorage.FileStorage internals (ZODB 6.4) --
# Overrides ``tpc_vote`` and ``_clear_temp`` (called at tpc_begin, tpc_abort and
# tpc_finish), and replaces the buffered files FileStorage keeps: ``_file``,
# ``_tfile`` with its ``_tfmt`` (a ``TempFormatter``) and ``_tindex``, under
# ``_lock``, cutting back to ``_pos`` and flushing ``_files`` (FilePool): the fix
# of its failed-write trap (see the module) has no public hook. ``load`` reads the
# current record through the index (``_lookup_pos``), which group commit updates
# before the fsync, while ``_ltid`` moves after it. ``pack`` renames ``NAME`` to
# ``NAME.old`` and then ``NAME.pack`` to ``NAME``, and ``__init__`` creates a missing
# file (tests/test_pack_crash.py pins both).
# tests/test_zodb_internals.py pins every one.
class FileStorage(RecentRevisions, GroupCommitFileStorage):  # type: ignore[misc]
    """`ZODB.FileStorage.FileStorage` that recovers from a failed write (see the module),
    with group commit (`durable_heap._groupcommit`: concurrent commits share an fsync)
    and the revisions conflict resolution read last kept (`durable_heap._revisions`)."""

    _file: Any  # the data file, open for writing (FileStorage's)
    _tfile: Any  # the scratch file of the transaction being committed (FileStorage's)

    def __init__(self, file_name: str, *args: Any, **kwargs: Any) -> None:
        if not (args[0] if args else kwargs.get("create")):  # create: a new, empty file is meant
            error = interrupted_pack(str(file_name))
            if error is not None:
                raise error
        super().__init__(file_name, *args, **kwargs)

    def load(self, oid: bytes, version: str = "") -> tuple[bytes, bytes]:
        """The object's revision as of ``lastTransaction()`` (see the module).

        ZODB's connections read through ``loadBefore`` at their snapshot; ``load`` is
        for tools (``durable-heap inspect``, the class allowlist, the integrity checks).
        """
        data, serial = super().load(oid, version)
        last = self._ltid
        if serial <= last or serial > self.last_written():
            return data, serial  # visible; or later than anything written: damage, for the checks
        # Written by a commit still waiting for its fsync: the revision before it.
        r = self.loadBefore(oid, p64(u64(last) + 1))
        if r is None:
            raise POSKeyError(oid)  # created by that commit: not there yet
        return r[0], r[1]

    def tpc_vote(self, transaction: Any) -> Any:
        try:
            return super().tpc_vote(transaction)
        except OSError:
            # Nothing of the transaction was committed: its header has status
            # "c" and _pos was not moved; only the bytes past _pos are to go.
            with self._lock:
                self._cut_back()
            raise

    def _clear_temp(self) -> None:
        # Called at tpc_begin, tpc_abort and tpc_finish; its seek flushes the
        # scratch file's buffer, which after a failed store still holds bytes.
        try:
            super()._clear_temp()
        except OSError:
            self._reopen_temp()

    def _cut_back(self) -> None:
        """Drop the data file's write buffer and cut the file back to `_pos` (lock held)."""
        with contextlib.suppress(OSError):
            self._file.close()  # its buffer goes with it (a flush may write some: cut below)
        self._file = open(self._file_name, "r+b")  # noqa: SIM115 - FileStorage owns and closes it
        self._file.truncate(self._pos)
        self._files.flush()  # readers drop buffers that may hold the cut bytes (as FileStorage does)
        self._reopen_temp()

    def _reopen_temp(self) -> None:
        """A fresh, empty scratch file in place of one whose buffer holds stale bytes."""
        with contextlib.suppress(OSError):
            self._tfile.close()
        self._tfile = open(self._file_name + ".tmp", "w+b")  # noqa: SIM115 - closed by close()
        self._tfmt = TempFormatter(self._tfile)
        self._tindex.clear()
# -- end PROTECTED --
