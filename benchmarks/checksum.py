"""What damage detection costs: checksummed records and the checked open, side by side.

    python -m benchmarks.checksum               100k objects; open at 1M objects (a few minutes)
    python -m benchmarks.checksum --quick       10k objects (seconds)
    python -m benchmarks.checksum --objects 100000 --open-objects 1000000 --json

Two stores with the same objects (an OOBTree of small PersistentMappings, the
shape of a durable_heap Dict of dicts): ZODB's own stack (``ZODB.DB`` over a
``FileStorage``) and durable_heap's (`CheckedDB` over `ChecksumStorage` over
`CheckedFileStorage`, records sealed with a CRC-32 over oid and data). Rounds
alternate between the two, and figures are medians of the rounds:

* hot load: unghost objects whose records are in the OS cache but not in ZODB's
  (one storage read, the checksum, the unpickling): microseconds per object;
* one-entry commit: change one value and commit (includes the fsync);
* open: open the store with its ``.index`` and without it (a full scan).

The overhead is (durable_heap / ZODB - 1); the target is under 3% for a hot
load and a commit. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from durable_heap._integrity import CheckedDB, CheckedFileStorage, ChecksumStorage

BATCH = 10_000


def _value(i: int) -> PersistentMapping:
    return PersistentMapping({"n": i, "name": f"user{i}", "tags": ["a", "b"], "score": -i / 3})


def _open(path: str, checked: bool) -> Any:
    if checked:
        return CheckedDB(ChecksumStorage(CheckedFileStorage(path)), cache_size=1_000_000)
    return ZODB.DB(FileStorage(path), cache_size=1_000_000)


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
    """Microseconds per object unghosted from a warm OS cache (tree nodes already loaded)."""
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    tree = conn.root()["tree"]
    objs = [tree[k] for k in keys]  # loads the buckets; the values stay ghosts
    for o in objs:
        o._p_activate()  # once: the OS has the pages
    for o in objs:
        o._p_deactivate()
    t0 = time.perf_counter()
    for o in objs:
        o._p_activate()
    dt = time.perf_counter() - t0
    tm.abort()
    conn.close()
    return dt / len(objs) * 1e6


def _commits(db: Any, keys: list[str], count: int) -> float:
    """Median milliseconds of a one-entry commit."""
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tree = conn.root()["tree"]
    times = []
    for i in range(count):
        k = keys[i % len(keys)]
        tm.begin()
        tree[k]["n"] = i
        t0 = time.perf_counter()
        tm.commit()
        times.append(time.perf_counter() - t0)
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
    """Alternate the two stacks round by round; medians and the overhead."""
    got: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for checked in ((False, True) if r % 2 == 0 else (True, False)):
            got[checked].append(measure(checked))
    zodb, ours = statistics.median(got[False]), statistics.median(got[True])
    return {"zodb": zodb, "durable_heap": ours, "overhead_pct": (ours / zodb - 1) * 100}


def run(objects: int, open_objects: int, rounds: int, commits: int, folder: str) -> dict[str, Any]:
    paths = {c: os.path.join(folder, f"{'ours' if c else 'zodb'}.fs") for c in (False, True)}
    for checked, path in paths.items():
        build(path, objects, checked)
    rnd = random.Random(7)
    keys = [f"k{rnd.randrange(objects):08d}" for _ in range(min(objects, 20_000))]
    dbs = {c: _open(p, c) for c, p in paths.items()}
    try:
        results = {
            "objects": objects,
            "hot_load_us": _side_by_side(rounds, lambda c: _hot_loads(dbs[c], keys)),
            "commit_ms": _side_by_side(rounds, lambda c: _commits(dbs[c], keys, commits)),
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
        ("hot load (per object)", "hot_load_us", "us", results["objects"]),
        ("one-entry commit", "commit_ms", "ms", results["objects"]),
        ("open with .index", "open_index_ms", "ms", results["open_objects"]),
        ("open without .index (scan)", "open_scan_ms", "ms", results["open_objects"]),
    ]
    print("| | objects | ZODB | durable_heap | overhead |")
    print("|---|---|---|---|---|")
    for label, key, unit, n in rows:
        r = results[key]
        print(f"| {label} | {n:,} | {r['zodb']:.3f} {unit} | {r['durable_heap']:.3f} {unit} | "
              f"{r['overhead_pct']:+.1f}% |")
    print("\ntarget: under 3% for a hot load and a one-entry commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
