"""One transaction per request for WSGI apps (Flask, Django): `TransactionMiddleware`.

    app.wsgi_app = TransactionMiddleware(app.wsgi_app, heap)     # Flask
    application = TransactionMiddleware(get_wsgi_application(), heap)   # Django

What it promises, per request (the same as `durable_heap.asgi`):

* The request runs in one transaction of the thread the WSGI server runs it
  in, with `heap` active (``durable_heap.state`` works in views).
* The response is **held back until the commit is done**: the body the app
  returns is read whole inside the transaction, then the transaction commits,
  and only then does the server get the status and the body. It commits when
  the status is below `commit_below` (500) and rolls back on a 5xx or an
  exception. A commit that fails answers an error instead (409, 422, 503, or
  500 with ``"outcome": "unknown"``): never the 200 the app meant to send.
* A conflict re-runs the whole request (its body is kept) up to `attempts` times;
  after a conflict a request's retries queue, one at a time in the process, and
  while one request is retrying the first tries of new ones queue too (as
  `durable-heap serve`'s calls do).
* `read_only_methods` (GET, HEAD, OPTIONS) never commit; one that changes state
  is answered 500 (`ReadOnlyRequestError`), its changes dropped.
* Streaming responses opt out through `exclude` (path prefixes or a predicate
  on the environ): they run with no request transaction.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import ConflictError, ReadOnlyRequestError
from ._facade import Heap
from ._http import Answer, error_answer
from ._requests import changed_in, conflict_after, excluder, read_only_answer, request_note
from ._retry import RetryQueue, backoff_delay

__all__ = ["TransactionMiddleware"]

log = logging.getLogger("durable_heap.wsgi")

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

DEFAULT_READ_ONLY = ("GET", "HEAD", "OPTIONS")

_STATUS_TEXT = {409: "Conflict", 422: "Unprocessable Entity", 500: "Internal Server Error",
                503: "Service Unavailable"}


class TransactionMiddleware:
    """Wrap a WSGI app: each request one transaction of `heap`, committed before its response.

    The same options as `durable_heap.asgi.TransactionMiddleware`.
    """

    def __init__(self, app: WSGIApp, heap: Heap, *, commit_below: int = 500,
                 read_only_methods: Iterable[str] = DEFAULT_READ_ONLY, attempts: int | None = None,
                 exclude: Iterable[str] | Callable[[Environ], bool] = ()) -> None:
        self.app = app
        self.heap = heap
        self.commit_below = commit_below
        self.read_only_methods = frozenset(m.upper() for m in read_only_methods)
        self.attempts = attempts or heap.max_attempts
        self._excluded: Callable[[Environ], bool] = excluder(
            exclude, lambda env: str(env.get("PATH_INFO", "")))
        #: Held by a request's retries after a conflict: one at a time in this process,
        #: as `durable-heap serve` does (`_serve.Service._call`, and the ASGI
        #: middleware's `_Queue`, which says why). While `hot` requests are between
        #: their first conflict and their end, new requests' first tries queue too.
        self._retrying = RetryQueue()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._excluded(environ):
            with self.heap.activate():
                return self.app(environ, start_response)
        body = _read_body(environ)
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        note = request_note(method, str(environ.get("PATH_INFO", "")))
        read_only = method in self.read_only_methods
        hot = False  # this request has conflicted: counted in self._retrying.hot until it ends
        try:
            for attempt in range(1, self.attempts + 1):
                env = dict(environ)
                env["wsgi.input"] = io.BytesIO(body)
                held: dict[str, Any] = {}
                try:
                    if attempt == 1 and (read_only or not self._retrying.hot):  # reads never queue
                        status, headers, chunks = self._attempt(env, held, read_only, note, method)
                    else:
                        with self._retrying.lock:
                            status, headers, chunks = self._attempt(env, held, read_only, note, method)
                except ConflictError as exc:
                    if not hot:
                        hot = True
                        self._retrying.enter()
                    if attempt < self.attempts:
                        time.sleep(backoff_delay(attempt))
                        continue
                    answer = error_answer(conflict_after(exc, attempt, note))
                except _Failed as failed:
                    if "status" in failed.held:  # the app's own error answer: sent, rolled back
                        held = failed.held
                        start_response(held["status"], held["headers"], held.get("exc_info"))
                        sent: list[bytes] = held.get("chunks", [])
                        return sent
                    raise failed.exc from None
                except Exception as exc:  # noqa: BLE001 - the commit failed: an error, never a 200
                    log.error("%s %s: %s", method, environ.get("PATH_INFO"), exc)
                    answer = error_answer(exc)
                else:
                    start_response(status, headers)
                    return chunks
                return _send_answer(start_response, answer)
        finally:
            if hot:
                self._retrying.leave()
        raise AssertionError("unreachable")

    def _attempt(self, env: Environ, held: dict[str, Any], read_only: bool, note: str,
                 method: str) -> tuple[str, list[tuple[str, str]], list[bytes]]:
        heap = self.heap
        chunks: list[bytes] = []

        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: Any = None) -> Callable[[bytes], object]:
            held.update(status=status, headers=list(headers), exc_info=exc_info)
            return chunks.append  # the legacy write(): held back too

        with heap.activate():
            try:
                with heap.transaction(note):
                    try:
                        result = self.app(env, start)
                        try:
                            chunks.extend(result)  # the whole body, inside the transaction
                        finally:
                            close = getattr(result, "close", None)
                            if close is not None:
                                close()
                    except ConflictError:
                        raise
                    except Exception as exc:
                        held["chunks"] = chunks
                        raise _Failed(exc, held) from exc
                    if "status" not in held:
                        raise RuntimeError("the WSGI app returned without calling start_response")
                    code = int(str(held["status"]).split(" ", 1)[0])
                    if read_only:
                        changed = changed_in(heap.connection)
                        if changed is not None:
                            raise ReadOnlyRequestError(read_only_answer(method, changed))
                        raise _Rollback
                    if code >= self.commit_below:
                        raise _Rollback
            except _Rollback:
                pass
        return held["status"], held["headers"], chunks


class _Rollback(Exception):
    """Internal: leave the transaction without committing it, and send what the app answered."""


class _Failed(Exception):
    """Internal: the app raised; its transaction was rolled back."""

    def __init__(self, exc: Exception, held: dict[str, Any]) -> None:
        super().__init__(str(exc))
        self.exc, self.held = exc, held


def _read_body(environ: Environ) -> bytes:
    """The whole request body (kept: a retry replays it)."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.strip().isdigit():
        return stream.read(int(length))  # type: ignore[no-any-return]
    if environ.get("wsgi.input_terminated"):
        return stream.read()  # type: ignore[no-any-return]
    return b""


def _send_answer(start_response: StartResponse, answer: Answer) -> list[bytes]:
    status, headers, body = answer
    start_response(f"{status} {_STATUS_TEXT.get(status, 'Error')}",
                   [*headers, ("Content-Length", str(len(body)))])
    return [body]
