"""Small values stored inline (`durable_heap._inline`), side by side.

    python -m benchmarks.inline                  the full run (100k entries, 3 rounds)
    python -m benchmarks.inline --quick          a smoke run (small sizes, one round)
    python -m benchmarks.inline --size N --rounds R --commits C [--json]

Systems, each in its own process, rounds alternating between them:

- ``flat``: entries whose values are ints (``users[k] = i``): the baseline of the targets;
- ``nested``: values shaped like ``{"i": i, "tags": ["a", "b"]}``, stored inline;
- ``records``: the same nested values with inline storage switched off
  (``_inline.INLINE_ITEMS = -1``): each inner dict and list its own record, as before;
- ``sqlite``: sqlite3 (WAL, synchronous=FULL), one table, the nested value as a JSON
  text column (the issue's reference).

Workloads:

- ``bulk``: the N entries into an empty ``state.users`` in one transaction
  (``Dict.update``): CPU seconds of the process, wall seconds, bytes of the file
  afterwards, the process's peak RSS;
- ``commit``: one-entry commits (``users[k]["i"] = v`` for the nested systems,
  ``users[k] = v`` for flat; sqlite: an UPDATE of the JSON text), random entries:
  median wall ms, median and mean CPU ms, bytes written per commit.

Figures of a loaded machine: compare the ratios within one run. Nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("flat", "nested", "records", "sqlite")


def _value(system: str, i: int) -> Any:
    return i if system == "flat" else {"i": i, "tags": ["a", "b"]}


def _file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def _heap(system: str, path: str) -> Any:
    import durable_heap as dh

    if system == "records":
        from durable_heap import _inline

        _inline.INLINE_ITEMS = -1  # nothing fits: every inner dict and list is a record
    return dh.open(path)


def _sqlite(path: str) -> Any:
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS users (k TEXT PRIMARY KEY, v TEXT)")
    return db


def bulk(system: str, n: int, path: str) -> dict[str, Any]:
    """The n entries in one transaction."""
    data = {f"k{i:08d}": _value(system, i) for i in range(n)}
    if system == "sqlite":
        db = _sqlite(path)
        t0, c0 = time.perf_counter(), time.process_time()
        db.execute("BEGIN")
        db.executemany("INSERT INTO users VALUES (?, ?)", ((k, json.dumps(v)) for k, v in data.items()))
        db.execute("COMMIT")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        db.close()
    else:
        heap = _heap(system, path)
        with heap.transaction() as s:
            s.users = {}
        t0, c0 = time.perf_counter(), time.process_time()
        with heap.transaction() as s:
            s.users.update(data)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        heap.close()
    return {"cpu_s": cpu, "wall_s": wall, "file_mb": _file_bytes(path) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def commit(system: str, n: int, path: str, count: int) -> dict[str, Any]:
    """`count` one-entry commits on the store `bulk` built, random entries."""
    rnd = random.Random(7)
    keys = [f"k{rnd.randrange(n):08d}" for _ in range(count + 5)]
    walls, cpus = [], []
    if system == "sqlite":
        db = _sqlite(path)

        def change(k: str, v: int) -> None:
            db.execute("BEGIN")
            (text,) = db.execute("SELECT v FROM users WHERE k = ?", (k,)).fetchone()
            value = json.loads(text)
            value["i"] = v
            db.execute("UPDATE users SET v = ? WHERE k = ?", (json.dumps(value), k))
            db.execute("COMMIT")
    else:
        heap = _heap(system, path)

        def change(k: str, v: int) -> None:
            with heap.transaction() as s:
                if system == "flat":
                    s.users[k] = v
                else:
                    s.users[k]["i"] = v
    for k in keys[:5]:  # warm-up: the upper levels of the trees load
        change(k, 1)
    before = _file_bytes(path)
    for j, k in enumerate(keys[5:]):
        t0, c0 = time.perf_counter(), time.process_time()
        change(k, 10**6 + j)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    written = (_file_bytes(path) - before) / count
    if system == "sqlite":
        db.close()
    else:
        heap.close()
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3,
            "cpu_mean_ms": statistics.mean(cpus) * 1e3, "bytes_per_commit": written}


def _one(system: str, n: int, count: int) -> dict[str, Any]:
    """Both workloads of one system in a fresh process (its own peak RSS)."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.inline", "--one", system, "--size", str(n),
             "--commits", str(count), "--folder", folder],
            capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(n: int, rounds: int, count: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for r in range(rounds):
        order = SYSTEMS if r % 2 == 0 else tuple(reversed(SYSTEMS))
        for system in order:
            samples[system].append(_one(system, n, count))
    result: dict[str, Any] = {}
    for system, runs in samples.items():
        result[system] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    flat, nested, records = result["flat"], result["nested"], result["records"]
    result["ratios"] = {
        "bulk cpu nested/flat (target <= 2)": nested["cpu_s"] / flat["cpu_s"],
        "bulk bytes nested/flat (target <= 2)": nested["file_mb"] / flat["file_mb"],
        "bulk cpu records/nested": records["cpu_s"] / nested["cpu_s"],
        "bulk bytes records/nested": records["file_mb"] / nested["file_mb"],
        "bulk peak rss nested/records": nested["peak_rss_mb"] / records["peak_rss_mb"],
        "bulk cpu nested/sqlite": nested["cpu_s"] / result["sqlite"]["cpu_s"],
        "commit bytes nested (target <= 2048)": nested["bytes_per_commit"],
        "commit cpu nested/records": nested["cpu_ms"] / records["cpu_ms"],
        "commit cpu nested/flat": nested["cpu_ms"] / flat["cpu_ms"],
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inline")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", choices=SYSTEMS)
    parser.add_argument("--folder")
    args = parser.parse_args(argv)
    if args.one:
        path = os.path.join(args.folder, "store")
        result = bulk(args.one, args.size, path)
        result.update(commit(args.one, args.size, path, args.commits))
        print(json.dumps(result))
        return
    if args.quick:
        args.size, args.rounds, args.commits = 2_000, 1, 20
    result = run(args.size, args.rounds, args.commits)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.size:,} entries, {args.rounds} rounds alternating, {args.commits} commits each")
    print(f"{'system':<9} {'bulk cpu s':>10} {'wall s':>8} {'file MB':>8} {'rss MB':>7} "
          f"{'commit ms':>9} {'cpu ms':>7} {'mean':>6} {'B/commit':>9}")
    for system in SYSTEMS:
        r = result[system]
        print(f"{system:<9} {r['cpu_s']:>10.2f} {r['wall_s']:>8.2f} {r['file_mb']:>8.1f} "
              f"{r['peak_rss_mb']:>7.0f} {r['wall_ms']:>9.2f} {r['cpu_ms']:>7.2f} "
              f"{r['cpu_mean_ms']:>6.2f} {r['bytes_per_commit']:>9.0f}")
    for name, value in result["ratios"].items():
        print(f"  {name}: {value:.2f}")


if __name__ == "__main__":
    main()
