"""Deploy cost against the size of the state: a deploy must not scan the heap.

    python -m benchmarks.deploy                 10k and 1M entries (about 30 s)
    python -m benchmarks.deploy --quick         1k and 10k entries (a few seconds)
    python -m benchmarks.deploy --sizes 10000,100000 --json

For each size, one process builds a heap whose state holds a `Dict` of that many
entries (a tenth of them instances of the program's class), then deploys new
versions of the program (each differs by one line, so each is recorded) and
times ``heap.deploy`` (compile, drop cached objects, run the top level and
``migrate``, check the class registry, record the version, commit). The same
is timed for a version whose ``migrate`` changes one entry. Results are medians
of `reps` deploys, with the ratio of the largest size to the smallest.
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

PROGRAM = textwrap.dedent("""
    from durable_heap import Object, state

    class User(Object):
        def __init__(self, name):
            self.name = name

    state.setdefault("users", {})

    def fill(n):
        batch = {}
        for i in range(n):
            batch[f"u{i}"] = User(f"u{i}") if i % 10 == 0 else i
        state.users.update(batch)
        return len(state.users)

    def migrate(state, previous):
        if MIGRATE:
            state.users["u1"] = previous.number
""")


def one(size: int, reps: int, folder: str) -> dict[str, Any]:
    """Measure in this process (spawned once per size by `main`)."""
    import durable_heap as dh

    app = os.path.join(folder, "app.py")
    with open(app, "w") as f:
        f.write(PROGRAM + "MIGRATE = False\n")
    heap = dh.open(os.path.join(folder, "heap.fs"))
    prog = heap.load(app)
    prog.call("fill", size)
    results: dict[str, Any] = {"size": size}
    for label, migrate in (("deploy", False), ("deploy_migrate", True)):
        times = []
        for i in range(reps + 2):
            with open(app, "w") as f:
                f.write(PROGRAM + f"MIGRATE = {migrate}\n# {label} {i}\n")
            t0 = time.perf_counter()
            heap.deploy(app)
            times.append(time.perf_counter() - t0)
        results[f"{label}_ms"] = statistics.median(times[2:]) * 1e3
    results["versions"] = len(heap.versions(app))
    heap.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1k and 10k entries, few repetitions")
    p.add_argument("--sizes", help="comma-separated entry counts")
    p.add_argument("--reps", type=int, help="deploys timed per size")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure in this process
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 20)
    if args.one is not None:
        print(json.dumps(one(args.one, reps, args.dir)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [1_000, 10_000] if args.quick else [10_000, 1_000_000])
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.deploy", "--one", str(size), "--dir", folder,
                 "--reps", str(reps)],
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(out.stdout))
    first, last = rows[0], rows[-1]
    ratios = {k: last[k] / first[k] for k in ("deploy_ms", "deploy_migrate_ms")}
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios}, indent=2))
        return 0
    print("| entries in state | deploy (median) | deploy with a migrate that changes one entry |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['deploy_ms']:.2f} ms | {r['deploy_migrate_ms']:.2f} ms |")
    print(f"\nratio {last['size']:,} / {first['size']:,}: deploy {ratios['deploy_ms']:.2f}x, "
          f"with migrate {ratios['deploy_migrate_ms']:.2f}x (target: at most 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
