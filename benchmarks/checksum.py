"""What damage detection costs: checksummed records and the checked open, side by side.

    python -m benchmarks.checksum               100k objects; open at 1M objects (a few minutes)
    python -m benchmarks.checksum --quick       10k objects (seconds)
    python -m benchmarks.checksum --objects 100000 --open-objects 1000000 --json

Each row measures the same work with and without the checks, in alternating
rounds; figures are medians of the rounds.

* Through durable_heap's API, two heaps with the same `Dict` of small dicts: one
  opened as durable_heap opens a heap (`CheckedDB` over `ChecksumStorage` over
  `CheckedFileStorage`, records sealed with a CRC-32 over oid and data), one
  with ZODB's own ``DB`` and ``FileStorage`` put back (`_unchecked`). A read of
  an entry after ZODB's cache was emptied (the records are in the OS cache: the
  loads, checks and unpickling of the entry's bucket and dict), and a
  transaction that changes one entry (with its fsync).
* The same at ZODB's level, on an OOBTree of small PersistentMappings: unghost
  one object (a hot load: one storage read, the check, the unpickling), and a
  one-entry commit (wall time with its fsync, and this process's CPU time).
* Open the store with its ``.index`` and without it (a full scan): ZODB's
  FileStorage against `CheckedFileStorage` with the seal wrapper.

The overhead is the median over rounds of (durable_heap / ZODB - 1); the target
is under 3% for a hot load and a commit. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from durable_heap._integrity import CheckedDB, CheckedFileStorage, ChecksumStorage

BATCH = 10_000


def _value(i: int) -> PersistentMapping:
    return PersistentMapping({"n": i, "name": f"user{i}", "tags": ["a", "b"], "score": -i / 3})


def _open(path: str, checked: bool) -> Any:
    """durable_heap's stack with the checks, or the one it has without them (the
    allowlist's DB and the FileStorage that recovers from failed writes)."""
    from durable_heap._allow import DB
    from durable_heap._filestorage import FileStorage as RecoveringFileStorage

    if checked:
        return CheckedDB(ChecksumStorage(CheckedFileStorage(path)), cache_size=1_000_000)
    return DB(RecoveringFileStorage(path), cache_size=1_000_000)


def build(path: str, n: int, checked: bool) -> None:
    """`n` small objects in an OOBTree, committed in batches."""
    db = _open(path, checked)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    with tm:
        conn.root()["tree"] = OOBTree()
    tree = conn.root()["tree"]
    for start in range(0, n, BATCH):
        with tm:
            for i in range(start, min(n, start + BATCH)):
                tree[f"k{i:08d}"] = _value(i)
        conn.cacheMinimize()
    conn.close()
    db.close()


def _hot_loads(db: Any, keys: list[str]) -> float:
    """CPU microseconds per object unghosted from a warm OS cache (tree nodes already loaded)."""
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    tree = conn.root()["tree"]
    objs = [tree[k] for k in keys]  # loads the buckets; the values stay ghosts
    for o in objs:
        o._p_activate()  # once: the OS has the pages
    for o in objs:
        o._p_deactivate()
    # CPU time of this thread: a load from the OS cache is pure CPU, and other
    # processes that take the CPU meanwhile do not count; no garbage collection
    # (as timeit): a collection of all the loaded objects would land in one round.
    gc.collect()
    gc.disable()
    try:
        t0 = time.thread_time()
        for o in objs:
            o._p_activate()
        dt = time.thread_time() - t0
    finally:
        gc.enable()
    tm.abort()
    conn.close()
    return dt / len(objs) * 1e6


def _commits(db: Any, keys: list[str], count: int, clock: Any = time.perf_counter) -> float:
    """Median milliseconds of a one-entry commit (`clock`: wall time, fsync included)."""
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tree = conn.root()["tree"]
    times = []
    for i in range(count):
        k = keys[i % len(keys)]
        tm.begin()
        tree[k]["n"] = i
        t0 = clock()
        tm.commit()
        times.append(clock() - t0)
    conn.close()
    return statistics.median(times) * 1e3


def _open_ms(path: str, checked: bool, index: bool) -> float:
    if not index and os.path.exists(path + ".index"):
        os.unlink(path + ".index")
    t0 = time.perf_counter()
    storage = ChecksumStorage(CheckedFileStorage(path)) if checked else FileStorage(path)
    dt = time.perf_counter() - t0
    storage.close()  # writes the index again
    return dt * 1e3


def _side_by_side(rounds: int, measure: Any) -> dict[str, Any]:
    """Both stacks in each round, in alternating order: medians, and the median of the
    rounds' ratios (a machine that slows down between rounds shifts both alike)."""
    got: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for checked in ((False, True) if r % 2 == 0 else (True, False)):
            got[checked].append(measure(checked))
    ratio = statistics.median(o / z for o, z in zip(got[True], got[False], strict=True))
    return {
        "zodb": statistics.median(got[False]),
        "durable_heap": statistics.median(got[True]),
        "overhead_pct": (ratio - 1) * 100,
    }


# --- the same through durable_heap's API, with and without the checks ------------------------


@contextlib.contextmanager
def _unchecked() -> Iterator[None]:
    """Heaps opened meanwhile use the FileStorage, DB and Connection they had before the
    checks: durable_heap's FileStorage (which recovers from failed writes) and the
    allowlist's DB, without the checked open, the seals and the read errors' translation."""
    import durable_heap._allow as allow
    import durable_heap._filestorage as filestorage
    import durable_heap._heap as heap_module
    import durable_heap._integrity as integrity

    saved = integrity.CheckedFileStorage, integrity.ChecksumStorage, heap_module.CheckedDB
    integrity.CheckedFileStorage, heap_module.CheckedDB = filestorage.FileStorage, allow.DB
    integrity.ChecksumStorage = lambda storage: storage  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        integrity.CheckedFileStorage, integrity.ChecksumStorage, heap_module.CheckedDB = saved


def _open_heap(path: str, checked: bool) -> Any:
    import durable_heap as dh

    if checked:
        return dh.open(path)
    with _unchecked():
        return dh.open(path)


def build_heap(path: str, n: int, checked: bool) -> None:
    """`n` entries, each a small dict, in a durable_heap Dict (``state.users``)."""
    heap = _open_heap(path, checked)
    with heap.transaction() as s:
        s.users = {}
    for start in range(0, n, BATCH):
        with heap.transaction() as s:
            s.users.update({f"k{i:08d}": {"n": i, "name": f"user{i}", "tags": ["a", "b"]}
                            for i in range(start, min(n, start + BATCH))})
        heap.connection.cacheMinimize()
    heap.close()


def _heap_reads(heap: Any, keys: list[str]) -> float:
    """CPU microseconds per ``state.users[k]["n"]`` with ZODB's cache emptied (warm OS cache)."""
    heap.state  # noqa: B018 - this thread's connection, caught up
    heap.connection.cacheMinimize()
    gc.collect()
    gc.disable()
    try:
        with heap.transaction() as s:
            users = s.users
            t0 = time.thread_time()
            for k in keys:
                users[k]["n"]
            dt = time.thread_time() - t0
    finally:
        gc.enable()
    return dt / len(keys) * 1e6


def _heap_commits(heap: Any, keys: list[str], count: int) -> float:
    """Median milliseconds of a transaction that changes one entry."""
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        with heap.transaction() as s:
            s.users[keys[i % len(keys)]]["n"] = i
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(objects: int, open_objects: int, rounds: int, commits: int, folder: str) -> dict[str, Any]:
    heaps = {c: os.path.join(folder, f"heap-{'ours' if c else 'zodb'}.fs") for c in (False, True)}
    for checked, path in heaps.items():
        build_heap(path, objects, checked)
    rnd = random.Random(7)
    keys = [f"k{rnd.randrange(objects):08d}" for _ in range(min(objects, 5_000))]
    opened = {c: _open_heap(p, c) for c, p in heaps.items()}
    try:
        results: dict[str, Any] = {
            "objects": objects,
            "heap_read_us": _side_by_side(rounds, lambda c: _heap_reads(opened[c], keys)),
            "heap_commit_ms": _side_by_side(rounds, lambda c: _heap_commits(opened[c], keys, commits)),
        }
    finally:
        for h in opened.values():
            h.close()
    results.update(run_zodb(objects, open_objects, rounds, commits, folder))
    return results


def run_zodb(objects: int, open_objects: int, rounds: int, commits: int, folder: str) -> dict[str, Any]:
    paths = {c: os.path.join(folder, f"{'ours' if c else 'zodb'}.fs") for c in (False, True)}
    for checked, path in paths.items():
        build(path, objects, checked)
    rnd = random.Random(7)
    keys = [f"k{rnd.randrange(objects):08d}" for _ in range(min(objects, 20_000))]
    dbs = {c: _open(p, c) for c, p in paths.items()}
    try:
        results = {
            "hot_load_us": _side_by_side(rounds, lambda c: _hot_loads(dbs[c], keys)),
            "commit_ms": _side_by_side(rounds, lambda c: _commits(dbs[c], keys, commits)),
            # The CPU a commit costs this process (the fsync's wait left out): what the
            # seals add, without the disk's noise.
            "commit_cpu_ms": _side_by_side(
                rounds, lambda c: _commits(dbs[c], keys, commits, time.process_time)),
        }
    finally:
        for db in dbs.values():
            db.close()
    if open_objects != objects:
        for checked, path in paths.items():
            for suffix in ("", ".index", ".lock", ".tmp"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            build(path, open_objects, checked)
    results["open_objects"] = open_objects
    open_rounds = max(3, rounds // 2)
    results["open_index_ms"] = _side_by_side(open_rounds, lambda c: _open_ms(paths[c], c, True))
    results["open_scan_ms"] = _side_by_side(open_rounds, lambda c: _open_ms(paths[c], c, False))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checksum", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10k objects, few rounds")
    p.add_argument("--objects", type=int, help="objects for the load and commit rows")
    p.add_argument("--open-objects", type=int, help="objects for the open rows")
    p.add_argument("--rounds", type=int, help="alternating rounds per row")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    objects = args.objects or (10_000 if args.quick else 100_000)
    open_objects = args.open_objects or (objects if args.quick else 1_000_000)
    rounds = args.rounds or (4 if args.quick else 20)
    commits = 20 if args.quick else 100
    with tempfile.TemporaryDirectory() as folder:
        results = run(objects, open_objects, rounds, commits, folder)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [
        ("durable_heap: read an entry, ZODB cache empty", "heap_read_us", "us", results["objects"]),
        ("durable_heap: a transaction changing one entry", "heap_commit_ms", "ms", results["objects"]),
        ("ZODB: hot load (unghost one object)", "hot_load_us", "us", results["objects"]),
        ("ZODB: one-entry commit", "commit_ms", "ms", results["objects"]),
        ("ZODB: one-entry commit, CPU time", "commit_cpu_ms", "ms", results["objects"]),
        ("open with .index", "open_index_ms", "ms", results["open_objects"]),
        ("open without .index (scan)", "open_scan_ms", "ms", results["open_objects"]),
    ]
    print("| | objects | without checks | with checks | overhead |")
    print("|---|---|---|---|---|")
    for label, key, unit, n in rows:
        r = results[key]
        print(f"| {label} | {n:,} | {r['zodb']:.3f} {unit} | {r['durable_heap']:.3f} {unit} | "
              f"{r['overhead_pct']:+.1f}% |")
    print("\ntarget: under 3% for a hot load and a one-entry commit (CPU time for loads and reads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
