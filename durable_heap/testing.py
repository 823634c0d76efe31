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

__all__ = ["Clock", "ZeoServer", "load_program", "subprocess_env", "temporary_heap", "zeo_server"]

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
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=timeout).strip()
        except queue.Empty:
            line = ""
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
