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
========================  ==================================================

``zeo://`` targets take query options (``?wait_timeout=5&cache=/var/app.zec``);
`durable_heap._zeo` checks them and builds the client.

FileStorage files are created private (umask 077: the data file, its index, its
temporary and pack files are 0600); missing parent folders are created 0700.
Errors from zc.lockfile and FileStorage become `HeapLockedError` and
`NotAHeapError` here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import HeapLockedError, NotAHeapError, StorageError, UnknownTargetError

__all__ = ["ENV_STORAGE", "Target", "open_storage", "parse_target", "private_files"]

#: Environment variable naming the default target.
ENV_STORAGE = "DURABLE_HEAP_STORAGE"
DEFAULT_PATH = os.path.join(".durable-heap", "heap.fs")
# FileStorage files start with FS30 (Python 3 pickles) or FS21 (written by Python 2).
FILESTORAGE_MAGICS = (b"FS30", b"FS21")
_SCHEMES = ("file://", "memory://", "zeo://")


@dataclass(frozen=True)
class Target:
    """A parsed target: its scheme, its location and its options."""

    scheme: str  # "file", "memory" or "zeo"
    location: str  # absolute path for "file"; a name for "memory"; host:port or /socket for "zeo"
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.location
        return f"{self.scheme}://{self.location}"


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
    options = dict(parse_qsl(parts.query))
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            path = parts.netloc + path  # file://data/app.fs: a relative path
        if not path:
            raise UnknownTargetError(f"{target!r} names no file: use file:///abs/path/app.fs")
        return Target("file", os.path.abspath(os.path.expanduser(path)), options)
    if parts.scheme == "memory":
        return Target("memory", parts.netloc + parts.path, options)
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
    return _open_file_storage(target.location, read_only=read_only or _flag(target, "read_only"))


def _flag(target: Target, name: str) -> bool:
    return target.options.get(name, "").lower() in ("1", "true", "yes", "on")


def _open_file_storage(path: str, *, read_only: bool) -> Any:
    from zc.lockfile import LockError
    from ZODB.FileStorage.FileStorage import FileStorageFormatError

    from ._filestorage import FileStorage  # ZODB's, recovering from a failed write

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
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder {parent} for the heap: {exc.strerror}") from exc
    try:
        with private_files():
            return FileStorage(path, read_only=read_only)
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
