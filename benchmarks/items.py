"""The hand-written persistent item of the raw ZODB baseline (importable: it is pickled)."""

from __future__ import annotations

import dataclasses
from typing import Any

from persistent import Persistent


class Item(Persistent):
    def __init__(self, value: int) -> None:
        self.value = value


# Values of the durable_heap variants: a plain dataclass (stored inline, watched for
# in-place changes) and a durable_heap.Object (its own record).


@dataclasses.dataclass
class Rec:
    value: int


def __getattr__(name: str) -> Any:
    """`Obj`, defined on first use: raw ZODB's cold open (which loads `Item`) imports no durable_heap."""
    if name != "Obj":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import durable_heap

    class Obj(durable_heap.Object):
        def __init__(self, value: int) -> None:
            self.value = value

    Obj.__qualname__ = "Obj"  # its stored class path: benchmarks.items.Obj
    globals()["Obj"] = Obj
    return Obj
