"""asyncio: each task has its own transaction on its own connection, never a shared one.

Every test runs real coroutines on a real event loop (``asyncio.run``) against a
real FileStorage in a temporary folder (one over a real ZEO server).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import durable_heap as dh
from tests.conftest import ZeoServer


def _run(main: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
    """Run `main()` on a new event loop, failing (not hanging) after `timeout` seconds."""

    async def bounded() -> Any:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


def _racing_increments(heap: dh.Heap, tasks: int) -> Callable[[], Coroutine[Any, Any, Any]]:
    """Set ``state.n = 0``; return a coroutine function that runs `tasks` async actions
    at once, each reading n, yielding to the others (so they all conflict), then writing n + 1."""
    with heap.transaction() as s:
        s.n = 0

    @heap.action(attempts=1000)
    async def bump() -> None:
        n = heap.state.n
        await asyncio.sleep(0)  # every other task runs here: they all conflict
        heap.state.n = n + 1

    async def main() -> None:
        await asyncio.gather(*(bump() for _ in range(tasks)))

    return main


def _gather_example(heap: dh.Heap, *, use_async: bool) -> list[Any]:
    """The example of issue #12: B fails after both tasks started; A must not commit B's half."""
    with heap.transaction() as s:
        s.log = []

    async def job(name: str, fail: bool) -> None:
        if use_async:
            async with heap.transaction() as s:
                s.log.append(f"{name} start")
                await asyncio.sleep(0.1)
                s.log.append(f"{name} end")
                if fail:
                    raise ValueError(name)
        else:
            with heap.transaction() as s:  # a sync block in a coroutine: the task's own, too
                s.log.append(f"{name} start")
                await asyncio.sleep(0.1)
                s.log.append(f"{name} end")
                if fail:
                    raise ValueError(name)

    async def main() -> list[Any]:
        return await asyncio.gather(job("A", False), job("B", True), return_exceptions=True)

    results = _run(main)
    assert results[0] is None and isinstance(results[1], ValueError)
    return list(heap.state.log)


def test_the_gather_example_commits_a_whole_and_b_not_at_all(heap: dh.Heap) -> None:
    assert _gather_example(heap, use_async=False) == ["A start", "A end"]
    assert _gather_example(heap, use_async=True) == ["A start", "A end"]


def test_each_task_sees_its_own_state_connection_and_transaction(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.n = 0
    seen: dict[str, Any] = {}

    async def task(name: str, other_started: asyncio.Event, started: asyncio.Event) -> None:
        assert not heap.in_transaction
        async with heap.transaction() as s:
            assert heap.in_transaction and heap.state is s
            s.n += 1
            dh.state.mine = name  # the proxy means this task's state too
            started.set()
            await other_started.wait()
            assert s.n == 1 and dh.state.mine == name  # the other task's change is not seen
            seen[name] = (heap.connection, heap.transaction_manager)
        assert not heap.in_transaction

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task("A", b, a), task("B", a, b))

    with heap.activate(), pytest.raises(dh.ConflictError):  # both changed `n` from 0: the later conflicts
        _run(main)
    (conn_a, tm_a), (conn_b, tm_b) = seen["A"], seen["B"]
    assert conn_a is not conn_b and tm_a is not tm_b
    assert heap.connection not in (conn_a, conn_b)  # the thread's connection is neither
    assert heap.state.n == 1


def test_100_concurrent_tasks_increment_one_int_exactly(heap: dh.Heap) -> None:
    _run(_racing_increments(heap, 100), timeout=120)
    assert heap.state.n == 100


def test_event_loops_in_two_threads_share_a_heap(heap: dh.Heap) -> None:
    main = _racing_increments(heap, 20)  # run by two loops: 40 in all

    errors: list[BaseException] = []

    def loop_thread() -> None:
        try:
            _run(main, timeout=120)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=loop_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and heap.state.n == 40


def test_heap_attempts_in_a_coroutine_is_the_tasks_own(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.a, s.b = {}, {}

    async def block(name: str) -> int:
        tries = 0
        for attempt in heap.attempts():
            with attempt as s:
                tries += 1
                s[name]["v"] = tries
                await asyncio.sleep(0.01)
        return tries

    async def main() -> list[int]:
        return list(await asyncio.gather(block("a"), block("b")))

    assert _run(main) == [1, 1]  # separate transactions on separate records: no conflict
    assert heap.state.a["v"] == 1 and heap.state.b["v"] == 1


def test_an_async_action_retries_a_conflict_with_asyncio_sleep(
        heap: dh.Heap, monkeypatch: pytest.MonkeyPatch) -> None:
    with heap.transaction() as s:
        s.n = 0
    tries = 0

    def no_blocking_sleep(seconds: float) -> None:
        raise AssertionError("time.sleep blocked the event loop")

    async def main() -> None:
        started, other_committed = asyncio.Event(), asyncio.Event()

        @heap.action
        async def slow_bump() -> int:
            """Adds 1; its first try is overtaken by `quick`."""
            nonlocal tries
            tries += 1
            heap.state.n += 1
            if tries == 1:
                started.set()
                await other_committed.wait()
            return int(heap.state.n)

        @heap.action
        async def quick() -> None:
            heap.state.n += 10

        assert slow_bump.__name__ == "slow_bump" and "overtaken" in (slow_bump.__doc__ or "")
        slow = asyncio.create_task(slow_bump())
        await started.wait()
        await quick()
        other_committed.set()
        assert await slow == 11

    monkeypatch.setattr(time, "sleep", no_blocking_sleep)
    _run(main)
    monkeypatch.undo()
    assert tries == 2 and heap.state.n == 11


def test_an_async_action_gives_up_after_its_attempts(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.n = 0

    @heap.action(attempts=3)
    async def always_overtaken() -> None:
        heap.state.n += 1
        await other()  # nested: joins this transaction ...

    async def other() -> None:
        # ... but this is a transaction of another thread, committed meanwhile
        await asyncio.to_thread(heap.run, lambda: setattr(heap.state, "n", heap.state.n - 1))

    with pytest.raises(dh.ConflictError, match="tried 3 times"):
        _run(always_overtaken)
    assert heap.state.n == -3


@pytest.mark.parametrize("form", ["async with", "sync with"])
def test_a_cancelled_task_rolls_back_and_its_connection_goes_back_clean(heap: dh.Heap, form: str) -> None:
    with heap.transaction() as s:
        s.items = ["kept"]
        s.n = 0
    used: list[Any] = []

    async def main() -> None:
        inside = asyncio.Event()

        async def stuck() -> None:
            if form == "async with":
                async with heap.transaction() as s:
                    s.items.append("lost")
                    s.n = 99
                    used.append(heap.connection)
                    inside.set()
                    await asyncio.Event().wait()  # cancelled here
            else:
                with heap.transaction() as s:
                    s.items.append("lost")
                    s.n = 99
                    used.append(heap.connection)
                    inside.set()
                    await asyncio.Event().wait()  # cancelled here

        t = asyncio.create_task(stuck())
        await inside.wait()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert t.cancelled()

        async def after() -> list[str]:
            async with heap.transaction() as s:
                s.n += 1
                return list(s.items)

        assert await asyncio.create_task(after()) == ["kept"]

    _run(main)
    [conn] = used
    assert conn.opened is None  # closed: back in ZODB's pool ...
    assert not conn._registered_objects  # ... with nothing of the cancelled transaction
    assert list(heap.state.items) == ["kept"] and heap.state.n == 1


def test_a_task_created_inside_a_transaction_is_refused_it(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.log = []
    errors: list[BaseException] = []

    async def child(how: str, parent_done: asyncio.Event | None) -> str:
        if parent_done is not None:
            await parent_done.wait()  # the parent's transaction ended: this one is its own
            async with heap.transaction() as s:
                s.log.append("child")
            return "own"
        try:
            if how == "async":
                async with heap.transaction() as s:
                    s.log.append("child")
            elif how == "sync":
                with heap.transaction() as s:
                    s.log.append("child")
            elif how == "action":
                await heap.run(append, "child")
            else:
                heap.state.log.append("child")
        except dh.TransactionOwnerError as exc:
            errors.append(exc)
            assert not heap.in_transaction  # the parent's transaction is not this task's
            return "refused"
        return "shared"

    async def append(item: str) -> None:
        heap.state.log.append(item)

    def callback(fut: asyncio.Future[str]) -> None:
        try:
            heap.state.log.append("callback")
            fut.set_result("shared")
        except dh.TransactionOwnerError:
            fut.set_result("refused")

    async def main() -> list[str]:
        done = asyncio.Event()
        async with heap.transaction() as s:
            s.log.append("parent")
            results = await asyncio.gather(*(child(how, None) for how in ("async", "sync", "action", "read")))
            later = asyncio.create_task(child("later", done))
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(callback, fut)
            results.append(await fut)
        done.set()
        return [*results, await later]

    assert _run(main) == ["refused"] * 5 + ["own"]
    assert list(heap.state.log) == ["parent", "child"]
    assert "create_task" in str(errors[0]) and "start the task after" in str(errors[0])


def test_a_sync_function_in_a_thread_pool_gets_that_threads_own_transaction(heap: dh.Heap) -> None:
    """`asyncio.to_thread` copies the context, as Starlette, FastAPI and asgiref do."""
    with heap.transaction() as s:
        s.n = 0
    seen: dict[str, Any] = {}

    def in_thread() -> int:
        assert not heap.in_transaction  # the task's transaction is not this thread's
        with heap.transaction() as s:
            seen["thread"] = (threading.get_ident(), heap.connection)
            assert "draft" not in s  # the task's uncommitted change is not seen
            s.n += 1
            return int(s.n)

    async def main() -> None:
        async with heap.transaction() as s:
            s.draft = True
            seen["task"] = heap.connection
            assert await asyncio.to_thread(in_thread) == 1
            raise ValueError("the task's transaction rolls back; the thread's is committed")

    with pytest.raises(ValueError):
        _run(main)
    assert seen["thread"][0] != threading.get_ident() and seen["thread"][1] is not seen["task"]
    assert heap.state.n == 1 and "draft" not in heap.state


def test_nested_async_actions_and_blocks_join_the_outer_transaction(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.log = []

    @heap.action
    async def inner(item: str) -> None:
        heap.state.log.append(item)

    @heap.action
    def sync_inner(item: str) -> None:
        heap.state.log.append(item)

    @heap.action
    async def outer(fail: bool) -> None:
        conn = heap.connection
        await inner("async")
        sync_inner("sync")
        async with heap.transaction() as s:
            s.log.append("block")
            assert heap.connection is conn
        with heap.transaction() as s:
            s.log.append("sync block")
        if fail:
            raise ValueError("all of it rolls back")

    before = len(heap.db.undoLog(0, 1000))
    with pytest.raises(ValueError):
        _run(lambda: outer(True))
    assert list(heap.state.log) == []
    _run(lambda: outer(False))
    assert list(heap.state.log) == ["async", "sync", "block", "sync block"]
    log = heap.db.undoLog(0, 1000)
    assert len(log) == before + 1 and log[0]["description"].endswith(".outer(False)")


def test_at_most_max_async_transactions_are_open_at_once(heap_path: Any) -> None:
    heap = dh.open(heap_path, max_async_transactions=3)
    assert heap.max_async_transactions == 3
    with pytest.raises(ValueError):
        heap.max_async_transactions = 0
    with heap.transaction() as s:
        s.boxes = [{} for _ in range(4)]  # one record each: the tasks do not conflict
    open_now = peak = 0

    async def one(i: int) -> None:
        nonlocal open_now, peak
        async with heap.transaction() as s:
            open_now += 1
            peak = max(peak, open_now)
            await asyncio.sleep(0.05)
            s.boxes[i]["v"] = i
            open_now -= 1

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(4)))

    try:
        _run(main)
        assert peak == 3 and [b["v"] for b in heap.state.boxes] == [0, 1, 2, 3]
    finally:
        heap.close()


def test_the_bound_survives_cancelled_waiters_and_never_blocks_a_sync_block(heap: dh.Heap) -> None:
    heap.max_async_transactions = 1
    with heap.transaction() as s:
        s.a, s.b = {}, {}  # one record each: the holder and the sync block do not conflict

    async def main() -> None:
        holding, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with heap.transaction() as s:
                s.a["v"] = 1
                holding.set()
                await release.wait()

        async def waiter() -> None:
            async with heap.transaction() as s:
                s.never = 1

        h = asyncio.create_task(holder())
        await holding.wait()
        w = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)
        assert not w.done()  # waits for the place the holder has
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        with heap.transaction() as s:  # a sync block in a task does not wait: it would block the loop
            s.b["v"] = 2
        release.set()
        await h
        for i in range(3):  # the place came back: one after another, each gets it
            async with heap.transaction() as s:
                s.c = i
        gate = heap._gates[asyncio.get_running_loop()]
        assert gate.open == 0 and not gate.waiters

    _run(main)
    assert (heap.state.a["v"], heap.state.b["v"], heap.state.c) == (1, 2, 2) and "never" not in heap.state


def test_classes_changed_in_a_task_drops_the_tasks_cache(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.box = {"v": 1}
    thread_state = heap.state

    async def main() -> None:
        async with heap.transaction() as s:
            box = s.box
            heap.classes_changed()  # at the start of a transaction, as a program load does
            assert heap.state is not s and heap.state.box is not box and heap.state.box["v"] == 1
            heap.state.box["v"] = 2

    _run(main)
    assert heap.state.box["v"] == 2 and heap.state is not thread_state  # the thread's dropped at its next use


def test_async_forms_outside_an_asyncio_task_are_a_clear_error(heap: dh.Heap) -> None:
    block = heap.transaction().__aenter__()
    with pytest.raises(dh.TransactionOwnerError, match="inside an asyncio task"):
        block.send(None)


@pytest.mark.slow
def test_tasks_over_zeo(zeo_server: ZeoServer) -> None:
    heap = dh.open(zeo_server.url)
    try:
        assert _gather_example(heap, use_async=True) == ["A start", "A end"]
        _run(_racing_increments(heap, 40), timeout=120)
        assert heap.state.n == 40
    finally:
        heap.close()


def test_one_block_object_shared_by_two_tasks_is_refused(heap: dh.Heap) -> None:
    with heap.transaction() as s:
        s.a = {}
    block = heap.transaction()

    async def use(name: str, started: asyncio.Event) -> str:
        try:
            async with block as s:
                started.set()
                await asyncio.sleep(0.01)
                s.a[name] = 1
        except dh.TransactionOwnerError:
            return "refused"
        return "ran"

    async def main() -> list[str]:
        started = asyncio.Event()
        first = asyncio.create_task(use("first", started))
        await started.wait()
        return [await use("second", asyncio.Event()), await first]

    assert _run(main) == ["refused", "ran"]
    with block as s:  # one after another, the same object is fine
        s.a["again"] = 1
    assert sorted(heap.state.a) == ["again", "first"]
