"""The hand-written persistent item of the raw ZODB baseline (importable: it is pickled)."""

from persistent import Persistent


class Item(Persistent):
    def __init__(self, value: int) -> None:
        self.value = value
