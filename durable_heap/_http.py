"""`Request` and `Response`: what a program's ``endpoint(request)`` gets and may return.

Small on purpose: plain data, no framework. `durable-heap serve` builds a
`Request` for every request that does not start with ``/_`` when the program
defines ``endpoint``, and turns what the endpoint returns into the answer (see
`render`): a `Response`, ``(status, body)``, ``(status, body, headers)``, a
``str`` (text/plain), ``bytes`` (application/octet-stream), or any other value
(tagged JSON, as for function results).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import (
    ClassNotAllowedError,
    ConflictError,
    CorruptHeapError,
    DurableHeapError,
    FunctionNotFoundError,
    HeapClosedError,
    JSONFormError,
    NotPersistableError,
    StorageError,
)

__all__ = ["Answer", "Request", "Response", "error_answer", "render", "send_answer"]

#: (status, headers, body): an answer ready to send.
Answer = tuple[int, list[tuple[str, str]], bytes]


async def send_answer(send: Callable[[dict[str, Any]], Awaitable[None]], answer: Answer) -> None:
    """Send `answer` through an ASGI ``send``: the start with its length, then the body."""
    status, headers, body = answer
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Request:
    """One HTTP request, read whole before the program runs.

    `headers` has lower-case names (repeated headers joined with ``", "``);
    `query` maps each parameter to its last value (`query_items` keeps them all).

    >>> r = Request("POST", "/items", "a=1&a=2", {"content-type": "application/json"}, b'{"x": 1}')
    >>> r.query, r.json()
    ({'a': '2'}, {'x': 1})
    """

    method: str
    path: str
    query_string: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def query(self) -> dict[str, str]:
        return dict(self.query_items)

    @property
    def query_items(self) -> list[tuple[str, str]]:
        from urllib.parse import parse_qsl

        return parse_qsl(self.query_string, keep_blank_values=True)

    def text(self) -> str:
        """The body as text (UTF-8)."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (plain JSON: the endpoint owns its format).

        A body that is not JSON raises `BadRequestBody` (a ``json.JSONDecodeError``),
        which, left uncaught, answers 400: the client's fault, not the program's 500.
        """
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise BadRequestBody(exc.msg, exc.doc, exc.pos) from None


class BadRequestBody(json.JSONDecodeError):
    """`Request.json()` of a body that is not JSON: answered 400 ``BadRequest`` unless caught."""

    def __str__(self) -> str:
        return f"the request body is not JSON: {super().__str__()}"


@dataclass
class Response:
    """An answer with a status and headers of the program's choosing.

    `body` is ``str``, ``bytes`` or a value written as tagged JSON; without a
    ``content-type`` header the type follows the body (text/plain,
    application/octet-stream, application/json).
    """

    body: Any = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class _Answer(Exception):
    """Internal: abort the transaction and send this answer (an endpoint's 5xx, a bad request)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[0])
        self.answer = answer


def _json_answer(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Answer:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return status, [("content-type", "application/json"), *(headers or [])], body


def _error(status: int, kind: str, message: str, **extra: Any) -> Answer:
    return _json_answer(status, {"error": {"type": kind, "message": message, **extra}})


def error_answer(exc: BaseException, *, debug: bool = False) -> Answer:
    """The answer for an exception of a call: its status says what the client may do.

    Most specific first: the storage errors that are not about availability
    (damage, the allowlist) before `StorageError`.
    """
    kind = type(exc).__name__
    message = str(exc)
    if isinstance(exc, _Answer):
        return exc.answer
    if isinstance(exc, BadRequestBody):
        return _error(400, "BadRequest", message)
    if isinstance(exc, FunctionNotFoundError):
        return _error(404, kind, message)
    if isinstance(exc, NotPersistableError):
        return _error(422, kind, message)
    if isinstance(exc, ConflictError):
        return _error(409, kind, message)
    if isinstance(exc, (CorruptHeapError, ClassNotAllowedError)):
        return _error(500, kind, message)
    if isinstance(exc, StorageError) and exc.outcome_unknown:
        # The commit may have happened: never a 503, which would invite a blind retry.
        return _error(500, kind, message, outcome="unknown")
    if isinstance(exc, (StorageError, HeapClosedError)):
        return _status_headers(_error(503, kind, message, outcome="not committed"), [("retry-after", "1")])
    if isinstance(exc, JSONFormError):  # the result cannot be written: the call was rolled back
        return _error(500, kind, f"the result cannot be sent: {message}; nothing was committed")
    if isinstance(exc, DurableHeapError):
        return _error(500, kind, message)
    extra: dict[str, Any] = {}
    if debug:
        extra["traceback"] = "".join(traceback.format_exception(exc))
    return _error(500, kind, message, **extra)


def _status_headers(answer: Answer, more: list[tuple[str, str]]) -> Answer:
    return answer[0], [*answer[1], *more], answer[2]


def render(value: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body bytes) for what an endpoint returned."""
    from ._jsonform import dumps

    status, headers = 200, {}
    if isinstance(value, Response):
        status, headers, value = value.status, dict(value.headers), value.body
    elif (isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[0], int)
          and not isinstance(value[0], bool)):
        if len(value) == 3:
            headers = dict(value[2])
        status, value = value[0], value[1]
    if not 100 <= status <= 599:
        raise ValueError(f"the endpoint returned the HTTP status {status}, which is not one (100 to 599)")
    lower = {k.lower(): v for k, v in headers.items()}
    if isinstance(value, str):
        body, kind = value.encode("utf-8"), "text/plain; charset=utf-8"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        body, kind = bytes(value), "application/octet-stream"
    else:
        body, kind = dumps(value).encode("utf-8"), "application/json"
    lower.setdefault("content-type", kind)
    return status, list(lower.items()), body
