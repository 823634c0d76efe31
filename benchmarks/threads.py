"""Threads committing at once in one process: what group commit buys, on this disk and a slow one.

    python -m benchmarks.threads                          1/2/4/8 threads, this disk and a 2 ms one
    python -m benchmarks.threads --threads 8 --delays 2   one cell
    python -m benchmarks.threads --baseline /work/main    also today's durable_heap (another checkout)
    python -m benchmarks.threads --dir /dev/shm --delays 0,2   a RAM disk: CPU-bound, and exactly 2 ms
    python -m benchmarks.threads --json out.json
    python -m benchmarks.threads --quick                  a smoke run (2 threads, short)

Each thread commits one-entry changes as fast as it can for ``--seconds``: thread t
adds 1 to its own key of one store of 10,000 entries. The keys are neighbours
(0, 1, ..., 7), as in a service whose requests touch recent entries, so in a
durable_heap Dict they share one bucket: concurrent commits conflict and are merged
by the bucket's ``_p_resolveConflict``, or retried. The systems:

* ``durable_heap``: a ``Dict`` of ints, each change in ``heap.attempts()``;
* ``durable_heap_spread``: the same with keys 1,000 apart (each in its own bucket);
* ``durable_heap_baseline`` (with ``--baseline``): the same code as ``durable_heap``
  run against another checkout, today's code without group commit;
* ``raw_zodb``: what a ZODB expert writes, ZODB's own FileStorage and Persistent items
  in an OOBTree, each thread its own connection and ``tm.attempts()``;
* ``raw_zodb_gc``: the same on durable_heap's group-committing FileStorage;
* ``sqlite``: sqlite3 in WAL mode with ``synchronous=FULL``, one connection per thread.

The slow disk: a small C library, built here with ``cc`` and loaded with
``LD_PRELOAD`` into every measured process alike, makes each ``fsync`` and
``fdatasync`` of the process (Python's, ZODB's, SQLite's) sleep ``--delays`` ms
after the real call returns, as a disk whose flush takes that long would.

Every measurement runs in its own process; the systems alternate within each round
and the figures are medians over ``--rounds`` rounds. CPU per commit is the
process's user+system time over the measured interval divided by its commits: it
includes conflict merges and retries, and under the GIL it bounds commits/s at
1 / CPU per commit. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
N = 10_000

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void slow(void) {
    static long ns = -1;
    if (ns < 0) { const char *s = getenv("DH_BENCH_FSYNC_US"); ns = s ? atol(s) * 1000L : 0; }
    if (ns > 0) { struct timespec t = {ns / 1000000000L, ns % 1000000000L}; nanosleep(&t, 0); }
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int r = real(fd); slow(); return r;
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd); slow(); return r;
}
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Counts:
    """Conflicts merged, retries and fsyncs of the measured process (counted, not changed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.merges = self.retries = self.fsyncs = 0

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def count_fsyncs(self) -> None:
        import importlib

        fs_module = importlib.import_module("ZODB.FileStorage.FileStorage")  # the module, not the class

        real_os, real_zodb = os.fsync, fs_module.fsync

        def os_fsync(fd: int) -> None:
            self.add("fsyncs")
            real_os(fd)

        def zodb_fsync(fd: int) -> None:
            self.add("fsyncs")
            real_zodb(fd)

        os.fsync = os_fsync  # durable_heap's group commit looks it up at each call
        fs_module.fsync = zodb_fsync  # ZODB's FileStorage bound it at import


def _durable_heap(path: str, n: int, counts: _Counts, spread: int) -> tuple[Any, Any]:
    import durable_heap as dh
    from durable_heap import _containers

    with dh.open(path) as heap, heap.transaction() as state:
        state.d = dict.fromkeys(range(n), 0)
    heap = dh.open(path)
    real_merge = _containers._EntryBucket._p_resolveConflict

    def merge(self: Any, *args: Any) -> Any:
        counts.add("merges")
        return real_merge(self, *args)

    _containers._EntryBucket._p_resolveConflict = merge

    def change(t: int) -> None:
        k = t * spread
        for attempt in heap.attempts(1000):
            if attempt.number > 1:
                counts.add("retries")
            with attempt as state:
                state.d[k] += 1

    return change, heap.close


def _raw_zodb(path: str, n: int, nthreads: int, counts: _Counts, group: bool) -> tuple[Any, Any]:
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    from benchmarks.items import Item

    if group:
        from durable_heap._filestorage import FileStorage as Ours

        db = ZODB.DB(Ours(path), cache_size=50_000, pool_size=nthreads + 1)
    else:
        db = ZODB.DB(FileStorage(path), cache_size=50_000, pool_size=nthreads + 1)
    with db.transaction() as conn:
        tree = conn.root()["d"] = OOBTree()
        for i in range(n):
            tree[i] = Item(0)
    local = threading.local()

    def change(t: int) -> None:
        if not hasattr(local, "conn"):
            local.tm = transaction.TransactionManager()
            local.conn = db.open(transaction_manager=local.tm)
        for n, attempt in enumerate(local.tm.attempts(1000)):
            if n:
                counts.add("retries")
            with attempt:
                local.conn.root()["d"][t].value += 1

    return change, db.close


def _sqlite(path: str, n: int) -> tuple[Any, Any]:
    import sqlite3

    def connect() -> sqlite3.Connection:
        c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        return c

    c = connect()
    c.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER)")
    c.execute("BEGIN")
    c.executemany("INSERT INTO kv VALUES (?, 0)", ((i,) for i in range(n)))
    c.execute("COMMIT")
    c.close()
    local = threading.local()
    opened: list[sqlite3.Connection] = []

    def change(t: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = connect()
            opened.append(local.conn)
        local.conn.execute("UPDATE kv SET v = v + 1 WHERE k = ?", (t,))

    def close() -> None:
        for conn in opened:
            conn.close()

    return change, close


def one(system: str, nthreads: int, folder: str, seconds: float, entries: int = N) -> dict[str, Any]:
    """Measure one system at `nthreads` threads in this process; return the figures."""
    counts = _Counts()
    counts.count_fsyncs()
    path = os.path.join(folder, "store")
    if system.startswith("durable_heap"):
        spread = min(1000, entries // max(nthreads, 1)) if system.endswith("spread") else 1
        change, close = _durable_heap(path, entries, counts, spread)
    elif system in ("raw_zodb", "raw_zodb_gc"):
        change, close = _raw_zodb(path, entries, nthreads, counts, system == "raw_zodb_gc")
    else:
        change, close = _sqlite(path, entries)
    done = [0] * nthreads
    start, stop = threading.Barrier(nthreads + 1), threading.Event()

    def work(t: int) -> None:
        for _ in range(5):  # warm: connection, cache, upper tree levels
            change(t)
        start.wait()
        while not stop.is_set():
            change(t)
            done[t] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    start.wait()
    base = (counts.merges, counts.retries, counts.fsyncs)
    cpu0, t0 = _cpu(), time.perf_counter()
    time.sleep(seconds)
    stop.set()
    total = sum(done)  # read before the threads finish their last commit
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    merges, retries, fsyncs = (c - b for c, b in zip((counts.merges, counts.retries, counts.fsyncs),
                                                      base, strict=True))
    for th in threads:
        th.join()
    close()
    return {
        "commits_per_s": total / wall,
        "cpu_ms_per_commit": cpu / total * 1e3 if total else None,
        "merges_per_commit": merges / total if total else None,
        "retries_per_commit": retries / total if total else None,
        "fsyncs_per_commit": fsyncs / total if total else None,
    }


def _shim(folder: str) -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = os.path.join(folder, "slowsync.c"), os.path.join(folder, "slowsync.so")
    Path(src).write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, src, "-ldl"], check=True)
    return lib


def _measure(system: str, nthreads: int, seconds: float, delay_ms: float, shim: str | None,
             baseline: str | None, where: str | None, entries: int) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("DURABLE_HEAP_STORAGE", None)
    code_root = baseline if system == "durable_heap_baseline" and baseline else str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join([code_root, str(ROOT)])  # durable_heap from code_root
    if delay_ms:
        assert shim is not None
        env["LD_PRELOAD"] = shim
        env["DH_BENCH_FSYNC_US"] = str(int(delay_ms * 1000))
    with tempfile.TemporaryDirectory(prefix="dh-threads-", dir=where) as d:
                # Run as a script (not -m): the working folder is then not first on the path,
        # and durable_heap comes from code_root.
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--one", system, str(nthreads), d,
             str(seconds), str(entries)],
            env=env, cwd=d, capture_output=True, text=True, check=True,
        ).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--delays", default="0,2", help="simulated extra fsync time in ms (0: this disk)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--systems", default="durable_heap,durable_heap_spread,raw_zodb,raw_zodb_gc,sqlite")
    p.add_argument("--baseline", help="a checkout of today's durable_heap to run as durable_heap_baseline")
    p.add_argument("--dir", help="where the stores go (default: the temporary folder); /dev/shm, "
                   "a RAM disk whose fsync costs nothing, with --delays 2 is a disk whose fsync "
                   "takes exactly 2 ms")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 threads, 0.3 s, one round")
    p.add_argument("--entries", type=int, default=N, help="entries in the store (default 10,000)")
    p.add_argument("--one", nargs=5, metavar=("SYSTEM", "THREADS", "DIR", "SECONDS", "ENTRIES"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        system, nthreads, folder, seconds, entries = a.one
        print(json.dumps(one(system, int(nthreads), folder, float(seconds), int(entries))))
        return 0
    if a.quick:
        a.threads, a.rounds, a.seconds, a.systems = "2", 1, 0.3, "durable_heap,raw_zodb,sqlite"
        a.entries = 2000
    systems = a.systems.split(",") + (["durable_heap_baseline"] if a.baseline else [])
    threads = [int(x) for x in a.threads.split(",")]
    delays = [float(x) for x in a.delays.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="dh-shim-") as shim_dir:
        shim = _shim(shim_dir) if any(delays) else None
        if any(delays) and shim is None:
            print("no C compiler: the slow-disk rows are skipped", file=sys.stderr)
            delays = [d for d in delays if not d]
        for r in range(a.rounds):
            for delay in delays:
                for n in threads:
                    order = systems if r % 2 == 0 else systems[::-1]  # alternate who goes first
                    for s in order:
                        res = _measure(s, n, a.seconds, delay, shim, a.baseline, a.dir, a.entries)
                        results.setdefault(f"{delay}|{n}|{s}", []).append(res)
                        print(f"round {r + 1} fsync+{delay:g}ms {n} threads {s}: "
                              f"{res['commits_per_s']:.0f}/s", file=sys.stderr, flush=True)
    table = _table(results, systems, threads, delays)
    if a.json != "-":
        print(table)
    if a.json:
        data = {"runs": results, "table": table}
        if a.json == "-":
            print(json.dumps(data))
        else:
            Path(a.json).write_text(json.dumps(data, indent=1))
    return 0


def _median(runs: list[dict[str, Any]], name: str) -> float | None:
    xs = [r[name] for r in runs if r[name] is not None]
    return statistics.median(xs) if xs else None


def _table(results: dict[str, list[dict[str, Any]]], systems: list[str], threads: list[int],
           delays: list[float]) -> str:
    lines = ["| disk | threads | system | commits/s | x raw ZODB | CPU ms/commit | merges/commit "
             "| retries/commit | fsyncs/commit |", "|---|---|---|---|---|---|---|---|---|"]
    for delay in delays:
        for n in threads:
            raw_runs = results.get(f"{delay}|{n}|raw_zodb")
            raw = _median(raw_runs, "commits_per_s") if raw_runs else None
            for s in systems:
                runs = results[f"{delay}|{n}|{s}"]
                cps = _median(runs, "commits_per_s") or 0.0
                cells = [_median(runs, k) for k in ("cpu_ms_per_commit", "merges_per_commit",
                                                    "retries_per_commit", "fsyncs_per_commit")]
                ratio = f"{cps / raw:.2f}x" if raw else "-"
                disk = "this disk" if not delay else f"fsync +{delay:g} ms"
                lines.append(f"| {disk} | {n} | {s} | {cps:,.0f} | {ratio} | "
                             + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
