"""One-entry updates over HTTP: `durable-heap serve` against FastAPI + sqlite3, under the same uvicorn.

    python -m benchmarks.serve                  1 and 4 workers, 3 rounds of 1500 requests per system
    python -m benchmarks.serve --quick          1 worker, 1 round of 150 requests (seconds)
    python -m benchmarks.serve --workers 1,2,4 --rounds 5 --requests 3000 --concurrency 32 --json
    python -m benchmarks.serve --workers 2,4 --compare-zeo-pipeline   also ZEO's fsync on its loop (before)
    python -m benchmarks.serve --workers 2,4 --compare-zeo-client     also ZEO's client commit lock (before)

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

``--compare-zeo-client`` adds durable_heap with ZEO's own client ``tpc_finish``
(``DURABLE_HEAP_ZEO_EARLY_RELEASE=0`` in the workers: the client's commit lock held
until the server answered, the "before" of `durable_heap._zeo._finish_co`).

``--compare-zeo-pipeline`` adds a third system, durable_heap with the ZEO
server's fsync on its event loop (``DURABLE_HEAP_ZEO_PIPELINE=0``, ZEO's own
``tpc_finish``: the "before" of `durable_heap._zeo_pipeline`), in the same rounds.
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
import os
import time

from durable_heap import state

state.setdefault("items", {f"k{i}": 0 for i in range(1000)})
WORK = float(os.environ.get("BENCH_WORK_MS", "0")) / 1000

def bump(key):
    end = time.thread_time() + WORK  # Python work of the request's own, before the update
    while time.thread_time() < end:
        pass
    state.items[key] += 1
    return state.items[key]
"""


#: With --fsync-delay-ms: the slow disk of `benchmarks.threads` (its LD_PRELOAD shim,
#: which makes every fsync and fdatasync sleep that long after the real one), set here
#: for every measured process alike: (shim path, delay in ms).
_SLOW_DISK: tuple[str, float] | None = None


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DURABLE_HEAP_STORAGE", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if _SLOW_DISK is not None:
        env["LD_PRELOAD"] = _SLOW_DISK[0]
        env["DH_BENCH_FSYNC_US"] = str(int(_SLOW_DISK[1] * 1000))
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


#: The systems, as the report names them; `LOOP_FSYNC` only with --compare-zeo-pipeline.
LOOP_FSYNC = "durable_heap_loop_fsync"
#: ... and `CLIENT_LOCK` only with --compare-zeo-client.
CLIENT_LOCK = "durable_heap_client_lock"
LABELS = {"durable_heap": "durable-heap serve", LOOP_FSYNC: "durable-heap serve, ZEO fsync on its loop",
          CLIENT_LOCK: "durable-heap serve, ZEO's client commit lock", "sqlite": "FastAPI + sqlite3"}


#: ... and ``durable_heap_threads_N`` (`serve --threads N`) with --compare-threads.
THREADS = "durable_heap_threads_"


#: ... and ``durable_heap_slots_N`` (N calls on the CPU at once, 0: no limit) with --compare-slots.
SLOTS = "durable_heap_slots_"


def label(system: str) -> str:
    if system.startswith(THREADS):
        return f"durable-heap serve --threads {system[len(THREADS):]}"
    if system.startswith(SLOTS):
        n = system[len(SLOTS):]
        return f"durable-heap serve, {n} calls on the CPU at once" if n != "0" else \
            "durable-heap serve, no limit on calls on the CPU"
    return LABELS[system]


def start(system: str, workers: int, folder: Path, work_ms: float = 0) -> _Server:
    if system in ("durable_heap", LOOP_FSYNC, CLIENT_LOCK) or system.startswith((THREADS, SLOTS)):
        program = folder / "bench_app.py"
        program.write_text(textwrap.dedent(PROGRAM))
        cmd = [sys.executable, "-m", "durable_heap", "serve", str(program), "--port", "0", "--no-watch",
               "--storage", str(folder / "bench.fs"), "--workers", str(workers), "--attempts", "100"]
        if system.startswith(THREADS):
            cmd += ["--threads", system[len(THREADS):]]
        env = {"BENCH_WORK_MS": str(work_ms),
               "DURABLE_HEAP_ZEO_PIPELINE": "0" if system == LOOP_FSYNC else "1",
               "DURABLE_HEAP_ZEO_EARLY_RELEASE": "0" if system == CLIENT_LOCK else "1"}
        if system.startswith(SLOTS):
            env["DURABLE_HEAP_SERVE_CPU_SLOTS"] = system[len(SLOTS):]
        return _Server(cmd, _env(env), folder / "serve.log")
    from benchmarks.serve_sqlite_app import create

    db = folder / "bench.sqlite"
    create(str(db))
    cmd = [sys.executable, "-m", "benchmarks.serve_sqlite_app", "--port", "0", "--workers", str(workers)]
    env = _env({"BENCH_SQLITE": str(db), "BENCH_WORK_MS": str(work_ms)})
    server = _Server(cmd, env, folder / "uvicorn.log")
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux /proc; 0 elsewhere or once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> dict[int, str]:
    """`pid` and its descendants, each with its role: ``zeo`` (the ZEO server) or ``server``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        out[p] = "zeo" if b'main(["zeo"' in cmd or b"durable_heap\x00zeo" in cmd else "server"
        todo += children.get(p, [])
    return out


def _cpu_by_role(pid: int) -> dict[str, float]:
    totals: dict[str, float] = {"server": 0.0, "zeo": 0.0}
    for p, role in _tree(pid).items():
        totals[role] += _cpu_seconds(p)
    return totals


def _settle(pid: int, timeout: float = 90) -> None:
    """Wait until the server's processes are idle: started, not still importing and loading.

    The address is printed (and the socket listens) before N worker processes
    have started; measured from there, a round of 4 workers counted their start.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(_cpu_by_role(pid).values())
        time.sleep(0.5)
        if sum(_cpu_by_role(pid).values()) - before < 0.05:  # under a tenth of a core
            return


def _fsync_ms(folder: Path, n: int = 100) -> float:
    """The median time of one small append + fsync in `folder`: the floor of a durable commit."""
    samples = []
    with open(folder / "fsync-probe", "ab") as f:
        for _ in range(n):
            f.write(b"x" * 200)
            f.flush()
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


#: wrk's script: a random one of the KEYS entries per request (the same sequence each run),
#: and its figures as one JSON line at the end.
WRK_SCRIPT = """
math.randomseed(1)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
request = function()
  return wrk.format(nil, "/bump", nil, '["k' .. math.random(0, %(last)d) .. '"]')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "seconds": %%f, "errors": %%d, "p50_ms": %%f, "p99_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
""".replace("%(last)d", str(KEYS - 1)).replace("%%", "%")


def _load_wrk(url: str, seconds: float, concurrency: int, folder: Path) -> dict[str, Any]:
    """`seconds` of updates from wrk (one thread, `concurrency` keep-alive connections)."""
    import resource

    script = folder / "bump.lua"
    script.write_text(WRK_SCRIPT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    wrk = shutil.which("wrk") or "wrk"
    out = subprocess.run([wrk, "-t", "1", "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "60s",
                          "-s", str(script), url], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["client_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dict(figures)


def _load_httpx(url: str, requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` updates from httpx in this process (its CPU: `time.process_time`)."""
    cpu0 = time.process_time()
    seconds, lat, errors = asyncio.run(_load(url, requests, concurrency))
    return {"requests": requests, "seconds": seconds, "errors": errors, "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99), "client_cpu": time.process_time() - cpu0}


def measure(system: str, workers: int, load: dict[str, Any]) -> dict[str, Any]:
    """One round of one system: a fresh store and server, warmed, then the measured load."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-serve-{system}-"))
    server = start(system, workers, folder, load["work_ms"])
    client, concurrency = load["client"], load["concurrency"]
    try:
        _settle(server.proc.pid)  # the worker processes have started (the socket queues before)
        if client == "wrk":  # warm: connections, caches, the workers' first loads
            _load_wrk(server.url, 2, concurrency, folder)
        else:
            _load_httpx(server.url, min(100, load["requests"]), concurrency)
        before = _cpu_by_role(server.proc.pid)
        if client == "wrk":
            got = _load_wrk(server.url, load["seconds"], concurrency, folder)
        else:
            got = _load_httpx(server.url, load["requests"], concurrency)
        after = _cpu_by_role(server.proc.pid)
        fsync = _fsync_ms(folder)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    requests = max(1, got["requests"])
    cpu = {role: (after[role] - before[role]) * 1000 / requests for role in after}
    cpu["client"] = got["client_cpu"] * 1000 / requests
    seconds = got["seconds"]
    return {"system": system, "workers": workers, "requests": requests, "errors": got["errors"],
            "rps": requests / seconds, "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"],
            # CPU milliseconds per request, by process; and the cores they kept busy.
            "cpu_ms": cpu, "cores_busy": sum(cpu.values()) * requests / 1000 / seconds,
            "fsync_ms": fsync, "load": os.getloadavg()[0]}


def run(workers_list: list[int], rounds: int, load: dict[str, Any],
        systems: tuple[str, ...] = ("durable_heap", "sqlite")) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for workers in workers_list:
        # One worker has no ZEO server: the loop-fsync variant is the same system then.
        mine = [s for s in systems if not (s in (LOOP_FSYNC, CLIENT_LOCK) and workers == 1)]
        for r in range(rounds):
            order = mine[r % len(mine):] + mine[:r % len(mine)]  # each system first in turn
            pair = {s: measure(s, workers, load) for s in order}
            for s in order:
                rows.append({**pair[s], "round": r})
    summary: list[dict[str, Any]] = []
    for workers in workers_list:
        line: dict[str, Any] = {"workers": workers}
        present = [s for s in systems if any(x["system"] == s and x["workers"] == workers for x in rows)]
        for system in present:
            mine = [x for x in rows if x["system"] == system and x["workers"] == workers]
            line[system] = {k: statistics.median(x[k] for x in mine) for k in ("rps", "p50_ms", "p99_ms")}
            line[system]["errors"] = sum(x["errors"] for x in mine)
            for role in ("server", "zeo", "client"):
                line[system][f"cpu_{role}_ms"] = statistics.median(x["cpu_ms"][role] for x in mine)
            for k in ("cores_busy", "fsync_ms", "load"):
                line[system][k] = statistics.median(x[k] for x in mine)
        pairs = [(a, b) for a in rows for b in rows if a["workers"] == b["workers"] == workers
                 and a["round"] == b["round"] and a["system"] == "durable_heap" and b["system"] == "sqlite"]
        line["rps_ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
        line["p50_ratio"] = statistics.median(a["p50_ms"] / b["p50_ms"] for a, b in pairs)
        if LOOP_FSYNC in present:  # pipelined against the fsync on the loop, round by round
            pipe = [(a, b) for a in rows for b in rows if a["workers"] == b["workers"] == workers
                    and a["round"] == b["round"] and a["system"] == "durable_heap"
                    and b["system"] == LOOP_FSYNC]
            line["pipeline_rps_ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in pipe)
        if CLIENT_LOCK in present:  # the early release against ZEO's client lock, round by round
            early = [(a, b) for a in rows for b in rows if a["workers"] == b["workers"] == workers
                     and a["round"] == b["round"] and a["system"] == "durable_heap"
                     and b["system"] == CLIENT_LOCK]
            line["client_rps_ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in early)
        for system in present:  # each --compare-threads/--compare-slots count against sqlite
            if system.startswith((THREADS, SLOTS)):
                against = [(a, b) for a in rows for b in rows if a["workers"] == b["workers"] == workers
                           and a["round"] == b["round"] and a["system"] == system and b["system"] == "sqlite"]
                line[f"{system}_rps_ratio"] = statistics.median(a["rps"] / b["rps"] for a, b in against)
        summary.append(line)
    return {"rows": rows, "summary": summary, **load, "rounds": rounds, "cpus": os.cpu_count(),
            "systems": list(systems)}


def report(data: dict[str, Any]) -> str:
    amount = (f"{data['seconds']:g} s" if data["client"] == "wrk" else f"{data['requests']} requests")
    work = f", {data['work_ms']:g} ms of Python work each" if data.get("work_ms") else ""
    if data.get("fsync_delay_ms"):
        work += f", every fsync {data['fsync_delay_ms']:g} ms slower"
    out = [f"One-entry updates over HTTP{work}, {data['concurrency']} requests in flight "
           f"from {data['client']}, "
           f"{amount} x {data['rounds']} rounds per system (medians; {data['cpus']} CPUs)", "",
           "| workers | system | requests/s | p50 ms | p99 ms | errors | CPU ms/request: server, ZEO, "
           "client | cores busy | fsync ms | load |",
           "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for line in data["summary"]:
        for system in data["systems"]:
            if system not in line:
                continue
            s = line[system]
            cpu = f"{s['cpu_server_ms']:.2f}, {s['cpu_zeo_ms']:.2f}, {s['cpu_client_ms']:.2f}"
            out.append(f"| {line['workers']} | {label(system)} | {s['rps']:.0f} | {s['p50_ms']:.1f} | "
                       f"{s['p99_ms']:.1f} | {s['errors']} | {cpu} | {s['cores_busy']:.2f} | "
                       f"{s['fsync_ms']:.1f} | {s['load']:.1f} |")
    out.append("")
    for line in data["summary"]:
        out.append(f"- {line['workers']} worker(s): durable_heap/sqlite throughput {line['rps_ratio']:.2f}x, "
                   f"p50 latency {line['p50_ratio']:.2f}x")
        for system in data["systems"]:
            if f"{system}_rps_ratio" in line:
                out.append(f"- {line['workers']} worker(s): {label(system)}/sqlite throughput "
                           f"{line[f'{system}_rps_ratio']:.2f}x")
        if "client_rps_ratio" in line:
            out.append(f"- {line['workers']} worker(s): ZEO client lock released at the finish / held "
                       f"to its answer: throughput {line['client_rps_ratio']:.2f}x")
        if "pipeline_rps_ratio" in line:
            out.append(f"- {line['workers']} worker(s): ZEO fsync off its loop / on it: throughput "
                       f"{line['pipeline_rps_ratio']:.2f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 worker, 1 round of 150 requests")
    p.add_argument("--workers", help="comma-separated worker counts (default 1,4)")
    p.add_argument("--rounds", type=int, help="rounds per system (default 3)")
    p.add_argument("--requests", type=int, help="requests per round (default 1500)")
    p.add_argument("--seconds", type=float, help="seconds of load per round, with wrk (default 15)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--work-ms", type=float, default=0.0,
                   help="CPU milliseconds of Python work per request before the update (default 0): "
                        "where more worker processes pay off")
    p.add_argument("--client", choices=("wrk", "httpx"),
                   help="the load generator: wrk (the default when installed: apt-get install wrk), "
                        "or httpx in this process (5 ms of CPU a request: it competes with the servers)")
    p.add_argument("--compare-zeo-pipeline", action="store_true",
                   help="also run durable_heap with the ZEO server's fsync on its event loop (the "
                        "\"before\" of the pipelined commits), alternating with the others")
    p.add_argument("--compare-zeo-client", action="store_true",
                   help="also run durable_heap with ZEO's own client tpc_finish (its commit lock "
                        "held until the server answered: the \"before\"), alternating with the others")
    p.add_argument("--compare-threads", metavar="N[,M]",
                   help="also run durable-heap serve --threads N (each count) in the same rounds")
    p.add_argument("--compare-slots", metavar="N[,M]",
                   help="also run durable-heap serve with N calls on the CPU at once (0: no limit, "
                        "the thread pool of earlier versions) in the same rounds")
    p.add_argument("--fsync-delay-ms", type=float, default=0.0,
                   help="a slower disk: every fsync of both systems' servers sleeps this long after it "
                        "returns (benchmarks.threads' shim; needs cc)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    quick = {"workers": "1", "rounds": 1, "requests": 150, "seconds": 3.0}
    full = {"workers": "1,2,4", "rounds": 3, "requests": 1500, "seconds": 15.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.client is None:
        args.client = "wrk" if shutil.which("wrk") else "httpx"
    load = {"client": args.client, "concurrency": args.concurrency, "requests": args.requests,
            "seconds": args.seconds, "work_ms": args.work_ms}
    systems = ("durable_heap", *([LOOP_FSYNC] if args.compare_zeo_pipeline else []),
               *([CLIENT_LOCK] if args.compare_zeo_client else []),
               *(f"{THREADS}{int(n)}" for n in (args.compare_threads or "").split(",") if n),
               *(f"{SLOTS}{int(n)}" for n in (args.compare_slots or "").split(",") if n),
               "sqlite")
    global _SLOW_DISK
    with tempfile.TemporaryDirectory(prefix="dh-serve-shim-") as shim_dir:
        if args.fsync_delay_ms:
            from benchmarks.threads import _shim

            shim = _shim(shim_dir)
            if shim is None:
                p.error("--fsync-delay-ms needs a C compiler (cc) to build its shim")
            _SLOW_DISK = (shim, args.fsync_delay_ms)
            load["fsync_delay_ms"] = args.fsync_delay_ms
        data = run([int(w) for w in args.workers.split(",")], args.rounds, load, systems)
    print(json.dumps(data, indent=2) if args.json else report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
