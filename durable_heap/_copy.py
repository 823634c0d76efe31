"""``durable-heap copy SOURCE TARGET``: move a heap between any two targets.

FileStorage to PostgreSQL and back, ZEO to either, one database to another: every
transaction of the source is restored into the (empty) destination with its own
id, time, user and note, through ZODB's storage iteration (``iterator()`` and
``restore``, as ``copyTransactionsFrom`` and RelStorage's zodbconvert do). So the
history comes along where both sides keep it; a history-free destination keeps
the last state of each object, and a history-free source has only that to give.

Records travel as ZODB wrote them: a FileStorage source hands them out without
durable_heap's checksum seal, and a FileStorage destination seals them again
(`durable_heap._integrity.ChecksumStorage.restore`). A progress bar (tqdm, the
extra ``durable-heap[progress]``) is shown when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import StorageError
from ._storage import open_storage
from ._targets import parse_target

__all__ = ["CopyResult", "add_command", "copy", "run_copy"]


@dataclass(frozen=True)
class CopyResult:
    """What a copy moved: transactions and records, and how long it took."""

    transactions: int
    records: int
    seconds: float


def _empty(storage: Any) -> bool:
    """Whether `storage` holds no transaction yet (ZODB's root record included)."""
    from ZODB.utils import z64

    return bool(storage.lastTransaction() == z64)


def _count(source: Any) -> int:
    """How many transactions `source` holds (one scan, for an honest progress bar).

    RelStorage trap (4.3): delegating to its transaction iterator with ``yield from``
    crashed the interpreter (a segmentation fault, reproduced every time); a plain
    loop over it does not, so only plain loops iterate a source here.
    """
    it = source.iterator()
    n = 0
    try:
        for _ in it:
            n += 1
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return n


def copy(source: str, target: str, *, progress: bool | None = None) -> CopyResult:
    """Copy every transaction of heap `source` into the empty heap `target`.

    `progress`: show a progress bar (default: when stderr is a terminal and tqdm
    is installed). Refuses a destination that already holds anything.
    """
    src_target, dst_target = parse_target(source), parse_target(target)
    if str(src_target) == str(dst_target) and src_target.options == dst_target.options:
        raise StorageError(f"copy {src_target} onto itself: give another target")
    src = open_storage(src_target, read_only=True)
    try:
        dst = open_storage(dst_target)
        try:
            if not _empty(dst):
                raise StorageError(
                    f"{dst_target} already holds a heap (or other data): copy into a new, empty "
                    "target (a new file, or a new database: createdb NAME), so nothing is overwritten"
                )
            return _copy(src, dst, src_target, progress)
        finally:
            dst.close()
    finally:
        src.close()


def _copy(src: Any, dst: Any, label: Any, progress: bool | None) -> CopyResult:
    if progress is None:
        progress = sys.stderr.isatty()
    bar: Any = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            bar = None
        else:
            total = _count(src)
            bar = tqdm(total=total, unit="txn", desc=f"copy {label}", file=sys.stderr)
    start = time.monotonic()
    counting = _Counting(src, bar)
    try:
        # ZODB's own copy loop (``ZODB.blob.copyTransactionsFromTo``, which FileStorage's
        # and our checksum wrapper's copyTransactionsFrom use): each source transaction
        # becomes one destination transaction with the same id, through restore(),
        # which keeps every record's serial and its data_txn (an undo's back pointer).
        import ZODB.blob

        ZODB.blob.copyTransactionsFromTo(counting, dst)
    finally:
        if bar is not None:
            bar.close()
    transactions, records = counting.transactions, counting.records
    return CopyResult(transactions, records, time.monotonic() - start)


class _Counting:
    """The source storage, counting (and showing) the transactions and records copied."""

    def __init__(self, storage: Any, bar: Any) -> None:
        self.storage, self.bar = storage, bar
        self.transactions = self.records = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def iterator(self, start: Any = None, stop: Any = None) -> Iterator[Any]:
        for txn in self.storage.iterator(start, stop):
            yield _CountedTransaction(txn, self)
            self.transactions += 1
            if self.bar is not None:
                self.bar.update(1)


class _CountedTransaction:
    def __init__(self, txn: Any, counting: _Counting) -> None:
        self.txn, self.counting = txn, counting

    def __getattr__(self, name: str) -> Any:
        return getattr(self.txn, name)

    def __iter__(self) -> Iterator[Any]:
        for record in self.txn:
            self.counting.records += 1
            yield record


# --- the command ----------------------------------------------------------------------------


def add_command(sub: Any) -> Any:
    """Register ``durable-heap copy`` on the CLI's subparsers; return its parser."""
    p = sub.add_parser(
        "copy",
        help="copy a heap into a new, empty target (file, zeo:// or postgresql://)",
        description="Copy every transaction of the heap at SOURCE into the empty target TARGET, "
        "keeping the history where both keep it: FileStorage to PostgreSQL and back, or any two "
        "targets. The source is opened read-only. A progress bar is shown on a terminal.",
    )
    p.add_argument("source", help="the heap to copy: a path, file://, zeo:// or postgresql://")
    p.add_argument("target", help="where to: a new file, or an empty database (postgresql://)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    return p


def run_copy(args: Any) -> int:
    """``durable-heap copy``: print what was copied."""
    result = copy(args.source, args.target, progress=False if args.no_progress else None)
    print(
        f"copied {result.transactions} transactions ({result.records} records) from "
        f"{parse_target(args.source)} to {parse_target(args.target)} in {result.seconds:.1f} s"
    )
    return 0
