"""What the allowlist costs a load: records loaded cold, with the check and without it.

    python -m benchmarks.allow [--records 10000] [--reps 7] [--json]

Builds a heap of ``--records`` `Object` records (a class of this module, so it loads
through the class registry, each holding an int, a str, a datetime and a Decimal) in
one List, then, in one process and alternating, ghosts every record and loads them
all again: through the heap as it is, and with its allowlist check switched off and
ZODB's own connection class (what loading cost before the allowlist), and with raw
ZODB's own class lookup
on the same file. Prints the median CPU milliseconds of each, their ratios, the class
lookups per record, and what a known name costs on the class factory's fast path
(one set lookup) and through a full `Allowlist.check` call, in nanoseconds. Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import os
import statistics
import tempfile
import time
from typing import Any

import ZODB
import ZODB.Connection
import ZODB.FileStorage

import durable_heap as dh


class Item(dh.Object):
    """One record: its class is named in its header, a datetime and a Decimal in its state."""

    def __init__(self, i: int) -> None:
        self.n = i
        self.name = f"item{i}"
        self.when = datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=i)
        self.price = decimal.Decimal(i) / 100


class _Everything(set):  # type: ignore[type-arg]
    """An ``allowed`` set that holds everything: the heap without its check."""

    def __contains__(self, item: object) -> bool:
        return True


class _Counting(set):  # type: ignore[type-arg]
    """An ``allowed`` set that counts the class factory's lookups."""

    lookups = 0

    def __contains__(self, item: object) -> bool:
        self.lookups += 1
        return super().__contains__(item)


def build(path: str, records: int) -> None:
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.items = []
        for start in range(0, records, 5000):
            with heap.transaction() as state:
                state.items.extend(Item(i) for i in range(start, min(records, start + 5000)))


def _load_all(conn: Any, items: Any) -> float:
    """Ghost every record of `conn`, then read one attribute of each item: CPU seconds
    (this process's, so that other processes on the machine disturb it less)."""
    conn.cacheMinimize()
    t0 = time.process_time()
    total = 0
    for item in items:
        total += item.n
    return time.process_time() - t0


def measure(records: int, reps: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="allow-bench-")
    path = os.path.join(folder, "heap.fs")
    build(path, records)
    times: dict[str, list[float]] = {"checked": [], "unchecked": [], "raw_zodb": []}
    with dh.open(path, read_only=True) as heap:
        tm = heap.transaction_manager
        tm.begin()
        conn = heap.connection
        items = list(heap.state.items)  # the List's own records stay loaded: items are ghosts
        allowlist = heap.allowlist
        _load_all(conn, items)  # the file in the OS cache, the allowlist's cache warm
        known = allowlist.allowed
        counting = _Counting(known)
        allowlist.allowed = counting
        _load_all(conn, items)
        lookups = counting.lookups
        everything = _Everything()
        ours = type(conn)
        for _ in range(reps):
            allowlist.allowed, conn.__class__ = known, ours
            times["checked"].append(_load_all(conn, items))
            # As before the allowlist: the class factory's check never taken, and ZODB's
            # own connection class (ours only adds the oid to a refusal).
            allowlist.allowed, conn.__class__ = everything, ZODB.Connection.Connection
            times["unchecked"].append(_load_all(conn, items))
        allowlist.allowed, conn.__class__ = known, ours
        n = 1_000_000
        key = (Item.__module__, "Item")
        t0 = time.process_time()
        for _ in range(n):
            if key not in known:  # the class factory's fast path, as `Heap._find_class` has it
                raise AssertionError
        fast_ns = (time.process_time() - t0) / n * 1e9
        t0 = time.process_time()
        for _ in range(n):
            allowlist.check(conn, "datetime", "datetime")
        check_ns = (time.process_time() - t0) / n * 1e9
        tm.abort()
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    try:
        conn = db.open()
        items = list(conn.root()["durable_heap.state"].items)
        _load_all(conn, items)
        for _ in range(reps):
            times["raw_zodb"].append(_load_all(conn, items))
        conn.close()
    finally:
        db.close()
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {
        "records": records,
        "median_ms": medians,
        "checked_over_unchecked": medians["checked"] / medians["unchecked"],
        "checked_over_raw_zodb": medians["checked"] / medians["raw_zodb"],
        "lookups_per_record": lookups / records,
        "check_ns": {"fast_path": fast_ns, "check_call": check_ns},
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.allow", description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    r = measure(args.records, args.reps)
    if args.json:
        print(json.dumps(r))
        return
    m = r["median_ms"]
    print(f"{r['records']:,} records loaded cold (median CPU of {args.reps}): checked "
          f"{m['checked']:.1f} ms, unchecked {m['unchecked']:.1f} ms, raw ZODB {m['raw_zodb']:.1f} ms")
    print(f"checked / unchecked = {r['checked_over_unchecked']:.3f}; "
          f"checked / raw ZODB = {r['checked_over_raw_zodb']:.3f}")
    print(f"{r['lookups_per_record']:.1f} class lookups per record; each pays the fast path, "
          f"{r['check_ns']['fast_path']:.0f} ns (a known name: `(module, name) in allowed`); "
          f"a full Allowlist.check call: {r['check_ns']['check_call']:.0f} ns")


if __name__ == "__main__":  # run as benchmarks.allow, so that Item is benchmarks.allow.Item
    from benchmarks.allow import main as _main

    _main()
