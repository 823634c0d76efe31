"""The last revisions conflict resolution read, kept: concurrent commits to one record
merge against the same few revisions.

Threads changing neighbouring keys of one Dict all commit to one bucket record,
and nearly every such commit is merged inside FileStorage's ``store``, with the
commit lock held (commits are serial there): ZODB's resolver
(``ZODB.ConflictResolution.tryToResolveConflict``) reads the revision the
transaction started from and the one committed since with ``loadSerial``, and
the allowlist guard (`durable_heap._allow`) reads them too. Each read is a seek
and a read of the data file, each a system call that lets go of the GIL, so the
committer holding the lock waits for another thread's Python code to let go of
it again (issue 18: the lock was held about twice as long as the CPU it used).
The same revisions come back merge after merge (one commit's revision is the
next merge's committed one, then later ones' old one), so the last ones read are
kept here, keyed by (oid, serial).

The record a commit stores is kept too, once its transaction is finished: on a hot
bucket, the revision one commit writes is the committed one of the next merge, which
would read it back from the file (with the commit lock held). What a merge stored is
handed over by the allowlist guard (`_dh_note_merge`: FileStorage's ``store`` writes
what the resolver returned, and does not say what it was). Only once this storage has
read a revision for a merge (`loadSerial`, which ZODB's resolver calls before it
merges) or merged one: a storage whose commits never conflict (one thread, most
heaps) pays no dict insert per record for revisions nobody reads (issue 18). Before
that, nothing is kept and a merge reads the file, as ZODB's FileStorage does.

A revision never changes once written: FileStorage appends, pack drops old
revisions and never rewrites one, and undo writes new revisions under new tids.
Pack is the one thing that makes a kept revision one the file no longer has (a
``loadSerial`` of it would raise POSKeyError), so a pack forgets them all, and a
read racing the pack does not keep what it read (`_dh_generation`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RecentRevisions"]

#: Revisions kept (the oldest read goes first), and the largest one kept: the hot
#: records of concurrent commits are buckets of a few hundred bytes.
KEPT = 64
LARGEST = 16 * 1024


class RecentRevisions:
    """Mixin for a FileStorage: ``loadSerial`` answers from the revisions it read last."""

    _lock: Any  # FileStorage's (an RLock: loadSerial runs under it inside store, too)

    _resolved: list[bytes]  # FileStorage's: the oids store merged, this transaction
    _tid: bytes  # FileStorage's: the transaction being committed (its records' serial)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._dh_revisions: dict[bytes, bytes] = {}
        self._dh_generation = 0  # moved by pack, under _lock: reads from before it are not kept
        # The records stored by the transaction being committed (tid, oid -> data), and
        # the last merge's record, from the guard (oid, data).
        self._dh_stored: tuple[bytes | None, dict[bytes, bytes]] = (None, {})
        self._dh_merged: tuple[bytes, bytes] | None = None
        # Whether stored records are kept: from the first revision read for a merge on.
        self._dh_keep = False
        super().__init__(*args, **kwargs)

    def _dh_note_merge(self, oid: bytes, data: bytes) -> None:
        """From the allowlist guard: the record conflict resolution returned for `oid`,
        which ``store`` (running it, under the lock) writes next."""
        self._dh_keep = True
        self._dh_merged = (oid, data)

    # -- PROTECTED: ZODB.FileStorage.FileStorage internals (ZODB 6.4) --
    # ``store`` writes ``data``, or what ``tryToResolveConflict`` returned for it after
    # appending the oid to ``_resolved``, as the revision of serial ``_tid``; ``_finish``
    # runs under the lock once the transaction is written (its tid given), nothing of
    # it having been visible before. tests/test_zodb_internals.py pins them.
    def store(self, oid: bytes, oldserial: bytes, data: bytes, version: Any, transaction: Any) -> Any:
        resolved = len(self._resolved)
        self._dh_merged = None
        result = super().store(oid, oldserial, data, version, transaction)  # type: ignore[misc]
        if not self._dh_keep:  # no merge yet in this storage: nobody reads them back
            return result
        if len(self._resolved) > resolved:  # merged: what was written is the merge
            merged, self._dh_merged = self._dh_merged, None
            if merged is None or merged[0] != oid:
                return result
            data = merged[1]
        if len(data) <= LARGEST:
            tid, stored = self._dh_stored
            if tid != self._tid:
                stored = {}
                self._dh_stored = (self._tid, stored)
            stored[oid] = data
        return result

    def _finish(self, tid: bytes, *args: Any) -> Any:
        result = super()._finish(tid, *args)  # type: ignore[misc]
        if not self._dh_keep:  # `store` kept nothing
            return result
        stored_tid, stored = self._dh_stored
        self._dh_stored = (None, {})
        if stored_tid == tid:
            revisions = self._dh_revisions
            for oid, data in stored.items():
                if len(revisions) >= KEPT:
                    del revisions[next(iter(revisions))]
                revisions[oid + tid] = data
        return result
    # -- end PROTECTED --

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:  # noqa: N802 - ZODB's name
        key = oid + serial
        data = self._dh_revisions.get(key)
        if data is not None:
            return data
        self._dh_keep = True  # a merge reads revisions: from now on keep what is stored
        generation = self._dh_generation
        data = super().loadSerial(oid, serial)  # type: ignore[misc]
        if len(data) <= LARGEST:
            with self._lock:
                if generation == self._dh_generation:
                    revisions = self._dh_revisions
                    if len(revisions) >= KEPT:
                        del revisions[next(iter(revisions))]
                    revisions[key] = data
        return data  # type: ignore[no-any-return]

    def pack(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().pack(*args, **kwargs)  # type: ignore[misc]
        finally:
            with self._lock:
                self._dh_generation += 1
                self._dh_revisions.clear()
