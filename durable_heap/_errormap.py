"""The one map from ZODB's, ZEO's, zc.lockfile's and the OS's errors to durable_heap's.

`translate_storage_error(exc, where, action=...)` returns our error for `exc`
(or `exc` itself when it is not one to map), checked most specific first; the
`storage_errors` context manager raises it for whatever its block raises
(httpx's ``map_httpcore_exceptions`` is the model)::

    with storage_errors(path, action="open"):
        storage = FileStorage(path)

The same exception means different things at different places (a
``zc.lockfile.LockError`` is a heap held by another process when a FileStorage
opens, a client cache in use when a ZEO client starts), so each call says what
it was doing (`Action`):

===============  =====================================  ==================================
action           ``where`` is                           maps
===============  =====================================  ==================================
``open``         the heap file's path                   LockError, FileStorageFormatError,
                                                        PermissionError
``create``       the folder being created               OSError
``read``         the heap file's path                   OSError
``connect``      the ``zeo://`` target                  ClientDisconnected, LockError
``connect``      the ``postgresql://`` target           psycopg2's OperationalError (a
                                                        refused login, no database, no
                                                        server; lost while opening)
``open``         the ``postgresql://`` target           RelStorage's schema mismatch
``tls``          the TLS files, comma-separated         OSError (ssl.SSLError among them)
``listen``       the server's address (a zeo:// URL)    OSError
``follow``       the heap file's path                   anything (a reader cannot follow)
``load``         (not used: the record names its heap)  ZEO's ServerException of ours
``commit``       the target                             ReadOnlyError
``history``      the time or version asked for          POSKeyError, KeyError (none then)
===============  =====================================  ==================================

(``commit`` is the heap's commit: ``HeapEngine._transaction`` maps its errors here.)

Below the map, the classifiers the heap's transaction runner uses to tell a
fault of the storage from a conflict or the program's own error (`is_fault`,
`disconnected`, `outcome_unknown`) and the wording of an OS error (`reason`, and
`remedy`: what to do about it).
The transaction runner's own messages (``HeapEngine._fault``: a commit cut off, with
whether it may have been committed) stay with it, since they depend on the
heap's state.

ZEO and psycopg2 are never imported here: their exception classes are looked up in
``sys.modules`` (a process that never imported them cannot have raised them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ZODB.POSException
from zc.lockfile import LockError
from ZODB.FileStorage.FileStorage import FileStorageFormatError
from ZODB.FileStorage.format import CorruptedError
from ZODB.utils import oid_repr, tid_repr, z64

from ._errors import (
    CorruptHeapError,
    DurableHeapError,
    HeapLockedError,
    NotAHeapError,
    ServerUnavailableError,
    StorageError,
)
from ._targets import Address, format_address

__all__ = [
    "ERRNO_REASONS",
    "READ_ERRORS",
    "RECOVER",
    "Action",
    "describe",
    "disconnected",
    "is_damage_value_error",
    "is_fault",
    "not_a_heap",
    "outcome_unknown",
    "pg_disconnected",
    "reason",
    "record_error",
    "remedy",
    "storage_errors",
    "translate_storage_error",
    "wrong_history_mode",
]

#: What a caller of `translate_storage_error` was doing (see the module's table).
Action = Literal["open", "create", "read", "connect", "tls", "listen", "follow", "load", "commit",
                 "history"]


# --- the map -------------------------------------------------------------------------------


def translate_storage_error(
    exc: BaseException,
    where: str = "",
    *,
    action: Action,
    wait: float | None = None,
    tls: bool = False,
    cache: str | None = None,
    location: str = "",
    hint: str = "",
    address: Address | None = None,
    offset: int | None = None,
    cls: str | None = None,
    secret: str = "",
    keep_history: bool = True,
) -> BaseException:
    """Our error for `exc`, raised while doing `action` on `where`; `exc` itself if none.

    The keywords carry what a message needs: ``connect`` its `wait` (seconds),
    whether it used `tls`, its `cache` file and the server's `location`
    (``host:port`` or a socket path); ``tls`` the `hint` naming the options to
    check; ``listen`` the parsed `address`; ``follow`` the `offset` it reached;
    ``load`` the class `cls` of the object being loaded.

    The returned error's cause is already set, as ``raise ... from`` would: the
    original error when its details help (an OS error's file name), none when
    the message says everything. So raise it as it is: ``raise translate_storage_error(...)``.
    """
    site = _Site(where, wait, tls, cache, location, hint, address, offset, cls, secret, keep_history)
    # A reader that cannot follow its file's change: whatever went wrong, even our
    # own CorruptHeapError from the scan, is reported as that.
    if action == "follow":
        return _cannot_follow(exc, site)
    if isinstance(exc, DurableHeapError):
        return exc  # already ours
    for kind, actions, build in _MAP:
        if action in actions and isinstance(exc, _resolve(kind)):
            found = build(exc, site)
            if found is not None:
                return found
    return exc


@contextlib.contextmanager
def storage_errors(where: str = "", *, action: Action, **details: Any) -> Iterator[None]:
    """Raise `translate_storage_error`'s error for what the block raises (the rest unchanged)."""
    try:
        yield
    except Exception as exc:
        err = translate_storage_error(exc, where, action=action, **details)
        if err is exc:
            raise
        raise err from err.__cause__  # the cause translate_storage_error chose


@dataclass(frozen=True)
class _Site:
    """Where an error was raised: what `translate_storage_error` was told."""

    where: str
    wait: float | None
    tls: bool
    cache: str | None
    location: str
    hint: str
    address: Address | None
    offset: int | None
    cls: str | None
    secret: str = ""  # a password no message may show (postgresql://)
    keep_history: bool = True  # the history mode a postgresql:// target asked for


def _caused(err: BaseException, cause: BaseException | None) -> BaseException:
    """`err` as ``raise err from cause`` leaves it (None: ``from None``)."""
    err.__cause__ = cause
    err.__suppress_context__ = True
    return err


def _resolve(kind: type | str) -> type | tuple[()]:
    """A class, or one named ``module:Name`` if its module is imported (else matches nothing).

    ZEO is never imported here: a process that did not import it cannot have raised its errors.
    """
    if isinstance(kind, type):
        return kind
    module, _, name = kind.partition(":")
    found = sys.modules.get(module)
    return getattr(found, name) if found is not None else ()


def _cannot_follow(exc: BaseException, s: _Site) -> BaseException:
    return _caused(CorruptHeapError(
        f"the heap {s.where} changed in a way a read-only reader cannot follow at offset "
        f"{s.offset} ({exc}). Nothing was read from the changed part; open the heap again, "
        "and if that fails too, restore it from a backup (docs/operations.md, When things "
        "go wrong).",
        offset=s.offset,
    ), exc)


def _server_sent(exc: BaseException, s: _Site) -> BaseException | None:
    found = _from_server(exc, s.cls)
    return None if found is None else _caused(found, None)


def _no_server(exc: BaseException, s: _Site) -> BaseException:
    over = " over TLS (check the tls_* options and that the server uses TLS)" if s.tls else ""
    return _caused(ServerUnavailableError(
        f"no ZEO server answered at {s.where} within {s.wait:g} s{over}: start one with "
        f"`durable-heap zeo --storage FILE --address {s.location}`, or fix the "
        "address (a longer wait: ?wait_timeout=SECONDS)"
    ), None)


def _locked(exc: BaseException, s: _Site) -> BaseException:
    return _caused(HeapLockedError(_locked_message(s.where)), None)


def _cache_locked(exc: BaseException, s: _Site) -> BaseException:
    return _caused(StorageError(
        f"the ZEO client cache {s.cache} is in use by another process: "
        "give each process its own cache=PATH"
    ), None)


def _not_a_heap(exc: BaseException, s: _Site) -> BaseException:
    return _caused(NotAHeapError(not_a_heap(s.where)), None)


def _read_only(exc: BaseException, s: _Site) -> BaseException:
    return _caused(StorageError("the heap is open read-only: changes cannot be committed"), exc)


def _no_state_then(exc: BaseException, s: _Site) -> BaseException:
    return _caused(StorageError(
        f"the heap holds no state at {s.where}: it did not exist yet, or the revisions of "
        "that time were removed by a pack"
    ), exc)


def _denied(exc: BaseException, s: _Site) -> BaseException:
    filename = exc.filename if isinstance(exc, OSError) else None
    return _caused(StorageError(f"cannot open the heap {s.where}: permission denied ({filename})"), exc)


def _bad_tls_files(exc: BaseException, s: _Site) -> BaseException:
    why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return _caused(StorageError(f"cannot use the TLS files {s.where}: {why}. {s.hint}"), None)


def _no_folder(exc: BaseException, s: _Site) -> BaseException:
    why = exc.strerror if isinstance(exc, OSError) else exc
    return _caused(StorageError(f"cannot create the folder {s.where} for the heap: {why}"), exc)


def _unreadable(exc: BaseException, s: _Site) -> BaseException:
    why = exc.strerror if isinstance(exc, OSError) else exc
    return _caused(StorageError(f"cannot read the heap {s.where}: {why}"), exc)


def _cannot_listen(exc: BaseException, s: _Site) -> BaseException | None:
    if s.address is None or not isinstance(exc, OSError):
        return None
    return _caused(StorageError(_listen_error(s.address, exc)), None)


def _hide(text: str, s: _Site) -> str:
    return text.replace(s.secret, "***") if s.secret else text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _pg_connect(exc: BaseException, s: _Site) -> BaseException:
    """psycopg2's error for a connection attempt: a refusal (raised at once by the
    caller) or no server (`ServerUnavailableError`: the caller retries until its wait)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(s.where)
    user = unquote(parts.username or "") or os.environ.get("PGUSER") or "(the login name)"
    dbname = unquote(parts.path.lstrip("/"))
    why = _hide(_first_line(exc), s)
    low = str(exc).lower()
    if ("authentication failed" in low or "no password supplied" in low
            or ("role" in low and "does not exist" in low)):
        return _caused(StorageError(
            f"PostgreSQL at {s.location} refused the login of user {user!r} to {s.where} ({why}). "
            "Check the user and the password: in the URL (postgresql://USER:PASSWORD@HOST/DB), "
            "in $PGPASSWORD, or in ~/.pgpass."
        ), None)
    if "database" in low and "does not exist" in low:
        return _caused(StorageError(
            f"the database {dbname!r} does not exist on the PostgreSQL server at {s.location}: "
            f"create it (createdb {dbname}, or CREATE DATABASE in psql); durable_heap creates "
            "the tables in it at the first open."
        ), None)
    if "permission denied" in low:
        return _caused(StorageError(
            f"PostgreSQL at {s.location} refused user {user!r} the database of {s.where} ({why}): "
            "grant it CONNECT and CREATE there."
        ), None)
    if not any(sign in low for sign in _NO_SERVER):
        return _caused(StorageError(
            f"PostgreSQL at {s.location} refused the connection to {s.where} ({why}): check the "
            "target's options (sslmode) and the server's settings (pg_hba.conf, ssl)"
        ), None)
    if s.wait is None:  # lost while RelStorage opened the heap
        return _caused(ServerUnavailableError(
            f"lost the PostgreSQL server at {s.location} while opening {s.where} ({why}): "
            "open it again once the server is back"
        ), None)
    return _caused(ServerUnavailableError(
        f"no PostgreSQL server answered at {s.location} for {s.where} within {s.wait:g} s "
        f"({why}): start it, or fix the address (a longer wait: ?wait_timeout=SECONDS)"
    ), None)


#: libpq's words for a server that is not there (yet): waited for, up to wait_timeout.
_NO_SERVER = (
    "connection refused", "no such file or directory", "could not connect", "timeout expired",
    "could not translate host name", "the database system is", "server closed the connection",
    "terminating connection", "network is unreachable", "no route to host", "connection reset",
)


def wrong_history_mode(where: str, keep_history: bool) -> str:
    """The message of a postgresql:// target whose database keeps the other history mode."""
    has, wants = ("history-free", "keep_history=0") if keep_history else ("history-preserving",
                                                                           "keep_history=1")
    return (
        f"the database of {where} holds a {has} RelStorage heap, and the target asks for the "
        f"other kind: open it with ?{wants}, or move it into a new database with "
        "`durable-heap copy SOURCE TARGET`"
    )


def _pg_schema(exc: BaseException, s: _Site) -> BaseException | None:
    text = str(exc)
    if "Schema mismatch" in text and "history" in text:
        return _caused(StorageError(wrong_history_mode(s.where, s.keep_history)), None)
    return None


_Build = Callable[[BaseException, _Site], "BaseException | None"]

#: (their error, the actions where it is mapped, our error), most specific first: the
#: first entry whose class and action match decides. ZEO's classes are named, not
#: imported (`_resolve`); ClientDisconnected is also a ZODB StorageError, ssl.SSLError
#: and PermissionError are OSErrors.
_MAP: list[tuple[type | str, frozenset[str], _Build]] = [
    ("ZEO.Exceptions:ServerException", frozenset({"load"}), _server_sent),
    ("ZEO.Exceptions:ClientDisconnected", frozenset({"connect"}), _no_server),
    (LockError, frozenset({"open"}), _locked),
    (LockError, frozenset({"connect"}), _cache_locked),
    (FileStorageFormatError, frozenset({"open"}), _not_a_heap),
    (ZODB.POSException.ReadOnlyError, frozenset({"commit"}), _read_only),
    (ZODB.POSException.POSKeyError, frozenset({"history"}), _no_state_then),
    (KeyError, frozenset({"history"}), _no_state_then),  # the root had no state key yet
    (PermissionError, frozenset({"open"}), _denied),
    (OSError, frozenset({"tls"}), _bad_tls_files),
    (OSError, frozenset({"create"}), _no_folder),
    (OSError, frozenset({"read"}), _unreadable),
    (OSError, frozenset({"listen"}), _cannot_listen),
    ("psycopg2:OperationalError", frozenset({"connect"}), _pg_connect),
    ("psycopg2:DatabaseError", frozenset({"connect"}), _pg_connect),  # a dropped connection
    (ZODB.POSException.StorageError, frozenset({"open"}), _pg_schema),
]


# --- messages ------------------------------------------------------------------------------


def not_a_heap(path: str) -> str:
    """The message of a file that is not a FileStorage."""
    return (
        f"{path} is not a heap (a ZODB FileStorage file); it was not modified. "
        "Choose another path for the heap."
    )


def _locked_message(path: str) -> str:
    pid = ""
    try:
        with open(path + ".lock") as f:
            pid = f.read().strip().split()[0]
    except (OSError, IndexError):
        pass
    if pid == str(os.getpid()):
        return (
            f"the heap {path} is already open in this process: use that Heap (it "
            "serves every thread) or close it before opening the file again."
        )
    holder = f" (process {pid})" if pid.isdigit() else ""
    return (
        f"the heap {path} is open in another process{holder}. A FileStorage has one "
        "writer process: stop the other one, or share the heap between processes "
        "through a ZEO server (a zeo:// target)."
    )


def _listen_error(addr: Address, exc: OSError) -> str:
    """Why the server cannot listen at `addr`, and what to do, for `exc` from binding."""
    where = f"cannot listen on {format_address(addr)}"
    folder = os.path.dirname(addr) if isinstance(addr, str) else ""
    if folder and not os.path.isdir(folder):
        return (
            f"{where}: the folder {folder} does not exist. Create it (mkdir -m 700 -p {folder}) "
            "or choose another --address"
        )
    why = exc.strerror or str(exc)
    other = "(port 0 picks a free one)" if isinstance(addr, tuple) else "(another socket path)"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: {why}. Is another server running there? Choose another --address {other}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"{where}: {why}. Choose an --address this user may listen on (a port above "
                "1023, or a socket in a folder it can write)")
    return f"{where}: {why}. Choose another --address {other}"


# --- damaged records ---------------------------------------------------------------------------

#: What FileStorage raises for a record whose header is damaged (see
#: ``_integrity.ChecksumStorage._unreadable``).
READ_ERRORS = (CorruptedError, ValueError, OverflowError, MemoryError, struct.error)

RECOVER = 'Restore the heap from a backup; see "A damaged file or record" in docs/operations.md.'


def is_damage_value_error(exc: ValueError) -> bool:
    """Whether a ValueError from a load is FileStorage's for a damaged header."""
    return "version length" in str(exc)


def record_error(
    path: str,
    oid: bytes,
    reason: str,
    *,
    offset: int | None = None,
    cls: str | None = None,
    serial: bytes | None = None,
) -> CorruptHeapError:
    """A `CorruptHeapError` for one damaged record, in whole sentences.

    `path`, `reason` and `serial` are kept on the error (``_dh_*``) so that the
    connection that loaded it can say the same with the object's class added.
    """
    what = f"object {oid_repr(oid)}"
    if oid == z64:
        what += " (the heap's root)"
    elif cls:
        what += f" (a {cls})"
    where = f" at offset {offset}" if offset is not None else ""
    rev = f", revision {tid_repr(serial)}," if serial else ""
    msg = (
        f"the heap {path} is damaged: the record of {what}{rev}{where} {reason}, so it was "
        f"not read (nothing was changed). {RECOVER}"
    )
    err = CorruptHeapError(msg, oid=oid, offset=offset)
    err._dh_path, err._dh_reason, err._dh_serial = path, reason, serial  # type: ignore[attr-defined]
    return err


def _from_server(exc: BaseException, cls: str | None) -> CorruptHeapError | None:
    """The `CorruptHeapError` a ZEO server raised, rebuilt on the client (None: another error).

    ZEO trap: ZEO 5 sends an exception as its class name and ``__dict__``, and a
    client rebuilds only the ZODB errors it knows; any other arrives as
    ``ServerException(class_name, dict)``, the message lost. The server's
    checksum wrapper keeps the details in the dict (`record_error`).
    """
    args = exc.args
    if len(args) != 2 or args[0] != f"{CorruptHeapError.__module__}.{CorruptHeapError.__name__}":
        return None
    info = args[1] if isinstance(args[1], dict) else {}
    oid, why = info.get("oid"), info.get("_dh_reason")
    if isinstance(oid, bytes) and isinstance(why, str):
        return record_error(f"{info.get('_dh_path')} (on the ZEO server)", oid, why,
                            offset=info.get("offset"), cls=cls, serial=info.get("_dh_serial"))
    return CorruptHeapError(
        f"the ZEO server reports that its heap is damaged ({info}). {RECOVER}",
        oid=oid if isinstance(oid, bytes) else None,
    )


# --- classifying the faults of a transaction ------------------------------------------------


def disconnected(exc: BaseException) -> bool:
    """True for ZEO's ClientDisconnected and for a lost PostgreSQL connection
    (`pg_disconnected`), without importing ZEO or psycopg2 for heaps that do not use them."""
    zeo_errors = sys.modules.get("ZEO.Exceptions")
    return (zeo_errors is not None and isinstance(exc, zeo_errors.ClientDisconnected)) or (
        pg_disconnected(exc))


def pg_disconnected(exc: BaseException) -> bool:
    """True for psycopg2's errors of a lost or refused database connection, and
    RelStorage's for a closed replica.

    psycopg2 trap (2.9): a connection the server dropped (a restart) fails with a bare
    ``DatabaseError`` ("server closed the connection unexpectedly"), not an
    OperationalError; an error the server itself reports always has a SQLSTATE
    (``pgcode``), so one without it is the connection's. Of the server's own, class
    08 (connection exception) and 57P01-57P03 (shut down, crashed, starting) are a
    lost server; others (a full disk, 53100) are faults of the storage (`is_fault`).
    """
    driver = sys.modules.get("psycopg2")
    if driver is None:
        return False
    if isinstance(exc, driver.InterfaceError):
        return True
    if isinstance(exc, driver.DatabaseError):
        code = exc.pgcode
        return code is None or code.startswith("08") or code in ("57P01", "57P02", "57P03")
    closed = sys.modules.get("relstorage.adapters.interfaces")
    return closed is not None and isinstance(exc, closed.ReplicaClosedException)


def is_fault(exc: BaseException, *, in_program: bool = False) -> bool:
    """True when the storage, or the link to it, failed (as opposed to a conflict, a
    read-only refusal or the program's own error, which ZODB aborts cleanly).

    `in_program`: raised while the program's code ran, where an OSError is its own.
    """
    if isinstance(exc, DurableHeapError):
        return False
    if disconnected(exc):
        return True
    driver = sys.modules.get("psycopg2")
    if driver is not None and isinstance(exc, driver.Error):
        return True  # PostgreSQL failed (its errors are neither OSErrors nor ZODB's)
    if isinstance(exc, OSError):
        return not in_program
    if isinstance(exc, ZODB.POSException.POSKeyError):
        return True  # a reference to a record the storage does not have
    return isinstance(exc, ZODB.POSException.StorageError) and not isinstance(
        exc, ZODB.POSException.ReadOnlyError
    )


# -- PROTECTED: transaction.Transaction._voted and ._resources (transaction 5.1) --
# Whether a failed commit may have been committed is known only from which
# resources had voted; the transaction package keeps that in these two private
# attributes and offers no public way to ask. Read with defaults (an older or
# newer transaction package assumes the worst: outcome unknown), and pinned by
# tests/test_zodb_internals.py so that a change fails there instead of here.
def outcome_unknown(txn: Any) -> bool:
    """Whether every resource of a failed commit had voted: then its outcome is unknown.

    A storage commits only in ``tpc_finish``, so a fault before every vote is in
    leaves nothing committed (ZEO's server aborts a transaction whose client went
    away before ``tpc_finish``; FileStorage truncates a failed vote's write). Reads
    transaction's private ``Transaction._voted`` (id(resource) -> True, set as each
    ``tpc_vote`` returns; transaction 5.1) and ``_resources``, both kept until the
    failed transaction is aborted. Without them, assume the worst.
    """
    voted = getattr(txn, "_voted", None)
    resources = getattr(txn, "_resources", None)
    if not isinstance(voted, dict) or not isinstance(resources, list):
        return True
    return bool(resources) and all(id(rm) in voted for rm in resources)
# -- end PROTECTED --


# --- the wording of an OS error ------------------------------------------------------------

ERRNO_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is too large: it would grow past the size limit for files (ulimit -f)",
    errno.EIO: "an input/output error",
}


def reason(exc: BaseException) -> str:
    """What failed, for a message: "the disk is full (ENOSPC)"."""
    if isinstance(exc, OSError) and exc.errno is not None:
        what = ERRNO_REASONS.get(exc.errno) or exc.strerror or str(exc)
        return f"{what} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return describe(exc)


def remedy(exc: BaseException) -> str:
    """The sentence that ends a "nothing was committed" message."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some space (or pack the heap) and run it again."
    if code == errno.EFBIG:
        return "raise the limit (ulimit -f), or pack the heap, and run it again."
    return "run it again once the cause is fixed."


def describe(exc: BaseException) -> str:
    """``TypeName: message`` (the type alone when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
