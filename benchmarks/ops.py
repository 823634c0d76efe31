"""What `durable-heap verify`, `backup`, `export` and `import` cost, beside a baseline each.

    python -m benchmarks.ops              a 100,000-entry heap, 3 rounds (a few minutes)
    python -m benchmarks.ops --quick      10,000 entries, 2 rounds
    python -m benchmarks.ops --only exchange   export and import only (or: --only verify)
    python -m benchmarks.ops --json

Each command runs as a new process (as from cron), the systems alternating round by
round on one heap file:

* ``durable-heap verify``: every current record read from the root, checksums checked,
  every reference resolved, and every older revision's checksum (the file's history);
* ZODB's ``fsrefs`` (``python -m ZODB.scripts.fsrefs``): every current record's
  references resolved, no checksums, no history;
* ``durable-heap backup`` (a full one, into a fresh folder, then verified) beside
  ``repozo -B -F`` alone, which it runs;
* ``durable-heap export`` of the 100,000 entries (``--path state.users``) beside a
  process that builds the same data as builtins and ``json.dump``s it (the cost of
  writing JSON alone), with the bytes of each file;
* ``durable-heap import`` of that file into a fresh heap (``--path state.users --replace``:
  staged in batches, then put in place) beside a process that reads it with ``json.load``
  and writes each entry as a row of SQLite (``INSERT`` of key and JSON text, one
  transaction, WAL, synchronous=FULL),
  with the size of the heap file and of the database.

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


_DUMP = """
import json, sys
n = int(sys.argv[1])
data = {f"user{i}": {"n": i, "tags": ["a", "b"]} for i in range(n)}
with open(sys.argv[2], "w") as f:
    json.dump(data, f)
"""

_SQLITE = """
import json, sqlite3, sys
with open(sys.argv[1]) as f:
    data = json.load(f)
db = sqlite3.connect(sys.argv[2])
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE users (key TEXT PRIMARY KEY, value TEXT)")
with db:
    db.executemany("INSERT INTO users VALUES (?, ?)", ((k, json.dumps(v)) for k, v in data.items()))
db.close()
"""


def _timed_rss(args: list[str]) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak resident memory in MB) of one child process (``os.wait4``'s
    rusage): on a loaded machine the CPU time is the steadier figure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,  # noqa: S603
                            stderr=subprocess.DEVNULL, env=_env())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args)
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e3


def measure_exchange(entries: int, rounds: int, folder: str) -> dict[str, Any]:
    """``export`` and ``import`` of `entries` entries beside json.dump and sqlite3."""
    path = os.path.join(folder, "heap.fs")
    program = os.path.join(folder, "app.py")
    with open(program, "w") as f:
        f.write("from durable_heap import state\n")
    if not os.path.exists(path):
        _make_heap(path, entries)
    exported = os.path.join(folder, "users.json")
    plain = os.path.join(folder, "plain.json")
    times: dict[str, list[float]] = {"export": [], "json_dump": [], "import": [], "sqlite": []}
    rss: dict[str, float] = {}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    sizes: dict[str, int] = {}
    for r in range(rounds):
        pair = [("export", ["-m", "durable_heap", "export", program, "--path", "state.users", "--storage",
                            path, "-o", exported]),
                ("json_dump", ["-c", _DUMP, str(entries), plain])]
        for name, args in pair if r % 2 == 0 else pair[::-1]:
            t, c, mb = _timed_rss(args)
            times[name].append(t)
            cpu[name].append(c)
            rss[name] = max(rss.get(name, 0.0), mb)
        fresh, db = os.path.join(folder, f"fresh{r}.fs"), os.path.join(folder, f"sqlite{r}.db")
        pair = [("import", ["-m", "durable_heap", "import", program, exported, "--path", "state.users",
                            "--replace", "--storage", fresh]),
                ("sqlite", ["-c", _SQLITE, exported, db])]
        for name, args in pair if r % 2 == 0 else pair[::-1]:
            t, c, mb = _timed_rss(args)
            times[name].append(t)
            cpu[name].append(c)
            rss[name] = max(rss.get(name, 0.0), mb)
        sizes = {"export_json": os.path.getsize(exported), "json_dump": os.path.getsize(plain),
                 "imported_heap": os.path.getsize(fresh),
                 "sqlite_db": sum(os.path.getsize(n) for n in (db, db + "-wal") if os.path.exists(n))}
        for name in (fresh, fresh + ".index", fresh + ".lock", fresh + ".tmp", db, db + "-wal", db + "-shm"):
            if os.path.exists(name):
                os.remove(name)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "entries": entries,
        "rounds": rounds,
        "seconds": med,
        "cpu_seconds": med_cpu,
        "export_over_json_dump_cpu": med_cpu["export"] / med_cpu["json_dump"],
        "import_over_sqlite_cpu": med_cpu["import"] / med_cpu["sqlite"],
        "bytes": sizes,
        "peak_rss_mb": rss,
        "export_over_json_dump": med["export"] / med["json_dump"],
        "import_over_sqlite": med["import"] / med["sqlite"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 entries, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--only", choices=["verify", "exchange"], help="measure only these")
    parser.add_argument("--entries", type=int, help="entries in the heap (default 100,000; quick 10,000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 2)")
    args = parser.parse_args(argv)
    entries, rounds = (10_000, 2) if args.quick else (100_000, 3)
    entries, rounds = args.entries or entries, args.rounds or rounds
    folder = tempfile.mkdtemp(prefix="durable-heap-ops-bench-")
    result: dict[str, Any] = {}
    try:
        if args.only != "exchange":
            result.update(measure(entries, rounds, folder))
        if args.only != "verify":
            result["exchange"] = measure_exchange(entries, rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "seconds" in result:
        s = result["seconds"]
        print(f"{entries:,} entries, a {result['file_bytes'] / 1e6:.1f} MB file, medians of {rounds} rounds:")
        print(f"  durable-heap verify  {s['verify']:7.2f} s   ZODB fsrefs  {s['fsrefs']:7.2f} s   "
              f"ratio {result['verify_over_fsrefs']:.2f}")
        print(f"  durable-heap backup  {s['backup']:7.2f} s   repozo -B -F {s['repozo']:7.2f} s   "
              f"ratio {result['backup_over_repozo']:.2f}")
    if "exchange" in result:
        x = result["exchange"]
        s, b = x["seconds"], x["bytes"]
        print(f"export and import of {entries:,} entries, medians of {rounds} rounds (whole processes):")
        print(f"  durable-heap export  {s['export']:7.2f} s {b['export_json'] / 1e6:6.1f} MB   json.dump "
              f"{s['json_dump']:7.2f} s {b['json_dump'] / 1e6:6.1f} MB   "
              f"ratio {x['export_over_json_dump']:.2f}")
        print(f"  durable-heap import  {s['import']:7.2f} s {b['imported_heap'] / 1e6:6.1f} MB   sqlite3   "
              f"{s['sqlite']:7.2f} s {b['sqlite_db'] / 1e6:6.1f} MB   ratio {x['import_over_sqlite']:.2f}")
        c = x["cpu_seconds"]
        print(f"  CPU seconds: export {c['export']:.2f} / json.dump {c['json_dump']:.2f} = "
              f"{x['export_over_json_dump_cpu']:.2f}; import {c['import']:.2f} / sqlite3 {c['sqlite']:.2f} = "
              f"{x['import_over_sqlite_cpu']:.2f}")
        m = x["peak_rss_mb"]
        print(f"  peak memory (MB): export {m['export']:.0f}, json.dump {m['json_dump']:.0f}, "
              f"import {m['import']:.0f}, sqlite3 {m['sqlite']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
