"""Deploys, versions, rollback, history and durable globals: end to end through the CLI."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import _values
from tests.conftest import ROOT, ZeoServer, cli, run, write

V1 = """
    from durable_heap import Object, state

    class User(Object):
        def __init__(self, name):
            self.name = name

    state.setdefault("users", {})

    def add(name):
        state.users[name] = User(name)
        return len(state.users)

    def describe(name):
        u = state.users[name]
        return {"cls": type(u).__qualname__, "email": getattr(u, "email", "none"),
                "version": 1}
"""

V2 = """
    from durable_heap import Object, state

    class User(Object):
        email = None                      # a class default serves old instances

        def __init__(self, name, email=None):
            self.name = name
            self.email = email

    state.setdefault("users", {})

    def migrate(state, previous):
        state.migrations = state.get("migrations", []) + [[previous.number, previous.source_hash]]

    def add(name):
        state.users[name] = User(name, f"{name}@example.org")
        return len(state.users)

    def describe(name):
        u = state.users[name]
        return {"cls": type(u).__qualname__, "email": u.email, "version": 2,
                "same_class": type(u) is User}
"""


def ok(*args: str) -> str:
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def call(prog: Path, *args: str) -> object:
    return json.loads(ok("call", str(prog), *args))


def versions(prog: Path) -> list[dh.Version]:
    with dh.open(prog.parent / ".durable-heap" / f"{prog.stem}.fs", read_only=True) as heap:
        return heap.versions(prog)


def snapshot(prog: Path) -> tuple[list[tuple[int, str, bool]], str]:
    """Versions and the whole state tree: what a failed deploy must leave unchanged."""
    listed = [(v.number, v.source_hash, v.current) for v in versions(prog)]
    return listed, ok("inspect", str(prog), "--depth", "9")


def test_deploy_new_version_with_migrate_rollback_and_history(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    first = cli("call", str(app), "add", "ann")
    assert first.returncode == 0 and first.stdout.strip() == "1"
    assert "deployed app version 1" in first.stderr
    second = cli("call", str(app), "describe", "ann")
    assert "deployed" not in second.stderr  # unchanged file: no deploy
    assert json.loads(second.stdout) == {"cls": "User", "email": "none", "version": 1}

    write(app, V2)
    out = cli("deploy", str(app), "--note", "users get an email")
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
    assert call(app, "describe", "ann") == {"cls": "User", "email": None, "version": 2, "same_class": True}
    assert call(app, "add", "bob") == 2
    assert call(app, "describe", "bob")["email"] == "bob@example.org"  # type: ignore[index]

    listed = versions(app)
    assert [(v.number, v.current) for v in listed] == [(1, False), (2, True)]
    assert listed[1].note == "users get an email" and listed[0].note == "from app.py"
    assert listed[0].deployed_at.tzinfo is not None and listed[0].deployed_at <= listed[1].deployed_at
    text = ok("versions", str(app))
    assert "users get an email" in text and listed[1].source_hash[:12] in text
    assert text.splitlines()[2].startswith(" * ") and text.splitlines()[1].startswith("   ")

    # migrate ran once, with the previous version
    with dh.open(app.parent / ".durable-heap" / "app.fs", read_only=True) as heap:
        assert dh.to_builtin(heap.state.migrations) == [[1, listed[0].source_hash]]

    out = cli("rollback", str(app), "--to", "1")
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr
    assert "version 1's source" in out.stderr
    # The file still says v2, but the rollback is not undone by the next call.
    assert call(app, "describe", "bob") == {"cls": "User", "email": "bob@example.org", "version": 1}
    listed = versions(app)
    assert [v.number for v in listed] == [1, 2, 3]
    assert listed[2].source_hash == listed[0].source_hash and listed[2].current
    assert listed[2].note == "rollback to version 1"
    # Deploying the file explicitly goes forward again.
    assert ok("deploy", str(app)) == "4"
    assert call(app, "describe", "bob")["version"] == 2  # type: ignore[index]
    # An unchanged deploy records nothing.
    out = cli("deploy", str(app))
    assert out.stdout.strip() == "4" and "unchanged" in out.stderr

    # History: the state while version 1 was current had only ann.
    at1 = ok("inspect", str(app), "--at", "1")
    assert "users: Dict (1 entry)" in at1 and "'bob'" not in at1
    at2 = ok("inspect", str(app), "--at", "2")
    assert "users: Dict (2 entries)" in at2 and "migrations" in at2
    when = listed[1].deployed_at.isoformat()  # just before version 2's deploy committed
    assert "users: Dict (1 entry)" in ok("inspect", str(app), "--at", when)
    before = cli("inspect", str(app), "--at", "2001-01-01T00:00")
    assert before.returncode == 2 and "did not exist yet" in before.stderr
    bad = cli("inspect", str(app), "--at", "yesterday")
    assert bad.returncode == 2 and "ISO time" in bad.stderr

    # The same history through the API.
    with dh.open(app.parent / ".durable-heap" / "app.fs", read_only=True) as heap:
        with heap.state_at(1, app) as old:
            assert sorted(old.users) == ["ann"]
        with heap.state_at(heap.versions(app)[3].deployed_at) as old:
            assert sorted(old.users) == ["ann", "bob"]


@pytest.mark.parametrize(
    ("case", "source", "message"),
    [
        ("syntax", "def add(:\n    pass\n", "app.py, line 1: syntax error"),
        ("top level", "from durable_heap import state\nstate.half = 1\nx = 1 / 0\n",
         "its top level raised ZeroDivisionError: division by zero (app.py, line 3)"),
        ("migrate", V2.replace("state.migrations = ", "raise RuntimeError('no way'); state.m = "),
         "migrate() raised RuntimeError: no way (app.py, line 14)"),
        ("removed class", "from durable_heap import state\nstate.setdefault('users', {})\n",
         "stored objects use classes this version no longer defines: app.User"),
        ("unstorable", "from durable_heap import state\nstate.cb = lambda: 1\n",
         "state.cb cannot be stored"),
    ],
)
def test_failed_deploy_changes_nothing(tmp_path: Path, case: str, source: str, message: str) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    before = snapshot(app)

    write(app, textwrap.dedent(source) if case != "migrate" else source)
    out = cli("deploy", str(app))
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and "version 1 stays in force" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert snapshot(app) == before
    # `call` with the broken file: reports the failed deploy, runs nothing.
    out = cli("call", str(app), "add", "bob")
    assert out.returncode == 1 and message in out.stderr and out.stdout == ""
    assert snapshot(app) == before
    # The old code keeps serving.
    assert call(app, "--no-deploy", "add", "bob") == 2
    assert call(app, "--no-deploy", "describe", "bob")["version"] == 1  # type: ignore[index]


def test_removed_class_forced_keeps_data_and_check_lists_it(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    assert "every stored class" in ok("check", str(app))
    write(app, """
        from durable_heap import state
        state.setdefault("users", {})

        def count():
            return len(state.users)
    """)
    assert ok("deploy", str(app), "--force") == "2"
    assert call(app, "count") == 1
    out = cli("check", str(app))
    assert out.returncode == 1 and "app.User" in out.stdout
    write(app, V1)  # putting the class back repairs the objects: the data was kept
    assert ok("deploy", str(app)) == "3"
    assert call(app, "describe", "ann")["cls"] == "User"  # type: ignore[index]
    assert cli("check", str(app)).returncode == 0


def test_rename_table(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    write(app, """
        from durable_heap import Object, state

        __durable_renames__ = {"app.User": "app.Member"}

        class Member(Object):
            rank = "new"

        state.setdefault("users", {})
        # the top level already sees renamed objects
        state.kinds = sorted({type(u).__name__ for u in state.users.values()})

        def describe(name):
            u = state.users[name]
            return [type(u).__name__, u.name, u.rank]

        def touch(name):
            state.users[name].rank = "touched"
    """)
    out = cli("deploy", str(app))
    assert out.returncode == 0, out.stderr
    assert call(app, "describe", "ann") == ["Member", "ann", "new"]
    ok("call", str(app), "touch", "ann")
    assert "'ann': app.Member" in ok("inspect", str(app))
    with dh.open(app.parent / ".durable-heap" / "app.fs", read_only=True) as heap:
        assert dh.to_builtin(heap.state.kinds) == ["Member"]


def test_durable_globals_persist_within_a_version(tmp_path: Path) -> None:
    app = write(tmp_path / "hits.py", """
        import threading
        from durable_heap import state

        hits = []
        count = 0
        seen = {"first": None}
        lock = threading.Lock()          # not data: stays process-local

        def hit(name):
            global count
            with lock:
                hits.append(name)
                count += 1
                if seen["first"] is None:
                    seen["first"] = name
            return [list(hits), count, seen["first"]]
    """)
    assert call(app, "hit", "a") == [["a"], 1, "a"]
    assert call(app, "hit", "b") == [["a", "b"], 2, "a"]
    assert call(app, "hit", "c") == [["a", "b", "c"], 3, "a"]
    # A new version starts from its own top level: state is what crosses versions.
    write(app, app.read_text().replace("hits = []", "hits = ['v2']")
          + "\ndef boom():\n    hits.append('x')\n    raise ValueError\n")
    assert call(app, "hit", "d") == [["v2", "d"], 1, "d"]
    assert call(app, "hit", "e") == [["v2", "d", "e"], 2, "d"]
    # A failing call keeps the globals as they were.
    assert cli("call", str(app), "boom").returncode == 1
    assert call(app, "hit", "f") == [["v2", "d", "e", "f"], 3, "d"]


def test_package_program(tmp_path: Path) -> None:
    pkg = tmp_path / "shop"
    (pkg / "parts").mkdir(parents=True)
    write(pkg / "__init__.py", """
        from durable_heap import state
        from .models import Item
        from .parts.prices import price

        state.setdefault("items", {})

        def add(name):
            state.items[name] = Item(name, price(name))
            return len(state.items)

        def show():
            return {k: [type(v).__module__, v.name, v.price] for k, v in state.items.items()}
    """)
    write(pkg / "models.py", """
        from durable_heap import Object

        class Item(Object):
            def __init__(self, name, price):
                self.name, self.price = name, price
    """)
    write(pkg / "parts" / "__init__.py", "")
    write(pkg / "parts" / "prices.py", "def price(name):\n    return len(name)\n")
    assert call(pkg, "add", "pen") == 1
    assert (tmp_path / ".durable-heap" / "shop.fs").is_file()
    assert call(pkg, "show") == {"pen": ["shop.models", "pen", 3]}
    write(pkg / "parts" / "prices.py", "def price(name):\n    return 10 * len(name)\n")
    out = cli("call", str(pkg), "add", "ink")
    assert out.returncode == 0 and "deployed shop version 2" in out.stderr
    assert call(pkg, "show") == {"pen": ["shop.models", "pen", 3], "ink": ["shop.models", "ink", 30]}
    listed = versions(pkg)
    assert listed[-1].files == ("__init__.py", "models.py", "parts/__init__.py", "parts/prices.py")
    # The stored source runs, not the disk: a broken submodule on disk does not stop calls.
    write(pkg / "models.py", "class Item(:\n")
    assert call(pkg, "--no-deploy", "show")["ink"][2] == 30  # type: ignore[index]
    out = cli("call", str(pkg), "show")
    assert out.returncode == 1 and "shop/models.py, line 1: syntax error" in out.stderr


def test_stored_source_runs_not_the_file(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    write(app, "this is not python\n")
    out = ok("inspect", str(app))  # inspect loads the current version's stored source
    assert "'ann': app.User" in out
    app.unlink()
    assert call(app, "describe", "ann")["version"] == 1  # type: ignore[index]


def test_bad_input(tmp_path: Path) -> None:
    out = cli("deploy", str(tmp_path / "nope.py"))
    assert out.returncode == 2 and "no program file" in out.stderr
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    out = cli("rollback", str(app), "--to", "7")
    assert out.returncode == 2 and "has no version 7 (its versions: 1)" in out.stderr
    assert [v.number for v in versions(app)] == [1]
    out = cli("rollback", str(app), "--to", "1")
    assert out.returncode == 0 and "already runs version 1's source" in out.stderr
    out = cli("inspect", str(app), "--at", "5")
    assert out.returncode == 2 and "no version 5" in out.stderr
    write(tmp_path / "fresh.py", "def f():\n    return 1\n")
    out = cli("call", str(tmp_path / "fresh.py"), "f", "--no-deploy")
    assert out.returncode == 1 and "never been deployed" in out.stderr
    out = cli("versions", str(tmp_path / "fresh.py"), "--storage", str(tmp_path / ".durable-heap" / "app.fs"))
    assert out.returncode == 2 and "no deployed versions" in out.stderr
    write(app, textwrap.dedent(V1) + "\n__durable_renames__ = {'a': 1}\n")
    out = cli("deploy", str(app))
    assert out.returncode == 1 and "__durable_renames__ must be a literal dict" in out.stderr


def test_compatibility_with_a_heap_written_by_version_0_1(tmp_path: Path) -> None:
    fixtures = ROOT / "tests" / "fixtures"
    app = tmp_path / "legacy.py"
    shutil.copy(fixtures / "legacy.py", app)
    (tmp_path / ".durable-heap").mkdir()
    shutil.copy(fixtures / "legacy-0.1.fs", tmp_path / ".durable-heap" / "legacy.fs")
    assert call(app, "describe", "ann") == {"name": "ann", "notes": ["buy milk", "call bob"], "users": 101}
    assert [v.number for v in versions(app)] == [1]
    assert call(app, "add", "zoe", "new") == 102


def test_api_deploy_load_and_reload(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app)
        assert prog.call("add", "ann") == 1
        assert prog.version.number == 1
        assert prog.call("describe", "ann")["version"] == 1
        # Another deploy (here from this process, as a deploying process would):
        # the program loads the new version before its next call.
        write(app, V2)
        v2 = heap.deploy(app, note="v2")
        assert v2.number == 2 and v2.current
        expected = {"cls": "User", "email": None, "version": 2, "same_class": True}
        assert prog.call("describe", "ann") == expected
        assert heap.rollback(app, 1).number == 3
        assert prog.call("describe", "ann")["version"] == 1
        with pytest.raises(dh.DeployError) as err:
            heap.deploy(write(app, "x = 1 / 0\n"))
        assert isinstance(err.value.cause, ZeroDivisionError) and "version 3 stays" in str(err.value)
        assert prog.call("describe", "ann")["version"] == 1
        with heap.transaction(), pytest.raises(dh.ProgramError, match="transaction of its own"):
            heap.deploy(app)
        with pytest.raises(dh.FunctionNotFoundError, match=r"its functions: add, describe"):
            prog.call("nope")


def test_hot_reload_on_file_change(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app, watch=True)
        assert prog.call("add", "ann") == 1
        write(app, V2)
        os.utime(app, ns=(time.time_ns() + 5_000_000_000,) * 2)
        prog._checked = 0.0  # skip the once-a-second pause
        assert prog.call("describe", "ann")["version"] == 2
        assert [v.number for v in heap.versions(app)] == [1, 2]
        # A broken edit is reported by the deploy, and the running version keeps serving.
        write(app, "def (:\n")
        os.utime(app, ns=(time.time_ns() + 9_000_000_000,) * 2)
        prog._checked = 0.0
        with pytest.raises(dh.DeployError):
            prog.call("describe", "ann")
        assert prog.call("describe", "ann")["version"] == 2


def test_watch_command(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DURABLE_HEAP_STORAGE", None)
    proc = subprocess.Popen([sys.executable, "-m", "durable_heap", "watch", str(app), "--interval", "0.1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        lines.append(proc.stderr.readline())
        assert "watching" in lines[0]
        write(app, V2)
        lines.append(proc.stderr.readline())
        assert "deployed app version 2" in lines[-1]
        write(app, "x = (\n")
        lines.append(proc.stderr.readline())
        assert "syntax error" in lines[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, lines
    assert [v.number for v in versions(app)] == [1, 2]


def test_concurrent_deploys_in_one_process(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a" / "app.py", V1)
    b = write(tmp_path / "b" / "app.py", V2)
    with dh.open(tmp_path / "h.fs") as heap:
        results: list[object] = []

        def go(path: Path) -> None:
            try:
                results.append(heap.deploy(path).number)
            except Exception as exc:  # noqa: BLE001 - collected for the assert
                results.append(exc)

        threads = [threading.Thread(target=go, args=(p,)) for p in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [1, 2]  # type: ignore[type-var]
        listed = heap.versions(a)
        assert [v.number for v in listed] == [1, 2] and listed[1].current


def test_new_fields_with_defaults_serve_old_objects(tmp_path: Path) -> None:
    app = write(tmp_path / "notes.py", """
        import dataclasses
        from durable_heap import Object, state

        @dataclasses.dataclass
        class Note:
            text: str

        @dataclasses.dataclass(eq=False)
        class Card(Object):
            title: str

        state.setdefault("notes", [])
        state.setdefault("cards", {})

        def add(text):
            state.notes.append(Note(text))
            state.cards[text] = Card(text)
    """)
    ok("call", str(app), "add", "milk")
    write(app, """
        import dataclasses
        from durable_heap import Object, state

        @dataclasses.dataclass
        class Note:
            text: str
            done: bool = False
            tags: list = dataclasses.field(default_factory=list)

        @dataclasses.dataclass(eq=False)
        class Card(Object):
            title: str
            pins: dict = dataclasses.field(default_factory=dict)
            color: str = "grey"

        state.setdefault("notes", [])
        state.setdefault("cards", {})

        def show():
            n, c = state.notes[0], state.cards["milk"]
            return [n.text, n.done, n.tags, c.title, c.color, dict(c.pins)]

        def tag(t):
            state.notes[0].tags.append(t)     # the default list is the object's own
            state.cards["milk"].color = t
    """)
    assert call(app, "show") == ["milk", False, [], "milk", "grey", {}]
    ok("call", str(app), "tag", "red")
    assert call(app, "show") == ["milk", False, ["red"], "milk", "red", {}]


def test_class_registry_sees_plain_nested_and_enum_values(tmp_path: Path) -> None:
    app = write(tmp_path / "reg.py", """
        import dataclasses, enum
        from durable_heap import state

        class Color(enum.Enum):
            RED = 1

        @dataclasses.dataclass
        class Inner:
            x: int

        @dataclasses.dataclass
        class Note:
            text: str
            inner: object = None

        state.setdefault("notes", [])

        def add(text):
            state.notes.append(Note(text))

        def nest():
            state.notes[0].inner = [Inner(2)]      # an in-place change of a plain object

        def paint():
            state.color = Color.RED
    """)
    for fn in ("add", "nest", "paint"):
        ok("call", str(app), fn, *(["a"] if fn == "add" else []))
    with dh.open(tmp_path / ".durable-heap" / "reg.fs", read_only=True) as heap:
        registry = heap.connection.root()["durable_heap.classes"]
        assert sorted(registry.keys()) == ["reg.Color", "reg.Inner", "reg.Note"]
    write(app, "from durable_heap import state\n")
    out = cli("deploy", str(app))
    assert out.returncode == 1 and "reg.Color, reg.Inner, reg.Note" in out.stderr


def test_class_registry_notes_belong_to_their_transaction(tmp_path: Path) -> None:
    """A class noted in one heap's transaction (one thread) is registered by that
    transaction's commit only: never by another heap's or thread's commit, never
    lost when another transaction commits or aborts first, and noted again when
    its own transaction aborted and the value is stored once more."""
    source = """
        from durable_heap import Object, state

        class {0}(Object):
            pass

        class {1}(Object):
            pass

        state.setdefault("items", [])
    """
    # Notes made earlier in this thread for objects in no heap yet (other tests'
    # values built before they were stored) are registered by any commit of the
    # thread that lacks them, by design (see durable_heap._values.note_class):
    # start this exact count from none.
    _values._local.loose.clear()
    app_a = write(tmp_path / "rega.py", source.format("A", "C"))
    app_b = write(tmp_path / "regb.py", source.format("B", "D"))
    with dh.open(tmp_path / "a.fs") as ha, dh.open(tmp_path / "b.fs") as hb:
        mod_a, mod_b = ha.load(app_a).module, hb.load(app_b).module

        def registry(heap: dh.Heap) -> list[str]:
            with heap.transaction():
                return sorted(heap.connection.root()["durable_heap.classes"].keys())

        def together(first: Any, second: Any) -> None:
            """Run `first` and `second` in two threads, each up to the moment it has
            stored its value; then let `second` finish (commit or abort), then `first`."""
            stored = threading.Barrier(2, timeout=30)
            second_done = threading.Event()
            errors: list[BaseException] = []

            def run(step: Any, wait_for: threading.Event | None) -> None:
                try:
                    step(stored, wait_for)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                finally:
                    if wait_for is None:
                        second_done.set()

            threads = [threading.Thread(target=run, args=(first, second_done)),
                       threading.Thread(target=run, args=(second, None))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [type(e).__name__ for e in errors] == ["KeyError"] * len(errors)

        def store(heap: dh.Heap, cls: type, fail: bool) -> Any:
            def step(stored: threading.Barrier, wait_for: threading.Event | None) -> None:
                with heap.transaction() as state:
                    state.items.append(cls())
                    stored.wait()
                    if wait_for is not None:
                        wait_for.wait(30)
                    if fail:
                        raise KeyError("abort")
            return step

        # B is noted in b's transaction, which aborts while a's is open: a registers A only.
        together(store(ha, mod_a.A, False), store(hb, mod_b.B, True))
        assert registry(ha) == ["rega.A"] and registry(hb) == []
        # Stored again, B is noted again.
        with hb.transaction() as state:
            state.items.append(mod_b.B())
        assert registry(hb) == ["regb.B"]
        # D's transaction commits while C's is open: C is not taken by it, nor lost.
        together(store(ha, mod_a.C, False), store(hb, mod_b.D, False))
        assert registry(ha) == ["rega.A", "rega.C"] and registry(hb) == ["regb.B", "regb.D"]
        assert [type(x).__name__ for x in ha.state.items] == ["A", "C"]


def test_history_after_pack(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    assert call(app, "add", "ann") == 1
    write(app, V2)
    assert ok("deploy", str(app)) == "2"
    assert "users: Dict (1 entry)" in ok("inspect", str(app), "--at", "1")
    with dh.open(tmp_path / ".durable-heap" / "app.fs") as heap:
        heap.pack(days=0)
    out = cli("inspect", str(app), "--at", "1")
    assert out.returncode == 2 and "removed by a pack" in out.stderr
    assert [v.number for v in versions(app)] == [1, 2]  # version records survive packing
    assert ok("rollback", str(app), "--to", "1") == "3"
    assert call(app, "describe", "ann")["version"] == 1  # type: ignore[index]


def test_program_calls_from_threads_across_a_deploy(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app)
        errors: list[BaseException] = []
        seen: set[int] = set()

        def worker(w: int) -> None:
            try:
                for i in range(30):
                    prog.call("add", f"w{w}-{i}")
                    seen.add(prog.call("describe", f"w{w}-{i}")["version"])
            except BaseException as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        write(app, V2)
        heap.deploy(app)
        for t in threads:
            t.join()
        assert not errors, errors
        assert prog.call("describe", "w0-0")["version"] == 2
        with heap.transaction() as st:
            assert len(st.users) == 90
            assert {type(u).__module__ for u in st.users.values()} == {"app"}


def test_review_findings_in_a_service(tmp_path: Path) -> None:
    """Threads, nested calls, stale references and rename tables around in-process deploys."""
    app = write(tmp_path / "svc.py", """
        import dataclasses
        import threading
        from durable_heap import Object, state

        @dataclasses.dataclass
        class Box:
            items: list

        class OldUser(Object):
            pass

        hits = []
        _client = None                      # made lazily; not data once it holds an object

        state.setdefault("box", Box([]))
        state.setdefault("users", {})

        def hit(name):
            hits.append(name)
            return len(hits)

        def client():
            global _client
            if _client is None:
                _client = threading.Lock()      # stands for a connection: not storable
            return id(_client)

        def keep():
            return state.box

        def add_old(name):
            state.users[name] = OldUser()
    """)
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app)
        # Durable globals from 4 threads: nothing lost, no cross-connection errors.
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(50):
                    prog.call("hit", "x")
            except BaseException as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert prog.call("hit", "y") == 201
        # A lazily made process-local global is made once, not reset at each call.
        assert len({prog.call("client") for _ in range(4)}) == 1
        # A plain object kept across a reload and then changed is refused, not lost.
        box = prog.call("keep")
        heap.deploy(write(app, app.read_text() + "\n# v2\n"))
        prog.call("hit", "z")  # loads v2
        with pytest.raises(dh.StaleReferenceError), heap.transaction():
            box.items.append(1)
        # A first call of a new version inside a transaction: a clear error, nothing lost.
        heap.deploy(write(app, app.read_text() + "\n# v3\n"))
        with pytest.raises(dh.ProgramError, match="outside transactions"), heap.transaction() as st:
            st.kept = 1
            prog.call("hit", "w")
        # Rename tables are replaced, not merged, by each version.
        prog.call("add_old", "ann")
        text = app.read_text().replace("class OldUser(Object):", "class User(Object):")
        renamed = "\n__durable_renames__ = {'svc.OldUser': 'svc.User'}\n"
        heap.deploy(write(app, text.replace("OldUser()", "User()") + renamed))
        assert prog.call("hit", "v") == 1  # a new version: its own globals
        with pytest.raises(dh.DeployError, match="svc.OldUser"):
            heap.deploy(write(app, text.replace("OldUser()", "User()")))  # the table dropped


def test_state_at_lets_the_callers_errors_through(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    with dh.open(tmp_path / "h.fs") as heap:
        heap.load(app).call("add", "ann")
        with pytest.raises(KeyError, match="nobody"), heap.state_at(1, app) as old:
            old.users["nobody"]


def test_state_at_is_read_only_at_every_time(tmp_path: Path) -> None:
    """The current version, a time after the last commit and a time far in the future
    all read the newest state, and like any historical state they refuse changes
    (ZODB would accept them and drop them at the end of the view)."""
    from tests.strategies import Point

    app = write(tmp_path / "app.py", V1)
    with dh.open(tmp_path / "h.fs") as heap:
        heap.load(app).call("add", "ann")
        with heap.transaction() as state:
            state.point = Point(1)
        past = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(0.01)
        with heap.transaction() as state:
            state.after = 1  # so that `past` is before the last commit
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        views = [(1, app), (later,), ("9999-01-01",), (past,)]
        for args in views:
            with heap.state_at(*args) as old:
                assert sorted(old.users) == ["ann"]
                with pytest.raises(dh.StorageError, match=r"state\.users belongs to the read-only view"):
                    old.users["bob"] = 1
                with pytest.raises(dh.StorageError, match="read-only view"):
                    old.extra = 1
            with pytest.raises(dh.StorageError, match=r"state\.point was changed in place in the read-only"):
                with heap.state_at(*args) as old:
                    old.point.x = 5  # a plain object: caught when the view ends
        assert heap.state.point == Point(1) and "extra" not in heap.state
        assert sorted(heap.state.users) == ["ann"]
        with heap.state_at("9999-01-01") as newest:
            assert newest.after == 1  # the newest state, not "did not exist yet"
        with heap.state_at(past) as old:
            assert "after" not in old


def test_inspect_at_an_old_version_does_not_run_its_top_level_on_todays_state(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", """
        from durable_heap import state
        state.setdefault("names", ["ann"])
        UPPER = [n.upper() for n in state.names]     # fits version 1's shape only

        def show():
            return UPPER
    """)
    assert call(app, "show") == ["ANN"]
    write(app, """
        from durable_heap import state
        state.setdefault("names", [])

        def migrate(state, previous):
            state.names = [{"name": n} for n in state.names]
    """)
    assert ok("deploy", str(app)) == "2"
    out = ok("inspect", str(app), "--at", "1")
    assert "[0]: 'ann'" in out


def test_no_heap_file_for_a_missing_or_misnamed_program(tmp_path: Path) -> None:
    for args in (["call", str(tmp_path / "nope.py"), "f"], ["deploy", str(tmp_path / "nope.py")],
                 ["rollback", str(tmp_path / "nope.py"), "--to", "1"],
                 ["call", str(write(tmp_path / "my-app.py", "x = 1\n")), "f"]):
        out = cli(*args)
        assert out.returncode in (1, 2) and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / ".durable-heap").exists()


# --- several processes, over ZEO -------------------------------------------------------------


def test_a_running_service_loads_a_version_another_process_deployed(zeo_server: ZeoServer,
                                                                    tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", V1)
    with dh.open(zeo_server.url) as heap:
        prog = heap.load(app)
        assert prog.call("add", "ann") == 1
        assert prog.call("describe", "ann")["version"] == 1
        write(app, V2)
        out = cli("deploy", str(app), "--storage", zeo_server.url)
        assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
        # The next call of the running service sees version 2 and its migrate's work.
        expected = {"cls": "User", "email": None, "version": 2, "same_class": True}
        assert prog.call("describe", "ann") == expected
        assert prog.version.number == 2
        assert cli("rollback", str(app), "--to", "1", "--storage", zeo_server.url).returncode == 0
        assert prog.call("describe", "ann")["version"] == 1


SLOW = """
    import time
    from durable_heap import state

    state.setdefault("log", [])

    def migrate(state, previous):
        time.sleep(0.3)                  # both deploys are in their transaction at once
        state.log.append([previous.number, NAME])

    def show():
        return list(state.log)
"""


def test_two_processes_deploying_at_once_never_half_deploy(zeo_server: ZeoServer, tmp_path: Path) -> None:
    files = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        files.append(write(tmp_path / name / "app.py", textwrap.dedent(SLOW) + f"\nNAME = {name!r}\n"))
    first = cli("deploy", str(files[0]), "--storage", zeo_server.url)
    assert first.returncode == 0, first.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DURABLE_HEAP_STORAGE", None)
    outcomes = []
    for round_ in range(3):
        for f in files:  # a change per round, so each deploy is a new version
            f.write_text(f.read_text() + f"# round {round_}\n")
        procs = [subprocess.Popen([sys.executable, "-m", "durable_heap", "deploy", str(f), "--storage",
                                   zeo_server.url], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for f in files]
        for p in procs:
            out, err = p.communicate(timeout=120)
            outcomes.append((p.returncode, out.strip(), err))
    for code, _, err in outcomes:  # each deploy either landed or said clearly why not
        assert code == 0 or ("conflict" in err and err.count("\n") == 1), err
    landed = sorted(int(out) for code, out, _ in outcomes if code == 0)
    with dh.open(zeo_server.url) as heap:
        listed = heap.versions(files[0])
        numbers = [v.number for v in listed]
        assert numbers == list(range(1, len(numbers) + 1))
        assert landed == numbers[1:]  # every new version is one a deploy reported
        with heap.transaction() as st:
            log = dh.to_builtin(st.log)
        # Each recorded version's migrate ran exactly once, against the version before it.
        assert [entry[0] for entry in log] == numbers[:-1]
        assert listed[-1].current


def test_program_compiles_with_its_own_future_imports_only(tmp_path: Path) -> None:
    # durable_heap's own `from __future__ import annotations` must not leak into programs.
    app = write(tmp_path / "app.py", """
        class Point:
            x: int

        def kind():
            return Point.__annotations__["x"].__name__
    """)
    assert ok("call", str(app), "kind").strip() == '"int"'


SCRIPT = """
import json, sys
import durable_heap as dh

with dh.open(sys.argv[1]) as heap:
    ann = heap.state.users["ann"]
    with heap.transaction() as state:
        state.users[sys.argv[2]] = type(ann)(sys.argv[2])
    made = [repr(heap.state.point), repr(heap.state.color), type(heap.state.vip).__name__]
    print(json.dumps([type(ann).__module__, ann.describe(), sorted(heap.state.users), made]))
"""


def test_a_script_that_never_loaded_the_program_gets_the_deployed_classes(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", """
        import collections
        import enum
        import durable_heap as dh

        Point = collections.namedtuple("Point", "x y")     # made by calls, not class statements
        Color = enum.Enum("Color", "RED GREEN")

        class User(dh.Object):
            def __init__(self, name):
                self.name = name

            def describe(self):
                return f"user {self.name}"

        Customer = User                                     # an alias

        class State(dh.State):          # declared: the root mapping names app.State
            users: dict = {}

        state = dh.typed_state(State)

        def add(name):
            state.users[name] = User(name)
            state.point, state.color, state.vip = Point(1, 2), Color.RED, Customer("vip")
    """)
    ok("call", str(app), "add", "ann")
    path = tmp_path / ".durable-heap" / "app.fs"
    # The file on disk is no longer the deployed version, and must not run.
    write(app, "raise SystemExit('the file on disk ran')\n")
    # In the program's folder `import app` would find that file; elsewhere, nothing.
    for cwd, name in ((tmp_path, "bob"), (tmp_path.parent, "cy")):
        out = run(["-c", SCRIPT, str(path), name], cwd=cwd)
        assert out.returncode == 0, out.stderr
        module, described, names, made = json.loads(out.stdout)
        assert (module, described) == ("app", "user ann") and name in names
        assert made == ["Point(x=1, y=2)", "<Color.RED: 1>", "User"]
    assert ok("call", str(app), "add", "dan", "--no-deploy").strip() == "null"  # the stored version serves
    out = run(["-c", SCRIPT, str(path), "eve"], cwd=tmp_path)
    assert json.loads(out.stdout)[2] == ["ann", "bob", "cy", "dan", "eve"]


def test_a_script_gets_renamed_classes_and_never_runs_a_top_level(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", """
        from durable_heap import Object, state

        class OldUser(Object):
            def __init__(self, name):
                self.name = name

        def add(name):
            state.ann = OldUser(name)
    """)
    ok("call", str(app), "add", "ann")
    write(app, """
        from durable_heap import Object, state

        __durable_renames__ = {"app.OldUser": "app.User"}
        LIMIT = state.setdefault("limit", 5)     # needs the top level: not a definition

        class User(Object):
            def __init__(self, name):
                self.name = name

        class Capped(Object):
            limit = LIMIT

        def add(name):
            state.capped = Capped()
    """)
    ok("call", str(app), "add", "bob")
    path = tmp_path / ".durable-heap" / "app.fs"
    script = """
import json, sys
import durable_heap as dh
with dh.open(sys.argv[1]) as heap:
    print(json.dumps([type(heap.state.ann).__name__, type(heap.state.capped).__name__,
                      type(heap.state.capped).__mro__[1].__name__]))
"""
    write(app, "raise SystemExit('the file on disk ran')\n")
    out = run(["-c", script, str(path)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # Capped's class body needs LIMIT, which only the top level makes: the program's
    # definitions cannot be installed, so its objects are broken (their data kept),
    # and the file on disk is not imported instead. The renamed class comes first.
    names = json.loads(out.stdout)
    assert names[0] in ("User", "OldUser") and names[1:] == ["Capped", "PersistentBroken"], names


def test_a_script_with_two_threads_waits_for_the_program_to_install(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", """
        import time
        from durable_heap import Object, state

        class Slow:
            time.sleep(0.5)                  # a class body that takes its time

        class User(Object):
            def __init__(self, name):
                self.name = name

        def add(name):
            state[name] = User(name)
    """)
    ok("call", str(app), "add", "ann")
    ok("call", str(app), "add", "bob")
    script = """
import json, sys, threading, time
import durable_heap as dh
heap = dh.open(sys.argv[1])
found = {}
def read(name):
    with heap.transaction() as state:
        found[name] = [c.__name__ for c in type(state[name]).__mro__[:2]]
a = threading.Thread(target=read, args=("ann",)); a.start()
time.sleep(0.2)
b = threading.Thread(target=read, args=("bob",)); b.start()
a.join(); b.join(); heap.close()
print(json.dumps(found))
"""
    out = run(["-c", script, str(tmp_path / ".durable-heap" / "app.fs")], cwd=tmp_path.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ann": ["User", "Object"], "bob": ["User", "Object"]}


def test_reading_history_does_not_install_an_old_version(tmp_path: Path) -> None:
    v1 = """
        from durable_heap import Object, state

        class User(Object):
            def __init__(self, name):
                self.name = name

            def describe(self):
                return "VERSION " + self.name

        def add(name):
            state[name] = User(name)
    """
    app = write(tmp_path / "app.py", v1.replace("VERSION", "v1"))
    ok("call", str(app), "add", "ann")
    write(app, v1.replace("VERSION", "v2"))
    ok("call", str(app), "add", "bob")
    script = """
import json, sys
import durable_heap as dh
with dh.open(sys.argv[1]) as heap:
    with heap.state_at(1, sys.argv[2]) as then:   # version 1's data
        past = then["ann"].describe()
    print(json.dumps([past, heap.state["ann"].describe(), heap.state["bob"].describe()]))
"""
    out = run(["-c", script, str(tmp_path / ".durable-heap" / "app.fs"), str(app)], cwd=tmp_path.parent)
    assert out.returncode == 0, out.stderr
    # The process has the current version's classes, also for what history shows.
    assert json.loads(out.stdout) == ["v2 ann", "v2 ann", "v2 bob"]


LOOSE = """
    import sys
    sys.path.insert(0, sys.argv[1])
    import durable_heap as dh
    from loosemod import Box, Meta, Tag, Wrap

    def registry(heap):
        with heap.transaction():
            root = heap.connection.root()
            return sorted(k for k in root["durable_heap.classes"].keys() if k.startswith("loosemod"))

    box = Box()  # in no heap yet: its attribute's class is noted outside any heap
    box.meta = Meta()
    inner = Box()
    inner.tag = Tag()
    with dh.open(sys.argv[2]) as other:
        with other.transaction() as state:
            state.n = 1  # given no object from outside a heap
        print("other:", registry(other))
    with dh.open(sys.argv[3]) as mine:
        with mine.transaction() as state:
            state.wrap = Wrap(inner)  # reached only through a plain object (a dataclass)
        print("mine:", registry(mine))
        with mine.transaction() as state:
            state.box = box
        print("mine:", registry(mine))
    with dh.open(sys.argv[3]) as mine, mine.transaction() as state:
        print(type(state.box.meta).__name__, type(state.wrap.box.tag).__name__)
"""


def test_classes_noted_outside_a_heap_go_only_where_the_object_is_stored(tmp_path: Path) -> None:
    """A thread's notes of classes used by objects built outside a heap are registered by the
    heap that is given such an object, not by every later commit of the thread in any heap."""
    write(tmp_path / "loosemod.py", """
        import dataclasses
        from durable_heap import Object

        class Meta:
            pass

        class Tag:
            pass

        class Box(Object):
            pass

        @dataclasses.dataclass
        class Wrap:
            box: Box
    """)
    script = write(tmp_path / "loose.py", LOOSE)
    out = run([str(script), str(tmp_path), str(tmp_path / "other.fs"), str(tmp_path / "mine.fs")])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "other: []", "mine: ['loosemod.Box', 'loosemod.Meta', 'loosemod.Tag', 'loosemod.Wrap']",
        "mine: ['loosemod.Box', 'loosemod.Meta', 'loosemod.Tag', 'loosemod.Wrap']", "Meta Tag"]
