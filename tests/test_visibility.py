"""Durable before visible, on every read path: no read shows a commit that is still
waiting for its fsync (a power loss could take it back), over ZEO and in one process.

Over ZEO: a real ``durable-heap zeo`` server whose ``os.fsync`` is held (the
`tests.test_zeo_pipeline` server: the fsync is the one thing steered), and raw ZEO
clients asking what a client can ask: ``load()`` (the revision before the largest
tid), ``loadBefore``, ``getTid``, ``history``, ``iterator``, ``lastTransaction()``
of a client that connects meanwhile. In one process: a file heap whose fsync is held
(`tests.test_group_commit`'s gate) and ``load()`` from another thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ZEO
from ZODB.utils import maxtid, p64, u64

import durable_heap as dh
from tests.test_group_commit import _Gate
from tests.test_zeo_pipeline import _in_thread, _make, _server, _wait_for


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    """`tests.test_group_commit`'s os.fsync gate (held shut by `_Gate.shut`)."""
    g = _Gate()
    monkeypatch.setattr(os, "fsync", g)
    yield g
    g.open.set()


def _client(url: str) -> Any:
    host, _, port = url[len("zeo://"):].rpartition(":")
    return ZEO.client((host, int(port)), wait_timeout=30)


def _oids(client: Any) -> list[bytes]:
    """Every oid in the heap (``record_iternext`` over the server's index)."""
    oids, cursor = [], None
    while True:
        oid, _, _, cursor = client.record_iternext(cursor)
        oids.append(oid)
        if cursor is None:
            return oids


def _reads(client: Any, oids: list[bytes]) -> dict[bytes, Any]:
    """What `client` is told of each oid: the serial of load(), loadBefore(maxtid)'s
    (serial, end), getTid() and the tids of history()."""
    out = {}
    for oid in oids:
        data, serial = client.load(oid)
        r = client.loadBefore(oid, maxtid)
        out[oid] = (serial, data, r[1], r[2], client.getTid(oid),
                    [h["tid"] for h in client.history(oid, 5)])
    return out


def test_a_zeo_client_reads_nothing_of_a_commit_waiting_for_its_fsync(tmp_path: Path) -> None:
    """While a commit waits for its (held) fsync, a ZEO client, old or connecting
    meanwhile, is told nothing of it on any read: ``load()`` and ``loadBefore(oid,
    maxtid)`` give the revisions before it (with no end: current, as far as it may
    know), ``getTid``/``history`` no later tid, ``iterator`` stops before it and
    ``lastTransaction()`` is the one before. Once durable, both clients see it, their
    caches moved on by its invalidation. Fails without the server's read overrides
    (`_zeo_pipeline`): ``load()`` returns the pending commit's record, which the
    client caches as current (after a power loss of the server: a record that never
    was, served from the cache)."""
    path = tmp_path / "server" / "app.fs"
    path.parent.mkdir()
    _make(path)
    with _server(path) as server:
        old = _client(server.url)
        heap = dh.open(server.url)
        try:
            oids = _oids(old)
            before = old.lastTransaction()
            expected = _reads(old, oids)
            server.flag("hold", True)
            held = len(server.fsyncs("enter"))

            def bump() -> int:
                with heap.transaction() as state:
                    state.counts[0] += 1
                    state.counts[999] += 1
                return 1

            t, out = _in_thread(bump)
            _wait_for(lambda: len(server.fsyncs("enter")) > held, what="the held fsync")
            new = _client(server.url)  # connects while the commit waits
            try:
                assert new.lastTransaction() == before
                for client in (old, new):
                    assert _reads(client, oids) == expected
                    assert client.lastTransaction() == before
                    assert [txn.tid for txn in client.iterator()][-1] == before
                assert out == []  # not acknowledged either
                server.flag("hold", False)
                t.join(30)
                assert out == [1]
                after = heap.db.lastTransaction()
                assert after > before
                for client in (old, new):
                    _wait_for(lambda c=client: c.lastTransaction() == after, what="the invalidation")
                    seen = _reads(client, oids)
                    changed = [oid for oid in oids if seen[oid][0] == after]
                    assert changed, "the durable commit is not visible"
                    for oid in changed:  # the cache held the old revision as current: moved on
                        assert seen[oid][2:5] == (after, None, after)
                        assert seen[oid][5][0] == after
                    assert [txn.tid for txn in client.iterator()][-1] == after
                with dh.open(server.url) as fresh:
                    assert fresh.state.counts[0] == 1 and fresh.state.counts[999] == 1
            finally:
                new.close()
        finally:
            heap.close()
            old.close()


def test_a_load_in_one_process_shows_no_commit_waiting_for_its_fsync(heap_path: Path, gate: _Gate) -> None:
    """A file heap: while one thread's commit waits for its (held) fsync, ``load()`` of
    the storage in another thread (what ``durable-heap inspect`` and the checks use)
    gives the revision before it, as every connection sees, not the pending record
    (which the checksum layer also called damaged: "later than the heap's last
    transaction"). An object that commit created is not there yet. Fails without
    `_filestorage.FileStorage.load`."""
    heap = dh.open(heap_path)
    try:
        with heap.transaction() as state:
            state.counts = dict.fromkeys(range(10), 0)
        storage = heap.db.storage
        before = heap.db.lastTransaction()
        root = storage.load(p64(0))
        gate.shut()
        done = threading.Event()

        def bump() -> None:
            with heap.transaction() as state:
                state.counts[0] += 1
                state.more = dh.Dict()  # a new object, and the root changes
            done.set()

        writer = threading.Thread(target=bump, daemon=True)
        writer.start()
        assert gate.entered.acquire(timeout=20)  # written, waiting for its fsync
        fs = storage.base
        assert fs.last_written() > before  # the commit is in the file and the index
        assert storage.load(p64(0)) == root
        for i in range(1, u64(fs.new_oid())):
            oid = p64(i)
            try:
                _, serial = storage.load(oid)
            except Exception as exc:  # noqa: BLE001 - only "not there" is allowed
                assert type(exc).__name__ == "POSKeyError", repr(exc)
                continue
            assert serial <= before
        assert not done.is_set()
        gate.open.set()
        writer.join(30)
        assert done.is_set()
        last = heap.db.lastTransaction()
        assert last > before
        assert any(storage.load(p64(i))[1] == last for i in range(1, u64(fs.new_oid())))
    finally:
        gate.open.set()
        heap.close()
