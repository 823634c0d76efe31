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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Request", "Response", "render"]


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
        """The body parsed as JSON (plain JSON: the endpoint owns its format)."""
        return json.loads(self.body) if self.body.strip() else None


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
