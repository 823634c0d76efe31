"""`durable-heap serve` after a hot deploy: the first call already sees the new version's functions.

A deploy (by the watcher, or by another process) is loaded in a serving process at its
next call. Before, serve checked a call's function and arguments against the module
still loaded, so the first call of a function the deploy added was answered 404, and
the first call with arguments of a changed signature 400, until another call loaded
the new version.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from tests.test_serve import Served

V1 = """
    from os.path import join          # imported, not the program's: never an endpoint

    from durable_heap import state

    state.setdefault("count", 0)

    def count(by=1):
        state.count += by
        return state.count
"""

V2 = V1 + """
    def hello(name):
        return "hello " + name
"""

V3 = V2.replace("def count(by=1):\n        state.count += by",
                "def count(by=1, times=1):\n        state.count += by * times")


def _deployed(served: Served, number: int) -> None:
    deadline = time.monotonic() + 60
    while served.health()["version"]["number"] != number:
        assert time.monotonic() < deadline, served.text()
        time.sleep(0.1)


def test_the_first_call_after_a_deploy_reaches_a_new_function_and_a_new_signature(tmp_path: Path) -> None:
    program = tmp_path / "app.py"
    program.write_text(textwrap.dedent(V1))
    served = Served(program)
    try:
        assert served.post("/count").json() == {"result": 1}
        assert served.post("/hello", ["ann"]).status_code == 404  # not there yet

        program.write_text(textwrap.dedent(V2))
        _deployed(served, 2)
        r = served.post("/hello", ["ann"])  # the first call since the deploy
        assert r.status_code == 200, r.text
        assert r.json() == {"result": "hello ann"} and r.headers["x-durable-heap-version"] == "2"

        program.write_text(textwrap.dedent(V3))
        _deployed(served, 3)
        r = served.post("/count", {"by": 2, "times": 3})  # `times` is new in version 3
        assert r.status_code == 200, r.text
        assert r.json() == {"result": 7} and r.headers["x-durable-heap-version"] == "3"

        # Misses are still answered before any call: from the current version's functions.
        r = served.post("/nope")
        assert r.status_code == 404 and "count, hello" in r.json()["error"]["message"]
        assert served.post("/join", ["a", "b"]).status_code == 404
        r = served.post("/count", {"bz": 1})
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadArguments"
        assert "count(by=1, times=1)" in r.json()["error"]["message"]
        assert served.post("/count", [0]).json() == {"result": 7}  # the misses changed nothing
    finally:
        assert served.stop() == 0, served.text()


def test_a_broken_deploy_logs_the_version_in_force_as_the_one_serving(tmp_path: Path) -> None:
    """Version 2 deployed, not yet loaded by a call, then a broken file: the log named
    the version loaded in the process ("version 2 stays in force; version 1 keeps
    serving"); the next calls are served by version 2."""
    program = tmp_path / "app.py"
    program.write_text(textwrap.dedent(V1))
    served = Served(program)
    try:
        assert served.post("/count").json() == {"result": 1}
        program.write_text(textwrap.dedent(V2))
        _deployed(served, 2)
        program.write_text(textwrap.dedent(V2) + "\ndef broken(:\n")
        deadline = time.monotonic() + 60
        while served.health()["deploy"]["ok"]:
            assert time.monotonic() < deadline, served.text()
            time.sleep(0.1)
        log = served.text()
        assert "version 2 stays in force; version 2 keeps serving" in log, log
        r = served.post("/hello", ["bo"])
        assert r.status_code == 200 and r.headers["x-durable-heap-version"] == "2"
    finally:
        assert served.stop() == 0, served.text()
