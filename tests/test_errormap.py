"""The one error map (`durable_heap._errormap`): ZODB's, ZEO's, zc.lockfile's and the
OS's errors become ours, most specific first; anything else passes unchanged.

The end-to-end cases (a locked heap, a file that is not a heap, no ZEO server, bad
TLS files, a busy address) are in test_heap, test_cli and test_zeo; here the map's
own rules, on real exceptions raised by the real libraries.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import transaction
import zc.lockfile
import ZODB.POSException

import durable_heap as dh
from durable_heap._errormap import (
    disconnected,
    is_fault,
    outcome_unknown,
    reason,
    storage_errors,
    translate_storage_error,
)


def _raised(func: object, *args: object) -> BaseException:
    try:
        func(*args)  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001 - the exception is the test's subject
        return exc
    raise AssertionError("nothing raised")


def test_a_folder_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(dh.StorageError, match=r"cannot create the folder .*file/sub for the heap") as info:
        dh.open(tmp_path / "file" / "sub" / "app.fs")
    assert isinstance(info.value.__cause__, OSError)  # the OS's details kept as the cause


def test_a_held_lock_is_heap_locked_and_names_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "app.fs")
    lock = zc.lockfile.LockFile(path + ".lock")  # this process holds it, as FileStorage would
    try:
        exc = _raised(zc.lockfile.LockFile, path + ".lock")
        err = translate_storage_error(exc, path, action="open")
        assert isinstance(err, dh.HeapLockedError)
        assert "already open in this process" in str(err)
        assert err.__cause__ is None and err.__suppress_context__  # as `from None`
        # The same LockError from a ZEO client's cache file says that instead.
        cache = translate_storage_error(exc, "zeo://h:1", action="connect", cache="/c.zec")
        assert type(cache) is dh.StorageError and "client cache /c.zec is in use" in str(cache)
    finally:
        lock.close()


def test_os_errors_by_action(tmp_path: Path) -> None:
    missing = tmp_path / "missing.fs"
    exc = _raised(open, missing, "rb")
    assert isinstance(exc, FileNotFoundError)
    read = translate_storage_error(exc, str(missing), action="read")
    assert isinstance(read, dh.StorageError) and read.__cause__ is exc
    assert str(read) == f"cannot read the heap {missing}: No such file or directory"
    # PermissionError is an OSError: at open it is worded as such, elsewhere not mapped.
    denied = PermissionError(errno.EACCES, "Permission denied", str(missing))
    assert "permission denied" in str(translate_storage_error(denied, str(missing), action="open"))
    assert translate_storage_error(exc, str(missing), action="open") is exc
    busy = OSError(errno.EADDRINUSE, "Address already in use")
    listen = translate_storage_error(busy, action="listen", address=("127.0.0.1", 8100))
    assert str(listen).startswith("cannot listen on zeo://127.0.0.1:8100: Address already in use.")


def test_most_specific_first_and_the_rest_unchanged() -> None:
    ours = dh.CorruptHeapError("damaged")
    assert translate_storage_error(ours, "x", action="open") is ours  # already ours
    other = ValueError("not a storage error")
    for action in ("open", "create", "read", "connect", "tls", "listen", "load", "commit"):
        assert translate_storage_error(other, "x", action=action) is other  # type: ignore[arg-type]
    read_only = ZODB.POSException.ReadOnlyError()
    err = translate_storage_error(read_only, action="commit")
    assert type(err) is dh.StorageError and err.__cause__ is read_only
    assert translate_storage_error(read_only, action="open") is read_only


def test_a_reader_that_cannot_follow_wraps_even_our_own_error() -> None:
    scan = dh.CorruptHeapError("the heap is damaged at offset 99", offset=99)
    err = translate_storage_error(scan, "/data/app.fs", action="follow", offset=99)
    assert isinstance(err, dh.CorruptHeapError) and err.offset == 99 and err.__cause__ is scan
    assert "a read-only reader cannot follow at offset 99" in str(err)


def test_storage_errors_raises_the_mapped_error_and_passes_the_rest() -> None:
    with pytest.raises(dh.StorageError, match="cannot read the heap /x") as info:
        with storage_errors("/x", action="read"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(KeyError):
        with storage_errors("/x", action="read"):
            raise KeyError("unrelated")


def test_classifiers() -> None:
    assert is_fault(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_fault(OSError(errno.ENOSPC, "x"), in_program=True)  # the program's own
    assert is_fault(ZODB.POSException.POSKeyError(b"\0" * 8))
    assert not is_fault(ZODB.POSException.ReadOnlyError())
    assert not is_fault(ZODB.POSException.ConflictError())
    assert not is_fault(dh.StorageError("ours"))
    assert not disconnected(OSError())
    assert reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full (ENOSPC)"
    assert reason(RuntimeError("boom")) == "RuntimeError: boom"
    # Without the transaction package's vote book, assume the worst.
    assert outcome_unknown(object())
    txn = transaction.TransactionManager(explicit=True).begin()
    assert not outcome_unknown(txn)  # no resource joined: nothing to commit
    txn.abort()


def test_no_state_at_a_time_is_said_as_such_and_only_for_history() -> None:
    """`state_at` before the heap existed or after a pack: a POSKeyError (or the root's
    missing key) says there is no state then; at another action it is not ours to map."""
    import ZODB.POSException

    gone = ZODB.POSException.POSKeyError(b"\0" * 8)
    err = translate_storage_error(gone, "version 1", action="history")
    assert isinstance(err, dh.StorageError) and err.__cause__ is gone
    assert str(err).startswith("the heap holds no state at version 1: it did not exist yet")
    assert "removed by a pack" in str(translate_storage_error(KeyError("x"), "t", action="history"))
    assert translate_storage_error(gone, "t", action="load") is gone
