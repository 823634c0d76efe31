"""Issue 18, part 3: the one-entry commit skips work it does not need, and still does what it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap import _containers
from durable_heap._format import CLASSES_KEY


@dataclasses.dataclass
class Late:
    n: int


def _registered(heap: Any) -> set[str]:
    with heap.transaction():
        return set(heap.connection.root()[CLASSES_KEY].keys())


def test_a_class_stored_by_a_hook_added_in_the_body_is_registered(tmp_path: Path) -> None:
    """The watch's before-commit hook registers the classes noted so far; a hook the
    body adds runs after it, so the classes that one stores are registered in a
    pass of their own (the pass is left out only when the watch's hook is the last)."""
    path = tmp_path / "h.fs"
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": i for i in range(1_000)}

        def late_store() -> None:
            heap.state.late = Late(1)

        with heap.transaction() as state:
            state.d["k1"] = 2
            heap.transaction_manager.get().addBeforeCommitHook(late_store)
        assert f"{__name__}.Late" in _registered(heap)
    with dh.open(path) as heap, heap.transaction() as state:
        assert state.late == Late(1)


def test_a_class_stored_in_the_body_is_registered(tmp_path: Path) -> None:
    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": i for i in range(1_000)}
        with heap.transaction() as state:
            state.d["k1"] = Late(2)
        assert f"{__name__}.Late" in _registered(heap)


def test_a_one_entry_commit_scans_its_bucket_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`check_before_commit` scans the changed bucket's entry types; the pickling that
    follows takes its answer for those very entries instead of scanning again (issue 18:
    about 12k instructions of a one-entry commit)."""
    with dh.open(tmp_path / "h.fs") as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": i for i in range(1_000)}
        scans: list[Any] = []
        real = _containers._entry_kinds

        def counting(state: Any) -> set[type]:
            scans.append(state)
            return real(state)

        monkeypatch.setattr(_containers, "_entry_kinds", counting)
        with heap.transaction() as state:
            state.d["k1"] = -1
        assert len(scans) == 1
    with dh.open(tmp_path / "h.fs") as heap, heap.transaction() as state:
        assert state.d["k1"] == -1 and state.d["k2"] == 2


@dataclasses.dataclass(eq=False)
class Same:
    """A plain object equal to the int it holds: ``("k1", 2) == ("k1", Same(2))``."""

    n: int

    def __eq__(self, other: object) -> bool:
        return other == self.n if isinstance(other, int) else isinstance(other, Same) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


def test_an_entry_replaced_after_the_scan_is_scanned_again(tmp_path: Path) -> None:
    """A before-commit hook added in the body runs after `check_before_commit` scanned
    the bucket (all ints): it replaces an entry by a plain object that compares equal
    to the int. The pickling must not take the earlier scan's answer (identity, not
    ``==``): the bucket is watched, so a later in-place change of the object is kept."""
    path = tmp_path / "h.fs"
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.d = {f"k{i}": i for i in range(1_000)}

        def replace() -> None:
            heap.state.d["k2"] = Same(2)

        with heap.transaction() as state:
            state.d["k1"] = -1  # the same bucket as k2 (entries in insertion order)
            heap.transaction_manager.get().addBeforeCommitHook(replace)
        with heap.transaction() as state:
            state.d["k2"].n = 5  # in place: only the watch sees it
    with dh.open(path) as heap, heap.transaction() as state:
        assert state.d["k1"] == -1
        assert type(state.d["k2"]) is Same and state.d["k2"].n == 5
