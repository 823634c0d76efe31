"""Why a commit over ZEO costs what it does: records loaded and server messages per commit.

    python -m benchmarks.zeo_loads [--size 100000] [--warm 5] [--commits 200] [--systems A,B]

For durable_heap's Dict and raw ZEO (the systems of the `zeo_commit` workload), each
over its own ``durable-heap zeo`` server on 127.0.0.1: builds the store, makes
``--warm`` one-entry commits to random entries, then ``--commits`` more, and prints per
commit the milliseconds (and the client's CPU time), the records loaded (each a round
trip when not cached) and the calls and messages the client sent the server. A large ``--warm`` (4000) shows a
warm client; the default, the benchmark's cold one.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import tempfile
import time
from typing import Any

from benchmarks.__main__ import start_zeo
from benchmarks.systems import SYSTEMS


def measure(name: str, size: int, warm: int, commits: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="zeo-loads-")
    path = os.path.join(folder, "store")
    os.environ.pop("BENCH_ZEO", None)
    SYSTEMS[name]().build(path, size)  # on the file, before the server starts
    proc, address = start_zeo(folder)
    os.environ["BENCH_ZEO"] = address
    try:
        system: Any = SYSTEMS[name]()
        system.open(path)
        rnd = random.Random(1)
        for _ in range(warm):
            system.change(rnd.randrange(size), rnd.randrange(10**9))
        conn = system.heap.connection if hasattr(system, "heap") else system.conn
        client = conn.db().storage  # ZEO's ClientStorage
        sent: collections.Counter[str] = collections.Counter()
        call, send = client._call, client._async

        def counted_call(method: str, *args: Any, **kw: Any) -> Any:
            sent[f"{method} (round trip)"] += 1
            return call(method, *args, **kw)

        def counted_send(method: str, *args: Any, **kw: Any) -> Any:
            sent[method] += 1
            return send(method, *args, **kw)

        client._call, client._async = counted_call, counted_send
        loads = 0
        conn.getTransferCounts(True)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(commits):
            system.change(rnd.randrange(size), rnd.randrange(10**9))
            conn = system.heap.connection if hasattr(system, "heap") else system.conn
            loads += conn.getTransferCounts(True)[0]
        ms = (time.perf_counter() - t0) / commits * 1000
        cpu = (time.process_time() - c0) / commits * 1000
        per_commit = {k: v / commits for k, v in sorted(sent.items())}
        return {"ms": ms, "cpu_ms": cpu, "loads": loads / commits, "sent": per_commit}
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zeo_loads", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--warm", type=int, default=5, help="commits before counting (4000: a warm client)")
    p.add_argument("--commits", type=int, default=200)
    p.add_argument("--systems", default="durable_heap_zeo,raw_zodb_zeo",
                   help="comma-separated, of durable_heap_zeo, durable_heap_zeo_nosync (server_sync=0), "
                        "raw_zodb_zeo, raw_zodb_zeo_sync (server_sync=True, explicit begin)")
    args = p.parse_args()
    for name in args.systems.split(","):
        r = measure(name, args.size, args.warm, args.commits)
        sent = ", ".join(f"{k} {v:g}" for k, v in r["sent"].items())
        print(f"{SYSTEMS[name].name}: {r['ms']:.2f} ms/commit ({r['cpu_ms']:.2f} ms of it on the client's "
              f"CPU), {r['loads']:.2f} loads/commit; sent: {sent}")


if __name__ == "__main__":
    main()
