"""ZEO's client: the storage backend of ``zeo://`` targets, and TLS contexts.

ZEO's own client (``ZEO.ClientStorage``, with two traps of a lost server taken
out: `_client_class`) with durable_heap's defaults around it: private cache
files, TLS with client certificates, one-line errors (through the error map,
`durable_heap._errormap`). The target and its address are parsed and checked by
`durable_heap._targets`; the server (``durable-heap zeo``) is
`durable_heap._zeo_server`, above this in the faces layer. ZEO is imported only
when a ``zeo://`` heap is opened, so ``import durable_heap`` stays light.

Client options (the query of a ``zeo://`` target)::

    zeo://127.0.0.1:8100?wait_timeout=5&cache=/var/cache/app.zec
    zeo:///run/app.sock?tls_ca=ca.pem&tls_cert=client.pem&tls_key=client.key
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from ._errormap import storage_errors
from ._errors import StorageError, UnknownTargetError
from ._targets import OPTIONS, Address, Target, option, parse_address, private_files

__all__ = ["CLIENT_OPTIONS", "DEFAULT_WAIT", "client_tls", "open_client", "tls_context", "trusting_pushed"]

#: Seconds a client waits for its server (to connect, or to reconnect) unless told.
DEFAULT_WAIT = 30.0

#: The options a ``zeo://`` target accepts, each with what it means (read by
#: the one option parser, from its table in `durable_heap._targets.OPTIONS`).
CLIENT_OPTIONS = {name: spec.help for name, spec in OPTIONS["zeo"].items()}

# --- TLS ---------------------------------------------------------------------------


def tls_context(server: bool, ca: str, cert: str | None, key: str | None, hint: str) -> Any:
    """A TLS context that trusts `ca` and shows `cert` (if any); bad files: StorageError.

    Also the server's (`durable_heap._zeo_server.server_tls`), with ``server=True``.
    """
    import ssl

    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    files = ", ".join(f for f in (cert, key, ca) if f)
    with storage_errors(files, action="tls", hint=hint):  # OSError, ssl.SSLError
        ctx = ssl.create_default_context(purpose, cafile=ca)
        if cert or key:
            ctx.load_cert_chain(cert or key or "", key if cert else None)
    return ctx


def client_tls(options: dict[str, str], addr: Address) -> tuple[Any, str | None]:
    """(TLS context, server name to check) for a client, or (None, None) without TLS."""
    ca, cert, key = options.get("tls_ca"), options.get("tls_cert"), options.get("tls_key")
    hostname = options.get("tls_hostname")
    if not (ca or cert or key or hostname):
        return None, None
    if not ca:
        raise UnknownTargetError(
            "a zeo:// target with TLS needs tls_ca=PATH (the CA that signed the server's "
            "certificate), and tls_cert=PATH (tls_key=PATH) for this client's certificate"
        )
    hint = "Check the target's tls_ca, tls_cert and tls_key options (PEM files)."
    ctx = tls_context(False, ca, cert, key, hint)
    if isinstance(addr, str):  # a unix socket has no host name to check
        ctx.check_hostname = bool(hostname)
        return ctx, hostname or "localhost"
    return ctx, hostname


# --- the client ----------------------------------------------------------------------


class _Pushed(threading.local):
    """Per thread: whether the next transaction begun here skips server_sync's round trip."""

    once = False


_pushed = _Pushed()


@contextlib.contextmanager
def trusting_pushed() -> Iterator[None]:
    """The first transaction this thread begins inside skips server_sync's round trip.

    With ``server_sync`` (the default) a ZEO client asks its server at each
    transaction's begin for the commits it has not heard of yet (a ``ping``:
    the answer comes after every invalidation sent before it), so that a
    transaction sees every commit acknowledged before it began. Without that
    round trip it sees every commit whose invalidation has arrived, in commit
    order: for a transaction begun *because* of one (a scheduler rung by another
    process's commit), everything up to that commit and all before it, which is
    what it acts on; commits after it are concurrent with it either way. Writes
    are checked against the latest records at the vote in both cases, so a
    stale read still ends in a conflict, and a retry asks the server again
    (only the first begin skips it). Outside ZEO, or without server_sync: no effect.
    """
    _pushed.once = True
    try:
        yield
    finally:
        _pushed.once = False


def open_client(target: Target, *, read_only: bool = False) -> Any:
    """ZEO's ClientStorage for a checked ``zeo://`` target; waits for the server."""
    addr = parse_address(target.location)
    read_only = read_only or option(target, "read_only")
    wait = option(target, "wait_timeout")
    wait = DEFAULT_WAIT if wait is None else wait
    ssl_ctx, hostname = client_tls(target.options, addr)
    kwargs: dict[str, Any] = {
        "wait_timeout": wait,
        "read_only": read_only,
        # A read-only server would refuse a read-write client over and over until
        # the wait ran out; connect read-only, then say so (below).
        "read_only_fallback": not read_only,
        "server_sync": option(target, "server_sync"),
        "ssl": ssl_ctx,
        "ssl_server_hostname": hostname,
    }
    if "cache" in target.options:
        kwargs["cache"] = os.path.abspath(os.path.expanduser(target.options["cache"]))
    size = option(target, "cache_size")
    if size is not None:
        kwargs["cache_size"] = int(size)

    # ClientDisconnected (no server within the wait): ServerUnavailableError; zc.lockfile's
    # LockError (the cache file is another process's): StorageError.
    with storage_errors(str(target), action="connect", wait=wait, tls=ssl_ctx is not None,
                        cache=kwargs.get("cache"), location=target.location), private_files():
        # the client cache file is private too
        storage = _client_class()(addr, **kwargs)
    if not read_only and storage.isReadOnly():
        storage.close()
        raise StorageError(
            f"the ZEO server at {target} serves its storage read-only (started with --read-only): "
            "open the heap read-only (read_only=True, ?read_only=1, or `durable-heap inspect`), "
            "or restart the server without --read-only"
        )
    return storage


class _SharedPing:
    """server_sync's round trip, shared: one ``ping`` serves every transaction begun before it was sent.

    A transaction must see every commit acknowledged before it began, so it needs
    the answer of a ping *sent after* its begin (the server answers it after the
    invalidations it wrote to this connection before, which the IO thread applies
    in order). A ping sent earlier is not enough, but a later one serves any
    number of begins: each begin takes a ticket; the one thread whose ping is in
    flight (the leader) covers every ticket taken before it sent it; a begin that
    finds a ping in flight waits for it and then, if not covered (its ticket came
    after that ping was sent), for the next, which the first of them to wake sends
    for all of them. So the 16 request threads of a ``serve --workers`` worker send
    one ping per round trip between them, not one each: fewer messages through the
    client's IO thread and the server (measured: the ping was a sixth of a ZEO
    client's CPU per one-entry commit, and of the server's a tenth).
    A failed ping (the server gone) raises in its leader; a waiter it did not cover
    then sends its own, as without sharing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._asked = 0  # tickets handed out (one per begin)
        self._covered = 0  # every ticket up to this one has an answered ping sent after it
        self._flying = False  # a leader's ping is in flight

    def __call__(self, ping: Any) -> None:
        cond = self._cond
        with cond:
            self._asked += 1
            mine = self._asked
            while self._covered < mine:
                if self._flying:
                    cond.wait()
                    continue
                self._flying = True
                target = self._asked  # the tickets taken before this ping is sent
                answered = False
                cond.release()
                try:
                    ping()
                    answered = True
                finally:
                    cond.acquire()
                    self._flying = False
                    if answered and target > self._covered:
                        self._covered = target
                    cond.notify_all()


_client: type | None = None

#: ``DURABLE_HEAP_ZEO_EARLY_RELEASE=0`` gives ZEO's own ``tpc_finish`` (the commit lock
#: held until the answer): only for ``python -m benchmarks.serve --compare-zeo-client``.
_EARLY_RELEASE = os.environ.get("DURABLE_HEAP_ZEO_EARLY_RELEASE", "1") != "0"


def _no_callback(tid: bytes) -> None:
    return None


async def _finish_co(client: Any, txn_id: int, updates: Any, f: Any, release: Any) -> Any:
    """ZEO's ``ClientIO.tpc_finish_co`` (ZEO 6.2), on the IO thread, with `release` added.

    ZEO's client runs one commit at a time: ``tpc_begin`` takes the client's commit
    lock and ZEO releases it only when the server has answered ``tpc_finish``. The
    answer waits for the server's fsync (and, in durable_heap's server, for the
    fsyncs of the commits before it: `durable_heap._zeo_pipeline`), so each client
    process committed at most once per fsync round trip (a ``serve --workers``
    worker's request threads waited on that lock about half the time, session 7).
    Here the lock is released as soon as the finish message is written. That is
    safe because the server takes a connection's messages in order: it finishes
    this transaction (and forgets it: ZEO's ``_clear_transaction``, at once in
    ZEO's own server and in the pipelined one) before it reads this client's next
    ``tpc_begin``, so it never sees two transactions of one connection at once.
    What the lock no longer covers needs no cover: the answers of this client's
    commits come back in commit order (the server answers in commit order), and
    this coroutine, on the one IO thread, applies each to the cache before the
    next, as ZEO does with other clients' invalidations meanwhile.
    The guarantees stay: the committing thread still waits for the answer (so a
    commit is acknowledged only once the server made it durable), and a failed
    finish closes the connection as in ZEO, failing this client's next
    transaction if it began meanwhile (it began on the lost connection).
    """
    from ZEO.Exceptions import ClientDisconnected

    if not client.operational:
        raise ClientDisconnected()
    try:
        answer = client.protocol.server_call("tpc_finish", txn_id)  # written now, in order
        release()
        tid = await answer
        cache = client.cache
        # As ZEO: the cache invalidation here and in ``invalidateTransaction`` both
        # run on the IO thread; ``lastTransaction`` moves only after ``f``.
        for oid, data, resolved in updates:
            cache.invalidate(oid, tid)
            if data and not resolved:
                cache.store(oid, tid, None, data)
        with cache._lock:
            cache.setLastTid(tid)
            f(tid)
        return tid
    except Exception:
        # As ZEO: the cache may be inconsistent now; reconnect to recover.
        client.protocol.close()
        client.disconnected(client.protocol)
        raise


# -- PROTECTED: ZEO.ClientStorage.ClientStorage internals (ZEO 6.2) --
# The subclass below overrides ``notify_connected(conn, info)`` (which sets the
# instance attribute ``sync = ping`` under ``server_sync``: taken out again, for
# the class's ``sync``), ``sync()``, and ``tpc_abort(txn, timeout)``, reads
# ``server_sync`` and calls ``ping()``, and reads ``_oids`` (the prefetched oids, a list),
# ``_connection_generation``, ``txn.data(self)`` (the TransactionBuffer, or None
# after tpc_finish) with its ``connection_generation``, and calls ``tpc_end``:
# ZEO has no public way to drop prefetched oids or to skip a doomed abort (see
# the docstring). tests/test_zodb_internals.py fails when any of them changes.
# ``tpc_finish(txn, f)`` is overridden too: it is ZEO's ``ClientStorage.tpc_finish``
# with ``tpc_end`` inlined, and ZEO's ``ClientIO.tpc_finish_co`` (run on the IO
# thread through ``ClientRunner.io_call``) with one line added; it reads
# ``_commit_lock``, ``_check_trans``, ``_iterator_gc``, ``_update_blob_cache``,
# ``_server`` (the ClientRunner: ``io_call``, ``client``) and the ClientIO's
# ``operational``, ``protocol.server_call``, ``cache`` (``invalidate``,
# ``store``, ``setLastTid``, ``_lock``), ``disconnected``; tests/test_serve.py
# (test_the_zeo_client_internals_its_finish_relies_on) pins them.


def _client_class() -> type:
    """ZEO's ClientStorage, with two traps of a lost server taken out (ZEO 6.2).

    * ``new_oid``: a client asks the server for new oids 100 at a time and keeps
      those it has not used across a reconnect. A server that was killed (no clean
      close, so no ``.index`` recording its last oid) restarts knowing only the oids
      of committed records and hands the others out again: two clients then give
      one oid to two different new objects, which ends in "A different object
      already has the same oid", POSKeyError, StateLoadError or a BTrees assertion
      in a client (issue #12). Here the oids of an earlier connection are dropped.
    * ``tpc_abort`` of a transaction cut off by the lost connection waits up to
      ``wait_timeout`` for a server to send the abort to, though the server has
      dropped that transaction with the connection: the failed action would
      report its fault only after that wait. Here it is not sent then.
    """
    global _client
    if _client is None:
        import ZEO.ClientStorage

        class ClientStorage(ZEO.ClientStorage.ClientStorage):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._dh_ping = _SharedPing()  # before ZEO's: it may connect (and sync) there
                super().__init__(*args, **kwargs)

            def notify_connected(self, conn: Any, info: Any) -> None:
                # Called in ZEO's IO thread before the connection is usable, so no
                # new_oid can fetch from the new server first. A transaction begun
                # on the old connection fails anyway (ZEO checks its generation).
                del self._oids[:]
                super().notify_connected(conn, info)
                # ZEO sets ``self.sync = self.ping`` here under server_sync: our `sync`
                # below instead (ZODB's MVCC adapter binds ``storage.sync`` at each
                # connection's open: the method, so it reads the flag at each begin).
                self.__dict__.pop("sync", None)

            def sync(self) -> None:
                # server_sync's round trip at each transaction's begin, unless this
                # thread's next begin trusts what the server pushed (`trusting_pushed`);
                # shared by the begins of this client's threads (`_SharedPing`).
                if _pushed.once:
                    _pushed.once = False
                    return
                ping = getattr(self, "ping", None)  # (set at the first connect)
                if self.server_sync and ping is not None:
                    self._dh_ping(ping)

            def tpc_abort(self, txn: Any, timeout: Any = None) -> None:
                try:
                    tbuf = txn.data(self)
                except KeyError:
                    return
                # tpc_begin records the connection generation (bumped at every
                # connect and disconnect); tpc_finish ends its buffer (None) also
                # when it fails. Either way no server holds this transaction now.
                if tbuf is None or tbuf.connection_generation != self._connection_generation:
                    self.tpc_end(txn)  # releases the client's commit lock
                    return
                super().tpc_abort(txn, timeout)

            def tpc_finish(self, txn: Any, f: Any = _no_callback) -> Any:
                # ZEO's own, but the client's commit lock is released once the
                # finish is written to the server, not once it is answered.
                if not _EARLY_RELEASE:  # the benchmark's "before" (benchmarks.serve)
                    return super().tpc_finish(txn, f)
                tbuf = self._check_trans(txn, "tpc_finish")
                guard = threading.Lock()

                def release() -> None:  # exactly once: on the IO thread once sent, or below
                    if guard.acquire(blocking=False):
                        self._commit_lock.release()

                try:
                    tid = self._server.io_call(_finish_co(self._server.client, id(txn), tbuf, f, release))
                finally:
                    tbuf.close()  # ZEO's tpc_end, with the lock released by `release`
                    txn.set_data(self, None)
                    release()
                    self._iterator_gc()
                self._update_blob_cache(tbuf, tid)
                return tid

        _guard_handshakes()
        _client = ClientStorage
    return _client


#: Seconds a new connection to a ZEO server may go without the server's protocol
#: version (its first message) before the client drops it and connects again.
HANDSHAKE_TIMEOUT = 10.0


def _guard_handshakes() -> None:
    """ZEO's client connection, with a trap of a restarting server taken out (ZEO 6.2).

    A connection whose TCP connect succeeded but that never receives the server's
    protocol version (seen once, connecting while the server was killed and started
    again on the same address) is never dropped: ZEO waits for that first message for
    ever, and its heartbeat, 60 s later, fails (``AttributeError: heartbeat_bytes``,
    which only the handshake sets) and is not scheduled again. Every transaction of the
    process then failed after ``wait_timeout`` ("timed out waiting for connection"), and
    the client never connected again. Here a connection still without the version
    after `HANDSHAKE_TIMEOUT` is aborted: ZEO sees it lost and connects again; and the
    heartbeat waits for the handshake.
    """
    from ZEO.asyncio.client import Protocol

    if getattr(Protocol, "_dh_guarded", False):
        return
    made, finish, heartbeat = Protocol.connection_made, Protocol.finish_connection, Protocol.heartbeat

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        self._dh_handshake = self.loop.call_later(HANDSHAKE_TIMEOUT, _no_handshake, self, transport)

    def finish_connection(self: Any, protocol_version: Any) -> Any:
        late = self.__dict__.pop("_dh_handshake", None)
        if late is not None:
            late.cancel()
        return finish(self, protocol_version)

    def guarded_heartbeat(self: Any, write: bool = True) -> Any:
        return heartbeat(self, write and "heartbeat_bytes" in self.__dict__)

    Protocol.connection_made = connection_made
    Protocol.finish_connection = finish_connection
    Protocol.heartbeat = guarded_heartbeat
    Protocol._dh_guarded = True


def _no_handshake(protocol: Any, transport: Any) -> None:
    """`HANDSHAKE_TIMEOUT` after a connection was made: drop it if the server is still silent."""
    if protocol.closed or "heartbeat_bytes" in protocol.__dict__:
        return
    import logging

    logging.getLogger("durable_heap.zeo").warning(
        "the ZEO server at %r accepted a connection but said nothing for %.0f s: "
        "connecting again", protocol.addr, HANDSHAKE_TIMEOUT)
    transport.abort()  # ZEO's connection_lost then connects again
# -- end PROTECTED --
