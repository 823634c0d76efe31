"""A big import merged into a container keeps small values inline (issue 18, part 2;
audit a18).

A big file is staged first (``--batch`` entries per transaction, into a container of
its own), then merged into the target in one transaction: ``target.update(staged)``.
The staged entries were inline views of the staged container, and a view stored into
a second place becomes a record of its own, so every entry of a merged import became
a record: 20,000 entries shaped like ``{"i": i, "tags": ["a", "b"]}`` wrote 6.8 MB
and 2.2 s of CPU, against 1.7 MB and 0.85 s replaced. The staged container is dropped
in that same transaction: a move, so the merge takes the raw values.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap._exchange import import_data

from .test_inline import _records


def _file(data: Any) -> io.BytesIO:
    return io.BytesIO(json.dumps(data).encode())


@pytest.mark.parametrize("replace", [False, True], ids=["merged", "replaced"])
def test_a_staged_import_keeps_small_values_inline(tmp_path: Path, replace: bool) -> None:
    users = {f"u{i}": {"i": i, "tags": ["a", "b"]} for i in range(1000)}
    items = [{"i": i, "tags": ["a"]} for i in range(1000)]
    counts = {}
    for how, batch in (("one transaction", 10_000), ("staged", 100)):
        path = tmp_path / f"{how}.fs"
        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.users = {"old": {"i": -1, "tags": []}}
                state.items = [{"i": -1}]
            report = import_data(heap, _file(users), path="state.users", replace=replace, batch=batch)
            assert report.transactions == (1 if batch > 1000 else 11)
            import_data(heap, _file(items), path="state.items", replace=replace, batch=batch)
        with dh.open(path) as heap, heap.transaction() as state:
            want_users = users if replace else {"old": {"i": -1, "tags": []}, **users}
            want_items = items if replace else [{"i": -1}, *items]
            assert state.users == want_users and state.items == want_items
            state.users["u5"]["tags"].append("c")  # in place, still: saved
            state.items[7]["tags"].append("d")
        with dh.open(path) as heap:
            assert heap.state.users["u5"]["tags"] == ["a", "b", "c"]
            assert heap.state.items[7]["tags"] == ["a", "d"]
            assert dh.to_builtin(heap.state.users["u6"]) == {"i": 6, "tags": ["a", "b"]}
            heap.db.pack()
        counts[how] = _records(path)
    # Buckets and leaves (a few dozen more while staged: the staged tree's own), not
    # one record per value: 1,000 users and 1,000 items each a record, and their lists.
    assert counts["staged"] < counts["one transaction"] + 200, counts


def test_a_staged_merge_keeps_a_shared_value_one_record(tmp_path: Path) -> None:
    """A ``$shared`` container (met twice in the file) is one durable record across
    batches, and stays one after the merge."""
    data = {f"u{i}": {"i": i} for i in range(50)}
    data["s1"] = {"$shared": [0, [1, 2]]}
    data["s2"] = {"in": {"$ref": 0}}
    path = tmp_path / "app.fs"
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.users = {}
        import_data(heap, _file(data), path="state.users", batch=10)
    with dh.open(path) as heap, heap.transaction() as state:
        assert state.users["s1"] is state.users["s2"]["in"]
        state.users["s1"].append(3)
    with dh.open(path) as heap:
        assert heap.state.users["s2"]["in"] == [1, 2, 3]
