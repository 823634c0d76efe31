"""Benchmark runner: every system side by side in one run, each measurement in its own process.

    python -m benchmarks                 full run (10k, 100k, 1M, 10M entries; about 40 minutes
                                         and 10 GB of memory, most for raw ZODB at 10M)
    python -m benchmarks --quick         a smoke run of every row (10k entries, few repetitions)
    python -m benchmarks --only commit   one workload (bulk, open, read, iterate, commit,
                                         commit_warm, zeo_commit, zeo_clients) or section
                                         (threads, inline, tail, zeo_loads, cold, workflows,
                                         serve: the other modules, see benchmarks/sections.py)
    python -m benchmarks --skip serve    all but these workloads or sections (repeatable)
    python -m benchmarks --sizes 10000,10000000
    python -m benchmarks --json results.json
    python -m benchmarks --report        also write docs/benchmarks.md and docs/img/*.png
    python -m benchmarks --replot results.json   only redraw docs/img/*.png from a --json file
    python -m benchmarks --report --note "the machine was loaded"   a line atop the report

A full run also runs every section (`benchmarks.sections`): the modules of the
later issues, each in its own process, folded into the report with its targets.
`--quick` alone runs the main workloads only (CI's smoke run); `--quick --only
tail` runs that section with its module's smoke arguments.

Figures are medians (with p90 where a run has many samples) and ratios to
durable_heap measured in the same run, so that a faster or slower machine shifts
every system alike. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import sections as sec
from benchmarks.one import summarize
from benchmarks.style import style
from benchmarks.systems import SYSTEMS

ROOT = Path(__file__).resolve().parent.parent

# Which systems each workload shows; the first is the base of the ratios.
SHOWN = {
    "bulk": [
        "durable_heap", "durable_heap_list", "raw_oobtree", "raw_zodb", "sqlite_full", "pickle",
        "shelve", "diskcache",
    ],
    "open": ["durable_heap", "raw_zodb", "sqlite_full", "pickle", "shelve", "diskcache"],
    "iterate": [
        "durable_heap", "durable_heap_list", "raw_oobtree", "raw_zodb", "sqlite_full", "pickle",
        "shelve", "diskcache",
    ],
    "read": [
        "durable_heap", "durable_heap_list", "raw_oobtree", "raw_zodb", "sqlite_full", "shelve",
        "diskcache", "dict",
    ],
    "commit": [
        "durable_heap", "durable_heap_list", "durable_heap_watched", "durable_heap_objects",
        "raw_zodb", "raw_oobtree",
        "sqlite_full", "sqlite_normal", "pickle", "shelve", "diskcache", "fsync",
    ],
    "commit_warm": ["durable_heap", "durable_heap_list", "raw_zodb", "raw_oobtree", "sqlite_full"],
    # Through a ZEO server that the runner starts over each system's store.
    "zeo_commit": ["durable_heap_zeo", "durable_heap_zeo_nosync", "raw_zodb_zeo", "raw_zodb_zeo_sync"],
    "zeo_clients": ["durable_heap_zeo", "durable_heap_zeo_nosync", "raw_zodb_zeo", "raw_zodb_zeo_sync"],
}
# bulk builds the store the others use
ORDER = ["bulk", "open", "read", "iterate", "commit", "commit_warm", "zeo_commit", "zeo_clients"]
COMMITS = ("commit", "commit_warm", "zeo_commit")
MAIN_FIGURE = {
    "bulk": "seconds", "open": "ms", "read": "ns_per_read", "iterate": "seconds",
    "commit": "median_ms", "commit_warm": "median_ms", "zeo_commit": "median_ms",
}
UNITS = {"seconds": "s", "ms": "ms", "ns_per_read": "ns", "median_ms": "ms"}
#: Client processes of the zeo_clients workload.
CLIENTS = (1, 2, 4)


def _env(zeo: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if zeo:
        env["BENCH_ZEO"] = zeo
    return env


def run_one(
    workload: str, system: str, size: int, folder: str, reps: int, seed: int = 0, zeo: str | None = None
) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.one", workload, system, str(size), folder, str(reps), str(seed)],
        capture_output=True, text=True, env=_env(zeo), cwd=ROOT, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{system}/{size} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def start_zeo(folder: str) -> tuple[subprocess.Popen[str], str]:
    """``durable-heap zeo`` over the store in `folder`, on a free port: (process, address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "durable_heap", "zeo", "--storage", os.path.join(folder, "store"),
         "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT,
    )
    address = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not address.startswith("zeo://"):
        proc.kill()
        raise RuntimeError("the ZEO server did not start")
    return proc, address


def run_clients(system: str, size: int, folder: str, zeo: str, clients: int, millis: int) -> float:
    """Aggregate commits per second of `clients` processes started at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.one", "zeo_clients", system, str(size), folder,
             str(millis), "0", str(k), str(clients)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(zeo), cwd=ROOT,
        )
        for k in range(clients)
    ]
    for p in procs:
        if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError(f"zeo_clients/{system} failed:\n{p.communicate()[1]}")
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"zeo_clients/{system} failed:\n{err}")
        r = json.loads(out.strip().splitlines()[-1])
        total += r["commits"] / r["seconds"]
    return total


def reps_for(workload: str, system: str, size: int, quick: bool) -> int:
    if workload in COMMITS:
        reps = 30 if quick else 300
        if system in ("pickle", "shelve"):  # each commit rewrites the whole heap (or its index)
            reps = max(5, min(reps, 20_000_000 // max(size, 1)))
        return reps
    if workload == "read":
        return 2_000 if quick or system.startswith("sqlite") else 200_000
    return 1


def measure(
    workloads: list[str], sizes: list[int], quick: bool, only: set[str] | None = None
) -> dict[str, Any]:
    """Build each system's store once per size, then run the workloads on it.

    Commits are measured in rounds that alternate between the systems, so that a
    machine that slows down for a while slows every system alike.
    """
    results: dict[str, Any] = {w: {} for w in workloads}
    needed = sorted({s for w in workloads for s in SHOWN[w]}, key=list(SYSTEMS).index)
    if only:
        needed = [s for s in needed if s in only]
    rounds = 1 if quick else 3
    for size in sizes:
        folders: dict[str, str] = {}
        servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
        try:
            for system in needed:
                if size > SYSTEMS[system].max_size:
                    continue
                folder = folders[system] = tempfile.mkdtemp(prefix=f"bench-{system}-")
                build = run_one("bulk", system, size, folder, 1)
                if "bulk" in workloads and system in SHOWN["bulk"]:
                    results["bulk"].setdefault(system, {})[size] = build
                for w in ("open", "read", "iterate"):
                    if w in workloads and system in SHOWN[w]:
                        r = run_one(w, system, size, folder, reps_for(w, system, size, quick))
                        if w == "open" and not quick:  # a few fresh processes: median and p90
                            times = [r["ms"]] + [
                                run_one(w, system, size, folder, 1)["ms"] for _ in range(4)
                            ]
                            times.sort()
                            r["ms"], r["p90_ms"] = statistics.median(times), times[-1]
                        results[w].setdefault(system, {})[size] = r
                if SYSTEMS[system].zeo:
                    servers[system] = start_zeo(folder)
                print(f"  built and read {system} at {size:,}", file=sys.stderr)
            for w in COMMITS:
                if w not in workloads:
                    continue
                merged: dict[str, dict[str, Any]] = {}
                for round_ in range(rounds):
                    for system in SHOWN[w]:
                        if system not in folders:
                            continue
                        reps = max(1, reps_for(w, system, size, quick) // rounds)
                        zeo = servers[system][1] if system in servers else None
                        r = run_one(w, system, size, folders[system], reps, seed=round_, zeo=zeo)
                        m = merged.setdefault(system, {"samples_ms": [], "bytes": []})
                        m["samples_ms"] += r["samples_ms"]
                        m["bytes"].append(r["bytes_per_commit"])
                for system, m in merged.items():
                    r = summarize({"samples_ms": m["samples_ms"],
                                   "bytes_per_commit": sum(m["bytes"]) / len(m["bytes"])})
                    del r["samples_ms"]
                    results[w].setdefault(system, {})[size] = r
                print(f"  {w} at {size:,}", file=sys.stderr)
            if "zeo_clients" in workloads:
                millis = 500 if quick else 4000
                rates: dict[str, dict[int, list[float]]] = {}
                for clients in CLIENTS:
                    for _ in range(rounds if not quick else 1):  # systems alternate
                        for system in SHOWN["zeo_clients"]:
                            if system in servers:
                                rate = run_clients(system, size, folders[system], servers[system][1],
                                                   clients, millis)
                                rates.setdefault(system, {}).setdefault(clients, []).append(rate)
                for system, by_clients in rates.items():
                    results["zeo_clients"].setdefault(system, {})[size] = {
                        "commits_per_s": {str(c): statistics.median(v) for c, v in by_clients.items()}
                    }
                print(f"  zeo_clients at {size:,}", file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
    return results


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _label(system: str) -> str:
    cls = SYSTEMS[system]
    return cls.name + (f" *({cls.note})*" if cls.note else "")


def tables(results: dict[str, Any], sizes: list[int]) -> list[str]:
    lines: list[str] = []
    titles = {
        "bulk": "Bulk build: n entries in one transaction (seconds, lower is better)",
        "open": "Cold open + first read (milliseconds; peak RSS of the process)",
        "read": "Hot read of one entry already in memory (nanoseconds per read)",
        "iterate": "Iterate every entry once, after opening (seconds; peak RSS of the process)",
        "commit": "One-entry change + durable commit, random entries across the heap "
        "(median ms, p90; bytes appended per commit)",
        "commit_warm": "One-entry change + durable commit, 20 entries changed over and over "
        "(their records stay in memory: the commit without loading)",
    }
    titles["zeo_commit"] = (
        "Over ZEO: one-entry change + durable commit through a local ZEO server, one client "
        "(median ms, p90; bytes appended per commit)"
    )
    for w in ORDER:
        if w not in results or not results[w]:
            continue
        if w == "zeo_clients":
            lines += zeo_clients_table(results[w], sizes)
            continue
        fig = MAIN_FIGURE[w]
        lines += [f"### {titles[w]}", ""]
        head = "| system | " + " | ".join(f"{s:,}" for s in sizes) + " |"
        lines += [head, "|---" * (len(sizes) + 1) + "|"]
        base = results[w].get(SHOWN[w][0], {})
        for system in SHOWN[w]:
            row = results[w].get(system)
            if not row:
                continue
            cells = []
            for s in sizes:
                r = row.get(s)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{_fmt(r[fig])} {UNITS[fig]}"
                if w == "read":
                    cell += f" (p90 {_fmt(r['p90_ns'])})"
                if w == "open" and "p90_ms" in r:
                    cell += f" (p90 {_fmt(r['p90_ms'])})"
                if w in COMMITS:
                    cell += f" (p90 {_fmt(r['p90_ms'])}; {r['bytes_per_commit']:,.0f} B)"
                if w in ("bulk", "open", "iterate"):
                    cell += f", {r['peak_rss_mb']:.0f} MB"
                b = base.get(s)
                if b and system != SHOWN[w][0]:
                    cell += f" · ×{r[fig] / b[fig]:.2f}"
                cells.append(cell)
            lines.append(f"| {_label(system)} | " + " | ".join(cells) + " |")
        lines += ["", f"×: ratio to {SYSTEMS[SHOWN[w][0]].name} in the same run.", ""]
    return lines


def zeo_clients_table(rows: dict[str, Any], sizes: list[int]) -> list[str]:
    """Aggregate commits/s with 1, 2 and 4 client processes on distinct entries."""
    lines = [
        "### Over ZEO: aggregate commits per second of 1, 2 and 4 client processes, "
        "each changing its own entries (higher is better)",
        "",
        "| system | size | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in CLIENTS) + " |",
        "|---|---|" + "---|" * len(CLIENTS),
    ]
    base = rows.get(SHOWN["zeo_clients"][0], {})
    for system in SHOWN["zeo_clients"]:
        for s in sizes:
            r = rows.get(system, {}).get(s) or rows.get(system, {}).get(str(s))
            if not r:
                continue
            b = base.get(s) or base.get(str(s))
            cells = []
            for c in CLIENTS:
                rate = r["commits_per_s"][str(c)]
                cell = f"{rate:,.0f}/s"
                if b and system != SHOWN["zeo_clients"][0]:
                    cell += f" · ×{rate / b['commits_per_s'][str(c)]:.2f}"
                cells.append(cell)
            lines.append(f"| {_label(system)} | {s:,} | " + " | ".join(cells) + " |")
    lines += ["", f"×: ratio to {SYSTEMS[SHOWN['zeo_clients'][0]].name} in the same run.", ""]
    return lines


def targets(results: dict[str, Any], sizes: list[int]) -> list[str]:
    """The targets the issues name, each as measured."""
    out: list[str] = []
    c = results.get("commit", {})
    dh, raw, sql = c.get("durable_heap", {}), c.get("raw_zodb", {}), c.get("sqlite_full", {})
    big, small = max(sizes), min(sizes)

    def line(text: str, ok: bool) -> None:
        out.append(f"- {'met' if ok else 'NOT met'}: {text}")

    if dh and raw:
        for s in sizes:
            if s in dh and s in raw:
                r = dh[s]["median_ms"] / raw[s]["median_ms"]
                line(f"one-entry commit at {s:,}: {r:.2f}x raw ZODB (target <= 1.2x)", r <= 1.2)
                r = dh[s]["p90_ms"] / raw[s]["p90_ms"]
                line(f"  its p90 at {s:,}: {r:.2f}x raw ZODB's (target <= 1.3x)", r <= 1.3)
    if dh and sql and big in dh and big in sql:
        r = dh[big]["median_ms"] / sql[big]["median_ms"]
        line(f"one-entry commit at {big:,}: {r:.2f}x sqlite3 FULL (target <= 1.5x)", r <= 1.5)
    if dh and big != small and big in dh and small in dh:
        r = dh[big]["median_ms"] / dh[small]["median_ms"]
        line(f"commit flat in size: {big:,}/{small:,} = {r:.2f} (target <= 1.25)", r <= 1.25)
    lst = c.get("durable_heap_list", {})
    if lst and big != small and big in lst and small in lst:
        r = lst[big]["median_ms"] / lst[small]["median_ms"]
        line(f"List commit flat in size: {big:,}/{small:,} = {r:.2f} (target <= 1.25)", r <= 1.25)
    for system, label in (("durable_heap", "Dict"), ("durable_heap_list", "List")):
        row = results.get("commit_warm", {}).get(system, {})
        if big != small and big in row and small in row:
            r = row[big]["median_ms"] / row[small]["median_ms"]
            line(f"{label} warm commit flat in size: {big:,}/{small:,} = {r:.2f} (target <= 1.25)", r <= 1.25)
    zc = results.get("zeo_commit", {})
    zdh, zraw = zc.get("durable_heap_zeo", {}), zc.get("raw_zodb_zeo", {})
    for s in sizes:
        if s in zdh and s in zraw:
            r = zdh[s]["median_ms"] / zraw[s]["median_ms"]
            line(f"one-entry commit over ZEO at {s:,}: {r:.2f}x raw ZEO (target <= 1.2x)", r <= 1.2)
            zsync = zc.get("raw_zodb_zeo_sync", {})
            if s in zsync:
                r = zdh[s]["median_ms"] / zsync[s]["median_ms"]
                text = f"  the same against raw ZEO with server_sync=True (equal freshness): {r:.2f}x"
                line(text, r <= 1.2)
    pk = c.get("pickle", {})
    if dh and pk and 1_000_000 in pk and 1_000_000 in dh:
        r = pk[1_000_000]["median_ms"] / dh[1_000_000]["median_ms"]
        line(f"naive pickle at 1,000,000 is {r:,.0f}x slower (target >= 1,000x)", r >= 1000)
    for name, row in (("Dict", dh), ("List", lst)):
        if row:
            worst = max(r["bytes_per_commit"] for r in row.values())
            text = f"{name} bytes per one-entry commit: at most {worst:,.0f} B (target <= 2,048 B)"
            line(text, worst <= 2048)
    b = results.get("bulk", {})
    if "durable_heap" in b and "raw_oobtree" in b:
        s = max(set(b["durable_heap"]) & set(b["raw_oobtree"]))
        r = b["durable_heap"][s]["seconds"] / b["raw_oobtree"][s]["seconds"]
        line(f"bulk build of {s:,}: {r:.2f}x the raw OOBTree (target <= 2x)", r <= 2)
    o = results.get("open", {}).get("durable_heap", {})
    if o:
        s = max(o)
        line(f"cold open + first read at {s:,}: {o[s]['ms']:.0f} ms (target < 100 ms)", o[s]["ms"] < 100)
        line(f"cold open peak RSS at {s:,}: {o[s]['peak_rss_mb']:.0f} MB (target < 80 MB)",
             o[s]["peak_rss_mb"] < 80)
    rd = results.get("read", {})
    if "durable_heap" in rd and "dict" in rd:
        s = max(set(rd["durable_heap"]) & set(rd["dict"]))
        r = rd["durable_heap"][s]["ns_per_read"] / rd["dict"][s]["ns_per_read"]
        line(f"hot read at {s:,}: {r:.1f}x a plain dict lookup (target <= 3x)", r <= 3)
    return out


def machine(load: tuple[float, float] | None = None) -> list[str]:
    versions = []
    for pkg in ("durable-heap", "ZODB", "persistent", "BTrees", "transaction", "ZEO"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return [
        f"- Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        f"- Python {platform.python_version()}; " + ", ".join(versions)
        + f"; SQLite {__import__('sqlite3').sqlite_version}",
        "- The OS page cache was not dropped before cold opens (this machine does not allow it): "
        "they measure opening from memory-cached files.",
        "- fsync is fast on this virtual disk (about 0.12 ms); on real disks every durable system's "
        "commit costs more, alike, and the ratios move toward 1.",
        *([f"- Load average (1 min) at the start {load[0]:.1f}, at the end {load[1]:.1f}, on "
           f"{os.cpu_count()} cores: when it is above the core count, other processes shared the "
           "machine, absolute times are inflated and only ratios within one run (systems "
           "alternating round by round) mean much."] if load else []),
    ]


def plots(results: dict[str, Any], sizes: list[int], folder: Path,
          sections: dict[str, Any] | None = None) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for fig_name, key_, ylabel in (
        ("commit_latency.png", "median_ms", "median ms per one-entry commit"),
        ("bytes_per_commit.png", "bytes_per_commit", "bytes appended per one-entry commit"),
    ):
        fig = commit_figure(plt, results, key_, ylabel)
        fig.savefig(folder / fig_name, dpi=110)
        plt.close(fig)
        made.append(fig_name)
    threads = (sections or {}).get("threads", {}).get("output")
    if isinstance(threads, dict) and threads.get("runs"):
        fig = threads_figure(plt, threads["runs"])
        fig.savefig(folder / "threads.png", dpi=110)
        plt.close(fig)
        made.append("threads.png")
    return made


#: The threads section's systems, as `benchmarks.style` names them (one colour each).
THREAD_STYLES = {"durable_heap": "durable_heap", "durable_heap_spread": "durable_heap_spread",
                 "raw_zodb": "raw_zodb", "raw_zodb_gc": "raw_zodb_gc", "sqlite": "sqlite_full"}
THREAD_LABELS = {"durable_heap": "durable_heap Dict, neighbouring keys",
                 "durable_heap_spread": "durable_heap Dict, keys in distinct buckets",
                 "raw_zodb": "raw ZODB (Persistent items in an OOBTree)",
                 "raw_zodb_gc": "raw ZODB on durable_heap's group-commit FileStorage",
                 "sqlite": "sqlite3 (WAL, synchronous=FULL)"}


def threads_figure(plt: Any, runs: dict[str, list[dict[str, Any]]]) -> Any:
    """Commits/s against threads, one panel per disk, one line and colour per system."""
    delays = sorted({float(k.split("|")[0]) for k in runs})
    systems = [s for s in THREAD_STYLES if any(k.endswith(f"|{s}") for k in runs)]
    fig, axes = plt.subplots(1, len(delays), figsize=(5.2 * len(delays) + 2.5, 4.0), squeeze=False)
    for ax, delay in zip(axes[0], delays, strict=True):
        for system in systems:
            points = sorted((int(k.split("|")[1]), statistics.median(r["commits_per_s"] for r in rows))
                            for k, rows in runs.items()
                            if float(k.split("|")[0]) == delay and k.split("|")[2] == system)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], label=THREAD_LABELS[system],
                        **style(THREAD_STYLES[system]))
        ax.set_title("this disk" if not delay else f"fsync + {delay:g} ms", fontsize=9)
        ax.set_xlabel("threads committing at once")
        ax.set_ylabel("commits per second")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def commit_figure(plt: Any, results: dict[str, Any], key_: str, ylabel: str) -> Any:
    """One line per system of the commit workload, each in its own style (benchmarks.style)."""
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for system in SHOWN["commit"]:
        row = results.get("commit", {}).get(system)
        if not row or (key_ == "bytes_per_commit" and system == "fsync"):
            continue
        xs = sorted(row, key=int)  # int keys, or str keys from a --json file
        ax.plot([int(x) for x in xs], [row[x][key_] for x in xs], label=SYSTEMS[system].name,
                **style(system))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries in the heap")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no line hidden
    fig.tight_layout()
    return fig


def _shown(argv: list[str]) -> list[str]:
    """The arguments that decide what was measured (not where it was written, nor the notes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--note", "--json", "--out"):
            skip = True
        elif not arg.startswith(("--note=", "--json=", "--out=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI smoke run)")
    names = [*ORDER, *sec.SECTIONS]
    p.add_argument("--only", choices=names, action="append",
                   help="run only this workload or section (repeatable)")
    p.add_argument("--skip", choices=names, action="append", default=[],
                   help="leave this workload or section out (repeatable)")
    p.add_argument("--sizes", help="comma-separated heap sizes")
    p.add_argument("--systems", help=f"comma-separated systems (default all: {', '.join(SYSTEMS)})")
    p.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    p.add_argument("--report", action="store_true", help="write docs/benchmarks.md and docs/img/*.png")
    p.add_argument("--note", action="append", default=[], help="a line atop the report (repeatable)")
    p.add_argument("--out", metavar="DIR", default=str(ROOT / "docs"),
                   help="where --report writes benchmarks.md and img/*.png (default: docs/)")
    p.add_argument("--replot", metavar="PATH",
                   help="only redraw docs/img/*.png from a --json file, measuring nothing")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        made = plots(saved["results"], saved["sizes"], Path(args.out) / "img", saved.get("sections"))
        print("\n".join(f"docs/img/{m}" for m in made))
        return 0 if made else 1
    if args.sizes:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    else:
        sizes = [10_000] if args.quick else [10_000, 100_000, 1_000_000, 10_000_000]
    chosen = args.only or [*ORDER, *([] if args.quick else sec.SECTIONS)]
    chosen = [n for n in chosen if n not in args.skip]
    workloads = [w for w in chosen if w in ORDER]
    section_names = [n for n in sec.SECTIONS if n in chosen]
    only = set(args.systems.split(",")) if args.systems else None
    if only and not only <= set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(only - set(SYSTEMS)))}")
    load_start = os.getloadavg()[0]
    results = measure(workloads, sizes, args.quick, only) if workloads else {}
    ran: dict[str, Any] = {}
    for name in section_names:
        print(f"  section {name}", file=sys.stderr, flush=True)
        ran[name] = sec.run_section(name, args.quick)
    load = (load_start, os.getloadavg()[0])
    body = tables(results, sizes) + sec.report_lines(ran)
    goals = targets(results, sizes) + sec.goal_lines(ran)
    text = "\n".join(body + ["### Targets", ""] + goals + [""])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "results": results, "sections": ran,
                                               "load": load}, indent=1))
    if args.report:
        out_dir = Path(args.out)
        made = plots(results, sizes, out_dir / "img", ran)
        pics = [f"![{m}](img/{m})" for m in made]
        command = "python -m benchmarks " + " ".join(_shown(argv if argv is not None else sys.argv[1:]))
        doc = [
            "# Benchmarks",
            "",
            f"Written by `{command.strip()}`: every system side by side in one run, each "
            "measurement in its own process, then the sections (`benchmarks/sections.py`: the "
            "modules of the later issues, each run as the command it shows). Medians, p90 where "
            "there are many samples, and ratios to durable_heap in the same run.",
            "",
            *[f"**{n}**" for n in args.note],
            *([""] if args.note else []),
            *machine(load),
            "",
            *pics,
            "",
            *body,
            "### Targets",
            "",
            "Every target of the issues measured in this run, met or not.",
            "",
            *goals,
            "",
        ]
        (out_dir / "benchmarks.md").write_text("\n".join(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
