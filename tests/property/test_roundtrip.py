"""Round trips: arbitrary nested values come back equal across commit, abort and reopen."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

import durable_heap as dh
from tests.strategies import values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values, other=values)
def test_values_round_trip(tmp_path: Path, value: Any, other: Any) -> None:
    path = tmp_path / "rt.fs"
    if path.exists():
        for f in tmp_path.iterdir():
            f.unlink()
    expected = copy.deepcopy(value)
    with dh.open(path) as heap:
        with heap.transaction() as state:
            state.v = value
        try:
            with heap.transaction() as state:
                state.v = other  # aborted: the committed value stays
                raise LookupError
        except LookupError:
            pass
        assert heap.state.v == expected
    with dh.open(path) as heap:
        assert heap.state.v == expected
        assert dh.to_builtin(heap.state.v) == dh.to_builtin(expected)
