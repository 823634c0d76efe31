"""One-entry updates over HTTP: `durable-heap serve` against FastAPI + sqlite3, under the same uvicorn.

    python -m benchmarks.serve                  1 and 4 workers, 3 rounds of 1500 requests per system
    python -m benchmarks.serve --quick          1 worker, 1 round of 150 requests (seconds)
    python -m benchmarks.serve --workers 1,2,4 --rounds 5 --requests 3000 --concurrency 32 --json

Each request increments one of 1000 entries, chosen at random: ``POST /bump``
with ``["k123"]``. durable_heap serves a program whose ``bump(key)`` does
``state.items[key] += 1`` (with ``--workers N``: a ZEO server and N uvicorn
workers); the other system is `benchmarks.serve_sqlite_app`, FastAPI with
sqlite3 in WAL mode and ``synchronous=FULL``, on the same uvicorn started the
same way (the same listening socket; N worker processes sharing it).
Both answer only after their commit is durable.

A client in this process keeps `concurrency` requests in flight (httpx, one
connection each) and records each request's latency; throughput is requests
over wall time. Systems alternate round by round (and which goes first), each
round on a fresh store; figures are medians over rounds, with the ratio
durable_heap / sqlite of each round's pair. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEYS = 1000

PROGRAM = """
from durable_heap import state

state.setdefault("items", {f"k{i}": 0 for i in range(1000)})

def bump(key):
    state.items[key] += 1
    return state.items[key]
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DURABLE_HEAP_STORAGE", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """A server subprocess; `url` once it answers."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, url: str | None = None) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=str(log.parent))
        if url is None:
            assert self.proc.stdout is not None
            url = self.proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise RuntimeError(f"{cmd} did not start: {log.read_text()}")
        self.url = url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def start(system: str, workers: int, folder: Path) -> _Server:
    if system == "durable_heap":
        program = folder / "bench_app.py"
        program.write_text(textwrap.dedent(PROGRAM))
        cmd = [sys.executable, "-m", "durable_heap", "serve", str(program), "--port", "0", "--no-watch",
               "--storage", str(folder / "bench.fs"), "--workers", str(workers), "--attempts", "100"]
        return _Server(cmd, _env(), folder / "serve.log")
    from benchmarks.serve_sqlite_app import create

    db = folder / "bench.sqlite"
    create(str(db))
    cmd = [sys.executable, "-m", "benchmarks.serve_sqlite_app", "--port", "0", "--workers", str(workers)]
    server = _Server(cmd, _env({"BENCH_SQLITE": str(db)}), folder / "uvicorn.log")
    _wait_up(server)
    return server


def _wait_up(server: _Server, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.post(server.url + "/bump", json=["k0"], timeout=5)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                log = Path(server.log.name).read_text()
                raise RuntimeError(f"the sqlite server did not start: {log}") from None
            time.sleep(0.1)


async def _load(url: str, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """Send `requests` updates, `concurrency` at a time; (seconds, latencies in ms, errors)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    todo = iter(range(requests))
    rng = random.Random(1)
    keys = [f"k{rng.randrange(KEYS)}" for _ in range(requests)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for i in todo:
                t0 = time.perf_counter()
                r = await client.post("/bump", content=json.dumps([keys[i]]),
                                      headers={"content-type": "application/json"})
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, errors


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def measure(system: str, workers: int, requests: int, concurrency: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-serve-{system}-"))
    server = start(system, workers, folder)
    try:
        asyncio.run(_load(server.url, min(100, requests), concurrency))  # warm: connections, caches
        seconds, lat, errors = asyncio.run(_load(server.url, requests, concurrency))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"system": system, "workers": workers, "requests": requests, "errors": errors,
            "rps": requests / seconds, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def run(workers_list: list[int], rounds: int, requests: int, concurrency: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for workers in workers_list:
        for r in range(rounds):
            order = ["durable_heap", "sqlite"] if r % 2 == 0 else ["sqlite", "durable_heap"]
            pair = {s: measure(s, workers, requests, concurrency) for s in order}
            for s in order:
                rows.append({**pair[s], "round": r})
    summary: list[dict[str, Any]] = []
    for workers in workers_list:
        line: dict[str, Any] = {"workers": workers}
        for system in ("durable_heap", "sqlite"):
            mine = [x for x in rows if x["system"] == system and x["workers"] == workers]
            line[system] = {k: statistics.median(x[k] for x in mine) for k in ("rps", "p50_ms", "p99_ms")}
            line[system]["errors"] = sum(x["errors"] for x in mine)
        pairs = [(a, b) for a in rows for b in rows if a["workers"] == b["workers"] == workers
                 and a["round"] == b["round"] and a["system"] == "durable_heap" and b["system"] == "sqlite"]
        line["rps_ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
        line["p50_ratio"] = statistics.median(a["p50_ms"] / b["p50_ms"] for a, b in pairs)
        summary.append(line)
    return {"rows": rows, "summary": summary, "concurrency": concurrency, "requests": requests,
            "rounds": rounds, "cpus": os.cpu_count()}


def report(data: dict[str, Any]) -> str:
    out = [f"One-entry updates over HTTP, {data['concurrency']} requests in flight, "
           f"{data['requests']} requests x {data['rounds']} rounds per system (medians; "
           f"{data['cpus']} CPUs)", "",
           "| workers | system | requests/s | p50 ms | p99 ms | errors |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for line in data["summary"]:
        for system, label in (("durable_heap", "durable-heap serve"), ("sqlite", "FastAPI + sqlite3")):
            s = line[system]
            out.append(f"| {line['workers']} | {label} | {s['rps']:.0f} | {s['p50_ms']:.1f} | "
                       f"{s['p99_ms']:.1f} | {s['errors']} |")
    out.append("")
    for line in data["summary"]:
        out.append(f"- {line['workers']} worker(s): durable_heap/sqlite throughput {line['rps_ratio']:.2f}x, "
                   f"p50 latency {line['p50_ratio']:.2f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 worker, 1 round of 150 requests")
    p.add_argument("--workers", help="comma-separated worker counts (default 1,4)")
    p.add_argument("--rounds", type=int, help="rounds per system (default 3)")
    p.add_argument("--requests", type=int, help="requests per round (default 1500)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    quick = {"workers": "1", "rounds": 1, "requests": 150}
    full = {"workers": "1,4", "rounds": 3, "requests": 1500}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    data = run([int(w) for w in args.workers.split(",")], args.rounds, args.requests, args.concurrency)
    print(json.dumps(data, indent=2) if args.json else report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
