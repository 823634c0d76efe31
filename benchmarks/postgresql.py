"""postgresql:// beside ZEO and FileStorage: one-entry commits, and several clients at once.

    python -m benchmarks.postgresql [--sizes 10000,100000] [--commits 200] [--rounds 3]
    python -m benchmarks.postgresql --clients 1,2,4 [--seconds 5]

Systems, each over a store of SIZE integer entries (a durable_heap Dict, or a raw
ZODB OOBTree under the root) in its own fresh store:

* ``dh_pg`` / ``raw_pg``: RelStorage on a throwaway PostgreSQL cluster
  (`durable_heap.testing.PostgresCluster`, fsync on, history-preserving);
  ``dh_pg_free``: history-free; ``raw_pg_rpc4``: PostgreSQL's default
  ``random_page_cost = 4`` instead of the 1.1 the others use;
* ``dh_zeo`` / ``raw_zeo``: a ``durable-heap zeo`` server on 127.0.0.1;
* ``dh_file`` / ``raw_file``: FileStorage.

Rounds alternate the systems (a loaded machine shifts them alike); each figure
is the median over rounds of the median one-entry commit in ms, with its ratio to
``raw_pg``. ``--clients`` runs N processes committing random entries of one
durable_heap Dict for ``--seconds`` and prints the aggregate commits per second,
PostgreSQL beside ZEO. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["dh_pg", "raw_pg", "dh_pg_free", "raw_pg_rpc4", "dh_zeo", "raw_zeo", "dh_file", "raw_file"]


#: One-entry commits made before the timed ones (caches filled, the new tables analysed).
WARM = 20


def _commit_times(kind: str, target: str, size: int, commits: int) -> list[float]:
    """Build the store at `target`, then time `commits` one-entry commits (ms) after `WARM`."""
    import transaction
    from BTrees.OOBTree import OOBTree

    import durable_heap as dh

    rnd = random.Random(1)
    times: list[float] = []
    if kind == "dh":
        with dh.open(target) as heap:
            with heap.transaction() as state:
                state.data = {i: i for i in range(size)}

            @heap.action
            def change(k: int, v: int) -> None:
                heap.state.data[k] = v

            for n in range(WARM + commits):
                k = rnd.randrange(size)
                t = time.perf_counter()
                change(k, rnd.randrange(10**9))
                if n >= WARM:
                    times.append((time.perf_counter() - t) * 1000)
        return times
    import ZODB

    from durable_heap._storage import open_storage
    from durable_heap._targets import parse_target

    db = ZODB.DB(open_storage(parse_target(target)), cache_size=50_000)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        root = conn.root()
        tree = root["data"] = OOBTree()
        for i in range(size):
            tree[i] = i
        tm.commit()
        for n in range(WARM + commits):
            k = rnd.randrange(size)
            t = time.perf_counter()
            tree[k] = rnd.randrange(10**9)
            tm.commit()
            if n >= WARM:
                times.append((time.perf_counter() - t) * 1000)
        conn.close()
    finally:
        db.close()
    return times


class _Places:
    """Fresh stores for each system: databases in two clusters, a ZEO server, files."""

    def __init__(self) -> None:
        from durable_heap.testing import PostgresCluster, ZeoServer

        durable = {"fsync": "on", "full_page_writes": "on"}
        self.pg = PostgresCluster({**durable, "random_page_cost": "1.1"}).start()
        self.pg4 = PostgresCluster({**durable, "random_page_cost": "4"}).start()
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.zeo_servers: list[Any] = []
        self.n = 0
        self._zeo_class = ZeoServer

    def target(self, system: str) -> str:
        self.n += 1
        name = f"b{self.n}"
        if system in ("dh_pg", "raw_pg"):
            return self.pg.create_database(name)
        if system == "dh_pg_free":
            return self.pg.create_database(name, keep_history="0")
        if system == "raw_pg_rpc4":
            return self.pg4.create_database(name)
        if system in ("dh_zeo", "raw_zeo"):
            server = self._zeo_class(self.folder / name / "app.fs")
            self.zeo_servers.append(server)
            return str(server.start())
        return str(self.folder / f"{name}.fs")

    def close(self) -> None:
        for server in self.zeo_servers:
            server.close()
        self.pg.close()
        self.pg4.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def commits(sizes: list[int], n: int, rounds: int, systems: list[str]) -> dict[str, Any]:
    places = _Places()
    results: dict[str, dict[str, list[float]]] = {str(s): {k: [] for k in systems} for s in sizes}
    try:
        for size in sizes:
            for r in range(rounds):
                order = systems if r % 2 == 0 else list(reversed(systems))
                for system in order:
                    kind = "dh" if system.startswith("dh") else "raw"
                    times = _commit_times(kind, places.target(system), size, n)
                    results[str(size)][system].append(statistics.median(times))
    finally:
        places.close()
    table = {}
    for size, by_system in results.items():
        base = statistics.median(by_system["raw_pg"]) if by_system.get("raw_pg") else None
        table[size] = {
            k: {"median_ms": round(statistics.median(v), 3),
                "ratio_to_raw_pg": round(statistics.median(v) / base, 2) if base else None}
            for k, v in by_system.items() if v
        }
    return table


_CLIENT = """
import random, sys, time
import durable_heap as dh
url, seconds, wid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
heap = dh.open(url, attempts=1000)
@heap.action
def change(k, v):
    heap.state.data[k] = v
rnd = random.Random(wid)
size = len(heap.state.data)
print("ready", flush=True)
sys.stdin.readline()
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    change(rnd.randrange(size), rnd.randrange(10**9))
    n += 1
print(n, flush=True)
heap.close()
"""


def clients(counts: list[int], seconds: float, size: int) -> dict[str, Any]:
    import durable_heap as dh
    from durable_heap.testing import subprocess_env

    places = _Places()
    out: dict[str, Any] = {}
    try:
        for system in ("dh_pg", "dh_zeo"):
            for count in counts:
                url = places.target(system)
                with dh.open(url) as heap, heap.transaction() as state:
                    state.data = {i: i for i in range(size)}
                procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, url, str(seconds), str(w)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          env=subprocess_env(), cwd=ROOT) for w in range(count)]
                for p in procs:
                    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
                for p in procs:
                    assert p.stdin is not None
                    p.stdin.write("go\n")
                    p.stdin.flush()
                total = sum(int(p.communicate(timeout=seconds + 120)[0].strip()) for p in procs)
                out.setdefault(system, {})[str(count)] = round(total / seconds, 1)
    finally:
        places.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000")
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--clients", default="", help="e.g. 1,2,4: the multi-client workload instead")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.clients:
        counts = [int(c) for c in args.clients.split(",")]
        result = clients(counts, args.seconds, int(args.sizes.split(",")[0]))
    else:
        result = commits([int(s) for s in args.sizes.split(",")], args.commits, args.rounds,
                         args.systems.split(","))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
