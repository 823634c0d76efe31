"""What following a writer costs a read-only FileStorage heap.

    python -m benchmarks.follow              5 x 20,000 transactions per side (about 10 s)
    python -m benchmarks.follow --quick      5 x 2,000 (a second or two)
    python -m benchmarks.follow --json

Side by side, in one process, on one heap file:

* an idle read-only transaction (begin, read one name, abort) on ZODB's own
  read-only FileStorage, which never sees later commits, and on durable_heap's
  `FollowingFileStorage`, whose ``sync()`` at each transaction start stats the
  file (the cost of following when nothing changed);
* the first transaction after a writer (in this process, through its own
  read-write FileStorage) committed `batch` one-entry transactions: the catch-up
  reads only those, so its cost is per new transaction, not per heap size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any


def _per_txn(db: Any, n: int) -> float:
    """Microseconds per idle read-only transaction on `db` (one run of `n`)."""
    import transaction

    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(transaction_manager=tm)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            tm.begin()
            conn.root()["n"]
            tm.abort()
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        conn.close()


def measure(n: int, batch: int, entries: int, folder: str) -> dict[str, Any]:
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    from durable_heap._follow import FollowingFileStorage
    from durable_heap._storage import quiet_benign_logs

    quiet_benign_logs()  # the read-only opens beside a running writer find its creation-time index
    path = os.path.join(folder, "heap.fs")
    writer = ZODB.DB(FileStorage(path))
    wtm = transaction.TransactionManager(explicit=True)
    wconn = writer.open(transaction_manager=wtm)
    wtm.begin()
    root = wconn.root()
    root["n"] = 0
    root["d"] = OOBTree({f"k{i}": i for i in range(entries)})
    wtm.commit()

    plain = ZODB.DB(FileStorage(path, read_only=True))
    following = ZODB.DB(FollowingFileStorage(path))
    results: dict[str, Any] = {"transactions": n, "batch": batch, "entries": entries}
    runs: dict[str, list[float]] = {"plain": [], "following": []}
    for _ in range(5):  # interleaved, best of each: the machine's noise hits both alike
        runs["plain"].append(_per_txn(plain, n))
        runs["following"].append(_per_txn(following, n))
    results["plain_read_only_us"] = min(runs["plain"])
    results["following_idle_us"] = min(runs["following"])
    results["idle_ratio"] = results["following_idle_us"] / results["plain_read_only_us"]

    rtm = transaction.TransactionManager(explicit=True)
    rconn = following.open(transaction_manager=rtm)
    times = []
    for round_ in range(7):
        for i in range(batch):
            wtm.begin()
            wconn.root()["n"] += 1
            wconn.root()["d"][f"k{(round_ * batch + i) % entries}"] = -i
            wtm.commit()
        t0 = time.perf_counter()
        rtm.begin()
        seen = rconn.root()["n"]
        rtm.abort()
        times.append(time.perf_counter() - t0)
        assert seen == (round_ + 1) * batch, (seen, round_)
    results["catch_up_us"] = statistics.median(times) * 1e6
    results["catch_up_per_commit_us"] = results["catch_up_us"] / batch
    rconn.close()
    for db in (following, plain):
        db.close()
    wconn.close()
    writer.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.follow", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 transactions per measure")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    n = 2_000 if args.quick else 20_000
    with tempfile.TemporaryDirectory() as folder:
        r = measure(n, batch=100, entries=10_000, folder=folder)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print("| read-only FileStorage | idle transaction | first transaction after 100 commits |")
    print("|---|---|---|")
    print(f"| ZODB's (never catches up) | {r['plain_read_only_us']:.1f} us | (stale) |")
    print(f"| durable_heap's (follows) | {r['following_idle_us']:.1f} us | "
          f"{r['catch_up_us']:.0f} us ({r['catch_up_per_commit_us']:.1f} us per commit) |")
    print(f"\nidle ratio following / ZODB's: {r['idle_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
