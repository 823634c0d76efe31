"""asyncio tasks against threads: one-entry commits, and how late the event loop runs meanwhile.

    python -m benchmarks.async_tasks              1, 10, 32 and 100 workers, 2000 commits each row
    python -m benchmarks.async_tasks --quick      1 and 4 workers, 80 commits (a few seconds)
    python -m benchmarks.async_tasks --workers 8,64 --commits 4000 --json

Each row is a fresh FileStorage heap in a temporary folder, N workers and a
fixed number of commits shared among them; each commit sets one entry of the
worker's own `Dict` (so workers never conflict). Three ways to run them:

- ``tasks``: N asyncio tasks, each ``async with heap.transaction()`` with an
  ``await asyncio.sleep(0)`` inside (standing for the await of a real handler,
  so that the transactions interleave); the commit runs on the event loop.
- ``to_thread``: N asyncio tasks, each ``await asyncio.to_thread(commit)``:
  the commit runs in the default thread pool, the loop only waits.
- ``threads``: N plain threads, each ``with heap.transaction()``; the event
  loop runs nothing but the ticker.

Meanwhile a ticker task on the event loop sleeps 1 ms at a time and records
how late each sleep wakes while the commits run: the loop's median and worst
lag are what every other coroutine of the process (requests, timeouts,
heartbeats) would wait; `ticks` is how many times it got to run. Tasks use the
heap's default bound (32 async transactions open at once). Nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

TICK = 0.001


async def _ticker(measure: asyncio.Event, stop: asyncio.Event, lags: list[float]) -> None:
    """Sleep TICK at a time; while `measure` is set, record how late each sleep woke."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(TICK)
        if measure.is_set():
            lags.append(max(0.0, loop.time() - t0 - TICK))


def one(mode: str, workers: int, commits: int, folder: str) -> dict[str, Any]:
    """Measure one row on a fresh heap: `commits` one-entry commits shared by `workers`."""
    import durable_heap as dh

    # The default bound on open async transactions (32): more tasks than that wait for a place.
    heap = dh.open(os.path.join(folder, f"{mode}-{workers}.fs"))
    with heap.transaction() as s:
        s.boxes = [{} for _ in range(workers)]
    each = commits // workers

    def commit(i: int, j: int) -> None:
        with heap.transaction() as s:
            s.boxes[i]["k"] = j

    async def task(i: int) -> None:
        for j in range(each):
            if mode == "tasks":
                async with heap.transaction() as s:
                    await asyncio.sleep(0)  # a handler's await: other tasks run, their transactions open
                    s.boxes[i]["k"] = j
            else:
                await asyncio.to_thread(commit, i, j)

    def thread(i: int) -> None:
        for j in range(each):
            commit(i, j)

    async def main() -> float:
        measure, stop = asyncio.Event(), asyncio.Event()
        lags: list[float] = result["lags"]
        ticker = asyncio.create_task(_ticker(measure, stop, lags))
        await asyncio.sleep(0.01)  # the ticker is running
        measure.set()
        t0 = time.perf_counter()
        if mode == "threads":
            threads = [threading.Thread(target=thread, args=(i,)) for i in range(workers)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                await asyncio.sleep(0.005)
            for t in threads:
                t.join()
        else:
            await asyncio.gather(*(task(i) for i in range(workers)))
        elapsed = time.perf_counter() - t0
        measure.clear()
        stop.set()
        await ticker
        return elapsed

    result: dict[str, Any] = {"lags": []}
    elapsed = asyncio.run(main())
    lags = sorted(result.pop("lags"))
    done = [box["k"] for box in heap.state.boxes]
    heap.close()
    return {
        "mode": mode,
        "workers": workers,
        "commits": each * workers,
        "commits_per_s": each * workers / elapsed,
        "lag_median_ms": statistics.median(lags) * 1e3 if lags else 0.0,
        "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1e3 if lags else 0.0,
        "lag_worst_ms": lags[-1] * 1e3 if lags else 0.0,
        "ticks": len(lags),
        "verified": done == [each - 1] * workers,
    }


MODES = ("tasks", "to_thread", "threads")


def main(argv: list[str] | None = None) -> int:
    # 100 threads hold 100 connections, past ZODB's pool size of 64: ZODB warns for each.
    logging.getLogger("ZODB.DB").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(prog="python -m benchmarks.async_tasks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 and 4 workers, 80 commits")
    p.add_argument("--workers", help="comma-separated worker counts")
    p.add_argument("--commits", type=int, help="commits per row, shared by its workers")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else (
        [1, 4] if args.quick else [1, 10, 32, 100])
    commits = args.commits or (80 if args.quick else 2000)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in workers:
            for mode in MODES:
                rows.append(one(mode, n, commits, folder))
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print("| workers | how | commits/s | loop lag median | loop lag p99 | loop lag worst | ticks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['mode']} | {r['commits_per_s']:,.0f} | {r['lag_median_ms']:.2f} ms "
              f"| {r['lag_p99_ms']:.2f} ms | {r['lag_worst_ms']:.2f} ms | {r['ticks']} |")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
