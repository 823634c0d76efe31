"""ZEO's client as durable_heap runs it (`durable_heap._zeo._client_class`): its commit
lock is released once a ``tpc_finish`` is written to the server, not once answered.

So the request threads of one ``serve --workers`` worker (one client process) no
longer commit one fsync round trip at a time; each is still acknowledged only once
its commit is durable. A real ``durable-heap zeo`` server in a subprocess with its
fsync steered (`tests.test_zeo_pipeline.SERVER`), real heaps: nothing is mocked.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

import durable_heap as dh
from tests.test_zeo_pipeline import _commits, _in_thread, _make, _server, _wait_for


def test_a_second_commit_of_one_client_reaches_the_server_while_the_first_waits_for_its_fsync(
        tmp_path: Path) -> None:
    """Two threads of one client: the first commit's fsync is held, the second is written
    on the server meanwhile; neither is acknowledged before the fsync returns. Fails with
    ZEO's own tpc_finish (the second thread waits on the client's commit lock until the
    first is answered: the server never sees it while the fsync is held)."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path) as server:
        heap = dh.open(server.url)
        try:
            server.flag("hold", True)
            held = len(server.fsyncs("enter"))

            def bump(key: int) -> int:
                with heap.transaction() as state:
                    state.counts[key] += 1
                return key

            ta, out_a = _in_thread(lambda: bump(0))
            _wait_for(lambda: len(server.fsyncs("enter")) > held, what="the held fsync")
            tb, out_b = _in_thread(lambda: bump(500))
            _wait_for(lambda: _commits(server.url) >= 2, timeout=15, every=0.05,
                      what="the second commit of the same client to reach the server")
            assert out_a == [] and out_b == [], "acknowledged before its fsync returned"
            server.flag("hold", False)
            ta.join(30)
            tb.join(30)
            assert out_a == [0] and out_b == [500]
            with heap.transaction() as state:
                assert (state.counts[0], state.counts[500]) == (1, 1)
        finally:
            heap.close()


def test_the_threads_of_one_client_share_fsyncs_and_keep_exact_totals(tmp_path: Path) -> None:
    """8 threads of one client, 5 commits each (each thread its own entry), on a slow disk
    (10 ms a fsync): every commit counted once, and fewer fsyncs than commits. Fails with ZEO's
    own tpc_finish (one commit per fsync: each waits for its answer before the next
    begins)."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path, delay=0.01) as server:
        heap = dh.open(server.url, attempts=100)
        try:
            before = len(server.fsyncs())
            errors: list[BaseException] = []

            @heap.action
            def bump(key: int) -> None:  # retried on conflicts, as serve's calls are
                heap.state.counts[key] += 1

            def run(n: int) -> None:
                try:
                    for _ in range(5):
                        bump(n * 100)
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert errors == []
            with heap.transaction() as state:
                assert [state.counts[n * 100] for n in range(8)] == [5] * 8
            fsyncs = len(server.fsyncs()) - before
            assert 0 < fsyncs < 40, f"{fsyncs} fsyncs for 40 commits of one client"
        finally:
            heap.close()


def test_the_threads_of_one_client_share_server_sync_round_trips(tmp_path: Path) -> None:
    """One thread's server_sync ping is held before it is sent; meanwhile another client
    commits (acknowledged), then 7 more threads of the first client begin: all 7 ride one
    ping sent after them (2 pings for 8 begins), and each sees the commit acknowledged
    before it began. Fails without the shared ping (8 pings, one per begin)."""
    from durable_heap.testing import ZeoServer

    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path, n=10)
    server = ZeoServer(path, address=str(tmp_path / "zeo.sock"))
    url = server.start()
    heap, other = dh.open(url), dh.open(url)
    try:
        storage = heap.db.storage
        real = storage.ping
        pings: list[str] = []
        sent, gate = threading.Event(), threading.Event()

        def ping() -> None:  # the real round trip, the first one held before it is sent
            pings.append(threading.current_thread().name)
            if len(pings) == 1:
                sent.set()
                gate.wait(30)
            real()

        storage.ping = ping  # read by the client's sync() at each begin

        def read() -> int:
            with heap.transaction() as state:
                return int(state.counts[0])

        first, out_first = _in_thread(read)
        _wait_for(sent.is_set, what="the first begin's ping")
        with other.transaction() as state:
            state.counts[0] = 1  # acknowledged before the others begin
        threads = [_in_thread(read) for _ in range(7)]
        shared = getattr(storage, "_dh_ping", None)
        _wait_for(lambda: len(pings) >= 8 or (shared is not None and shared._asked >= 8),
                  what="the 7 later begins")
        gate.set()
        first.join(30)
        for t, _ in threads:
            t.join(30)
        assert [out for _, out in threads] == [[1]] * 7, "a begin missed a commit acknowledged before it"
        assert out_first and not isinstance(out_first[0], BaseException)
        assert len(pings) == 2, f"{len(pings)} pings for 8 begins"
    finally:
        gate.set()
        heap.close()
        other.close()
        server.stop()


def test_the_zeo_client_internals_its_finish_relies_on() -> None:
    """`_zeo._client_class().tpc_finish` is ZEO's ``ClientStorage.tpc_finish`` and
    ``ClientIO.tpc_finish_co`` with the commit lock released once the finish is
    written (ZEO 6.2): these pin what it copies and reads, and that ZEO's own server
    forgets a finished transaction before it reads the connection's next message."""
    import ZEO.asyncio.client
    import ZEO.asyncio.server
    import ZEO.ClientStorage

    cs = ZEO.ClientStorage.ClientStorage
    finish = inspect.getsource(cs.tpc_finish)
    assert "self._check_trans(txn, 'tpc_finish')" in finish
    assert "self._server.tpc_finish(id(txn), tbuf, f)" in finish
    assert "self.tpc_end(txn)" in finish and "self._iterator_gc()" in finish
    assert "self._update_blob_cache(tbuf, tid)" in finish
    end = inspect.getsource(cs.tpc_end)
    assert "tbuf.close()" in end and "txn.set_data(self, None)" in end
    assert "self._commit_lock.release()" in end
    assert "self._commit_lock.acquire()" in inspect.getsource(cs.tpc_begin)
    runner = inspect.getsource(ZEO.asyncio.client.ClientRunner.tpc_finish)
    assert "self.io_call(self.client.tpc_finish_co(tid, updates, f)" in runner
    co = inspect.getsource(ZEO.asyncio.client.ClientIO.tpc_finish_co)
    for line in ("if not self.operational:", "await self.protocol.server_call('tpc_finish', tid)",
                 "for oid, data, resolved in updates:", "cache.invalidate(oid, tid)",
                 "cache.store(oid, tid, None, data)", "with cache._lock:", "cache.setLastTid(tid)",
                 "f(tid)", "self.protocol.close()", "self.disconnected(self.protocol)"):
        assert line in co, line
    assert "return self.call_sync(method, args)" in inspect.getsource(
        ZEO.asyncio.client.Protocol.server_call)
    assert "self.write_message(" in inspect.getsource(ZEO.asyncio.client.Protocol.call_sync)
    # ZEO's own server: the reply and _clear_transaction happen while the finish is handled.
    result = inspect.getsource(ZEO.asyncio.server.Result.set_sender)
    assert "protocol.send_reply(msgid, reply)" in result and "callback()" in result
    from ZEO.StorageServer import ZEOStorage

    assert "Result(tid, self._clear_transaction)" in inspect.getsource(ZEOStorage.tpc_finish)
    assert "self.transaction = None" in inspect.getsource(ZEOStorage._clear_transaction)


def test_a_server_that_accepts_but_says_nothing_is_dropped_and_connected_to_again(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A connection whose TCP connect succeeded but that never gets the server's
    protocol version was kept for ever: the client never connected again, and every
    transaction failed after wait_timeout (seen once in tests/test_zeo.py's kill and
    restart, ZEO's heartbeat failing with ``AttributeError: heartbeat_bytes``). A real
    listening socket that accepts and stays silent, then a real server on its port."""
    import socket

    from durable_heap import _zeo
    from durable_heap.testing import ZeoServer

    monkeypatch.setattr(_zeo, "HANDSHAKE_TIMEOUT", 1.0)
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    took = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
    took.start()
    opened, out = _in_thread(lambda: dh.open(f"zeo://127.0.0.1:{port}?wait_timeout=20"))
    took.join(10)
    assert accepted, "the client did not connect to the silent socket"
    silent.close()  # (its accepted connection stays open, silent)
    try:
        with ZeoServer(tmp_path / "z.fs", address=f"127.0.0.1:{port}"):
            opened.join(15)
            assert not opened.is_alive(), "the client is still waiting on the silent connection"
            heap = out[0]
            assert not isinstance(heap, BaseException), heap
            with heap.transaction() as state:
                state.reached = True
            heap.close()
    finally:
        for conn in accepted:
            conn.close()


def test_the_zeo_client_internals_the_handshake_guard_relies_on() -> None:
    """`_zeo._guard_handshakes` wraps ZEO's ``Protocol.connection_made``,
    ``finish_connection`` (which sets ``heartbeat_bytes``) and ``heartbeat(write)``, and
    reads ``closed``, ``addr`` and ``loop`` (ZEO 6.2): these pin them."""
    import ZEO.asyncio.client as client_module

    from durable_heap import _zeo

    _zeo._client_class()
    assert client_module.Protocol._dh_guarded is True
    text = inspect.getsource(client_module.Protocol)  # ZEO's own source, as it defines them
    for line in ("def connection_made(self, transport):", "def finish_connection(self, protocol_version):",
                 "def heartbeat(self, write=True):", "self.heartbeat_bytes = self.encode(",
                 "self.write_message(self.heartbeat_bytes)", "self.closed = True", "self.addr = addr",
                 "self.loop.call_later("):
        assert line in text, line
