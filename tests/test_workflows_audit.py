"""Issue 14 tried as a new user would (the acceptance audit): what that turned up, kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ZeoServer, cli, write

FLOWS = """
import durable_heap as dh
from durable_heap import state

state.setdefault("log", [])

def a(x):
    state.log.append(["a", x])

def b(x):
    state.log.append(["b", x])

@dh.workflow
def flow(x):
    a(x)
    return dh.promise(f"p:{x}").wait()

@dh.workflow
def changes_state(x):
    state.log.append(x)          # in the body, outside a step: refused
"""


@pytest.mark.slow
def test_the_workflows_listing_shows_failed_and_blocked_ones(tmp_path: Path) -> None:
    """`durable-heap workflows app.py` lists a failed and a blocked workflow with why
    (it raised KeyError on both: the listing's records lacked the error and the reason)."""
    app = write(tmp_path / "app.py", FLOWS)
    failed, status = cli("call", str(app), "changes_state", "1", cwd=tmp_path).stdout.split()
    assert status == "failed"
    waiting, status = cli("call", str(app), "flow", "1", cwd=tmp_path).stdout.split()
    assert status == "waiting"
    r = cli("workflows", str(app), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith(failed))
    assert "failed: durable_heap.WorkflowError: the workflow changes_state changed state.log" in line, line
    app.write_text(app.read_text().replace("    a(x)\n", "    b(x)\n"))
    assert cli("deploy", str(app), cwd=tmp_path).returncode == 1
    assert cli("deploy", str(app), "--force", cwd=tmp_path).returncode == 0
    for args in ((), ("--status", "blocked")):
        r = cli("workflows", str(app), *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        line = next(line for line in r.stdout.splitlines() if line.startswith(waiting))
        assert "blocked" in line and "the journal has 'step a', the new code does 'step b'" in line, line


def test_an_unknown_status_is_a_usage_error_naming_the_statuses(tmp_path: Path) -> None:
    """Not "internal error: ValueError"."""
    from durable_heap._workflows import STATUSES

    app = write(tmp_path / "app.py", FLOWS)
    r = cli("workflows", str(app), "--status", "bogus", cwd=tmp_path)
    assert r.returncode == 2 and "internal error" not in r.stderr, r.stderr
    assert f"invalid choice: 'bogus' (choose from {', '.join(map(repr, STATUSES))})" in r.stderr, r.stderr


TIMED_PROGRAM = """
import durable_heap as dh
from durable_heap import state

state.setdefault("log", [])

def digest():
    state.log.append("digest")

def remind(user):
    state.log.append(f"remind {user}")

weekly = dh.active_heap().action(digest).cron("0 9 * * 1", tz="Europe/Paris")

def remind_later(user):
    return dh.active_heap().action(remind).invoke_in(0.2, user).id

def log():
    return list(state.log)
"""


@pytest.mark.slow
def test_a_programs_timers_as_docs_workflows_md_shows_them(tmp_path: Path) -> None:
    """docs/workflows.md, Timers on actions, "In a program": a cron at the top level, a timer
    from a call, fired by another process that only loaded the program."""
    import time

    app = write(tmp_path / "app.py", TIMED_PROGRAM)
    r = cli("call", str(app), "remind_later", "ann", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("timers", str(app), cwd=tmp_path)
    assert "app.digest 0 9 * * 1 () Europe/Paris" in r.stdout and "app.remind (invoke)" in r.stdout, r.stdout
    time.sleep(0.3)
    assert cli("run-due", str(app), cwd=tmp_path).stdout.strip() == "1"
    assert cli("call", str(app), "log", cwd=tmp_path).stdout.strip() == '["remind ann"]'
    r = cli("timers", str(app), cwd=tmp_path)
    assert "app.remind" not in r.stdout and r.stdout.count("app.digest") == 2, r.stdout  # the cron, once


def _other() -> None:
    import durable_heap as dh

    dh.active_heap().state.other = True


def test_a_result_that_cannot_be_stored_fails_the_workflow_clearly(tmp_path: Path) -> None:
    """A workflow returning a generator: `failed` with an error naming its result, not
    pickle's bare TypeError out of every later `run_due()` (the wake's timer stayed due, and
    each scheduler round raised it again), nor (started outside a transaction) no record at all."""
    import durable_heap as dh
    from durable_heap.testing import Clock

    clock = Clock()
    with dh.open(tmp_path / "r.fs", clock=clock) as heap:
        other = heap.action(_other)

        @heap.workflow
        def after_a_sleep() -> object:
            dh.sleep(1)
            return (i for i in range(3))

        @heap.workflow
        def at_once() -> object:
            return (i for i in range(3))

        h = after_a_sleep()
        assert h.status == "waiting"
        other.invoke_in(2)
        clock.advance(5)
        assert heap.run_due() == 2  # the wake, and the timer due behind it
        assert heap.state.other is True
        for handle in (h, at_once()):
            assert handle.status == "failed"
            error = handle.info["error"]
            assert "NotPersistableError: the result of the workflow " in error, error
            assert "cannot be stored: a generator" in error, error
            with pytest.raises(dh.DurableHeapError, match="the result of the workflow .* cannot be stored"):
                handle.result()
        assert heap.run_due() == 0


def _hold(value: object) -> object:
    return dh_active().state


def dh_active() -> object:
    import durable_heap as dh

    return dh.active_heap()


def test_arguments_values_and_payloads_that_cannot_be_stored_are_refused_at_the_call(tmp_path: Path) -> None:
    """A lambda given to a workflow's start, a resolve, an emit or a timer: a
    NotPersistableError naming what it was given to, at the call, inside a transaction as
    outside one (it was pickle's bare "cannot pickle 'function' object", raised by the
    commit), and nothing stored."""
    import durable_heap as dh

    with dh.open(tmp_path / "a.fs") as heap:
        @heap.workflow
        def flow(x: object) -> object:
            return dh.promise("p").wait()

        hold = heap.action(_hold)
        bad = lambda: 1  # noqa: E731 - what a user passes by mistake
        calls = {
            "the arguments of the workflow test_arguments_values_and_payloads_that_cannot_be_stored"
            "_are_refused_at_the_call.<locals>.flow": lambda: flow({"cb": bad}),
            "the value resolving the promise 'p'": lambda: dh.resolve("p", [bad]),
            "the payload of the event 'topic'": lambda: dh.emit("topic", bad),
            "the arguments of the timer for _hold": lambda: hold.invoke_in(5, bad),
            "the arguments of the cron for _hold": lambda: hold.cron("0 9 * * 1", value=bad),
        }
        for what, call in calls.items():
            for inside in (False, True):
                with pytest.raises(dh.NotPersistableError) as info:
                    if inside:
                        with heap.transaction():
                            call()
                    else:
                        call()
                assert str(info.value).startswith(what), (str(info.value), what)
                assert "a lambda has no name" in str(info.value), str(info.value)
        assert heap.workflows() == [] and heap.timers() == []
        assert dh.resolve("p", 1) is True  # the refused resolve did not resolve it


def _gen() -> object:
    return (i for i in range(3))


def test_a_step_whose_result_cannot_be_stored_fails_its_workflow_naming_the_step(tmp_path: Path) -> None:
    """(It failed with pickle's bare "cannot pickle 'generator' object".) The step's
    changes are not committed."""
    import durable_heap as dh

    with dh.open(tmp_path / "s.fs") as heap:
        gen = heap.action(_gen)

        @heap.workflow
        def flow() -> None:
            gen()

        h = flow()
        assert h.status == "failed"
        error = h.info["error"]
        assert "NotPersistableError: the result of step 1 (_gen()) cannot be stored: a generator" in error, \
            error
        assert h.info["journal"] == [], h.info["journal"]


BAD_RESULT = [True]


def _count_then_maybe_gen() -> object:
    import durable_heap as dh

    dh.active_heap().state.n += 1
    return (i for i in range(3)) if BAD_RESULT[0] else "ok"


def test_a_first_step_whose_commit_failed_runs_again_when_retried(tmp_path: Path) -> None:
    """Exactly once: a workflow started outside a transaction whose first step's commit
    failed (its result did not pickle) kept that step in its journal, so `retry()`
    replayed it as done and the step's effect (`n += 1`, undone with its transaction)
    happened zero times. ZODB takes back an aborted transaction's changes to stored
    records, not to new ones: the record that transaction was creating stayed filled."""
    import durable_heap as dh

    with dh.open(tmp_path / "f.fs") as heap:
        with heap.transaction() as state:
            state.n = 0
        step = heap.action(_count_then_maybe_gen)

        @heap.workflow
        def flow() -> object:
            step()
            return "finished"

        BAD_RESULT[0] = True
        h = flow()
        assert h.status == "failed" and heap.state.n == 0
        assert h.info["journal"] == [], h.info["journal"]
        BAD_RESULT[0] = False
        assert h.retry()
        heap.run_due()
        assert h.result() == "finished"
        assert heap.state.n == 1  # the step ran once, committed once


GLOBALS_IN_BODY = """
import durable_heap as dh

hits = []
count = 0

@dh.workflow
def appends():
    hits.append(1)
    return list(hits)

@dh.workflow
def rebinds():
    global count
    dh.sleep(0.2)
    count = 5
    return count

def report():
    return [hits, count]
"""


@pytest.mark.slow
def test_a_body_that_changes_or_rebinds_a_durable_global_is_refused_naming_it(tmp_path: Path) -> None:
    """Issue 14 point 3 for a program's durable globals: a change named by the global
    (it was `<Dict oid 0x7>['hits']`), and a rebinding (`global count; count = 5`)
    refused too (it was neither saved nor refused: "Not yet" in docs/workflows.md)."""
    import time

    app = write(tmp_path / "app.py", GLOBALS_IN_BODY)
    appended, status = cli("call", str(app), "appends", cwd=tmp_path).stdout.split()
    assert status == "failed"
    rebound, status = cli("call", str(app), "rebinds", cwd=tmp_path).stdout.split()
    assert status == "waiting"
    time.sleep(0.3)
    assert cli("run-due", str(app), cwd=tmp_path).stdout.strip() == "1"
    r = cli("workflows", str(app), "--status", "failed", cwd=tmp_path)
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    outside = "in its body, outside a step"
    assert f"the workflow appends changed the durable global hits {outside}" in lines[appended]
    assert f"the workflow rebinds rebound the durable global count {outside}" in lines[rebound]
    assert cli("call", str(app), "report", cwd=tmp_path).stdout.strip() == "[[], 0]"


_TICKS: list[float] = []


def _tick() -> None:
    import durable_heap as dh

    _TICKS.append(dh.active_heap().clock())


def test_cron_daylight_saving_and_a_late_tick_follow_the_documented_rules(tmp_path: Path) -> None:
    """docs/workflows.md, Cron: a tick in the hour skipped in spring runs once, when the
    clocks jump; one in the hour repeated in autumn once, at its first occurrence; a tick
    run late (within the grace) does not move the next one (no drift)."""
    import datetime

    import durable_heap as dh
    from durable_heap.testing import Clock

    utc = datetime.timezone.utc

    def ticks_between(start: datetime.datetime, days: int) -> list[datetime.datetime]:
        _TICKS.clear()
        clock = Clock(start.timestamp())
        with dh.open(tmp_path / f"dst-{start.month}.fs", clock=clock) as heap:
            heap.action(_tick).cron("30 2 * * *", tz="Europe/Paris")
            for _ in range(days * 24 * 4):  # the scheduler runs every 15 minutes
                clock.advance(900)
                heap.run_due()
        return [datetime.datetime.fromtimestamp(t, utc) for t in _TICKS]

    # 29 March 2026: 02:00 -> 03:00 in Paris. 02:30 does not exist: it runs at 03:00 (01:00 UTC)
    spring = ticks_between(datetime.datetime(2026, 3, 28, 12, 0, tzinfo=utc), 3)
    assert [t.isoformat() for t in spring] == [
        "2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00", "2026-03-31T00:30:00+00:00"]
    # 25 October 2026: 03:00 -> 02:00. 02:30 happens twice: it runs at the first (00:30 UTC)
    autumn = ticks_between(datetime.datetime(2026, 10, 24, 12, 0, tzinfo=utc), 3)
    assert [t.isoformat() for t in autumn] == [
        "2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00", "2026-10-27T01:30:00+00:00"]

    _TICKS.clear()
    clock = Clock(datetime.datetime(2026, 3, 2, 8, 59, 30, tzinfo=utc).timestamp())
    with dh.open(tmp_path / "late.fs", clock=clock) as heap:
        t = heap.action(_tick).cron("* * * * *")  # every minute: first at 09:00:00
        clock.advance(90)  # 09:01:00: the 09:00 tick is 60 s late, on time still (the grace)
        # From the schedule, the next tick is 09:01:00, due now too: two ticks, the next at
        # 09:02. (From now it would be 09:02: the 09:01 tick lost to the late run.)
        assert heap.run_due() == 2 and len(_TICKS) == 2
        (pending,) = heap.timers()
        assert pending.due == t.due + datetime.timedelta(minutes=2)


ADOPTED = """
import durable_heap as dh
from durable_heap import state

state.setdefault("log", [])

def mark(x):
    state.log.append(x)

@dh.workflow
def flow(x):
    v = dh.promise(f"p:{x}").wait()
    mark("v1:" + v)
    return v

def go(x, v):
    return dh.resolve(f"p:{x}", v)

def show():
    return list(state.log)
"""


@pytest.mark.slow
def test_a_running_worker_adopts_a_new_deploy(tmp_path: Path, zeo_server: ZeoServer) -> None:
    """docs/workflows.md: `durable-heap worker app.py` loads each new version deployed
    while it runs: a workflow waiting under version 1 finishes under version 2."""
    import signal
    import subprocess
    import sys
    import time

    from durable_heap.testing import subprocess_env

    from .conftest import ROOT

    app = write(tmp_path / "app.py", ADOPTED)
    storage = ["--storage", zeo_server.url]
    assert cli("deploy", str(app), *storage, cwd=tmp_path).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "durable_heap", "worker", str(app), *storage],
                              cwd=tmp_path, env=subprocess_env({"PYTHONPATH": str(ROOT)}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wid, status = cli("call", str(app), "flow", "1", *storage, cwd=tmp_path).stdout.split()
        assert status == "waiting"
        app.write_text(app.read_text().replace('"v1:"', '"v2:"'))
        assert cli("deploy", str(app), *storage, cwd=tmp_path).returncode == 0
        time.sleep(2.5)  # the worker looks for a new deploy at each poll (1 s)
        r = cli("call", str(app), "go", "1", "a", "--no-deploy", *storage, cwd=tmp_path)
        assert r.stdout.strip() == "true", r.stderr
        deadline = time.time() + 30
        while time.time() < deadline:
            r = cli("call", str(app), "show", "--no-deploy", *storage, cwd=tmp_path)
            if r.stdout.strip() != "[]":
                break
            time.sleep(0.3)
        assert r.stdout.strip() == '["v2:a"]', (r.stdout, r.stderr)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err


CONFLICTED = """
import os, threading, time
import durable_heap as dh

SKEW = float(os.environ.get("SKEW", "0"))  # a later process: as if its lease ran out
heap = dh.open(os.environ["TARGET"], clock=lambda: time.time() + SKEW)
ATTEMPTS = []

def conflicting():
    heap.state.n += 1
    if not ATTEMPTS:  # the first attempt: another client commits to n first, a conflict
        ATTEMPTS.append(1)
        other = dh.open(os.environ["TARGET"])
        def bump():
            with other.transaction() as s:
                s.n += 100
        t = threading.Thread(target=bump)
        t.start()
        t.join()
    return heap.state.n

def dies():
    if os.environ.get("DIE"):
        os._exit(0)  # the runner dies between two steps
    heap.state.n += 1000

step, last = heap.action(conflicting), heap.action(dies)

@heap.workflow
def flow():
    step()
    last()
    return "finished"
"""


@pytest.mark.slow
def test_a_runner_that_dies_after_a_retried_first_transaction_is_taken_over(
        tmp_path: Path, zeo_server: ZeoServer) -> None:
    """Issue 14 point 6 after a conflict: a workflow started outside a transaction whose
    first transaction (its first step) conflicted and was retried, and whose runner then
    died, is taken over after its lease. The retried attempt stored the record the first
    attempt had filled: marked as listed "running" already, it was left out of the status
    index's running set, where takeovers look, so it stayed running for ever."""
    import subprocess
    import sys

    from durable_heap.testing import subprocess_env

    from .conftest import ROOT

    (tmp_path / "conflicted.py").write_text(CONFLICTED)

    def script(source: str, **env: str) -> str:
        r = subprocess.run([sys.executable, "-c", "from conflicted import *\n" + source], cwd=tmp_path,
                           env=subprocess_env({"PYTHONPATH": f"{tmp_path}:{ROOT}", "TARGET": zeo_server.url,
                                               **env}), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    script("with heap.transaction() as s:\n    s.n = 0\nflow.start(workflow_id='w')\n", DIE="1")
    look = "h = heap.workflow_by_id('w')\nprint(h.status, h.info['stuck'], heap.run_due(), h.status)\n"
    assert script(look + "print(h.result(timeout=10), heap.state.n)", SKEW="120").split() == [
        "running", "True", "1", "done",  # stuck, then taken over
        "finished", "1101"]  # each step once (the conflicted first attempt undone)


def test_resolve_and_emit_refuse_a_name_that_is_not_a_str(tmp_path: Path) -> None:
    """As `promise(123)` does (they raised the promises tree's bare "'<' not supported
    between instances of 'str' and 'int'" once it held a str-named promise; `on` the same
    once a str topic had subscribers; `emit` nothing)."""
    import durable_heap as dh

    with dh.open(tmp_path / "n.fs") as heap:
        assert dh.resolve("a", 1) is True
        with pytest.raises(dh.WorkflowError, match="a promise is named by a non-empty str, not 123"):
            dh.resolve(123, 1)
        with pytest.raises(dh.WorkflowError, match="an event's topic is a non-empty str, not 5"):
            dh.emit(5, 1)
        with pytest.raises(dh.WorkflowError, match="an event's topic is a non-empty str, not 5"):
            heap.on(5)


def _one() -> int:
    return 1


def test_a_heaps_retention_drops_finished_journals_after_it(tmp_path: Path) -> None:
    """docs/workflows.md, Growth is bounded: `dh.open(target, retention=seconds)` (the
    per-workflow `retention=` had a test, the heap's none)."""
    import durable_heap as dh
    from durable_heap.testing import Clock

    clock = Clock()
    with dh.open(tmp_path / "ret.fs", clock=clock, retention=60) as heap:
        one = heap.action(_one)

        @heap.workflow
        def flow() -> int:
            return int(one())

        h = flow()
        assert len(h.info["journal"]) == 1
        clock.advance(59)
        heap.run_due()
        assert len(h.info["journal"]) == 1  # within its retention
        clock.advance(2)
        assert heap.run_due() == 1
        assert h.info["journal"] == [] and h.info["steps"] == 1 and h.result() == 1


def test_an_async_workflow_whose_start_transaction_is_retried_stays_in_the_running_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``async def`` workflow started inside a running loop is first stored with a start
    timer, in a transaction of its own (`_in_task`). When that transaction conflicted and
    was retried, the retry stored the record the first attempt had filled: marked as
    listed "running" already, it was left out of the status index's running set, where
    takeovers look, so a runner that died before the task ran left it running for ever
    (the same ZODB trap as `_pristine`'s: an abort takes back changes to stored records,
    not to new ones)."""
    import asyncio

    from ZODB.POSException import ConflictError

    import durable_heap as dh
    from durable_heap import _workflows

    heap = dh.open(tmp_path / "a.fs")

    @heap.workflow
    def first() -> int:
        return 0

    first()  # the trees and the status index exist

    real_reindex = _workflows.reindex
    calls: list[int] = []

    def reindex(conn: object, rec: object) -> None:
        real_reindex(conn, rec)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 1:  # what a commit that met another process's change raises
            raise ConflictError("the start transaction met a conflicting commit")

    monkeypatch.setattr(_workflows, "reindex", reindex)

    @heap.workflow
    async def flow() -> int:
        await dh.sleep(5)
        return 1

    async def main() -> list[str]:
        h = flow()
        return [w.id for w in heap.workflows(status="running")] + [h.id]  # before its task ran

    *running, wid = asyncio.run(main())
    assert len(calls) >= 2  # the start transaction was retried
    assert running == [wid]
    heap.close()


def test_a_timer_for_a_closure_is_refused_naming_the_method_called(tmp_path: Path) -> None:
    """`invoke_in` said "invoke_at" in its error (it was built on it)."""
    import durable_heap as dh

    with dh.open(tmp_path / "t.fs") as heap:
        def make() -> object:
            @heap.action
            def inner() -> None:
                pass
            return inner

        inner = make()
        with pytest.raises(dh.WorkflowError, match=r"inner\.invoke_in needs a function defined at the top"):
            inner.invoke_in(5)  # type: ignore[attr-defined]
        with pytest.raises(dh.WorkflowError, match=r"inner\.invoke_at needs a function defined at the top"):
            inner.invoke_at(5.0)  # type: ignore[attr-defined]
        assert heap.timers() == []
