"""The hand-written persistent item of the raw ZODB baseline (importable: it is pickled)."""

from persistent import Persistent


class Item(Persistent):
    def __init__(self, value: int) -> None:
        self.value = value


# Values of the durable_heap variants: a plain dataclass (stored inline, watched for
# in-place changes) and a durable_heap.Object (its own record).
import dataclasses  # noqa: E402

import durable_heap  # noqa: E402


@dataclasses.dataclass
class Rec:
    value: int


class Obj(durable_heap.Object):
    def __init__(self, value: int) -> None:
        self.value = value
