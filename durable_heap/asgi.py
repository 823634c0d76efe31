"""One transaction per request for ASGI apps (Starlette, FastAPI): `TransactionMiddleware`.

    app = FastAPI()
    app.add_middleware(TransactionMiddleware, heap=heap)     # or TransactionMiddleware(app, heap)

What it promises, per HTTP request:

* The request runs in one transaction of its own asyncio task (the heap's rule:
  each task its own transaction), with `heap` active, so ``durable_heap.state``
  and ``heap.state`` work in views.
* The response is **held back until the commit is done**: the client never gets
  a success for a change that was then lost. The transaction commits when the
  status is below `commit_below` (500), and is rolled back on a 5xx or an
  exception. A commit that fails answers an error instead (409 conflict, 422
  not persistable, 503 nothing committed, 500 with ``"outcome": "unknown"``).
* A conflict re-runs the whole request (its body is kept for that) while
  nothing was sent, up to `attempts` times; after a conflict a request's retries
  queue, one at a time in the process, and while one request is retrying the
  first tries of new ones queue too (as `durable-heap serve`'s calls do).
* Requests of a `read_only_methods` method (GET, HEAD, OPTIONS) run in a
  transaction that is never committed; one that changes state is answered 500
  (`ReadOnlyRequestError`) and its changes are dropped.
* Sync views that the framework runs in its thread pool get their own
  transaction in that thread (see `durable_heap._requests`), committed or rolled
  back with the request's, before the response is sent.
* Streaming responses (server-sent events, large downloads) opt out: name them
  in `exclude` (path prefixes or a predicate on the ASGI scope). They run with
  no request transaction; open your own there (``async with heap.transaction()``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from transaction.interfaces import TransientError

from ._errors import ConflictError, ReadOnlyRequestError
from ._facade import Heap
from ._http import Answer, error_answer, send_answer
from ._requests import RequestScope, conflict_after, excluder, read_only_answer, request_note
from ._retry import backoff_delay

__all__ = ["TransactionMiddleware"]

log = logging.getLogger("durable_heap.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_READ_ONLY = ("GET", "HEAD", "OPTIONS")


class TransactionMiddleware:
    """Wrap an ASGI app: each HTTP request one transaction of `heap`, committed before its response.

    `commit_below`: statuses below it commit (default 500). `read_only_methods`:
    methods that never commit. `attempts`: tries on conflicts (default: the
    heap's). `exclude`: path prefixes, or a predicate on the scope, for
    requests that run without a request transaction (streaming responses).
    """

    def __init__(self, app: ASGIApp, heap: Heap, *, commit_below: int = 500,
                 read_only_methods: Iterable[str] = DEFAULT_READ_ONLY, attempts: int | None = None,
                 exclude: Iterable[str] | Callable[[Scope], bool] = ()) -> None:
        self.app = app
        self.heap = heap
        self.commit_below = commit_below
        self.read_only_methods = frozenset(m.upper() for m in read_only_methods)
        self.attempts = attempts or heap.max_attempts
        self._excluded: Callable[[Scope], bool] = excluder(exclude, lambda scope: str(scope.get("path", "")))
        #: The retry queue of each event loop (an asyncio.Lock belongs to the loop it
        #: was first used in): see `_Queue`.
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._excluded(scope):
            with self.heap.activate():
                await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        method = str(scope.get("method", "GET")).upper()
        read_only = method in self.read_only_methods
        note = request_note(method, str(scope.get("path", "")))
        queue = self._queue()
        hot = False  # this request has conflicted: counted in queue.hot until it ends
        try:
            for attempt in range(1, self.attempts + 1):
                held: list[Message] = []
                try:
                    if attempt == 1 and (read_only or not queue.hot):  # reads never queue
                        answer = await self._attempt(scope, body, disconnected, held, read_only, note)
                    else:
                        async with queue.lock:
                            answer = await self._attempt(scope, body, disconnected, held, read_only, note)
                except ConflictError as exc:
                    if not hot:
                        hot = True
                        queue.hot += 1
                    partial = getattr(exc, "partial", False)
                    if attempt < self.attempts and not partial:
                        await asyncio.sleep(backoff_delay(attempt))
                        continue
                    answer = error_answer(exc if partial else conflict_after(exc, attempt, note))
                except _Failed as failed:
                    if _complete(failed.held):
                        await _forward(send, failed.held)  # the app's own error answer, rolled back
                    # A response cut off by the exception (a stream's body that raised) is
                    # not sent: the client would get a 200 and a torn body. The exception
                    # goes on up, to the framework's error handler (a 500) or the server's.
                    raise failed.exc from None
                except Exception as exc:  # noqa: BLE001 - the commit failed: an error, never a 200
                    log.error("%s %s: %s", method, scope.get("path"), exc)
                    answer = error_answer(exc)
                break
        finally:
            if hot:
                queue.hot -= 1
        if answer is None:
            await _forward(send, held)
        else:
            await send_answer(send, answer)

    def _queue(self) -> _Queue:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        return queue

    async def _attempt(self, scope: Scope, body: bytes, disconnected: bool, held: list[Message],
                       read_only: bool, note: str) -> Answer | None:
        """One run of the app in one transaction; None: send what it answered (`held`)."""
        heap = self.heap
        sent_body = False

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnected:
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()  # nothing more comes: like a client that waits
            raise AssertionError("unreachable")

        async def hold(message: Message) -> None:
            held.append(message)

        with heap.activate():
            request = RequestScope(heap, note)
            token = request.enter()
            try:
                async with heap.transaction(note):
                    try:
                        await self.app(scope, replay, hold)
                    except TransientError:
                        raise  # a conflict while loading: the request runs again
                    except Exception as exc:
                        raise _Failed(exc, held) from exc
                    status = _status(held)
                    if read_only:
                        changed = request.changed()
                        if changed is not None:
                            method = str(scope.get("method", "GET"))
                            raise ReadOnlyRequestError(read_only_answer(method, changed))
                        raise _Rollback(None)  # nothing to commit: the transaction is dropped
                    if status is None or status >= self.commit_below:
                        raise _Rollback(None)
                    task_changed = request.changed(threads=False) is not None
                # The task's transaction is committed: now the sync views' own ones.
                request.commit_threads(after_changes=task_changed)
            except _Rollback as rollback:
                return rollback.answer
            finally:
                request.exit(token)  # rolls back what is still open
        return None


class _Queue:
    """One event loop's conflict queue, as `durable-heap serve` has (`_serve.Service._call`).

    A request's retries after a conflict hold `lock`: one at a time in the
    process. Under a storm on one hot record (50 requests at once on one entry)
    every try otherwise meets the others' commits and requests ran out of tries;
    queued, each round one of them commits and a try is spent only on a real
    chance. While a request is between its first conflict and its end (`hot`
    counts them), new requests' first tries queue too: with several commits of a
    process in flight (a ZEO client releases its commit lock at the finish,
    `durable_heap._zeo`), a queued retry otherwise met fresh first tries each
    round. While nothing conflicts no request waits, and read-only requests
    (which never commit, so never conflict) never wait.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.hot = 0


class _Rollback(Exception):
    """Internal: leave the transaction without committing it, then answer `answer` (None: as held)."""

    def __init__(self, answer: Answer | None) -> None:
        super().__init__()
        self.answer = answer


class _Failed(Exception):
    """Internal: the app raised; its transaction was rolled back, and `exc` goes on up."""

    def __init__(self, exc: Exception, held: list[Message]) -> None:
        super().__init__(str(exc))
        self.exc, self.held = exc, held


def _status(held: list[Message]) -> int | None:
    for m in held:
        if m.get("type") == "http.response.start":
            return int(m["status"])
    return None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body (kept: a retry replays it), and whether the client left."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _complete(held: list[Message]) -> bool:
    """The held messages are a whole response: its start and its last body message."""
    last = held[-1] if held else None
    return (last is not None and last.get("type") == "http.response.body"
            and not last.get("more_body", False) and _status(held) is not None)


async def _forward(send: Send, held: list[Message]) -> None:
    for message in held:
        await send(message)
