"""The ZEO server's pipelined commits (`durable_heap._zeo_pipeline`): the fsync runs off
the event loop, concurrent clients' commits share fsyncs, a client is answered only
once its commit is durable, the others see it only then, a SIGKILLed server loses no
acknowledged commit, and a failed fsync fails every client waiting on it.

A real ``durable-heap zeo`` server in a subprocess, real client processes or heaps.
The one thing injected is the server's ``os.fsync`` (`SERVER`: a log of what each
fsync covered, a delay, a hold, a failure, steered by files in a control folder),
which group commit looks up at each call: nothing of the storage is mocked.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap.testing import first_line, subprocess_env

#: ``durable-heap zeo`` with os.fsync wrapped: ``python -c SERVER CONTROL zeo-options...``.
#: Each fsync appends ``enter SIZE`` and, once it returned, ``durable SIZE`` (the data
#: file's size when it began: what a power loss keeps) to CONTROL/fsyncs; it waits
#: while CONTROL/hold exists, fails with EIO if CONTROL/fail exists, and sleeps
#: $FSYNC_DELAY seconds first (a slow disk).
SERVER = """
import errno, os, sys, time
control = sys.argv[1]
real_fsync = os.fsync
log = os.open(os.path.join(control, "fsyncs"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
delay = float(os.environ.get("FSYNC_DELAY", "0"))

def fsync(fd):
    size = os.fstat(fd).st_size
    os.write(log, b"enter %d\\n" % size)
    while os.path.exists(os.path.join(control, "hold")):
        time.sleep(0.002)
    if os.path.exists(os.path.join(control, "fail")):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    time.sleep(delay)
    real_fsync(fd)
    os.write(log, b"durable %d\\n" % size)

os.fsync = fsync
from durable_heap.cli import main
sys.exit(main(["zeo", *sys.argv[2:]]))
"""

#: A client process: ``python -c CLIENT URL KEY``: bumps ``state.counts[KEY]`` until
#: killed (or its server is gone), printing ``ack KEY N`` after each acknowledged commit.
CLIENT = """
import sys
import durable_heap as dh
heap = dh.open(sys.argv[1], attempts=200)
key = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
n = heap.state.counts[key]
try:
    while True:
        n += 1
        with heap.transaction() as state:
            state.counts[key] = n
        print(f"ack {key} {n}", flush=True)
except Exception as exc:
    print(f"stopped {type(exc).__name__}", flush=True)
"""


class _Server:
    """`SERVER` on a heap file, on a free loopback port; its control folder."""

    def __init__(self, storage: Path, delay: float = 0.0, pipeline: bool = True) -> None:
        self.storage = storage
        self.control = storage.parent / "control"
        self.control.mkdir(exist_ok=True)
        self.log = storage.parent / "zeo.log"
        env = {"FSYNC_DELAY": str(delay), "DURABLE_HEAP_ZEO_PIPELINE": "1" if pipeline else "0"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(self.control), "--storage", str(storage),
                 "--address", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=subprocess_env(env),
            )
        line = first_line(self.proc, 60)
        if not line.startswith("zeo://"):
            self.kill()
            raise RuntimeError(f"the ZEO server did not start:\n{self.log.read_text()}")
        self.url = line

    def fsyncs(self, word: str = "durable") -> list[int]:
        """The file sizes in the log's `word` lines (``durable``: fsyncs that returned)."""
        path = self.control / "fsyncs"
        text = path.read_text() if path.exists() else ""
        return [int(line.split()[1]) for line in text.splitlines() if line.startswith(word + " ")]

    def flag(self, name: str, on: bool) -> None:
        path = self.control / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@contextlib.contextmanager
def _server(storage: Path, **options: Any) -> Iterator[_Server]:
    server = _Server(storage, **options)
    try:
        yield server
    finally:
        server.flag("hold", False)
        server.stop()


def _wait_for(cond: Any, timeout: float = 30, what: str = "", every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` in a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _commits(url: str) -> int:
    """The server's count of finished commits (ZEO's ``server_status``)."""
    import ZEO

    addr = url[len("zeo://"):].rpartition(":")
    client = ZEO.client((addr[0], int(addr[2])), wait_timeout=30)
    try:
        return int(client.server_status()["commits"])
    finally:
        client.close()


def _make(path: Path, n: int = 1000) -> None:
    with dh.open(path) as heap, heap.transaction() as state:
        state.counts = dict.fromkeys(range(n), 0)  # tree form: nearby keys share a bucket


def test_the_loop_serves_other_clients_while_a_commit_waits_for_its_fsync(tmp_path: Path) -> None:
    """A commit whose fsync is held: its client is not answered, another client is
    served all the while (a read, and a commit of its own that waits too), and sees
    the held commit only once it is durable. Fails with ZEO's own tpc_finish (the
    loop stands still in the fsync: the read never returns)."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path) as server:
        a, b = dh.open(server.url), dh.open(server.url)
        try:
            server.flag("hold", True)
            held = len(server.fsyncs("enter"))

            def bump_a() -> int:
                with a.transaction() as state:
                    state.counts[0] += 1
                return 1

            ta, out_a = _in_thread(bump_a)
            _wait_for(lambda: len(server.fsyncs("enter")) > held, what="the held fsync")

            def read_b() -> int:
                with b.transaction() as state:  # syncs with the server first
                    return int(state.counts[0])

            tb, out_b = _in_thread(read_b)
            tb.join(10)
            assert out_b == [0], "the other client was not served while the fsync was held"
            assert out_a == [], "answered before its fsync returned"

            def bump_b() -> int:
                with b.transaction() as state:
                    state.counts[500] += 1
                return 1

            tc, out_c = _in_thread(bump_b)
            _wait_for(lambda: _commits(server.url) >= 2, what="the second commit to finish", every=0.05)
            assert out_a == [] and out_c == []  # both written, neither acknowledged
            server.flag("hold", False)
            ta.join(30)
            tc.join(30)
            assert out_a == [1] and out_c == [1]
            assert read_b() == 1  # durable, so visible: b was told before a was answered
        finally:
            a.close()
            b.close()


def test_a_conflict_while_a_commit_waits_for_its_fsync_does_not_stop_the_loop(tmp_path: Path) -> None:
    """A commit that conflicts with one still waiting for its fsync is aborted on the
    server's loop: the abort must not wait there for that fsync (group commit's
    ``tpc_abort`` waits in one process), or every other client stands still with it.
    Fails with the wait: the third client's read never returns while the fsync is held."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path) as server:
        a, b, c = dh.open(server.url), dh.open(server.url), dh.open(server.url)
        try:
            with b.transaction() as state:  # b reads the entry now: its change will conflict
                assert state.counts[0] == 0
            server.flag("hold", True)
            held = len(server.fsyncs("enter"))

            def set_a() -> int:
                with a.transaction() as state:
                    state.counts[0] = 1
                return 1

            ta, out_a = _in_thread(set_a)
            _wait_for(lambda: len(server.fsyncs("enter")) > held, what="the held fsync")

            def set_b() -> str:  # the same entry to another value: no merge, a ConflictError
                try:
                    with b.transaction() as state:  # tried once: the conflict is raised
                        state.counts[0] = 2
                except dh.ConflictError:
                    return "conflict"  # voted, refused, aborted on the server
                return "committed"

            tb, out_b = _in_thread(set_b)
            tb.join(30)
            assert out_b == ["conflict"]

            def read_c() -> int:
                with c.transaction() as state:
                    return int(state.counts[500])

            tc, out_c = _in_thread(read_c)
            tc.join(10)
            assert out_c == [0], "the loop stood still in an abort while an fsync was held"
            server.flag("hold", False)
            ta.join(30)
            tb.join(30)
            assert out_a == [1]
            with c.transaction() as state:
                assert state.counts[0] == 1
        finally:
            a.close()
            b.close()
            c.close()


def test_concurrent_client_processes_share_fsyncs(tmp_path: Path) -> None:
    """Four client processes commit at once on a slow disk (100 ms per fsync): their
    commits share fsyncs (ZEO's own tpc_finish gives one fsync per commit: 40 of 40),
    and every commit lands."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path, delay=0.1) as server:
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, server.url, str(i)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=subprocess_env())
                 for i in range(4)]
        try:
            for p in procs:
                assert first_line(p, 60) == "ready"
            before = len(server.fsyncs())
            start = _commits(server.url)
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            _wait_for(lambda: _commits(server.url) - start >= 40, timeout=60, what="40 commits", every=0.05)
        finally:
            for p in procs:
                p.kill()
                p.wait(30)
                p.communicate()
        commits = _commits(server.url) - start
        fsyncs = len(server.fsyncs()) - before
    assert fsyncs <= 0.75 * commits, (fsyncs, commits)
    with dh.open(path) as heap:
        assert sum(heap.state.counts[i] for i in range(4)) >= commits - 4  # the killed in-flight ones


def test_a_failed_fsync_fails_every_client_waiting_on_it(tmp_path: Path) -> None:
    """Three clients' commits wait on one held fsync, which then fails (EIO): each
    client gets durable_heap's "may or may not have been committed" error, none is
    acknowledged, the server then exits with status 1 and says why (it kept serving
    a closed heap before: every later commit failed until someone restarted it), and
    the heap file opens afterwards with the earlier commits."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path) as server:
        heaps = [dh.open(server.url) for _ in range(3)]
        try:
            start = _commits(server.url)
            server.flag("hold", True)

            def bump(heap: Any, key: int) -> Any:
                def run() -> int:
                    with heap.transaction() as state:
                        state.counts[key] += 1
                    return 1
                return run

            runs = [_in_thread(bump(h, i * 300)) for i, h in enumerate(heaps)]
            _wait_for(lambda: _commits(server.url) - start >= 3, what="three commits waiting", every=0.05)
            server.flag("fail", True)
            server.flag("hold", False)
            for t, _ in runs:
                t.join(60)
            results = [out[0] for _, out in runs]
            for exc in results:
                assert isinstance(exc, dh.StorageError), repr(exc)
                assert exc.outcome_unknown is True, repr(exc)
                assert "may or may not have been committed" in str(exc), str(exc)
                assert "could not make this commit durable" in str(exc), str(exc)
            # The heap is closed: the server stops (a service manager restarts it),
            # exit status 1, saying why, rather than fail every later commit.
            try:
                code = server.proc.wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError("the server kept running with a closed heap") from None
            assert code == 1, code
        finally:
            for h in heaps:
                with contextlib.suppress(Exception):
                    h.close()
        log = server.log.read_text()
        assert "fsync" in log and "failed" in log, log[-3000:]
        assert "the server stopped: it could not make a commit durable" in log, log[-3000:]
        assert "start the server again" in log, log[-3000:]
    with dh.open(path) as heap:
        # in the file or not (written, never fsynced): the outcome the clients were told is unknown
        assert all(heap.state.counts[i * 300] in (0, 1) for i in range(3))


@pytest.mark.slow
def test_sigkill_of_the_server_during_concurrent_commits_loses_no_acknowledged_commit(
    tmp_path: Path,
) -> None:
    """Three client processes commit through the server, which is SIGKILLed at a
    random moment, three times. SIGKILL keeps the kernel's page cache: every
    acknowledged commit is in the file. A power loss keeps only what fsyncs covered:
    the file cut to the size the last returned fsync began at (logged before it
    returned, so before any commit it covered was answered) holds them too."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    nclients = 3
    acked = dict.fromkeys(range(nclients), 0)
    for round_ in range(3):
        (path.parent / "control" / "fsyncs").unlink(missing_ok=True)
        server = _Server(path)
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, server.url, str(i)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=subprocess_env())
                 for i in range(nclients)]
        lines: queue.Queue[str] = queue.Queue()
        try:
            for p in procs:
                assert first_line(p, 60) == "ready"
            for p in procs:
                stdout = p.stdout
                assert p.stdin is not None and stdout is not None
                threading.Thread(target=lambda s=stdout: [*map(lines.put, s)], daemon=True).start()
                p.stdin.write("go\n")
                p.stdin.flush()
            got: list[str] = []
            while sum(line.startswith("ack") for line in got) < 40 + 30 * round_:
                got.append(lines.get(timeout=60))
            server.proc.send_signal(signal.SIGKILL)
            server.kill()
            time.sleep(0.2)  # the clients' answers in flight (none can be acknowledged now)
        finally:
            for p in procs:
                p.kill()
                p.wait(30)
            server.kill()
        with contextlib.suppress(queue.Empty):
            while True:
                got.append(lines.get(timeout=0.5))
        for line in got:
            word, *rest = line.split()
            if word == "ack":
                acked[int(rest[0])] = max(acked[int(rest[0])], int(rest[1]))
        durable = max(server.fsyncs())
        lost_power = tmp_path / f"power{round_}.fs"
        shutil.copyfile(path, lost_power)
        os.truncate(lost_power, durable)
        for target in (path, lost_power):
            with dh.open(target) as heap:
                counts = heap.state.counts
                for i in range(nclients):
                    assert counts[i] >= acked[i], (target.name, i, counts[i], acked[i])
        with dh.open(path) as heap:  # the next round goes on from the file's counts
            acked = {i: heap.state.counts[i] for i in range(nclients)}
    assert min(acked.values()) > 0


def test_the_zeo_internals_the_pipeline_relies_on() -> None:
    """`_zeo_pipeline`'s PROTECTED block: ZEOStorage.tpc_finish finishes through the
    storage, sends ``info`` and answers with Result(tid, _clear_transaction);
    _clear_transaction releases the lock manager; StorageServer.invalidate queues
    through async_threadsafe; Delay's reply/error/set_sender; a ZEO client cache
    refuses a lower last tid; group commit's tpc_finish_nowait and wait_durable."""
    from ZEO.asyncio.server import Delay, ServerProtocol
    from ZEO.cache import ClientCache
    from ZEO.StorageServer import StorageServer, ZEOStorage

    from durable_heap._groupcommit import GroupCommitFileStorage

    finish = inspect.getsource(ZEOStorage.tpc_finish)
    for text in ("self._check_tid(id)", "assert self.locked", "self.stats.commits += 1",
                 "self.storage.tpc_finish(self.transaction, self._invalidate)",
                 "self.async_('info', self.get_size_info())", "Result(tid, self._clear_transaction)"):
        assert text in finish, text
    assert "self.server.invalidate(self, self.storage_id, tid, self.invalidated)" in inspect.getsource(
        ZEOStorage._invalidate)
    clear = inspect.getsource(ZEOStorage._clear_transaction)
    assert "self.lock_manager.release(self)" in clear and "self.transaction = None" in clear
    assert list(inspect.signature(StorageServer.invalidate).parameters) == [
        "self", "zeo_storage", "storage_id", "tid", "invalidated"]
    assert "zs.async_threadsafe('invalidateTransaction', tid, invalidated)" in inspect.getsource(
        StorageServer.invalidate)
    assert "return ZEOStorage(self, self.read_only)" in inspect.getsource(StorageServer.create_client_handler)
    assert "call_soon_threadsafe(self.call_async, method, args)" in inspect.getsource(
        ServerProtocol.async_threadsafe)
    assert "result.set_sender(message_id, self)" in inspect.getsource(ServerProtocol.send_reply)
    for name in ("reply", "error", "set_sender"):
        assert callable(getattr(Delay, name)), name
    assert "must be greater than" in inspect.getsource(ClientCache.setLastTid)
    # The reads answered from the last visible transaction (see the PROTECTED block).
    delegation = inspect.getsource(ZEOStorage.setup_delegation)
    for text in ("self.getTid = storage.getTid", "self.lastTransaction = storage.lastTransaction"):
        assert text in delegation, text
    register = inspect.getsource(ZEOStorage.register)
    assert register.index("self.setup_delegation()") < register.index("return self.lastTransaction()")
    assert "self.stats.loads += 1" in inspect.getsource(ZEOStorage.loadBefore)
    assert list(inspect.signature(ZEOStorage.history).parameters) == ["self", "tid", "size"]
    assert "self.storage.iterator(start, stop)" in inspect.getsource(ZEOStorage.iterator_start)
    from ZEO.asyncio.server import Acceptor
    assert "self.event_loop = loop = new_event_loop()" in inspect.getsource(Acceptor.__init__)
    assert "self.acceptor = self.loop = None" in inspect.getsource(StorageServer.close)
    assert list(inspect.signature(GroupCommitFileStorage.tpc_finish_nowait).parameters) == [
        "self", "transaction", "f"]
    assert list(inspect.signature(GroupCommitFileStorage.wait_durable).parameters) == ["self", "number"]
