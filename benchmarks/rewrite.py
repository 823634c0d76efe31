"""`heap.rewrite_classes` (``durable-heap rewrite-classes``) against doing it by hand in raw ZODB.

    python -m benchmarks.rewrite                 10k and 100k renamed objects (about a minute)
    python -m benchmarks.rewrite --quick         2k objects
    python -m benchmarks.rewrite --sizes 10000 --json

For each size, one process per system builds a FileStorage heap whose state holds
a `Dict` of that many objects of a class, renamed by the next version, and then
writes every record that names the old class again:

* ``durable_heap``: deploy the renamed class with ``__durable_renames__``, then
  ``heap.rewrite_classes`` (scan every current record's opcodes, write the
  matching ones again in batches of 1000: the objects and the buckets and
  containers that refer to them);
* ``raw_zodb``: the same data as a ``PersistentMapping`` of ``Persistent``
  objects in plain ZODB, the class renamed through a ``classFactory``, and a
  hand-written loop that loads every object and marks it changed, 1000 per
  commit (it does not find the referring records: the least work there is).

Figures are the median of `reps` runs of the rewrite alone (wall clock, and the
process's CPU time, steadier on a loaded machine), and the ratios durable_heap /
raw_zodb. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

OLD = textwrap.dedent("""
    from durable_heap import Object, state

    class User(Object):
        def __init__(self, name):
            self.name = name

    state.setdefault("users", {})

    def fill(n):
        state.users.update({f"u{i}": User(f"u{i}") for i in range(n)})
        return len(state.users)
""")
NEW = ('__durable_renames__ = {"app.User": "app.Member"}\n'
       + OLD.replace("class User", "class Member").replace("User(f", "Member(f"))


def _durable_heap(size: int, folder: str) -> tuple[float, float]:
    import durable_heap as dh

    app = os.path.join(folder, "app.py")
    with open(app, "w") as f:
        f.write(OLD)
    with dh.open(os.path.join(folder, "heap.fs")) as heap:
        heap.load(app).call("fill", size)
        with open(app, "w") as f:
            f.write(NEW)
        heap.deploy(app)
        t0, c0 = time.perf_counter(), time.process_time()
        report = heap.rewrite_classes(app)
        took = time.perf_counter() - t0, time.process_time() - c0
        assert report.records >= size, report
    return took


class User:  # raw ZODB's classes, made Persistent below (importable by path for pickles)
    pass


def _raw_zodb(size: int, folder: str) -> tuple[float, float]:
    import persistent
    import transaction
    import ZODB
    import ZODB.broken
    from persistent.mapping import PersistentMapping
    from ZODB.FileStorage import FileStorage

    global User

    class Old(persistent.Persistent):
        def __init__(self, name: str) -> None:
            self.name = name

    class New(persistent.Persistent):
        pass

    Old.__module__ = New.__module__ = __name__
    Old.__qualname__ = Old.__name__ = "User"
    New.__qualname__ = New.__name__ = "Member"
    User = Old  # type: ignore[misc]
    globals()["Member"] = New
    path = os.path.join(folder, "raw.fs")
    db = ZODB.DB(FileStorage(path))
    with db.transaction() as conn:
        users = conn.root()["users"] = PersistentMapping()
        for i in range(size):
            users[f"u{i}"] = Old(f"u{i}")
    db.close()

    def renamed(conn: Any, module: str, name: str) -> Any:
        if (module, name) == (__name__, "User"):
            return New
        return ZODB.broken.find_global(module, name)

    db = ZODB.DB(FileStorage(path))
    db.classFactory = renamed
    t0, c0 = time.perf_counter(), time.process_time()
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    for n, obj in enumerate(conn.root()["users"].values(), 1):
        obj._p_activate()
        obj._p_changed = True
        if n % 1000 == 0:
            tm.commit()
            tm.begin()
    tm.commit()
    took = time.perf_counter() - t0, time.process_time() - c0
    conn.close()
    db.close()
    return took


SYSTEMS = {"durable_heap": _durable_heap, "raw_zodb": _raw_zodb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rewrite", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2k objects, 2 runs")
    p.add_argument("--sizes", help="comma-separated object counts")
    p.add_argument("--reps", type=int, help="runs per size and system (median)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--one", nargs=2, metavar=("SYSTEM", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(SYSTEMS[args.one[0]](int(args.one[1]), folder)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [2_000] if args.quick else [10_000, 100_000])
    reps = args.reps or (2 if args.quick else 3)
    rows = []
    for size in sizes:
        times: dict[str, list[float]] = {name: [] for name in SYSTEMS}
        cpu: dict[str, list[float]] = {name: [] for name in SYSTEMS}
        for _ in range(reps):  # alternate the systems, round by round (a loaded machine drifts)
            for name in SYSTEMS:
                out = subprocess.run([sys.executable, "-m", "benchmarks.rewrite", "--one", name, str(size)],
                                     capture_output=True, text=True, check=True)
                wall, used = json.loads(out.stdout)
                times[name].append(wall)
                cpu[name].append(used)
        row: dict[str, Any] = {"size": size}
        for name in SYSTEMS:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_cpu_s"] = statistics.median(cpu[name])
        row["ratio"] = row["durable_heap_s"] / row["raw_zodb_s"]
        row["cpu_ratio"] = row["durable_heap_cpu_s"] / row["raw_zodb_cpu_s"]
        rows.append(row)
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print("| objects renamed | durable_heap rewrite_classes | raw ZODB by hand | ratio | CPU ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['durable_heap_s']:.2f} s ({r['durable_heap_cpu_s']:.2f} s CPU) "
              f"| {r['raw_zodb_s']:.2f} s ({r['raw_zodb_cpu_s']:.2f} s CPU) | {r['ratio']:.2f}x "
              f"| {r['cpu_ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
