"""Targets: the one place a target string and its options are parsed (no storage opened).

========================  ==================================================
target                    storage
========================  ==================================================
``None``                  ``$DURABLE_HEAP_STORAGE``, else ``.durable-heap/heap.fs``
``path/to/app.fs``        FileStorage (the embedded default; one process)
``file:///abs/app.fs``    FileStorage
``memory://``             MappingStorage: in memory only, for unit tests
``zeo://host:port``       ZEO ClientStorage: a heap shared by processes
``zeo:///run/app.sock``   ZEO ClientStorage over a unix socket
``postgresql://u@h/db``   RelStorage on PostgreSQL: a heap for several machines
``postgresql:///db?host=/run/postgresql``  the same over a unix socket
========================  ==================================================

URL targets take query options (``file:///abs/app.fs?read_only=1``,
``zeo://host:port?wait_timeout=5``),
read by one parser from a small table per scheme (`OPTIONS`): booleans are
1/0, true/false, yes/no or on/off; numbers are finite; an unknown option is
refused with the list of those the scheme takes. A ``zeo://`` target's address
is checked here too (`parse_address`), and so is a ``postgresql://`` URL
(`check_postgresql_target`: its password goes to `Target.password`, which no text of
the target shows), so a bad target fails before anything connects. A new scheme
adds its table to `OPTIONS`, its branch to `parse_target`, and its backend to
`durable_heap._storage.open_storage`.

This is the bottom of the storage side: it imports only `_errors`, so the
dispatcher (`_storage`), the backends (`_zeo`) and the server (`_zeo_server`)
all read targets from here, and none of them imports another to parse one.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import UnknownTargetError

__all__ = [
    "DEFAULT_PATH",
    "ENV_STORAGE",
    "OPTIONS",
    "Address",
    "Option",
    "Target",
    "check_options",
    "check_postgresql_target",
    "check_zeo_target",
    "format_address",
    "option",
    "parse_address",
    "parse_target",
    "private_files",
    "target_read_only",
]

#: Environment variable naming the default target.
ENV_STORAGE = "DURABLE_HEAP_STORAGE"
DEFAULT_PATH = os.path.join(".durable-heap", "heap.fs")
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
        "keep_history": Option("bool", "1 (default): keep every revision (state_at, inspect --at); "
                               "0: a history-free database (smaller, only the current state)", True),
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
        shown = without_password(target)
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
    if parts.scheme == "zeo":
        return check_zeo_target(Target("zeo", parts.netloc + unquote(parts.path), options), target)
    if parts.scheme in ("postgresql", "postgres"):
        return check_postgresql_target(target, options)
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


# --- ZEO addresses ------------------------------------------------------------------

Address = tuple[str, int] | str


# --- addresses ---------------------------------------------------------------------


def parse_address(text: str, *, server: bool = False) -> Address:
    """``host:port`` (``[::1]:port``; a bare port means 127.0.0.1) or a unix socket path.

    >>> parse_address("127.0.0.1:8100"), parse_address("8100"), parse_address("/run/app.sock")
    (('127.0.0.1', 8100), ('127.0.0.1', 8100), '/run/app.sock')
    """
    text = text.strip()
    if "/" in text:
        return os.path.abspath(os.path.expanduser(text))
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    lowest = 0 if server else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        msg = (
            f"bad ZEO address {text!r}: use HOST:PORT such as 127.0.0.1:8100"
            + (" (port 0 picks a free port)" if server else "")
            + ", or the absolute path of a unix socket such as /run/app.sock"
        )
        raise UnknownTargetError(msg)
    return host, int(port)


def format_address(addr: Address) -> str:
    """The ``zeo://`` URL of an address.

    >>> format_address(("127.0.0.1", 8100)), format_address(("::1", 8100)), format_address("/a.sock")
    ('zeo://127.0.0.1:8100', 'zeo://[::1]:8100', 'zeo:///a.sock')
    """
    if isinstance(addr, str):
        return "zeo://" + addr
    host, port = addr[0], addr[1]
    return f"zeo://[{host}]:{port}" if ":" in host else f"zeo://{host}:{port}"


def check_zeo_target(target: Target, text: str) -> Target:
    """Check a parsed ``zeo://`` target (address and options) before anything connects."""
    location = target.location
    if not location.startswith("/"):
        location = location.rstrip("/")
    if not location:
        raise UnknownTargetError(
            f"{text!r} names no server: use zeo://HOST:PORT or zeo:///path/to/socket"
        )
    host_and_path = "/" in location and not location.startswith("/")
    if host_and_path:
        raise UnknownTargetError(
            f"{text!r} names both a host and a path: use zeo://HOST:PORT for TCP, or "
            "zeo:///absolute/path.sock (three slashes) for a unix socket"
        )
    target = check_options(Target("zeo", location, target.options))
    parse_address(location)
    return target


# --- postgresql:// -----------------------------------------------------------------------


def without_password(text: str) -> str:
    """`text` with the password of its URL (if any) replaced by ``***``."""
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc
    at = netloc.rfind("@")
    user = netloc[:at].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[at + 1:]}").geturl()


def check_postgresql_target(text: str, options: dict[str, str]) -> Target:
    """Parse a ``postgresql://`` (or ``postgres://``) target and check its options.

    The location is the URL without its password and query; the password, if
    given, goes to `Target.password`. `durable_heap._relstorage` opens it.

    >>> t = check_postgresql_target("postgresql://ann:s3cret@db.example:6543/app", {})
    >>> str(t), t.password
    ('postgresql://ann@db.example:6543/app', 's3cret')
    """
    parts = urlsplit(text)
    shown = without_password(text)
    try:
        port = parts.port
    except ValueError:
        raise UnknownTargetError(f"{shown!r}: the port must be a number from 1 to 65535") from None
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname or "/" in dbname:
        raise UnknownTargetError(
            f"{shown!r} names no database: use postgresql://USER@HOST[:PORT]/DBNAME, or "
            "postgresql:///DBNAME?host=/path/to/socket-folder for a unix socket"
        )
    host = unquote(parts.hostname or "")
    if host and options.get("host"):
        raise UnknownTargetError(f"{shown!r} names a host twice (in the address and in ?host=): give one")
    user = unquote(parts.username or "")
    netloc = (f"{user}@" if user else "") + (f"[{host}]" if ":" in host else host)
    if port is not None:
        netloc += f":{port}"
    sslmode = options.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise UnknownTargetError(f"{shown!r}: sslmode={sslmode!r} must be one of {', '.join(_SSLMODES)}")
    password = unquote(parts.password) if parts.password is not None else ""
    return check_options(Target("postgresql", f"{netloc}/{dbname}", options, password=password))


#: libpq's values of sslmode.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
