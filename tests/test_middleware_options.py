"""The middlewares' options, each as docs/api.md gives it: `commit_below`, `read_only_methods`,
`exclude` (streaming responses). Real FastAPI under uvicorn, real Flask under waitress."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import durable_heap as dh

pytest.importorskip("fastapi")
pytest.importorskip("flask")
pytest.importorskip("uvicorn")
pytest.importorskip("waitress")

from tests.test_middleware import _Uvicorn, _Waitress  # noqa: E402 - after the skips
from tests.test_middleware_queue import _bump  # noqa: E402


def fastapi_app(heap: dh.Heap, seen: dict[str, Any], **options: Any) -> Any:
    import asyncio

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    from durable_heap import state
    from durable_heap.asgi import TransactionMiddleware

    app = FastAPI()

    @app.post("/missing")
    async def missing() -> None:
        state.count += 1
        raise HTTPException(404, "no such thing")

    @app.api_route("/change", methods=["GET", "PUT"])
    async def change() -> dict[str, int]:
        state.count += 1
        return {"count": state.count}

    @app.get("/events")
    async def events() -> Any:
        seen["in_transaction"] = heap.in_transaction

        async def stream() -> Any:
            yield b"one "
            # Excluded, the first chunk reaches the client now, and it answers; held
            # back (the default), it would reach it only after the stream ended.
            got = await asyncio.to_thread(seen["client_got_first"].wait, 30)
            async with heap.transaction() as s:  # the stream's own transaction
                s.count += 10
            yield b"two" if got else b"late"

        return StreamingResponse(stream(), media_type="text/plain")

    @app.post("/stream_state")
    async def stream_state() -> Any:
        state.count += 1

        async def stream() -> Any:
            yield b"one "
            # Starlette runs a streaming body in a task of its own (a task group): the
            # request's transaction is not its, so this raises TransactionOwnerError.
            yield str(state.count).encode()

        return StreamingResponse(stream(), media_type="text/plain")

    from fastapi import Depends

    async def note_it() -> None:  # an async dependency: runs in the request's task
        state.log.append("dependency")

    @app.post("/two_parts", dependencies=[Depends(note_it)])
    def two_parts() -> dict[str, int]:  # a sync view: its thread's own transaction
        n = heap.state.count
        _bump(heap)  # a concurrent commit: this part conflicts at its commit
        heap.state.count = n + 1
        return {"count": heap.state.count}

    app.add_middleware(TransactionMiddleware, heap=heap, **options)
    return app




def flask_app(heap: dh.Heap, seen: dict[str, Any], **options: Any) -> Any:
    from flask import Flask, Response, abort, jsonify

    from durable_heap import state
    from durable_heap.wsgi import TransactionMiddleware

    app = Flask("options")

    @app.post("/missing")
    def missing() -> Any:
        state.count += 1
        abort(404)

    @app.route("/change", methods=["GET", "PUT"])
    def change() -> Any:
        state.count += 1
        return jsonify(count=state.count)

    @app.get("/events")
    def events() -> Any:
        seen["in_transaction"] = heap.in_transaction

        def stream() -> Iterator[bytes]:
            yield b"one "
            with heap.transaction() as s:
                s.count += 10
            yield b"two"

        return Response(stream(), mimetype="text/plain")

    app.wsgi_app = TransactionMiddleware(app.wsgi_app, heap, **options)  # type: ignore[method-assign]
    return app


APPS = {"fastapi": (fastapi_app, _Uvicorn), "flask": (flask_app, _Waitress)}


@pytest.fixture(params=sorted(APPS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def counted(heap: dh.Heap) -> dh.Heap:
    with heap.transaction() as s:
        s.count = 0
        s.log = []
    return heap


def _serve(framework: str, heap: dh.Heap, seen: dict[str, Any], **options: Any) -> Any:
    make, server_class = APPS[framework]
    return server_class(make(heap, seen, **options))


def _count(heap: dh.Heap) -> int:
    with heap.transaction() as s:
        return int(s.count)


def test_commit_below_400_rolls_back_a_4xx(framework: str, counted: dh.Heap) -> None:
    server = _serve(framework, counted, {}, commit_below=400)
    try:
        assert httpx.post(server.url + "/missing", timeout=60).status_code == 404
        assert _count(counted) == 0  # with the default (500) a 404 commits: test_middleware
        assert httpx.put(server.url + "/change", timeout=60).status_code == 200
        assert _count(counted) == 1
    finally:
        server.close()


def test_read_only_methods_are_configurable(framework: str, counted: dh.Heap) -> None:
    server = _serve(framework, counted, {}, read_only_methods=["put"])  # any case
    try:
        r = httpx.put(server.url + "/change", timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "ReadOnlyRequestError", r.text
        assert "PUT request changed state" in r.json()["error"]["message"]
        assert _count(counted) == 0
        r = httpx.get(server.url + "/change", timeout=60)  # GET is no longer read-only: it commits
        assert r.status_code == 200 and r.json() == {"count": 1}
        assert _count(counted) == 1
    finally:
        server.close()


def test_an_excluded_streaming_response_runs_without_a_request_transaction(
    framework: str, counted: dh.Heap
) -> None:
    seen: dict[str, Any] = {"client_got_first": threading.Event()}
    server = _serve(framework, counted, seen, exclude=["/events"])
    try:
        with httpx.stream("GET", server.url + "/events", timeout=60) as r:
            chunks = r.iter_raw()
            body = next(chunks)
            seen["client_got_first"].set()  # the FastAPI stream waits for this
            body += b"".join(chunks)
        assert r.status_code == 200
        assert body == b"one two"  # FastAPI: streamed, the first chunk before the end
        assert seen["in_transaction"] is False  # the view ran with no request transaction
        assert _count(counted) == 10  # the stream's own transaction committed
    finally:
        seen["client_got_first"].set()
        server.close()


def test_a_held_stream_that_raises_is_answered_500_whole_not_a_torn_200(counted: dh.Heap) -> None:
    """A streaming body that raises after its first chunk: the held 200 and its first
    chunk are not sent (the client would get a 200 and a cut-off body); the framework
    answers 500, and nothing of the request is committed."""
    server = _serve("fastapi", counted, {})
    try:
        r = httpx.post(server.url + "/stream_state", timeout=60)  # was: RemoteProtocolError
    finally:
        server.close()
    assert r.status_code == 500 and b"one" not in r.content
    assert _count(counted) == 0


def test_an_async_part_and_a_sync_view_that_conflicts_answer_409_without_a_rerun(counted: dh.Heap) -> None:
    """docs/api.md: the async part (a dependency) and the sync view commit as two
    transactions, the async one first; a conflict in the second after the first
    committed is answered 409 without running the request again (that would repeat
    the committed part), and the message says so."""
    server = _serve("fastapi", counted, {})
    try:
        r = httpx.post(server.url + "/two_parts", timeout=60)
    finally:
        server.close()
    assert r.status_code == 409, r.text
    assert "committed already, so it is not run again" in r.json()["error"]["message"]
    with counted.transaction() as s:
        assert list(s.log) == ["dependency"]  # committed once: not re-run
        assert s.count == 1000  # the concurrent commit only: the view's part was not


@pytest.mark.parametrize("framework_name", sorted(APPS))
def test_a_storage_gone_before_the_commit_is_503_not_committed(framework_name: str, tmp_path: Any) -> None:
    """The ZEO server is down when the request comes: 503, `"outcome": "not committed"`,
    `retry-after`: a client may retry blindly. (500 "unknown" is for a commit in doubt:
    test_middleware.)"""
    from durable_heap.testing import ZeoServer

    zeo = ZeoServer(tmp_path / "zeo" / "app.fs")
    zeo.start()
    heap = dh.open(zeo.url + "?wait_timeout=2")
    server = None
    try:
        with heap.transaction() as s:
            s.count = 0
            s.log = []
        server = _serve(framework_name, heap, {})
        assert httpx.put(server.url + "/change", timeout=60).json() == {"count": 1}
        zeo.close()
        r = httpx.put(server.url + "/change", timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "ServerUnavailableError" and error["outcome"] == "not committed"
        assert "nothing of it was committed" in error["message"]
        zeo.start()
        assert _count(heap) == 1
    finally:
        if server is not None:
            server.close()
        heap.close()
        zeo.close()
