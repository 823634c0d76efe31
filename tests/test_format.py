"""The stored format (`durable_heap._format`): class paths and root keys are pinned.

Stored class paths are the on-disk format (pickles name them; ZEO servers
import them): a class that moves or is renamed makes every heap that stored it
unloadable. These tests fail loudly when one does.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
from pathlib import Path

import pytest
from persistent import Persistent
from ZODB.FileStorage import FileStorage

import durable_heap
import durable_heap as dh
from durable_heap import _allow, _format
from tests.conftest import ROOT

LEGACY = ROOT / "tests" / "fixtures" / "legacy-0.1.fs"

#: Written out here, not read from `_format`: a change to either fails this test.
PINNED = (
    "durable_heap._state.Object",
    "durable_heap._state.State",
    "durable_heap._counter.Counter",
    "durable_heap._containers.Dict",
    "durable_heap._containers.Set",
    "durable_heap._containers.List",
    "durable_heap._containers._Index",
    "durable_heap._containers._KeyIndex",
    "durable_heap._containers._Entries",
    "durable_heap._containers._EntryBucket",
    "durable_heap._containers._Leaf",
    "durable_heap._containers._Branch",
    "durable_heap._versions._ProgramRecord",
    "durable_heap._versions._VersionRecord",
    "durable_heap._workflows.WorkflowRecord",
    "durable_heap._workflows.Journal",
    "durable_heap._workflows.PromiseRecord",
)
INLINE = (
    "durable_heap._workflows.JournalEntry",
    "durable_heap._workflows.TimerEntry",
    "durable_heap._workflows.CronEntry",
    "durable_heap._workflows._stored_handle",  # a function: what a stored Workflow handle calls
)


def _resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def test_every_stored_class_path_is_pinned_and_resolves_to_itself() -> None:
    assert _format.STORED_CLASSES == PINNED
    for path in (*PINNED, *_format.BASE_CLASSES):
        cls = _resolve(path)
        assert isinstance(cls, type) and issubclass(cls, Persistent), path
        assert f"{cls.__module__}.{cls.__qualname__}" == path, f"{path} moved"
    # The allowlist admits every stored class (a heap must load its own records).
    assert set(PINNED) <= _allow.DEFAULT_ALLOWED
    assert _format.INLINE_CLASSES == INLINE and set(INLINE) <= _allow.DEFAULT_ALLOWED
    for path in INLINE:
        cls = _resolve(path)
        assert f"{cls.__module__}.{cls.__qualname__}" == path, f"{path} moved"


def test_no_persistent_class_of_the_package_goes_unpinned() -> None:
    known = set(PINNED) | set(_format.BASE_CLASSES)
    found: set[str] = set()
    for info in pkgutil.iter_modules(durable_heap.__path__):
        if info.name in ("__main__",):
            continue
        module = importlib.import_module(f"durable_heap.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Persistent) and obj.__module__ == module.__name__:
                found.add(f"{obj.__module__}.{obj.__qualname__}")
    assert found, "no persistent class found: the search is broken"
    unpinned = found - known
    assert not unpinned, (
        f"{sorted(unpinned)} are persistent but not in durable_heap._format.STORED_CLASSES "
        "(or BASE_CLASSES): a stored class path is part of the format, pin it there"
    )


def test_root_keys_and_format_version() -> None:
    assert _format.ROOT_KEY == "durable_heap.state"
    assert _format.FORMAT_KEY == "durable_heap.format"
    assert _format.PROGRAMS_KEY == "durable_heap.programs"
    assert _format.CLASSES_KEY == "durable_heap.classes"
    assert _format.COMPLETE_KEY == "durable_heap.classes.complete"
    assert _format.MIGRATIONS_KEY == "durable_heap.migrations"
    assert _format.REWRITES_KEY == "durable_heap.rewrites"
    assert _format.IMPORTS_KEY == "durable_heap.imports"  # durable-heap import's staging
    assert _format.FORMAT == 2 and _format.FORMAT_SINCE == {1: "0.2", 2: "0.3", 3: "0.4", 4: "0.4"}
    assert _format.INLINE_FORMAT == 3  # heaps holding inline values
    assert _format.JOURNAL_FORMAT == 4 == _format.NEWEST_FORMAT  # journals of plain tuples
    assert max(_format.FORMAT_SINCE) == _format.NEWEST_FORMAT
    assert _format.WORKFLOW_KEYS == (
        "durable_heap.workflows", "durable_heap.timers", "durable_heap.promises",
        "durable_heap.subscriptions", "durable_heap.crons", "durable_heap.dead_letters",
        "durable_heap.waiting", "durable_heap.by_status", "durable_heap.retention")


def test_a_new_heap_stores_the_pinned_keys(tmp_path: Path) -> None:
    with dh.open(tmp_path / "h.fs") as heap:
        root = heap.connection.root()
        assert root[_format.FORMAT_KEY] == _format.FORMAT
        assert type(root[_format.ROOT_KEY]) is dh.State
        assert root[_format.COMPLETE_KEY] is True and _format.CLASSES_KEY in root


def test_the_0_1_heap_names_only_pinned_classes_and_opens(tmp_path: Path) -> None:
    path = tmp_path / "legacy.fs"
    shutil.copy(LEGACY, path)
    storage = FileStorage(str(path), read_only=True)
    named: set[str] = set()
    try:
        for txn in storage.iterator():
            for record in txn:
                if record.data:
                    named.update(_allow.record_globals(record.data))
    finally:
        storage.close()
    ours = {n for n in named if n.startswith("durable_heap.")}
    assert ours and ours <= set(PINNED), sorted(ours - set(PINNED))
    with dh.open(path) as heap:
        assert len(heap.state.users) == 101
        assert heap.connection.root()[_format.FORMAT_KEY] == _format.FORMAT  # raised at open


# --- heap format 4: journal entries as plain tuples (issue 14, a step's cost) ------------------

JOURNAL_FIXTURE = ROOT / "tests" / "fixtures" / "journal-format3.fs"
PRUNE_FIXTURE = ROOT / "tests" / "fixtures" / "prune-timers.fs"
#: main before journal entries became tuples (it reads heap formats 1 to 3).
BEFORE_TUPLES = "eb25013"


def _named_classes(path: Path) -> set[str]:
    storage = FileStorage(str(path), read_only=True)
    named: set[str] = set()
    try:
        for txn in storage.iterator():
            for record in txn:
                if record.data:
                    named.update(_allow.record_globals(record.data))
    finally:
        storage.close()
    return named


def _marker(path: Path) -> object:
    with dh.open(path, read_only=True) as heap:
        return heap.connection.root()[_format.FORMAT_KEY]


def test_a_format_3_heap_with_waiting_workflows_replays_its_journal_and_finishes(tmp_path: Path) -> None:
    """tests/fixtures/journal-format3.fs (made by tests/fixtures/journal_flows.py with the code
    before format 4) holds two workflows waiting on a sleep, their journals of
    `JournalEntry` records (5 entries in one inline bucket; 12 in bucket records): steps,
    a failed step, a journaled time. The new code wakes them (replaying the old entries,
    appending tuples), resolves their promises and finishes them, each step once."""
    from durable_heap.testing import Clock
    from tests.fixtures import journal_flows as flows

    path = tmp_path / "journal.fs"
    shutil.copy(JOURNAL_FIXTURE, path)
    assert "durable_heap._workflows.JournalEntry" in _named_classes(path)  # the old form, really
    clock = Clock(flows.START)
    with dh.open(path, clock=clock) as heap:
        assert heap.connection.root()[_format.FORMAT_KEY] < _format.JOURNAL_FORMAT
        flows.bind(heap)
        a, b = sorted(heap.workflows(status="waiting"), key=lambda h: len(h.info["journal"]))
        assert [len(h.info["journal"]) for h in (a, b)] == [5, 12]  # started as flow("a", 2), flow("b", 9)
        assert heap.run_due() == 0  # its sleep is not over
        clock.advance(3600)
        assert heap.run_due() == 2
        assert a.waiting_on is not None and a.waiting_on["promise"] == "reply:a"
        assert b.waiting_on is not None and b.waiting_on["promise"] == "reply:b"
        assert heap.connection.root()[_format.FORMAT_KEY] == _format.JOURNAL_FORMAT  # raised
        assert dh.resolve("reply:a", 100) and dh.resolve("reply:b", 200)
        heap.run_due()
        assert a.result(timeout=10) == ([1, 2], "no a", flows.START, 12, 112)
        assert b.result(timeout=10) == (list(range(1, 10)), "no b", flows.START, 19, 219)
        assert dict(heap.state.counts) == {"a": 112, "b": 219}  # every step once
        kinds = [e["kind"] for e in a.info["journal"]]
        assert kinds == ["step", "step", "step", "now", "sleep", "step", "wait", "got", "step"]
        assert a.info["journal"][2]["error"].startswith("ValueError")
    names = _named_classes(path)
    assert "durable_heap._workflows.JournalEntry" in names  # the old entries stay as they were
    assert _marker(path) == _format.JOURNAL_FORMAT
    with dh.open(path) as heap:  # and read back from the file
        flows.bind(heap)
        assert sorted(h.status for h in heap.workflows()) == ["done", "done"]
        assert dict(heap.state.counts) == {"a": 112, "b": 219}


def test_the_format_is_raised_to_4_by_a_workflows_first_transaction_only(tmp_path: Path) -> None:
    path = tmp_path / "h.fs"
    with dh.open(path) as heap, heap.transaction() as s:
        s.n = 1
    assert _marker(path) == _format.FORMAT  # no workflow: unchanged
    with dh.open(path) as heap:
        @heap.action
        def put(i: int) -> int:
            heap.state.n = i
            return i

        @heap.workflow
        def flow() -> int:
            return put(2) + put(3)

        assert flow().result() == 5
        assert heap.connection.root()[_format.FORMAT_KEY] == _format.JOURNAL_FORMAT
        journal = heap.connection.root()["durable_heap.workflows"].values()[0].journal
        assert [type(e) for e in journal.values()] == [tuple, tuple]
        assert journal[0][:4] == ("step", put.__qualname__, f"{put.__qualname__}(2)", 2)
    assert "durable_heap._workflows.JournalEntry" not in _named_classes(path)


def test_an_older_version_refuses_a_heap_whose_journal_holds_tuples(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import tarfile

    from durable_heap.testing import subprocess_env

    plain, tuples = tmp_path / "plain.fs", tmp_path / "tuples.fs"
    with dh.open(plain) as heap, heap.transaction() as s:
        s.n = 1
    with dh.open(tuples) as heap:
        with heap.transaction() as s:
            s.n = 1

        @heap.workflow
        def flow() -> int:
            return 1

        assert flow().result() == 1
    archive = tmp_path / "older.tar"
    try:
        subprocess.run(["git", "archive", "-o", str(archive), BEFORE_TUPLES, "durable_heap"],  # noqa: S607
                       cwd=ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"git archive {BEFORE_TUPLES} failed (a clone with history is needed): {exc}")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "older", filter="data")
    older = tmp_path / "older"
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(older), env.get("PYTHONPATH", "")])
    script = ("import sys, durable_heap as dh\n"
              "assert dh.__file__.startswith(sys.argv[2]), dh.__file__\n"
              "h = dh.open(sys.argv[1]); print(h.state.n); h.close()\n")
    ok = subprocess.run([sys.executable, "-c", script, str(plain), str(older)],
                        env=env, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, "-c", script, str(tuples), str(older)],
                             env=env, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode != 0
    assert "heap format 4" in refused.stderr and "newer durable_heap" in refused.stderr


def test_a_heap_with_prune_timers_from_before_the_retention_tree_still_drops_journals(tmp_path: Path) -> None:
    """tests/fixtures/prune-timers.fs (made by tests/fixtures/prune_flows.py with the code
    before the retention tree) holds a done and a failed workflow, each with a "prune"
    TimerEntry in the timers tree. The done one's journal is dropped when it is due; the
    failed one, retried (its journaled failure fails it again), loses its old timer and
    lists its drop in the new tree."""
    from durable_heap import _workflows
    from durable_heap.testing import Clock
    from tests.fixtures import prune_flows as flows

    path = tmp_path / "prune.fs"
    shutil.copy(PRUNE_FIXTURE, path)
    clock = Clock(flows.START + 60)
    with dh.open(path, clock=clock) as heap:
        flows.bind(heap)
        root = heap.connection.root()
        assert _workflows.RETENTION_KEY not in root
        assert sorted(e.kind for e in root[_workflows.TIMERS_KEY].values()) == ["prune", "prune"]
        done, failed = heap.workflow_by_id("done"), heap.workflow_by_id("failed")
        assert (done.status, failed.status) == ("done", "failed")
        assert len(done.info["journal"]) == 2 and heap.run_due() == 0
        assert failed.retry() and heap.run_due() == 1 and failed.status == "failed"
        kinds = [(t.kind, t.target) for t in heap.timers()]
        assert kinds == [("prune", "done"), ("prune", "failed")]  # the old timer, the new entry
        assert len(root[_workflows.TIMERS_KEY]) == 1 and len(root[_workflows.RETENTION_KEY]) == 1
        clock.advance(flows.RETENTION - 30)  # past the old timer, not the new entry (made at +60)
        assert heap.run_due() == 1  # the old timer
        assert done.info["journal"] == [] and len(failed.info["journal"]) == 1  # its failed step
        clock.advance(60)
        assert heap.run_due() == 1  # the new entry
        assert failed.info["journal"] == [] and heap.timers() == []
        assert done.result() == 3 and failed.status == "failed"  # status and result stay (1 + 2)
