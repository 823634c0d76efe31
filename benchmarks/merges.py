"""Where the commits of threads on one Dict bucket go: conflicts, merges, retries, waits, CPU.

    python -m benchmarks.merges                    8 threads, neighbouring keys, 3 s
    python -m benchmarks.merges --threads 2 --spread 1000
    python -m benchmarks.merges --profile 30       also a cProfile of every thread, top 30

The workload of `benchmarks.threads` (``durable_heap``: thread t adds 1 to key t of
one Dict of 10,000 ints, each change in ``heap.attempts()``), run in this process
with counters around the storage's conflict path (each counter is a wrapper:
it measures, never changes, what runs):

* conflicts: ``store`` calls that met a newer committed record and went to the
  storage's ``tryToResolveConflict`` (the allowlist guard, then ZODB's resolver);
  merged or not (a ConflictError: the attempt is retried);
* CPU of the thread (``time.thread_time``) in the guard's own resolver (ZODB's, each
  global checked as it is unpickled), in its full check (for the merges that resolver
  leaves to it), and in ``_EntryBucket._p_resolveConflict``;
* loads (``loadBefore``) and ``loadSerial`` calls per commit;
* wall time and CPU with the commit lock held (commits are serial there: the wall
  time bounds the commits per second; the rest of it is waiting for the GIL and the
  disk);
* wall time waiting for the commit lock (``tpc_begin``), in ``tpc_finish`` (the
  fsync wait of group commit) and in ``tpc_abort`` (its wait for the commits
  before to become visible), and sleeping in the retry back-off.

Figures are per commit over the measured interval; the process CPU per commit is
user+system time over that interval divided by the commits. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

N = 10_000


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sys_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _switches() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw + r.ru_nivcsw


class _Tally:
    """Counts and summed seconds, by name (one lock: the figures, not the speed, matter here)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n: dict[str, int] = defaultdict(int)
        self.t: dict[str, float] = defaultdict(float)
        self.on = False

    def add(self, name: str, seconds: float = 0.0) -> None:
        if self.on:
            with self.lock:
                self.n[name] += 1
                self.t[name] += seconds


def _timed(tally: _Tally, name: str, fn: Callable[..., Any],
           clock: Callable[[], float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            r = fn(*args, **kwargs)
        except BaseException:
            tally.add(name + " (raised)", clock() - t0)
            raise
        tally.add(name, clock() - t0)
        return r

    return wrapper


class _TimedLock:
    """The storage's commit lock, timing how long each commit holds it (wall and CPU):
    commits are serial there, so the wall time held bounds the commits per second."""

    def __init__(self, lock: Any, tally: _Tally) -> None:
        self.lock, self.tally = lock, tally
        self.since = (0.0, 0.0)

    def acquire(self, *args: Any) -> Any:
        got = self.lock.acquire(*args)
        self.since = (time.perf_counter(), time.thread_time())
        return got

    def release(self) -> None:
        wall, cpu = self.since
        self.tally.add("commit lock held (wall)", time.perf_counter() - wall)
        self.tally.add("commit lock held (CPU)", time.thread_time() - cpu)
        self.lock.release()


def run(nthreads: int, seconds: float, spread: int, entries: int, profile: int) -> dict[str, Any]:
    """Measure once in this process; return the figures (and print a profile if asked)."""
    import durable_heap as dh
    from durable_heap import _allow, _containers, _retry

    folder = tempfile.mkdtemp(prefix="dh-merges-")
    path = os.path.join(folder, "app.fs")
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = dict.fromkeys(range(entries), 0)
    heap = dh.open(path)
    tally = _Tally()
    wall, cpu = time.perf_counter, time.thread_time

    wrapper = heap.db.storage  # ChecksumStorage
    base = wrapper.base  # our FileStorage (group commit)
    guard = base.tryToResolveConflict
    assert isinstance(guard, _allow._GuardedResolver)
    # The guard's own resolver (ZODB's, each global checked as it is unpickled); the
    # full path (the opcode check, then ZODB's resolver) only for what it leaves. Not
    # `guard.resolve`: the guard takes its own path only while that is ZODB's function.
    real_checked = _allow._resolve_checked
    _allow._resolve_checked = _timed(tally, "checked resolve", real_checked, cpu)  # type: ignore[assignment]
    guard._check = _timed(tally, "guard check (full path)", guard._check, cpu)  # type: ignore[method-assign]
    base.tryToResolveConflict = _timed(tally, "conflict", guard, cpu)
    base.loadSerial = _timed(tally, "loadSerial", base.loadSerial, cpu)
    wrapper.loadBefore = _timed(tally, "load", wrapper.loadBefore, cpu)
    for name in ("tpc_begin", "tpc_finish", "tpc_abort", "tpc_vote"):
        fn = _timed(tally, name, getattr(base, name), wall)
        if name == "tpc_vote":
            fn = _timed(tally, "tpc_vote (CPU)", fn, cpu)
        setattr(base, name, fn)
        setattr(wrapper, name, fn)  # ChecksumStorage bound the base's at its creation
    base.store = _timed(tally, "store (CPU)", _timed(tally, "store", base.store, wall), cpu)
    base._commit_lock = _TimedLock(base._commit_lock, tally)
    real_merge = _containers._EntryBucket._p_resolveConflict
    _containers._EntryBucket._p_resolveConflict = _timed(  # type: ignore[method-assign]
        tally, "bucket merge", real_merge, cpu)
    real_pause = _retry.pause
    _retry.pause = _timed(tally, "back-off", real_pause, wall)
    import durable_heap._heap as heap_module

    heap_module.pause = _retry.pause  # bound by name at import

    done = [0] * nthreads
    retries = [0] * nthreads
    start, stop = threading.Barrier(nthreads + 1), threading.Event()
    profiles: list[cProfile.Profile] = []

    def change(t: int) -> None:
        k = t * spread
        for attempt in heap.attempts(1000):
            if attempt.number > 1:
                retries[t] += 1
            with attempt as state:
                state.d[k] += 1

    def work(t: int) -> None:
        for _ in range(5):
            change(t)
        start.wait()
        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        while not stop.is_set():
            change(t)
            done[t] += 1
        if prof is not None:
            prof.disable()
            profiles.append(prof)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    start.wait()
    tally.on = True
    base_retries = sum(retries)
    cpu0, sys0, switches0, t0 = _cpu(), _sys_cpu(), _switches(), wall()
    time.sleep(seconds)
    stop.set()
    tally.on = False
    total = sum(done)
    used, elapsed = _cpu() - cpu0, wall() - t0
    system, switches = _sys_cpu() - sys0, _switches() - switches0
    nretries = sum(retries) - base_retries
    for th in threads:
        th.join()
    heap.close()
    out: dict[str, Any] = {
        "threads": nthreads, "spread": spread, "commits": total, "commits_per_s": total / elapsed,
        "cpu_ms_per_commit": used / total * 1e3, "system_cpu_ms_per_commit": system / total * 1e3,
        "context_switches_per_commit": switches / total, "retries_per_commit": nretries / total,
    }
    for name in sorted(tally.n):
        out[name] = {"per_commit": tally.n[name] / total, "ms_each": tally.t[name] / tally.n[name] * 1e3,
                     "ms_per_commit": tally.t[name] / total * 1e3}
    if profiles:
        s = io.StringIO()
        stats = pstats.Stats(profiles[0], stream=s)
        for p in profiles[1:]:
            stats.add(p)
        stats.sort_stats("tottime").print_stats(profile)
        stats.sort_stats("cumulative").print_stats(profile)
        print(s.getvalue(), file=sys.stderr)
    return out


def _print(r: dict[str, Any]) -> None:
    print(f"{r['threads']} threads, keys {r['spread']} apart: {r['commits_per_s']:,.0f} commits/s, "
          f"CPU {r['cpu_ms_per_commit']:.3f} ms/commit (system {r['system_cpu_ms_per_commit']:.3f}), "
          f"{r['context_switches_per_commit']:.1f} context switches/commit, "
          f"retries {r['retries_per_commit']:.3f}/commit")
    print("| what | per commit | ms each | ms per commit |")
    print("|---|---|---|---|")
    for name, v in r.items():
        if isinstance(v, dict):
            print(f"| {name} | {v['per_commit']:.3f} | {v['ms_each']:.3f} | {v['ms_per_commit']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merges", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--spread", type=int, default=1, help="distance between the threads' keys")
    p.add_argument("--entries", type=int, default=N)
    p.add_argument("--profile", type=int, default=0, help="print a cProfile of the threads: top N")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a.threads, a.seconds, a.spread, a.entries, a.profile)
    if a.json:
        print(json.dumps(r))
    else:
        _print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
