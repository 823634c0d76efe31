"""Property: a workflow replayed from its journal gives what its first run gave."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import durable_heap as dh
from durable_heap import _workflows
from durable_heap.testing import Clock

# One op of a random workflow: a step, a sleep, a promise (resolved before or after
# the wait, or never: then it times out), or a journaled value.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 3)),
        st.tuples(st.just("raising step"), st.integers(0, 3)),
        st.tuples(st.just("sleep"), st.integers(1, 5000)),
        st.tuples(st.just("promise"), st.sampled_from(["before", "after", "never"])),
        st.tuples(st.just("now"), st.just(0)),
        st.tuples(st.just("random"), st.just(0)),
        st.tuples(st.just("uuid"), st.just(0)),
    ),
    max_size=8,
)

_names = itertools.count()
_calls: list[str] = []


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[dh.Heap, Clock, Any]]:
    clock = Clock(1_700_000_000)
    with tempfile.TemporaryDirectory() as folder:
        heap = dh.open(Path(folder) / "replay.fs", clock=clock)
        with heap.transaction() as state:
            state.counts = {}

        @heap.action
        def step(key: str, n: int) -> int:
            _calls.append(key)
            counts = heap.state.counts
            counts[key] = counts.get(key, 0) + n
            return int(counts[key])

        @heap.action
        def raising_step(key: str) -> None:
            _calls.append(key)
            raise ValueError(f"raised {key}")

        @heap.workflow
        def scripted(wid: str, script: list[tuple[str, Any]]) -> list[Any]:
            seen: list[Any] = []
            for i, (op, arg) in enumerate(script):
                key = f"{wid}:{i}"
                if op == "step":
                    seen.append(step(key, arg))
                elif op == "raising step":
                    try:
                        raising_step(key)
                    except ValueError as exc:
                        seen.append(str(exc))
                elif op == "sleep":
                    dh.sleep(arg)
                    seen.append(("slept", dh.now().timestamp()))
                elif op == "promise":
                    try:
                        seen.append(dh.promise(key).wait(timeout=None if arg != "never" else 60))
                    except dh.PromiseTimeout:
                        seen.append("timeout")
                elif op == "now":
                    seen.append(dh.now().timestamp())
                elif op == "random":
                    seen.append(dh.random())
                else:
                    seen.append(str(dh.uuid4()))
            return seen

        try:
            yield heap, clock, scripted
        finally:
            heap.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
def test_replay_gives_the_first_runs_results(setup: tuple[dh.Heap, Clock, Any],
                                             script: list[tuple[str, Any]]) -> None:
    heap, clock, scripted = setup
    wid = f"w{next(_names)}"
    for i, (op, arg) in enumerate(script):
        if op == "promise" and arg == "before":
            dh.resolve(f"{wid}:{i}", ("value", i))
    _calls.clear()
    handle = scripted.start(wid, script, workflow_id=wid)
    for _ in range(4 * len(script) + 2):
        if handle.status == "done":
            break
        for i, (op, arg) in enumerate(script):
            if op == "promise" and arg == "after":
                dh.resolve(f"{wid}:{i}", ("late", i))
        clock.advance(3600)
        heap.run_due()
    first = handle.result()
    steps = [f"{wid}:{i}" for i, (op, _) in enumerate(script) if op in ("step", "raising step")]
    assert sorted(_calls) == sorted(steps)  # each step ran once, however often the body was replayed
    assert _workflows.replay(heap, wid) == first  # the journal alone gives the same results
    assert sorted(_calls) == sorted(steps)  # and replaying ran nothing
