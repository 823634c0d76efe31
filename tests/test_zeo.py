"""ZEO: real servers (``durable-heap zeo`` subprocesses on 127.0.0.1) and real client processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from tests.conftest import ROOT, ZeoServer, cli

WORKER = [sys.executable, "-m", "tests.zeo_worker"]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DURABLE_HEAP_STORAGE", None)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def _start_workers(mode: str, url: str, n: int, count: int,
                   env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen([*WORKER, mode, url, str(n), str(k)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**_env(), **(env or {})}, cwd=ROOT)
        for k in range(count)
    ]
    for p in procs:  # every worker has its heap open...
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ready", p.communicate()[1]
    for p in procs:  # ...then all start at once
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    return procs


def _results(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def client(zeo_server: ZeoServer) -> Iterator[dh.Heap]:
    heap = dh.open(zeo_server.url)
    try:
        yield heap
    finally:
        heap.close()


# --- many processes, one heap -----------------------------------------------------------


def test_plain_int_incremented_by_four_processes_counts_every_acknowledged_action(
    zeo_server: ZeoServer, client: dh.Heap
) -> None:
    with client.transaction() as state:
        state.count = 0
    results = _results(_start_workers("int", zeo_server.url, 25, 4))
    acked = sum(r["acked"] for r in results)
    assert acked == 100
    assert sum(r["tries"] for r in results) >= acked  # conflicts were retried, not lost
    assert client.state.count == acked


def test_counter_incremented_by_four_processes_merges_without_retries(
    zeo_server: ZeoServer, client: dh.Heap
) -> None:
    with client.transaction() as state:
        state.hits = dh.Counter()
    results = _results(_start_workers("counter", zeo_server.url, 25, 4))
    acked = sum(r["acked"] for r in results)
    assert client.state.hits == acked == 100
    # Every concurrent increment was merged by the server: no action ran twice.
    assert sum(r["tries"] for r in results) == acked


def test_four_processes_opening_a_new_heap_at_once_share_one_state(zeo_server: ZeoServer) -> None:
    results = _results(_start_workers("fresh", zeo_server.url, 5, 4))
    assert sum(r["acked"] for r in results) == 20
    with dh.open(zeo_server.url) as heap:
        assert heap.state.count == 20


def test_big_dict_and_list_changed_by_four_processes_lose_nothing(
    zeo_server: ZeoServer, client: dh.Heap
) -> None:
    with client.transaction() as state:
        state.big = {f"seed-{i}": i for i in range(100)}  # tree form (> 32 entries)
        state.log = [f"seed-{i}" for i in range(100)]
    assert client.state.big._small is None
    _results(_start_workers("dict", zeo_server.url, 25, 4))
    added = {f"w{k}-{i}" for k in range(4) for i in range(25)}
    with client.transaction() as state:
        assert set(state.big) == {f"seed-{i}" for i in range(100)} | added
        assert len(state.big) == 200
        assert state.big["w3-24"] == 24
        log = list(state.log)
    assert len(log) == 200 and set(log[100:]) == added
    for k in range(4):  # each process's appends in its own order
        mine = [x for x in log if x.startswith(f"w{k}-")]
        assert mine == [f"w{k}-{i}" for i in range(25)]


def test_concurrent_changes_merge_on_the_server_or_conflict_clearly(zeo_server: ZeoServer) -> None:
    merge_or_conflict(zeo_server.url)


def merge_or_conflict(url: str) -> None:
    """Two clients, interleaved by hand: their commits overlap for sure (also on postgresql://)."""
    with dh.open(url) as one, dh.open(url) as two:
        with one.transaction() as state:
            state.big = {f"k{i}": 0 for i in range(100)}
            state.hits = dh.Counter(10)
            state.log = ["start"]
        with one.transaction() as s1:
            with two.transaction() as s2:
                s2.big["k1"] = 2
                s2.hits += 5
                s2.log.append("two")
            s1.big["k2"] = 1  # same bucket as k1, another entry
            s1.hits += 1
            s1.log.append("one")
        with pytest.raises(dh.ConflictError, match="concurrent transaction"):
            with one.transaction() as s1:
                with two.transaction() as s2:
                    s2.big["k3"] = "two"
                s1.big["k3"] = "one"  # the same entry: no merge can be right
        with two.transaction() as state:
            assert state.hits == 16
            assert (state.big["k1"], state.big["k2"], state.big["k3"]) == (2, 1, "two")
            assert state.log == ["start", "two", "one"]


def test_user_resolver_imported_by_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "from persistent import Persistent\n\n"
        "class Tally(Persistent):\n"
        "    def __init__(self):\n"
        "        self.n = 0\n\n"
        "    def _p_resolveConflict(self, old, saved, new):\n"
        "        return {'n': saved['n'] + new['n'] - old['n']}\n"
    )
    (tmp_path / "tallies.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    server = ZeoServer(tmp_path / "data" / "app.fs", args=("--import", "tallies"), cwd=tmp_path)
    server.start()
    try:
        import tallies  # type: ignore[import-not-found]

        with dh.open(server.url) as one, dh.open(server.url) as two:
            with one.transaction() as state:
                state.t = tallies.Tally()
            with one.transaction() as s1:
                with two.transaction() as s2:
                    s2.t.n += 2
                s1.t.n += 3
            assert two.state.t.n == 5
    finally:
        server.close()
    out = cli("zeo", "--storage", str(tmp_path / "other.fs"), "--address", "127.0.0.1:0",
              "--import", "no_such_resolvers", cwd=tmp_path)
    assert out.returncode != 0
    assert "--import no_such_resolvers: cannot import it" in out.stderr


def test_a_long_running_client_sees_other_commits_at_its_next_transaction(
    zeo_server: ZeoServer, client: dh.Heap
) -> None:
    with client.transaction() as state:
        state.count = 1
    with dh.open(zeo_server.url) as other:
        with other.transaction() as state:
            state.count = 2
        with client.transaction() as state:
            assert state.count == 2
        with other.transaction() as state:
            state.count = 3
        assert client.state.count == 3  # outside a transaction: the latest commit too


# --- faults ---------------------------------------------------------------------------------


def test_server_killed_and_restarted_loses_no_acknowledged_commit(zeo_server: ZeoServer) -> None:
    url = zeo_server.url + "?wait_timeout=60"
    with dh.open(url) as heap, heap.transaction() as state:
        state.count = 0
    loops = _start_workers("loop", url, 150, 2)
    [inflight] = _start_workers("inflight", url, 0, 1)
    assert inflight.stdout.readline().strip() == "inside"  # type: ignore[union-attr]
    acks = 0
    while acks < 30:  # the loops are well under way
        line = loops[acks % 2].stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ack", line
        acks += 1
    zeo_server.kill()
    inflight.stdin.write("commit now\n")  # type: ignore[union-attr]
    inflight.stdin.flush()  # type: ignore[union-attr]
    zeo_server.start()  # same address
    results = _results([*loops, inflight])
    acked = sum(r["acked"] for r in results)
    failed_loops = sum(len(r["errors"]) for r in results[:2])
    [lost] = results[2]["errors"]  # the action in flight failed, clearly
    assert lost.startswith(f"lost the connection to the ZEO server at {zeo_server.url}")
    assert "interrupted()" in lost
    for r in results[:2]:
        assert all("ZEO server" in e for e in r["errors"])
    assert results[2]["acked"] == 2  # ...and the next action went through once it was back
    with dh.open(zeo_server.url) as heap:
        count = heap.state.count
    # Every acknowledged increment is there; a failed one may or may not be (the
    # connection can drop after the server committed it, before it answered). The
    # interrupted action (+100) never reached a server.
    assert acked <= count <= acked + failed_loops


def test_client_started_before_its_server_waits_for_it(tmp_path: Path) -> None:
    port = _free_port()
    code = (
        "import durable_heap as dh\n"
        "print('opening', flush=True)\n"
        f"with dh.open('zeo://127.0.0.1:{port}?wait_timeout=60') as heap:\n"
        "    with heap.transaction() as state:\n"
        "        state.x = 'late'\n"
        "    print(heap.state.x)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "opening"  # type: ignore[union-attr]
    time.sleep(0.5)  # it is waiting now
    server = ZeoServer(tmp_path / "app.fs", address=f"127.0.0.1:{port}")
    server.start()
    try:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "late"
    finally:
        server.close()


def test_no_server_fails_after_the_wait_timeout_naming_the_address() -> None:
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(dh.ServerUnavailableError) as err:
        dh.open(f"zeo://127.0.0.1:{port}?wait_timeout=1")
    assert time.monotonic() - t0 < 20
    message = str(err.value)
    assert f"no ZEO server answered at zeo://127.0.0.1:{port} within 1 s" in message
    assert "durable-heap zeo" in message
    assert isinstance(err.value, ConnectionError) and isinstance(err.value, dh.StorageError)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("zeo://127.0.0.1:8100?bogus=1", "unknown option bogus"),
        ("zeo://127.0.0.1:8100?wait_timeout=soon", "wait_timeout='soon' must be a number"),
        ("zeo://127.0.0.1:8100?read_only=maybe", "read_only='maybe' must be 1 or 0"),
        ("zeo://127.0.0.1:http", "bad ZEO address '127.0.0.1:http'"),
        ("zeo://", "names no server"),
        ("zeo://127.0.0.1:8100/run/app.sock", "names both a host and a path"),
        ("zeo://127.0.0.1:8100?wait_timeout=0", "wait_timeout='0' must be a number > 0"),
        ("zeo://127.0.0.1:8100?wait_timeout=nan", "wait_timeout='nan' must be a number > 0"),
        ("zeo://127.0.0.1:8100?cache_size=inf", "cache_size='inf' must be a whole number"),
        ("zeo://127.0.0.1:8100?tls_cert=c.pem", "needs tls_ca=PATH"),
    ],
)
def test_bad_zeo_targets_are_refused_before_connecting(target: str, message: str) -> None:
    with pytest.raises(dh.UnknownTargetError, match=message.replace("?", r"\?").replace("(", r"\(")):
        dh.open(target)


def test_clean_shutdown_writes_the_index_and_releases_the_lock(zeo_server: ZeoServer) -> None:
    with dh.open(zeo_server.url) as heap, heap.transaction() as state:
        state.kept = "yes"
    assert zeo_server.stop() == 0
    path = zeo_server.storage
    for f in (path, Path(str(path) + ".index"), Path(str(path) + ".lock")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert Path(str(path) + ".index").stat().st_mtime >= path.stat().st_mtime
    with dh.open(path) as heap:  # the lock is free: a plain process opens the file
        assert heap.state.kept == "yes"
    log = zeo_server.log.read_text()
    assert "SIGTERM: stopping" in log and "index written, lock released" in log


def test_server_refuses_a_file_another_process_holds(tmp_path: Path) -> None:
    path = tmp_path / "app.fs"
    with dh.open(path):
        out = cli("zeo", "--storage", str(path), "--address", "127.0.0.1:0", timeout=60)
    assert out.returncode == 2
    assert "is already open" in out.stderr or "open in another process" in out.stderr
    assert out.stderr.count("\n") == 1


def test_server_refuses_a_public_address_without_tls(tmp_path: Path) -> None:
    out = cli("zeo", "--storage", str(tmp_path / "app.fs"), "--address", "0.0.0.0:0")
    assert out.returncode == 2
    assert "refusing to serve 0.0.0.0:0 without TLS" in out.stderr and "--insecure" in out.stderr
    assert not (tmp_path / "app.fs").exists()
    server = ZeoServer(tmp_path / "app.fs", address="0.0.0.0:0", args=("--insecure",))
    try:
        assert server.start().startswith("zeo://0.0.0.0:")
    finally:
        server.close()


def test_server_reports_a_busy_port(zeo_server: ZeoServer) -> None:
    other = zeo_server.storage.parent / "other.fs"
    out = cli("zeo", "--storage", str(other), "--address", zeo_server.address)
    assert out.returncode == 2
    assert f"cannot listen on {zeo_server.url}" in out.stderr
    assert "Is another server running there?" in out.stderr
    assert sorted(p.name for p in other.parent.glob("other.fs*")) == []  # no empty heap left behind


def test_server_reports_a_missing_socket_folder(tmp_path: Path) -> None:
    sock = tmp_path / "no" / "such" / "app.sock"
    out = cli("zeo", "--storage", str(tmp_path / "app.fs"), "--address", str(sock))
    assert out.returncode == 2
    assert f"cannot listen on zeo://{sock}: the folder {sock.parent} does not exist" in out.stderr
    assert "Create it" in out.stderr and "another server" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty heap left behind


# --- unix socket, TLS, CLI ---------------------------------------------------------------------


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    server = ZeoServer(tmp_path / "app.fs", address=str(sock))
    assert server.start() == f"zeo://{sock}"
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        with dh.open(f"zeo://{sock}") as heap:
            with heap.transaction() as state:
                state.via = "socket"
        with dh.open(f"zeo://{sock}") as heap:
            assert heap.state.via == "socket"
        assert server.stop() == 0
        assert not sock.exists()
    finally:
        server.close()


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "the TLS test needs the openssl command (it makes a test CA)"
    out = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def make_test_pki(folder: Path) -> None:
    """A CA, a server certificate (127.0.0.1, localhost) and a client certificate,
    with the openssl commands docs/operations.md shows."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=durable-heap test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (folder / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
                 cwd=folder)


def test_tls_client_certificates(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_test_pki(pki)
    server = ZeoServer(tmp_path / "data" / "app.fs", args=(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-ca", str(pki / "ca.pem"),
    ))
    server.start()
    try:
        tls = f"tls_ca={pki / 'ca.pem'}"
        good = f"{server.url}?{tls}&tls_cert={pki / 'client.pem'}&tls_key={pki / 'client.key'}"
        with dh.open(good) as heap:
            with heap.transaction() as state:
                state.secret = 42
        with dh.open(good) as heap:
            assert heap.state.secret == 42
        for refused in (f"{server.url}?{tls}&wait_timeout=2", f"{server.url}?wait_timeout=2"):
            with pytest.raises(dh.ServerUnavailableError, match="no ZEO server answered"):
                dh.open(refused)
        with pytest.raises(dh.StorageError, match="cannot use the TLS files"):
            dh.open(f"{server.url}?{tls}&tls_cert={pki / 'missing.pem'}")
    finally:
        server.close()
    out = cli("zeo", "--storage", str(tmp_path / "x.fs"), "--address", "127.0.0.1:0",
              "--tls-cert", str(pki / "server.pem"), "--tls-ca", str(pki / "nope.pem"))
    assert out.returncode == 2 and "cannot use the TLS files" in out.stderr


def test_cli_over_zeo(zeo_server: ZeoServer, tmp_path: Path) -> None:
    program = tmp_path / "counter.py"
    program.write_text((ROOT / "examples" / "counter.py").read_text())
    for expected in ("1", "2"):
        out = cli("call", str(program), "count", "--storage", zeo_server.url, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected
    out = cli("inspect", str(program), "--storage", zeo_server.url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "count: 2" in out.stdout
    assert not (tmp_path / ".durable-heap").exists()  # nothing local: the heap is the server's
    zeo_server.stop()
    out = cli("call", str(program), "count", "--storage", zeo_server.url + "?wait_timeout=1", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(f"durable-heap: error: no ZEO server answered at {zeo_server.url}")


def test_server_stops_on_sigint_too(zeo_server: ZeoServer) -> None:
    assert zeo_server.proc is not None
    zeo_server.proc.send_signal(signal.SIGINT)
    assert zeo_server.proc.wait(30) == 0
    assert "SIGINT: stopping" in zeo_server.log.read_text()


def test_while_the_server_is_down_actions_fail_clearly_then_work_once_it_is_back(
    zeo_server: ZeoServer,
) -> None:
    with dh.open(zeo_server.url + "?wait_timeout=1") as heap:

        @heap.action
        def bump() -> int:
            heap.state.n = heap.state.get("n", 0) + 1
            return int(heap.state.n)

        assert bump() == 1
        assert zeo_server.stop() == 0
        with pytest.raises(dh.ServerUnavailableError, match=f"ZEO server at {zeo_server.url}"):
            bump()  # not retried as a conflict: one clear error
        with pytest.raises(dh.ServerUnavailableError):
            heap.state.n  # noqa: B018 - reading outside a transaction asks the server too
        zeo_server.start()
        # The client reconnects by itself, on its own schedule (slower on a busy machine):
        # actions fail clearly until it has, then work, and nothing is counted twice.
        deadline = time.monotonic() + 60
        while True:
            try:
                result = bump()
                break
            except dh.ServerUnavailableError:
                assert time.monotonic() < deadline, "the client never reconnected"
                time.sleep(0.2)
        assert result == 2
        assert heap.state.n == 2


def test_client_options_cache_file_and_read_only(zeo_server: ZeoServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "worker.zec"
    cache.parent.mkdir()
    with dh.open(f"{zeo_server.url}?cache={cache}&cache_size=1000000&server_sync=0") as heap:
        with heap.transaction() as state:
            state.greeting = "hello"
        assert cache.exists() and stat.S_IMODE(cache.stat().st_mode) == 0o600
        with pytest.raises(dh.StorageError, match="cache .* is in use by another process"):
            dh.open(f"{zeo_server.url}?cache={cache}")
    with dh.open(f"{zeo_server.url}?cache={cache}") as heap:  # kept across restarts
        assert heap.state.greeting == "hello"
    with dh.open(f"{zeo_server.url}?read_only=1") as heap:
        assert heap.read_only and heap.state.greeting == "hello"
        with pytest.raises(dh.StorageError, match="read-only"):
            with heap.transaction() as state:
                state.greeting = "changed"
    with dh.open(zeo_server.url) as heap:
        assert heap.state.greeting == "hello"


def test_a_read_only_server_refuses_writers_clearly_and_serves_readers(tmp_path: Path) -> None:
    server = ZeoServer(tmp_path / "server" / "app.fs")
    server.start()
    try:
        with dh.open(server.url) as heap, heap.transaction() as state:
            state.greeting = "hello"
    finally:
        server.close()
    server = ZeoServer(tmp_path / "server" / "app.fs", args=("--read-only",))
    server.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(dh.StorageError, match="serves its storage read-only") as err:
            dh.open(server.url)  # not a wait for the timeout, not "no server answered"
        assert time.monotonic() - t0 < 10 and "?read_only=1" in str(err.value)
        with dh.open(f"{server.url}?read_only=1") as heap:
            assert heap.state.greeting == "hello"
    finally:
        server.close()
