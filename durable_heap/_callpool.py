"""The threads that run ``durable-heap serve``'s calls: few on the CPU at once, many waiting.

A call's commit waits for its fsync (group commit: one fsync makes every commit
written meanwhile durable, `durable_heap._groupcommit`). On a disk whose flush
takes milliseconds, many calls must be in flight for their commits to share
fsyncs; on a fast disk the same number of threads only compete for the GIL (a
one-entry update took 1.3 ms of CPU with one call on the CPU at a time, 1.5-1.7 ms
with sixteen). So a call starts only while fewer than `slots` others are on the
CPU, and a call waiting for its fsync gives its slot up (`durability_waits`): as
many threads are busy as the disk's speed asks for, up to `threads`. The idle
thread that last finished takes the next call (its connection's cache is the
freshest).

A call may also wait on something else: a socket (a request to another
service), a sleep, a lock. A watch looks at the calls on a slot every `TICK`
seconds while others queue: one whose thread used under a quarter of the time
since the last look in CPU time (``time.pthread_getcpuclockid``), and under half
its share of the process's, is taken to wait, and no longer holds its slot, so
that calls to a slow service do not hold back the others (they run as on a
plain pool of `threads`). Where a thread's CPU time cannot be read, every call
has a slot of its own (a plain pool).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from ._waits import durability_waits

__all__ = ["CallPool"]

#: Seconds between the watch's looks at the calls on a slot, while calls queue.
TICK = 0.002
#: A call whose thread used less than this share of a look's interval in CPU time waits.
WAITING_SHARE = 0.25

_Job = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _waits(cpu: float, wall: float, proc: float, holders: int) -> bool:
    """Whether a call whose thread used `cpu` seconds of CPU over `wall` seconds waits on
    something: under a quarter of the time, and under half its share of what the
    process used meanwhile (`proc`, among `holders` calls on a slot). The second
    keeps calls that share the GIL, or a machine busy with other work, from looking
    as if they waited."""
    return cpu < WAITING_SHARE * wall and cpu < 0.5 * proc / max(1, holders)


def _cpu_clock() -> int | None:
    """This thread's CPU-time clock, or None where there is none to read from another thread."""
    try:
        clock = time.pthread_getcpuclockid(threading.get_ident())
        time.clock_gettime(clock)
    except (AttributeError, OSError):
        return None
    return clock


class _Worker:
    __slots__ = ("clock", "cpu", "job", "on_slot", "proc", "ready", "seen", "thread", "waits")

    def __init__(self) -> None:
        self.job: _Job | None = None
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None
        self.clock: int | None = None  # its CPU-time clock (read by the watch)
        self.on_slot = False  # it runs a call and holds a slot
        self.waits = False  # ... which the watch found waiting (not on the CPU)
        self.seen = 0.0  # when the watch (or the slot's start) last read `cpu` and `proc`
        self.cpu = 0.0  # its thread's CPU time then (-1: not read yet)
        self.proc = 0.0  # the process's


class CallPool(concurrent.futures.Executor):
    """An executor of at most `threads` threads, `slots` of them on the CPU (see the module)."""

    def __init__(self, threads: int, slots: int, name: str = "durable-heap-call") -> None:
        self._threads = threads
        self._slots = slots if _cpu_clock() is not None else threads
        self._name = name
        self._lock = threading.Lock()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._idle: list[_Worker] = []  # a stack: the last to finish is the first to go again
        self._workers: list[_Worker] = []
        self._on_cpu = 0  # slots held: calls running, not waiting for an fsync nor found waiting
        self._shutdown = False
        self._queued = threading.Condition(self._lock)  # wakes the watch: calls queue
        self._watch_idle = True  # the watch waits for calls to queue (or is not started)
        self._watching: threading.Thread | None = None

    # -- the executor ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        if kwargs:
            raise TypeError("CallPool.submit takes positional arguments only")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._jobs.append((future, fn, args))
            self._dispatch()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._jobs:
                    self._jobs.popleft()[0].cancel()
            idle, self._idle = self._idle, []
            for worker in idle:
                worker.ready.set()  # with no job: it returns
            self._queued.notify()
        joined = 0
        while wait:  # (the calls queued still run: a thread started meanwhile is joined too)
            with self._lock:
                workers = self._workers[joined:]
            if not workers:
                return
            for worker in workers:
                if worker.thread is not None and worker.thread is not threading.current_thread():
                    worker.thread.join()
            joined += len(workers)

    # -- slots (all under _lock) ------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued calls to threads while slots are free."""
        while self._jobs and self._on_cpu < self._slots:
            if self._idle:
                worker = self._idle.pop()
            elif len(self._workers) < self._threads:
                worker = _Worker()
                worker.thread = threading.Thread(target=self._work, args=(worker,), daemon=True,
                                                 name=f"{self._name}-{len(self._workers)}")
                self._workers.append(worker)
                worker.thread.start()
            else:
                return  # every thread is busy: the next to finish takes the next call
            worker.job = self._jobs.popleft()
            self._take(worker)
            worker.ready.set()
        if self._jobs and self._watch_idle and len(self._workers) - len(self._idle) < self._threads:
            if self._watching is None:
                self._watching = threading.Thread(target=self._watch, daemon=True, name=f"{self._name}-watch")
                self._watching.start()
            self._watch_idle = False
            self._queued.notify()

    def _take(self, worker: _Worker) -> None:
        self._on_cpu += 1
        worker.on_slot, worker.waits, worker.cpu = True, False, -1.0

    def _give_up(self, worker: _Worker) -> None:
        if worker.on_slot and not worker.waits:
            self._on_cpu -= 1
        worker.on_slot = worker.waits = False

    def _watch(self) -> None:
        """While calls queue: every TICK, free the slots of calls found waiting (see the module)."""
        with self._lock:
            while not self._shutdown:
                if not self._jobs:
                    self._watch_idle = True
                    self._queued.wait()
                    continue
                self._queued.wait(TICK)  # (woken early only by shutdown)
                now, proc = time.monotonic(), time.process_time()
                holders = [w for w in self._workers if w.on_slot and not w.waits and w.clock is not None]
                for worker in holders:
                    try:
                        cpu = time.clock_gettime(worker.clock)  # type: ignore[arg-type]
                    except OSError:  # the thread is gone
                        continue
                    if worker.cpu >= 0 and _waits(cpu - worker.cpu, now - worker.seen, proc - worker.proc,
                                                  len(holders)):
                        worker.waits = True
                        self._on_cpu -= 1
                    worker.seen, worker.cpu, worker.proc = now, cpu, proc
                self._dispatch()

    # -- a worker thread ------------------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        worker.clock = _cpu_clock()

        def off_cpu() -> None:  # its commit waits for an fsync (or its retry pauses)
            with self._lock:
                self._give_up(worker)
                self._dispatch()

        def on_cpu_again() -> None:
            # No wait for a slot here: the call's rest (its answer) is short, and a wait
            # while it holds locks (a retried call's queue) could stop every other call.
            with self._lock:
                self._take(worker)

        with durability_waits(off_cpu, on_cpu_again):
            while True:
                worker.ready.wait()
                worker.ready.clear()
                job, worker.job = worker.job, None
                if job is None:  # shutdown
                    return
                if worker.clock is not None:  # the watch's first look compares with this
                    cpu, proc = time.clock_gettime(worker.clock), time.process_time()
                    with self._lock:
                        worker.seen, worker.cpu, worker.proc = time.monotonic(), cpu, proc
                future, fn, args = job
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as exc:  # noqa: BLE001 - the caller's to see
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
                del future, job  # (no reference kept while idle)
                with self._lock:
                    self._give_up(worker)
                    self._idle.append(worker)
                    self._dispatch()
                    if self._shutdown and worker in self._idle:  # nothing left for it
                        self._idle.remove(worker)
                        return
