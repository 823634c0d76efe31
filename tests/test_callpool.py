"""`durable_heap._callpool.CallPool`: serve's calls, few on the CPU at once, the waiting ones not counted."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

import durable_heap as dh
from durable_heap._callpool import CallPool
from durable_heap._waits import waiting


class _Running:
    """How many jobs run at once (the most seen)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


def _most_at_once(*, announced: bool) -> int:
    """Six calls on a pool of one slot that each wait (saying so, or not) until all six
    run or 10 s passed: how many ran at once."""
    pool, running, go = CallPool(6, 1), _Running(), threading.Event()

    def job() -> None:
        with running, (waiting() if announced else contextlib.nullcontext()):
            go.wait(10)

    futures = [pool.submit(job) for _ in range(6)]
    deadline = time.monotonic() + 10
    while running.now < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    go.set()
    for f in futures:
        f.result(10)
    pool.shutdown()
    return running.most


def test_results_errors_and_shutdown_behave_as_an_executors() -> None:
    pool = CallPool(4, 1)
    assert pool.submit(pow, 2, 10).result(10) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(10)
    futures = [pool.submit(time.sleep, 0.01) for _ in range(8)]
    pool.shutdown(wait=True)  # the queued calls run first
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(pow, 2, 2)


def test_calls_that_announce_their_waits_all_run_at_once_on_one_slot() -> None:
    """A commit waiting for its fsync gives its slot up (`durable_heap._waits`), so one slot
    still lets every thread's commit wait at once: they share fsyncs."""
    assert _most_at_once(announced=True) == 6


def test_calls_on_the_cpu_are_held_to_the_slots() -> None:
    """Spinning calls (on the CPU, never waiting) run one at a time on one slot; on a
    plain pool all six would run at once, sharing the GIL. (At most 2: on a loaded
    machine the watch may once take a spinning thread the OS did not run for waiting.)"""
    pool, running = CallPool(6, 1), _Running()

    def spin() -> None:
        with running:
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass

    for f in [pool.submit(spin) for _ in range(6)]:
        f.result(30)
    assert running.most <= 2
    pool.shutdown()


def test_calls_that_wait_without_saying_so_are_found_by_the_watch() -> None:
    """A call waiting on a socket, a sleep or a lock uses no CPU: the watch frees its
    slot, so calls to a slow service elsewhere do not run one at a time."""
    assert _most_at_once(announced=False) == 6


def test_a_group_commits_wait_for_its_fsync_is_announced(tmp_path: Path) -> None:
    """The hook the pool's slots rely on: a FileStorage commit calls this thread's
    `before` and `after` around its wait for the fsync (`_groupcommit.tpc_finish`)."""
    from durable_heap._waits import durability_waits

    seen: list[str] = []
    with dh.open(tmp_path / "w.fs") as heap:
        with durability_waits(lambda: seen.append("before"), lambda: seen.append("after")):
            with heap.transaction() as s:
                s.x = 1
        assert seen == ["before", "after"]
