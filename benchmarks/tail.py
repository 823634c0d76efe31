"""The one-entry commit and its tail: durable_heap and raw ZODB interleaved in one process.

    python -m benchmarks.tail [--sizes 100000,1000000] [--commits 1000] [--cache full|default]

Both stores are built once per size (in a temporary folder), then opened in the same
process, and their commits alternate one by one: a machine that slows down (other
processes on a shared machine) slows both alike, so the ratios hold where absolute
times drift. Each system changes one random entry to a new value per commit (a
durable commit: fsync). Per commit it records the wall time, this thread's CPU time,
the records loaded and whether Python's cyclic GC ran; over the run, the bytes the
storage grew by per commit.

``--cache full`` (the default) first loads every record of both stores, with caches
big enough to keep them: the steady state of a long-running process, where a commit
loads nothing (raw ZODB "with a full cache", issue 18). ``--cache default`` opens both
with their default caches and no preloading: cold entries, as the ``commit`` workload
of ``python -m benchmarks`` measures them.

Targets (issue 18, part 3): median wall at most 1.2x raw ZODB, p90 at most 1.3x, and
durable_heap's mean CPU per commit at most 1.3x its median. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

from benchmarks.systems import DurableHeapDict, RawZODB


class _Full:
    """Open a system with a cache that holds every record, and load them all."""

    @staticmethod
    def raw(path: str, n: int) -> RawZODB:
        import transaction
        import ZODB
        import ZODB.FileStorage

        s = RawZODB()
        s.db = ZODB.DB(ZODB.FileStorage.FileStorage(path), cache_size=2 * n + 10_000)
        s.tm = transaction.TransactionManager()
        s.conn = s.db.open(transaction_manager=s.tm)
        s.tree = s.conn.root()["d"]
        _load_tree(s.tree)
        for item in s.tree.values():
            item._p_activate()
        s.tm.abort()
        return s

    @staticmethod
    def dh(path: str, n: int) -> DurableHeapDict:
        import durable_heap as dh

        s = DurableHeapDict()
        s.heap = dh.open(path, cache_size=max(50_000, n // 5))
        with s.heap.transaction() as state:
            _load_tree(state.d._entries)  # (items() would ghost the buckets it loaded)
            _load_tree(state.d._index)
        return s


def _load_tree(tree: Any) -> None:
    """Load every node of a BTree, inner nodes and buckets (iteration skips inner nodes)."""
    state = type(tree).__getstate__(tree)
    if not state or len(state) == 1:
        return
    for child in state[0][::2]:
        child._p_activate()
        if type(child) is type(tree):
            _load_tree(child)


def _open(name: str, path: str, n: int, full: bool) -> Any:
    if full:
        return _Full.raw(path, n) if name == "raw_zodb" else _Full.dh(path, n)
    s = RawZODB() if name == "raw_zodb" else DurableHeapDict()
    s.open(path)
    return s


def _conn(s: Any) -> Any:
    return s.heap.connection if hasattr(s, "heap") else s.conn


def measure(n: int, commits: int, full: bool, folder: str) -> dict[str, dict[str, Any]]:
    names = ("durable_heap", "raw_zodb")
    paths = {name: os.path.join(folder, name) for name in names}
    for name in names:
        if not os.path.exists(paths[name]):
            (DurableHeapDict() if name == "durable_heap" else RawZODB()).build(paths[name], n)
    systems = {name: _open(name, paths[name], n, full) for name in names}
    rnd = random.Random(n)
    ran_gc: list[int] = []
    gc.callbacks.append(lambda phase, info: ran_gc.append(info["generation"]) if phase == "start" else None)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "loads": [], "gc": []} for name in names
    }
    try:
        for s in systems.values():  # warm-up: the upper levels of the trees
            for _ in range(5):
                s.change(rnd.randrange(n), rnd.randrange(10**9))
            _conn(s).getTransferCounts(True)
        sizes = {name: _conn(s).db().storage.getSize() for name, s in systems.items()}
        for _ in range(commits):
            i = rnd.randrange(n)
            for name in names if rnd.random() < 0.5 else names[::-1]:  # either may go first
                s, rec = systems[name], samples[name]
                before = len(ran_gc)
                t0, c0 = time.perf_counter(), time.thread_time()
                s.change(i, rnd.randrange(10**9))
                rec["wall"].append((time.perf_counter() - t0) * 1e3)
                rec["cpu"].append((time.thread_time() - c0) * 1e3)
                rec["loads"].append(_conn(s).getTransferCounts(True)[0])
                rec["gc"].append(len(ran_gc) - before)
        for name, s in systems.items():
            samples[name]["bytes"] = [(_conn(s).db().storage.getSize() - sizes[name]) / commits]
    finally:
        gc.callbacks.pop()
        for s in systems.values():
            s.close()
    return {name: summary(rec) for name, rec in samples.items()}


def summary(rec: dict[str, list[float]]) -> dict[str, Any]:
    wall, cpu = sorted(rec["wall"]), sorted(rec["cpu"])
    p90 = int(len(wall) * 0.9)
    with_gc = [c for c, g in zip(rec["cpu"], rec["gc"], strict=True) if g]
    return {
        "median_ms": statistics.median(wall), "p90_ms": wall[p90], "mean_ms": statistics.mean(wall),
        "cpu_median_ms": statistics.median(cpu), "cpu_p90_ms": cpu[p90], "cpu_mean_ms": statistics.mean(cpu),
        "loads": statistics.mean(rec["loads"]), "gc_share": len(with_gc) / len(cpu),
        "cpu_with_gc_ms": statistics.mean(with_gc) if with_gc else 0.0,
        "bytes": rec["bytes"][0] if rec.get("bytes") else 0.0,
    }


def report(results: dict[int, dict[str, dict[str, Any]]], full: bool) -> list[str]:
    cache = "full caches (every record loaded first)" if full else "default caches, cold entries"
    lines = [
        f"### One-entry commit, durable_heap and raw ZODB interleaved in one process ({cache})", "",
        "| size | system | median ms | p90 ms | CPU median / mean ms | loads per commit "
        "| commits with a GC | bytes per commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for n, r in results.items():
        for name, x in r.items():
            lines.append(
                f"| {n:,} | {name} | {x['median_ms']:.3f} | {x['p90_ms']:.3f} | "
                f"{x['cpu_median_ms']:.3f} / {x['cpu_mean_ms']:.3f} | {x['loads']:.2f} | "
                f"{x['gc_share']:.0%} | {x['bytes']:,.0f} |"
            )
        dh, raw = r["durable_heap"], r["raw_zodb"]
        med, p90 = dh["median_ms"] / raw["median_ms"], dh["p90_ms"] / raw["p90_ms"]
        tail = dh["cpu_mean_ms"] / dh["cpu_median_ms"]
        cpu = dh["cpu_median_ms"] / raw["cpu_median_ms"]

        def mark(ok: bool) -> str:
            return "met" if ok else "NOT met"

        targets += [
            f"- {mark(med <= 1.2)}: at {n:,}, median wall {med:.2f}x raw ZODB (target <= 1.2x; "
            f"median CPU {cpu:.2f}x)",
            f"- {mark(p90 <= 1.3)}: at {n:,}, p90 wall {p90:.2f}x raw ZODB (target <= 1.3x)",
            f"- {mark(tail <= 1.3)}: at {n:,}, durable_heap's mean CPU {tail:.2f}x its median "
            "(target <= 1.3x; "
            f"raw ZODB {raw['cpu_mean_ms'] / raw['cpu_median_ms']:.2f}x)",
        ]
    return [*lines, "", *targets, ""]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tail", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--commits", type=int, default=1000)
    p.add_argument("--cache", choices=("full", "default"), default="full")
    p.add_argument("--keep", metavar="FOLDER", help="build the stores here and keep them (reused if there)")
    args = p.parse_args()
    results = {}
    for n in (int(s.replace("_", "")) for s in args.sizes.split(",")):
        folder = os.path.join(args.keep, str(n)) if args.keep else tempfile.mkdtemp(prefix="bench-tail-")
        os.makedirs(folder, exist_ok=True)
        try:
            results[n] = measure(n, args.commits, args.cache == "full", folder)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(report(results, args.cache == "full")))


if __name__ == "__main__":
    main()
