"""`durable-heap serve` with `endpoint(request)`: a body that is not JSON, met by `request.json()`."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.test_serve import Served

SITE = """
    import json

    from durable_heap import state

    state.setdefault("hits", 0)

    def endpoint(request):
        if request.path == "/hit":
            state.hits += 1
            return {"page": request.json()["page"], "hits": state.hits}
        if request.path == "/careful":
            state.hits += 1
            try:
                return request.json()
            except json.JSONDecodeError as exc:  # the program may handle it itself
                return 422, {"mine": str(exc)}
        return {"hits": state.hits}
"""


def test_a_body_that_is_not_json_is_the_clients_400_not_the_programs_500(tmp_path: Path) -> None:
    program = tmp_path / "shop.py"
    program.write_text(textwrap.dedent(SITE))
    served = Served(program)
    try:
        r = served.client.post("/hit", content=b"page=a")
        assert r.status_code == 400, r.text  # was 500 JSONDecodeError
        error = r.json()["error"]
        assert error["type"] == "BadRequest"
        assert error["message"].startswith("the request body is not JSON: Expecting value")
        assert served.client.post("/hit", json={"page": "a"}).json() == {"page": "a", "hits": 1}
        r = served.client.post("/careful", content=b"{")
        assert r.status_code == 422 and "not JSON" in r.json()["mine"]
        assert served.client.get("/").json() == {"hits": 2}  # the 400 committed nothing
    finally:
        assert served.stop() == 0, served.text()
