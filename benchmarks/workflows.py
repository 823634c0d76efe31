"""Durable execution: workflows side by side with DBOS Transact on SQLite, wakes, scale, replay.

    python -m benchmarks.workflows               the full run (about 10 minutes)
    python -m benchmarks.workflows --quick       a smoke run of every row (small sizes)
    python -m benchmarks.workflows --only steps|wake|scale|replay|deploy [--json]

- ``steps``: a plain one-entry action commit, and workflows of 0, 1, 3 and 10 steps
  (each step a one-entry action) end to end, median ms; the cost of a step is
  (10-step - 0-step) / 10, as a ratio to the plain commit. DBOS Transact (``pip install
  dbos``, the ``bench`` extra; SQLite system database, as its docs configure it) runs the
  same workflows in its own process; rounds alternate between the systems, and the
  ratio to DBOS is taken round by round.
- ``wake``: resolve -> the waiting workflow has run its next step (its commit returned),
  under a running scheduler: in the same process (a scheduler thread, FileStorage), and
  from another process over ZEO (the scheduler in one process, the resolves in another,
  timed to the scheduler's step commit on the machine's monotonic clock);
  p50, p99, and a plain one-entry commit of the same process for scale (a wake is at least
  two: the resolve's and the step's).
- ``scale``: N waiting workflows and N pending timers (written in bulk): the time to
  open the heap and to call ``run_due()`` with nothing due, against an empty heap; the
  time to fire one due timer among them; the process's RSS; listing the workflows of
  one status (none of them) and reading one by id, against reading every record.
- ``replay``: resuming a workflow with 10, 100 and 1,000 journaled steps (the replay
  of its journal, then one new step).
- ``deploy``: a deploy of a program with N waiting workflows whose function is
  unchanged (skipped by its code hash) and changed (each replayed, read-only).

Figures are medians of a loaded machine's runs: compare ratios within one run. Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEP_COUNTS = (0, 1, 3, 10)


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- steps: one system per process ----------------------------------------------------------


def steps_durable_heap(folder: str, reps: int) -> dict[str, Any]:
    import durable_heap as dh

    heap = dh.open(os.path.join(folder, "steps.fs"))
    with heap.transaction() as s:
        s.box = {}

    @heap.action
    def put(i: int) -> int:
        heap.state.box["k"] = i
        return i

    inner: list[float] = []
    inner_cpu: list[float] = []

    @heap.workflow
    def flow(n: int) -> int:
        for i in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            put(i)
            if i:  # the first step also stores the new workflow's record
                inner.append(time.perf_counter() - t0)
                inner_cpu.append(time.thread_time() - c0)
        return n

    out: dict[str, Any] = {}
    for _ in range(3):
        put(0), flow(1)  # warm up
    # CPU time (this thread's: not the fsync's wait) beside wall time: on a machine
    # whose disk and cores other processes share, the wall times move with them.
    plain, plain_cpu = [], []
    for i in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        put(i)
        plain.append(time.perf_counter() - t0)
        plain_cpu.append(time.thread_time() - c0)
    out["plain"], out["plain_cpu"] = _ms(plain), _ms(plain_cpu)
    for n in STEP_COUNTS:
        times, cpu = [], []
        inner.clear()
        inner_cpu.clear()
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.thread_time()
            flow(n)
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        out[str(n)], out[f"{n}_cpu"] = _ms(times), _ms(cpu)
        if n == STEP_COUNTS[-1]:
            out["in_body"], out["in_body_cpu"] = _ms(inner), _ms(inner_cpu)
    heap.close()
    return out


def steps_dbos(folder: str, reps: int) -> dict[str, Any]:
    import logging

    from dbos import DBOS

    logging.getLogger("dbos").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{folder}/dbos.sqlite"})  # type: ignore[typeddict-unknown-key]

    @DBOS.step()
    def put(i: int) -> int:
        return i

    @DBOS.workflow()
    def flow(n: int) -> int:
        for i in range(n):
            put(i)
        return n

    DBOS.launch()
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t_start}
    for _ in range(3):
        flow(1)
    for n in STEP_COUNTS:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            flow(n)
            times.append(time.perf_counter() - t0)
        out[str(n)] = _ms(times)
    out["rss_mb"] = _rss_mb()
    DBOS.destroy()
    return out


def _child(name: str, *args: Any) -> dict[str, Any]:
    """Run ``name(*args)`` of this module in a fresh process; its JSON result."""
    code = f"import json, benchmarks.workflows as w; print(json.dumps(w.{name}(*{args!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise RuntimeError(f"{name} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def bench_steps(quick: bool) -> dict[str, Any]:
    reps, rounds = (5, 1) if quick else (40, 3)
    try:
        import dbos  # noqa: F401
        have_dbos = True
    except ImportError:
        have_dbos = False
    rows: list[dict[str, Any]] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            ours = _child("steps_durable_heap", folder, reps)
        theirs = None
        if have_dbos:
            with tempfile.TemporaryDirectory() as folder:
                theirs = _child("steps_dbos", folder, reps)
        rows.append({"durable_heap": ours, "dbos": theirs})
    out: dict[str, Any] = {"rounds": rows}
    med = {k: statistics.median(r["durable_heap"][k] for r in rows) for k in rows[0]["durable_heap"]}
    out["durable_heap"] = med
    out["step_ms"] = (med["10"] - med["0"]) / 10
    out["step_vs_plain"] = out["step_ms"] / med["plain"]
    # A workflow with steps ends in a transaction of its own (one without: in its only
    # one), so (10 - 0) / 10 charges the steps a tenth of it; (10 - 1) / 9 does not.
    out["step_marginal_ms"] = (med["10"] - med["1"]) / 9
    out["step_marginal_vs_plain"] = out["step_marginal_ms"] / med["plain"]
    if "in_body" in med:  # steps 2-10 timed in the body, each one call of the action
        out["step_in_body_vs_plain"] = med["in_body"] / med["plain"]
    if "plain_cpu" in med:  # the same in CPU time
        out["cpu"] = {
            "step_vs_plain": (med["10_cpu"] - med["0_cpu"]) / 10 / med["plain_cpu"],
            "step_marginal_vs_plain": (med["10_cpu"] - med["1_cpu"]) / 9 / med["plain_cpu"],
            "step_in_body_vs_plain": med["in_body_cpu"] / med["plain_cpu"],
        }
    if have_dbos:
        keys = rows[0]["dbos"]
        out["dbos"] = {k: statistics.median(r["dbos"][k] for r in rows) for k in keys}
        out["vs_dbos"] = {  # round by round: the two systems ran one after the other
            str(n): statistics.median(r["durable_heap"][str(n)] / r["dbos"][str(n)] for r in rows)
            for n in STEP_COUNTS}
    return out


# --- wake latency ----------------------------------------------------------------------------


def bench_wake(quick: bool) -> dict[str, Any]:
    import durable_heap as dh

    n = 20 if quick else 200
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        heap = dh.open(os.path.join(folder, "wake.fs"))
        with heap.transaction() as s:
            s.done = {}
        seen = [threading.Event() for _ in range(n)]
        committed = [0.0] * n

        @heap.action
        def mark(i: int) -> None:
            heap.state.done[i] = True

            def note(ok: bool) -> None:  # the step's commit returned (in the scheduler's thread)
                committed[i] = time.perf_counter()
                seen[i].set()
            heap.transaction_manager.get().addAfterCommitHook(note)

        @heap.action
        def put(i: int) -> None:
            heap.state.done[-1] = i

        @heap.workflow
        def waits(i: int) -> None:
            dh.promise(f"p{i}").wait()
            mark(i)

        handles = [waits(i) for i in range(n)]
        plain = []
        for i in range(n):  # the floor: a wake is two commits (the resolve's and the step's)
            t0 = time.perf_counter()
            put(i)
            plain.append(time.perf_counter() - t0)
        stop = threading.Event()
        t = threading.Thread(target=heap.run_scheduler, kwargs={"stop": stop}, daemon=True)
        t.start()
        time.sleep(0.05)
        lat, after = [], []
        for i in range(n):
            time.sleep(0.002)  # the scheduler is asleep again
            t0 = time.perf_counter()
            dh.resolve(f"p{i}", i)
            t1 = time.perf_counter()
            seen[i].wait(10)
            lat.append(committed[i] - t0)
            after.append(committed[i] - t1)
        stop.set()
        t.join(10)
        assert all(h.status == "done" for h in handles)
        heap.close()
        out["same_process_filestorage"] = {"p50_ms": _ms(lat), "p99_ms": _pct(lat, 0.99), "n": n,
                                           "after_resolve_p50_ms": _ms(after),
                                           "plain_commit_ms": _ms(plain)}
        out["over_zeo"] = _wake_zeo(folder, n)
    return out


_ZEO_APP = """
import durable_heap as dh, os, sys, time
heap = dh.open(os.environ["BENCH_TARGET"])

@heap.action
def mark(i):
    heap.state.done[i] = True
    if os.environ.get("BENCH_REPORT"):  # the scheduler: the step's commit returned, when
        def note(ok):
            print(i, time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
        heap.transaction_manager.get().addAfterCommitHook(note)

@heap.workflow
def waits(i):
    dh.promise(f"p{i}").wait()
    mark(i)
"""

#: Seconds between one wake's step and the next resolve: the workflow's last transaction
#: (its end) is done and the scheduler asleep again, as in process.
_ZEO_GAP = 0.01


def _wake_zeo(folder: str, n: int) -> dict[str, Any]:
    """Resolves in one process, the scheduler in another, the server in a third.

    Timed as in process: from the resolve's call to the scheduler's step commit
    returning (the scheduler prints it, on CLOCK_MONOTONIC, which every process of the
    machine shares). The resolver waits for that line on a pipe: it sends nothing to
    the server meanwhile (polling the heap would ask the server at every look, under
    server_sync, and charge the wake for the probe's own round trips and CPU). At the
    end the resolver checks that it sees every step's change.
    """
    from durable_heap.testing import ZeoServer, subprocess_env

    Path(folder, "zapp.py").write_text(_ZEO_APP)
    with ZeoServer(Path(folder) / "zeo.fs") as server:
        env = subprocess_env({"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "BENCH_TARGET": server.url})
        setup = (f"from zapp import *\nwith heap.transaction() as s:\n    s.done = {{}}\n"
                 f"[waits(i) for i in range({n})]\n")
        subprocess.run([sys.executable, "-c", setup], cwd=folder, env=env, check=True, timeout=300)
        sched = subprocess.Popen([sys.executable, "-c", "from zapp import *\nheap.run_scheduler()"],
                                 cwd=folder, env={**env, "BENCH_REPORT": "1"}, stdout=subprocess.PIPE,
                                 text=True)
        probe_src = textwrap.dedent(f"""
            import json, sys, time
            import durable_heap as dh
            from zapp import *
            clock = lambda: time.clock_gettime(time.CLOCK_MONOTONIC)
            plain = []
            for i in range({n}):
                t0 = time.perf_counter()
                mark(-1)
                plain.append(time.perf_counter() - t0)
            print(json.dumps(plain), flush=True)
            for line in sys.stdin:  # "resolve i"
                i = int(line.split()[1])
                t0 = clock()
                dh.resolve(f"p{{i}}", i)
                print(t0, clock(), flush=True)
            missing = [i for i in range({n}) if not heap.state.done.get(i)]
            print(json.dumps(missing), flush=True)
        """)
        probe = subprocess.Popen([sys.executable, "-c", probe_src], cwd=folder, env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert probe.stdin is not None and probe.stdout is not None and sched.stdout is not None
        try:
            plain = json.loads(probe.stdout.readline())
            time.sleep(0.5)
            lat, after = [], []
            for i in range(n):
                time.sleep(_ZEO_GAP)
                probe.stdin.write(f"resolve {i}\n")
                probe.stdin.flush()
                t0, t1 = map(float, probe.stdout.readline().split())
                j, committed = sched.stdout.readline().split()
                assert int(j) == i, (j, i)
                lat.append(float(committed) - t0)
                after.append(float(committed) - t1)
            probe.stdin.close()
            missing = json.loads(probe.stdout.readline())
            assert not missing, f"the resolver does not see the steps of {missing}"
            probe.wait(60)
        finally:
            probe.kill()
            sched.terminate()
            sched.wait(30)
    return {"p50_ms": _ms(lat), "p99_ms": _pct(lat, 0.99), "n": n, "after_resolve_p50_ms": _ms(after),
            "plain_commit_ms": _ms(plain)}


# --- scale: many waiting workflows and timers ----------------------------------------------------


def scale_child(path: str, n: int, build: bool) -> dict[str, Any]:
    """In a fresh process: (build N waiting workflows and N timers, then) open and run_due."""
    import durable_heap as dh
    from durable_heap import _workflows as w

    out: dict[str, Any] = {}
    if build and n:
        heap = dh.open(path)
        now = time.time()
        far = now + 10 * 365 * 86400
        for start in range(0, n, 10_000):
            with heap.transaction():
                conn = heap.connection
                w._mark_journal_format(conn)  # (journal entries as tuples: heap format 4)
                wfs = w._tree(conn, w.WORKFLOWS_KEY)
                for i in range(start, min(n, start + 10_000)):
                    wid = f"wf{i:07d}"
                    rec = w.WorkflowRecord(wid, ("bench", "flow"), (i,), {}, now, w.DEFAULT_RETENTION)
                    rec.journal[0] = w.JournalEntry("sleep", "", far, at=now).stored()
                    rec.length, rec.status, rec.waiting = 1, "waiting", ("sleep", far)
                    rec.timer = w._add_timer(conn, far + i, w.TimerEntry("run", wid, created=now))
                    wfs[wid] = rec
                    w.reindex(conn, rec)
                    w._add_timer(conn, far + i, w.TimerEntry("call", ("bench", "tick"), (i,), created=now))
        heap.close()
    t0 = time.perf_counter()
    heap = dh.open(path)
    out["open_ms"] = (time.perf_counter() - t0) * 1e3
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        heap.run_due()
        samples.append(time.perf_counter() - t0)
    out["run_due_idle_ms"] = _ms(samples)
    out["rss_mb"] = _rss_mb()  # before the listing below reads every record, on purpose
    if n:  # listing: by status (the index) and by id, against reading every record (before it)
        t0 = time.perf_counter()
        assert heap.workflows(status="failed") == []
        out["list_status_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        assert heap.workflow_by_id(f"wf{n // 2:07d}").info["status"] == "waiting"
        out["by_id_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        with heap.transaction():
            wfs = w._peek(heap.connection, w.WORKFLOWS_KEY)
            assert not [r for r in wfs.values() if r.status == "failed"]
        out["scan_all_ms"] = (time.perf_counter() - t0) * 1e3

    tick = heap.action(_tick)
    fire = []
    for _ in range(10):
        tick.invoke_in(-1)
        t0 = time.perf_counter()
        heap.run_due()
        fire.append(time.perf_counter() - t0)
    out["fire_one_ms"] = _ms(fire)
    out["timers"] = len(w._peek(heap.connection, w.TIMERS_KEY) or ())
    heap.close()
    return out


def _tick() -> None:
    """The action of the timers fired by `scale_child` (module level: found by name)."""


def bench_scale(quick: bool) -> dict[str, Any]:
    n = 2_000 if quick else 100_000
    out: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory() as folder:
        empty = os.path.join(folder, "empty.fs")
        full = os.path.join(folder, "full.fs")
        _child("scale_child", empty, 0, True)
        out["empty"] = _child("scale_child", empty, 0, False)
        _child("scale_child", full, n, True)
        out["full"] = _child("scale_child", full, n, False)
    for k in ("open_ms", "run_due_idle_ms", "fire_one_ms"):
        out[f"{k}_ratio"] = out["full"][k] / max(out["empty"][k], 1e-6)
    return out


# --- replay cost --------------------------------------------------------------------------------


def bench_replay(quick: bool) -> dict[str, Any]:
    import durable_heap as dh
    from durable_heap.testing import Clock

    out: dict[str, Any] = {}
    sizes = (10, 100) if quick else (10, 100, 1000)
    with tempfile.TemporaryDirectory() as folder:
        clock = Clock()
        heap = dh.open(os.path.join(folder, "replay.fs"), clock=clock)
        with heap.transaction() as s:
            s.box = {}

        @heap.action
        def put(i: int) -> None:
            heap.state.box["k"] = i

        @heap.workflow
        def long(n: int) -> int:
            for i in range(n):
                put(i)
            dh.sleep(10)
            put(-1)
            return n

        for n in sizes:
            times = []
            for _ in range(3):
                long(n)
                clock.advance(10)
                t0 = time.perf_counter()
                heap.run_due()
                times.append(time.perf_counter() - t0)
            out[str(n)] = _ms(times)
        heap.close()
    return out


# --- deploy with many waiting workflows ------------------------------------------------------------

_PROGRAM = """
import durable_heap as dh
from durable_heap import state

def note(x):
    state.n = x

@dh.workflow
def flow(i):
    note(i)
    dh.sleep(10 ** 9)
    return i
"""


def deploy_child(folder: str, n: int) -> dict[str, Any]:
    import durable_heap as dh
    from durable_heap import _workflows as w

    app = Path(folder, "bench_app.py")
    app.write_text(_PROGRAM)
    heap = dh.open(os.path.join(folder, "deploy.fs"))
    prog = heap.load(app)
    prog.call("flow", 0)  # one real run: its record has the function's code hash
    with heap.transaction():
        conn = heap.connection
        wfs = w._tree(conn, w.WORKFLOWS_KEY)
        model = next(iter(wfs.values()))
        code, entries = model.code, w._read_journal(model.journal)
    now = time.time()
    for start in range(1, n, 10_000):
        with heap.transaction():
            conn = heap.connection
            wfs = w._tree(conn, w.WORKFLOWS_KEY)
            for i in range(start, min(n, start + 10_000)):
                wid = f"wf{i:07d}"
                rec = w.WorkflowRecord(wid, ("bench_app", "flow"), (i,), {}, now, w.DEFAULT_RETENTION)
                for k, e in enumerate(entries):  # as flow(i) journals them
                    detail = f"note({i})" if e.kind == "step" else e.detail
                    rec.journal[k] = w.JournalEntry(e.kind, e.name, detail, e.value, at=now).stored()
                rec.length, rec.status, rec.code = len(entries), "waiting", code
                rec.waiting = ("sleep", entries[-1].detail)
                wfs[wid] = rec
                w.reindex(conn, rec)  # as a real wait does
    out: dict[str, Any] = {"n": n}
    app.write_text(_PROGRAM + "\ndef unrelated():\n    pass\n")  # the workflow's code is unchanged
    t0 = time.perf_counter()
    heap.deploy(app)
    out["unchanged_s"] = time.perf_counter() - t0
    app.write_text(_PROGRAM.replace("    return i", "    note(-i)\n    return i"))  # changed after the wait
    t0 = time.perf_counter()
    heap.deploy(app)
    out["changed_s"] = time.perf_counter() - t0
    heap.close()
    return out


def bench_deploy(quick: bool) -> dict[str, Any]:
    n = 2_000 if quick else 100_000
    with tempfile.TemporaryDirectory() as folder:
        return _child("deploy_child", folder, n)


BENCHES = {"steps": bench_steps, "wake": bench_wake, "scale": bench_scale, "replay": bench_replay,
           "deploy": bench_deploy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workflows", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--only", choices=sorted(BENCHES), action="append", help="one section (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    results = {name: BENCHES[name](args.quick) for name in (args.only or list(BENCHES))}
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    _print(results)
    return 0


def _print(r: dict[str, Any]) -> None:
    if "steps" in r:
        s = r["steps"]
        d = s["durable_heap"]
        print(f"plain one-entry action commit: {d['plain']:.2f} ms; a step: {s['step_ms']:.2f} ms "
              f"({s['step_vs_plain']:.2f}x) as (10-step - 0-step) / 10; {s['step_marginal_ms']:.2f} ms "
              f"({s['step_marginal_vs_plain']:.2f}x) as (10-step - 1-step) / 9", end="")
        if "in_body" in d:
            print(f"; {d['in_body']:.2f} ms ({s['step_in_body_vs_plain']:.2f}x) timed in the body "
                  "(steps 2-10)")
        else:
            print()
        if "cpu" in s:
            c = s["cpu"]
            print(f"  in CPU time (plain commit {d['plain_cpu']:.2f} ms): a step {c['step_vs_plain']:.2f}x, "
                  f"{c['step_marginal_vs_plain']:.2f}x, {c['step_in_body_vs_plain']:.2f}x in the body")
        print("| steps | durable_heap | DBOS (SQLite) | ratio |")
        print("|---|---|---|---|")
        for n in STEP_COUNTS:
            theirs = s.get("dbos", {}).get(str(n))
            ratio = s.get("vs_dbos", {}).get(str(n))
            print(f"| {n} | {d[str(n)]:.2f} ms | {f'{theirs:.2f} ms' if theirs else '-'} | "
                  f"{f'{ratio:.2f}x' if ratio else '-'} |")
        if "dbos" in s:
            print(f"DBOS start-up {s['dbos']['startup_s']:.2f} s, RSS {s['dbos']['rss_mb']:.0f} MB")
        else:
            print("DBOS: not installed, not measured (pip install -e '.[bench]' for the side by side)")
    if "wake" in r:
        for k, v in r["wake"].items():
            print(f"wake ({k}): p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms over {v['n']} "
                  f"(after resolve returned: p50 {v['after_resolve_p50_ms']:.2f} ms; a plain one-entry "
                  f"commit {v['plain_commit_ms']:.2f} ms: the wake is "
                  f"{v['p50_ms'] / v['plain_commit_ms']:.1f} of them)")
    if "scale" in r:
        s = r["scale"]
        print(f"scale, {s['n']:,} waiting workflows + {s['n']:,} timers vs an empty heap:")
        for k in ("open_ms", "run_due_idle_ms", "fire_one_ms"):
            print(f"  {k}: {s['full'][k]:.2f} vs {s['empty'][k]:.2f} ({s[k + '_ratio']:.2f}x)")
        print(f"  RSS {s['full']['rss_mb']:.0f} MB vs {s['empty']['rss_mb']:.0f} MB")
        f = s["full"]
        print(f"  workflows(status='failed'): {f['list_status_ms']:.2f} ms; workflow_by_id(...).info: "
              f"{f['by_id_ms']:.2f} ms; reading every record (the listing before its index): "
              f"{f['scan_all_ms']:.0f} ms")
    if "replay" in r:
        shown = ", ".join(f"{n}: {v:.1f} ms" for n, v in r["replay"].items())
        print(f"resume after N journaled steps: {shown}")
    if "deploy" in r:
        d = r["deploy"]
        print(f"deploy with {d['n']:,} waiting workflows: unchanged function {d['unchanged_s']:.2f} s, "
              f"changed {d['changed_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
