"""Targets to storages: the one place that turns a parsed target into a ZODB storage.

A target string is parsed, and its options checked, by `durable_heap._targets`
(``file``, ``memory``, ``zeo`` and ``postgresql`` schemes; see the table there); here
`open_storage` opens the storage it names: a checked, checksummed FileStorage
(below), a MappingStorage, ZEO's client (`durable_heap._zeo`) or RelStorage on
PostgreSQL (`durable_heap._relstorage`).

FileStorage files are created private (umask 077: the data file, its index, its
temporary and pack files are 0600); missing parent folders are created 0700.
Errors from zc.lockfile, FileStorage and the OS become `HeapLockedError`,
`NotAHeapError` and `StorageError` through the one error map
(`durable_heap._errormap`); a damaged file is refused with `CorruptHeapError` before
FileStorage can cut it, and every record is checksummed (`_integrity`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ._errormap import not_a_heap, storage_errors
from ._errors import NotAHeapError, StorageError
from ._targets import Target, private_files, target_read_only

__all__ = ["FILESTORAGE_MAGICS", "open_storage", "quiet_benign_logs"]

# FileStorage files start with FS30 (Python 3 pickles) or FS21 (written by Python 2).
FILESTORAGE_MAGICS = (b"FS30", b"FS21")


def open_storage(target: Target, *, read_only: bool = False) -> Any:
    """Open the ZODB storage for a parsed target."""
    if target.scheme == "memory":
        from ZODB.MappingStorage import MappingStorage

        return MappingStorage(target.location or "memory")
    if target.scheme == "zeo":
        from ._zeo import open_client

        return open_client(target, read_only=read_only)
    if target.scheme == "postgresql":
        from ._relstorage import open_relstorage

        return open_relstorage(target, read_only=read_only)
    quiet_benign_logs()
    return _open_file_storage(target.location, read_only=read_only or target_read_only(target))


# -- PROTECTED: the text of a ZODB.FileStorage log line (ZODB 6.4, FileStorage._sane) --
# Matched by its format string, which ZODB does not promise to keep: a changed
# text only lets the line through again (noise, nothing lost).
# tests/test_zodb_internals.py pins it.
class _BenignLogs(logging.Filter):
    """Drops the log lines of FileStorage's routine recovery, which say nothing
    the user must act on, so that they do not reach the stderr of scripts and of
    `durable-heap inspect` (Python's last-resort handler prints warnings).

    Exactly these format strings, at WARNING or below; every other line of
    ZODB.FileStorage (truncations, damaged records, clock trouble) passes.
    """

    BENIGN = frozenset({
        # ZODB.FileStorage._sane: the .index does not match the file (written when
        # the heap was created, before a crash, or before a pack); the file is
        # scanned instead, which is the normal way to open it without an index.
        "Ignoring index for %s",
    })

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and record.msg in self.BENIGN)


# -- end PROTECTED --


def quiet_benign_logs() -> None:
    """Install `_BenignLogs` on ZODB.FileStorage's logger (once per process)."""
    logger = logging.getLogger("ZODB.FileStorage")
    if not any(isinstance(f, _BenignLogs) for f in logger.filters):
        logger.addFilter(_BenignLogs())


def _open_file_storage(path: str, *, read_only: bool) -> Any:
    from ._follow import FollowingFileStorage
    from ._integrity import CheckedFileStorage, ChecksumStorage

    exists = os.path.exists(path)
    if exists and os.path.isdir(path):
        raise NotAHeapError(f"{path} is a folder: a heap target names a file such as {path}/app.fs")
    if exists:
        _check_magic(path)
    elif read_only:
        raise StorageError(f"there is no heap at {path}: it cannot be opened read-only before it exists")
    else:
        parent = os.path.dirname(path)
        # os.makedirs(mode=) gives only the last folder that mode, so every
        # missing folder is made under the private umask instead (0700).
        with storage_errors(parent, action="create"), private_files():
            os.makedirs(parent, exist_ok=True)
    # zc.lockfile's LockError: HeapLockedError; FileStorageFormatError: NotAHeapError.
    with storage_errors(path, action="open"), private_files():
        # Checked before FileStorage's scan can cut the file (CorruptHeapError,
        # the file untouched); records sealed and checked (see _integrity).
        if read_only:  # one that follows the writer's commits (see _follow)
            return ChecksumStorage(FollowingFileStorage(path))
        return ChecksumStorage(CheckedFileStorage(path, read_only=read_only))


def _check_magic(path: str) -> None:
    with storage_errors(path, action="read"), open(path, "rb") as f:
        head = f.read(4)
    if head and head not in FILESTORAGE_MAGICS:
        raise NotAHeapError(not_a_heap(path))
