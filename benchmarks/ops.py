"""What `durable-heap verify` and `backup` cost, beside ZODB's own tools on the same file.

    python -m benchmarks.ops              a 100,000-entry heap, 3 rounds (a minute or two)
    python -m benchmarks.ops --quick      10,000 entries, 2 rounds
    python -m benchmarks.ops --json

Each command runs as a new process (as from cron), the systems alternating round by
round on one heap file:

* ``durable-heap verify``: every current record read from the root, checksums checked,
  every reference resolved, and every older revision's checksum (the file's history);
* ZODB's ``fsrefs`` (``python -m ZODB.scripts.fsrefs``): every current record's
  references resolved, no checksums, no history;
* ``durable-heap backup`` (a full one, into a fresh folder, then verified) beside
  ``repozo -B -F`` alone, which it runs.

Medians in seconds, and each ratio to ZODB's tool. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DURABLE_HEAP_STORAGE", None)
    return env


def _timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=_env())  # noqa: S603
    return time.perf_counter() - t0


def _make_heap(path: str, entries: int) -> None:
    import durable_heap as dh

    with dh.open(path) as heap:
        done = 0
        while done < entries:
            with heap.transaction() as state:
                users = state.setdefault("users", {})
                for i in range(done, min(done + 10_000, entries)):
                    users[f"user{i}"] = {"n": i, "tags": ["a", "b"]}
            done += 10_000


def measure(entries: int, rounds: int, folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "heap.fs")
    program = os.path.join(folder, "app.py")
    with open(program, "w") as f:
        f.write("from durable_heap import state\n")
    _make_heap(path, entries)
    times: dict[str, list[float]] = {"verify": [], "fsrefs": [], "backup": [], "repozo": []}
    for r in range(rounds):
        runs = [
            ("verify", ["-m", "durable_heap", "verify", program, "--storage", path]),
            ("fsrefs", ["-m", "ZODB.scripts.fsrefs", path]),
        ]
        for name, args in runs if r % 2 == 0 else runs[::-1]:
            times[name].append(_timed(args))
        for name in (("backup", "repozo") if r % 2 == 0 else ("repozo", "backup")):
            dest = os.path.join(folder, f"bk-{name}-{r}")
            os.mkdir(dest)
            if name == "backup":
                times[name].append(_timed(["-m", "durable_heap", "backup", program, dest, "--storage", path]))
            else:
                times[name].append(_timed(["-m", "ZODB.scripts.repozo", "-B", "-F", "-r", dest, "-f", path]))
            shutil.rmtree(dest)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "entries": entries,
        "file_bytes": os.path.getsize(path),
        "rounds": rounds,
        "seconds": med,
        "verify_over_fsrefs": med["verify"] / med["fsrefs"],
        "backup_over_repozo": med["backup"] / med["repozo"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 entries, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    entries, rounds = (10_000, 2) if args.quick else (100_000, 3)
    folder = tempfile.mkdtemp(prefix="durable-heap-ops-bench-")
    try:
        result = measure(entries, rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["seconds"]
    print(f"{entries:,} entries, a {result['file_bytes'] / 1e6:.1f} MB file, medians of {rounds} rounds:")
    print(f"  durable-heap verify  {s['verify']:7.2f} s   ZODB fsrefs  {s['fsrefs']:7.2f} s   "
          f"ratio {result['verify_over_fsrefs']:.2f}")
    print(f"  durable-heap backup  {s['backup']:7.2f} s   repozo -B -F {s['repozo']:7.2f} s   "
          f"ratio {result['backup_over_repozo']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
