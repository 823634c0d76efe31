"""`durable-heap serve`: a real server subprocess on a free loopback port, driven by httpx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from durable_heap.testing import ZeoServer, first_line, subprocess_env

from .conftest import cli, write

COUNTER = """
    import asyncio
    import datetime
    import os
    import threading
    import time

    import durable_heap
    from durable_heap import state

    state.setdefault("count", 0)
    state.setdefault("log", [])

    def count(by=1):
        state.count += by
        return state.count

    def count_pid():
        state.count += 1
        return [state.count, os.getpid()]

    def echo(*args, **kwargs):
        return {"args": args, "kwargs": kwargs}

    def later(day, days=1):
        return day + datetime.timedelta(days=days)

    def items():
        return state.log

    def boom():
        state.count += 1000
        raise ValueError("the program said no")

    def keep_a_lambda():
        state.count += 1000
        state.f = lambda: 1

    def unsendable():
        state.count += 1000
        return object()

    def slow(seconds, marker=None):
        if marker:
            open(marker, "w").close()  # the test waits for these: the call is in flight
        time.sleep(seconds)
        state.count += 1
        return state.count

    def clash():
        # Every try meets a commit of another thread to the same record: never commits.
        state.count += 1
        heap = durable_heap.active_heap()

        def other():
            with heap.transaction() as s:
                s.log.append(1)
                s.count += 0 if False else 1
        t = threading.Thread(target=other)
        t.start()
        t.join()

    def kill_server(pid):
        state.count += 1
        os.kill(pid, 9)
        time.sleep(0.5)
        return state.count

    class _KillAtVote:
        # Votes after the heap's connection, then kills the ZEO server: the commit
        # is in doubt (the server had the transaction, never its finish).
        def __init__(self, pid):
            self.pid = pid
        def sortKey(self):
            return "~ after every ZODB connection"
        def tpc_vote(self, txn):
            os.kill(self.pid, 9)
            time.sleep(0.5)
        def abort(self, txn): pass
        def tpc_begin(self, txn): pass
        def commit(self, txn): pass
        def tpc_finish(self, txn): pass
        def tpc_abort(self, txn): pass

    def kill_server_at_vote(pid):
        state.count += 1
        durable_heap.active_heap().transaction_manager.get().join(_KillAtVote(pid))
        return state.count

    async def acount(by=1):
        await asyncio.sleep(0.01)
        state.count += by
        async with durable_heap.active_heap().transaction():  # joins the call's transaction
            state.log.append(by)
        return state.count

    async def aboom():
        state.count += 1000
        await asyncio.sleep(0)
        raise ValueError("the async program said no")

    def _private():
        return 1
"""


class Served:
    """``durable-heap serve PROGRAM --port 0 ...`` in a subprocess, and an httpx client to it."""

    def __init__(self, program: Path, *args: str, cwd: Path | None = None, timeout: float = 90) -> None:
        self.program = program
        self.signalled = False
        self.cwd = cwd or program.parent
        self.log = self.cwd / f"serve-{program.stem}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "durable_heap", "serve", str(program), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self._log_file, text=True, cwd=self.cwd, env=subprocess_env(),
        )
        line = first_line(self.proc, timeout)
        if not line.startswith("http"):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"durable-heap serve did not start:\n{self.log.read_text()}")
        self.url = line
        self.client = httpx.Client(base_url=line, timeout=60)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        if body is not None:
            kwargs["content"] = json.dumps(body)
        return self.client.post(path, **kwargs)

    def health(self) -> dict[str, Any]:
        r = self.client.get("/_health")
        assert r.status_code == 200
        return r.json()  # type: ignore[no-any-return]

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.signalled = True
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Stop it (unless `send` did) and wait: a second SIGTERM could land in the
        interpreter's own shutdown, where the default handler is back."""
        if self.proc.poll() is None and not self.signalled:
            self.send(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout)
        if hasattr(self, "client"):
            self.client.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log_file.close()
        return code

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    return write(tmp_path / "app.py", COUNTER)


@pytest.fixture
def served(counter: Path) -> Iterator[Served]:
    s = Served(counter)
    try:
        yield s
    finally:
        s.stop()


def _count(program: Path) -> int:
    out = cli("call", str(program), "count", "0")
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_functions_are_post_endpoints_and_their_changes_last(served: Served, counter: Path) -> None:
    assert served.post("/count").json() == {"result": 1}
    assert served.post("/count", [5]).json() == {"result": 6}
    r = served.post("/count", {"by": 2})
    assert r.status_code == 200 and r.json() == {"result": 8}
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-durable-heap-version"] == "1"
    # Values JSON lacks go both ways in the tagged form.
    r = served.post("/later", [{"$date": "2026-12-31"}], )
    assert r.json() == {"result": {"$date": "2027-01-01"}}
    assert served.post("/echo", [[1, 2], {"$bytes": "aGk="}]).json() == {
        "result": {"args": {"$tuple": [[1, 2], {"$bytes": "aGk="}]}, "kwargs": {}}}
    assert served.post("/items").json() == {"result": []}  # a durable List, as JSON
    health = served.health()
    assert health["status"] == "ok" and health["version"]["number"] == 1 and health["serving"] == 1
    assert health["program"] == "app"
    assert served.stop() == 0
    assert _count(counter) == 8  # a new process sees what the service committed


def test_async_functions_are_post_endpoints_in_one_transaction_each(served: Served, counter: Path) -> None:
    assert served.post("/acount").json() == {"result": 1}
    assert served.post("/acount", {"by": 2}).json() == {"result": 3}
    r = served.post("/aboom")
    assert r.status_code == 500 and r.json()["error"]["message"] == "the async program said no"
    assert served.post("/acount", [1, 2]).status_code == 400  # bound like any function

    def one(_: int) -> int:
        with httpx.Client(base_url=served.url, timeout=120) as c:
            r = c.post("/acount")
            assert r.status_code == 200, r.text
            return r.json()["result"]  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:  # conflicts re-run the coroutine
        results = list(pool.map(one, range(20)))
    assert sorted(results) == list(range(4, 24))
    assert served.post("/items").json() == {"result": [1, 2] + [1] * 20}  # aboom committed nothing
    assert served.stop() == 0
    assert _count(counter) == 23


def test_every_error_has_its_status_and_a_failed_call_commits_nothing(served: Served) -> None:
    def error(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["type"] == kind and body["message"]
        return body  # type: ignore[no-any-return]

    error(served.post("/nope"), 404, "FunctionNotFoundError")
    error(served.post("/_private"), 404, "NotFound")  # /_ is the runtime's
    listed = error(served.post("/os"), 404, "FunctionNotFoundError")["message"]  # a module: not routed
    assert "count" in listed
    assert error(served.client.get("/count"), 405, "MethodNotAllowed")
    error(served.post("/count", content=b"{not json"), 400, "BadRequest")
    error(served.post("/count", 3), 400, "BadRequest")
    error(served.post("/count", [{"$what": 1}]), 400, "BadRequest")
    error(served.post("/count", [1, 2]), 400, "BadArguments")
    error(served.post("/count", {"step": 1}), 400, "BadArguments")
    error(served.post("/keep_a_lambda"), 422, "NotPersistableError")
    boom = error(served.post("/boom"), 500, "ValueError")
    assert boom["message"] == "the program said no" and "traceback" not in boom
    error(served.post("/unsendable"), 500, "JSONFormError")
    websocket = served.client.get("/count", headers={  # a WebSocket handshake: refused, clearly
        "connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert "async with heap.transaction()" in error(websocket, 501, "WebSocketsNotSupported")["message"]
    conflict = error(served.post("/clash"), 409, "ConflictError")
    assert "10" in conflict["message"]  # the attempts it made
    assert served.health()["conflicts"] == 10  # each try ended in a conflict
    # None of the failed calls changed the count (clash's other thread did, each try).
    clashes = served.post("/items").json()["result"]
    assert served.post("/count", [0]).json()["result"] == len(clashes) == 10
    assert "the program said no" in served.text() and "Traceback" not in served.text()


def test_debug_answers_carry_the_traceback(counter: Path) -> None:
    s = Served(counter, "--debug")
    try:
        body = s.post("/boom").json()["error"]
        assert "Traceback" in body["traceback"] and "the program said no" in body["traceback"]
    finally:
        s.stop()


def test_a_storage_lost_before_the_commit_is_503_and_during_it_500_unknown(
    counter: Path, tmp_path: Path
) -> None:
    zeo = ZeoServer(tmp_path / "zeo" / "app.fs")
    zeo.start()
    s = Served(counter, "--storage", zeo.url + "?wait_timeout=5")
    try:
        assert s.post("/count").json() == {"result": 1}
        assert zeo.proc is not None
        r = s.post("/kill_server", [zeo.proc.pid])
        assert r.status_code == 503, r.text
        assert r.json()["error"]["outcome"] == "not committed" and r.headers["retry-after"] == "1"
        zeo.proc.wait(30)
        zeo.start()
        assert s.post("/count", [0]).json() == {"result": 1}  # nothing of it was committed
        r = s.post("/kill_server_at_vote", [zeo.proc.pid])
        assert r.status_code == 500, r.text
        body = r.json()["error"]
        assert body["outcome"] == "unknown" and "may or may not have been committed" in body["message"]
        zeo.proc.wait(30)
        zeo.start()
        assert s.post("/count", [0]).json() == {"result": 1}  # the server never got its finish
    except BaseException:
        print(s.text())
        raise
    finally:
        s.stop()
        zeo.close()


def test_a_conflict_storm_on_one_entry_gives_the_exact_total(served: Served) -> None:
    def one(_: int) -> int:
        with httpx.Client(base_url=served.url, timeout=120) as c:
            r = c.post("/count")
            assert r.status_code == 200, r.text
            return r.json()["result"]  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    # Each answer is the count its own commit made: every value exactly once.
    assert sorted(results) == list(range(1, 51))
    assert served.post("/count", [0]).json() == {"result": 50}


ENDPOINT = """
    from durable_heap import Response, state

    state.setdefault("hits", 0)

    def endpoint(request):
        if request.path == "/hit":
            state.hits += 1
            return {"hits": state.hits, "method": request.method, "q": request.query}
        if request.path == "/text":
            return "plain " + request.headers.get("x-name", "?")
        if request.path == "/bytes":
            return b"\\x00\\x01"
        if request.path == "/made":
            state.hits += 100
            return 201, request.json()
        if request.path == "/custom":
            return Response("<b>hi</b>", status=202, headers={"Content-Type": "text/html"})
        if request.path == "/fail":
            state.hits += 1000
            return 503, "busy"  # a 5xx answer: its changes are rolled back
        if request.path == "/raise":
            state.hits += 1000
            raise KeyError("nope")
        return 404, {"missing": request.path}

    def hits():
        return state.hits
"""


def test_an_endpoint_gets_every_request_in_one_transaction(tmp_path: Path) -> None:
    s = Served(write(tmp_path / "shop.py", ENDPOINT))
    try:
        r = s.client.get("/hit", params={"a": "1"})
        assert r.status_code == 200 and r.json() == {"hits": 1, "method": "GET", "q": {"a": "1"}}
        r = s.client.get("/text", headers={"X-Name": "ann"})
        assert r.text == "plain ann" and r.headers["content-type"].startswith("text/plain")
        r = s.client.get("/bytes")
        assert r.content == b"\x00\x01" and r.headers["content-type"] == "application/octet-stream"
        r = s.post("/made", {"x": 1})
        assert r.status_code == 201 and r.json() == {"x": 1}
        r = s.client.get("/custom")
        assert r.status_code == 202 and r.text == "<b>hi</b>" and r.headers["content-type"] == "text/html"
        r = s.client.get("/fail")
        assert r.status_code == 503 and r.text == "busy"
        r = s.client.get("/raise")
        assert r.status_code == 500 and r.json()["error"]["type"] == "KeyError"
        r = s.post("/hits")  # functions are not routed when there is an endpoint
        assert r.status_code == 404 and r.json() == {"missing": "/hits"}
        assert s.client.get("/hit").json()["hits"] == 102  # /fail and /raise committed nothing
        assert s.health()["program"] == "shop"  # /_ paths never reach the endpoint
        assert s.client.get("/_nothing").status_code == 404
    finally:
        s.stop()


V2 = COUNTER.replace(
    "def count(by=1):\n        state.count += by\n        return state.count",
    "def count(by=1):\n        state.count += by\n        return {'n': state.count, 'v': 2}",
)


@pytest.mark.slow
def test_a_hot_deploy_while_requests_run_fails_none_and_each_runs_on_one_version(
    served: Served, counter: Path
) -> None:
    stop = threading.Event()
    answers: list[tuple[int, str, Any]] = []

    def hammer() -> None:
        with httpx.Client(base_url=served.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/count")
                answers.append((r.status_code, r.headers.get("x-durable-heap-version", ""), r.json()))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        counter.write_text(__import__("textwrap").dedent(V2))
        deadline = time.monotonic() + 60
        while served.health()["serving"] != 2:
            assert time.monotonic() < deadline, served.text()
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert answers and all(status == 200 for status, _, _ in answers), answers[:5]
    versions = {v for _, v, _ in answers}
    assert versions == {"1", "2"}
    for _, v, body in answers:  # each answer came from exactly one version's code
        assert isinstance(body["result"], int) if v == "1" else body["result"]["v"] == 2
    counts = [b["result"] if v == "1" else b["result"]["n"] for _, v, b in answers]
    assert sorted(counts) == list(range(1, len(answers) + 1))  # none lost, none twice
    assert "deployed app version 2" in served.text()


def test_a_broken_deploy_keeps_the_old_version_serving_and_shows_in_health(
    served: Served, counter: Path
) -> None:
    assert served.post("/count").json() == {"result": 1}
    good = counter.read_text()
    counter.write_text(good + "\ndef broken(:\n")
    deadline = time.monotonic() + 60
    while served.health()["deploy"]["ok"]:
        assert time.monotonic() < deadline, served.text()
        time.sleep(0.1)
    health = served.health()
    assert health["status"] == "degraded" and health["version"]["number"] == 1
    assert "SyntaxError" in health["deploy"]["error"] or "invalid syntax" in health["deploy"]["error"]
    assert "version 1 stays in force" in health["deploy"]["error"]
    assert served.post("/count").json() == {"result": 2}  # still served, by version 1
    assert "keeps serving" in served.text()
    counter.write_text(__import__("textwrap").dedent(V2))
    while not served.health()["deploy"]["ok"]:
        assert time.monotonic() < deadline, served.text()
        time.sleep(0.1)
    assert served.health()["status"] == "ok"
    assert served.post("/count").json() == {"result": {"n": 3, "v": 2}}


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_and_each_is_committed_or_not(
    served: Served, counter: Path, tmp_path: Path
) -> None:
    answers: list[Any] = []
    markers = tmp_path / "in-flight"
    markers.mkdir()

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=served.url, timeout=60) as c:
                answers.append(c.post("/slow", content=json.dumps([1.5, str(markers / str(i))])).status_code)
        except httpx.HTTPError as exc:
            answers.append(type(exc).__name__)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(list(markers.iterdir())) < 8:  # every call is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    served.send(signal.SIGTERM)
    late = []
    for _ in range(3):  # what comes after the signal is refused, never half-done
        try:
            late.append(httpx.post(served.url + "/count", timeout=10).status_code)
        except httpx.HTTPError as exc:
            late.append(type(exc).__name__)
    for t in threads:
        t.join()
    assert served.stop() == 0
    assert answers.count(200) == 8, answers  # drained: each call in flight was answered
    assert "closed the heap" in served.text()
    assert _count(counter) == 8 + late.count(200), late  # what was answered, and nothing else


@pytest.mark.slow
def test_four_workers_share_the_heap_through_zeo_with_exact_totals(counter: Path) -> None:
    # Every call changes the one root record, with the default 10 tries: a conflicted
    # call's retries queue in its process (Service._call), so they do not run out.
    s = Served(counter, "--workers", "4")
    try:
        def storm(_: int) -> int:
            with httpx.Client(base_url=s.url, timeout=120) as c:
                r = c.post("/count")
                assert r.status_code == 200, r.text
                return r.json()["result"]  # type: ignore[no-any-return]

        for start in (0, 50):  # a storm of 50 at once on one entry, twice: exact totals
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                results = list(pool.map(storm, range(50)))
            assert sorted(results) == list(range(start + 1, start + 51))

        def one(_: int) -> tuple[int, int]:
            r = httpx.post(s.url + "/count_pid", timeout=120)  # a new connection each time
            assert r.status_code == 200, r.text
            n, pid = r.json()["result"]
            return n, pid

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(120)))
        assert sorted(n for n, _ in answers) == list(range(101, 221))
        assert len({pid for _, pid in answers}) >= 2, "one worker served everything"
        assert os.getpid() not in {pid for _, pid in answers}
    finally:
        assert s.stop() == 0, s.text()
    assert _count(counter) == 220  # the ZEO server stopped and released the file


def _children(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie, left to a parent that does not reap it, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_sigkilled_workers_parent_takes_its_zeo_server_and_workers_with_it(counter: Path) -> None:
    s = Served(counter, "--workers", "2")
    try:
        pids = {s.post("/count_pid").json()["result"][1] for _ in range(6)}
        children = _children(s.proc.pid)
        # The ZEO server and the two workers (multiprocessing may add a helper of its own).
        assert len(children) >= 3 and pids <= children, (children, pids)
        s.send(signal.SIGKILL)
        s.proc.wait(30)
        deadline = time.monotonic() + 60
        while alive := {p for p in children if _alive(p)}:
            assert time.monotonic() < deadline, f"still running after the parent's SIGKILL: {alive}"
            time.sleep(0.1)
    finally:
        s.stop()
    assert _count(counter) == 6  # the ZEO server stopped and released the file; nothing lost


def test_workers_stop_with_exit_status_1_when_their_zeo_server_stops(counter: Path) -> None:
    """A ZEO server that stopped (it exits 1 after a failed fsync) would leave the workers
    failing every commit: serve stops them and exits 1, so a service manager restarts it."""
    s = Served(counter, "--workers", "2")
    try:
        for _ in range(4):
            assert s.post("/count_pid").status_code == 200
        servers = [p for p in _children(s.proc.pid)
                   if b"--address" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)
        code = s.proc.wait(90)  # without the watch, serve runs on: this wait times out
    finally:
        s.stop()
    assert code == 1
    assert "its ZEO server stopped" in s.log.read_text()
    assert _count(counter) == 4  # every acknowledged commit is in the file


def test_a_public_host_without_tls_is_refused(counter: Path) -> None:
    out = cli("serve", str(counter), "--host", "0.0.0.0", "--port", "0")  # noqa: S104 - refused
    assert out.returncode != 0
    assert "without TLS" in out.stderr and "--insecure" in out.stderr


def test_a_missing_program_is_a_usage_error(tmp_path: Path) -> None:
    out = cli("serve", str(tmp_path / "none.py"), "--port", "0")
    assert out.returncode == 2 and "no program file" in out.stderr


BIG = """
    from durable_heap import Object, state

    class User(Object):
        def __init__(self, name):
            self.name = name
            self.tags = ["admin", "ops"]

    state.setdefault("users", {})
    if not state.users:
        for i in range(500):
            state.users[f"u{i:03}"] = User(f"user {i}")
    state.setdefault("plan", {"levels": [1, 2, 3]})

    def ping():
        return len(state.users)
"""


def test_the_inspector_is_off_unless_asked(served: Served) -> None:
    r = served.client.get("/_inspect")
    assert r.status_code == 404 and "--inspect" in r.json()["error"]["message"]


def test_the_inspector_reads_a_big_container_one_page_at_a_time(tmp_path: Path) -> None:
    s = Served(write(tmp_path / "big.py", BIG), "--inspect")
    try:
        page = s.client.get("/_inspect")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<h1>big</h1>" in page.text and "version 1 serving" in page.text

        def node(path: list[Any], offset: int = 0) -> dict[str, Any]:
            r = s.client.get("/_inspect/node", params={"path": json.dumps(path), "offset": str(offset)})
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

        root = node([])
        assert [c["label"] for c in root["children"]] == ["users", "plan"]
        assert root["children"][0]["summary"] == "Dict (500 items)"
        users = node([["a", "users"]])
        assert len(users["children"]) == 50 and users["more"] == 450 and users["total"] == 500
        last = node([["a", "users"]], 480)
        assert [c["label"] for c in last["children"]][-1] == "'u499'" and last["more"] == 0
        ann = node([["a", "users"], ["k", "u007"]])
        assert {c["label"]: c["summary"] for c in ann["children"]} == {
            "name": "'user 7'", "tags": "List (2 items)"}
        assert node([["a", "users"], ["k", "u007"], ["a", "tags"]])["children"][1]["summary"] == "'ops'"
        assert s.client.get("/_inspect/node", params={"path": '[["a", "nope"]]'}).status_code == 404
        assert s.client.get("/_inspect/node", params={"path": "{"}).status_code == 400
        assert s.client.post("/_inspect").status_code == 405  # read-only
        assert s.post("/ping").json() == {"result": 500}
    finally:
        s.stop()


def test_only_loopback_clients_reach_the_inspector() -> None:
    from durable_heap._serve import _is_loopback_client

    assert _is_loopback_client(("127.0.0.1", 5000)) and _is_loopback_client(("::1", 5000))
    assert not _is_loopback_client(("192.0.2.7", 5000))
    assert _is_loopback_client(None)  # a unix socket


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in NUL, commands on its fd 3, answers and events on its fd 4).

    A real browser with real input: `click` dispatches a mouse press and release at an
    element's centre, as a user's click arrives, not a call of the page's own handler.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome, self._commands = os.pipe()
        self._answers, from_chrome = os.pipe()

        # Its fd 3 reads our commands, its fd 4 writes back (bash moves the pipes there:
        # dash takes one-digit fds only).
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}',
             binary, "--headless",
             "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._next = 0
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self._answers, 1 << 20)
                assert chunk, f"chromium ended: {self.proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                assert "error" not in answer, (method, answer["error"])
                return answer.get("result", {})  # type: ignore[no-any-return]

    def open(self, url: str, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        while not (value := self.js(guarded)):  # false, or not there yet
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.05)
        return value

    def click(self, selector_js: str) -> None:
        """Click the element that `selector_js` evaluates to, with the mouse."""
        box = self.js(f"(() => {{ const e = {selector_js}; e.scrollIntoView({{block: 'center'}}); "
                      "const r = e.getBoundingClientRect(); "
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 1})

    def screenshot(self, path: Path) -> None:
        import base64

        self.js("window.scrollTo(0, 0)")
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        for fd in (self._commands, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


#: The `li` of the node at a path of labels below the tree's root, in the page.
def _node(*labels: str) -> str:
    steps = json.dumps(list(labels))
    return (f"{steps}.reduce((li, label) => {{ const ul = li === null ? "
            "document.querySelector('#tree > ul.tree') : li && li.querySelector(':scope > ul.tree'); "
            "return ul && [...ul.children].find(e => "
            "e.querySelector(':scope > .label')?.textContent === label + ': '); }, null)")


def _children_of(*labels: str) -> str:
    return f"[...(({_node(*labels)}).querySelector(':scope > ul.tree') || {{children: []}}).children]"


@pytest.mark.slow
def test_the_inspector_in_a_real_browser_opens_the_tree_by_clicks(tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    s = Served(write(tmp_path / "big.py", BIG), "--inspect")
    browser = _Browser(binary, tmp_path / "chromium")
    try:
        browser.open(s.url + "/_inspect", 900, 700)
        browser.wait("document.body.dataset.ready === '1'")
        assert browser.js("document.querySelector('h1').textContent") == "big"
        assert "version 1 serving" in browser.js("document.querySelector('.meta').textContent")
        assert browser.js(f"{_children_of('users')}.length") == 0  # closed: nothing of it loaded

        browser.click(f"({_node('users')}).querySelector('.toggle')")  # open users: its first page only
        rows = f"{_children_of('users')}.filter(e => e.tagName === 'LI')"
        assert browser.wait(f"{rows}.length") == 50
        more = f"{_children_of('users')}.find(e => e.tagName === 'BUTTON')"
        assert browser.js(f"({more}).textContent") == "450 more"

        browser.click(more)  # the next page, and only it
        assert browser.wait(f"{rows}.length === 100 && {rows}.length") == 100
        assert browser.js(f"({more}).textContent") == "400 more"

        browser.click(f"({_node('users', repr('u007'))}).querySelector('.toggle')")  # one user
        fields = f"{_children_of('users', repr('u007'))}.map(li => li.textContent)"
        assert browser.wait(f"{fields}.length === 2 && {fields}") == [
            "name: 'user 7'", "\u25b8tags: List (2 items)"]
        browser.click(f"({_node('users', repr('u007'), 'tags')}).querySelector('.toggle')")
        tags = f"{_children_of('users', repr('u007'), 'tags')}.map(li => li.textContent)"
        assert browser.wait(f"{tags}.length === 2 && {tags}") == ["[0]: 'admin'", "[1]: 'ops'"]

        browser.click(f"({_node('users')}).querySelector('.toggle')")  # closes it again
        assert browser.wait(f"{_children_of('users')}.length === 0")

        browser.click(f"({_node('users')}).querySelector('.toggle')")  # and the screenshot, opened
        browser.wait(f"{rows}.length === 50")
        browser.click(f"({_node('users', repr('u007'))}).querySelector('.toggle')")
        browser.wait(f"{_children_of('users', repr('u007'))}.length === 2")
        browser.click(f"({_node('users', repr('u007'), 'tags')}).querySelector('.toggle')")
        browser.wait(f"{_children_of('users', repr('u007'), 'tags')}.length === 2")
        browser.js(f"({_node('users')}).querySelector(':scope > ul.tree').scrollIntoView()")
        shot = tmp_path / "inspect.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 5000
        if os.environ.get("DURABLE_HEAP_SCREENSHOT"):  # docs/img/inspect.png is made this way
            import shutil

            shutil.copy(shot, os.environ["DURABLE_HEAP_SCREENSHOT"])
    finally:
        browser.close()
        s.stop()


FLOW = """
    import durable_heap as dh
    from durable_heap import state

    state.setdefault("log", [])

    def note(x):
        state.log.append(x)
        return len(state.log)

    @dh.workflow
    def onboard(user):
        reply = dh.promise(f"reply:{user}")
        note(f"invited {user}")
        answer = reply.wait()
        note(f"{user} said {answer}")
        return f"{user}: {answer}"

    def start(user):
        return onboard(user)

    def answer(user, text):
        dh.resolve(f"reply:{user}", text)
        return "ok"
"""


def test_a_workflow_started_over_http_is_resolved_by_another_request(tmp_path: Path) -> None:
    s = Served(write(tmp_path / "flow.py", FLOW), "--inspect")
    try:
        r = s.post("/start", ["bob"])
        assert r.status_code == 202, r.text
        wid = r.json()["workflow_id"]
        assert r.json()["status"] == "waiting" and r.headers["location"] == f"/_workflows/{wid}"
        info = s.client.get(f"/_workflows/{wid}").json()
        assert info["status"] == "waiting" and info["waiting_on"] == {"promise": "reply:bob", "until": None}
        assert s.post("/answer", ["bob", "yes"]).json() == {"result": "ok"}
        deadline = time.monotonic() + 60  # the in-process scheduler wakes it
        while (info := s.client.get(f"/_workflows/{wid}").json())["status"] != "done":
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        assert info["result"] == "bob: yes"
        assert s.health()["scheduler"]["state"] == "running"
        assert s.client.get("/_workflows/nope").status_code == 404
        assert s.post("/note", ["x"]).json() == {"result": 3}  # both steps ran once
        page = s.client.get("/_inspect").text
        assert wid in page and "flow.onboard" in page and "scheduler: running" in page
        # The workflow itself is a route too, as `durable-heap call flow.py onboard` is
        # (it answered 404 FunctionNotFoundError: only plain functions were served).
        r = s.post("/onboard", ["cy"])
        assert r.status_code == 202 and r.json()["status"] == "waiting", r.text
        r = s.post("/onboard", [])
        assert r.status_code == 400 and "missing a required argument: 'user'" in r.text, r.text
        r = s.post("/nope", [])
        assert r.status_code == 404 and "answer, note, onboard, start" in r.text, r.text
    finally:
        s.stop()


def test_the_listening_socket_is_tcp_so_asyncio_turns_nagle_off() -> None:
    """uvicorn's own `Config.bind_socket` makes a socket of protocol 0, on which asyncio
    leaves Nagle's algorithm on: each answer then waited ~40 ms for a delayed ACK."""
    import asyncio
    import socket

    from durable_heap._serve import ServeConfig, _listen

    sock = _listen(ServeConfig(program="", target="", port=0), 8)
    try:
        assert sock.proto == socket.IPPROTO_TCP

        async def accepted_nodelay() -> int:
            seen: list[int] = []

            def protocol() -> asyncio.Protocol:
                class P(asyncio.Protocol):
                    def connection_made(self, transport: Any) -> None:
                        seen.append(transport.get_extra_info("socket").getsockopt(
                            socket.IPPROTO_TCP, socket.TCP_NODELAY))
                return P()

            server = await asyncio.get_running_loop().create_server(protocol, sock=sock)
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
            server.close()
            return seen[0]

        assert asyncio.run(accepted_nodelay()) != 0
    finally:
        sock.close()


SLOW_SERVICE = """
import time

import slowstats
from durable_heap import state

state.setdefault("calls", 0)

def slow(ms):
    with slowstats.running():
        time.sleep(ms / 1000)  # a request to a slow service elsewhere: no CPU used
        return state.calls

def most():
    return slowstats.seen()
"""

SLOW_STATS = """
import contextlib
import threading

lock = threading.Lock()
now = most = 0

@contextlib.contextmanager
def running():
    global now, most
    with lock:
        now += 1
        most = max(most, now)
    try:
        yield
    finally:
        with lock:
            now -= 1

def seen():
    return most
"""


def test_calls_waiting_on_a_slow_service_run_at_once_not_one_after_the_other(tmp_path: Path) -> None:
    """Serve runs one call on the CPU at a time on a heap file (`durable_heap._callpool`):
    commits announce their fsync waits, and a call waiting on something else (a socket,
    a sleep) is found waiting by the pool's watch and gives its slot up. Without that,
    8 calls of 300 ms each to a slow service would run one after the other."""
    write(tmp_path / "slowstats.py", SLOW_STATS)
    s = Served(write(tmp_path / "slow.py", SLOW_SERVICE))
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: s.post("/slow", [300]), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        r = s.post("/most")  # (the count lives in the serving process)
        assert r.status_code == 200 and r.json()["result"] >= 6, r.json()
    finally:
        s.stop()
