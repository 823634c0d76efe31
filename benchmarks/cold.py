"""Cold start: what a fresh process pays before its first answer (issue 18, part 4).

    python -m benchmarks.cold [--rounds 15] [--size 100000]

Each case is a new interpreter, started the way a user starts it, timed from the
parent (wall clock, and the child's CPU time from ``wait4``). The cases alternate
round by round, so that a machine that slows down for a while slows all alike:

- ``bare``: ``python -c pass``, the interpreter's own start (the venv's site included)
- ``import``: ``python -c "import durable_heap"``
- ``open sqlite3`` / ``open raw ZODB`` / ``open durable_heap``: import, open a store of
  `--size` entries, read one entry (the systems of `benchmarks.systems`)
- ``call python``: ``import durable_heap``, open the counter example's heap, call ``count``
- ``call cli``: ``durable-heap call examples/counter.py count`` on the same heap

Targets (issue 18): ``import`` at most 60 ms over ``bare``; ``call cli`` at most 1.5x
``call python``. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.systems import SYSTEMS, key

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "examples" / "counter.py"

_OPEN = """\
import sys, time
from benchmarks.systems import SYSTEMS
s = SYSTEMS[{system!r}]()
s.open({path!r})
s.read({key!r})
s.close()
"""

_CALL = """\
import durable_heap as dh
with dh.open({target!r}) as heap:
    print(heap.load({program!r}, deploy=False).call("count"))
"""


def _cli() -> list[str]:
    """The installed ``durable-heap`` script beside this interpreter, else ``-m durable_heap``."""
    script = Path(sys.executable).parent / "durable-heap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "durable_heap"]


def cases(folder: str, size: int) -> dict[str, list[str]]:
    py = sys.executable
    stores = {name: os.path.join(folder, name) for name in ("sqlite_full", "raw_zodb", "durable_heap")}
    program = os.path.join(folder, "counter.py")
    target = os.path.join(folder, "counter.fs")
    out = {"bare": [py, "-c", "pass"], "import": [py, "-c", "import durable_heap"]}
    for name, path in stores.items():
        label = {"sqlite_full": "open sqlite3", "raw_zodb": "open raw ZODB"}.get(name, "open durable_heap")
        out[label] = [py, "-c", _OPEN.format(system=name, path=path, key=key(size // 3))]
    out["call python"] = [py, "-c", _CALL.format(target=target, program=program)]
    out["call cli"] = [*_cli(), "call", program, "count", "--storage", target, "--no-deploy"]
    return out


def prepare(folder: str, size: int) -> None:
    """Build the stores and deploy the counter once (no case deploys)."""
    for name in ("sqlite_full", "raw_zodb", "durable_heap"):
        SYSTEMS[name]().build(os.path.join(folder, name), size)
    shutil.copy(COUNTER, os.path.join(folder, "counter.py"))
    subprocess.run([*_cli(), "deploy", os.path.join(folder, "counter.py"),
                    "--storage", os.path.join(folder, "counter.fs")],
                   check=True, capture_output=True, env=_env(), cwd=folder)


def _env() -> dict[str, str]:
    """The child's environment: this checkout first; bytecode cached, as users have it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # else every start compiles every module
    return env


def run(argv: list[str], folder: str) -> tuple[float, float]:
    """(wall ms, CPU ms) of one process."""
    env = _env()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=folder)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else b""  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{err.decode(errors='replace')}")
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3


def measure(rounds: int, size: int) -> dict[str, dict[str, float]]:
    folder = tempfile.mkdtemp(prefix="bench-cold-")
    try:
        prepare(folder, size)
        todo = cases(folder, size)
        walls: dict[str, list[float]] = {k: [] for k in todo}
        cpus: dict[str, list[float]] = {k: [] for k in todo}
        for argv in todo.values():  # once each: files into the OS cache, .pyc written
            run(argv, folder)
        for _ in range(rounds):
            for name, argv in todo.items():
                w, c = run(argv, folder)
                walls[name].append(w)
                cpus[name].append(c)
        return {
            name: {"wall_ms": statistics.median(walls[name]), "cpu_ms": statistics.median(cpus[name]),
                   "wall_min_ms": min(walls[name])}
            for name in todo
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict[str, dict[str, float]], size: int) -> list[str]:
    bare = results["bare"]
    lines = [
        f"### Cold start: a fresh process (median of the rounds; stores of {size:,} entries)",
        "",
        "| case | wall ms | over bare python | CPU ms | CPU over bare |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall_ms']:.1f} | {r['wall_ms'] - bare['wall_ms']:+.1f} | "
                     f"{r['cpu_ms']:.1f} | {r['cpu_ms'] - bare['cpu_ms']:+.1f} |")
    imp = results["import"]
    over, cpu_over = imp["wall_ms"] - bare["wall_ms"], imp["cpu_ms"] - bare["cpu_ms"]
    call, cli = results["call python"], results["call cli"]
    ratio, cpu_ratio = cli["wall_ms"] / call["wall_ms"], cli["cpu_ms"] / call["cpu_ms"]
    dh, sq, raw = results["open durable_heap"], results["open sqlite3"], results["open raw ZODB"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += [
        "",
        f"- {mark(over <= 60)}: `import durable_heap` {over:.1f} ms over bare python "
        f"({cpu_over:.1f} ms of CPU; target <= 60 ms)",
        f"- {mark(ratio <= 1.5)}: `durable-heap call` of the counter {ratio:.2f}x the same call from "
        f"`python -c` ({cpu_ratio:.2f}x in CPU; target <= 1.5x)",
        f"- open + first read over bare python: durable_heap {dh['wall_ms'] - bare['wall_ms']:.1f} ms, "
        f"raw ZODB {raw['wall_ms'] - bare['wall_ms']:.1f} ms "
        f"(x{(dh['wall_ms'] - bare['wall_ms']) / (raw['wall_ms'] - bare['wall_ms']):.2f}), "
        f"sqlite3 {sq['wall_ms'] - bare['wall_ms']:.1f} ms",
        "",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--size", type=int, default=100_000)
    args = p.parse_args()
    print("\n".join(report(measure(args.rounds, args.size), args.size)))


if __name__ == "__main__":
    main()
