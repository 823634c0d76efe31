"""The operations commands and the CLI's rough edges, end to end: real FileStorage files,
a real ZEO server, the real command in subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import durable_heap as dh
from durable_heap.testing import ZeoServer, subprocess_env
from tests.conftest import cli, write

APP = """
    import durable_heap as dh
    from durable_heap import state

    print("top level of app")
    state.setdefault("users", {})
    state.setdefault("n", 0)

    class Old(dh.Object):
        pass

    def add(name, role="user"):
        print("adding", name)
        state.users[name] = dh.Dict(role=role)  # a record of its own (a small dict would be inline)
        state.n += 1
        return len(state.users)

    def echo(*args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    def big():
        state.blob = b"x" * 100_000

    def make_old():
        state.old = Old()

    def drop_old():
        del state.old

    @dh.redact("password")
    def login(user, password):
        state.users[user] = {"role": "user", "pw": len(password)}
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write(tmp_path / "app.py", APP)


def ok(*args: str, cwd: Path | None = None) -> str:
    out = cli(*args, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


def heap_file(app: Path) -> Path:
    return app.parent / ".durable-heap" / f"{app.stem}.fs"


# --- the CLI's rough edges ----------------------------------------------------------------


def test_call_without_a_function_names_what_is_missing(app: Path) -> None:
    out = cli("call", str(app))
    assert out.returncode == 2
    assert "which function of" in out.stderr and "FUNCTION [ARGS...]" in out.stderr
    assert "args" not in out.stderr.split("FUNCTION")[0]  # not "required: function, args"


def test_inspect_refuses_negative_depth_and_limit(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    for option in ("--depth", "--limit"):
        out = cli("inspect", str(app), option, "-1")
        assert out.returncode == 2 and "negative" in out.stderr, out.stderr
    assert "state" in ok("inspect", str(app), "--depth", "0")


def test_keyword_arguments(app: Path) -> None:
    out = json.loads(ok("call", str(app), "echo", "a=b", "3", "-k", "x=1", "-k", "name=ann",
                        "-k", "deep=[1, 2]"))
    assert out == {"args": ["a=b", 3], "kwargs": {"x": 1, "name": "ann", "deep": [1, 2]}}
    assert json.loads(ok("call", str(app), "add", "bob", "-k", "role=admin")) == 1
    for bad in ("novalue", "1x=2", "x=1"):
        extra = ["-k", "x=2"] if bad == "x=1" else []
        out = cli("call", str(app), "echo", "-k", bad, *extra)
        assert out.returncode == 2, (bad, out.stderr)
        assert "-k" in out.stderr


def test_program_output_goes_to_stderr(app: Path) -> None:
    out = cli("call", str(app), "add", "ann")
    assert out.returncode == 0
    assert out.stdout == "1\n"  # the result alone
    assert "top level of app" in out.stderr and "adding ann" in out.stderr
    dep = cli("deploy", str(app))
    assert dep.stdout.strip().isdigit()


def test_zeo_target_without_a_server_says_it_waits(app: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free: nothing listens there
    start = time.monotonic()
    out = cli("call", str(app), "add", "ann", "--storage", f"zeo://127.0.0.1:{port}?wait_timeout=2.5")
    assert out.returncode == 2
    assert f"waiting for the ZEO server at zeo://127.0.0.1:{port}" in out.stderr
    assert "up to 2.5 s" in out.stderr
    assert "no ZEO server answered" in out.stderr
    assert time.monotonic() - start >= 2.5


def test_help_has_an_example_for_every_command_and_version() -> None:
    from durable_heap import __version__
    from durable_heap.cli import _parser

    _, commands = _parser()
    assert {"pack", "backup", "restore", "verify", "log", "stats"} <= set(commands)
    for name in commands:
        text = commands[name].format_help()
        assert "example:" in text and f"durable-heap {name}" in text, name
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"durable-heap {__version__}"
    assert "--days" in ok("pack", "--help") and "default 7" in ok("pack", "--help")
    assert "the backup first, as cp reads" in ok("restore", "--help")


# --- log ------------------------------------------------------------------------------------


def test_log_lists_calls_newest_first(app: Path, tmp_path: Path) -> None:
    for name in ("ann", "bob", "cy"):
        ok("call", str(app), "add", name)
    ok("call", str(app), "login", "dee", "hunter2")
    lines = ok("log", str(app)).splitlines()
    notes = [line.split("  ")[2] for line in lines]
    assert notes[:4] == ["login('dee', <redacted>)", "add('cy')", "add('bob')", "add('ann')"]
    assert "hunter2" not in ok("log", str(app), "-n", "0")
    entry = r"^[0-9a-f]{16}  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  add\('cy'\)  \[3 records, \d+ bytes\]$"
    assert re.match(entry, lines[1]), lines[1]
    assert len(ok("log", str(app), "-n", "2").splitlines()) == 2
    grepped = ok("log", str(app), "--grep", "BOB").splitlines()
    assert [line.split("  ")[2] for line in grepped] == ["add('bob')"]
    assert ok("log", str(app), "--since", "2999-01-01") == ""
    tid = lines[1].split()[0]
    shown = ok("log", str(app), "--show", tid).splitlines()
    assert "add('cy')" in shown[0]
    assert any(line.rstrip().endswith("state.users['cy']") for line in shown[1:]), shown
    assert any(line.rstrip().endswith("state.users") for line in shown[1:]), shown
    out = cli("log", str(app), "--show", "0123")
    assert out.returncode == 2 and "no transaction" in out.stderr


def test_transaction_blocks_get_a_default_note(tmp_path: Path) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap:
        def add_user() -> None:
            with heap.transaction() as state:
                state.x = 1
        add_user()
        with heap.transaction("my note") as state:
            state.y = 2
        notes = [t["description"] for t in heap.db.undoLog(0, 2)]
    assert notes[0] == "my note"
    assert re.fullmatch(r"transaction in .*add_user \(test_ops\.py:\d+\)", notes[1]), notes


def test_redact_in_actions(tmp_path: Path) -> None:
    with dh.open(tmp_path / "h.fs") as heap:
        @heap.action
        @dh.redact("token")
        def connect(user: str, token: str, **extra: object) -> None:
            heap.state.last = user

        @heap.action
        @dh.redact
        def secret(a: object, b: object) -> None:
            heap.state.s = 1

        connect("ann", "abc123", port=1)
        connect("bob", token="xyz")  # noqa: S106 - a made-up secret, to be redacted
        secret(1, b=2)
        notes = [t["description"] for t in heap.db.undoLog(0, 3)]
    assert [n.rpartition(".")[2] for n in notes] == [
        "secret(<redacted>, b=<redacted>)", "connect('bob', token=<redacted>)",
        "connect('ann', <redacted>, port=1)"]
    with pytest.raises(TypeError):
        dh.redact(3)  # type: ignore[call-overload]


# --- stats --------------------------------------------------------------------------------------


def test_stats_reports_classes_largest_and_records_rewritten_whole(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "big")
    out = ok("stats", str(app))
    assert "current records" in out and "history:" in out
    assert re.search(r"\d+\s+[\d.]+ (KB|bytes)\s+durable_heap._containers.Dict", out), out
    assert "largest records:" in out
    assert "note: state (durable_heap._state.State) is one record of 100.1 KB" in out
    assert "object of their own" in out


# --- verify -------------------------------------------------------------------------------------


def _record_offset(path: Path, oid: bytes) -> int:
    """Where the state pickle of `oid`'s current record is in the file (past its class pickle)."""
    from ZODB.FileStorage import FileStorage
    from ZODB.FileStorage.format import DATA_HDR_LEN

    fs = FileStorage(str(path), read_only=True)
    try:
        data = fs.load(oid)[0]
        return int(fs._lookup_pos(oid)) + DATA_HDR_LEN + len(data) - 12
    finally:
        fs.close()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_verify_passes_a_whole_heap_and_reports_damage(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "add", "bob")
    out = ok("verify", str(app))
    assert ": ok:" in out and "current records read" in out
    path = heap_file(app)
    with dh.open(path, read_only=True) as heap:
        oid = heap.state.users["ann"]._p_oid
    _flip(path, _record_offset(path, oid))
    out = cli("verify", str(app))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 problem" in out.stdout
    line = next(x for x in out.stdout.splitlines() if "0x" in x)
    from ZODB.utils import oid_repr

    assert f"object {oid_repr(oid)} " in line
    assert "(durable_heap._containers.Dict)" in line
    assert "at state.users['ann']" in line and "fails its checksum" in line
    assert "durable-heap restore" in out.stdout
    # verify only reads: the file is as it was, and the rest still reads.
    assert json.loads(ok("call", str(app), "echo", "1")) == {"args": [1], "kwargs": {}}


def test_verify_reports_a_damaged_old_revision(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    path = heap_file(app)
    with dh.open(path, read_only=True) as heap:
        oid = heap.state._p_oid
    old = _record_offset(path, oid)
    ok("call", str(app), "add", "bob")  # a new current revision of state; the old one is history
    _flip(path, old)
    out = cli("verify", str(app))
    assert out.returncode == 1
    assert "older revision fails its checksum" in out.stdout
    assert "revision" in out.stdout


def test_verify_a_heap_that_does_not_open(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    path = heap_file(app)
    for suffix in (".index",):
        (path.parent / (path.name + suffix)).unlink(missing_ok=True)
    size = path.stat().st_size
    _flip(path, size // 3)  # inside the file: an open would cut it there
    out = cli("verify", str(app))
    assert out.returncode == 1
    assert "damaged" in out.stdout
    assert path.stat().st_size == size


# --- pack ---------------------------------------------------------------------------------------


def test_pack_summary_keeps_history_by_default_and_prunes_the_registry(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "make_old")
    ok("call", str(app), "drop_old")
    out = ok("pack", str(app))  # the default keeps a week: inspect --at still reaches version 1
    assert "keeping 7 days" in out
    assert "users" in ok("inspect", str(app), "--at", "1")
    with dh.open(heap_file(app), read_only=True) as heap:
        assert "app.Old" in heap.connection.root()["durable_heap.classes"]
    out = ok("pack", str(app), "--days", "0")
    m = re.search(r"records in the file \(all revisions\): ([\d,]+) -> ([\d,]+) \(([\d,]+) removed\)", out)
    assert m and int(m.group(3).replace(",", "")) > 0, out
    m = re.search(r"objects: ([\d,]+) -> ([\d,]+)", out)
    assert m and int(m.group(1)) > int(m.group(2)), out  # the Old object went
    assert "class registry: dropped app.Old" in out
    with dh.open(heap_file(app), read_only=True) as heap:
        assert "app.Old" not in heap.connection.root()["durable_heap.classes"]
        assert sorted(heap.state.users) == ["ann"]
    assert "pack: drop 1 unused class" in ok("log", str(app), "-n", "1")
    out = cli("pack", str(app), "--days", "-1")
    assert out.returncode == 2 and "negative" in out.stderr


@pytest.mark.slow
def test_operations_over_zeo(app: Path, tmp_path: Path, zeo_server: ZeoServer) -> None:
    url = zeo_server.url
    for name in ("ann", "bob"):
        ok("call", str(app), "add", name, "--storage", url)
    ok("call", str(app), "make_old", "--storage", url)
    ok("call", str(app), "drop_old", "--storage", url)
    assert "add('bob')" in ok("log", str(app), "--storage", url, "-n", "3")
    assert ": ok:" in ok("verify", str(app), "--storage", url)
    assert "durable_heap._containers.Dict" in ok("stats", str(app), "--storage", url)
    out = ok("pack", str(app), "--storage", url, "--days", "0")
    m = re.search(r"objects: ([\d,]+) -> ([\d,]+)", out)
    assert m and int(m.group(1)) > int(m.group(2)), out  # the server packed the Old object away
    assert "class registry" not in out  # never pruned under other clients
    dest = tmp_path / "backups"
    first = ok("backup", str(app), str(dest), "--storage", url)
    assert "full backup" in first and "new transactions copied from the server" in first
    ok("call", str(app), "add", "cy", "--storage", url)
    second = ok("backup", str(app), str(dest), "--storage", url)
    assert "incremental backup" in second and "(1 new transactions" in second, second
    restored = tmp_path / "restored" / "app.fs"
    ok("restore", str(dest), str(app), "--storage", str(restored))
    with dh.open(restored, read_only=True) as heap:
        assert sorted(heap.state.users) == ["ann", "bob", "cy"]
    out = cli("restore", str(dest), str(app), "--storage", url)
    assert out.returncode == 2 and "stop it, restore into its file" in out.stderr


# --- backup and restore -------------------------------------------------------------------------

WRITER = """
import os, sys, time
import durable_heap as dh
heap = dh.open(sys.argv[1])
with heap.transaction() as s:
    s.setdefault("count", 0)
print("ready", flush=True)
deadline = time.monotonic() + 300
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:  # until told to stop
    with heap.transaction() as s:
        s.count += 1
        s.setdefault("log", []).append(s.count)
        n = s.count
    print(n, flush=True)
heap.close()
"""


@pytest.mark.slow
def test_backup_while_a_writer_commits_then_restore(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", "from durable_heap import state\n")
    path = heap_file(app)
    writer = write(tmp_path / "writer.py", WRITER)
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(writer), str(path), str(stop)], stdout=subprocess.PIPE,
                            text=True, env=subprocess_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    dest = tmp_path / "backups"
    try:
        time.sleep(0.5)
        first = ok("backup", str(app), str(dest))
        assert "full backup" in first and "verified" in first
        time.sleep(0.5)
        second = ok("backup", str(app), str(dest))
        assert "incremental backup" in second and "verified" in second
        assert proc.poll() is None  # the writer was committing all along
    finally:
        stop.touch()
        acked = [int(x) for x in proc.stdout.read().split()]
        proc.wait(30)
    assert proc.returncode == 0 and acked
    assert (dest.stat().st_mode & 0o777) == 0o700
    # Restore: a consistent state (each count's log entry is there), up to the second backup.
    restored = tmp_path / "restored" / "app.fs"
    ok("restore", str(dest), str(app), "--storage", str(restored))
    with dh.open(restored, read_only=True) as heap:
        count = heap.state.count
        assert list(heap.state.log) == list(range(1, count + 1))
        assert 0 < count <= acked[-1]
    assert ": ok:" in ok("verify", str(app), "--storage", str(restored))
    assert "incremental backup" in ok("backup", str(app), str(dest))  # what the writer added since
    assert "nothing changed" in ok("backup", str(app), str(dest))


def test_restore_refuses_an_open_heap_and_an_existing_one(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    dest = tmp_path / "backups"
    ok("backup", str(app), str(dest))
    ok("call", str(app), "add", "bob")
    path = heap_file(app)
    before = path.read_bytes()
    out = cli("restore", str(dest), str(app))
    assert out.returncode == 2 and "exists" in out.stderr and "--force" in out.stderr
    with dh.open(path):  # open in this process: its lock is held
        out = cli("restore", str(dest), str(app), "--force")
        assert out.returncode == 2 and "is open in another process" in out.stderr, out.stderr
    assert path.read_bytes() == before  # refused: untouched
    out = ok("restore", str(dest), str(app), "--force")
    assert "kept as" in out
    assert (path.parent / "app.fs.before-restore").read_bytes() == before
    with dh.open(path, read_only=True) as heap:
        assert sorted(heap.state.users) == ["ann"]  # as at the backup
    again = ok("restore", str(dest), str(app), "--force")  # the first kept file is kept too
    assert (path.parent / "app.fs.before-restore").read_bytes() == before
    assert re.search(r"kept as .*app\.fs\.before-restore-\d{8}-\d{6}", again), again
    out = cli("restore", str(tmp_path / "nothing-here"), str(app), "--force")
    assert out.returncode == 2 and "holds no backup" in out.stderr


# --- progress -----------------------------------------------------------------------------------


def _with_terminal(args: list[str]) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal; return its status and what it showed."""
    main, sub = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where a bar has no room: make it 100x30.
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", *args], stdout=subprocess.PIPE,
                            stderr=sub, env=subprocess_env(), text=True)
    os.close(sub)
    shown = b""
    while True:
        ready, _, _ = select.select([main], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    proc.wait(30)
    return proc.returncode, shown.decode("utf-8", "replace")


def test_progress_on_a_terminal_only(app: Path) -> None:
    pytest.importorskip("tqdm")
    ok("call", str(app), "add", "ann")
    code, shown = _with_terminal(["verify", str(app)])
    assert code == 0
    assert "verify" in shown and "records" in shown and "\r" in shown, shown
    quiet = cli("verify", str(app))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_ctrl_c_while_waiting_for_a_server(app: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "verify", str(app), "--storage",
                             f"zeo://127.0.0.1:{port}?wait_timeout=30"], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    # Interrupt once it says it is waiting (a fixed sleep raced the start under load:
    # a SIGINT before the command runs is Python's own, exit -2).
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert "waiting for the ZEO server" in first, first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def test_verify_reports_a_dangling_reference(app: Path) -> None:
    import transaction
    from ZODB.Connection import TransactionMetaData
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import oid_repr

    ok("call", str(app), "add", "ann")
    ok("call", str(app), "add", "bob")
    path = heap_file(app)
    with dh.open(path, read_only=True) as heap:
        oid = heap.state.users["bob"]._p_oid
    fs = FileStorage(str(path))  # raw ZODB: a deletion record that leaves the reference behind
    try:
        txn = TransactionMetaData()
        fs.tpc_begin(txn)
        fs.deleteObject(oid, fs.load(oid)[1], txn)
        fs.tpc_vote(txn)
        fs.tpc_finish(txn)
    finally:
        fs.close()
        transaction.abort()
    out = cli("verify", str(app))
    assert out.returncode == 1, out.stdout
    line = next(x for x in out.stdout.splitlines() if oid_repr(oid) in x)
    assert "referred to but missing" in line and "at state.users['bob']" in line, line


@pytest.mark.slow
def test_verify_over_zeo_reports_damage_in_the_servers_file(app: Path, tmp_path: Path) -> None:
    from ZODB.utils import oid_repr

    server = ZeoServer(tmp_path / "server" / "app.fs")
    url = server.start()
    try:
        ok("call", str(app), "add", "ann", "--storage", url)
        with dh.open(url) as heap:
            oid = heap.state.users["ann"]._p_oid
        server.stop()
        _flip(server.storage, _record_offset(server.storage, oid))
        url = server.start()
        out = cli("verify", str(app), "--storage", url)
    finally:
        server.close()
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if oid_repr(oid) in x)
    assert "at state.users['ann']" in line and "fails its checksum" in line
    assert "Traceback" not in out.stderr  # no load of the damaged object was logged


@pytest.mark.slow
def test_ctrl_c_during_a_zeo_backup_leaves_no_backup_behind(tmp_path: Path) -> None:
    from ZODB.scripts.repozo import is_data_file

    app = write(tmp_path / "app.py", "from durable_heap import state\n")
    served = tmp_path / "server" / "app.fs"
    with dh.open(served) as heap, heap.transaction() as state:
        # One transaction of many records: ZEO's iterator sends them one by one, so the
        # copy takes long enough to be interrupted in the middle of it.
        state.items = [dh.Object() for _ in range(12_000)]
    server = ZeoServer(served)
    url = server.start()
    dest = tmp_path / "backups"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "backup", str(app), str(dest),
                                 "--storage", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=subprocess_env(), text=True)
        mirror = dest / "zeo-mirror" / "heap.fs"
        deadline = time.monotonic() + 60
        while not mirror.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "interrupted" in err and "Traceback" not in err
        assert not [n for n in os.listdir(dest) if is_data_file(n)]  # no backup was made
        done = ok("backup", str(app), str(dest), "--storage", url)  # the next one completes
        assert "full backup" in done
    finally:
        server.close()
    restored = tmp_path / "restored.fs"
    ok("restore", str(dest), str(app), "--storage", str(restored))
    with dh.open(restored, read_only=True) as heap:
        assert len(heap.state.items) == 12_000


def test_backup_refuses_a_damaged_heap(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    dest = tmp_path / "backups"
    ok("backup", str(app), str(dest))
    made = sorted(os.listdir(dest))
    path = heap_file(app)
    (path.parent / (path.name + ".index")).unlink()
    _flip(path, path.stat().st_size // 3)
    out = cli("backup", str(app), str(dest))
    assert out.returncode == 1 and "not backed up" in out.stderr and "damaged" in out.stderr
    assert sorted(os.listdir(dest)) == made


@pytest.mark.slow
def test_ctrl_c_during_a_pack_leaves_the_heap_as_it_was(tmp_path: Path) -> None:
    import hashlib

    app = write(tmp_path / "app.py", "from durable_heap import state\n")
    path = heap_file(app)
    with dh.open(path) as heap:
        for batch in range(6):
            with heap.transaction() as state:
                users = state.setdefault("users", {})
                for i in range(10_000):
                    users[f"u{batch}-{i}"] = {"n": i}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "pack", str(app), "--days", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    scratch = Path(str(path) + ".pack")
    deadline = time.monotonic() + 120
    while not scratch.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err  # interrupted while ZODB packed
    assert "interrupted" in err and "Traceback" not in err
    assert not scratch.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert ": ok:" in ok("verify", str(app))


@pytest.mark.slow
def test_ctrl_c_during_a_backup_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", "from durable_heap import state\n")
    with dh.open(heap_file(app)) as heap, heap.transaction() as state:
        state.blobs = [dh.Object() for _ in range(30)]
        for blob in state.blobs:
            blob.data = os.urandom(5_000_000)  # 150 MB: repozo copies it for a while
    dest = tmp_path / "backups"
    dest.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "backup", str(app), str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    deadline = time.monotonic() + 120
    while not (dest / "tmp.tmp").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # repozo writes its copy as tmp.tmp, then renames it
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(dest) == []  # no half-written backup left to be mistaken for one
    assert "full backup" in ok("backup", str(app), str(dest))


@pytest.mark.slow
def test_operations_on_postgresql(app: Path, postgresql_url: str) -> None:
    url = postgresql_url
    for name in ("ann", "bob"):
        ok("call", str(app), "add", name, "--storage", url)
    ok("call", str(app), "login", "cy", "s3cret", "--storage", url)
    log = ok("log", str(app), "--storage", url, "-n", "3")
    assert "login('cy', <redacted>)" in log and "add('bob')" in log and "s3cret" not in log
    tid = log.splitlines()[1].split()[0]
    assert "state.users['bob']" in ok("log", str(app), "--storage", url, "--show", tid)
    assert ": ok:" in ok("verify", str(app), "--storage", url)
    assert "durable_heap._containers.Dict" in ok("stats", str(app), "--storage", url)
    assert "objects:" in ok("pack", str(app), "--storage", url, "--days", "0")
    out = cli("backup", str(app), "/tmp/never", "--storage", url)
    assert out.returncode == 2 and "pg_dump" in out.stderr and "durable-heap copy" in out.stderr


def test_verify_reads_each_record_of_a_file_heap_once(tmp_path: Path) -> None:
    """The pass over the file (every revision's checksum) also notes the current records, so
    the walk from the root loads none of them again; over a heap with damage it still does."""
    from durable_heap._ops import verify

    path = tmp_path / "h.fs"
    with dh.open(path) as heap:
        for batch in range(3):
            with heap.transaction() as state:
                users = state.setdefault("users", {})
                for i in range(100):  # records each (a small dict would be inline)
                    users[f"u{batch}-{i}"] = dh.Dict(n=i, tags=dh.List([batch]))
    with dh.open(path, read_only=True) as heap:
        storage = heap.db.storage
        loads: list[bytes] = []
        load = storage.load

        def counted(oid: bytes, *args: object) -> object:
            loads.append(oid)
            return load(oid, *args)

        storage.load = counted  # counts the walk's loads; the storage itself is the real one
        report = verify(heap)
    assert report.records > 300 and report.history > report.records and not report.problems
    assert loads == []  # every record read once, by the pass over the file
