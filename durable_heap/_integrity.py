"""Damage is never silent: checked opens, checksummed records, and one translation of read errors.

Three guards, each where ZODB gives a hook:

* `CheckedFileStorage` (a FileStorage) makes the scan FileStorage's constructor
  would make, over the same part of the file, before anything is changed.
  FileStorage cuts the file at the first transaction it cannot read and moves
  the rest to ``NAME.trN``: right for the one transaction a crash tears while it
  is written, a silent loss of every later commit anywhere else. So a cut that
  would drop more than a torn last transaction is refused with
  `CorruptHeapError`, the file left as it was; so is a record header that would
  file a record under the wrong object.
* `ChecksumStorage` (an ``IStorageWrapper`` on the storage that owns the
  records, as zc.zlibstorage is) seals every record it writes with a CRC-32
  over the oid and the data, and checks it at every read. A record written
  before (no seal) is read as it is.
* `CheckedConnection` (installed through ``DB.klass``, by `CheckedDB`) turns
  ZODB's raw read errors (a missing record, a damaged header, a pickle that
  does not load) into `CorruptHeapError` naming the object, its class and where.

What the checksums cover, and what they do not, is in docs/operations.md
("A damaged file or record").
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import ZODB
import ZODB.Connection
import ZODB.interfaces
import ZODB.POSException
import zope.interface
from ZODB.FileStorage.FileStorage import packed_version  # the magic read_index checks
from ZODB.FileStorage.format import (
    DATA_HDR,
    DATA_HDR_LEN,
    TRANS_HDR,
    TRANS_HDR_LEN,
    CorruptedError,
)
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import oid_repr, tid_repr, u64, z64

from . import _allow
from ._errormap import READ_ERRORS as _READ_ERRORS
from ._errormap import describe as _describe
from ._errormap import is_damage_value_error as _damage_value_error
from ._errormap import record_error, translate_storage_error
from ._errors import CorruptHeapError, DurableHeapError, StorageError
from ._filestorage import FileStorage  # ZODB's, recovering from a failed write

__all__ = [
    "MARK",
    "CheckedConnection",
    "CheckedDB",
    "CheckedFileStorage",
    "ChecksumStorage",
    "intact",
    "scan",
    "seal",
    "strip",
]

# --- the record seal -------------------------------------------------------------------
#
# A sealed record is   pickles + crc32(oid + pickles) + MARK,   the CRC as 4 bytes
# little-endian. A ZODB record is two pickles (class, then state) and every pickle
# ends with the STOP opcode b".", so a record that ends with MARK (whose last byte is
# not b".") is sealed and one that ends with b"." was written before seals (read as it
# is). ZODB's unpicklers stop at the second STOP, so a sealed record is also a valid
# record as it stands: loads of objects (``loadBefore``, the hot path) return it as
# stored, without a copy, and durable_heap 0.2, raw ZODB and its tools (pack, fsdump,
# zodbconvert) read it unchanged. Every other path that hands out records (``load``,
# ``loadSerial``, iterators, conflict resolution) returns the record without its seal:
# what ZODB wrote, for readers that parse a record to its end (the allowlist's
# conflict guard reads every opcode with pickletools).
# CRC-32 finds every single-bit flip and every burst of up to 32 bits. The CRC of a
# message followed by its own CRC is a constant, so one crc32 call over the whole
# record checks it (`_SEALED`). The oid is in the CRC, not in the record: a record
# whose header names another oid (a flipped oid bit) fails when read as that oid.

#: The last bytes of a sealed record.
MARK = b"dh"
_RESIDUE = 0x2144DF1C  # crc32(m + crc32(m).to_bytes(4, "little")) for every m
_SEALED = zlib.crc32(MARK, _RESIDUE)  # crc32 of any sealed record, seeded with its oid's
_crc = zlib.crc32
_SEAL_LEN = 4 + len(MARK)


def seal(oid: bytes, data: bytes) -> bytes:
    """The record stored for `data` (a ZODB record) of `oid`: its CRC-32 over oid and data appended."""
    return data + _crc(data, _crc(oid)).to_bytes(4, "little") + MARK


def strip(data: bytes) -> bytes:
    """A record without its seal (one from before seals as it is)."""
    return data[:-_SEAL_LEN] if data[-2:] == MARK else data


def intact(oid: bytes, data: bytes) -> bool:
    """Whether `oid`'s record passes its check (a record from before seals always does)."""
    if data[-2:] == MARK:
        return bool(_crc(data, _crc(oid)) == _SEALED)
    return not data or data[-1:] == b"."  # else a seal whose mark is damaged


# --- errors ------------------------------------------------------------------------------

_TXN = struct.Struct(TRANS_HDR)
_DATA = struct.Struct(DATA_HDR)
# What FileStorage raises for a damaged record (_READ_ERRORS), the sentence that
# says how to recover (_RECOVER) and the error of one damaged record
# (`record_error`) are in the error map, `durable_heap._errormap`.


# --- the wrapper: seals on the way in, checks on the way out ----------------------------------


# -- PROTECTED: ZODB.FileStorage.FileStorage internals, read for messages (ZODB 6.4) --
# ChecksumStorage names the file of its base by ``_file_name``, and finds where a
# damaged record lies (`_header_problem`, `_offset`) through the base's ``_lock``,
# ``_lookup_pos``, ``_read_data_header``, ``_file`` and ``_ltid``: each read in a
# ``try``, for the wording only (another storage, or a changed FileStorage, gives a
# message without an offset). It also calls ``registerDB`` on its base itself (see
# the trap in __init__). tests/test_zodb_internals.py pins them.
# -- end PROTECTED --
@zope.interface.implementer(ZODB.interfaces.IStorageWrapper)
class ChecksumStorage:
    """Seal each record written and check each record read (zc.zlibstorage's pattern).

    It wraps the storage that owns the records: the local FileStorage of a file
    heap, and the served storage in ``durable-heap zeo`` (so ZEO clients receive
    checked records). Every path that hands out record data checks it: ``load``,
    ``loadBefore``, ``loadSerial``, ``record_iternext``, ``iterator``, and
    conflict resolution (through ``untransform_record_data``).
    """

    # Bound once: no __getattr__ on the hot paths.
    copied_methods = (
        "close", "getName", "getSize", "history", "isReadOnly", "lastTransaction", "new_oid",
        "sortKey", "tpc_abort", "tpc_begin", "tpc_finish", "tpc_vote", "supportsUndo", "undo",
        "undoLog", "undoInfo", "checkCurrentSerialInTransaction", "tpc_transaction",
    )

    def __init__(self, base: Any) -> None:
        self.base = base
        self._path = str(getattr(base, "_file_name", None) or base.getName())
        # The oid this thread is storing: ZODB's conflict resolution runs inside
        # base.store and calls transform_record_data without it.
        self._storing = threading.local()
        self.loadBefore = self._load_before()
        for name in self.copied_methods:
            v = getattr(base, name, None)
            if v is not None:
                setattr(self, name, v)
        zope.interface.directlyProvides(self, zope.interface.providedBy(base))
        self.db: Any = None
        # ZODB trap: a base that resolves conflicts (ConflictResolvingStorage) reads
        # and writes the records of a merge through the transform functions of
        # whatever it was registered with: register this wrapper, so that the
        # records it reads are checked and the merged record it writes is sealed.
        base.registerDB(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    # -- reads ----------------------------------------------------------------------------
    # Every record is checked; loadBefore returns it as stored, the others without
    # its seal (see MARK).

    def _load_before(self) -> Callable[[bytes, bytes], Any]:
        """``loadBefore``, made once per wrapper: every load of an object comes here.

        ZODB's MVCC adapter and ZEO's server call ``storage.loadBefore``; as a
        closure in the instance's ``__dict__`` it costs one plain call on top of
        the base's, and the common case (a current, sealed, intact record) is inline.
        """
        # The last transaction written: with group commit (`_groupcommit`) one written
        # but not yet durable is in the index already, and not yet lastTransaction().
        last = getattr(self.base, "last_written", self.base.lastTransaction)
        base_load, slow = self.base.loadBefore, self._loaded
        crc, sealed = _crc, _SEALED

        def loadBefore(oid: bytes, tid: bytes) -> Any:
            try:
                r = base_load(oid, tid)
            except ZODB.POSException.POSKeyError:
                raise self._no_root(oid) from None
            except _READ_ERRORS:
                raise self._unreadable(oid) from None
            # A sealed, intact record (no need to look at MARK first: any record
            # whose sum comes out right is returned as it is, which is what the
            # slow path would do with a record from before seals too).
            if r is not None and r[2] is None and crc(r[0], crc(oid)) == sealed:
                return r
            return slow(oid, r, last)

        return loadBefore

    def _loaded(self, oid: bytes, r: Any, last: Callable[[], bytes]) -> Any:
        """The rest of ``loadBefore``: no revision, a newer one exists, unsealed, or damaged."""
        if r is None:
            self._check_absent(oid)
            return None
        data, serial, end = r
        if end is not None and end > last():
            raise self._future(oid, end)
        self._check(oid, serial, data)
        return r

    def load(self, oid: bytes, version: str = "") -> tuple[bytes, bytes]:
        try:
            data, serial = self.base.load(oid, version)
        except ZODB.POSException.POSKeyError:
            raise self._no_root(oid) from None
        except _READ_ERRORS:
            raise self._unreadable(oid) from None
        if serial > self.base.lastTransaction():
            raise self._future(oid, serial)
        self._check(oid, serial, data)
        return strip(data), serial

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        try:
            data = self.base.loadSerial(oid, serial)
        except _READ_ERRORS:
            raise self._unreadable(oid) from None
        self._check(oid, serial, data)
        return strip(data)

    def record_iternext(self, next: Any = None) -> tuple[bytes, bytes, bytes, Any]:  # noqa: A002 - ZODB's name
        try:
            oid, tid, data, cursor = self.base.record_iternext(next)
        except _READ_ERRORS as exc:
            oid = exc.args[0] if exc.args else None  # CorruptedDataError(oid, data, pos)
            if isinstance(oid, bytes) and isinstance(exc, CorruptedError):
                raise self._unreadable(oid) from None
            raise
        self._check(oid, tid, data)
        return oid, tid, strip(data) if data else data, cursor

    def iterator(self, start: Any = None, stop: Any = None) -> _Iterator:
        return _Iterator(self.base.iterator(start, stop), self)

    def _check(self, oid: bytes, serial: bytes | None, data: bytes | None) -> None:
        if data and not intact(oid, data):
            reason = "fails its checksum" if data[-2:] == MARK else "has a damaged checksum mark"
            raise record_error(self._path, oid, reason, offset=self._offset(oid, serial), serial=serial)

    def _check_absent(self, oid: bytes) -> None:
        # No revision before the snapshot: the object did not exist yet. Unless its
        # current record claims a transaction later than the last one: a damaged
        # header that would hide the record (and the object) from every reader.
        try:
            _, serial = self.base.load(oid)
        except ZODB.POSException.POSKeyError:
            return
        # Against the last transaction written, not lastTransaction(): with group
        # commit that one moves only once durable, and a record of a commit that
        # waits for its fsync is newer (a reader whose snapshot predates it, or a
        # ZEO client served while it waits, was told its sound record was damaged).
        if serial > getattr(self.base, "last_written", self.base.lastTransaction)():
            raise self._future(oid, serial)

    def _unreadable(self, oid: bytes) -> BaseException:
        """The error of a load that failed inside FileStorage, as a `CorruptHeapError` when
        the record's header is damaged (called in an ``except``; else the error as it was).

        A damaged header fails in many ways: ``CorruptedDataError`` (another oid),
        ``ValueError`` (a version length; a back pointer past any offset),
        ``MemoryError`` or ``OverflowError`` (a data length of terabytes).
        """
        exc = sys.exc_info()[1]
        assert exc is not None
        problem = self._header_problem(oid)
        if problem is None and not isinstance(exc, CorruptedError):
            return exc
        offset = problem[1] if problem else None
        reason = problem[0] if problem else "cannot be read"
        return record_error(self._path, oid, f"{reason} ({_describe(exc)})", offset=offset)

    def _header_problem(self, oid: bytes) -> tuple[str, int] | None:
        """What is wrong with the header of `oid`'s current record, and its offset
        (FileStorage only: None for a sound header or another storage)."""
        base = self.base
        try:
            with base._lock:
                pos = base._lookup_pos(oid)
                base._file.seek(pos)
                head = base._file.read(DATA_HDR_LEN + 8)
                size = base.getSize()
                last = base._ltid
        except Exception:  # noqa: BLE001 - not a FileStorage, or not in its index
            return None
        if len(head) < DATA_HDR_LEN:
            return "is cut short", pos
        hoid, htid, prev, tloc, vlen, plen = _DATA.unpack_from(head)
        back = u64(head[DATA_HDR_LEN:]) if len(head) == DATA_HDR_LEN + 8 else 0
        for bad, what in (
            (hoid != oid, f"has a header that names object {oid_repr(hoid)}"),
            (vlen != 0, "has a damaged header (a version length)"),
            (plen > size - pos, f"claims {plen} bytes, more than the file holds"),
            (tloc >= pos or prev >= pos or htid > last, "has a damaged header"),
            (not plen and back >= pos, "has a damaged header (its back pointer)"),
        ):
            if bad:
                return what, pos
        return None

    def _no_root(self, oid: bytes) -> BaseException:
        """A storage with records but no root record is damaged (called in an ``except``).

        ZODB trap: ``DB()`` takes a POSKeyError for the root (oid 0) as "a new
        database" and writes an empty root: a root record whose header was zeroed
        (it then names oid 0 with no data) would silently open as an empty heap.
        """
        exc = sys.exc_info()[1]
        assert exc is not None
        if oid != z64 or not len(self.base):
            return exc
        return record_error(self._path, oid, "cannot be found: its header is damaged",
                            offset=self._offset(oid, None))

    def _future(self, oid: bytes, serial: bytes) -> CorruptHeapError:
        # FileStorage's loadBefore skips revisions at or after the snapshot, so a
        # record whose transaction id was flipped upward would silently give the
        # previous revision (or no object). No record can be later than the last
        # written transaction (FileStorage updates both under its write lock).
        last = getattr(self.base, "last_written", self.base.lastTransaction)()
        return record_error(
            self._path, oid,
            f"names transaction {tid_repr(serial)}, later than the heap's last one "
            f"({tid_repr(last)}): its header is damaged",
            offset=self._offset(oid, serial), serial=serial,
        )

    def _offset(self, oid: bytes, serial: bytes | None) -> int | None:
        """The file offset of `oid`'s record of `serial` (FileStorage only; None if unknown)."""
        base = self.base
        try:
            with base._lock:
                pos = base._lookup_pos(oid)
                first = pos
                for _ in range(100_000):
                    h = base._read_data_header(pos, oid)
                    if serial is None or h.tid == serial or not h.prev:
                        return int(pos) if serial is None or h.tid == serial else int(first)
                    pos = h.prev
        except Exception:  # noqa: BLE001 - only for the message: a damaged chain, another storage
            return None
        return None

    # -- writes -------------------------------------------------------------------------

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, transaction: Any) -> Any:
        self._storing.oid = oid
        try:
            return self.base.store(oid, serial, self._sealed(oid, data), version, transaction)
        finally:
            self._storing.oid = None

    def restore(self, oid: bytes, serial: bytes, data: bytes | None, version: str, prev_txn: Any,
                transaction: Any) -> Any:
        if data:
            data = self._sealed(oid, data)
        self._storing.oid = oid
        try:
            return self.base.restore(oid, serial, data, version, prev_txn, transaction)
        finally:
            self._storing.oid = None

    def _sealed(self, oid: bytes, data: bytes) -> bytes:
        if data[-2:] == MARK:  # already sealed (a copy of a sealed record): keep it if whole
            self._check(oid, None, data)
            return data
        return seal(oid, data)

    def copyTransactionsFrom(self, other: Any) -> None:
        import ZODB.blob

        ZODB.blob.copyTransactionsFromTo(other, self)  # through restore: sealed here

    # -- IStorageWrapper (what the base and ZODB call back) ------------------------------------
    # pack's reference finder, DB.references and blob detection read sealed records
    # as they are (their unpicklers never reach the seal); conflict resolution reads
    # its records through untransform_record_data (checked, unsealed) and its
    # merged record is sealed by transform_record_data.

    def registerDB(self, db: Any) -> None:
        self.db = db

    def invalidateCache(self) -> Any:
        return self.db.invalidateCache() if self.db is not None else None

    def invalidate(self, transaction_id: bytes, oids: Any, version: str = "") -> Any:
        # A base that follows another process's commits (FollowingFileStorage) reports them.
        return self.db.invalidate(transaction_id, oids) if self.db is not None else None

    def references(self, record: bytes, oids: Any = None) -> Any:
        return self.db.references(record, oids)

    def transform_record_data(self, data: bytes) -> bytes:
        # ZODB's conflict resolution, for the merged record it stores (inside store).
        data = self.db.transform_record_data(data) if self.db is not None else data
        oid = getattr(self._storing, "oid", None)
        # Outside a store (an undo's merge) the oid is unknown: the record is then
        # stored unsealed, and read like a record from before seals.
        return seal(oid, data) if oid is not None else data

    def untransform_record_data(self, data: bytes) -> bytes:
        # Kept thin: conflict resolution reads its three records through this.
        oid = getattr(self._storing, "oid", None)
        if oid is not None:
            self._check(oid, None, data)
        data = strip(data)
        return self.db.untransform_record_data(data) if self.db is not None else data


class _Iterator:
    """The base storage's transaction iterator, each record checked."""

    def __init__(self, base_it: Any, storage: ChecksumStorage) -> None:
        self._base_it = base_it
        self._storage = storage

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> _Transaction:
        return _Transaction(next(self._base_it), self._storage)

    def close(self) -> None:
        close = getattr(self._base_it, "close", None)
        self._base_it = iter(())
        if close is not None:
            close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base_it, name)


class _Transaction:
    def __init__(self, trans: Any, storage: ChecksumStorage) -> None:
        self._trans = trans
        self._storage = storage

    def __iter__(self) -> Iterator[Any]:
        for r in self._trans:
            if r.data:
                self._storage._check(r.oid, r.tid, r.data)
                r.data = strip(r.data)
            yield r

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trans, name)


# --- the checked open ----------------------------------------------------------------------


_U64 = struct.Struct(">Q")
#: How far a torn transaction's id may lie ahead of the clock and of the last one (1 day).
_AHEAD = 1440 << 32  # the upper 32 bits of a tid count minutes


# -- PROTECTED: FileStorage._restore_index and the state around it (ZODB 6.4) --
# The checked scan is hooked into ``_restore_index``, the one method FileStorage's
# constructor calls between opening the file and ``read_index`` (see the class's
# docstring), and uses ``_newIndexes``, ``_initIndex``, ``_save_index``, ``_is_read_only``,
# ``_pos`` and ``_file``; `_close_quietly` closes ``_file``, ``_files``,
# ``_lock_file`` and ``_tfile`` after a failed constructor. tests/test_damage.py
# and tests/test_zodb_internals.py pin them.
class CheckedFileStorage(FileStorage):
    """A FileStorage that refuses, untouched, a file it would open as less than it holds.

    It is durable_heap's FileStorage (`durable_heap._filestorage`: a failed write
    leaves nothing behind), opened with a checked scan.

    ZODB trap: FileStorage's constructor reads its index (``_restore_index``) and
    then scans the file from the index's position (from the start without a valid
    index) with ``read_index``, which cuts the file at the first transaction it
    cannot read and copies the rest to ``NAME.trN``, and files each data record
    under the oid its header names, only logging a record whose back pointer
    disagrees (a flipped oid bit files a record under another object and leaves
    the real one at an older state). ``_restore_index`` is the one method called
    in between. Here it makes that scan itself, over exactly the same range
    (`scan`): it builds the same index, refuses damage with `CorruptHeapError`
    before anything is cut, and returns the index and the position it reached,
    so that ``read_index`` has nothing left to read but a torn last transaction,
    which it drops as it always did. (tests/test_damage.py checks that the hook
    is still called.)
    """

    def __init__(self, file_name: str, **kwargs: Any) -> None:
        self._dh_name = file_name
        try:
            super().__init__(file_name, **kwargs)
        except BaseException:
            self._close_quietly()  # FileStorage leaves its lock and files open
            raise

    def _restore_index(self) -> Any:
        try:
            r = super()._restore_index()  # None without a valid .index
        except (CorruptedError, ValueError, struct.error):
            # ZODB trap: its check of the index (_check_sanity) reads the last
            # transaction's records and lets a damaged header's error through,
            # where it means "do not trust the index": scan the file instead.
            r = None
        # A fresh index without a valid .index: FileStorage's constructor installs the
        # one returned (and FollowingFileStorage's reload calls this again, its live
        # index still in place).
        index, start, ltid = (self._newIndexes()[0], 4, z64) if r is None else r
        reached = scan(self._file, self._dh_name, index, start, ltid)
        if reached is None:
            return r  # not a FileStorage file, or empty: FileStorage decides
        pos, ltid = reached
        if r is None and not self._is_read_only:
            # What FileStorage does after its own scan: save the index. Trap:
            # _save_index saves self._index, at this point the constructor's empty
            # one (it installs ours only once this returns): saved empty, the .index
            # of a process that then crashed was refused at the next open, which
            # scanned the whole file again.
            self._initIndex(index, self._tindex)
            self._pos = pos
            self._save_index()
        return index, pos, ltid

    def _close_quietly(self) -> None:
        for name in ("_file", "_files", "_lock_file", "_tfile"):
            f = getattr(self, name, None)
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001,S110 - closing after a failed open
                    pass


# -- end PROTECTED --


def scan(file: Any, name: str, index: Any, start: int, ltid: bytes) -> tuple[int, bytes] | None:
    """Read the transactions from `start` into `index` as FileStorage's ``read_index`` does.

    Returns the position after the last whole transaction and its id (None for a
    file FileStorage itself refuses or creates). Raises `CorruptHeapError`,
    leaving the file as it is, wherever ``read_index`` would cut the file short
    of a torn last transaction (`_torn`), stop with an error, or file a record
    whose header does not continue its object's history (another oid, a back
    pointer that is not the object's previous record, a transaction id that is
    not its transaction's).
    """
    file.seek(0, 2)
    size = file.tell()
    if size < start or size < 4:
        return None
    file.seek(0)
    if file.read(4) != packed_version:
        return None
    if size == 4:
        return 4, ltid
    return _scan(_Window(file, size), name, index, start, ltid, size)


class _Window:
    """Reads at file offsets through a buffer of a megabyte (the scan reads forward).

    Not an mmap: a read-only open may scan a file that its writer truncates (an
    aborted commit), and touching an mmap past the end of its file kills the
    process with SIGBUS.
    """

    def __init__(self, file: Any, size: int) -> None:
        self.file, self.size = file, size
        self.start, self.buf = 0, b""

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the `n` bytes at `pos`, and where they start in it."""
        off = pos - self.start
        if off < 0 or off + n > len(self.buf):
            self.file.seek(pos)
            self.buf, self.start, off = self.file.read(max(n, 1 << 20)), pos, 0
            if len(self.buf) < min(n, self.size - pos):
                raise StorageError(
                    f"the heap {self.file.name} became shorter while it was being opened (another "
                    "process is changing it): open it again"
                )
        return self.buf, off

    def __getitem__(self, s: slice) -> bytes:
        buf, off = self.at(s.start, s.stop - s.start)
        return buf[off:off + s.stop - s.start]


def _scan(m: _Window, name: str, index: Any, pos: int, prev: bytes, size: int) -> tuple[int, bytes]:
    txn, data, u64_at, at = _TXN.unpack_from, _DATA.unpack_from, _U64.unpack_from, m.at
    get = index.get
    while pos < size:
        if size - pos < TRANS_HDR_LEN:
            return _tail(m, name, pos, size, prev)
        tid, tl, status, ul, dl, el = txn(*at(pos, TRANS_HDR_LEN))
        tend = pos + tl
        if tend + 8 > size or status == b"c" or tl < TRANS_HDR_LEN + ul + dl + el:
            return _tail(m, name, pos, size, prev)
        if u64_at(*at(tend, 8))[0] != tl:
            raise _bad(name, pos, "its two length fields disagree")
        if status != b"u":  # an undone transaction's records are not indexed
            meta = ul + dl + el
            if meta >= DATA_HDR_LEN and _hides_records(*at(pos + TRANS_HDR_LEN, meta), meta, tid, pos):
                # A flipped length of the user, description or extension lands the
                # first record on a later record's start: the ones before would
                # silently not be indexed.
                raise _bad(name, pos, "the lengths in the header of a transaction hide some of "
                                      "its data records")
            new = {}
            p = pos + TRANS_HDR_LEN + meta
            buf, base = m.buf, m.start  # the window, read through directly: the hot loop
            while p < tend:
                if p + DATA_HDR_LEN > tend:
                    raise _bad(name, p, "a data record runs past the end of its transaction")
                o = p - base
                if o < 0 or o + DATA_HDR_LEN > len(buf):
                    buf, o = at(p, DATA_HDR_LEN)
                    base = p - o
                oid, rtid, back, tloc, vlen, plen = data(buf, o)
                end = p + DATA_HDR_LEN + (plen or 8)
                if vlen or end > tend or tloc != pos:
                    raise _bad(name, p, "the header of a data record is damaged")
                if rtid != tid:
                    raise _bad(name, p, f"a data record of object {oid_repr(oid)} names another "
                                        "transaction than its own")
                if get(oid, 0) != back:
                    raise _bad(name, p, f"a data record names object {oid_repr(oid)}, but does not "
                                        "continue that object's history (a damaged oid or back "
                                        "pointer), so the object could be read at an older state")
                if plen >= DATA_HDR_LEN:
                    # A flipped data length that lands on a later record's start
                    # swallows the records in between: they would not be indexed.
                    if o + DATA_HDR_LEN + plen > len(buf):
                        buf, o = at(p, DATA_HDR_LEN + plen)
                        base = p - o
                    o += DATA_HDR_LEN
                    if buf.find(tid, o + 8, o + plen) != -1 and _hides_records(buf, o, plen, tid, pos):
                        raise _bad(name, p, f"the data length of a record of object {oid_repr(oid)} "
                                            "covers other data records")
                new[oid] = p
                p = end
            index.update(new)
        prev, pos = tid, tend + 8
    return pos, prev


def _hides_records(buf: bytes, off: int, length: int, tid: bytes, pos: int) -> bool:
    """Whether `length` bytes (metadata, or a record's data) hold a data record header of
    the transaction at `pos`: each names the transaction's id (at 8) and position (at 24).

    Pickles and notes do not hold a transaction's raw id followed by its position.
    """
    where = struct.pack(">Q", pos)
    i = buf.find(tid, off + 8, off + length)
    while i != -1:
        if buf[i + 16:i + 24] == where:
            return True
        i = buf.find(tid, i + 1, off + length)
    return False


def _tail(m: _Window, name: str, pos: int, size: int, prev: bytes) -> tuple[int, bytes]:
    """Where FileStorage cuts: allowed for a torn last transaction only."""
    if not _torn(m, pos, size, prev):
        raise _cut_error(m, name, pos, size, prev)
    return pos, prev


def _torn(m: _Window, pos: int, size: int, prev: bytes) -> bool:
    """Whether the bytes from `pos` to the end are one transaction that a crash cut off.

    FileStorage writes a commit as one transaction at the end of the file with the
    status ``c`` and sets the status to `` `` only once all of it is written (then
    fsyncs). A crash leaves a prefix of that transaction: its id follows the last
    one, its lengths are consistent, and it reaches the end of the file. A
    transaction marked finished but cut short can only come from a power loss
    before that fsync; it counts as torn unless the file's last 8 bytes say it is
    whole (then its length field is what is damaged). Nothing whole may follow.
    """
    head = m[pos:pos + TRANS_HDR_LEN]
    if len(head) < TRANS_HDR_LEN:
        return len(head) < 8 or _plausible(head[:8], prev)
    tid, tl, status, ul, dl, el = _TXN.unpack(head)
    if not _plausible(tid, prev) or tl < TRANS_HDR_LEN + ul + dl + el:
        return False
    end = pos + tl + 8
    if status == b"c":
        if end < size:
            return False
    elif status in (b" ", b"p"):
        if end <= size or u64(m[size - 8:size]) == size - 8 - pos:
            return False
    else:
        return False
    return _count_back(m, pos, size, prev)[0] == 0


def _plausible(tid: bytes, prev: bytes) -> bool:
    """A transaction id after `prev`, and not far ahead of both the clock and `prev`."""
    if tid <= prev:
        return False
    now = time.time() + 86400
    clock = TimeStamp(*time.gmtime(now)[:5], now % 60).raw()
    return bool(u64(tid) <= max(u64(clock), u64(prev) + _AHEAD))


def _count_back(m: _Window, pos: int, size: int, prev: bytes) -> tuple[int, bool]:
    """(Whole transactions after `pos`, read back from the end; whether that led to `pos`)."""
    count, q = 0, size
    while q - 8 >= pos + TRANS_HDR_LEN:
        tl = u64(m[q - 8:q])
        t = q - 8 - tl
        if t < pos or tl < TRANS_HDR_LEN:
            return count, False
        if t == pos:
            return count, True
        tid, htl, status, _, _, _ = _TXN.unpack(m[t:t + TRANS_HDR_LEN])
        if htl != tl or status not in (b" ", b"p", b"u") or not _plausible(tid, prev):
            return count, False
        count, q = count + 1, t
    return count, q == pos


def _cut_error(m: _Window, name: str, pos: int, size: int, prev: bytes) -> CorruptHeapError:
    after, reached = _count_back(m, pos, size, prev)
    lost = after + 1  # the damaged transaction itself
    txns = f"{lost} transaction{'s' if lost != 1 else ''}" if reached else f"at least {lost} transactions"
    msg = (
        f"the heap {name} is damaged at offset {pos}: the transaction there cannot be read, and "
        f"more follows it. Opening the heap would cut the file there and drop {txns} "
        f"({size - pos} bytes; FileStorage would move them to {name}.trN), so it was not "
        "opened, and the file was not changed. " + _recovery(name, pos)
    )
    return CorruptHeapError(msg, offset=pos)


def _bad(name: str, pos: int, what: str) -> CorruptHeapError:
    msg = (
        f"the heap {name} is damaged at offset {pos}: {what}. It was not opened, and the file "
        "was not changed. " + _recovery(name, pos)
    )
    return CorruptHeapError(msg, offset=pos)


_CUT_RECOVERY = (
    "Restore the heap from a backup. To keep only what comes before the damage instead, stop "
    "every process that uses the heap and, in its folder: mv {name} {name}.damaged; head -c "
    "{pos} {name}.damaged > {name}; rm -f {name}.index (keep {name}.damaged, as FileStorage "
    "keeps its .trN files). See \"A damaged file or record\" in docs/operations.md."
)


def _recovery(name: str, pos: int) -> str:
    return _CUT_RECOVERY.format(name=os.path.basename(name), pos=pos)


# --- the connection: one place where raw read errors become CorruptHeapError -------------------


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# -- PROTECTED: ZODB.Connection.Connection internals (ZODB 6.4) --
# Overrides ``setstate`` and ``get`` (where every load passes), and reads the
# connection's ``_storage``, ``_reader`` (an ObjectReader: ``getState``), ``_db``
# and ``before`` (None unless historical): ZODB offers no hook for load errors.
# tests/test_zodb_internals.py pins them.
class CheckedConnection(_allow.Connection):
    """ZODB's Connection, with read errors of damaged records turned into `CorruptHeapError`.

    It extends the allowlist's connection (`durable_heap._allow.Connection`, which
    names the record a refused class came from): a refusal passes through as it is.

    ZODB trap: every object's state is loaded by ``Connection.setstate`` (persistent
    calls ``jar.setstate(obj)`` to unghost an object) and every object fetched by
    oid alone by ``Connection.get``; ``DB.klass`` names the class the DB makes its
    connections from. There they fail raw: ``POSKeyError`` for a reference to a
    record that is not there, ``CorruptedDataError`` for a header naming another
    oid, ``ValueError("Non-zero version length...")`` for a damaged header, and
    ``StateLoadError`` with an empty message for a pickle that does not load.
    (tests/test_damage.py checks that ZODB still calls these.)
    """

    def setstate(self, obj: Any) -> None:
        try:
            super().setstate(obj)
        except CorruptHeapError as exc:
            details = getattr(exc, "_dh_reason", None)
            if details is None or exc.oid != obj._p_oid:
                raise
            path, serial = exc._dh_path, exc._dh_serial  # type: ignore[attr-defined]
            raise record_error(path, obj._p_oid, details, offset=exc.offset, cls=_class_name(obj),
                               serial=serial) from exc
        except (DurableHeapError, ZODB.POSException.ConflictError):
            raise
        except ZODB.POSException.StateLoadError as exc:
            cause = exc.__cause__
            if isinstance(cause, DurableHeapError):
                raise cause from None  # e.g. ClassNotAllowedError from the class factory
            if not self._unpickles(obj._p_oid):
                reason = f"cannot be unpickled ({_describe(cause) if cause else 'StateLoadError'})"
                raise self._damaged(obj, reason) from exc
            raise  # the record loads: the class's __setstate__ failed, not the heap
        except ZODB.POSException.POSKeyError as exc:
            if self.before is not None:
                raise  # a historical connection: that revision was packed away, not damaged
            raise self._damaged(obj, "is missing, although another record refers to it") from exc
        except CorruptedError as exc:
            raise self._damaged(obj, f"cannot be read ({_describe(exc)})") from exc
        except ValueError as exc:
            if not _damage_value_error(exc):
                raise
            raise self._damaged(obj, f"cannot be read ({_describe(exc)})") from exc
        except Exception as exc:
            # A CorruptHeapError raised on a ZEO server arrives as ZEO's ServerException.
            err = translate_storage_error(exc, action="load", cls=_class_name(obj))
            if err is exc:
                raise
            raise err from None

    def get(self, oid: bytes) -> Any:
        try:
            return super().get(oid)
        except (DurableHeapError, ZODB.POSException.POSKeyError, ZODB.POSException.ConflictError):
            raise  # a missing oid asked for by number is the caller's KeyError
        except (CorruptedError, pickle.UnpicklingError, EOFError) as exc:
            raise record_error(self._heap_path(), oid, f"cannot be read ({_describe(exc)})") from exc
        except ValueError as exc:
            if not _damage_value_error(exc):
                raise
            raise record_error(self._heap_path(), oid, f"cannot be read ({_describe(exc)})") from exc
        except Exception as exc:
            err = translate_storage_error(exc, action="load")
            if err is exc:
                raise
            raise err from None

    def _damaged(self, obj: Any, reason: str) -> CorruptHeapError:
        return record_error(self._heap_path(), obj._p_oid, reason, cls=_class_name(obj))

    def _unpickles(self, oid: bytes) -> bool:
        """Whether `oid`'s record unpickles (so a StateLoadError came from ``__setstate__``)."""
        try:
            p, _ = self._storage.load(oid)
            self._reader.getState(p)
        except ZODB.POSException.StateLoadError:
            return False
        except Exception:  # noqa: BLE001 - anything else is not a pickle that fails to load
            return True
        return True

    def _heap_path(self) -> str:
        storage = self._db.storage
        return str(getattr(storage, "_path", None) or storage.getName())


# -- end PROTECTED --


class CheckedDB(_allow.DB):
    """ZODB's DB (the allowlist's), making `CheckedConnection` connections.

    ``klass`` is set on the class, not the instance: DB's constructor already opens
    a connection (to create the root), and the pool would hand that one out later.
    """

    klass = CheckedConnection
