"""Named migrations, renames end to end (rewrite-classes, pack), removed classes before migrations,
and rollback's help: through real program files, the real CLI, each command a new process."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import _format
from durable_heap._registry import scan_classes
from tests.conftest import ZeoServer, cli, write

V1 = textwrap.dedent("""
    from durable_heap import Object, state

    class Task(Object):
        def __init__(self, title, assignee):
            self.title, self.assignee = title, assignee

    state.setdefault("tasks", {})
    state.setdefault("log", [])

    def add(title, assignee):
        state.tasks[title] = Task(title, assignee)
        return len(state.tasks)
""")

# The non-idempotent change, as named migrations: each runs once, in this order.
V2 = textwrap.dedent("""
    import durable_heap
    from durable_heap import Object, state

    class Task(Object):
        def __init__(self, title, owner):
            self.title, self.owner = title, owner

    state.setdefault("tasks", {})
    state.setdefault("log", [])

    @durable_heap.migration
    def owner_from_assignee(state):
        for t in state.tasks.values():
            t.owner = t.assignee
            del t.assignee          # a second run would fail: no assignee any more
        state.log.append("owner_from_assignee")

    @durable_heap.migration(name="0002-upper")
    def upper_owners(state):
        for t in state.tasks.values():
            t.owner = t.owner.upper()
        state.log.append("0002-upper")

    def add(title, owner):
        state.tasks[title] = Task(title, owner)
        return len(state.tasks)

    def owners():
        return {k: t.owner for k, t in sorted(state.tasks.items())}

    def log():
        return list(state.log)
""")


def ok(*args: str) -> str:
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def call(prog: Path, *args: str) -> Any:
    return json.loads(ok("call", str(prog), *args))


def heap_file(prog: Path) -> Path:
    return prog.parent / ".durable-heap" / f"{prog.stem}.fs"


def recorded(prog: Path) -> dict[str, int]:
    """The heap's record of the program's migrations: name -> the version that ran it."""
    with dh.open(heap_file(prog), read_only=True) as heap:
        with heap.transaction():
            table = heap.connection.root().get(_format.MIGRATIONS_KEY)
            done = table.get(prog.stem) if table is not None else None
            return {} if done is None else {k: v[0] for k, v in done.items()}


def test_named_migrations_run_once_each_in_order(tmp_path: Path) -> None:
    app = write(tmp_path / "tracker.py", V1)
    assert call(app, "add", "web", "ann") == 1
    assert call(app, "add", "db", "bob") == 2

    write(app, V2)
    assert ok("deploy", str(app)) == "2"
    assert call(app, "owners") == {"db": "BOB", "web": "ANN"}
    assert call(app, "log") == ["owner_from_assignee", "0002-upper"]  # the order they are defined
    assert recorded(app) == {"tracker.owner_from_assignee": 2, "0002-upper": 2}

    # A trivial edit deploys again: the migrations do not run again (they would fail).
    write(app, V2 + "\n# a comment\n")
    assert ok("deploy", str(app)) == "3"
    assert call(app, "log") == ["owner_from_assignee", "0002-upper"]
    # A rollback runs none (nor the forward deploy after it: they ran).
    assert ok("rollback", str(app), "--to", "1") == "4"
    assert ok("deploy", str(app)) == "5"
    assert call(app, "log") == ["owner_from_assignee", "0002-upper"]
    assert call(app, "owners") == {"db": "BOB", "web": "ANN"}

    # A later version drops one that ran (fine) and brings a new one: only that one runs.
    v6 = V2.replace("@durable_heap.migration\ndef owner_from_assignee", "def owner_from_assignee")
    v6 += textwrap.dedent("""
        @durable_heap.migration
        def tag_all(state):
            state.log.append("tag_all")
    """)
    write(app, v6)
    assert ok("deploy", str(app)) == "6"
    assert call(app, "log") == ["owner_from_assignee", "0002-upper", "tag_all"]
    assert recorded(app) == {"tracker.owner_from_assignee": 2, "0002-upper": 2, "tracker.tag_all": 6}
    # A migration is not an action: `call` refuses it, and it is not listed.
    out = cli("call", str(app), "tag_all")
    assert out.returncode == 2 and "tracker.tag_all is a migration" in out.stderr
    out = cli("call", str(app), "nope")
    assert "its functions: add, log, owner_from_assignee, owners)" in out.stderr  # unmarked: an action


def test_a_first_deploy_records_its_migrations_without_running_them(tmp_path: Path) -> None:
    app = write(tmp_path / "tracker.py", V2)
    assert call(app, "add", "web", "ann") == 1  # the first call deploys version 1
    assert call(app, "log") == []
    assert recorded(app) == {"tracker.owner_from_assignee": 1, "0002-upper": 1}
    write(app, V2 + "\n# edited\n")
    assert ok("deploy", str(app)) == "2"
    assert call(app, "owners") == {"web": "ann"} and call(app, "log") == []


def snapshot(prog: Path) -> tuple[str, str, dict[str, int]]:
    return ok("versions", str(prog)), ok("inspect", str(prog), "--depth", "9"), recorded(prog)


def test_a_failing_migration_refuses_the_deploy_and_changes_nothing(tmp_path: Path) -> None:
    app = write(tmp_path / "tracker.py", V1)
    assert call(app, "add", "web", "ann") == 1
    before = snapshot(app)
    broken = V2.replace("t.owner = t.owner.upper()", "t.owner = t.owner.upper() + 1")
    write(app, broken)
    out = cli("deploy", str(app))
    assert out.returncode == 1
    assert ("deploy of tracker failed: migration 0002-upper raised TypeError: can only concatenate "
            "str (not \"int\") to str (tracker.py, line 22); nothing was committed and version 1 "
            "stays in force") in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # The migration before it ran in the same transaction: it is not recorded either.
    assert snapshot(app) == before and recorded(app) == {}
    out = cli("call", str(app), "owners")
    assert out.returncode == 1 and "migration 0002-upper raised TypeError" in out.stderr
    write(app, V2)  # fixed: both run now, once
    assert ok("deploy", str(app)) == "2"
    assert call(app, "owners") == {"web": "ANN"}
    assert call(app, "log") == ["owner_from_assignee", "0002-upper"]


def test_migration_definitions_that_cannot_work_are_refused(tmp_path: Path) -> None:
    app = write(tmp_path / "tracker.py", V1)
    assert call(app, "add", "web", "ann") == 1
    twice = V2.replace('name="0002-upper"', 'name="tracker.owner_from_assignee"')
    write(app, twice)
    out = cli("deploy", str(app))
    assert out.returncode == 1 and "two migrations are named 'tracker.owner_from_assignee'" in out.stderr
    assert "version 1 stays in force" in out.stderr
    nested = V1 + textwrap.dedent("""
        import durable_heap
        class Steps:
            @durable_heap.migration
            def inner(state):
                pass
    """)
    write(app, nested)
    out = cli("deploy", str(app))
    assert out.returncode == 1 and "a migration must be a module-level function" in out.stderr


REMOVED = """
    {head}
    from durable_heap import Object, state

    class Item(Object):             # Task is gone, with no rename
        pass

    state.setdefault("tasks", {{}})
    state.setdefault("log", [])

    {migration}
        for t in state.tasks.values():
            t.owner = t.assignee
"""


@pytest.mark.parametrize(
    ("head", "migration"),
    [("", "def migrate(state, previous):"),
     ("import durable_heap", "@durable_heap.migration\n    def owners(state):")],
    ids=["migrate", "named migration"],
)
def test_a_migration_touching_objects_of_a_removed_class_gets_the_clear_message(
        tmp_path: Path, head: str, migration: str) -> None:
    app = write(tmp_path / "tracker.py", V1)
    assert call(app, "add", "web", "ann") == 1
    write(app, REMOVED.format(head=head, migration=migration))
    out = cli("deploy", str(app))
    assert out.returncode == 1
    assert ("deploy of tracker refused: stored objects use classes this version no longer "
            "defines: tracker.Task") in out.stderr, out.stderr
    assert "AttributeError" not in out.stderr and "version 1 stays in force" in out.stderr


def test_a_top_level_touching_objects_of_a_removed_class_gets_the_clear_message(tmp_path: Path) -> None:
    app = write(tmp_path / "tracker.py", V1)
    assert call(app, "add", "web", "ann") == 1
    write(app, """
        from durable_heap import Object, state

        state.setdefault("tasks", {})
        state.owners = [t.assignee for t in state.tasks.values()]   # broken objects: no assignee

        class Item(Object):             # defined after the line that fails: not reported as removed
            pass
    """)
    out = cli("deploy", str(app))
    assert out.returncode == 1
    assert "classes this version no longer defines: tracker.Task." in out.stderr, out.stderr
    # The reason first; what the top level raised after it, as a likely consequence.
    first = out.stderr.index("no longer defines")
    assert first < out.stderr.index("its top level raised AttributeError: ")
    assert "perhaps on one of those objects" in out.stderr and "version 1 stays in force" in out.stderr
    # A top level that fails for its own reasons before defining a class still says why.
    write(app, "from durable_heap import state\n1 / 0\n" + V1)
    out = cli("deploy", str(app))
    assert out.returncode == 1 and "its top level raised ZeroDivisionError" in out.stderr, out.stderr


def test_rollback_help_says_state_is_kept() -> None:
    text = ok("rollback", "--help")
    assert "no down-migration" in text and "runs no named migration" in text


# --- renames end to end -----------------------------------------------------------------

R1 = """
    import dataclasses
    from durable_heap import Object, state

    class User(Object):
        def __init__(self, name):
            self.name = name

    @dataclasses.dataclass
    class Badge:                    # a plain object: pickled inside the record that holds it
        text: str

    state.setdefault("users", {})
    state.setdefault("badges", [])

    def add(name):
        state.users[name] = User(name)
        state.badges.append(Badge(name))
        state.setdefault("first", state.users[name])   # a second reference

    def kinds():
        return sorted({type(u).__qualname__ for u in state.users.values()}
                      | {type(b).__qualname__ for b in state.badges} | {type(state.first).__qualname__})
"""

RENAMES = '__durable_renames__ = {"app.User": "app.Member", "app.Badge": "app.Tag"}\n'


def renamed(with_table: bool, name: str = "app") -> str:
    text = textwrap.dedent(R1).replace("class User(Object)", "class Member(Object)")
    text = text.replace("class Badge:", "class Tag:").replace("User(name)", "Member(name)")
    text = text.replace("Badge(name)", "Tag(name)")
    return (RENAMES.replace("app.", f"{name}.") if with_table else "") + text


def names_in_records(path: Path) -> set[str]:
    """The class paths that the heap's current records name (read from the file)."""
    from ZODB.FileStorage import FileStorage

    storage = FileStorage(str(path), read_only=True)
    try:
        return scan_classes(storage)
    finally:
        storage.close()


def test_a_rename_rewritten_and_packed_can_drop_its_table(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", R1)
    for name in ("ann", "bob", "cy"):
        ok("call", str(app), "add", name)
    write(app, renamed(with_table=True))
    assert ok("deploy", str(app)) == "2"
    assert call(app, "kinds") == ["Member", "Tag"]

    # Stage 1: the table dropped before any rewrite: refused, with the way out.
    write(app, renamed(with_table=False))
    out = cli("deploy", str(app))
    assert out.returncode == 1
    assert ("stored objects use classes this version no longer defines: app.Badge, app.User. "
            "app.Badge was renamed to app.Tag by __durable_renames__, and stored records still "
            "name app.Badge: keep {'app.Badge': 'app.Tag'} in __durable_renames__ until "
            "`durable-heap rewrite-classes app.py` has written them all under app.Tag and a pack "
            "has removed the history from before that rewrite") in out.stderr, out.stderr
    assert "e.g. {'app.User': 'app.NewName'}" not in out.stderr

    # The rewrite, with the table back: every record is written under the new names.
    write(app, renamed(with_table=True))
    assert ok("deploy", str(app)) == "2"  # the same source as version 2: unchanged
    assert "app.User" in names_in_records(heap_file(app))
    out = cli("rewrite-classes", str(app), "--batch", "2")
    assert out.returncode == 0, out.stderr
    # 3 users, the users Dict, the badges List, the root State (it refers to state.first)
    assert "rewrote 6 records in 3 transactions (app.Badge -> app.Tag, app.User -> app.Member)" in out.stdout
    assert "durable-heap pack" in out.stdout and "--days 0" in out.stdout
    now = names_in_records(heap_file(app))
    assert not {"app.User", "app.Badge"} & now and {"app.Member", "app.Tag"} <= now

    # Stage 2: rewritten, but history from before the rewrite remains: refused, saying so.
    write(app, renamed(with_table=False))
    out = cli("deploy", str(app))
    assert out.returncode == 1
    assert ("Every stored app.User object was rewritten as app.Member (durable-heap "
            "rewrite-classes, finished ") in out.stderr, out.stderr
    assert ("but the history from before then still names app.User: keep {'app.User': "
            "'app.Member'} in __durable_renames__ until a pack removes that history "
            "(durable-heap pack app.py --days 0") in out.stderr
    # A pack that keeps the rewrite's days does not help yet.
    ok("pack", str(app))
    assert cli("deploy", str(app)).returncode == 1

    # Stage 3: packed past the rewrite: the table can go, and old objects load as the new classes.
    ok("pack", str(app), "--days", "0")
    assert ok("deploy", str(app)) == "3"
    assert call(app, "kinds") == ["Member", "Tag"]
    assert ok("check", str(app)).endswith("every stored class is defined by the current version")
    assert "'ann': app.Member" in ok("inspect", str(app))
    ok("call", str(app), "add", "dee")
    assert call(app, "kinds") == ["Member", "Tag"]


def _rewrite_then_pack_lets_the_table_go(url: str, tmp_path: Path) -> None:
    """Rename, rewrite, refused until a pack, then the table can go: on a server target."""
    app = write(tmp_path / "app.py", R1)
    ok("call", str(app), "add", "ann", "--storage", url)
    write(app, renamed(with_table=True))
    ok("deploy", str(app), "--storage", url)
    out = cli("rewrite-classes", str(app), "--storage", url)
    assert out.returncode == 0 and "rewrote 4 records in 1 transaction" in out.stdout, out.stderr + out.stdout
    write(app, renamed(with_table=False))
    out = cli("deploy", str(app), "--storage", url)
    assert out.returncode == 1 and "Every stored app.User object was rewritten" in out.stderr, out.stderr
    ok("pack", str(app), "--days", "0", "--storage", url)
    assert ok("deploy", str(app), "--storage", url) == "3"
    assert json.loads(ok("call", str(app), "kinds", "--storage", url)) == ["Member", "Tag"]


def test_rewrite_over_zeo_lets_the_table_go_after_a_pack(zeo_server: ZeoServer, tmp_path: Path) -> None:
    """Over ZEO a pack leaves the class registry alone: the deploy itself sees the history gone."""
    _rewrite_then_pack_lets_the_table_go(zeo_server.url, tmp_path)


def test_rewrite_through_the_api_with_progress(tmp_path: Path) -> None:
    # In this process: a program name no other test uses (a thread's notes of the classes it
    # built outside a heap are registered by its later commits, in any heap: see _registry).
    app = write(tmp_path / "ledger.py", R1)
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app)
        for name in ("ann", "bob"):
            prog.call("add", name)
        with pytest.raises(dh.ProgramError, match="declares no __durable_renames__"):
            heap.rewrite_classes(app)
        heap.deploy(write(app, renamed(with_table=True, name="ledger")))
        seen: list[tuple[int, int]] = []
        report = heap.rewrite_classes(app, batch=2, on_progress=lambda d, t: seen.append((d, t)))
        assert report.records == 5 and report.batches == 3 and seen == [(2, 5), (4, 5), (5, 5)]
        assert report.renames == {"ledger.User": "ledger.Member", "ledger.Badge": "ledger.Tag"}
        assert heap.rewrite_classes(app).records == 0  # nothing left to rewrite
        assert prog.call("kinds") == ["Member", "Tag"]


def test_rewrite_names_the_broken_objects_it_cannot_write(tmp_path: Path) -> None:
    app = write(tmp_path / "ledger.py", textwrap.dedent(R1) + textwrap.dedent("""
        class Holder(Object):
            def __init__(self, user):
                self.user = user

        def hold(name):
            state.holder = Holder(state.users[name])
    """))
    with dh.open(tmp_path / "h.fs") as heap:
        prog = heap.load(app)
        prog.call("add", "ann")
        prog.call("hold", "ann")
        # The rename, and Holder dropped by force: its record refers to an app.User.
        heap.deploy(write(app, renamed(with_table=True, name="ledger")), force=True)
        with pytest.raises(dh.ProgramError) as caught:
            heap.rewrite_classes(app)
        message = str(caught.value)
        assert message.startswith("1 records that name ledger.Badge, ledger.User are objects of classes "
                                  "this version does not define (ledger.Holder)")
        assert "the other 4 records were rewritten" in message
        # Not finished: dropping the table is still refused with the rewrite step to take.
        with pytest.raises(dh.DeployError, match="until `durable-heap rewrite-classes ledger.py`"):
            heap.deploy(write(app, renamed(with_table=False, name="ledger")), force=False)


def test_rewrite_on_postgresql_lets_the_table_go_after_a_pack(postgresql_url: str, tmp_path: Path) -> None:
    """The same on RelStorage: its record_iternext reads a snapshot of its own (see _rewrite)."""
    _rewrite_then_pack_lets_the_table_go(postgresql_url, tmp_path)
