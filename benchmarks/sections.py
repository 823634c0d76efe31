"""The benchmark modules beside the main workloads, as sections of one report.

``python -m benchmarks --only threads`` (or ``inline``, ``tail``, ``cold``, ``zeo_loads``,
``workflows``, ``serve``) runs that module in its own process, with the arguments its
section names here (``--quick``: the module's smoke arguments), and folds what it printed
into the report: its table, and one ``met`` / ``NOT met`` line per target of the issues.
A full run (``python -m benchmarks``, no ``--only``) runs every section after the main
workloads; ``--quick`` alone runs none (CI's smoke run stays short: each module has its
own smoke test in tests/test_benchmarks.py).

Each section is a subprocess: the module's own process handling (one process per
system, rounds alternating) stays as it is, and a section that fails is reported as
failed instead of ending the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


@dataclass(frozen=True)
class Section:
    """One benchmark module: how it is run, and how its output becomes report lines."""

    title: str
    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    #: stdout -> (the section's lines, its target lines)
    render: Callable[[str], tuple[list[str], list[str]]]
    #: the data kept in --json (parsed JSON, or the text)
    json_output: bool = False


# --- renderers: what each module printed, as report lines -----------------------------------


def _text(out: str) -> tuple[list[str], list[str]]:
    """A module that prints markdown with its own met / NOT met lines (tail, cold)."""
    lines = out.rstrip().splitlines()
    body = [line for line in lines if not line.startswith(("- met", "- NOT met"))]
    goals = [line for line in lines if line.startswith(("- met", "- NOT met"))]
    while body and body[-1] == "":
        body.pop()
    return body, goals


def _zeo_loads(out: str) -> tuple[list[str], list[str]]:
    body = ["Per commit over a local `durable-heap zeo` server, after 5 cold commits: "
            "milliseconds, the client's CPU, records loaded, and the calls sent to the server.", ""]
    body += [f"- {line}" for line in out.strip().splitlines()]
    return body, []  # the ZEO target is the zeo_commit workload's (see the main targets)


def _threads(out: str) -> tuple[list[str], list[str]]:
    data = json.loads(out.strip().splitlines()[-1])
    runs: dict[str, list[dict[str, Any]]] = data["runs"]

    def med(delay: float, n: int, system: str, key: str = "commits_per_s") -> float | None:
        rows = runs.get(f"{delay}|{n}|{system}")
        xs = [r[key] for r in rows or () if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    body = [data["table"], ""]
    goals: list[str] = []
    threads = sorted({int(k.split("|")[1]) for k in runs})
    delays = sorted({float(k.split("|")[0]) for k in runs})
    top = max(threads)
    for delay in delays:
        dh, raw, sql = (med(delay, top, s) for s in ("durable_heap", "raw_zodb", "sqlite"))
        cpu = med(delay, top, "durable_heap", "cpu_ms_per_commit")
        if not (dh and raw):
            continue
        if not delay:
            bound = f"; CPU per commit {cpu:.2f} ms: under the GIL at most {1000 / cpu:,.0f}/s" if cpu else ""
            goals.append(f"- {_mark(dh >= raw)}: {top} threads on distinct keys of one Dict, this disk: "
                         f"{dh:,.0f} commits/s, {dh / raw:.2f}x raw ZODB's {raw:,.0f}/s "
                         f"(target >= 1x{bound})")
        else:
            goals.append(f"- {_mark(dh >= 2 * raw)}: {top} threads, fsync +{delay:g} ms: {dh / raw:.2f}x "
                         f"raw ZODB (target >= 2x)")
            if sql:
                goals.append(f"- {_mark(dh >= sql)}: {top} threads, fsync +{delay:g} ms: {dh / sql:.2f}x "
                             f"sqlite3 WAL FULL (target >= 1x)")
    goals.append("- not measured here: one thread within 5% of the code before group commit (it needs "
                 "that checkout: `python -m benchmarks.threads --baseline PATH`)")
    return body, goals


def _inline(out: str) -> tuple[list[str], list[str]]:
    data = json.loads(out)
    body = ["| system | bulk CPU s | bulk wall s | file MB | peak RSS MB | commit median ms "
            "| commit CPU median / mean ms | bytes per commit |", "|---|---|---|---|---|---|---|---|"]
    names = {"flat": "durable_heap, int values", "nested": "durable_heap, small dicts inline",
             "records": "durable_heap, small dicts as records (before)",
             "sqlite": "sqlite3 WAL FULL, JSON text column"}
    for system, label in names.items():
        r = data[system]
        body.append(f"| {label} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['file_mb']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} / "
                    f"{r['cpu_mean_ms']:.2f} | {r['bytes_per_commit']:,.0f} |")
    ratios = data["ratios"]
    cpu, size = ratios["bulk cpu nested/flat (target <= 2)"], ratios["bulk bytes nested/flat (target <= 2)"]
    written = ratios["commit bytes nested (target <= 2048)"]
    body += ["", "Against one record per small value (before): bulk CPU "
             f"{ratios['bulk cpu records/nested']:.1f}x, bytes "
             f"{ratios['bulk bytes records/nested']:.1f}x, peak RSS "
             f"{ratios['bulk peak rss nested/records']:.2f}x; commit CPU nested/flat "
             f"{ratios['commit cpu nested/flat']:.2f}x."]
    goals = [
        f"- {_mark(cpu <= 2)}: nested bulk load {cpu:.2f}x flat values in CPU time (target <= 2x)",
        f"- {_mark(size <= 2)}: nested bulk load {size:.2f}x flat values in bytes (target <= 2x)",
        f"- {_mark(written <= 2048)}: one-entry commit of a nested value writes {written:,.0f} B "
        "(target <= 2 KB)",
    ]
    return body, goals


def _workflows(out: str) -> tuple[list[str], list[str]]:
    from benchmarks.workflows import _print

    data = json.loads(out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _print(data)
    body = printed.getvalue().rstrip().splitlines()
    goals: list[str] = []
    steps = data.get("steps", {})
    ratio = steps.get("vs_dbos", {}).get("3")
    if ratio:
        goals.append(f"- {_mark(ratio <= 0.25)}: a 3-step workflow {ratio:.2f}x DBOS Transact on SQLite "
                     "(target <= 0.25x, issue 14)")
    if "step_vs_plain" in steps:
        r = steps["step_vs_plain"]
        goals.append(f"- {_mark(r <= 1.3)}: a step costs {r:.2f}x a plain one-entry action commit "
                     "(target <= 1.3x, issue 14)")
    for where, v in data.get("wake", {}).items():
        goals.append(f"- {_mark(v['p50_ms'] < 5)}: wake p50 ({where.replace('_', ' ')}) "
                     f"{v['p50_ms']:.1f} ms (target < 5 ms, issue 14)")
    return [line.replace("\n", " ") for line in body], goals


def _serve(out: str) -> tuple[list[str], list[str]]:
    from benchmarks.serve import report

    data = json.loads(out)
    body = report(data).splitlines()
    goals: list[str] = []
    by_workers = {line["workers"]: line for line in data["summary"]}
    if 1 in by_workers:
        r = by_workers[1]["rps_ratio"]
        goals.append(f"- {_mark(r >= 1 / 1.2)}: 1 worker, durable-heap serve {r:.2f}x FastAPI + sqlite3 "
                     "in requests/s (target: within 1.2x, issue 15)")
    top = max(by_workers)
    if top > 1 and 1 in by_workers:
        one, many = by_workers[1]["durable_heap"]["rps"], by_workers[top]["durable_heap"]["rps"]
        goals.append(f"- {_mark(many > 1.2 * one)}: throughput grows with workers: {top} workers "
                     f"{many / one:.2f}x one (target: grows, issue 15)")
    return body, goals


SECTIONS: dict[str, Section] = {
    "threads": Section(
        "Threads committing at once: group commit, on this disk and a simulated 2 ms fsync "
        "(issue 18, part 1)",
        "benchmarks.threads", ("--threads", "1,8", "--delays", "0,2", "--rounds", "3", "--json", "-"),
        ("--quick", "--json", "-"), _threads, json_output=True),
    "inline": Section(
        "Small values stored inline: 100,000 entries shaped like {\"i\": i, \"tags\": [\"a\", \"b\"]} "
        "(issue 18, part 2)",
        "benchmarks.inline", ("--size", "100000", "--rounds", "2", "--commits", "300", "--json"),
        ("--quick", "--json"), _inline, json_output=True),
    "tail": Section(
        "The one-entry commit and its tail, against raw ZODB with a full cache (issue 18, part 3)",
        "benchmarks.tail", ("--sizes", "100000,1000000", "--commits", "1000"),
        ("--sizes", "2000", "--commits", "20"), _text),
    "zeo_loads": Section(
        "Over ZEO: records loaded and messages per commit (issue 18, part 3)",
        "benchmarks.zeo_loads", ("--size", "100000", "--commits", "300"),
        ("--size", "2000", "--commits", "20"), _zeo_loads),
    "cold": Section(
        "Cold start (issue 18, part 4)",
        "benchmarks.cold", ("--rounds", "15", "--size", "100000"), ("--rounds", "1", "--size", "1000"),
        _text),
    "workflows": Section(
        "Durable execution: workflow steps against DBOS Transact, and wakes (issue 14)",
        "benchmarks.workflows", ("--only", "steps", "--only", "wake", "--json"),
        ("--quick", "--only", "steps", "--json"), _workflows, json_output=True),
    "serve": Section(
        "durable-heap serve against FastAPI + sqlite3, 1 and 4 workers (issue 15)",
        "benchmarks.serve", ("--workers", "1,4", "--rounds", "2", "--seconds", "8", "--json"),
        ("--quick", "--client", "httpx", "--requests", "60", "--json"), _serve, json_output=True),
}


def run_section(name: str, quick: bool) -> dict[str, Any]:
    """Run one section's module; its lines, target lines, output and seconds taken."""
    section = SECTIONS[name]
    argv = [sys.executable, "-m", section.module, *(section.quick if quick else section.full)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    seconds = time.perf_counter() - t0
    command = "python -m " + " ".join([section.module, *(section.quick if quick else section.full)])
    result: dict[str, Any] = {"command": command, "seconds": seconds, "returncode": out.returncode}
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        result.update(lines=[f"The section failed (exit {out.returncode}):", "", "```", tail, "```"],
                      goals=[f"- NOT met: the {name} section did not run to its end"], output=None)
        return result
    lines, goals = section.render(out.stdout)
    kept: Any = out.stdout
    if section.json_output:
        with contextlib.suppress(ValueError):
            kept = json.loads(out.stdout.strip().splitlines()[-1] if name == "threads" else out.stdout)
    result.update(lines=lines, goals=goals, output=kept)
    return result


def report_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every section run, in `SECTIONS` order: title, command, its lines, its targets."""
    out: list[str] = []
    for name, section in SECTIONS.items():
        r = results.get(name)
        if r is None:
            continue
        out += [f"### {section.title}", "", f"`{r['command']}` ({r['seconds']:.0f} s)", "", *r["lines"], ""]
        if r["goals"]:
            out += [*r["goals"], ""]
    return out


def goal_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The sections' target lines alone (for the report's list of every target)."""
    return [g for name in SECTIONS if name in results for g in results[name]["goals"]]
