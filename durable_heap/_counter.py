"""`Counter`: a durable integer whose concurrent increments merge instead of conflicting.

A plain ``int`` in state lives in its holder's record, so two processes that both
do ``state.hits += 1`` change the same record: one of them conflicts and its
action runs again. A `Counter` is its own small record whose
``_p_resolveConflict`` adds the two transactions' differences, as
``BTrees.Length`` does, so concurrent increments commit without a retry. Under
ZEO the merge runs in the server process, which imports this module (see
docs/operations.md).
"""

from __future__ import annotations

import functools
from typing import Any

from persistent import Persistent
from ZODB.POSException import ConflictError as _ZConflictError

from ._watch import check_writable

__all__ = ["Counter"]


def _int(value: Any, what: str) -> int:
    """`value` as an exact int (bools and floats are refused: they would not merge)."""
    if type(value) is Counter:
        return value.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


@functools.total_ordering
class Counter(Persistent):
    """A durable ``int`` for hot counters: concurrent increments merge.

    Store it once, then change it in place (``+=``, `increment`); it compares
    and converts like an int. Setting `value` merges as the difference too.

    >>> import durable_heap as dh
    >>> with dh.open("memory://") as heap, heap.transaction() as state:
    ...     state.hits = dh.Counter()
    ...     state.hits += 2
    ...     state.hits.increment(), int(state.hits), state.hits == 3
    (3, 3, True)
    """

    __slots__ = ("_value",)
    __hash__ = None  # type: ignore[assignment]  # it changes, like a list

    def __init__(self, value: int = 0) -> None:
        self._value = _int(value, "a Counter's value")

    # -- record format: the int itself (format 1) ------------------------------------

    def __getstate__(self) -> int:
        return self._value

    def __setstate__(self, state: int) -> None:
        self._value = state

    def _p_resolveConflict(self, old: Any, saved: Any, new: Any) -> Any:
        """Both transactions changed the count: keep both changes (runs in the storage)."""
        if all(type(s) is int for s in (old, saved, new)):
            return saved + new - old
        raise _ZConflictError("a Counter record that is not an int")

    # -- the count ----------------------------------------------------------------------

    @property
    def value(self) -> int:
        """The current count."""
        return self._value  # type: ignore[no-any-return]

    @value.setter
    def value(self, value: int) -> None:
        value = _int(value, "a Counter's value")
        check_writable(self)
        self._value = value

    def increment(self, n: int = 1) -> int:
        """Add `n` (which may be negative); return the new count."""
        n = _int(n, "an increment")
        check_writable(self)
        self._value += n
        return self._value  # type: ignore[no-any-return]

    def decrement(self, n: int = 1) -> int:
        """Subtract `n`; return the new count."""
        return self.increment(-_int(n, "a decrement"))

    def __iadd__(self, n: Any) -> Counter:
        self.increment(n)
        return self

    def __isub__(self, n: Any) -> Counter:
        self.decrement(n)
        return self

    # -- an int to everything that reads it -----------------------------------------------

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __float__(self) -> float:
        return float(self.value)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Counter):
            return self.value == other.value
        if isinstance(other, (int, float)):
            return self.value == other
        return NotImplemented

    def __lt__(self, other: Any) -> bool:
        if isinstance(other, Counter):
            return self.value < other.value
        if isinstance(other, (int, float)):
            return self.value < other
        return NotImplemented

    def __add__(self, other: Any) -> Any:
        return self.value + other

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        return self.value - other

    def __rsub__(self, other: Any) -> Any:
        return other - self.value

    def __repr__(self) -> str:
        return f"Counter({self.value})"
