"""The ``durable-heap zeo`` server: ZEO's StorageServer serving a heap file.

ZEO's own server (``ZEO.StorageServer``) with durable_heap's defaults around it:
loopback unless told otherwise (``--insecure`` to serve a network in the clear),
TLS with client certificates, private files, the allowlist guarding the
conflict resolution it runs, one-line errors. It sits in the faces layer, over
the storage dispatcher (`durable_heap._storage`, which opens the served
FileStorage) and the client backend (`durable_heap._zeo`, whose TLS context it
shares); the CLI registers it (`add_command`, `run_server`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from ._allow import Allowlist, defined_classes, env_patterns, guard_conflicts
from ._errormap import translate_storage_error
from ._errors import ProgramError, StorageError
from ._storage import open_storage
from ._targets import Address, Target, format_address, parse_address, parse_target
from ._zeo import tls_context

__all__ = ["DEFAULT_ADDRESS", "add_command", "is_loopback", "run_server", "server_tls"]

#: Where ``durable-heap zeo`` listens unless told: loopback, ZEO's usual port.
DEFAULT_ADDRESS = "127.0.0.1:8100"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


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
    ctx = tls_context(True, ca, cert, key, hint)
    ctx.verify_mode = ssl.CERT_REQUIRED  # no certificate signed by the CA, no connection
    ctx.check_hostname = False
    return ctx


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


def _start_server(target: Target, addr: Address, tls: Any, read_only: bool,
                  allowlist: Allowlist) -> Any:
    """ZEO's StorageServer listening at `addr` on the heap file of `target`.

    The served storage is the checksum wrapper over the (checked) FileStorage: the
    server seals the records clients write and checks every record it sends. If
    it cannot listen, the storage is closed (and a heap file it created removed).
    """
    existed = os.path.exists(target.location)
    storage = open_storage(target, read_only=read_only)
    allowlist.read_registry_from(storage)  # the classes stored through durable_heap
    guard_conflicts(storage, allowlist)  # the server resolves conflicts: only allowed classes
    try:
        from ._zeo_pipeline import PipelinedStorageServer, pipelining_enabled

        # Commits answered once fsynced, the fsync off the event loop (see _zeo_pipeline).
        return PipelinedStorageServer(addr, {"1": storage}, read_only=read_only, ssl=tls,
                                      pipeline=pipelining_enabled())
    except OSError as exc:
        storage.close()
        if not existed:  # leave no empty heap behind a server that never ran
            for suffix in ("", ".index", ".lock", ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(target.location + suffix)
        raise translate_storage_error(exc, format_address(addr), action="listen", address=addr) from None
    except BaseException:
        storage.close()
        raise


def run_server(args: Any) -> int:
    """``durable-heap zeo``: serve ``args.storage`` until SIGTERM or SIGINT.

    The storage is closed on the way out (its index written, its lock released).
    The only line on stdout is the ``zeo://`` address, once the server listens.
    """
    import logging
    import signal

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
    server = _start_server(target, addr, tls, args.read_only, allowlist)
    # -- PROTECTED: ZEO.StorageServer.StorageServer.acceptor (ZEO 6.2) --
    # ``acceptor.addr`` is the address actually bound (port 0: the one picked),
    # ``acceptor.event_loop`` the asyncio loop to install the signal handlers in;
    # ZEO offers neither otherwise. Pinned by tests/test_zodb_internals.py.
    bound: Address = addr if isinstance(addr, str) else tuple(server.acceptor.addr[:2])  # type: ignore[assignment]
    loop = server.acceptor.event_loop
    # -- end PROTECTED --

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
    failure = getattr(server, "failure", None)
    if failure is not None:
        # A failed fsync (or finish) closed the heap: serving it on would fail every
        # commit. Exit non-zero, so that a service manager restarts the server, which
        # reopens the file with every acknowledged commit (docs/operations.md).
        why = getattr(failure, "strerror", None) or str(failure)
        error = StorageError(
            f"the server stopped: it could not make a commit durable ({type(failure).__name__}: "
            f"{why}) and closed {target.location}; the clients waiting were told \"may or may "
            "not have been committed\". Fix the disk, then start the server again: it reopens "
            "the heap with every acknowledged commit"
        )
        error.exit_code = 1  # type: ignore[attr-defined]  # the CLI's EXIT_FAILED: the heap, not the usage
        raise error
    log.info("stopped: %s closed (index written, lock released)", target.location)
    return 0
