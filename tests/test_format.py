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
    assert _format.FORMAT == 2 and _format.FORMAT_SINCE == {1: "0.2", 2: "0.3", 3: "0.4"}
    assert _format.INLINE_FORMAT == 3 == _format.NEWEST_FORMAT  # heaps holding inline values
    assert max(_format.FORMAT_SINCE) == _format.NEWEST_FORMAT
    assert _format.WORKFLOW_KEYS == (
        "durable_heap.workflows", "durable_heap.timers", "durable_heap.promises",
        "durable_heap.subscriptions", "durable_heap.crons", "durable_heap.dead_letters",
        "durable_heap.waiting", "durable_heap.by_status")


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
