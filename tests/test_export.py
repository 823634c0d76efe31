"""``durable-heap export`` / ``import`` and ``call --each``, end to end: the real command in
subprocesses, real FileStorage files, a real ZEO server and a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import durable_heap as dh
from durable_heap._jsonform import dumps
from durable_heap.testing import ZeoServer, subprocess_env
from tests.conftest import cli, write

APP = """
    import datetime
    import dataclasses
    import durable_heap as dh
    from durable_heap import state

    print("top level of app")
    state.setdefault("users", {})
    state.setdefault("n", 0)

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class Task(dh.Object):
        def __init__(self, title, due=None):
            self.title = title
            self.due = due

    def add(name, role="user"):
        state.users[name] = {"role": role, "tags": {"a", role}}
        state.n += 1
        return len(state.users)

    def fill():
        t = Task("fix login", datetime.date(2026, 12, 24))
        state.tasks = [t, Task("ship", None)]
        state.mine = [t]  # one task in two places
        state.blob = b"\\x00\\xff"
        state.when = datetime.datetime(2026, 12, 1, 12, 30, tzinfo=datetime.timezone.utc)
        state.pair = (1, "x")
        state.where = Point(1, 2)
        state.odd = {1: "one", (2, 3): "pair"}
        state.hits = dh.Counter(3)

    def slow(i):
        import time
        time.sleep(0.2)
        state.n += 1
        return i

    def fail_on(i):
        if i == 3:
            raise ValueError("three")
        state.n += 1
        return i
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write(tmp_path / "app.py", APP)


def ok(*args: str) -> str:
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def heap_file(app: Path) -> Path:
    return app.parent / ".durable-heap" / f"{app.stem}.fs"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(app: Path, *names: str) -> object:
    """The builtin value at state.NAME... of the app's heap, read here (plain data only)."""
    with dh.open(heap_file(app), read_only=True) as heap, heap.transaction() as state:
        value: object = state
        for name in names:
            value = value[name]  # type: ignore[index]
        return dh.to_builtin(value)


def with_stdin(args: list[str], text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "durable_heap", *args], input=text, text=True,
                          capture_output=True, env=subprocess_env(), timeout=60)


def test_export_then_import_into_a_fresh_heap_gives_the_same_json(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "fill")
    text = ok("export", str(app))
    data = json.loads(text)  # plain JSON for any reader
    assert data["users"] == {"ann": {"role": "user", "tags": {"$set": ["a", "user"]}}}
    assert data["tasks"][0] == {"$shared": [0, {"$object": {"class": "app.Task", "attrs": {
        "title": "fix login", "due": {"$date": "2026-12-24"}}}}]}
    assert data["mine"] == [{"$ref": 0}]
    assert data["where"] == {"$object": {"class": "app.Point", "attrs": {"x": 1, "y": 2}}}
    assert data["blob"] == {"$bytes": "AP8="} and data["pair"] == {"$tuple": [1, "x"]}
    assert data["hits"] == {"$counter": 3}
    dump = tmp_path / "all.json"
    dump.write_text(text)
    fresh = tmp_path / "fresh.fs"
    out = ok("import", str(app), str(dump), "--storage", str(fresh))
    assert "imported 10 entries of" in out and "(merged, 1 transaction)" in out
    assert ok("export", str(app), "--storage", str(fresh)) == text
    # the values themselves, read back by a new process from the file
    check = write(tmp_path / "check.py", f"""
        import durable_heap as dh, sys
        sys.path.insert(0, {str(app.parent)!r})
        with dh.open({str(fresh)!r}) as heap:
            heap.load({str(app)!r}).module
            with heap.transaction() as state:
                assert state.mine[0] is state.tasks[0], "sharing kept"
                assert type(state.tasks[0]).__name__ == "Task" and state.tasks[0].due.year == 2026
                assert state.odd == {{1: "one", (2, 3): "pair"}} and state.where.y == 2
                assert state.hits.value == 3 and state.blob == b"\\x00\\xff"
                assert dh.to_builtin(state.users) == {{"ann": {{"role": "user", "tags": {{"a", "user"}}}}}}
        print("checked")
    """)
    assert "checked" in ok_run(check)


def ok_run(script: Path) -> str:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_export_a_path_and_to_a_file(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "fill")
    assert json.loads(ok("export", str(app), "--path", "state.users['ann'].role")) == "user"
    assert json.loads(ok("export", str(app), "--path", "state.tasks[1].title")) == "ship"
    assert json.loads(ok("export", str(app), "--path", "state.odd[(2, 3)]")) == "pair"
    target = tmp_path / "users.json"
    out = cli("export", str(app), "--path", "state.users", "-o", str(target))
    assert out.returncode == 0 and out.stdout == "" and "(1 entry)" in out.stderr
    assert json.loads(target.read_text()) == {"ann": {"role": "user", "tags": {"$set": ["a", "user"]}}}
    bad = cli("export", str(app), "--path", "state.nobody", "-o", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "state has no nobody" in bad.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.json.part").exists()


def test_import_merges_by_default_and_replaces_on_request(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "--each", str(write(tmp_path / "calls.jsonl", '"ann"\n"bob"\n')))
    f = tmp_path / "u.json"
    f.write_text(json.dumps({"bob": {"role": "admin"}, "cy": {"role": "user"}}))
    ok("import", str(app), str(f), "--path", "state.users")
    users = read(app, "users")
    assert isinstance(users, dict) and list(users) == ["ann", "bob", "cy"]  # merged
    assert users["bob"] == {"role": "admin"}
    ok("import", str(app), str(f), "--path", "state.users", "--replace")
    assert list(read(app, "users")) == ["bob", "cy"]  # type: ignore[call-overload]
    # a list is extended; a new attribute is created by --replace
    lst = tmp_path / "l.json"
    lst.write_text("[1, 2]")
    ok("import", str(app), str(lst), "--path", "state.items", "--replace")
    ok("import", str(app), str(lst), "--path", "state.items")
    assert read(app, "items") == [1, 2, 1, 2]
    # --replace of state itself: the attributes not in the file go
    whole = tmp_path / "w.json"
    whole.write_text(json.dumps({"users": {}, "n": 7}))
    ok("import", str(app), str(whole), "--replace")
    assert read(app) == {"users": {}, "n": 7}


def test_a_tagged_value_at_the_top_is_one_value(app: Path, tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text('{"$set": [1, 2]}')
    ok("import", str(app), str(f), "--path", "state.tags", "--replace", "--batch", "1")
    f.write_text('[3]')
    ok("import", str(app), str(f), "--path", "state.tags", "--batch", "1")  # a set updated
    assert read(app, "tags") == {1, 2, 3}


def test_import_from_stdin(app: Path) -> None:
    ok("call", str(app), "add", "ann")
    out = with_stdin(["import", str(app), "-", "--path", "state.users"], '{"dan": {"role": "x"}}')
    assert out.returncode == 0, out.stderr
    assert "of stdin" in out.stdout
    assert "dan" in read(app, "users")  # type: ignore[operator]


BAD = [
    ('{"a": 1,', [], "is not JSON", 1),
    ('{"a": {"$object": {"class": "app.Nope", "attrs": {}}}}', [], "no class app.Nope is loaded", 1),
    ('{"a": {"$object": {"class": "json.JSONDecoder", "attrs": {}}}}', [],
     "neither a durable_heap.Object subclass nor a dataclass", 1),
    ('{"a": {"$when": 3}}', [], "unknown tag '$when'", 1),
    ('{"a": 1}', ["--path", "state.nobody"], "state has no nobody (--replace creates it)", 2),
    ('{"a": 1}', ["--path", "state.n.x"], "state.n is an int (1), not a container", 2),
    ('{"a": 1}', ["--path", "state.n"], "an import merges into a dict, list, set or object", 2),
    ('[1]', ["--path", "state.users"], "the file holds a JSON array, which cannot be merged", 2),
]


def test_bad_input_is_a_clear_error_and_changes_nothing(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    before, state = digest(heap_file(app)), read(app)
    f = tmp_path / "in.json"
    for text, extra, words, code in BAD:
        f.write_text(text)
        out = cli("import", str(app), str(f), *extra)
        assert out.returncode == code, (text, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, (text, out.stderr)
        assert digest(heap_file(app)) == before, text  # not one byte written
    assert read(app) == state


@pytest.mark.parametrize(("text", "path", "replace", "words"), [
    ("[1, 2", "state.items", True, "expected ',' or ']', found the end of the file at character 6"),
    ('{"a" 1}', "state", False, "expected ':', found '1' at character 6"),
    ('{"a": 1} x', "state", False, "more data after the JSON value"),
    ('{"a": 1, "$b": 2}', "state", False, "the top-level key '$b' starts with '$'"),
    ('{"a": 1}', "state.nobody.deeper", True, "state has no nobody"),
    ('{"a": 1}', "users", False, "must start at state"),
    ('{"a": 1}', "state.users[", False, "is not closed"),
    ('{"not a name": 1}', "state", False, "cannot be an attribute name"),
    ("[1]", "state.items[3]", True, "has no such item"),
])
def test_more_bad_input_changes_nothing(tmp_path: Path, text: str, path: str, replace: bool,
                                        words: str) -> None:
    """The same refusals in process (import_data, what the command runs): quicker to test."""
    import io

    from durable_heap._exchange import import_data

    heap_path = tmp_path / "h.fs"
    with dh.open(heap_path) as heap, heap.transaction() as state:
        state.users = {"ann": 1}
        state.items = [0]
    with dh.open(heap_path) as heap, pytest.raises(dh.DurableHeapError) as info:
        import_data(heap, io.BytesIO(text.encode()), path=path, replace=replace, batch=1)
    assert words in str(info.value)
    with dh.open(heap_path, read_only=True) as heap, heap.transaction() as state:
        assert dh.to_builtin(state) == {"users": {"ann": 1}, "items": [0]}  # batch=1: staged, dropped
        assert "durable_heap.imports" not in heap.connection.root()


def test_a_big_import_is_staged_and_all_or_nothing(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    before = ok("export", str(app))
    entries = {f"u{i}": {"n": i} for i in range(95)}
    shared = [1, 2]
    text = dumps({**entries, "s1": shared, "s2": {"in": shared}})
    bad = tmp_path / "bad.json"
    bad.write_text(text[:-1] + ', "zz": {"$nope": 1}}')  # a bad last entry: found after staging
    out = cli("import", str(app), str(bad), "--path", "state.users", "--batch", "10")
    assert out.returncode == 1 and "unknown tag '$nope'" in out.stderr
    assert ok("export", str(app)) == before
    with dh.open(heap_file(app), read_only=True) as heap, heap.transaction():
        assert "durable_heap.imports" not in heap.connection.root()  # the staged entries dropped
    good = tmp_path / "good.json"
    good.write_text(text)
    out = cli("import", str(app), str(good), "--path", "state.users", "--batch", "10")
    assert out.returncode == 0, out.stderr
    assert "imported 97 entries" in out.stdout and "11 transactions" in out.stdout
    users = json.loads(ok("export", str(app), "--path", "state.users"))
    assert len(users) == 98 and users["u94"] == {"n": 94} and "ann" in users
    assert users["s1"] == {"$shared": [0, [1, 2]]} and users["s2"] == {"in": {"$ref": 0}}  # across batches
    log = ok("log", str(app), "-n", "3")
    assert "into state.users: 97 entries (merge)" in log
    with dh.open(heap_file(app), read_only=True) as heap, heap.transaction():
        assert "durable_heap.imports" not in heap.connection.root()


@pytest.mark.slow
def test_ctrl_c_during_a_big_import_leaves_the_state_as_it_was(app: Path, tmp_path: Path) -> None:
    ok("call", str(app), "add", "ann")
    before = ok("export", str(app))
    f = tmp_path / "big.json"
    f.write_text(json.dumps({f"u{i}": {"n": i, "tags": ["a", "b"]} for i in range(40_000)}))
    path = heap_file(app)
    size = path.stat().st_size
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "import", str(app), str(f),
                             "--path", "state.users", "--batch", "500"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    deadline = time.monotonic() + 60
    while path.stat().st_size < size + 200_000 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # staged batches are being committed
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert ok("export", str(app)) == before
    with dh.open(path, read_only=True) as heap, heap.transaction():
        assert "durable_heap.imports" not in heap.connection.root()


def test_a_killed_imports_leftovers_are_dropped_by_the_next(app: Path, tmp_path: Path) -> None:
    import datetime

    ok("call", str(app), "add", "ann")
    with dh.open(heap_file(app)) as heap, heap.transaction():  # what a SIGKILLed import leaves
        old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        heap.connection.root()["durable_heap.imports"] = dh.Dict(
            {"x": {"started": old, "target": "state.users", "data": dh.Dict({"zed": 1})}})
    assert "zed" not in ok("export", str(app))
    f = tmp_path / "u.json"
    f.write_text(json.dumps({f"u{i}": i for i in range(30)}))
    ok("import", str(app), str(f), "--path", "state.users", "--batch", "10")
    with dh.open(heap_file(app), read_only=True) as heap, heap.transaction():
        assert "durable_heap.imports" not in heap.connection.root()


def test_import_shows_progress_on_a_terminal(app: Path, tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    from tests.test_ops import _with_terminal

    ok("call", str(app), "add", "ann")
    f = tmp_path / "u.json"
    f.write_text(json.dumps({f"u{i}": i for i in range(3000)}))
    code, shown = _with_terminal(["import", str(app), str(f), "--path", "state.users", "--batch", "500"])
    assert code == 0
    assert "import u.json" in shown and "\r" in shown and "42.8k" in shown, shown
    quiet = cli("import", str(app), str(f), "--path", "state.users")
    assert quiet.returncode == 0 and "import" not in quiet.stderr.replace("top level of app", "")


@pytest.mark.slow
def test_export_and_import_over_zeo(app: Path, tmp_path: Path, zeo_server: ZeoServer) -> None:
    url = zeo_server.url
    ok("call", str(app), "add", "ann", "--storage", url)
    ok("call", str(app), "fill", "--storage", url)
    text = ok("export", str(app), "--storage", url)
    dump = tmp_path / "d.json"
    dump.write_text(text)
    local = tmp_path / "local.fs"
    ok("import", str(app), str(dump), "--storage", str(local), "--batch", "3")
    assert ok("export", str(app), "--storage", str(local)) == text
    f = tmp_path / "u.json"
    f.write_text(json.dumps({f"u{i}": i for i in range(25)}))
    ok("import", str(app), str(f), "--path", "state.users", "--batch", "10", "--storage", url)
    assert len(json.loads(ok("export", str(app), "--path", "state.users", "--storage", url))) == 26


@pytest.mark.slow
def test_export_and_import_on_postgresql(app: Path, tmp_path: Path, postgresql_url: str) -> None:
    url = postgresql_url
    ok("call", str(app), "fill", "--storage", url)
    text = ok("export", str(app), "--storage", url)
    f = tmp_path / "u.json"
    f.write_text(json.dumps({f"u{i}": i for i in range(25)}))
    ok("import", str(app), str(f), "--path", "state.users", "--batch", "10", "--storage", url)
    users = json.loads(ok("export", str(app), "--path", "state.users", "--storage", url))
    assert len(users) == 25
    dump = tmp_path / "d.json"
    dump.write_text(text)
    ok("import", str(app), str(dump), "--replace", "--storage", url)
    assert ok("export", str(app), "--storage", url) == text


# --- call --each --------------------------------------------------------------------------------


def test_call_each_calls_once_per_line(app: Path, tmp_path: Path) -> None:
    lines = tmp_path / "calls.jsonl"
    lines.write_text('["bob"]\n{"name": "cy", "role": "admin"}\n\n"dan"\n'
                     '{"args": ["eve"], "kwargs": {"role": "ops"}}\n')
    out = cli("call", str(app), "add", "--each", str(lines))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["1", "2", "3", "4"]  # one result a line
    assert "4 calls of add" in out.stderr
    users = read(app, "users")
    assert users["cy"]["role"] == "admin" and users["eve"]["role"] == "ops"  # type: ignore[index]
    with dh.open(heap_file(app), read_only=True) as heap:
        notes = [t.description.decode() for t in heap.db.storage.iterator()]
    assert sum(n.startswith("add(") for n in notes) == 4  # one action, one transaction each
    # from stdin
    out = with_stdin(["call", str(app), "add", "--each", "-"], '["fay", "x"]\n')
    assert out.returncode == 0 and out.stdout == "5\n", out.stderr


def test_call_each_stops_at_a_failing_line(app: Path, tmp_path: Path) -> None:
    lines = tmp_path / "calls.jsonl"
    lines.write_text("1\n2\n3\n4\n")
    out = cli("call", str(app), "fail_on", "--each", str(lines))
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["1", "2"]
    assert "line 3 failed; the 2 calls before it committed" in out.stderr
    assert "raised ValueError: three" in out.stderr
    assert read(app, "n") == 2
    lines.write_text("1\n{bad\n")
    out = cli("call", str(app), "fail_on", "--each", str(lines))
    assert out.returncode == 1 and "line 2" in out.stderr and "not JSON" in out.stderr


@pytest.mark.slow
def test_ctrl_c_stops_call_each_between_calls(app: Path, tmp_path: Path) -> None:
    lines = tmp_path / "calls.jsonl"
    lines.write_text("".join(f"{i}\n" for i in range(200)))
    ok("call", str(app), "add", "ann")  # deployed: the next process starts calling at once
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "call", str(app), "slow", "--each",
                             str(lines)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env(), text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # calling has begun (its handler of Ctrl-C is in place)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = first + out
    assert proc.returncode == 130, err
    made = len(out.splitlines())
    assert 0 < made < 200
    assert f"interrupted after {made} call" in err and "each committed" in err and "Traceback" not in err
    assert read(app, "n") == 1 + made  # each call that printed its result, and no other


def test_help_examples() -> None:
    from durable_heap.cli import _parser

    _, commands = _parser()
    for name in ("export", "import"):
        text = commands[name].format_help()
        assert "example:" in text and f"durable-heap {name} tracker.py" in text
    assert "--each" in commands["call"].format_help()


# --- shell completion ---------------------------------------------------------------------------


def test_completion_scripts_complete_commands_and_options(tmp_path: Path) -> None:
    pytest.importorskip("shtab")
    import shutil

    bash = ok("completion", "bash")
    assert "complete -o bashdefault -F _shtab_durable_heap durable-heap" in bash
    script = tmp_path / "dh.bash"
    script.write_text(bash)
    bash_path = shutil.which("bash")
    if bash_path:
        probe = f"""
            source {script}
            complete_words() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"
                COMP_POINT=${{#COMP_LINE}}; _shtab_durable_heap durable-heap "${{@: -1}}" "${{@: -2:1}}"
                echo "${{COMPREPLY[*]}}"; }}
            complete_words durable-heap ex
            complete_words durable-heap import app.py data.json --re
            complete_words durable-heap verify --tr
        """
        out = subprocess.run([bash_path, "-c", probe], capture_output=True, text=True, timeout=30)
        assert out.stdout.splitlines() == ["export", "--replace", "--traceback"], out.stdout + out.stderr
    zsh = ok("completion", "zsh")
    assert zsh.startswith("#compdef durable-heap") and "export" in zsh and "--replace" in zsh
    bad = cli("completion", "fish")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
