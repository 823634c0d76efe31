"""ZEO: ``zeo://`` clients, TLS contexts, and the ``durable-heap zeo`` server.

Everything here is ZEO's own client (``ZEO.ClientStorage``) and server
(``ZEO.StorageServer``) with durable_heap's defaults around them: loopback unless
told otherwise, private files, TLS with client certificates, one-line errors.
ZEO is imported only when a ``zeo://`` heap is opened or a server started, so
``import durable_heap`` stays light.

Client options (the query of a ``zeo://`` target)::

    zeo://127.0.0.1:8100?wait_timeout=5&cache=/var/cache/app.zec
    zeo:///run/app.sock?tls_ca=ca.pem&tls_cert=client.pem&tls_key=client.key
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any

from ._allow import Allowlist, defined_classes, env_patterns, guard_conflicts
from ._errors import ProgramError, ServerUnavailableError, StorageError, UnknownTargetError
from ._storage import OPTIONS, Target, check_options, option

__all__ = [
    "CLIENT_OPTIONS",
    "DEFAULT_ADDRESS",
    "add_command",
    "check_client_target",
    "format_address",
    "open_client",
    "parse_address",
    "run_server",
]

#: Where ``durable-heap zeo`` listens unless told: loopback, ZEO's usual port.
DEFAULT_ADDRESS = "127.0.0.1:8100"
#: Seconds a client waits for its server (to connect, or to reconnect) unless told.
DEFAULT_WAIT = 30.0

#: The options a ``zeo://`` target accepts, each with what it means (read by
#: the one option parser, from its table in `durable_heap._storage.OPTIONS`).
CLIENT_OPTIONS = {name: spec.help for name, spec in OPTIONS["zeo"].items()}

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


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# --- TLS ---------------------------------------------------------------------------


def _tls_context(server: bool, ca: str, cert: str | None, key: str | None, hint: str) -> Any:
    """A TLS context that trusts `ca` and shows `cert` (if any); bad files: StorageError."""
    import ssl

    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    try:
        ctx = ssl.create_default_context(purpose, cafile=ca)
        if cert or key:
            ctx.load_cert_chain(cert or key or "", key if cert else None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        files = ", ".join(f for f in (cert, key, ca) if f)
        raise StorageError(f"cannot use the TLS files {files}: {reason}. {hint}") from None
    return ctx


def server_tls(cert: str | None, key: str | None, ca: str | None) -> Any:
    """The server's TLS context: its certificate, and clients must show one signed by `ca`.

    None when no TLS option is given. ZEO authenticates clients by certificate only.
    """
    if not (cert or key or ca):
        return None
    if not (cert and ca):
        raise StorageError(
            "TLS needs both --tls-cert (the server's certificate) and --tls-ca (the CA "
            "that signs the clients' certificates); --tls-key if the key is a separate file"
        )
    import ssl

    hint = "Check --tls-cert, --tls-key and --tls-ca (PEM files; see docs/operations.md)."
    ctx = _tls_context(True, ca, cert, key, hint)
    ctx.verify_mode = ssl.CERT_REQUIRED  # no certificate signed by the CA, no connection
    ctx.check_hostname = False
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
    ctx = _tls_context(False, ca, cert, key, hint)
    if isinstance(addr, str):  # a unix socket has no host name to check
        ctx.check_hostname = bool(hostname)
        return ctx, hostname or "localhost"
    return ctx, hostname


# --- the client ----------------------------------------------------------------------


def check_client_target(target: Target, text: str) -> Target:
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


def open_client(target: Target, *, read_only: bool = False) -> Any:
    """ZEO's ClientStorage for a checked ``zeo://`` target; waits for the server."""
    from ._storage import private_files

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

    from zc.lockfile import LockError
    from ZEO.Exceptions import ClientDisconnected

    try:
        with private_files():  # the client cache file is private too
            storage = _client_class()(addr, **kwargs)
    except ClientDisconnected:
        tls = " over TLS (check the tls_* options and that the server uses TLS)" if ssl_ctx else ""
        raise ServerUnavailableError(
            f"no ZEO server answered at {target} within {wait:g} s{tls}: start one with "
            f"`durable-heap zeo --storage FILE --address {target.location}`, or fix the "
            "address (a longer wait: ?wait_timeout=SECONDS)"
        ) from None
    except LockError:
        raise StorageError(
            f"the ZEO client cache {kwargs.get('cache')} is in use by another process: "
            "give each process its own cache=PATH"
        ) from None
    if not read_only and storage.isReadOnly():
        storage.close()
        raise StorageError(
            f"the ZEO server at {target} serves its storage read-only (started with --read-only): "
            "open the heap read-only (read_only=True, ?read_only=1, or `durable-heap inspect`), "
            "or restart the server without --read-only"
        )
    return storage


_client: type | None = None


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
            def notify_connected(self, conn: Any, info: Any) -> None:
                # Called in ZEO's IO thread before the connection is usable, so no
                # new_oid can fetch from the new server first. A transaction begun
                # on the old connection fails anyway (ZEO checks its generation).
                del self._oids[:]
                super().notify_connected(conn, info)

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

        _client = ClientStorage
    return _client


# --- the server: durable-heap zeo ---------------------------------------------------------


def add_command(sub: Any) -> Any:
    """Register ``durable-heap zeo`` on the CLI's subparsers; return its parser."""
    p = sub.add_parser(
        "zeo",
        help="serve a heap file to several processes (a ZEO server, in the foreground)",
        description="Serve a heap file to other processes through ZEO, in the foreground. "
        "Prints the zeo:// address it listens on, logs to stderr, and stops cleanly "
        "on SIGTERM or Ctrl-C.",
    )
    p.add_argument("--storage", required=True, metavar="PATH", help="the heap file to serve (FileStorage)")
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"HOST:PORT or a unix socket path (default {DEFAULT_ADDRESS}; port 0 picks a free one)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="the server's certificate: turns TLS on")
    p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert, unless its file holds it")
    p.add_argument("--tls-ca", metavar="PEM", help="clients must show a certificate signed by this CA")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without TLS (trusted networks only)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE at start: classes with their own _p_resolveConflict; the "
        "classes it defines may be named by records it resolves (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="let conflict resolution load this class too: pkg.module.Class, or pkg.* for "
        "your own module pkg (repeatable; also $DURABLE_HEAP_ALLOW)",
    )
    p.add_argument("--read-only", action="store_true", help="serve the heap read-only")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    return p


def _import_resolvers(names: list[str]) -> None:
    """Import the modules whose classes resolve conflicts, so a missing one fails now.

    The server merges concurrent changes itself (ZODB calls the class's
    ``_p_resolveConflict`` in the storage): it imports each record's class by
    its module path. durable_heap's own classes come with this process.
    """
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module
            raise ProgramError(
                f"--import {name}: cannot import it ({type(exc).__name__}: {exc}); "
                "the module must be importable from the server's folder or PYTHONPATH"
            ) from exc


def _server_allowlist(args: Any) -> Allowlist:
    """What the server's conflict resolution may load: the defaults, ``--allow``,
    ``$DURABLE_HEAP_ALLOW``, and the classes the ``--import`` modules define."""
    imported = [name for module in args.imports for name in defined_classes(sys.modules[module])]
    return Allowlist([*args.allow, *env_patterns(), *imported])


def _clear_stale_socket(path: str) -> None:
    """Remove a unix socket left by a server that died; refuse one that still answers."""
    import socket
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StorageError(f"{path} exists and is not a socket: choose another --address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left behind by a killed server
            return
    raise StorageError(f"a server already listens on {path}: stop it, or choose another --address")


def _listen_error(addr: Address, exc: OSError) -> str:
    """Why the server cannot listen at `addr`, and what to do, for `exc` from binding."""
    where = f"cannot listen on {format_address(addr)}"
    folder = os.path.dirname(addr) if isinstance(addr, str) else ""
    if folder and not os.path.isdir(folder):
        return (
            f"{where}: the folder {folder} does not exist. Create it (mkdir -m 700 -p {folder}) "
            "or choose another --address"
        )
    reason = exc.strerror or str(exc)
    other = "(port 0 picks a free one)" if isinstance(addr, tuple) else "(another socket path)"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: {reason}. Is another server running there? Choose another --address {other}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"{where}: {reason}. Choose an --address this user may listen on (a port above "
                "1023, or a socket in a folder it can write)")
    return f"{where}: {reason}. Choose another --address {other}"


def run_server(args: Any) -> int:
    """``durable-heap zeo``: serve ``args.storage`` until SIGTERM or SIGINT.

    The storage is closed on the way out (its index written, its lock released).
    The only line on stdout is the ``zeo://`` address, once the server listens.
    """
    import logging
    import signal

    from ._storage import open_storage, parse_target

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("durable_heap.zeo")
    os.umask(0o077)  # this process's files (data, index, lock, socket, pack) are private
    addr = parse_address(args.address, server=True)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is None and isinstance(addr, tuple) and not is_loopback(addr[0]) and not args.insecure:
        raise StorageError(
            f"refusing to serve {args.address} without TLS: anyone who can reach it could "
            "read and change the heap (and run code through pickles). Give --tls-cert, "
            "--tls-key and --tls-ca, or --insecure on a trusted network"
        )
    target = parse_target(args.storage)
    if target.scheme != "file":
        raise StorageError(f"--storage {args.storage}: the server serves a heap file, such as data/app.fs")
    _import_resolvers(args.imports)
    allowlist = _server_allowlist(args)
    if isinstance(addr, str):
        _clear_stale_socket(addr)
    existed = os.path.exists(target.location)
    # The served storage is the checksum wrapper over the (checked) FileStorage: the
    # server seals the records clients write and checks every record it sends.
    storage = open_storage(target, read_only=args.read_only)
    allowlist.read_registry_from(storage)  # the classes stored through durable_heap
    guard_conflicts(storage, allowlist)  # the server resolves conflicts: only allowed classes
    try:
        from ZEO.StorageServer import StorageServer

        server = StorageServer(addr, {"1": storage}, read_only=args.read_only, ssl=tls)
    except OSError as exc:
        storage.close()
        if not existed:  # leave no empty heap behind a server that never ran
            for suffix in ("", ".index", ".lock", ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(target.location + suffix)
        raise StorageError(_listen_error(addr, exc)) from None
    except BaseException:
        storage.close()
        raise
    bound: Address = addr if isinstance(addr, str) else tuple(server.acceptor.addr[:2])  # type: ignore[assignment]
    loop = server.acceptor.event_loop

    def stop(name: str) -> None:
        # Runs in the event loop between two messages, so never in the middle of
        # a commit; ZEO's close stops accepting, drops clients, closes the storage.
        log.info("%s: stopping", name)
        server.close()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    mode = "TLS, client certificates required" if tls else "no TLS"
    log.info("serving %s at %s (%s)", target.location, format_address(bound), mode)
    print(format_address(bound), flush=True)
    try:
        server.loop()
    finally:
        server.close()
        if isinstance(addr, str) and os.path.exists(addr):
            os.unlink(addr)
    log.info("stopped: %s closed (index written, lock released)", target.location)
    return 0
