"""Wakes and the scheduler: the hand-over of a resolve's wake to this process's scheduler,
the scheduler's default poll, SIGTERM while its ZEO server is gone, and what a step
journals (#14)."""

from __future__ import annotations

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
from durable_heap import _timers
from durable_heap import _workflows as w
from durable_heap._retry import call_note
from durable_heap.testing import ZeoServer, subprocess_env

from .conftest import ROOT


@pytest.fixture
def heap(tmp_path: Path) -> Iterator[dh.Heap]:
    with dh.open(tmp_path / "wake.fs") as h, h.activate():
        with h.transaction() as s:
            s.counts = {}
        yield h


def _waiting(heap: dh.Heap) -> tuple[Any, Any]:
    """A workflow waiting on promise "go" whose next step counts (the handle, the workflow)."""
    @heap.action
    def count(name: str) -> None:
        heap.state.counts[name] = heap.state.counts.get(name, 0) + 1

    @heap.workflow
    def waits(arg: Any) -> Any:
        value = dh.promise("go").wait()
        count("after")
        return value

    return waits, count


# --- the hand-over -----------------------------------------------------------------------------


def test_a_resolve_hands_its_wake_to_the_scheduler_of_this_process(heap: dh.Heap) -> None:
    """With a scheduler running here, the wake comes with the resolve's commit: running it
    needs no look at the timers (and it still removes its timer)."""
    waits, _ = _waiting(heap)
    h = waits(1)
    heap._wf_schedulers += 1  # as while run_scheduler runs
    try:
        assert dh.resolve("go", 5)
    finally:
        heap._wf_schedulers -= 1
    assert [item[0] for item in heap._wf_handed] == [h.id]
    assert heap._run_handed() == 1
    assert h.result() == 5 and heap.state.counts == {"after": 1}
    assert [t.kind for t in heap.timers()] == ["prune"]  # the wake's timer went with its first step
    assert heap.run_due() == 0


def test_a_handed_wake_that_another_scheduler_ran_first_runs_nothing(heap: dh.Heap) -> None:
    """Exactly once: the timer stays the wake's durable record; whoever claims it first runs it."""
    waits, _ = _waiting(heap)
    h = waits(1)
    heap._wf_schedulers += 1
    try:
        dh.resolve("go", 6)
    finally:
        heap._wf_schedulers -= 1
    assert len(heap._wf_handed) == 1
    assert heap.run_due() == 1  # another scheduler (here: run_due) fired the timer first
    assert h.result() == 6 and heap.state.counts == {"after": 1}
    assert heap._run_handed() == 1  # the handed wake finds its timer gone and stops
    assert heap.state.counts == {"after": 1} and h.status == "done"


def test_no_hand_over_without_a_scheduler_or_with_a_persistent_argument(heap: dh.Heap) -> None:
    waits, _ = _waiting(heap)
    h = waits(1)
    dh.resolve("go", 1)  # no scheduler runs in this process: another one fires the timer
    assert not heap._wf_handed
    assert heap.run_due() == 1 and h.result() == 1
    with heap.transaction() as s:
        s.box = {"n": 1}

    @heap.workflow
    def holds(box: Any) -> Any:
        return dh.promise("go2").wait() + box["n"]

    h2 = holds(heap.state.box)  # a container of this thread's connection
    heap._wf_schedulers += 1
    try:
        dh.resolve("go2", 1)
    finally:
        heap._wf_schedulers -= 1
    assert not heap._wf_handed  # the scheduler's thread loads it from its own connection
    assert heap.run_due() == 1 and h2.result() == 2

    @heap.workflow
    def listed(items: list[int]) -> Any:
        return dh.promise("go3").wait() + len(items)

    h3 = listed([1, 2])  # a list would be shared by two threads
    heap._wf_schedulers += 1
    try:
        dh.resolve("go3", 1)
    finally:
        heap._wf_schedulers -= 1
    assert not heap._wf_handed
    assert heap.run_due() == 1 and h3.result() == 3


def test_a_scheduler_thread_runs_the_handed_wake(heap: dh.Heap) -> None:
    waits, _ = _waiting(heap)
    handles = [waits(i) for i in range(1)]
    ran = []
    original = heap._run_handed

    def spy() -> int:
        n = original()
        ran.append(n)
        return n

    heap._run_handed = spy  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=heap.run_scheduler, kwargs={"stop": stop, "poll": 30})
    t.start()
    try:
        for _ in range(200):
            if heap._wf_schedulers:
                break
            time.sleep(0.01)
        dh.resolve("go", 9)
        assert handles[0].result(timeout=20) == 9
    finally:
        stop.set()
        t.join(20)
    assert 1 in ran and not t.is_alive()


# --- the default poll -------------------------------------------------------------------------------


def test_an_idle_scheduler_polls_about_once_a_second_and_a_commit_still_wakes_it(heap: dh.Heap) -> None:
    """The old 5 ms default made an idle process run 400 transactions a second."""
    waits, _ = _waiting(heap)
    h = waits(1)
    rounds = []
    original = heap.run_due

    def counted(limit: int | None = None) -> int:
        rounds.append(time.monotonic())
        return original(limit)

    heap.run_due = counted  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=heap.run_scheduler, kwargs={"stop": stop})
    t.start()
    try:
        time.sleep(1.5)
        idle = len(rounds)
        dh.resolve("go", 3)  # a commit of this process rings it
        assert h.result(timeout=20) == 3
    finally:
        stop.set()
        t.join(20)
    assert 1 <= idle <= 4, rounds  # at 5 ms it was about 300
    assert not t.is_alive()


def test_default_poll_by_storage(tmp_path: Path) -> None:
    from durable_heap._targets import parse_target
    from durable_heap.testing import Clock

    with dh.open(tmp_path / "p.fs") as heap:
        assert _timers.default_poll(heap) == _timers.DEFAULT_POLL == 1.0
    with dh.open("memory://", clock=Clock()) as heap:  # a test clock moves and rings nothing
        assert _timers.default_poll(heap) == _timers.TEST_CLOCK_POLL

    class Unrung:
        clock = time.time
        target = parse_target("postgresql://localhost/x")

    assert _timers.default_poll(Unrung()) == _timers.UNRUNG_POLL == 0.1  # PostgreSQL pushes nothing


# --- over ZEO: a wake rung by another process's commit ---------------------------------------------


def _pings(heap: dh.Heap) -> list[int]:
    """Count the server_sync round trips (``ping``) of `heap`'s ZEO client."""
    storage: Any = heap.db.storage
    count = [0]
    ping = storage.ping

    def counted() -> Any:
        count[0] += 1
        return ping()

    storage.ping = counted
    return count


def test_trusting_pushed_skips_one_server_sync_round_trip(zeo_server: ZeoServer) -> None:
    from durable_heap._zeo import trusting_pushed

    with dh.open(zeo_server.url) as heap:
        pings = _pings(heap)
        with heap.transaction():
            pass
        assert pings[0] == 1  # server_sync (the default): each begin asks the server
        with trusting_pushed():
            with heap.transaction():
                pass
            with heap.transaction():
                pass
        assert pings[0] == 2  # the first begin inside trusted what the server pushed
        with trusting_pushed():
            pass  # unused: nothing left over for the next begin
        with heap.transaction():
            pass
        assert pings[0] == 3
    with dh.open(zeo_server.url + "?server_sync=0") as heap:
        pings = _pings(heap)
        with heap.transaction():
            pass
        assert pings[0] == 0


def test_a_wake_rung_over_zeo_asks_the_server_only_what_it_needs(zeo_server: ZeoServer) -> None:
    """The round that another process's resolve rang: its records are asked for as the
    invalidation arrives (ZEO's IO thread), and neither the transaction that finds the
    wake due nor the wake's step spends a server_sync round trip (the commit that rang is
    in view already); the workflow's end, and a round nobody rang, still ask."""
    with dh.open(zeo_server.url) as a, dh.open(zeo_server.url) as b, a.activate():
        with a.transaction() as s:
            s.counts = {}
        @a.action
        def count(name: str) -> None:
            a.state.counts[name] = a.state.counts.get(name, 0) + 1

        @a.workflow
        def waits(name: str) -> Any:
            value = dh.promise(name).wait()
            count("after")
            return value

        _timers._ring_on_invalidation(a)  # as run_scheduler does
        pings = _pings(a)
        used = []
        for rung in (True, False):
            with a.transaction() as s:
                s.counts = {}
            h = waits(f"go {rung}")
            a._wf_rung = None
            with b.activate():
                assert dh.resolve(f"go {rung}", rung)
            for _ in range(500):  # its invalidation arrives in ZEO's IO thread
                if a._wf_rung is not None:
                    break
                time.sleep(0.01)
            assert a._wf_rung == []  # rung, and its records asked for already
            if not rung:
                a._wf_rung = None  # as if found by a poll
            before = pings[0]
            a._wf_leases_at = a.clock()  # (no look at expired leases in this round)
            assert a.run_due() == 1
            used.append(pings[0] - before)
            assert h.result(timeout=20) == rung
            with a.transaction() as s:
                assert s.counts == {"after": 1}
    # unrung: the round's look, the step, the end, the round's last look; rung: two fewer
    assert used == [2, 4], used


def test_a_resolve_over_zeo_asks_for_the_timers_first_bucket_with_the_promise(zeo_server: ZeoServer) -> None:
    """The wake's timer lands in the timers' first bucket: asked for before the promise
    and the waiting record load, so that it is not a third round trip after them."""
    with dh.open(zeo_server.url) as a, dh.open(zeo_server.url) as b, a.activate():
        @a.workflow
        def waits(name: str) -> Any:
            return dh.promise(name).wait(timeout=3600)  # (a timer each)

        handles = [waits(f"p{i}") for i in range(40)]  # the timers tree: several buckets
        with a.transaction():
            timers = a.connection.root()[w.TIMERS_KEY]
            state = timers.__getstate__()
            assert len(state) == 2  # ((children and keys), first bucket)
            first = state[1]._p_oid
        storage: Any = b.db.storage
        asked: list[bytes] = []
        prefetch = storage.prefetch

        def spy(oids: Any, tid: bytes) -> Any:
            oids = list(oids)
            asked.extend(oids)
            return prefetch(oids, tid)

        storage.prefetch = spy
        with b.activate():
            assert dh.resolve("p7", 7)
        assert first in asked
        assert a.run_due() >= 1 and handles[7].result(timeout=20) == 7


# --- SIGTERM while the ZEO server is gone ---------------------------------------------------------------

LOST = """
import sys, threading
import durable_heap as dh
heap = dh.open(sys.argv[1])
threading.Timer(0.5, lambda: print("ready", flush=True)).start()
heap.run_scheduler()
print("stopped", flush=True)
"""


@pytest.mark.slow
def test_a_scheduler_whose_zeo_server_is_gone_stops_on_sigterm(tmp_path: Path) -> None:
    """It waited for the server to come back (the target's wait_timeout, here 120 s) first."""
    with ZeoServer(tmp_path / "gone.fs") as server:
        proc = subprocess.Popen([sys.executable, "-c", LOST, server.url + "?wait_timeout=120"],
                                env=subprocess_env({"PYTHONPATH": str(ROOT)}), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            server.kill()
            time.sleep(2)  # its next round waits for the server
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped", err


# --- what a step journals ---------------------------------------------------------------------------------


def test_a_redacted_actions_step_keeps_its_arguments_out_of_journal_and_history(heap: dh.Heap) -> None:
    @heap.action
    @dh.redact("token")
    def connect(user: str, token: str) -> None:
        heap.state.last = user

    @heap.workflow
    def flow() -> int:
        connect("ann", "s3cret")
        return 1

    h = flow()
    assert h.result() == 1
    assert h.info["journal"][0]["detail"].endswith("connect('ann', <redacted>)")
    notes = [str(t["description"]) for t in heap.db.undoLog(0, 20)]
    assert any("connect('ann', <redacted>)" in n for n in notes), notes
    assert not any("s3cret" in n for n in notes), notes


@pytest.mark.parametrize("args, kwargs", [
    ((), {}), ((1,), {}), ((1, "a", None, True, 2.5), {}), (("x" * 38,), {}), (("x" * 39,), {}),
    (("x" * 60,), {}), (("é\n'\"",), {}), ((10 ** 60,), {}), ((-0.0, float("inf")), {}),
    (([1, 2],), {}), ((1,), {"k": 2}), ((b"ab",), {}),
])
def test_a_steps_journaled_call_is_the_transaction_notes_text(args: tuple[Any, ...],
                                                             kwargs: dict[str, Any]) -> None:
    """Journals written before keep matching on replay (their arguments are compared)."""
    def put(*a: Any, **k: Any) -> None: ...

    assert w._step_note("put", args, kwargs, put) == call_note("put", args, kwargs, put)


def test_journal_timer_and_cron_entries_pickle_as_before() -> None:
    """Their pickles are the on-disk format: the same bytes as object.__reduce_ex__ made."""
    import io
    import pickle

    entries = [w.JournalEntry("step", "put", "put(1)", 1, at=1.5),
               w.JournalEntry("step", "put", "put(2)", error=("builtins", "ValueError", ("x",), "x"), at=2.5),
               w.TimerEntry("run", "wid", created=3.5, origin="promise p"),
               w.TimerEntry("call", ("m", "f"), (1,), {"a": 2}, created=4.5),
               w.CronEntry(("m", "f"), "0 9 * * 1", (), {}, "Europe/Paris", "once")]

    class Before(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) in (w.JournalEntry, w.TimerEntry, w.CronEntry):
                return object.__reduce_ex__(obj, 3)
            return NotImplemented

    for protocol in (2, 3):
        f = io.BytesIO()
        Before(f, protocol).dump(entries)
        assert pickle.dumps(entries, protocol) == f.getvalue()
    for e in entries:
        back = pickle.loads(pickle.dumps(e, 3))
        assert type(back) is type(e) and back.__getstate__() == e.__getstate__()


def test_the_zodb_and_zeo_hooks_the_scheduler_uses() -> None:
    """PROTECTED uses (`_timers`): the DB's MVCC adapter's ``invalidate(tid, oids)`` and
    ``invalidateCache()`` (shadowed per instance to ring the scheduler), a connection's
    ``prefetch(oids)``, ZEO's ``ClientStorage.is_connected()`` and ``prefetch(oids, tid)``,
    and ``notify_connected`` setting ``sync`` to ``ping`` (`_zeo._client_class`)."""
    import inspect

    import ZEO.ClientStorage
    import ZODB
    import ZODB.Connection
    from ZODB.MappingStorage import MappingStorage

    db = ZODB.DB(MappingStorage())
    try:
        adapter = db._mvcc_storage
        assert list(inspect.signature(adapter.invalidate).parameters)[1] == "oids"  # (tid, oids)
        assert not inspect.signature(adapter.invalidateCache).parameters
    finally:
        db.close()
    assert callable(ZODB.Connection.Connection.prefetch)
    client = ZEO.ClientStorage.ClientStorage
    assert callable(client.is_connected)
    assert list(inspect.signature(client.prefetch).parameters) == ["self", "oids", "tid"]
    # `_zeo._client_class` takes out the ``sync = ping`` that notify_connected sets under
    # server_sync, and calls ``ping`` itself (`trusting_pushed`)
    connected = inspect.getsource(client.notify_connected)
    assert "self.sync = self.ping" in connected and "self.server_sync" in connected
    assert "self.ping = " in connected
