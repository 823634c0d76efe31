"""Run one measurement in this process and print it as JSON (the runner spawns this).

    python -m benchmarks.one WORKLOAD SYSTEM SIZE DIR [REPS [SEED]]
    python -m benchmarks.one zeo_clients SYSTEM SIZE DIR MILLISECONDS SEED WORKER CLIENTS
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import time
import timeit
from typing import Any

from benchmarks.systems import SYSTEMS, System, key


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store(folder: str) -> str:
    return os.path.join(folder, "store")


def bulk(system: System, n: int, folder: str, reps: int) -> dict[str, Any]:
    """Build the store with n entries in one transaction (the file is reused below)."""
    path = _store(folder)
    t0 = time.perf_counter()
    system.build(path, n)
    elapsed = time.perf_counter() - t0
    size = sum(os.path.getsize(f) for f in system.files(path) if os.path.exists(f))
    return {"seconds": elapsed, "peak_rss_mb": _rss_mb(), "file_mb": size / 2**20}


def commit(
    system: System, n: int, folder: str, reps: int, seed: int = 0, warm: bool = False
) -> dict[str, Any]:
    """Change one random entry to a new value and make it durable, `reps` times.

    With `warm`, the entries come from a set of 20 changed over and over, whose
    records stay in memory: the cost of the commit itself, without loading.
    """
    path = _store(folder)
    system.open(path)
    rnd = random.Random(seed)  # each round of a run changes other entries...
    keys = [rnd.randrange(n) for _ in range(20)] if warm else None
    idx = [rnd.choice(keys) if keys else rnd.randrange(n) for _ in range(reps + 5)]
    values = random.Random().sample(range(10**6, 10**9), reps + 5)  # ...to new values
    for i, v in zip(idx[:5], values[:5], strict=True):  # warm-up: upper tree levels load
        system.change(i, v)
    before = sum(os.path.getsize(f) for f in system.files(path) if os.path.exists(f))
    times = []
    for i, v in zip(idx[5:], values[5:], strict=True):
        t0 = time.perf_counter()
        system.change(i, v)
        times.append(time.perf_counter() - t0)
    after = sum(os.path.getsize(f) for f in system.files(path) if os.path.exists(f))
    system.close()
    written = after if system.rewrites_all else (after - before) / reps
    return summarize({"samples_ms": [t * 1e3 for t in times], "bytes_per_commit": written})


def throughput(system: System, n: int, folder: str, millis: int, worker: int, clients: int) -> dict[str, Any]:
    """One of `clients` processes committing one-entry changes for `millis` ms.

    Each worker changes only its own entries (``i % clients == worker``). It
    prints ``ready`` once open and warm, and starts when a line arrives on stdin,
    so that every worker of a run starts at once.
    """
    system.open(_store(folder))
    rnd = random.Random(worker)
    mine = range(worker, n, clients)
    for _ in range(5):
        system.change(rnd.choice(mine), rnd.randrange(10**9))
    print("ready", flush=True)
    sys.stdin.readline()
    count = 0
    t0 = time.perf_counter()
    end = t0 + millis / 1000
    while time.perf_counter() < end:
        system.change(rnd.choice(mine), rnd.randrange(10**9))
        count += 1
    elapsed = time.perf_counter() - t0
    system.close()
    return {"commits": count, "seconds": elapsed}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Median and p90 of the samples (also used to merge several rounds)."""
    samples = sorted(result["samples_ms"])
    result["median_ms"] = statistics.median(samples)
    result["p90_ms"] = samples[int(len(samples) * 0.9)]
    return result


def read(system: System, n: int, folder: str, reps: int) -> dict[str, Any]:
    """Read one entry that is already in memory, many times (nanoseconds per read)."""
    path = _store(folder)
    system.open(path)
    k = key(n // 2)
    name = type(system).__name__
    if name in ("DurableHeapDict", "DurableHeapList"):
        heap = system.heap  # type: ignore[attr-defined]
        tm = heap.transaction_manager
        tm.begin()  # reads inside one transaction: the usual shape of an action
        target = heap.state.d if name == "DurableHeapDict" else heap.state.lst
        stmt, env = "t[k]", {"t": target, "k": k if name == "DurableHeapDict" else n // 2}
    elif name == "RawZODB":
        stmt, env = "t[k].value", {"t": system.tree, "k": k}  # type: ignore[attr-defined]
    elif name == "RawOOBTree":
        stmt, env = "t[k]", {"t": system.tree, "k": k}  # type: ignore[attr-defined]
    elif name == "PlainDict":
        stmt, env = "t[k]", {"t": system.data, "k": k}  # type: ignore[attr-defined]
    else:
        stmt, env = "r(k)", {"r": system.read, "k": k}
    timer = timeit.Timer(stmt, globals=env)
    timer.timeit(1000)
    number = max(1, reps // 10)
    runs = sorted(t / number * 1e9 for t in timer.repeat(repeat=10, number=number))
    result = {"ns_per_read": statistics.median(runs), "p90_ns": runs[8]}
    if name in ("DurableHeapDict", "DurableHeapList"):
        tm.abort()
    system.close()
    return result


def cold_open(system: System, n: int, folder: str, reps: int) -> dict[str, Any]:
    """Open the store and read one entry: time and this process's peak RSS."""
    path = _store(folder)
    system.prepare()  # imports are not part of opening
    base = _rss_mb()
    t0 = time.perf_counter()
    system.open(path)
    system.read(key(n // 3))
    elapsed = time.perf_counter() - t0
    system.close()
    return {"ms": elapsed * 1e3, "peak_rss_mb": _rss_mb(), "rss_before_mb": base}


def iterate(system: System, n: int, folder: str, reps: int) -> dict[str, Any]:
    """Open the store and go through every entry once: time and peak RSS growth."""
    path = _store(folder)
    system.open(path)
    base = _rss_mb()
    t0 = time.perf_counter()
    count = system.iterate()
    elapsed = time.perf_counter() - t0
    system.close()
    assert count == n, (count, n)
    return {"seconds": elapsed, "peak_rss_mb": _rss_mb(), "rss_growth_mb": _rss_mb() - base}


WORKLOADS = {"bulk": bulk, "open": cold_open, "read": read, "iterate": iterate, "commit": commit}


def main() -> None:
    workload, system_name, size, folder = sys.argv[1:5]
    reps = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    seed = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    system = SYSTEMS[system_name]()
    if system_name == "dict":
        system.build("", int(size))
    if workload == "zeo_clients":
        worker, clients = int(sys.argv[7]), int(sys.argv[8])
        result = throughput(system, int(size), folder, reps, worker, clients)
    elif workload in ("commit", "commit_warm", "zeo_commit"):
        result = commit(system, int(size), folder, reps, seed, warm=workload == "commit_warm")
    else:
        result = WORKLOADS[workload](system, int(size), folder, reps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
