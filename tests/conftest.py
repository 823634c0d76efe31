"""Shared fixtures: real FileStorage heaps in temporary folders, and the CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable_heap as dh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def heap_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "heap.fs"


@pytest.fixture
def heap(heap_path: Path) -> Iterator[dh.Heap]:
    """A heap on a real FileStorage in a temporary folder."""
    h = dh.open(heap_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def reopen(heap_path: Path):  # type: ignore[no-untyped-def]
    """Close a heap and open its file again (returns the new heap)."""
    opened: list[dh.Heap] = []

    def _reopen(h: dh.Heap) -> dh.Heap:
        h.close()
        new = dh.open(heap_path)
        opened.append(new)
        return new

    yield _reopen
    for h in opened:
        h.close()


def write(path: Path, source: str) -> Path:
    """Write a program file (its text dedented)."""
    path.write_text(textwrap.dedent(source))
    return path


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python module or script in a subprocess with this interpreter."""
    full_env = dict(os.environ)
    full_env.pop("DURABLE_HEAP_STORAGE", None)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``durable-heap ARGS...`` as a new process."""
    return run(["-m", "durable_heap", *args], cwd=cwd, env=env, timeout=timeout)


# --- a real ZEO server in a subprocess ----------------------------------------------------


class ZeoServer:
    """``python -m durable_heap zeo`` in a subprocess: started, killed, restarted, stopped.

    `start` waits for the address the server prints (never a fixed sleep); its
    log goes to a file in the test's folder, shown when it fails to start.
    """

    def __init__(self, storage: Path, address: str = "127.0.0.1:0", args: tuple[str, ...] = (),
                 cwd: Path | None = None) -> None:
        self.storage, self.address, self.args = storage, address, args
        self.cwd = cwd or storage.parent
        self.log = storage.parent / f"zeo-{storage.stem}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> str:
        import queue
        import threading

        env = dict(os.environ)
        env.pop("DURABLE_HEAP_STORAGE", None)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "durable_heap", "zeo", "--storage", str(self.storage),
                 "--address", self.address, *self.args],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=self.cwd,
            )
        lines: queue.Queue[str] = queue.Queue()
        proc = self.proc
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
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
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def zeo_server(tmp_path: Path) -> Iterator[ZeoServer]:
    """A real ZEO server (``durable-heap zeo``) on 127.0.0.1, a free port, a fresh heap file."""
    server = ZeoServer(tmp_path / "server" / "app.fs")
    server.start()
    try:
        yield server
    finally:
        server.close()
