"""What concurrent changes to one container merge, and what conflicts, as
docs/concepts.md ("The containers") lists it (audit of issue 18).

Two threads of one process each open a transaction, make one change, meet at a
barrier (so both transactions started from the same snapshot), and commit. A merge:
both commit. A conflict: the second gets ConflictError (one attempt, no retry). And a
conflict costs nothing but a retry: the same changes through actions all land.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import durable_heap as dh

Setup = Callable[[Any], None]
Change = Callable[[Any, int], None]

# (name, setup, change of thread t, merges?)
CASES: list[tuple[str, Setup, Change, bool]] = [
    ("big Dict: values of different existing keys", lambda s: setattr(s, "x", dict.fromkeys(range(100), 0)),
     lambda s, t: s.x.__setitem__(t * 50, 1), True),
    ("big Dict: in place, inline values of different keys",
     lambda s: setattr(s, "x", {i: {"n": 0} for i in range(100)}),
     lambda s, t: s.x[t * 50].__setitem__("n", 1), True),
    ("List: different items", lambda s: setattr(s, "x", list(range(100))),
     lambda s, t: s.x.__setitem__(t * 50, -1), True),
    ("small List: different items", lambda s: setattr(s, "x", list(range(8))),
     lambda s, t: s.x.__setitem__(t * 4, -1), True),
    ("List: appends", lambda s: setattr(s, "x", list(range(100))), lambda s, t: s.x.append(t), True),
    ("small Dict: values of different keys", lambda s: setattr(s, "x", dict.fromkeys(range(8), 0)),
     lambda s, t: s.x.__setitem__(t * 4, 1), False),
    ("small Set: different new members", lambda s: setattr(s, "x", set(range(8))),
     lambda s, t: s.x.add(f"new{t}"), False),
    ("big Dict: different new keys", lambda s: setattr(s, "x", dict.fromkeys(range(100), 0)),
     lambda s, t: s.x.__setitem__(f"new{t}", 1), False),
    ("big Dict: removing keys far apart", lambda s: setattr(s, "x", dict.fromkeys(range(100), 0)),
     lambda s, t: s.x.__delitem__(t * 50), True),
    ("big Dict: removing neighbouring keys", lambda s: setattr(s, "x", dict.fromkeys(range(100), 0)),
     lambda s, t: s.x.__delitem__(t + 10), True),
    ("big Dict: removing the first entry of a bucket",
     lambda s: setattr(s, "x", dict.fromkeys(range(100), 0)),
     lambda s, t: s.x.__delitem__(t), False),  # BTrees' merge refuses a bucket's first key gone
    ("big Set: different new members", lambda s: setattr(s, "x", set(range(100))),
     lambda s, t: s.x.add(f"new{t}"), False),
    ("big Set: removing different members", lambda s: setattr(s, "x", set(range(100))),
     lambda s, t: s.x.discard(t + 10), True),
    ("List: insert", lambda s: setattr(s, "x", list(range(100))), lambda s, t: s.x.insert(t * 50, t), False),
    ("List: pop", lambda s: setattr(s, "x", list(range(100))), lambda s, t: s.x.pop(t * 50), False),
]


def _race(heap: dh.Heap, change: Change) -> list[str]:
    """Both threads change, then commit from the same snapshot: what each got."""
    barrier = threading.Barrier(2, timeout=20)
    got: list[str] = []

    def one(t: int) -> None:
        try:
            with heap.transaction() as s:
                change(s, t)
                barrier.wait()
            got.append("committed")
        except dh.ConflictError:
            got.append("conflict")

    threads = [threading.Thread(target=one, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return sorted(got)


@pytest.mark.parametrize(("name", "setup", "change", "merges"), CASES, ids=[c[0] for c in CASES])
def test_what_merges_and_what_conflicts_is_as_documented(
        heap: dh.Heap, name: str, setup: Setup, change: Change, merges: bool) -> None:
    with heap.transaction() as s:
        setup(s)
    expected = ["committed", "committed"] if merges else ["committed", "conflict"]
    assert _race(heap, change) == expected, name


def test_concurrent_new_keys_all_land_through_actions(heap: dh.Heap) -> None:
    """Conflicts are retried: four threads adding 25 new keys each to one Dict, and
    four adding members to one Set, lose none."""
    with heap.transaction() as s:
        s.users = dict.fromkeys(range(100), 0)
        s.tags = set(range(100))

    @heap.action(attempts=200)
    def add(t: int, i: int) -> None:
        heap.state.users[f"u{t}-{i}"] = i
        heap.state.tags.add(f"t{t}-{i}")

    def work(t: int) -> None:
        for i in range(25):
            add(t, i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(heap.state.users) == 200 and len(heap.state.tags) == 200
    assert all(heap.state.users[f"u{t}-{i}"] == i for t in range(4) for i in range(25))
