"""Issue 18, part 3: the one-entry commit skips work it does not need, and still does what it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import durable_heap as dh
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
