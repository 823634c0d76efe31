"""PostgreSQL: ``postgresql://`` heaps on RelStorage (the extra ``durable-heap[postgresql]``).

A heap in a PostgreSQL database, shared by processes on any number of machines,
through RelStorage 4.x and the psycopg2 driver (``psycopg2-binary``: RelStorage 4
does not speak psycopg 3). Both are imported only when such a heap is opened, so
``import durable_heap`` stays light; without them the error names the extra.

Targets::

    postgresql://user[:password]@host[:port]/dbname?options
    postgresql:///dbname?host=/path/to/socket-folder        (a unix socket)

The password may also come from ``$PGPASSWORD`` or ``~/.pgpass``, as libpq reads
them; it is never shown (the target's text, errors and transaction notes leave it
out). The target is parsed, and its options checked, in `durable_heap._targets`
(``OPTIONS["postgresql"]``, read by the one parser every target shares). Errors
are worded in `durable_heap._errormap` (action ``connect``: no server within
``wait_timeout``, a `ServerUnavailableError` naming host and port; a refused login;
a database that does not exist; action ``open``: a database whose RelStorage schema
keeps history when the target does not, or the reverse), each a sentence saying
what to do.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from ._errormap import pg_disconnected, translate_storage_error, wrong_history_mode
from ._errors import ServerUnavailableError, StorageError
from ._targets import Target, option

__all__ = [
    "DEFAULT_WAIT",
    "describe",
    "dsn",
    "open_relstorage",
]

#: Seconds to wait for the database server unless the target says (as ZEO's client does).
DEFAULT_WAIT = 30.0
_EXTRA = (
    "postgresql:// heaps need RelStorage and psycopg2: pip install 'durable-heap[postgresql]'"
)


# --- targets (parsed in durable_heap._targets) ---------------------------------------------


def _pieces(target: Target) -> dict[str, str]:
    """libpq's connection keywords for `target` (user, host, port, dbname; no password)."""
    parts = urlsplit("postgresql://" + target.location)
    out: dict[str, str] = {"dbname": unquote(parts.path.lstrip("/"))}
    if parts.username:
        out["user"] = unquote(parts.username)
    host = parts.hostname or target.options.get("host", "")
    if host:
        out["host"] = os.path.expanduser(host) if host.startswith(("/", "~")) else host
    if parts.port is not None:
        out["port"] = str(parts.port)
    if "sslmode" in target.options:
        out["sslmode"] = target.options["sslmode"]
    return out


def describe(target: Target) -> str:
    """Where a target's server is, for messages: ``host:port`` or the socket folder."""
    pieces = _pieces(target)
    host = pieces.get("host") or os.environ.get("PGHOST") or "the default socket folder"
    port = pieces.get("port") or os.environ.get("PGPORT") or "5432"
    if host.startswith("/"):
        return f"the unix socket {host}/.s.PGSQL.{port}"
    return f"{host}:{port}"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn(target: Target, *, password: bool = True) -> str:
    """The libpq connection string of `target` (with its password only when asked).

    Without a password in the URL, libpq takes one from ``$PGPASSWORD`` or ``~/.pgpass``.
    """
    pieces = _pieces(target)
    if password and target.password:
        pieces["password"] = target.password
    return " ".join(f"{k}={_quote(v)}" for k, v in pieces.items())


# --- opening -----------------------------------------------------------------------------


def _import() -> tuple[Any, Any, Any, Any]:
    """(psycopg2, PostgreSQLAdapter, RelStorage, Options), or the error naming the extra."""
    try:
        import psycopg2
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
    except ImportError as exc:
        raise StorageError(f"{_EXTRA} ({exc.name} is missing)") from None
    return psycopg2, PostgreSQLAdapter, RelStorage, Options


def _translated(exc: BaseException, target: Target, *, wait: float | None = None,
                keep_history: bool = True, action: Any = "connect") -> BaseException:
    """Our error for a driver's or RelStorage's error, from the one error map."""
    return translate_storage_error(exc, str(target), action=action, location=describe(target),
                                   wait=wait, secret=target.password, keep_history=keep_history)


def _wait_for_server(target: Target, wait: float) -> bool | None:
    """Connect once with psycopg2 (retrying for up to `wait` seconds while nobody answers),
    so that a refusal or an absent server is told apart, in our words, before RelStorage.

    Returns the history mode of the RelStorage tables in the database (True: they keep
    history), or None when it has none yet.
    """
    psycopg2, *_ = _import()
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        left = deadline - time.monotonic()
        try:
            conn = psycopg2.connect(dsn(target), connect_timeout=max(2, min(10, int(left) + 1)))
        except psycopg2.Error as exc:
            err = _translated(exc, target, wait=wait)
            if not isinstance(err, ServerUnavailableError) or time.monotonic() >= deadline:
                raise err from err.__cause__  # a refusal at once; no server after the wait
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
            continue
        try:
            with conn.cursor() as cur:
                # RelStorage trap (4.3): with create_schema on, it adds the tables of
                # its mode beside those of the other mode (failing half-way) instead
                # of refusing; so the mode is read here first. Only a
                # history-preserving schema has a "transaction" table.
                cur.execute("SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = current_schema()")
                tables = {row[0] for row in cur.fetchall()}
        finally:
            conn.close()
        if "object_state" not in tables:
            return None
        return "transaction" in tables


def open_relstorage(target: Target, *, read_only: bool = False) -> Any:
    """RelStorage on the PostgreSQL database of a checked ``postgresql://`` target.

    Creates RelStorage's tables in an empty database (unless read-only). The
    history mode is the target's ``keep_history`` (default on: ``state_at`` and
    ``inspect --at`` need it).
    """
    psycopg2, adapter_class, _, options_class = _import()
    wait = option(target, "wait_timeout")
    found = _wait_for_server(target, DEFAULT_WAIT if wait is None else wait)
    settings = _settings(target, read_only)
    keep_history = settings["keep_history"]
    if found is None and settings["read_only"]:
        raise StorageError(
            f"there is no heap in the database of {target} yet (it has no RelStorage tables): "
            "it cannot be opened read-only before it exists"
        )
    if found is not None and found != keep_history:
        raise StorageError(wrong_history_mode(str(target), keep_history))
    options = options_class(**settings)
    import ZODB.POSException

    lock = None
    try:
        if found is None:
            lock = _schema_lock(target)  # several processes creating the tables at once
        adapter = adapter_class(dsn=dsn(target), options=options)
        # RelStorage trap (4.3, psycopg2 2.9): a connection the server dropped (a
        # restart) fails with psycopg2's DatabaseError "server closed the connection
        # unexpectedly", which is not among the errors after which RelStorage opens a
        # new connection and runs a read again (LoadConnection.call, outside commits),
        # so the first transaction after a restart failed. Added here (every connection
        # of this storage shares its connmanager), before any connection is made.
        manager = adapter.connmanager
        manager._ignored_exceptions = (*manager._ignored_exceptions, psycopg2.DatabaseError)
        pool = None if options.read_only else _pool_class()(adapter.connmanager)
        return _storage_class()(adapter, options=options, name=str(target), store_connection_pool=pool)
    except Exception as exc:
        # A schema of the other history mode (made meanwhile); the server lost while opening.
        action = "open" if isinstance(exc, ZODB.POSException.StorageError) else "connect"
        err = _translated(exc, target, keep_history=keep_history, action=action)
        if err is exc:
            raise
        raise err from err.__cause__
    finally:
        if lock is not None:
            lock.close()  # ends the session: releases the advisory lock


def _settings(target: Target, read_only: bool) -> dict[str, Any]:
    """RelStorage's options (`relstorage.options.Options`) for `target`'s query options."""
    read_only = read_only or bool(option(target, "read_only"))
    settings: dict[str, Any] = {
        "keep_history": bool(option(target, "keep_history")),
        "read_only": read_only,
        "create_schema": not read_only,
    }
    if option(target, "cache_local_mb") is not None:
        settings["cache_local_mb"] = int(option(target, "cache_local_mb"))
    if option(target, "cache_dir") is not None:
        folder = os.path.abspath(os.path.expanduser(option(target, "cache_dir")))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        settings["cache_local_dir"] = folder
    if option(target, "commit_lock_timeout") is not None:
        settings["commit_lock_timeout"] = int(option(target, "commit_lock_timeout"))
    return settings


#: The key of the advisory lock held while RelStorage creates its tables (any constant).
_SCHEMA_LOCK = 0x64685F736368656D  # "dh_schem"


def _schema_lock(target: Target) -> Any:
    """A connection holding a session advisory lock, so that one process at a time creates
    RelStorage's tables. RelStorage trap (4.3): two processes opening an empty database at
    once both create them, and one fails ("duplicate key value violates unique constraint
    pg_type_typname_nsp_index"); the second one finds them made once it gets the lock."""
    psycopg2, *_ = _import()
    conn = psycopg2.connect(dsn(target))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
    return conn


_storage: type | None = None


def _storage_class() -> type:
    """RelStorage, with the allowlist in its conflict resolution.

    RelStorage trap (4.3): it resolves conflicts in the committing process, but not
    through the storage's ``tryToResolveConflict`` that `durable_heap._allow.guard_conflicts`
    guards: ``tpc_vote`` makes a resolver object of its own (``_CachedConflictResolver``,
    ZODB's ``tryToResolveConflict`` over cached states), which takes the storage's
    ``_crs_untransform_record_data`` and calls it on each record (the new state, the old
    and the committed one) just before unpickling it. So that hook checks each record
    against the guard's allowlist first (`_GuardedResolver.check_record`) and leaves the
    conflict unresolved (a ConflictError, as ZODB's own resolver does for records it
    cannot resolve) on a refusal. Each connection's storage instance (``new_instance``)
    gets the guard of the DB's one. tests/test_postgresql.py has the crafted record.
    """
    global _storage
    if _storage is None:
        from relstorage.storage import RelStorage
        from ZODB.POSException import ConflictError

        log = logging.getLogger("durable_heap.allow")

        class Storage(RelStorage):  # type: ignore[misc]
            _dh_untransform: Any = None  # what registerDB installed (the DB's hook)

            def _dh_guard(self) -> Any:
                guard = self.__dict__.get("tryToResolveConflict") or self.__dict__.get("_dh_guard_of")
                return guard if hasattr(guard, "check_record") else None

            @property
            def _crs_untransform_record_data(self) -> Any:
                untransform = self._dh_untransform or (lambda data: data)
                guard = self._dh_guard()
                if guard is None:
                    return untransform

                def checked(data: bytes) -> bytes:
                    record = untransform(data)
                    try:
                        guard.check_record(record)
                    except Exception as exc:  # noqa: BLE001 - any doubt: leave it unresolved
                        log.warning("conflict not resolved: %s", exc)
                        raise ConflictError from None
                    return record  # type: ignore[no-any-return]

                return checked

            @_crs_untransform_record_data.setter
            def _crs_untransform_record_data(self, hook: Any) -> None:
                # registerDB (the DB's hook); RelStorage's new_instance copies the parent's
                # checked one too, which new_instance below replaces with the plain one.
                self._dh_untransform = hook

            def new_instance(self, before: Any = None) -> Any:
                other = super().new_instance(before)
                guard = self._dh_guard()
                if guard is not None:
                    other.__dict__["_dh_guard_of"] = guard
                other._dh_untransform = self._dh_untransform
                return other

        _storage = Storage
    return _storage


_pool: type | None = None


def _pool_class() -> type:
    """RelStorage's pool of store connections, which drops them all when one is found dead.

    RelStorage trap (4.3): after the database server restarted, every idle store
    connection in the pool is dead, and ``StoreConnectionPool.borrow`` raises for
    each in turn (psycopg2's ``DatabaseError``, "server closed the connection
    unexpectedly", which RelStorage does not count among its reconnectable errors):
    one failed transaction per pooled connection. Borrowing comes before anything
    of the transaction is sent, so here the dead ones are dropped and one fresh
    connection is tried; a server still down still fails (and the heap reports it).
    """
    global _pool
    if _pool is None:
        from relstorage.adapters.connections import StoreConnectionPool

        class Pool(StoreConnectionPool):  # type: ignore[misc]
            def borrow(self) -> Any:
                try:
                    return super().borrow()
                except Exception as exc:
                    if not pg_disconnected(exc):
                        raise
                    self.drop_all()
                    return super().borrow()

        _pool = Pool
        logging.getLogger("relstorage.adapters.connections").addFilter(_quiet_dead_borrow)
    return _pool


def _quiet_dead_borrow(record: logging.LogRecord) -> bool:
    """Drop RelStorage's traceback for a dead pooled connection (`Pool.borrow` handles
    it), and the traceback of its "attempting reconnect" line (the line says it all)."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or not pg_disconnected(exc):
        return True
    if str(record.msg).startswith("Disconnected"):
        record.exc_info = None
        record.exc_text = None
        return True
    return not str(record.msg).startswith("Failed to borrow")
