"""Hypothesis strategies shared by the tests: keys and values like users store."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st


@dataclasses.dataclass
class Point:
    """A plain dataclass: stored inline and watched for in-place changes."""

    x: int
    y: Any = None


# Hashable keys of mixed types, including equal keys of different types (1, 1.0, True).
atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=6),
)
keys = st.recursive(
    atoms,
    lambda inner: st.one_of(st.tuples(inner, inner), st.frozensets(inner, max_size=3)),
    max_leaves=4,
)
small_keys = st.one_of(st.integers(-5, 5), st.sampled_from([1.0, True, False, 0.0, "1", b"1", (1, 2), None]))

# Nested values: what a program assigns into state.
values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=4), inner, max_size=4),
        st.sets(st.integers(-3, 3), max_size=3),
        st.tuples(inner, inner),
        st.builds(Point, st.integers(-3, 3), inner),
    ),
    max_leaves=10,
)
