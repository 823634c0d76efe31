"""Helpers for the tests of programs that use durable_heap; importable without pytest.

Real parts, no mocks: a heap on a real FileStorage in a temporary folder, a
program loaded into it, and a real ZEO server (``durable-heap zeo``) in a
subprocess on a free loopback port::

    from durable_heap.testing import load_program, temporary_heap

    def test_count():
        with temporary_heap() as heap:
            app = load_program(heap, '''
                from durable_heap import state
                state.setdefault("count", 0)
                def count():
                    state.count += 1
                    return state.count
            ''')
            assert app.call("count") == 1

The pytest plugin (`durable_heap.pytest_plugin`, registered when durable_heap is
installed) offers the same as fixtures: ``heap_path``, ``heap``, ``reopen`` and
``zeo_server``.

>>> with temporary_heap() as heap:
...     with heap.transaction() as state:
...         state.n = 1
...     heap.state.n
1
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._facade import Heap
from ._facade import open as open_heap
from ._versions import Program

__all__ = [
    "Clock",
    "PostgresCluster",
    "ZeoServer",
    "first_line",
    "load_program",
    "postgres_unavailable",
    "subprocess_env",
    "temporary_heap",
    "zeo_server",
]


class Clock:
    """A clock for tests of workflows and timers: time moves only when told.

    ``heap = durable_heap.open(target, clock=clock)``, then ``clock.advance(3600)``
    and ``heap.run_due()`` run what fell due, at once, with no server and no
    waiting. It starts at the real time unless given `start` (a timestamp or a
    datetime; naive means UTC).
    """

    def __init__(self, start: float | Any = None) -> None:
        import datetime
        import time

        if start is None:
            start = time.time()
        elif isinstance(start, datetime.datetime):
            if start.tzinfo is None:
                start = start.replace(tzinfo=datetime.timezone.utc)
            start = start.timestamp()
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current time of this clock, in seconds since the epoch."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by `seconds`; returns the new time."""
        if seconds < 0:
            raise ValueError("a clock moves forward only: advance by a positive number of seconds")
        with self._lock:
            self._now += float(seconds)
            return self._now

    def __repr__(self) -> str:
        return f"<durable_heap.testing.Clock {self()}>"


#: The folder that holds the durable_heap package: subprocesses import this copy.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python process that must import this durable_heap.

    ``$DURABLE_HEAP_STORAGE`` is dropped, so that a child never writes to the
    developer's default heap by accident.
    """
    env = dict(os.environ)
    env.pop("DURABLE_HEAP_STORAGE", None)
    env["PYTHONPATH"] = _PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


@contextlib.contextmanager
def temporary_heap(**options: Any) -> Iterator[Heap]:
    """A heap on a FileStorage in a new private temporary folder, removed afterwards.

    `options` go to `durable_heap.open` (``attempts``, ``cache_size``...).
    """
    folder = tempfile.mkdtemp(prefix="durable-heap-")
    heap = open_heap(os.path.join(folder, "heap.fs"), **options)
    try:
        yield heap
    finally:
        heap.close()
        shutil.rmtree(folder, ignore_errors=True)


def load_program(heap: Heap, source: str, name: str = "app", folder: str | os.PathLike[str] | None = None,
                 **options: Any) -> Program:
    """Write `source` (dedented) as ``NAME.py`` and load it into `heap`: a `Program`.

    The file goes into `folder`, or beside the heap's file (a temporary folder's
    ``programs/``). `options` go to `Heap.load` (``deploy``, ``watch``).
    """
    if folder is None:
        base = os.path.dirname(str(heap.target)) if heap.target.scheme == "file" else tempfile.mkdtemp()
        folder = os.path.join(base, "programs")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return heap.load(path, **options)



def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line `proc` writes to its stdout (stripped), or "" if none within `timeout` s.

    Servers print their address there once they listen; a thread reads it so
    that a server that hangs before printing cannot hang the caller.
    """
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).strip()
    except queue.Empty:
        return ""


class ZeoServer:
    """``durable-heap zeo`` in a subprocess: started, killed, restarted, stopped.

    `start` waits for the address the server prints (never a fixed sleep) and
    returns its ``zeo://`` URL; the server's log goes to a file beside the
    storage, shown when it fails to start. A restart reuses the port it got.
    """

    def __init__(self, storage: str | os.PathLike[str], address: str = "127.0.0.1:0",
                 args: tuple[str, ...] = (), cwd: str | os.PathLike[str] | None = None) -> None:
        self.storage = Path(storage)
        self.address, self.args = address, args
        self.cwd = Path(cwd) if cwd is not None else self.storage.parent
        self.log = self.storage.parent / f"zeo-{self.storage.stem}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> str:
        """Start the server; return its ``zeo://`` URL once it listens."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                [sys.executable, "-m", "durable_heap", "zeo", "--storage", str(self.storage),
                 "--address", self.address, *self.args],
                stdout=subprocess.PIPE, stderr=log, text=True, env=subprocess_env(), cwd=self.cwd,
            )
        line = first_line(self.proc, timeout)
        if not line.startswith("zeo://"):
            self.kill()
            raise RuntimeError(f"the ZEO server did not start:\n{self.log.read_text()}")
        self.url = line
        if self.address.endswith(":0"):  # a restart reuses the port it got
            self.address = line[len("zeo://"):]
        return line

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as a service manager stops it; returns the exit status."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, whatever it was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def close(self) -> None:
        """Stop the server if it runs (SIGTERM, then SIGKILL) and release its pipe."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ZeoServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def zeo_server(storage: str | os.PathLike[str] | None = None, **options: Any) -> Iterator[ZeoServer]:
    """A running `ZeoServer` on 127.0.0.1 and a free port (a fresh heap file unless `storage`)::

        with zeo_server() as server:
            heap = durable_heap.open(server.url)
    """
    folder = None
    if storage is None:
        folder = tempfile.mkdtemp(prefix="durable-heap-zeo-")
        storage = os.path.join(folder, "server", "app.fs")
    server = ZeoServer(storage, **options)
    server.start()
    try:
        yield server
    finally:
        server.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


# --- a throwaway PostgreSQL cluster (postgresql:// heaps) ------------------------------------

#: Settings of the test cluster: fsync off (a killed server still loses nothing the
#: kernel has: commits are acknowledged after their WAL reached it), and the planner
#: cost that keeps RelStorage's commit query on its indexes (see docs/operations.md).
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "random_page_cost": "1.1",
                 "max_connections": "200"}


def _postgres_bin() -> str | None:
    """The folder of PostgreSQL's server programs (``$DURABLE_HEAP_PG_BIN``, the newest
    Debian ``/usr/lib/postgresql/N/bin``, or where ``initdb`` is on the PATH)."""
    env = os.environ.get("DURABLE_HEAP_PG_BIN")
    if env:
        return env
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def postgres_unavailable() -> str | None:
    """Why `PostgresCluster` cannot run here (a sentence), or None when it can."""
    try:
        import psycopg2  # noqa: F401 - the driver of the postgresql extra
        import relstorage  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: pip install 'durable-heap[postgresql]'"
    folder = _postgres_bin()
    if folder is None or not os.path.exists(os.path.join(folder, "initdb")):
        return ("PostgreSQL's server programs (initdb, pg_ctl) were not found: install PostgreSQL "
                "(apt-get install postgresql) or set DURABLE_HEAP_PG_BIN to their folder")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' user to run initdb as (initdb refuses root)"
        if shutil.which("runuser") is None:
            return "running as root needs runuser (util-linux) to run initdb as the postgres user"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """A throwaway PostgreSQL cluster for tests: initdb, start, databases, kill, restart, stop.

    Its folder (data, log and unix socket) is a new private temporary folder; it
    listens on that socket and on 127.0.0.1 at a free port. ``initdb`` refuses to
    run as root, so as root every server program runs as the ``postgres`` user
    (through ``runuser``). The superuser is ``postgres``, trusted over the socket;
    every other role logs in with a password (scram-sha-256), so that password
    handling can be tested::

        with PostgresCluster() as cluster:
            heap = durable_heap.open(cluster.create_database("app"))
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        reason = postgres_unavailable()
        if reason:
            raise RuntimeError(f"cannot start a PostgreSQL cluster: {reason}")
        self.bin = _postgres_bin() or ""
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        # Short, under /tmp: a unix socket path has at most 107 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="dh-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = _free_port()
        self.socket_dir = str(self.folder)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._initdb()

    # -- running the server programs ---------------------------------------------------

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [os.path.join(self.bin, program), *args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.folder)  # noqa: S603
        if check and proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")
        return proc

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale", "C")
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> PostgresCluster:
        """Start the server and wait until it accepts connections."""
        opts = [f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1", f"-p {self.port}",
                *(f"-c {k}={v}" for k, v in self.settings.items())]
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(opts), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clients cut off, a clean shutdown) or ``immediate``
        (every server process killed at once, recovery from the WAL at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``)."""
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        """Stop (`mode`) and start again on the same socket and port."""
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def close(self) -> None:
        """Stop the server and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        if not (self.data / "postmaster.pid").exists():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- databases ---------------------------------------------------------------------

    def connect(self, dbname: str = "postgres") -> Any:
        """A psycopg2 connection as the superuser (autocommit), for setting up tests."""
        import psycopg2

        conn = psycopg2.connect(host=self.socket_dir, port=self.port, user="postgres", dbname=dbname)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, *params: Any, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; its rows (none for a statement without)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str, *, owner: str = "postgres", **options: str) -> str:
        """Create database `name`; return its ``postgresql://`` target over the unix socket
        (`options` become its query: ``keep_history="0"``)."""
        self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return self.url(name, **options)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting whoever is still connected."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def create_role(self, name: str, password: str) -> None:
        """A role that logs in with `password` and may create databases."""
        self.execute(f'CREATE ROLE "{name}" LOGIN CREATEDB PASSWORD %s', password)

    def url(self, dbname: str, user: str = "postgres", **options: str) -> str:
        """The ``postgresql://`` target of `dbname` over the unix socket."""
        from urllib.parse import quote, urlencode

        query = urlencode({"host": self.socket_dir, **options})
        return f"postgresql://{quote(user)}@:{self.port}/{quote(dbname)}?{query}"

    def tcp_url(self, dbname: str, user: str, password: str | None = None, **options: str) -> str:
        """The ``postgresql://`` target of `dbname` over TCP (127.0.0.1 and the cluster's port)."""
        from urllib.parse import quote, urlencode

        secret = f":{quote(password, safe='')}" if password is not None else ""
        query = f"?{urlencode(options)}" if options else ""
        return f"postgresql://{quote(user)}{secret}@127.0.0.1:{self.port}/{quote(dbname)}{query}"
