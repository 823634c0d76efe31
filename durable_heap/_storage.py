"""Targets to storages: the one place that turns a target string into a ZODB storage.

========================  ==================================================
target                    storage
========================  ==================================================
``None``                  ``$DURABLE_HEAP_STORAGE``, else ``.durable-heap/heap.fs``
``path/to/app.fs``        FileStorage (the embedded default; one process)
``file:///abs/app.fs``    FileStorage
``memory://``             MappingStorage: in memory only, for unit tests
``zeo://host:port``       ZEO ClientStorage: a heap shared by processes
``zeo:///run/app.sock``   ZEO ClientStorage over a unix socket
``postgresql://u@h/db``   RelStorage on PostgreSQL (see `durable_heap._relstorage`)
========================  ==================================================

URL targets take query options (``file:///abs/app.fs?read_only=1``,
``zeo://host:port?wait_timeout=5``),
read by one parser from a small table per scheme (`OPTIONS`): booleans are
1/0, true/false, yes/no or on/off; numbers are finite; an unknown option is
refused with the list of those the scheme takes. `durable_heap._zeo` builds the
ZEO client from a checked ``zeo://`` target.

FileStorage files are created private (umask 077: the data file, its index, its
temporary and pack files are 0600); missing parent folders are created 0700.
Errors from zc.lockfile and FileStorage become `HeapLockedError` and
`NotAHeapError` here; a damaged file is refused with `CorruptHeapError` before
FileStorage can cut it, and every record is checksummed (`_integrity`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import HeapLockedError, NotAHeapError, StorageError, UnknownTargetError

__all__ = [
    "ENV_STORAGE",
    "OPTIONS",
    "Option",
    "Target",
    "open_storage",
    "option",
    "parse_target",
    "private_files",
    "quiet_benign_logs",
    "target_read_only",
]

#: Environment variable naming the default target.
ENV_STORAGE = "DURABLE_HEAP_STORAGE"
DEFAULT_PATH = os.path.join(".durable-heap", "heap.fs")
# FileStorage files start with FS30 (Python 3 pickles) or FS21 (written by Python 2).
FILESTORAGE_MAGICS = (b"FS30", b"FS21")
_SCHEMES = ("file://", "memory://", "zeo://", "postgresql://")


@dataclass(frozen=True)
class Target:
    """A parsed target: its scheme, its location and its options."""

    scheme: str  # "file", "memory", "zeo" or "postgresql"
    location: str  # absolute path for "file"; a name for "memory"; host:port or /socket for "zeo";
    # user@host:port/dbname for "postgresql" (never its password)
    options: dict[str, str] = field(default_factory=dict)
    #: A postgresql:// target's password: in no text of the target (str, repr, notes, errors).
    password: str = field(default="", repr=False, compare=False)

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.location
        return f"{self.scheme}://{self.location}"


# --- options --------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One query option of a target: how its text reads, its default, what it means."""

    kind: str  # "bool", "number" (finite), "whole" (a whole number) or "text"
    help: str
    default: Any = None
    positive: bool = False  # a number must be > 0 (else >= 0)


_READ_ONLY = Option("bool", "1: open read-only (as read_only=True)", False)

#: The query options each target scheme takes (a new scheme adds its table).
OPTIONS: dict[str, dict[str, Option]] = {
    "file": {"read_only": _READ_ONLY},
    "memory": {},
    "zeo": {
        "wait_timeout": Option("number", "seconds to wait for the server to answer (default 30)",
                               positive=True),
        "cache": Option("text", "path of a persistent client cache file, kept across restarts "
                        "(default: none)"),
        "cache_size": Option("whole", "client cache size in bytes (default 20 MB, ZEO's)"),
        "read_only": _READ_ONLY,
        "server_sync": Option("bool", "1 (default): each transaction first asks the server for "
                              "the latest commits; 0: rely on the invalidations the server "
                              "pushes (saves a round trip)", True),
        "tls_ca": Option("text", "CA certificate (PEM) that signed the server's certificate: "
                         "turns TLS on"),
        "tls_cert": Option("text", "this client's certificate (PEM), for servers that require one"),
        "tls_key": Option("text", "the key of tls_cert (PEM), unless the certificate file holds it"),
        "tls_hostname": Option("text", "the name to check the server's certificate against "
                               "(default: the host of the address; not checked over a unix socket)"),
    },
    "postgresql": {
        "keep_history": Option("bool", "1 (default): keep every revision (state_at, inspect --at, "
                               "rollback by time); 0: a history-free database (smaller)", True),
        "read_only": _READ_ONLY,
        "wait_timeout": Option("number", "seconds to wait for the server to answer (default 30)",
                               positive=True),
        "host": Option("text", "the folder of the server's unix socket (or a host name), for "
                       "postgresql:///dbname?host=/run/postgresql"),
        "sslmode": Option("text", "libpq's sslmode: disable, prefer (libpq's default), require, "
                          "verify-ca or verify-full"),
        "cache_local_mb": Option("whole", "RelStorage's in-memory pickle cache, in MB (default 10)"),
        "cache_dir": Option("text", "a folder for RelStorage's persistent cache files, kept "
                            "across restarts (default: none)"),
        "commit_lock_timeout": Option("whole", "seconds to wait for the commit lock (default 30)",
                                      positive=True),
    },
}

_BOOLS = {
    "1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False
}


def check_options(target: Target) -> Target:
    """Refuse unknown options and unreadable values of `target` (before anything opens)."""
    table = OPTIONS[target.scheme]
    unknown = sorted(set(target.options) - set(table))
    if unknown:
        takes = f"takes {', '.join(table)}" if table else "takes no options"
        raise UnknownTargetError(
            f"{target}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"a {target.scheme}:// target {takes}"
        )
    for name in target.options:
        option(target, name)
    return target


def option(target: Target, name: str) -> Any:
    """The value of option `name` of `target`, read as its scheme's table says
    (its default when the target does not give it); `UnknownTargetError` if unreadable."""
    spec = OPTIONS[target.scheme][name]
    text = target.options.get(name)
    if text is None:
        return spec.default
    if spec.kind == "bool":
        value = _BOOLS.get(text.strip().lower())
        if value is None:
            raise UnknownTargetError(
                f"{target}: {name}={text!r} must be 1 or 0 (or true/false, yes/no, on/off)"
            )
        return value
    if spec.kind in ("number", "whole"):
        try:
            number: float = int(text) if spec.kind == "whole" else float(text)
        except ValueError:
            number = -1
        if not math.isfinite(number) or number < 0 or (spec.positive and number == 0):
            kind = "a whole number" if spec.kind == "whole" else "a number"
            raise UnknownTargetError(
                f"{target}: {name}={text!r} must be {kind} {'> 0' if spec.positive else '>= 0'}"
            )
        return number
    if not text:
        raise UnknownTargetError(f"{target}: {name}= needs a value")
    return text


def target_read_only(target: Target) -> bool:
    """Whether `target` asks to be opened read-only (``?read_only=1``)."""
    return "read_only" in OPTIONS[target.scheme] and bool(option(target, "read_only"))


# --- targets --------------------------------------------------------------------------


def parse_target(target: str | os.PathLike[str] | None) -> Target:
    """Parse `target` (see the module docstring); raise `UnknownTargetError`.

    >>> parse_target("memory://").scheme
    'memory'
    """
    if target is None:
        target = os.environ.get(ENV_STORAGE) or DEFAULT_PATH
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        msg = f"a heap target is a path or a URL string, not {type(target).__name__}"
        raise UnknownTargetError(msg)
    if not target:
        raise UnknownTargetError("the heap target is empty: give a path such as 'data/app.fs'")
    if "://" not in target:
        return Target("file", os.path.abspath(os.path.expanduser(target)))
    parts = urlsplit(target)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    options = dict(pairs)
    if len(options) < len(pairs):
        twice = sorted({k for k, _ in pairs if [n for n, _ in pairs].count(k) > 1})
        shown = target if parts.password is None else target.replace(f":{parts.password}@", ":***@", 1)
        raise UnknownTargetError(f"{shown!r} gives {', '.join(twice)} more than once: give each option once")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            path = parts.netloc + path  # file://data/app.fs: a relative path
        if not path:
            raise UnknownTargetError(f"{target!r} names no file: use file:///abs/path/app.fs")
        return check_options(Target("file", os.path.abspath(os.path.expanduser(path)), options))
    if parts.scheme == "memory":
        return check_options(Target("memory", parts.netloc + parts.path, options))
    if parts.scheme in ("postgresql", "postgres"):
        from ._relstorage import check_target

        return check_target(target, options)
    if parts.scheme == "zeo":
        from ._zeo import check_client_target

        return check_client_target(Target("zeo", parts.netloc + unquote(parts.path), options), target)
    msg = (
        f"unknown heap target scheme {parts.scheme + '://'!r} in {target!r}: use a file "
        f"path, or one of {', '.join(_SCHEMES)}"
    )
    raise UnknownTargetError(msg)


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Create files 0600 for the duration (FileStorage opens its files itself).

    The umask is process-wide; it is narrowed only while storage files are
    created, and only ever narrowed.
    """
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


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


def quiet_benign_logs() -> None:
    """Install `_BenignLogs` on ZODB.FileStorage's logger (once per process)."""
    logger = logging.getLogger("ZODB.FileStorage")
    if not any(isinstance(f, _BenignLogs) for f in logger.filters):
        logger.addFilter(_BenignLogs())


def _open_file_storage(path: str, *, read_only: bool) -> Any:
    from zc.lockfile import LockError
    from ZODB.FileStorage.FileStorage import FileStorageFormatError

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
        try:
            # os.makedirs(mode=) gives only the last folder that mode, so every
            # missing folder is made under the private umask instead (0700).
            with private_files():
                os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder {parent} for the heap: {exc.strerror}") from exc
    try:
        with private_files():
            # Checked before FileStorage's scan can cut the file (CorruptHeapError,
            # the file untouched); records sealed and checked (see _integrity).
            if read_only:  # one that follows the writer's commits (see _follow)
                return ChecksumStorage(FollowingFileStorage(path))
            return ChecksumStorage(CheckedFileStorage(path, read_only=read_only))
    except LockError:
        raise HeapLockedError(_locked_message(path)) from None
    except FileStorageFormatError:
        raise NotAHeapError(_not_a_heap(path)) from None
    except PermissionError as exc:
        raise StorageError(f"cannot open the heap {path}: permission denied ({exc.filename})") from exc


def _check_magic(path: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise StorageError(f"cannot read the heap {path}: {exc.strerror}") from exc
    if head and head not in FILESTORAGE_MAGICS:
        raise NotAHeapError(_not_a_heap(path))


def _not_a_heap(path: str) -> str:
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
