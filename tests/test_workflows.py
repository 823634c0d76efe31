"""Durable execution (`durable_heap._workflows`): real FileStorage, real subprocesses, real ZEO."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import persistent
import pytest

import durable_heap as dh
from durable_heap.testing import Clock, ZeoServer, subprocess_env

from .conftest import ROOT, cli, write

START = datetime.datetime(2026, 3, 2, 8, 0, tzinfo=datetime.timezone.utc).timestamp()  # a Monday


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def wheap(tmp_path: Path, clock: Clock) -> Iterator[dh.Heap]:
    heap = dh.open(tmp_path / "wf.fs", clock=clock)
    with heap.transaction() as state:
        state.counts = {}
        state.log = []
    try:
        yield heap
    finally:
        heap.close()


def _counter(heap: dh.Heap) -> Any:
    @heap.action
    def bump(key: str, by: int = 1) -> int:
        counts = heap.state.counts
        counts[key] = counts.get(key, 0) + by
        return int(counts[key])
    return bump


# --- (a) journal, steps, replay ---------------------------------------------------------------


def test_steps_run_once_and_a_sleep_resumes_after_its_deadline(wheap: dh.Heap, clock: Clock) -> None:
    bump = _counter(wheap)

    @wheap.workflow
    def twice(key: str) -> tuple[int, int]:
        a = bump(key)
        dh.sleep(3600)
        b = bump(key, 10)
        return a, b

    h = twice("x")
    assert h.status == "waiting"
    assert h.waiting_on == {"sleep": datetime.datetime.fromtimestamp(START + 3600, datetime.timezone.utc)}
    assert wheap.run_due() == 0  # not before its deadline
    clock.advance(3599)
    assert wheap.run_due() == 0
    assert h.status == "waiting"
    clock.advance(1)
    assert wheap.run_due() == 1
    assert h.status == "done"
    assert h.result() == (1, 11)
    assert wheap.state.counts["x"] == 11  # the first step ran once, not again at the wake
    kinds = [(e["kind"], e["name"]) for e in h.info["journal"]]
    assert [k for k, _ in kinds] == ["step", "sleep", "step"]
    assert kinds[0][1].endswith("bump") and kinds[2][1].endswith("bump")


def test_one_transaction_per_step(wheap: dh.Heap) -> None:
    bump = _counter(wheap)

    @wheap.workflow
    def three() -> None:
        bump("a")
        bump("b")
        bump("c")

    before = len(wheap.db.undoLog(0, 10_000))
    three()
    log = wheap.db.undoLog(0, 10_000)  # newest first
    notes = [t["description"] for t in log[: len(log) - before]]
    steps = [n for n in notes if " step " in n]
    assert len(steps) == 3  # each step, with its journal entry, is one transaction
    assert len(notes) == 4  # and one more records the result


def test_replay_mismatch_raises_nondeterminism_and_blocks(wheap: dh.Heap, clock: Clock) -> None:
    bump = _counter(wheap)
    other = _counter(wheap)
    other.__qualname__ = "other"
    version = {"new": False}

    @wheap.workflow
    def changing() -> str:
        if version["new"]:
            bump.__wrapped__.__qualname__ = "renamed"  # the code now calls another step first
        bump("k")
        dh.sleep(10)
        return "ok"

    h = changing()
    assert h.status == "waiting"
    version["new"] = True
    clock.advance(11)
    wheap.run_due()
    info = h.info
    assert info["status"] == "blocked"
    assert "step 1" in info["reason"] and "renamed" in info["reason"] and "bump" in info["reason"]
    assert wheap.state.counts["k"] == 1  # nothing ran again
    with pytest.raises(dh.WorkflowError, match="blocked"):
        h.result()


def test_a_failed_workflow_can_be_retried_and_run_due_refuses_a_transaction(wheap: dh.Heap) -> None:
    bump = _counter(wheap)
    flaky = {"fail": True}

    @wheap.workflow
    def sometimes() -> int:
        n = bump("retried")
        if flaky["fail"]:
            raise RuntimeError("not yet")
        return n

    h = sometimes()
    assert h.status == "failed"
    flaky["fail"] = False
    assert h.retry() and h.status == "waiting"
    assert wheap.run_due() == 1
    assert h.result() == 1 and wheap.state.counts["retried"] == 1  # its step was not run again
    with pytest.raises(dh.WorkflowError, match="cannot run inside a transaction"), wheap.transaction():
        wheap.run_due()

    @wheap.workflow
    def schedules() -> None:
        wheap.run_due()

    with pytest.raises(dh.WorkflowError, match="cannot run in a workflow's body"):
        schedules().result()


def test_the_body_may_not_change_state(wheap: dh.Heap) -> None:
    @wheap.workflow
    def meddles() -> None:
        wheap.state.counts["x"] = 1

    h = meddles()
    assert h.status == "failed"
    with pytest.raises(dh.WorkflowError, match=r"changed state.counts.* outside a step.*action"):
        h.result()
    assert "x" not in wheap.state.counts


@dataclasses.dataclass
class Settings:
    """A plain object held in a record (the watch saves its in-place changes)."""

    retries: int = 0


class RawCounter(persistent.Persistent):
    """A raw ZODB persistent class (not a durable_heap Object)."""

    def __init__(self) -> None:
        self.n = 0


@pytest.mark.parametrize("where", ["between steps", "after the last step"])
@pytest.mark.parametrize("held", ["state.settings", "state.counts['ann']"])
def test_a_plain_object_changed_in_the_body_is_refused_not_saved_by_the_next_step(
        wheap: dh.Heap, tmp_path: Path, where: str, held: str) -> None:
    """Issue 14 point 3: a plain object cannot refuse a change made outside a
    transaction as durable objects do, and the watch saved it with the next step (or the
    workflow's end), a change every replay would make again. It is refused and dropped."""
    with wheap.transaction() as state:
        state.settings = Settings()
        state.counts["ann"] = Settings()

    def settings() -> Settings:
        return wheap.state.settings if held == "state.settings" else wheap.state.counts["ann"]

    bump = _counter(wheap)

    @wheap.workflow
    def meddles() -> str:
        bump("first")
        if where == "between steps":
            settings().retries += 1
        bump("second")
        if where == "after the last step":
            settings().retries += 1
        return "done"

    h = meddles()
    assert h.status == "failed"
    refused = rf"changed {re.escape(held)} in its body, outside a step.*action"
    with pytest.raises(dh.WorkflowError, match=refused):
        h.result()
    assert settings().retries == 0  # dropped: not saved by the step or the end
    assert wheap.state.counts.get("second") == (None if where == "between steps" else 1)
    wheap.close()
    with dh.open(tmp_path / "wf.fs") as again:
        with again.transaction() as state:
            held_now = state.settings if held == "state.settings" else state.counts["ann"]
            assert held_now.retries == 0


def test_a_transaction_the_body_opens_may_read_but_not_change_state(wheap: dh.Heap) -> None:
    """``with heap.transaction()`` in a body, outside a step, committed its change: one that
    every replay would make again. Reading in one is fine; a change is refused at its commit."""
    @wheap.workflow
    def reads() -> int:
        with wheap.transaction() as state:
            return len(state.counts)

    @wheap.workflow
    def writes() -> None:
        with wheap.transaction() as state:
            state.counts["x"] = 1

    assert reads().result() == 0
    h = writes()
    assert h.status == "failed"
    with pytest.raises(dh.WorkflowError, match=r"changed state.counts in its body, outside a step"):
        h.result()
    assert "x" not in wheap.state.counts


def test_a_raw_persistent_object_changed_in_the_body_fails_the_workflow_saying_why(wheap: dh.Heap) -> None:
    """ZODB refuses it (no transaction); the workflow's error said only
    ``transaction.interfaces.NoTransaction``."""
    with wheap.transaction() as state:
        state.raw = RawCounter()

    @wheap.workflow
    def meddles() -> None:
        wheap.state.raw.n += 1

    h = meddles()
    with pytest.raises(dh.WorkflowError, match=r"changed a persistent object .* in its body, outside a step"):
        h.result()
    assert wheap.state.raw.n == 0


def test_a_plain_change_the_caller_made_before_starting_a_workflow_stays_the_callers(wheap: dh.Heap) -> None:
    """Outside workflows the documented rule holds (concepts.md): a plain object changed
    outside any transaction is saved by the thread's next transaction. A workflow started
    then is not blamed for it."""
    with wheap.transaction() as state:
        state.settings = Settings()

    @wheap.action
    def bump() -> None:
        wheap.state.counts["n"] = 1

    @wheap.workflow
    def clean() -> str:
        bump()
        return "ok"

    wheap.state.settings.retries = 5  # the caller's, outside a transaction
    assert clean().result() == "ok"
    assert wheap.state.settings.retries == 5


def test_a_replay_changes_nothing(wheap: dh.Heap) -> None:
    """A read-only replay (`_workflows.replay`) ran the body in a transaction that it
    committed: a body that changes state on replay had its change kept."""
    from durable_heap import _workflows

    meddle = {"on": False}

    @wheap.workflow
    def flow() -> str:
        with wheap.transaction() as state:  # a read in a transaction of its own: replayed too
            seen = len(state.counts)
        if meddle["on"]:
            wheap.state.counts["replayed"] = 1
        return f"ok {seen}"

    h = flow()
    assert h.result() == "ok 0" == _workflows.replay(wheap, h.id)
    meddle["on"] = True
    with pytest.raises(dh.WorkflowError, match=r"replaying workflow .* changed state.counts outside a step"):
        _workflows.replay(wheap, h.id)
    assert "replayed" not in wheap.state.counts


def test_a_body_that_catches_its_suspension_goes_no_further_and_waits(
        wheap: dh.Heap, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 point 4: the suspension is a BaseException, which ``except BaseException:``
    (or a bare ``except:``) still catches. Such a body went on past its wait: it ran its
    next step and finished "done" with what it caught. Now every step, wait or end after
    the suspension raises it again, and the workflow waits, as its record says."""
    bump = _counter(wheap)

    @wheap.workflow
    def swallows() -> Any:
        bump("before")
        try:
            value = dh.promise("reply").wait()
        except BaseException as exc:  # noqa: BLE001 - what the test is about
            value = f"caught {type(exc).__name__}"
        bump("after")
        return value

    h = swallows()
    assert h.status == "waiting"
    assert wheap.state.counts == {"before": 1}
    assert "caught the suspension of its wait" in caplog.text
    assert dh.resolve("reply", "yes") is True
    assert wheap.run_due() == 1
    assert h.result() == "yes"
    assert wheap.state.counts == {"before": 1, "after": 1}


class CodedError(Exception):
    """An exception whose __init__ takes other arguments than it passes on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def test_a_step_error_whose_init_takes_other_arguments_is_raised_again_of_its_type(
        wheap: dh.Heap, clock: Clock) -> None:
    """Replayed, it became a WorkflowError (``CodedError(*args)`` fails): an ``except
    CodedError:`` in the body matched at the first run and not after the wake."""
    @wheap.action
    def fails() -> None:
        raise CodedError(5, "bad")

    @wheap.workflow
    def flow() -> str:
        try:
            fails()
        except CodedError as exc:
            caught = f"{type(exc).__name__}: {exc}"
        dh.sleep(10)
        return caught

    h = flow()
    clock.advance(11)
    assert wheap.run_due() == 1
    assert h.result() == "CodedError: 5: bad"


def test_a_workflows_arguments_are_its_own_copies(wheap: dh.Heap, caplog: pytest.LogCaptureFixture) -> None:
    """The record held the caller's list: changed after the start, inside the starting
    transaction it was stored changed, and outside one the record cached here differed
    from the one stored (a replay here saw the change, one after a restart would not).
    And a body that changed its argument changed the cached record, unseen."""
    @wheap.action
    def record(items: list[str]) -> None:
        wheap.state.log.append(list(items))

    @wheap.workflow
    def flow(items: list[str]) -> list[str]:
        record(items)
        items.append("body")  # the body's own copy
        dh.promise(f"go:{items[0]}").wait()
        return list(items)

    @wheap.action
    def starter() -> str:
        items = ["in"]
        h = flow.start(items)
        items.append("after the start")
        return h.id

    inside = wheap.workflow_by_id(starter())
    items = ["out"]
    outside = flow.start(items)
    items.append("after the start")
    assert dh.resolve("go:in") and dh.resolve("go:out")
    assert wheap.run_due() == 2
    assert inside.result() == ["in", "body"] and outside.result() == ["out", "body"]
    assert sorted(map(tuple, wheap.state.log)) == [("in",), ("out",)]  # each step once, as called
    assert "arguments changed on replay" not in caplog.text


def test_a_step_that_changes_its_argument_changes_nothing_of_the_body(wheap: dh.Heap) -> None:
    """A step that appended to the body's list changed what the body went on with at the
    first run, not at a replay (which runs no step): another result from its journal."""
    @wheap.action
    def fill(items: list[str]) -> int:
        items.append("filled")
        return len(items)

    @wheap.workflow
    def flow() -> tuple[Any, ...]:
        items: list[str] = []
        n = fill(items)
        return (n, items)

    from durable_heap import _workflows

    h = flow()
    assert h.result() == (1, []) == _workflows.replay(wheap, h.id)  # as at every replay


def test_a_result_the_caller_changes_stays_as_stored(wheap: dh.Heap) -> None:
    """``h.result()`` and ``h.info["result"]`` handed out the record's own dict: a caller
    that changed it changed the record cached here (the next `result()` showed it), not
    the stored one."""
    @wheap.workflow
    def flow() -> dict[str, list[int]]:
        return {"items": [1]}

    h = flow()
    h.result()["items"].append(2)
    h.info["result"]["items"].append(3)
    assert h.result() == {"items": [1]} == h.info["result"]


def test_a_step_that_raises_is_journaled_and_raised_again_on_replay(wheap: dh.Heap, clock: Clock) -> None:
    calls: list[int] = []

    @wheap.action
    def flaky(n: int) -> None:
        calls.append(n)
        heap_state = wheap.state
        heap_state.counts["partial"] = 1  # rolled back with the failed step
        raise KeyError(f"no {n}")

    @wheap.workflow
    def catches() -> str:
        try:
            flaky(7)
        except KeyError as exc:
            seen = repr(exc)
        dh.sleep(5)
        return seen

    h = catches()
    clock.advance(6)
    wheap.run_due()
    assert h.result() == "KeyError('no 7')"  # the same type and arguments on replay
    assert calls == [7]
    assert "partial" not in wheap.state.counts


def test_a_workflow_that_raises_is_failed_and_keeps_the_exception(wheap: dh.Heap) -> None:
    bump = _counter(wheap)

    @wheap.workflow
    def fails() -> None:
        bump("f")
        raise ValueError("bad input 3")

    h = fails()
    assert h.status == "failed"
    with pytest.raises(ValueError, match="bad input 3"):
        h.result()
    assert wheap.state.counts["f"] == 1
    assert "ValueError: bad input 3" in h.info["error"]


def test_started_inside_a_transaction_runs_after_commit(wheap: dh.Heap) -> None:
    bump = _counter(wheap)
    seen: list[bool] = []

    @wheap.workflow
    def later() -> None:
        seen.append(wheap.in_transaction)
        bump("later")

    @wheap.action
    def starts() -> str:
        h = later.start(workflow_id="w1")
        assert not seen  # not yet: after this transaction commits
        return h.id

    assert starts() == "w1"
    assert seen == [False]
    assert wheap.workflow_by_id("w1").status == "done"
    assert later.start(workflow_id="w1").id == "w1"  # an existing id returns that workflow
    assert wheap.state.counts["later"] == 1

    with pytest.raises(RuntimeError), wheap.transaction():
        later.start(workflow_id="w2")
        raise RuntimeError("abort")
    with pytest.raises(dh.WorkflowError):
        wheap.workflow_by_id("w2")  # an aborted transaction started nothing


def test_suspension_is_not_caught_by_except_exception(wheap: dh.Heap) -> None:
    @wheap.workflow
    def careless() -> str:
        try:
            dh.sleep(100)
        except Exception:  # noqa: BLE001 - the point: this must not catch the suspension
            return "caught"
        return "slept"

    h = careless()
    assert h.status == "waiting"
    assert threading.active_count() == 1 or all(
        "workflow" not in t.name for t in threading.enumerate())  # no thread parked


def test_waits_outside_a_workflow_are_refused(wheap: dh.Heap) -> None:
    with pytest.raises(dh.WorkflowError, match="only in the body of a workflow"):
        dh.sleep(1)
    with pytest.raises(dh.WorkflowError, match="only in the body of a workflow"):
        dh.promise("p").wait()
    with pytest.raises(dh.WorkflowError, match="only inside a step"):
        dh.step_key()


def test_journaled_time_and_randomness(wheap: dh.Heap, clock: Clock) -> None:
    seen: list[Any] = []

    @wheap.workflow
    def draws() -> None:
        values = (dh.now(), dh.uuid4(), dh.random())
        seen.append(values)
        dh.sleep(1)

    draws()
    clock.advance(2)
    wheap.run_due()
    assert len(seen) == 2 and seen[0] == seen[1]  # the replay read them back
    assert seen[0][0] == datetime.datetime.fromtimestamp(START, datetime.timezone.utc)


def test_step_key_is_stable(wheap: dh.Heap, clock: Clock) -> None:
    keys: list[str] = []

    @wheap.action
    def effect() -> str:
        keys.append(dh.step_key())
        return keys[-1]

    @wheap.workflow
    def keyed() -> str:
        dh.sleep(1)
        return str(effect())

    h = keyed(workflow_id="kw")
    clock.advance(1)
    wheap.run_due()
    assert h.result() == "kw:2" == keys[0]


def test_async_workflows_await_their_waits(wheap: dh.Heap, clock: Clock) -> None:
    bump = _counter(wheap)

    @wheap.workflow
    async def awaits(user: str) -> Any:
        reply = dh.promise(f"reply:{user}")
        bump("async")
        await dh.sleep(10)
        return await reply.wait()

    h = awaits("ann")
    clock.advance(10)
    wheap.run_due()
    assert h.status == "waiting" and h.waiting_on == {"promise": "reply:ann", "until": None}
    clock.advance(2)
    assert dh.resolve("reply:ann", "yes")
    # Until a scheduler runs the wake, it says that the promise was resolved, and when.
    resolved = datetime.datetime.fromtimestamp(START + 12, datetime.timezone.utc)
    assert h.waiting_on == {"promise": "reply:ann", "until": None, "resolved": resolved}
    assert h.info["waiting_on"]["resolved"] == resolved
    wheap.run_due()
    assert h.result() == "yes"
    assert wheap.state.counts["async"] == 1


def test_an_async_workflow_started_in_a_running_loop_runs_as_a_task_of_that_loop(
        wheap: dh.Heap, clock: Clock) -> None:
    import asyncio

    bump = _counter(wheap)
    threads: list[int] = []

    @wheap.workflow
    async def flow(n: int) -> int:
        threads.append(threading.get_ident())
        bump("task")
        await dh.sleep(5)
        return n

    async def main() -> dh.Workflow:
        h = flow(3)
        assert h.status == "running"  # stored (with its start timer); its task runs when we await
        with pytest.raises(dh.WorkflowError, match="await the handle first"):
            h.result()  # would block the loop its task needs
        assert await h is h
        assert h.status == "waiting" and wheap.state.counts["task"] == 1
        return h

    h = asyncio.run(main())
    assert threads == [threading.get_ident()]  # the caller's loop, not a thread of its own
    clock.advance(5)
    assert wheap.run_due() == 1
    assert h.result() == 3 and wheap.state.counts["task"] == 1


def test_async_actions_are_steps_and_concurrent_steps_are_refused(wheap: dh.Heap, clock: Clock) -> None:
    import asyncio

    @wheap.action
    async def abump(key: str) -> int:
        counts = wheap.state.counts
        counts[key] = counts.get(key, 0) + 1
        return int(counts[key])

    @wheap.workflow
    async def sequential() -> list[int]:
        a = await abump("s")
        await dh.sleep(5)
        b = await abump("s")
        return [a, b]

    h = sequential()
    clock.advance(5)
    wheap.run_due()
    assert h.result() == [1, 2] and wheap.state.counts["s"] == 2

    @wheap.action
    async def slow_bump(key: str) -> int:
        await asyncio.sleep(0.01)  # it yields to the loop while it runs
        return int(await abump(key))

    @wheap.workflow
    async def concurrent() -> Any:
        return await asyncio.gather(slow_bump("g1"), slow_bump("g2"))

    g = concurrent()
    assert g.status == "failed"
    with pytest.raises(dh.WorkflowError, match="concurrent steps"):
        g.result()
    assert "g2" not in wheap.state.counts  # the second, concurrent step never ran


# --- (c) promises and events ---------------------------------------------------------------------


def _promise_waiter(heap: dh.Heap) -> Any:
    """A workflow that waits on the promise `name` and answers "expired" at its timeout."""
    @heap.workflow
    def waits(name: str, timeout: float | None) -> Any:
        try:
            return dh.promise(name).wait(timeout=timeout)
        except dh.PromiseTimeout:
            return "expired"
    return waits


def test_promises(wheap: dh.Heap, clock: Clock) -> None:
    waits = _promise_waiter(wheap)

    early = dh.resolve("early", 1)  # a resolve before the wait is kept
    assert early is True
    assert waits("early", None).result() == 1
    h = waits("p", None)
    assert h.status == "waiting"
    clock.advance(10 * 365 * 86400)  # no default timeout
    wheap.run_due()
    assert h.status == "waiting"
    assert dh.resolve("p", "first") is True
    assert dh.resolve("p", "second") is False  # the first resolve wins
    assert h.status == "waiting"  # the wake runs in the scheduler, not in resolve
    assert wheap.run_due() == 1
    assert h.result() == "first"
    t = waits("t", 60)
    clock.advance(59)
    wheap.run_due()
    assert t.status == "waiting"
    clock.advance(1)
    wheap.run_due()
    assert t.result() == "expired"
    assert dh.resolve("t", "late") is True  # resolved, but its waiter had timed out


def test_resolve_joins_the_callers_transaction(wheap: dh.Heap) -> None:
    with pytest.raises(RuntimeError), wheap.transaction():
        dh.resolve("rolled back", 1)
        raise RuntimeError
    assert dh.resolve("rolled back", 2) is True


_GOT: list[tuple[str, Any]] = []


def _welcome(user: str) -> None:
    _GOT.append(("welcome", user))


def _audit(user: str) -> None:
    _GOT.append(("audit", user))
    dh.active_heap().state.log.append(user)


def test_events_reach_each_subscriber_once(wheap: dh.Heap) -> None:
    _GOT.clear()
    wheap.on("user.confirmed")(_welcome)
    wheap.on("user.confirmed")(_audit)
    wheap.on("user.confirmed")(_audit)  # subscribing again changes nothing

    @wheap.action
    def confirm(user: str) -> int:
        return dh.emit("user.confirmed", user)

    assert confirm("ann") == 2
    assert _GOT == []
    assert wheap.run_due() == 2
    assert sorted(_GOT) == [("audit", "ann"), ("welcome", "ann")]
    assert wheap.run_due() == 0
    assert list(wheap.state.log) == ["ann"]
    assert dh.emit("nobody.listens") == 0


def test_emit_and_timers_from_a_body_happen_once_and_timers_join_transactions(
        wheap: dh.Heap, clock: Clock) -> None:
    _GOT.clear()
    _TIMER_LOG.clear()
    tick, _ = _timer_heap(wheap)
    wheap.on("body.event")(_welcome)

    @wheap.workflow
    def emits() -> None:
        dh.emit("body.event", "from the body")  # a step of its own: once, whatever the replays
        tick.invoke_in(1, "from the body")
        dh.sleep(10)

    emits()
    clock.advance(11)
    wheap.run_due()  # the delivery, the timer, the wake (which replays the emit)
    wheap.run_due()
    assert _GOT == [("welcome", "from the body")]
    assert _TIMER_LOG == ["from the body"]
    with pytest.raises(RuntimeError), wheap.transaction():
        tick.invoke_in(1, "rolled back")
        raise RuntimeError
    assert wheap.timers() == []  # it joined the aborted transaction


def test_closures_are_refused_as_timers_and_subscribers(wheap: dh.Heap) -> None:
    @wheap.action
    def local() -> None:
        pass

    with pytest.raises(dh.WorkflowError, match="top level of a module"):
        local.invoke_in(5)
    with pytest.raises(dh.WorkflowError, match="top level of a module"):
        wheap.on("t")(lambda: None)


# --- (b) timers -------------------------------------------------------------------------------------

_TIMER_LOG: list[Any] = []


def _timer_heap(heap: dh.Heap) -> Any:
    global tick, boom
    tick = heap.action(_tick)
    boom = heap.action(_boom)
    return tick, boom


def _tick(n: int) -> None:
    _TIMER_LOG.append(n)


def _boom() -> None:
    _TIMER_LOG.append("boom")
    raise OSError("the mail server is down")


tick: Any = None
boom: Any = None


def test_timers_fire_once_when_due(wheap: dh.Heap, clock: Clock) -> None:
    _TIMER_LOG.clear()
    tick, _ = _timer_heap(wheap)
    t1 = tick.invoke_in(60, 1)
    tick.invoke_at(datetime.datetime.fromtimestamp(START + 30, datetime.timezone.utc), 2)
    assert isinstance(t1, dh.Timer) and t1.due.timestamp() == START + 60
    tick.invoke_in(90, 3).cancel()
    assert [t.target[1] for t in wheap.timers()] == ["_tick", "_tick"]
    clock.advance(45)
    assert wheap.run_due() == 1 and _TIMER_LOG == [2]
    clock.advance(60)
    assert wheap.run_due() == 1 and _TIMER_LOG == [2, 1]
    assert wheap.run_due() == 0 and wheap.timers() == []


def test_a_failing_timer_is_retried_then_a_dead_letter(wheap: dh.Heap, clock: Clock) -> None:
    _TIMER_LOG.clear()
    _, boom = _timer_heap(wheap)
    boom.invoke_in(0)
    for _ in range(10):
        wheap.run_due()
        clock.advance(4000)
    assert _TIMER_LOG == ["boom"] * 5
    dead = wheap.timers(dead=True)
    assert len(dead) == 1 and "mail server is down" in dead[0].error and dead[0].attempts == 5
    assert dead[0].retry()
    wheap.run_due()
    assert _TIMER_LOG == ["boom"] * 6
    clock.advance(10)
    for t in wheap.timers():
        t.cancel()
    assert wheap.timers(dead=False) == []


def test_cron_catches_up_once_or_skips(tmp_path: Path) -> None:
    for missed, expected in (("once", 1), ("skip", 0), ("all", 5)):
        _TIMER_LOG.clear()
        clock = Clock(START)  # Monday 08:00 UTC
        with dh.open(tmp_path / f"cron-{missed}.fs", clock=clock) as heap:
            tick, _ = _timer_heap(heap)
            t = tick.cron("0 9 * * *", missed, missed=missed, tz="Europe/Paris")
            assert t.due == datetime.datetime(2026, 3, 3, 8, 0, tzinfo=datetime.timezone.utc)  # 09:00 Paris
            assert tick.cron("0 9 * * *", missed, missed=missed, tz="Europe/Paris").id == t.id  # idempotent
            assert len(heap.timers()) == 1
            clock.advance(5 * 86400 + 3600)  # five ticks missed: the scheduler was down
            heap.run_due()
            assert _TIMER_LOG == [missed] * expected
            (pending,) = heap.timers()
            assert pending.due.timestamp() > clock()  # next tick from the schedule, after now
            assert pending.due.hour == 8 and pending.due.minute == 0  # no drift
    with dh.open(tmp_path / "bad.fs") as heap, pytest.raises(dh.WorkflowError, match="does not parse"):
        _timer_heap(heap)[0].cron("61 * * *")


# --- (d) leases, restarts, SIGKILL, ZEO ---------------------------------------------------------------

APP = """
import os, sys, time
import durable_heap as dh

# WFAPP_SKEW moves this process's clock forward (a lease that ran out, without waiting)
SKEW = float(os.environ.get("WFAPP_SKEW", "0"))
heap = dh.open(os.environ["WFAPP_TARGET"], clock=lambda: time.time() + SKEW)
with heap.transaction() as state:
    state.setdefault("counts", {})

@heap.action
def bump(key):
    state = heap.state
    state.counts[key] = state.counts.get(key, 0) + 1
    return state.counts[key]

@heap.workflow
def counted(n, pause):
    for i in range(n):
        bump(f"c{i}")
        if pause:
            dh.sleep(pause)
    return "done"

@heap.workflow
def dies_between_steps():
    bump("d1")
    if os.environ.get("DIE"):
        os._exit(0)
    bump("d2")
    return "finished"
"""


def _app(tmp_path: Path) -> Path:
    pkg = tmp_path / "wfapp.py"
    pkg.write_text(APP)
    return pkg


def _script(tmp_path: Path, body: str, target: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text("from wfapp import *\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(tmp_path, target, env), timeout=timeout)


def _env(tmp_path: Path, target: str, env: dict[str, str] | None = None) -> dict[str, str]:
    path = f"{tmp_path}{os.pathsep}{ROOT}"
    return subprocess_env({"PYTHONPATH": path, "WFAPP_TARGET": target, **(env or {})})


def test_a_sleep_survives_a_restart_and_resumes_after_its_deadline(tmp_path: Path) -> None:
    _app(tmp_path)
    target = str(tmp_path / "r.fs")
    r = _script(tmp_path, "h = counted.start(2, 30, workflow_id='r')\nprint(h.status)", target)
    assert r.stdout.strip() == "waiting", r.stderr
    look = "print(heap.run_due(), heap.workflow_by_id('r').status)"
    r = _script(tmp_path, look, target)
    assert r.stdout.split() == ["0", "waiting"], r.stderr  # a new process, before the deadline
    # Later processes: their clocks are 31 s and 62 s ahead (WFAPP_SKEW), as if that had passed.
    r = _script(tmp_path, look, target, env={"WFAPP_SKEW": "31"})
    assert r.stdout.split() == ["1", "waiting"], r.stderr  # woke, ran step 2, sleeps again
    r = _script(tmp_path, look, target, env={"WFAPP_SKEW": "45"})
    assert r.stdout.split() == ["0", "waiting"], r.stderr  # its second sleep is not over
    r = _script(tmp_path, "heap.run_due()\nprint(heap.workflow_by_id('r').result(), dict(heap.state.counts))",
                target, env={"WFAPP_SKEW": "62"})
    assert r.stdout.strip() == "done {'c0': 1, 'c1': 1}", r.stderr


def test_a_workflow_whose_runner_died_is_taken_over_after_its_lease(tmp_path: Path) -> None:
    _app(tmp_path)
    target = str(tmp_path / "lease.fs")
    r = _script(tmp_path, "dies_between_steps.start(workflow_id='d')", target, env={"DIE": "1"})
    assert r.returncode == 0, r.stderr
    look = 'h = heap.workflow_by_id("d")\nprint(h.status, h.info["stuck"], heap.run_due(), h.status)\n'
    r = _script(tmp_path, look, target)
    assert r.stdout.split() == ["running", "False", "0", "running"], r.stderr  # its lease holds
    look += "print(h.result(), dict(heap.state.counts))"
    r = _script(tmp_path, look, target, env={"WFAPP_SKEW": "61"})
    # "running" but its runner is gone (tellable apart: stuck), then taken over and finished
    expected = ["running", "True", "1", "done", "finished", "{'d1':", "1,", "'d2':", "1}"]
    assert r.stdout.split() == expected, r.stderr


SCHEDULER = """
from wfapp import *
heap.run_scheduler(poll=0.002)
"""


@pytest.mark.slow
def test_sigkill_exactly_once(tmp_path: Path) -> None:
    """Kill a scheduler process at random moments while it runs workflows; each step once."""
    import random

    _app(tmp_path)
    target = str(tmp_path / "kill.fs")
    steps = 12
    r = _script(tmp_path, f"""
        for i in range(3):
            counted.start({steps}, 0.08, workflow_id=f"k{{i}}")  # a run spans several kills
        for i in range(20):
            bump.invoke_in(0.2 + i * 0.05, f"t{{i}}")  # timers fired while processes are killed
    """, target)
    assert r.returncode == 0, r.stderr
    (tmp_path / "sched.py").write_text(SCHEDULER)
    env = _env(tmp_path, target)
    soak = "100" if os.environ.get("DURABLE_HEAP_SOAK") else "12"
    rounds = int(os.environ.get("DURABLE_HEAP_SOAK_ROUNDS", soak))
    for _ in range(rounds):
        p = subprocess.Popen([sys.executable, str(tmp_path / "sched.py")], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(random.uniform(0.4, 1.2))
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = _script(tmp_path, """
        import time
        for _ in range(400):
            heap.run_due()
            if all(heap.workflow_by_id(f"k{i}").status == "done" for i in range(3)):
                break
            time.sleep(0.01)
        counts = dict(heap.state.counts)
        print(sorted(set(v for k, v in counts.items() if k[0] == "c")), len(counts),
              sorted(set(v for k, v in counts.items() if k[0] == "t")),
              [heap.workflow_by_id(f"k{i}").status for i in range(3)])
    """, target, env={"WFAPP_SKEW": "120"}, timeout=120)  # the leases of killed runners ran out
    # three workflows each bumped c0..c11 once: every counter is exactly 3; each timer fired once
    assert r.stdout.strip() == f"[3] {steps + 20} [1] ['done', 'done', 'done']", r.stderr


ZEO_TIMERS = """
import sys, os
import durable_heap as dh
heap = dh.open(sys.argv[1])

@heap.action
def fire(n):
    heap.state.fired[n] = heap.state.fired.get(n, 0) + 1
    heap.state.by[os.getpid()] = heap.state.by.get(os.getpid(), 0) + 1
"""


@pytest.mark.slow
def test_two_schedulers_over_zeo_fire_each_timer_once(tmp_path: Path) -> None:
    (tmp_path / "zt.py").write_text(ZEO_TIMERS)
    with ZeoServer(tmp_path / "zeo.fs") as server:
        target = server.url
        env = subprocess_env({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
        setup = ("import sys\nfrom zt import *\nwith heap.transaction() as s:\n"
                 "    s.fired = {}\n    s.by = {}\n"
                 "with heap.transaction():\n    [fire.invoke_in(1.5, n) for n in range(200)]\n")
        subprocess.run([sys.executable, "-c", setup, target], cwd=tmp_path, env=env, check=True, timeout=60)
        run = ("import sys, time\nfrom zt import *\nt = time.time() + 1.6\n"
               "while time.time() < t: time.sleep(0.01)\n"
               "n = 0\nwhile True:\n    k = heap.run_due()\n    n += k\n    if not k: break\nprint(n)\n")
        procs = [subprocess.Popen([sys.executable, "-c", run, target], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        counts = [int(o.strip() or 0) for o, _ in outs]
        assert sum(counts) == 200, outs
        with dh.open(target) as heap:
            fired = dict(heap.state.fired)
            assert sorted(fired) == list(range(200))
            assert set(fired.values()) == {1}
            assert heap.timers() == []
            assert sum(heap.state.by.values()) == 200


ZEO_WAKE = """
import sys
import durable_heap as dh
heap = dh.open(sys.argv[1])

@heap.workflow
def waits():
    return dh.promise("go").wait()
"""


@pytest.mark.slow
def test_a_resolve_from_another_process_wakes_a_scheduler_over_zeo_at_once(tmp_path: Path) -> None:
    """Not at its next poll: the ZEO server's invalidation rings the scheduler (poll: 60 s here)."""
    (tmp_path / "zw.py").write_text(ZEO_WAKE)
    with ZeoServer(tmp_path / "zeo.fs") as server:
        env = subprocess_env({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
        start = "import sys\nfrom zw import *\nprint(waits().id)\n"
        wid = subprocess.run([sys.executable, "-c", start, server.url], cwd=tmp_path, env=env, check=True,
                             timeout=60, capture_output=True, text=True).stdout.split()[-1]
        sched = ("import sys, threading\nfrom zw import *\n"
                 "threading.Timer(1.0, lambda: print('ready', flush=True)).start()\n"
                 "heap.run_scheduler(poll=60)\n")
        proc = subprocess.Popen([sys.executable, "-c", sched, server.url], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            with dh.open(server.url) as heap:
                with heap.activate():
                    assert dh.resolve("go", 7)
                t0 = time.monotonic()
                handle = heap.workflow_by_id(wid)
                while handle.status != "done" and time.monotonic() - t0 < 20:
                    time.sleep(0.01)
                assert handle.status == "done" and handle.result() == 7
                assert time.monotonic() - t0 < 20  # its poll would have taken 60 s
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


# --- the example, in process with the fake clock -----------------------------------------------


def test_the_email_example_with_a_fake_clock(wheap: dh.Heap, clock: Clock) -> None:
    sent: list[tuple[str, str]] = []

    @wheap.action
    def send_invite(user: str, ref: str) -> None:
        sent.append((user, dh.step_key()))

    @wheap.action
    def confirm(user: str, answer: str) -> None:
        wheap.state.log.append((user, answer))

    @wheap.workflow
    def onboard(user: str) -> str:
        reply = dh.promise(f"reply:{user}")
        send_invite(user, reply.name)
        try:
            answer = reply.wait(timeout=14 * 86400)
        except dh.PromiseTimeout:
            return "expired"
        dh.sleep(24 * 3600)
        confirm(user, answer)
        return "confirmed"

    @wheap.action
    def on_email(sender: str, text: str) -> None:
        dh.resolve(f"reply:{sender}", text)

    ann, bob = onboard("ann"), onboard("bob")
    clock.advance(3 * 86400)
    on_email("ann", "yes please")
    wheap.run_due()
    assert ann.waiting_on is not None and "sleep" in ann.waiting_on
    clock.advance(86400)
    wheap.run_due()
    assert ann.result() == "confirmed"
    clock.advance(11 * 86400)
    wheap.run_due()
    assert bob.result() == "expired"
    assert [u for u, _ in sent] == ["ann", "bob"]
    assert list(wheap.state.log) == [("ann", "yes please")]


def test_run_scheduler_wakes_on_resolve_and_stops(wheap: dh.Heap) -> None:
    @wheap.workflow
    def waits() -> Any:
        return dh.promise("go").wait()

    h = waits()
    stop = threading.Event()
    t = threading.Thread(target=wheap.run_scheduler, kwargs={"stop": stop})
    t.start()
    try:
        dh.resolve("go", 42)
        assert h.result(timeout=10) == 42
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_inspection(wheap: dh.Heap) -> None:
    @wheap.workflow
    def waits() -> Any:
        return dh.promise("inspected").wait(timeout=100)

    h = waits()
    assert [w.id for w in wheap.workflows(status="waiting")] == [h.id]
    assert wheap.workflows(status="done") == []
    info = h.info
    assert info["waiting_on"]["promise"] == "inspected" and info["journal"][0]["kind"] == "wait"
    assert [t.kind for t in wheap.timers()] == ["run"]
    assert h.cancel() and h.status == "cancelled"
    assert [(t.kind, t.target) for t in wheap.timers()] == [("prune", h.id)]  # its journal's drop
    with pytest.raises(ValueError, match="status must be one of"):
        wheap.workflows(status="sleeping")


def _loaded_records(heap: dh.Heap) -> int:
    """WorkflowRecords this thread's connection has loaded (not ghosts)."""
    from durable_heap._workflows import WorkflowRecord

    return sum(1 for _, obj in heap.connection._cache.items()
               if isinstance(obj, WorkflowRecord) and obj._p_status != "ghost")


def test_listing_by_status_reads_only_those_records_and_an_older_heap_gets_its_index(tmp_path: Path) -> None:
    from durable_heap import _workflows as w

    path = tmp_path / "many.fs"
    with dh.open(path) as heap:
        @heap.workflow
        def waits(i: int) -> Any:
            return dh.promise(f"many{i}").wait()

        @heap.workflow
        def fails() -> None:
            raise ValueError("no")

        waiting = [waits(i).id for i in range(300)]
        failed = fails().id
        assert [h.id for h in heap.workflows(status="waiting")] == waiting  # oldest first
    with dh.open(path) as heap:
        assert [h.id for h in heap.workflows(status="failed")] == [failed]
        assert [s["id"] for s in w.summaries(heap, "failed")] == [failed]
        assert _loaded_records(heap) == 1  # not the 300 waiting ones
        assert len(heap.workflows()) == 301
        # A heap from before the index: listed by reading every record, and indexed
        # from them at its first change to a workflow.
        with heap.transaction():
            del heap.connection.root()[w.STATUS_KEY]
        assert [h.id for h in heap.workflows(status="failed")] == [failed]
        with heap.activate():
            dh.resolve("many0", "x")
        heap.run_due()
        assert [h.id for h in heap.workflows(status="done")] == [waiting[0]]
        assert len(heap.workflows(status="waiting")) == 299
        assert w.STATUS_KEY in heap.connection.root()


def test_retention_drops_the_journal_of_finished_workflows(wheap: dh.Heap, clock: Clock) -> None:
    bump = _counter(wheap)

    @wheap.workflow(retention=3600)
    def short() -> int:
        return bump("r")

    h = short()
    assert len(h.info["journal"]) == 1
    clock.advance(3601)
    wheap.run_due()
    assert h.info["journal"] == [] and h.result() == 1 and h.status == "done"


def _note(items: list[str]) -> None:
    """A timer's action (at module level: found by name) that changes its argument."""
    dh.active_heap().state.log.append(list(items))
    items.append("changed by the action")


def _heard(items: list[str]) -> None:
    """A subscriber (at module level: found by name)."""
    dh.active_heap().state.log.append(["heard", *items])


def test_timers_crons_promises_and_events_keep_their_values_as_given(wheap: dh.Heap, clock: Clock) -> None:
    """The entries held the caller's own lists: a timer ran with what the caller appended
    after `invoke_in` (the entry cached here; after a restart, the stored one), and an
    action that changed its argument changed its cron's for the next ticks."""
    note = wheap.action(_note)
    wheap.on("noted")(_heard)

    @wheap.action
    def tell(items: list[str]) -> None:
        dh.emit("noted", items)
        items.append("after the emit")

    items = ["timer"]
    note.invoke_in(10, items)
    items.append("after invoke_in")
    note.cron("* * * * *", ["cron"])
    tell(["event"])
    value = ["value"]
    assert dh.resolve("kept", value)
    value.append("after the resolve")
    for _ in range(2):
        clock.advance(61)
        wheap.run_due()
    log = sorted(map(tuple, wheap.state.log))
    assert log == [("cron",), ("cron",), ("heard", "event"), ("timer",)], log

    @wheap.workflow
    def waits() -> Any:
        return dh.promise("kept").wait()

    assert waits().result() == ["value"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300, "10", True])
def test_a_time_a_timer_cannot_have_is_refused_at_the_call(wheap: dh.Heap, bad: Any) -> None:
    """``dh.sleep(nan)`` slept not at all, and put a NaN key in the timers tree (which
    breaks a BTree's order); ``inf`` failed in a log line after the wait was journaled;
    ``"10"`` was taken as 10 s. Each is refused where it is given, and nothing is stored."""
    note = wheap.action(_note)
    error = TypeError if isinstance(bad, (str, bool)) else ValueError
    with pytest.raises(error, match="invoke_in"):
        note.invoke_in(bad, ["x"])
    with pytest.raises(error, match="invoke_at"):
        note.invoke_at(bad, ["x"])

    @wheap.workflow
    def sleeps() -> None:
        dh.sleep(bad)

    @wheap.workflow
    def waits() -> None:
        dh.promise("p").wait(timeout=bad)

    for flow, what in ((sleeps, "durable_heap.sleep"), (waits, "Promise.wait's timeout")):
        h = flow()
        assert h.status == "failed"
        with pytest.raises(error, match=re.escape(what)):
            h.result()
    assert [t.kind for t in wheap.timers()] == ["prune", "prune"]  # the two failed ones' drops only


def test_retention_covers_cancelled_workflows_and_a_dropped_prune_keeps_the_journal(
        wheap: dh.Heap, clock: Clock) -> None:
    """A cancelled workflow kept its journal for ever (only done and failed ones had a
    prune timer). Each ended one is listed as a prune timer, whose cancel keeps it."""
    bump = _counter(wheap)

    @wheap.workflow(retention=3600)
    def waits() -> int:
        bump("w")
        return dh.promise("never").wait()

    @wheap.workflow(retention=3600)
    def short() -> int:
        return bump("s")

    cancelled, kept = waits(), short()
    assert cancelled.cancel()
    prunes = {t.target: t for t in wheap.timers() if t.kind == "prune"}
    assert set(prunes) == {cancelled.id, kept.id}
    assert prunes[kept.id].cancel()
    clock.advance(3601)
    assert wheap.run_due() == 1
    assert cancelled.info["journal"] == [] and cancelled.status == "cancelled"
    assert len(kept.info["journal"]) == 1 and kept.result() == 1
    assert wheap.timers() == []



# --- (e) redeploys ----------------------------------------------------------------------------------

FLOW_V1 = """
import durable_heap as dh
from durable_heap import state

state.setdefault("log", [])

def note(x):
    state.log.append(x)

@dh.workflow
def flow(user):
    note("a:" + user)
    dh.sleep(100)
    note("b:" + user)
    return "v1"
"""

# adds code after the wait: adopted
FLOW_V2 = FLOW_V1.replace('    return "v1"', '    note("c:" + user)\n    return "v2"')
# changes the step before the wait (another step; changed arguments alone are only reported)
SHOUT = 'def shout(x):\n    state.log.append(x.upper())\n\n'
FLOW_V3 = FLOW_V2.replace('note("a:" + user)', 'shout("a:" + user)')
FLOW_V3 = FLOW_V3.replace("@dh.workflow", SHOUT + "@dh.workflow")
# the same change behind patched(): both old and new runs finish
FLOW_V4 = FLOW_V2.replace('    note("a:" + user)\n',
                          '    if dh.patched("capital"):\n        shout("a:" + user)\n'
                          '    else:\n        note("a:" + user)\n')
FLOW_V4 = FLOW_V4.replace("@dh.workflow", SHOUT + "@dh.workflow")


def test_redeploys_adopt_refuse_block_and_patch(tmp_path: Path, clock: Clock) -> None:
    app = tmp_path / "flowapp.py"
    app.write_text(FLOW_V1)
    with dh.open(tmp_path / "flow.fs", clock=clock) as heap:
        prog = heap.load(app)
        first = prog.call("flow", "ann")
        assert isinstance(first, dh.Workflow) and first.status == "waiting"
        assert list(heap.state.log) == ["a:ann"]  # a program's module-level function is a step

        app.write_text(FLOW_V2)
        assert heap.deploy(app).number == 2  # adds code after the wait: adopted
        clock.advance(101)
        assert heap.run_due() == 1
        assert first.result() == "v2"  # finished under the new code
        assert list(heap.state.log) == ["a:ann", "b:ann", "c:ann"]

        second = prog.call("flow", "bob")
        assert second.status == "waiting"
        app.write_text(FLOW_V3)
        with pytest.raises(dh.DeployError, match=rf"{second.id}.*step 1.*'step note'.*'step shout'") as err:
            heap.deploy(app)
        assert "nothing was committed" in str(err.value)
        assert len(heap.versions(app)) == 2 and second.status == "waiting"

        heap.deploy(app, force=True)
        assert second.status == "blocked"
        assert "step 1" in second.info["reason"]
        clock.advance(101)
        assert heap.run_due() == 0  # a blocked workflow does not run
        assert second.status == "blocked"

        app.write_text(FLOW_V4)
        heap.deploy(app)  # retried at the next deploy: it matches again, and is queued
        assert second.status == "waiting"
        third = prog.call("flow", "cid")  # a new run takes the new branch
        clock.advance(101)
        heap.run_due()
        assert second.result() == "v2" and third.result() == "v2"
        assert sorted(heap.state.log[3:]) == sorted(["a:bob", "A:CID", "b:bob", "c:bob", "b:cid", "c:cid"])


TIMED_V1 = """
import durable_heap as dh
from durable_heap import state

def ping(n):
    state.pings = state.get("pings", 0) + n

def weekly():
    state.weekly = state.get("weekly", 0) + 1

def other(payload=None):
    pass
"""


def test_a_deploy_that_removes_a_timers_action_is_refused_and_drops_undeclared_crons(
        tmp_path: Path, clock: Clock) -> None:
    app = tmp_path / "timedapp.py"
    app.write_text(TIMED_V1 + "\nheap = dh.active_heap()\n")
    with dh.open(tmp_path / "timed.fs", clock=clock) as heap:
        prog = heap.load(app)
        mod = prog.module
        action = heap.action(mod.ping)
        action.invoke_in(60, 2)
        app.write_text(TIMED_V1.replace("def ping(n):", "def pong(n):"))
        with pytest.raises(dh.DeployError, match=r"timer .*ping"):
            heap.deploy(app)
        app.write_text(TIMED_V1)
        clock.advance(61)
        assert heap.run_due() == 1
        assert heap.state.pings == 2

        cron_src = (TIMED_V1 + "\ndh.active_heap().action(weekly).cron('0 9 * * 1', tz='Europe/Paris')\n"
                    "dh.on('pinged')(other)\n")
        app.write_text(cron_src)
        heap.deploy(app)
        assert [t.kind for t in heap.timers()] == ["cron"]
        app.write_text(cron_src + "\n# unchanged cron\n")
        heap.deploy(app)
        assert [t.kind for t in heap.timers()] == ["cron"]  # declared again: kept, once
        app.write_text(TIMED_V1 + "\n# no cron any more\n")
        assert dh.emit("pinged") == 1
        heap.run_due()
        heap.deploy(app)
        assert heap.timers() == []  # a deploy drops the crons the new code no longer declares
        assert dh.emit("pinged") == 0  # and the subscriptions


# --- (g) the command line: the example across processes ---------------------------------------

ONBOARD = """
import durable_heap as dh
from durable_heap import state

state.setdefault("users", {})
state.setdefault("sent", [])
state.setdefault("welcomed", [])

def send_invite(user, ref):
    state.sent.append([user, ref, dh.step_key()])   # an external effect would use the key

def confirm(user, answer):
    state.users[user] = {"confirmed": answer}

@dh.workflow
def onboard(user):
    reply = dh.promise(f"reply:{user}")
    send_invite(user, reply.name)
    try:
        answer = reply.wait(timeout=14 * 86400)
    except dh.PromiseTimeout:
        return "expired"
    dh.sleep(1)
    confirm(user, answer)
    dh.emit("user.confirmed", user)
    return "confirmed"

def on_email(sender, text):
    return dh.resolve(f"reply:{sender}", text)

@dh.on("user.confirmed")
def welcome(user):
    state.welcomed.append(user)

def report():
    return {"users": state.users, "welcomed": state.welcomed, "sent": len(state.sent)}
"""


@pytest.mark.slow
def test_the_email_example_through_the_cli(tmp_path: Path) -> None:
    app = write(tmp_path / "onboard.py", ONBOARD)
    r = cli("call", str(app), "onboard", "ann", cwd=tmp_path)
    wid, status = r.stdout.split()
    assert status == "waiting", r.stderr
    r = cli("workflows", str(app), cwd=tmp_path)
    assert wid in r.stdout and "promise 'reply:ann' until" in r.stdout, r.stderr
    assert cli("call", str(app), "on_email", "ann", "yes", cwd=tmp_path).stdout.strip() == "true"
    assert cli("call", str(app), "on_email", "ann", "again", cwd=tmp_path).stdout.strip() == "false"
    r = cli("workflows", str(app), cwd=tmp_path)  # resolved, with no scheduler running yet
    assert "promise 'reply:ann' resolved at" in r.stdout and "its wake is due" in r.stdout, r.stdout
    r = cli("run-due", str(app), cwd=tmp_path)
    assert r.stdout.strip() == "1", r.stderr  # the wake: it now sleeps a second
    assert "sleep until" in cli("workflows", str(app), cwd=tmp_path).stdout
    time.sleep(1.1)
    r = cli("run-due", str(app), cwd=tmp_path)
    assert r.stdout.strip() == "2", r.stderr  # the wake, then the event's delivery
    r = cli("workflows", str(app), "--id", wid, cwd=tmp_path)
    assert "status: \"done\"" in r.stdout and "result: \"confirmed\"" in r.stdout, r.stdout
    assert "step send_invite" in r.stdout and "wait reply:ann" in r.stdout, r.stdout
    r = cli("call", str(app), "report", cwd=tmp_path)
    assert r.stdout.strip() == '{"users": {"ann": {"confirmed": "yes"}}, "welcomed": ["ann"], "sent": 1}'
    r = cli("timers", str(app), cwd=tmp_path)
    assert "prune" in r.stdout and r.returncode == 0, r.stderr  # the finished workflow's retention
    prune_id = next(line.split()[0] for line in r.stdout.splitlines() if "prune" in line)
    assert cli("timers", str(app), "--drop", prune_id, cwd=tmp_path).stdout.strip() == f"{prune_id} dropped"
    assert prune_id not in cli("timers", str(app), cwd=tmp_path).stdout
    other, _ = cli("call", str(app), "onboard", "cid", cwd=tmp_path).stdout.split()
    assert cli("workflows", str(app), "--cancel", other, cwd=tmp_path).stdout.strip() == f"{other} cancelled"
    r = cli("workflows", str(app), "--status", "cancelled", cwd=tmp_path)
    assert other in r.stdout and wid not in r.stdout, r.stdout


@pytest.mark.slow
def test_the_worker_runs_wakes_and_stops_on_sigterm(tmp_path: Path, zeo_server: ZeoServer) -> None:
    app = write(tmp_path / "onboard.py", ONBOARD)
    storage = ["--storage", zeo_server.url]
    assert cli("deploy", str(app), *storage, cwd=tmp_path).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "durable_heap", "worker", str(app), *storage],
                              cwd=tmp_path, env=subprocess_env({"PYTHONPATH": str(ROOT)}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wid, status = cli("call", str(app), "onboard", "bob", *storage, cwd=tmp_path).stdout.split()
        # "running" when the worker, rung by the call's commit, took the start first (it
        # then runs the workflow up to its wait): both run it, exactly one of them does
        assert status in ("waiting", "running")
        cli("call", str(app), "on_email", "bob", "sure", *storage, cwd=tmp_path)
        deadline = time.time() + 30
        while time.time() < deadline:
            r = cli("call", str(app), "report", *storage, cwd=tmp_path)
            if '"welcomed": ["bob"]' in r.stdout:
                break
            time.sleep(0.3)
        assert '"bob": {"confirmed": "sure"}' in r.stdout and '"welcomed": ["bob"]' in r.stdout, r.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "worker stopped" in err


GLOBALS = """
import durable_heap as dh
from durable_heap import state

state.setdefault("n", 0)
hits = []      # durable module globals of the program
count = 0

def hit(name):
    global count
    hits.append(name)
    count += 1

def bump_n():
    state.n += 1

def note(n):
    pass

@dh.workflow
def visit(name):
    hit(name)                    # a step: sees the durable globals, and changes them
    note(state.n)                # the body reads state: this step's argument moves on
    dh.sleep(0.5)
    hit(name + "!")
    return [list(hits), count]   # the body reads them too

@dh.on("later")
def on_later(name):
    hits.append(name)

def later(name):
    dh.emit("later", name + "?")

def report():
    return [list(hits), count]
"""


@pytest.mark.slow
def test_a_programs_durable_globals_are_bound_in_workflows_steps_and_subscribers(tmp_path: Path) -> None:
    """And a step replayed with other arguments shows both in `workflows --id`."""
    app = write(tmp_path / "app.py", GLOBALS)
    wid, status = cli("call", str(app), "visit", "ann", cwd=tmp_path).stdout.split()
    assert status == "waiting"
    assert cli("call", str(app), "report", cwd=tmp_path).stdout.strip() == '[["ann"], 1]'
    assert cli("call", str(app), "bump_n", cwd=tmp_path).returncode == 0
    time.sleep(0.6)
    r = cli("run-due", str(app), cwd=tmp_path)  # a process that only loaded the program
    assert r.stdout.strip() == "1", r.stderr
    r = cli("workflows", str(app), "--id", wid, cwd=tmp_path)
    assert 'result: [["ann", "ann!"], 2]' in r.stdout, r.stdout
    assert "step note note(0) (replayed as note(1): its arguments changed)" in r.stdout, r.stdout
    assert cli("call", str(app), "later", "bob", cwd=tmp_path).returncode == 0
    r = cli("run-due", str(app), cwd=tmp_path)  # a subscriber (a timer's action runs the same way)
    assert r.stdout.strip() == "1", r.stderr
    r = cli("call", str(app), "report", cwd=tmp_path)
    assert json.loads(r.stdout) == [["ann", "ann!", "bob?"], 2], r.stdout


MAIN_SCRIPT = """
import sys
import durable_heap as dh
heap = dh.open(sys.argv[1])

@heap.action
def remind(who):
    print("reminded", who)

remind.invoke_in(0, "ann")
"""


def test_a_plain_scripts_timer_says_why_another_process_cannot_run_it(tmp_path: Path) -> None:
    script = write(tmp_path / "plain.py", MAIN_SCRIPT)
    target = str(tmp_path / "plain.fs")
    r = subprocess.run([sys.executable, str(script), target], capture_output=True, text=True,
                       env=subprocess_env({"PYTHONPATH": str(ROOT)}), timeout=60)
    assert "plain script (__main__)" in r.stderr, r.stderr  # said when it was given to a timer
    clock = Clock()
    with dh.open(target, clock=clock) as heap:
        for _ in range(6):
            heap.run_due()
            clock.advance(3600)
        (dead,) = heap.timers(dead=True)
        assert "plain script (__main__)" in dead.error and "another process cannot find by name" in dead.error


def test_a_body_that_changes_what_a_step_returned_replays_the_same(wheap: dh.Heap, clock: Clock) -> None:
    """The journal keeps what a step returned; a body that changes the list it got must not
    change the journal's copy cached in this process, or the replay at its wake reads the
    changed one and the body takes another path than its first run."""

    @wheap.action
    def tags() -> list[Any]:
        return ["a", {"k": [1]}]

    seen: list[Any] = []

    @wheap.workflow
    def edits() -> int:
        got = tags()
        seen.append(repr(got))
        got.append("added by the body")
        got[1]["k"].append(2)
        dh.sleep(60)
        later = dh.promise("edits").wait()
        later.append("changed")
        return len(got)

    h = edits()
    assert h.status == "waiting"
    clock.advance(60)
    assert wheap.run_due() == 1  # the wake replays the body: the step from the journal
    assert dh.resolve("edits", ["v"]) is True
    assert wheap.run_due() == 1
    assert h.result() == 3
    assert seen == ["['a', {'k': [1]}]"] * 3  # first run, and each replay


def test_arguments_that_do_not_fit_are_refused_at_the_start_or_the_schedule(wheap: dh.Heap) -> None:
    """A workflow started, or a timer or cron scheduled, with arguments its function does
    not take was stored all the same: the workflow then failed at its first run (so
    ``durable-heap call app.py onboard`` printed "failed" and exited 0), the timer became
    a dead letter after its retries. Each now raises TypeError at the call, as calling
    the function would, and nothing is stored."""
    note = wheap.action(_note)

    @wheap.workflow
    def greet(user: str, *, loud: bool = False) -> str:
        return user.upper() if loud else user

    for args, kwargs, says in (((), {}, "missing a required argument: 'user'"),
                               (("a", "b"), {}, "too many positional arguments"),
                               (("a",), {"shout": True}, "unexpected keyword argument 'shout'")):
        with pytest.raises(TypeError, match=re.escape(says)) as info:
            greet(*args, **kwargs)
        assert "greet(user, *, loud=False): " in str(info.value)
        with pytest.raises(TypeError, match="nothing was started"):
            with wheap.transaction():  # inside a transaction too: not recorded to run after it
                greet.start(*args, **kwargs)
    with pytest.raises(TypeError, match="missing a required argument"):
        note.invoke_in(10)
    with pytest.raises(TypeError, match="too many positional arguments"):
        note.invoke_at(START + 10, ["x"], ["y"])
    with pytest.raises(TypeError, match="missing a required argument"):
        note.cron("0 9 * * 1")
    assert wheap.workflows() == [] and wheap.timers() == []
    assert greet("ann", loud=True).result() == "ANN"  # what fits still starts
    assert note.invoke_in(10, ["x"]).due is not None


def _no_payload() -> None: ...


def _two_arguments(payload: object, more: object) -> None: ...


def test_a_subscriber_that_cannot_take_the_payload_is_refused_at_the_subscription(wheap: dh.Heap) -> None:
    """(Its every delivery failed, and ended as a dead letter.)"""
    for func in (_no_payload, _two_arguments):
        with pytest.raises(TypeError, match=r"a subscriber of 'news' is called with the event's payload"):
            wheap.on("news")(func)
    with wheap.transaction():
        assert dh.emit("news", 1) == 0  # nothing subscribed


def _schedule_until_stopped(heap: dh.Heap, stop: threading.Event) -> None:
    """Run `heap`'s scheduler in a thread until `stop` is set (by a step), and wait for it to end."""
    runner = threading.Thread(target=heap.run_scheduler, kwargs={"stop": stop})
    runner.start()
    runner.join(30)
    assert not runner.is_alive()


def test_a_stopping_scheduler_leaves_a_workflow_between_steps_for_the_next_one(
        wheap: dh.Heap, clock: Clock) -> None:
    """SIGTERM (here: the scheduler's `stop`, which its handler sets) came while a step
    ran: the scheduler went on with every later step until the workflow waited or
    ended, holding the stop up for as long as they took. It now commits the step in
    hand and stops: the workflow stays running, with a run timer due now, and the next
    scheduler goes on from the next step. Each step runs once."""
    stop = threading.Event()
    bump = _counter(wheap)

    @wheap.action
    def slow(n: int) -> int:
        bump(f"step {n}")
        if n == 1:
            stop.set()  # as if SIGTERM came now, while step 1 runs
        return n

    @wheap.workflow
    def flow() -> int:
        dh.sleep(1)
        return slow(1) + slow(2) + slow(3)

    h = flow()
    clock.advance(1)
    _schedule_until_stopped(wheap, stop)
    assert dict(wheap.state.counts) == {"step 1": 1}  # step 1 committed; 2 and 3 left
    assert h.status == "running"
    assert [(t.kind, t.target, t.origin) for t in wheap.timers()] == [("run", h.id, "resume")]
    assert wheap.run_due() == 1  # the next scheduler: replays step 1, runs 2 and 3
    assert h.result() == 6
    assert dict(wheap.state.counts) == {"step 1": 1, "step 2": 1, "step 3": 1}


SLOW_STEPS = """
import sys, time
import durable_heap as dh
from durable_heap import state

state.setdefault("effects", [])

def slow(n):
    print(f"step {n}", flush=True)
    state.effects.append(n)
    time.sleep(1.0)
    return n

@dh.workflow
def flow():
    dh.sleep(0.2)
    return slow(1) + slow(2) + slow(3)

def effects():
    return list(state.effects)
"""


@pytest.mark.slow
def test_sigterm_stops_a_worker_after_the_step_in_hand(tmp_path: Path) -> None:
    """A real `durable-heap worker`, SIGTERM while the first of three 1 s steps runs: it
    stops once that step committed (it ran the other two first), and the next run goes
    on from step 2."""
    app = write(tmp_path / "slow.py", SLOW_STEPS)
    r = cli("call", str(app), "flow", cwd=tmp_path)
    assert r.stdout.split()[-1] == "waiting", r.stderr
    worker = subprocess.Popen([sys.executable, "-m", "durable_heap", "worker", str(app)], cwd=tmp_path,
                              env=subprocess_env({"PYTHONPATH": str(ROOT)}), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "step 1"
        worker.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = worker.communicate(timeout=60)
        stopped = time.monotonic() - t0
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "step 2" not in out and stopped < 2.5, (out, stopped)  # not the 2 s of steps 2 and 3
    assert json.loads(cli("call", str(app), "effects", cwd=tmp_path).stdout) == [1]
    r = cli("workflows", str(app), cwd=tmp_path)
    assert "running" in r.stdout, r.stdout
    assert cli("run-due", str(app), cwd=tmp_path).stdout.split() == ["step", "2", "step", "3", "1"]
    assert json.loads(cli("call", str(app), "effects", cwd=tmp_path).stdout) == [1, 2, 3]
    assert "done" in cli("workflows", str(app), cwd=tmp_path).stdout


def test_a_promise_goes_with_the_journal_of_the_workflow_that_got_it(wheap: dh.Heap, clock: Clock) -> None:
    """(Every promise a service ever made stayed in the heap for ever.) Its record is
    dropped with the journal of the last workflow that got it (resolved, or timed out),
    once no workflow waits on it: a name used again then is a new promise. One still
    awaited by another workflow is kept for it; one resolved while nobody waited on it
    (the email example's reply from a stranger) is kept for the heap's retention."""
    from durable_heap._workflows import PROMISES_KEY

    waits = _promise_waiter(wheap)

    def names() -> list[str]:
        with wheap.transaction():
            return sorted(wheap.connection.root()[PROMISES_KEY].keys())

    answered, expired = waits("answered", None), waits("expired", 10)
    first, second = waits("shared", 10), waits("shared", None)  # the second waits on after the first
    assert dh.resolve("answered", "yes")
    assert dh.resolve("never waited", 1)  # a resolve before any wait is kept, for the retention
    assert [(t.target, t.origin) for t in wheap.timers() if t.kind == "prune"] == [
        ("never waited", "unawaited promise")]
    clock.advance(11)
    wheap.run_due()
    assert (answered.result(), expired.result(), first.result()) == ("yes", "expired", "expired")
    assert names() == ["answered", "expired", "never waited", "shared"]
    clock.advance(wheap.retention + 1)
    wheap.run_due()  # the retention passed: journals dropped, the promises they got, the unawaited one
    assert names() == ["shared"]  # `second` still waits on it
    assert second.status == "waiting"
    assert dh.resolve("shared", "at last")
    wheap.run_due()
    assert second.result() == "at last"
    again = waits("answered", None)  # a new promise of that name: not the old "yes"
    assert again.status == "waiting"


def test_a_workflow_handle_can_be_stored_by_its_id(wheap: dh.Heap, tmp_path: Path) -> None:
    """The docs say to start a child workflow from a step (an action): one that returned
    the child's handle failed its parent ("the result of step 1 ... .heap._programs_lock
    cannot be stored: a _thread.RLock"). A handle is stored by its id, and loaded back as
    a handle on the active heap."""
    @wheap.workflow
    def child(x: int) -> int:
        return x * 2

    @wheap.action
    def start_child(x: int) -> dh.Workflow:
        return child(x)

    @wheap.workflow
    def parent(x: int) -> Any:
        handle = start_child(x)
        return handle, handle.id

    p = parent(3)
    handle, wid = p.result()
    assert isinstance(handle, dh.Workflow) and handle.id == wid and handle.status == "done"
    assert handle == wheap.workflow_by_id(wid) and handle.result() == 6
    with wheap.transaction() as state:
        state.children = [handle]
    wheap.close()
    with dh.open(tmp_path / "wf.fs") as heap:  # another heap object, as another process has
        loaded = heap.state.children[0]
        assert loaded == handle and loaded.heap is heap and loaded.result() == 6
        # In tagged JSON (durable-heap export and import, serve's answers): {"$workflow": id}.
        from durable_heap._jsonform import dumps, loads

        text = dumps({"kids": [loaded]})
        assert text == f'{{"kids": [{{"$workflow": "{wid}"}}]}}'
        back = loads(text)["kids"][0]
        assert back == handle and back.result() == 6
        with pytest.raises(dh.JSONFormError, match=r"malformed \$workflow"):
            loads('{"$workflow": 7}')


def test_a_stopping_scheduler_leaves_an_async_workflow_between_steps_too(
        wheap: dh.Heap, clock: Clock) -> None:
    """As `test_a_stopping_scheduler_leaves_a_workflow_between_steps_for_the_next_one`,
    for an ``async def`` workflow awaiting ``async def`` actions (`_Run.astep`)."""
    stop = threading.Event()
    bump = _counter(wheap)

    @wheap.action
    async def slow(n: int) -> int:
        bump(f"step {n}")
        if n == 1:
            stop.set()
        return n

    @wheap.workflow
    async def flow() -> int:
        await dh.sleep(1)
        return await slow(1) + await slow(2)

    h = flow()
    clock.advance(1)
    _schedule_until_stopped(wheap, stop)
    assert dict(wheap.state.counts) == {"step 1": 1} and h.status == "running"
    assert [(t.kind, t.origin) for t in wheap.timers()] == [("run", "resume")]
    assert wheap.run_due() == 1
    assert h.result() == 3 and dict(wheap.state.counts) == {"step 1": 1, "step 2": 1}
