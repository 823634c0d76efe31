"""Records load only allowed classes: a crafted record runs nothing, anywhere it is read.

The crafted records are written with raw ZODB (as a careless peer or another tool
could), and each one's ``__reduce__`` would create a marker file if it ran: every
test that loads one asserts the marker never appears.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import persistent
import pytest
import transaction
import ZODB
import ZODB.ConflictResolution
import ZODB.FileStorage
import ZODB.POSException
import ZODB.serialize
from BTrees.OOBTree import OOBucket
from persistent import Persistent

import durable_heap as dh
from durable_heap import _allow, _values
from tests.conftest import ROOT, ZeoServer, cli, run

# --- payloads: each would create `path` if unpickled -------------------------------------


class Shell:
    """``os.system("touch PATH")``: the issue's reproduction."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return os.system, (f"touch {self.path}",)


class Opener:
    """``builtins.open(PATH, "w")``: creates (or empties) a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return open, (str(self.path), "w")


class Executor:
    """``builtins.exec(code)``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


class Wiper:
    """``ZODB.FileStorage.FileStorage(PATH, create=True)``: what 'allow all of ZODB' would admit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return ZODB.FileStorage.FileStorage, (str(self.path), True)  # create=True


class Spawner:
    """``subprocess.call(["touch", PATH])``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return subprocess.call, (["touch", str(self.path)],)


PAYLOADS = [Shell, Opener, Executor, Wiper, Spawner]
NAMES = {Shell: "posix.system", Opener: "io.open", Executor: "builtins.exec",
         Wiper: "ZODB.FileStorage.FileStorage.FileStorage", Spawner: "subprocess.call"}


def _raw(path: Path) -> Any:
    """Raw ZODB on the heap file, with ZODB's own (unrestricted) class lookup."""
    return ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))


def _craft_root(path: Path, payload: Any, key: str = "evil") -> None:
    db = _raw(path)
    try:
        with db.transaction() as conn:
            conn.root()[key] = payload
    finally:
        db.close()


@pytest.fixture
def fs(tmp_path: Path) -> Path:
    """A heap file with some state, written through the API."""
    path = tmp_path / "heap.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.d = {"a": 1, "b": [1, 2]}
        state.obj = dh.Object()
        state.obj.name = "kept"
    return path


def _oid_text(oid: bytes) -> str:
    return "0x" + (oid.hex().lstrip("0") or "0")


# --- in process ------------------------------------------------------------------------------


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_a_crafted_record_in_the_root_runs_nothing_and_names_itself(
    fs: Path, tmp_path: Path, payload: type, read_only: bool
) -> None:
    marker = tmp_path / "marker"
    _craft_root(fs, payload(marker))
    with pytest.raises(dh.ClassNotAllowedError) as info:
        dh.open(fs, read_only=read_only)
    assert not marker.exists()
    err = info.value
    assert isinstance(err, dh.StorageError)
    assert err.name == NAMES[payload] and err.oid == ZODB.utils.z64
    assert str(err).startswith(f"record 0x0 names {NAMES[payload]}, which is not on the allowlist")
    assert "can never be allowed" in str(err) and "docs/operations.md" in str(err)


def test_a_crafted_value_inside_a_dict_or_an_object_is_refused_where_it_is_read(
    fs: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    db = _raw(fs)
    with db.transaction() as conn:
        state = conn.root()["durable_heap.state"]
        state.d["evil"] = Shell(marker)  # through the Dict's own API, in raw ZODB
        assert state.obj.name == "kept"  # loaded: a ghost's __dict__ is not its state
        state.obj.__dict__["evil"] = Opener(marker)  # straight into the record
        state.obj._p_changed = True
        obj_oid = state.obj._p_oid
    db.close()
    for read_only in (False, True):
        with dh.open(fs, read_only=read_only) as heap:
            with pytest.raises(dh.ClassNotAllowedError, match="names posix.system") as info:
                _ = heap.state.d["evil"]
            assert info.value.oid is not None and str(info.value).startswith(
                f"record {_oid_text(info.value.oid)} names")
            with pytest.raises(dh.ClassNotAllowedError, match="names io.open") as info:
                _ = heap.state.obj.name
            assert info.value.oid == obj_oid
    assert not marker.exists()


def test_zodb_logs_no_traceback_for_a_refused_load(fs: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _craft_root(fs, Shell(tmp_path / "marker"))
    with pytest.raises(dh.ClassNotAllowedError):
        dh.open(fs)
    assert not [r for r in caplog.records if r.name == "ZODB.Connection"]


def test_a_crafted_record_in_conflict_resolution_in_process_runs_nothing(fs: Path, tmp_path: Path) -> None:
    """FileStorage resolves conflicts in the committing process: the guard runs there."""
    marker = tmp_path / "marker"
    with dh.open(fs) as heap:
        with heap.transaction() as state:
            state.bucket = OOBucket({"x": 1})  # resolves its own conflicts
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        one, two = heap.db.open(transaction_manager=tm1), heap.db.open(transaction_manager=tm2)
        try:
            b1, b2 = one.root()["durable_heap.state"].bucket, two.root()["durable_heap.state"].bucket
            b1["a"], b2["b"] = Shell(marker), 2
            one.transaction_manager.commit()  # the crafted state is committed ...
            with pytest.raises(ZODB.POSException.ConflictError):
                two.transaction_manager.commit()  # ... and never unpickled to merge
            two.transaction_manager.abort()
        finally:
            one.close()
            two.close()
    assert not marker.exists()


# --- through the command line ------------------------------------------------------------------


PROGRAM = """
    from durable_heap import state

    state.setdefault("n", 0)

    def bump():
        state.n += 1
        return state.n
"""


@pytest.mark.parametrize("where", ["root", "state"])
def test_a_crafted_record_through_the_cli_is_one_line_and_exit_1(tmp_path: Path, where: str) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(PROGRAM))
    assert cli("call", str(app), "bump").returncode == 0
    heap_file = tmp_path / ".durable-heap" / "app.fs"
    marker = tmp_path / "marker"
    db = _raw(heap_file)
    with db.transaction() as conn:
        if where == "root":
            conn.root()["evil"] = Shell(marker)
        else:
            conn.root()["durable_heap.state"].evil = Shell(marker)
    db.close()
    for command in (["inspect", str(app)], ["types", str(app)], ["call", str(app), "bump"]):
        out = cli(*command, cwd=tmp_path)
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("durable-heap: error: record 0x"), (command, lines)
        assert "names posix.system" in lines[0] and "Traceback" not in out.stderr
    assert not marker.exists()


# --- through a ZEO server's conflict resolution ----------------------------------------------


def _address(url: str) -> tuple[str, int]:
    host, _, port = url[len("zeo://"):].rpartition(":")
    return host, int(port)


def test_a_crafted_record_in_the_servers_conflict_resolution_runs_nothing(
    zeo_server: ZeoServer, tmp_path: Path
) -> None:
    """Two raw ZODB clients change one bucket at once: the server, asked to merge, refuses.

    The first commit stores a bucket whose state names posix.system; the second
    conflicts with it, so the server would unpickle both states to merge them.
    """
    import ZEO

    marker = tmp_path / "marker"
    with dh.open(zeo_server.url) as heap, heap.transaction() as state:
        state.bucket = OOBucket({"x": 1})
    addr = _address(zeo_server.url)
    db1, db2 = ZEO.DB(addr), ZEO.DB(addr)
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = db1.open(transaction_manager=tm1), db2.open(transaction_manager=tm2)
        b1 = c1.root()["durable_heap.state"].bucket
        b2 = c2.root()["durable_heap.state"].bucket
        b1["a"], b2["b"] = Shell(marker), 2
        tm1.commit()
        with pytest.raises(ZODB.POSException.ConflictError):
            tm2.commit()
        tm2.abort()
        c1.close()
        c2.close()
    finally:
        db1.close()
        db2.close()
    assert not marker.exists()
    assert zeo_server.proc is not None and zeo_server.proc.poll() is None  # still serving
    with dh.open(zeo_server.url) as heap, heap.transaction() as state:
        state.after = "fine"  # and serves the next client
    log = zeo_server.log.read_text()
    assert "not resolved" in log and "posix.system" in log


def test_the_server_still_merges_buckets_that_reference_classes_it_cannot_import(tmp_path: Path) -> None:
    """A bucket holding references to a program's Objects: the server has not the program
    (references become ZODB's BadClass, never called) and merges the bucket anyway."""
    server = ZeoServer(tmp_path / "srv" / "app.fs")
    server.start()
    try:
        app = tmp_path / "app.py"
        app.write_text(textwrap.dedent("""
            import durable_heap as dh
            from durable_heap import state

            class User(dh.Object):
                def __init__(self, name):
                    self.name = name

            state.setdefault("users", {})
        """))
        with dh.open(server.url) as one, dh.open(server.url) as two:
            module = one.load(app).module
            with one.transaction() as s:
                for i in range(100):  # big enough to be a tree of buckets
                    s.users[f"u{i}"] = module.User(f"u{i}") if i % 2 == 0 else i
            with one.transaction():  # not even the registry vouches for app.User
                del one.connection.root()[_values.CLASSES_KEY]["app.User"]
            with one.transaction() as s1:
                with two.transaction() as s2:
                    s2.users["u1"] = -1
                s1.users["u3"] = -3  # the same bucket, beside references to app.User
            with two.transaction() as s:
                assert (s.users["u1"], s.users["u3"], s.users["u2"].name) == (-1, -3, "u2")
    finally:
        server.close()
    assert "not resolved" not in server.log.read_text()


# --- what is allowed -----------------------------------------------------------------------------


USER_MODULE = """
    import dataclasses
    import enum
    import collections
    import os
    from os import system


    @dataclasses.dataclass
    class Point:
        x: int


    class Kind(enum.Enum):
        A = 1


    Pair = collections.namedtuple("Pair", "a b")


    def rebuild(x):
        return Wrapped(x)


    class Wrapped:
        def __init__(self, x):
            self.x = x

        def __reduce__(self):
            return rebuild, (self.x,)


    class Evil:
        def __reduce__(self):
            return system, ("touch " + os.environ.get("MARKER", "/nonexistent/marker"),)


    class ViaAlias:
        def __reduce__(self):
            return system_alias, ("touch " + os.environ.get("MARKER", "/nonexistent/marker"),)


    system_alias = system
"""


@pytest.fixture
def usermod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A user's own module ``userdata`` (a fresh name per test), importable here and in subprocesses."""
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "userdata.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{ROOT}")
    sys.modules.pop("userdata", None)
    import userdata  # type: ignore[import-not-found]

    yield userdata
    sys.modules.pop("userdata", None)


READER = """
import sys, durable_heap as dh
with dh.open(sys.argv[1], read_only=True, allow=sys.argv[2:]) as heap:
    s = heap.state
    print(repr((s.point, s.kind, s.pair, s.wrapped.x, s.items[0], s.fn.__name__)))
"""


def test_classes_stored_through_the_api_load_in_another_process(tmp_path: Path, usermod: Any) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.point = usermod.Point(1)
        state.kind = usermod.Kind.A
        state.pair = usermod.Pair(1, 2)
        state.wrapped = usermod.Wrapped(3)  # its __reduce__ names userdata.rebuild
        state.items = [[usermod.Point(2)]]  # nested in plain lists inside a List
        state.fn = usermod.rebuild  # a function stored by name
    reader = tmp_path / "reader.py"
    reader.write_text(READER)
    out = run([str(reader), str(path)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "(Point(x=1), <Kind.A: 1>, Pair(a=1, b=2), 3, [Point(x=2)], 'rebuild')"
    )
    with dh.open(path, read_only=True) as heap:
        registry = heap.connection.root()[_values.CLASSES_KEY]
        assert {"userdata.Point", "userdata.Kind", "userdata.Pair", "userdata.rebuild"} <= set(registry)


def test_a_users_class_written_with_raw_zodb_needs_allowing(tmp_path: Path, usermod: Any) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.n = 1
    _craft_root(path, usermod.Point(5), key="point")
    with pytest.raises(dh.ClassNotAllowedError, match=r"allow=\['userdata.Point'\]") as info:
        dh.open(path)
    assert "can never be allowed" not in str(info.value)
    for allow in (["userdata.Point"], ["userdata.*"]):
        with dh.open(path, allow=allow) as heap:
            assert heap.connection.root()["point"] == usermod.Point(5)
    env = {"DURABLE_HEAP_ALLOW": "other.Thing, userdata.Point"}
    code = "import durable_heap as dh, sys; h = dh.open(sys.argv[1]); print(h.connection.root()['point'])"
    out = run(["-c", code, str(path)], env=env)
    assert out.returncode == 0 and out.stdout.strip() == "Point(x=5)", out.stderr


def test_a_pattern_admits_what_the_module_defines_never_what_it_imports(
    tmp_path: Path, usermod: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.n = 1
    # `userdata.system_alias` is os.system, imported: neither the pattern nor the exact name admits it
    for allow in (["userdata.*"], ["userdata.system_alias"]):
        with pytest.raises(dh.ClassNotAllowedError, match="names userdata.system_alias"):
            _allow.Allowlist(allow).check(None, "userdata", "system_alias")
    assert _allow.Allowlist(["userdata.*"]).allows(None, "userdata", "rebuild")  # defined there
    _craft_root(path, usermod.Evil(), key="evil")  # names posix.system
    with pytest.raises(dh.ClassNotAllowedError, match="posix.system can never be allowed"):
        dh.open(path, allow=["userdata.*"])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("os.system", "can never be allowed"),
        ("builtins.eval", "can never be allowed"),
        ("subprocess.Popen", "can never be allowed"),
        ("ZODB.FileStorage.FileStorage", "can never be allowed"),
        ("os.*", "standard library"),
        ("collections.*", "standard library"),
        ("ZODB.*", "standard library, durable_heap or ZODB"),
        ("Point", "not a dotted name"),
        ("*", "not a dotted name"),
        ("a.*.b", "not a dotted name"),
    ],
)
def test_patterns_that_could_admit_code_are_refused_at_open(tmp_path: Path, pattern: str,
                                                            message: str) -> None:
    with pytest.raises(dh.ClassNotAllowedError, match=message):
        dh.open(tmp_path / "h.fs", allow=[pattern])
    assert not (tmp_path / "h.fs").exists()


def test_a_single_string_is_one_pattern(tmp_path: Path) -> None:
    with dh.open(tmp_path / "h.fs", allow="userdata.*") as heap:
        assert heap.allowlist.patterns == ("userdata.*",)


def test_the_cli_allow_option_and_environment(tmp_path: Path, usermod: Any) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(PROGRAM))
    assert cli("call", str(app), "bump").returncode == 0
    heap_file = tmp_path / ".durable-heap" / "app.fs"
    db = _raw(heap_file)
    with db.transaction() as conn:
        # Past durable_heap's own assignment (which would register the class): a
        # record written by other code, naming a class never stored through the API.
        Persistent.__setattr__(conn.root()["durable_heap.state"], "point", usermod.Point(7))
    db.close()
    refused = cli("inspect", str(app))
    assert refused.returncode == 1 and "--allow userdata.Point" in refused.stderr
    shown = cli("inspect", str(app), "--allow", "userdata.Point")
    assert shown.returncode == 0 and "Point(x=7)" in shown.stdout, shown.stderr
    assert cli("call", "--allow", "userdata.*", str(app), "bump").stdout.strip() == "2"
    assert cli("inspect", str(app), env={"DURABLE_HEAP_ALLOW": "userdata.Point"}).returncode == 0
    bad = cli("inspect", str(app), "--allow", "os.*")
    assert bad.returncode == 1 and "standard library" in bad.stderr


def _concurrent_change(url: str, allow: list[str], make: Callable[[Any], None],
                       first: Callable[[Any], None], second: Callable[[Any], None]) -> str:
    """`make`, then `first` and `second` in two clients, overlapping: "merged" or "conflict"."""
    with dh.open(url, allow=allow) as one, dh.open(url, allow=allow, attempts=1) as two:
        with one.transaction() as s:
            make(s)
        try:
            with one.transaction() as s1:
                with two.transaction() as s2:
                    second(s2)
                first(s1)
        except dh.ConflictError:
            return "conflict"
        return "merged"


def test_the_server_merges_values_of_registered_and_allowed_classes_only(tmp_path: Path,
                                                                         usermod: Any) -> None:
    """Buckets holding plain objects beside the entries that change: the server
    unpickles them to merge, if its allowlist admits them: a user's class stored
    through durable_heap (the registry), or one allowed with --allow. Any other
    (here a class of the standard library) conflicts instead, and the server says why."""
    import ipaddress

    def points(s: Any) -> None:
        s.values = {f"p{i}": usermod.Point(i) if i % 2 == 0 else i for i in range(100)}

    def addresses(s: Any) -> None:
        s.values = {f"p{i}": ipaddress.ip_address(f"10.0.0.{i}") if i % 2 == 0 else i for i in range(100)}

    def one(s: Any) -> None:
        s.values["p1"] = -1

    def two(s: Any) -> None:
        s.values["p3"] = -3  # another entry of the same bucket

    allow = ["ipaddress.IPv4Address"]  # for the clients, to load them
    cases = [((), points, "merged"), ((), addresses, "conflict"),
             (("--allow", "ipaddress.IPv4Address"), addresses, "merged")]
    for n, (args, make, outcome) in enumerate(cases):
        server = ZeoServer(tmp_path / f"srv{n}" / "app.fs", args=args, cwd=tmp_path)
        server.start()
        try:
            assert _concurrent_change(server.url, allow, make, one, two) == outcome, n
        finally:
            server.close()
        log = server.log.read_text()
        assert ("not resolved" in log) is (outcome == "conflict"), (n, log)
        assert outcome == "merged" or "names ipaddress.IPv4Address" in log
    bad = cli("zeo", "--storage", str(tmp_path / "x.fs"), "--address", "127.0.0.1:0", "--allow", "os.*")
    assert bad.returncode != 0 and "standard library" in bad.stderr


# --- the lists themselves -------------------------------------------------------------------------


def test_every_persistent_class_of_durable_heap_is_on_the_default_list() -> None:
    import durable_heap._containers
    import durable_heap._counter
    import durable_heap._state
    import durable_heap._versions

    modules = [durable_heap._containers, durable_heap._counter, durable_heap._state, durable_heap._versions]
    found = {
        f"{m.__name__}.{name}" for m in modules for name, obj in vars(m).items()
        if isinstance(obj, type) and issubclass(obj, persistent.Persistent) and obj.__module__ == m.__name__
    }
    assert found - {"durable_heap._containers._Hashed"} <= _allow.DEFAULT_ALLOWED  # _Hashed: a base only


def test_every_default_name_exists_and_none_is_dangerous() -> None:
    import importlib

    for name in _allow.DEFAULT_ALLOWED:
        module, _, attr = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        assert obj is not None, name
    for forbidden in ("builtins.eval", "builtins.exec", "builtins.getattr", "builtins.__import__",
                      "builtins.compile", "builtins.open", "builtins.setattr", "copyreg.add_extension"):
        assert forbidden not in _allow.DEFAULT_ALLOWED
    assert not [n for n in _allow.DEFAULT_ALLOWED if n.partition(".")[0] in ("os", "posix", "subprocess",
                                                                                "sys", "importlib", "pickle")]
    assert not [n for n in _allow.DEFAULT_ALLOWED if n.startswith(("ZODB.", "ZEO."))]


def test_record_globals_reads_opcodes_and_flags_what_it_cannot_follow() -> None:
    def dumps(obj: Any, protocol: int = 3) -> bytes:
        return pickle.dumps(obj, protocol=protocol)

    assert _allow.record_globals(dumps(Shell(Path("x")))) == ["posix.system"]
    assert "?" in _allow.record_globals(dumps(Shell(Path("x")), protocol=4))  # STACK_GLOBAL
    import copyreg

    copyreg.add_extension("tests.test_allow", "Shell", 0x7EEE)
    try:
        assert "?" in _allow.record_globals(dumps(Shell, protocol=2))  # EXT2
    finally:
        copyreg.remove_extension("tests.test_allow", "Shell", 0x7EEE)


def test_references_are_told_from_uses_even_through_the_memo() -> None:
    refs = [persistent.Persistent() for _ in range(3)]

    def pid(obj: Any) -> Any:
        return (b"\0" * 8, Shell) if isinstance(obj, persistent.Persistent) else None

    buf = io.BytesIO()
    pickler = ZODB._compat.PersistentPickler(pid, buf, 3)
    pickler.dump((OOBucket, None))
    pickler.dump({"refs": refs, "used": Shell(Path("m"))})
    used, referenced = _allow.resolution_globals(buf.getvalue())
    assert referenced == ["tests.test_allow.Shell"] * 3  # GLOBAL once, then from the memo
    assert used == ["BTrees.OOBTree.OOBucket", "posix.system"]
    # The class of a reference fetched from the memo to be called: a use.
    evil = (b"\x80\x03C\x08" + b"\0" * 8 + b"ctests.test_allow\nShell\nq\x00\x86Q"  # a reference...
            + b"0h\x00)R.")  # ...then POP, and its class from the memo, called with ()
    assert _allow.resolution_globals(evil) == (["tests.test_allow.Shell"], ["tests.test_allow.Shell"])


def test_the_zodb_internals_the_guard_relies_on_are_there() -> None:
    """ZODB 6.x: the class factory hook, the connection class hook, the resolver
    that storages call on themselves, and the wrapping of refused loads. If one
    of these moves, the allowlist would be bypassed or its errors garbled."""
    assert "class_factory" in inspect.signature(ZODB.DB.__init__).parameters
    assert ZODB.DB.klass is ZODB.Connection.Connection
    import ZEO.ClientStorage

    assert "self.tryToResolveConflict(" in inspect.getsource(ZODB.FileStorage.FileStorage.store)
    assert "self.tryToResolveConflict(" in inspect.getsource(ZEO.ClientStorage.ClientStorage.tpc_vote)
    resolver = ZODB.ConflictResolution.tryToResolveConflict
    assert "self._crs_untransform_record_data" in inspect.getsource(resolver)
    assert inspect.signature(ZODB.ConflictResolution.tryToResolveConflict).parameters.keys() == {
        "self", "oid", "committedSerial", "oldSerial", "newpickle", "committedData"}
    assert "StateLoadError" in inspect.getsource(ZODB.serialize.ObjectReader.getState)
    assert "_log.exception" in inspect.getsource(ZODB.Connection.Connection.setstate)


# --- compatibility ------------------------------------------------------------------------------------


def test_a_heap_from_before_the_complete_registry_loads_users_classes_and_completes_it(
    tmp_path: Path, usermod: Any
) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.point = usermod.Point(1)
    db = _raw(path)  # as 0.2 left it: no marker, and only program classes registered
    with db.transaction() as conn:
        del conn.root()[_values.COMPLETE_KEY]
        del conn.root()[_values.CLASSES_KEY]["userdata.Point"]
    db.close()
    with dh.open(path) as heap:
        assert heap.state.point == usermod.Point(1)  # the one-time scan stands in
        with heap.transaction() as state:
            state.kind = usermod.Kind.A  # the next registration completes the registry
        root = heap.connection.root()
        assert root[_values.COMPLETE_KEY] is True
        assert {"userdata.Point", "userdata.Kind"} <= set(root[_values.CLASSES_KEY])


def test_the_legacy_fixture_opens(tmp_path: Path) -> None:
    path = tmp_path / "legacy.fs"
    path.write_bytes((ROOT / "tests" / "fixtures" / "legacy-0.1.fs").read_bytes())
    with dh.open(path, read_only=True) as heap:
        assert "users" in heap.state


def test_a_programs_module_data_that_would_not_load_stays_process_local(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import collections
        import logging
        import re
        from durable_heap import state

        PATTERN = re.compile("a+")          # loads by default
        log = logging.getLogger("app")      # loads by default
        chain = collections.ChainMap({})    # would not load: kept in this process only
        hits = []

        def go():
            hits.append(1)
            chain["k"] = 1
            return [len(hits), bool(PATTERN.match("aa")), log.name]
    """))
    assert [cli("call", str(app), "go").stdout.strip() for _ in range(2)] == ['[1, true, "app"]',
                                                                         '[2, true, "app"]']


def test_counters_sets_and_plain_values_of_the_standard_library_round_trip(tmp_path: Path) -> None:
    import collections
    import datetime
    import decimal
    import fractions
    import uuid

    path = tmp_path / "h.fs"
    values = {
        "when": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc), "day": datetime.date(2026, 1, 2),
        "dec": decimal.Decimal("1.5"), "frac": fractions.Fraction(1, 3), "id": uuid.UUID(int=5),
        "path": Path("/a/b"), "ordered": collections.OrderedDict(a=1), "dq": collections.deque([1], 3),
        "frozen": frozenset({1, 2}), "cx": 1 + 2j, "ba": bytearray(b"x"), "rng": range(3),
        "dd": collections.defaultdict(list, a=[1]), "tally": collections.Counter("aab"),
    }
    with dh.open(path) as heap, heap.transaction() as state:
        state.values = values
        state.hits = dh.Counter(3)
        state.tags = {1, 2}
    out = run(["-c", textwrap.dedent("""
        import sys, durable_heap as dh
        with dh.open(sys.argv[1], read_only=True) as heap:
            print(repr(dh.to_builtin(heap.state.values)), heap.state.hits.value, sorted(heap.state.tags))
    """), str(path)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{dh.to_builtin(values)!r} 3 [1, 2]"


# --- the cost of the check ----------------------------------------------------------------------------


def test_the_check_is_one_lookup_once_a_name_is_known(tmp_path: Path) -> None:
    allow = _allow.Allowlist()
    calls: list[str] = []
    original = allow._decide

    def counting(*args: Any) -> Any:
        calls.append(args[3])
        return original(*args)

    allow._decide = counting  # type: ignore[method-assign]
    for _ in range(3):
        allow.check(None, "datetime", "date")
        with pytest.raises(dh.ClassNotAllowedError):
            allow.check(None, "posix", "system")
    assert calls == ["posix.system"] * 3  # defaults never reach the slow path; refusals do


def test_the_documented_recovery_deletes_a_crafted_root_entry(fs: Path, tmp_path: Path) -> None:
    """docs/operations.md, 'A crafted record': the snippet, as written there."""
    import ZODB.broken
    from ZODB.FileStorage import FileStorage

    marker = tmp_path / "marker"
    _craft_root(fs, Shell(marker))

    def inert(conn: Any, module: str, name: str) -> Any:
        """Every class a stand-in that runs nothing, but the root mapping itself."""
        if (module, name) == ("persistent.mapping", "PersistentMapping"):
            return ZODB.broken.find_global(module, name)
        return type(name, (ZODB.broken.Broken,), {"__module__": module})

    db = ZODB.DB(FileStorage(str(fs)), class_factory=inert)
    with db.transaction() as conn:
        del conn.root()["evil"]
    db.close()
    with dh.open(fs) as heap:
        assert dh.to_builtin(heap.state.d) == {"a": 1, "b": [1, 2]} and heap.state.obj.name == "kept"
    assert not marker.exists()
    assert "def inert(conn, module, name):" in (ROOT / "docs" / "operations.md").read_text()


def test_the_allowlist_benchmark_runs() -> None:
    out = run(["-m", "benchmarks.allow", "--records", "300", "--reps", "2", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["lookups_per_record"] >= 1 and set(data["median_ms"]) == {"checked", "unchecked", "raw_zodb"}


def test_the_legacy_scan_reads_opcodes_so_string_data_names_no_class(tmp_path: Path, usermod: Any) -> None:
    """The one-time scan of an older heap admits what records name, never what a
    string inside them looks like (``"cuserdata\\nEvil\\n"`` is a GLOBAL opcode's text)."""
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as state:
        state.text = "cuserdata\nEvil\n"
        state.point = usermod.Point(1)
    storage = ZODB.FileStorage.FileStorage(str(path), read_only=True)
    try:
        found = _values._scan_classes(storage)
    finally:
        storage.close()
    assert "userdata.Point" in found and "userdata.Evil" not in found


def test_every_btrees_type_a_user_stores_loads_back(tmp_path: Path) -> None:
    """Users store BTrees types in state (an OOTreeSet, an IIBTree...): each family's tree,
    bucket, tree set and set loads again after a reopen, its buckets too (big enough
    to split into records). They were accepted and committed, then refused at load."""
    import importlib

    families = ("OO", "IO", "OI", "II", "IF", "LO", "OL", "LL", "LF", "UU", "UO", "OU", "UI", "IU",
                "UF", "QQ", "QO", "OQ", "QF")
    expected: dict[str, list[Any]] = {}
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        for fam in families:
            module = importlib.import_module(f"BTrees.{fam}BTree")
            keys = [f"k{i:04d}" if fam[0] == "O" else i for i in range(300)]
            value = {"O": "v", "F": 0.5}.get(fam[1], 7)
            for kind in ("BTree", "Bucket", "TreeSet", "Set"):
                made = getattr(module, f"{fam}{kind}")()
                for k in keys:
                    if kind.endswith("Set"):
                        made.add(k)
                    else:
                        made[k] = value
                state[f"{fam}{kind}"] = made
                expected[f"{fam}{kind}"] = list(made.items()) if hasattr(made, "items") else list(made)
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        for name, items in expected.items():
            got = state[name]
            assert (list(got.items()) if hasattr(got, "items") else list(got)) == items, name
