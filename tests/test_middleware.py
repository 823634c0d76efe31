"""The transaction middlewares: a real FastAPI app under uvicorn, a real Flask app under waitress."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import durable_heap as dh
from durable_heap.testing import ZeoServer

fastapi = pytest.importorskip("fastapi")
flask = pytest.importorskip("flask")
uvicorn = pytest.importorskip("uvicorn")
waitress_server = pytest.importorskip("waitress.server")


@dataclasses.dataclass
class Item:
    name: str
    f: Any = None


class _KillAtVote:
    """Votes after the heap's connection and kills the ZEO server then: the commit is in
    doubt (the server had the transaction, never its finish). The kill is real."""

    def __init__(self, server: ZeoServer) -> None:
        self.server = server

    def sortKey(self) -> str:  # noqa: N802 - ZODB's name
        return "~ after every ZODB connection"

    def tpc_vote(self, txn: object) -> None:
        self.server.kill()

    def abort(self, txn: object) -> None: ...
    def tpc_begin(self, txn: object) -> None: ...
    def commit(self, txn: object) -> None: ...
    def tpc_finish(self, txn: object) -> None: ...
    def tpc_abort(self, txn: object) -> None: ...


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def counted(heap: dh.Heap) -> dh.Heap:
    with heap.transaction() as state:
        state.count = 0
        state.items = []
        state.item = Item("a")  # a plain object: changed in place, only the watch sees it
    return heap


# --- the apps: the same routes in FastAPI and in Flask ------------------------------------


def fastapi_app(heap: dh.Heap, zeo: ZeoServer | None = None, attempts: int | None = 40) -> Any:
    from fastapi import FastAPI, HTTPException

    from durable_heap import state
    from durable_heap.asgi import TransactionMiddleware

    app = FastAPI()

    @app.post("/count")
    async def count() -> dict[str, int]:  # an async view: its task's transaction
        state.count += 1
        return {"count": state.count}

    @app.post("/count_sync")
    def count_sync() -> dict[str, int]:  # a sync view in the thread pool: its thread's own
        heap.state.count += 1
        return {"count": heap.state.count}

    @app.get("/peek")
    async def peek() -> dict[str, int]:
        return {"count": state.count}

    @app.get("/sneaky")
    def sneaky() -> dict[str, int]:
        heap.state.count += 1
        return {"count": heap.state.count}

    @app.get("/sneaky_plain")
    def sneaky_plain() -> dict[str, str]:
        heap.state.item.name = "changed"
        return {"name": heap.state.item.name}

    @app.post("/rename")
    async def rename() -> dict[str, str]:  # a plain object changed in place, in a write
        state.item.name += "+"
        return {"name": state.item.name}

    @app.post("/rename_sync")
    def rename_sync() -> dict[str, str]:
        heap.state.item.name += "+"
        return {"name": heap.state.item.name}

    @app.post("/busy")
    async def busy() -> None:
        state.count += 100
        raise HTTPException(503, "busy")

    @app.post("/raise")
    async def fail() -> None:
        state.count += 100
        raise ValueError("the view said no")

    @app.post("/missing")
    async def missing() -> None:
        state.count += 100
        raise HTTPException(404, "no such thing")  # a 4xx commits: it is an answer, not a failure

    @app.post("/unstorable")
    async def unstorable() -> dict[str, str]:
        state.count += 100
        state.items.append(Item("a"))
        state.items[-1].f = lambda: 1  # changed in place: found at the commit, after the view
        return {"ok": "so the view thought"}

    @app.post("/kill")
    async def kill() -> dict[str, int]:
        state.count += 1
        assert zeo is not None
        heap.transaction_manager.get().join(_KillAtVote(zeo))
        return {"count": state.count}

    # One hot record for every request: sync views keep their transaction open from
    # the thread until the answer, so they meet more conflicts than the default 10 tries
    # (attempts=None: the heap's default, with the retries queued one at a time).
    app.add_middleware(TransactionMiddleware, heap=heap, attempts=attempts)
    return app


def flask_app(heap: dh.Heap, zeo: ZeoServer | None = None, attempts: int | None = 40) -> Any:
    from flask import Flask, abort, jsonify

    from durable_heap import state
    from durable_heap.wsgi import TransactionMiddleware

    app = Flask("shop")

    @app.post("/count")
    def count() -> Any:
        state.count += 1
        return jsonify(count=state.count)

    @app.post("/count_sync")
    def count_sync() -> Any:
        heap.state.count += 1
        return jsonify(count=heap.state.count)

    @app.get("/peek")
    def peek() -> Any:
        return jsonify(count=state.count)

    @app.get("/sneaky")
    def sneaky() -> Any:
        state.count += 1
        return jsonify(count=state.count)

    @app.get("/sneaky_plain")
    def sneaky_plain() -> Any:
        state.item.name = "changed"
        return jsonify(name=state.item.name)

    @app.post("/rename")
    def rename() -> Any:
        state.item.name += "+"
        return jsonify(name=state.item.name)

    @app.post("/rename_sync")
    def rename_sync() -> Any:
        heap.state.item.name += "+"
        return jsonify(name=heap.state.item.name)

    @app.post("/busy")
    def busy() -> Any:
        state.count += 100
        abort(503)

    @app.post("/raise")
    def fail() -> Any:
        state.count += 100
        raise ValueError("the view said no")

    @app.post("/missing")
    def missing() -> Any:
        state.count += 100
        abort(404)

    @app.post("/unstorable")
    def unstorable() -> Any:
        state.count += 100
        state.items.append(Item("a"))
        state.items[-1].f = lambda: 1
        return jsonify(ok="so the view thought")

    @app.post("/kill")
    def kill() -> Any:
        state.count += 1
        assert zeo is not None
        heap.transaction_manager.get().join(_KillAtVote(zeo))
        return jsonify(count=state.count)

    app.wsgi_app = TransactionMiddleware(app.wsgi_app, heap, attempts=attempts)  # type: ignore[method-assign]
    return app


# --- the servers: uvicorn and waitress, in this process, on a free loopback port ----------


class _Uvicorn:
    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class _Waitress:
    def __init__(self, app: Any) -> None:
        self.server = waitress_server.create_server(app, host="127.0.0.1", port=0, threads=8)
        self.port = self.server.effective_port
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        # waitress has no stop call, and its close() from another thread races the
        # select of its loop (OSError: Bad file descriptor in the server's thread):
        # the loop runs in short slices here, and the server closes in this thread.
        server = self.server
        try:
            while not self._stop.is_set():
                server.asyncore.loop(timeout=0.05, map=server._map, count=1)
        finally:
            server.close()
            server.task_dispatcher.shutdown()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(30)


APPS: dict[str, tuple[Callable[..., Any], type[Any]]] = {
    "fastapi": (fastapi_app, _Uvicorn),
    "flask": (flask_app, _Waitress),
}


@pytest.fixture(params=sorted(APPS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(framework: str, counted: dh.Heap) -> Iterator[httpx.Client]:
    make, server_class = APPS[framework]
    server = server_class(make(counted))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client
    finally:
        server.close()


def _count(heap: dh.Heap) -> int:
    return int(heap.state.count)


# --- the tests ----------------------------------------------------------------------------


def test_each_request_is_one_transaction_committed_before_the_answer(
    served: httpx.Client, counted: dh.Heap
) -> None:
    r = served.post("/count")
    assert r.status_code == 200 and r.json() == {"count": 1}
    assert _count(counted) == 1  # committed by the time the answer came
    assert served.post("/count_sync").json() == {"count": 2}
    assert _count(counted) == 2
    assert served.get("/peek").json() == {"count": 2}
    r = served.post("/missing")
    assert r.status_code == 404 and _count(counted) == 102  # a 4xx is an answer: committed
    assert served.post("/busy").status_code == 503
    assert _count(counted) == 102  # a 5xx rolls back
    r = served.post("/raise")
    assert r.status_code == 500 and _count(counted) == 102  # an exception rolls back


def test_a_read_only_request_that_changes_state_is_an_error_and_changes_nothing(
    served: httpx.Client, counted: dh.Heap
) -> None:
    r = served.get("/sneaky")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "ReadOnlyRequestError"
    assert "GET request changed state" in error["message"] and "POST" in error["message"]
    assert _count(counted) == 0


def test_a_read_only_request_that_changes_a_plain_object_in_place_is_an_error_too(
    served: httpx.Client, counted: dh.Heap
) -> None:
    """A dataclass changed in place is in no ZODB change list: only the watch's snapshot
    comparison finds it. Dropping it without a word would lose the change silently."""
    r = served.get("/sneaky_plain")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "ReadOnlyRequestError"
    assert "state.item" in error["message"]
    counted.state._p_jar.sync()
    assert counted.state.item.name == "a"


def test_a_plain_object_changed_in_place_by_a_write_request_is_saved(
    served: httpx.Client, counted: dh.Heap
) -> None:
    """The middleware asks the request's transaction what it changed before committing
    it; that look took the changed dataclass as its record's snapshot, so the commit
    found nothing to save: the client got a 200 and the change was lost."""
    assert served.post("/rename").json() == {"name": "a+"}
    assert served.post("/rename_sync").json() == {"name": "a++"}
    counted.state._p_jar.sync()
    assert counted.state.item.name == "a++"


def test_a_commit_that_fails_after_the_view_returned_answers_an_error_not_a_200(
    served: httpx.Client, counted: dh.Heap
) -> None:
    r = served.post("/unstorable")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "NotPersistableError"
    assert "state.items[0].f" in r.json()["error"]["message"]
    assert _count(counted) == 0 and len(counted.state.items) == 0


@pytest.mark.parametrize("path", ["/count", "/count_sync"])
def test_concurrent_requests_on_one_entry_retry_to_the_exact_total(
    served: httpx.Client, counted: dh.Heap, path: str
) -> None:
    url = str(served.base_url)

    def one(_: int) -> int:
        r = httpx.post(url + path, timeout=120)
        assert r.status_code == 200, r.text
        return int(r.json()["count"])

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        counts = list(pool.map(one, range(40)))
    assert sorted(counts) == list(range(1, 41))  # each answer is its own commit's value
    assert _count(counted) == 40


def test_a_commit_lost_with_the_server_answers_500_outcome_unknown(framework: str, tmp_path: Path) -> None:
    zeo = ZeoServer(tmp_path / "zeo" / "app.fs")
    zeo.start()
    heap = dh.open(zeo.url + "?wait_timeout=5")
    make, server_class = APPS[framework]
    server = server_class(make(heap, zeo))
    try:
        with heap.transaction() as state:
            state.count = 0
            state.items = []
        r = httpx.post(server.url + "/kill", timeout=60)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["outcome"] == "unknown" and "may or may not have been committed" in error["message"]
        zeo.start()
        assert _count(heap) == 0  # the server never got the transaction's finish
    finally:
        server.close()
        heap.close()
        zeo.close()


@pytest.mark.parametrize("path", ["/count", "/count_sync"])
def test_a_storm_of_50_requests_on_one_entry_all_commit_with_the_default_attempts(
    framework: str, counted: dh.Heap, path: str
) -> None:
    """50 requests at once on one hot entry, the heap's default 10 tries: after a
    conflict a request's retries queue, one at a time in the process (as serve's do),
    so each retry meets at most new first tries; every request commits, exact total."""
    make, server_class = APPS[framework]
    server = server_class(make(counted, attempts=None))
    try:
        def one(_: int) -> int:
            r = httpx.post(server.url + path, timeout=120)
            assert r.status_code == 200, r.text
            return int(r.json()["count"])

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            counts = list(pool.map(one, range(50)))
    finally:
        server.close()
    assert sorted(counts) == list(range(1, 51))
    assert _count(counted) == 50
