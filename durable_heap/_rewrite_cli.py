"""``durable-heap rewrite-classes PROGRAM``: stored objects written again under renamed classes.

The command's parser and its run; the work is `_versions.rewrite_classes`
(`_rewrite`). Registered by `cli._parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["EXAMPLE", "add_command"]

EXAMPLE = (
    "example:\n"
    "  durable-heap rewrite-classes tracker.py\n"
    "  durable-heap pack tracker.py --days 0    # history from before the rewrite goes\n"
    "  (then drop the entries from __durable_renames__ and deploy)"
)

_TEXT = "write stored objects of renamed classes again under their new names"


def add_command(command: Callable[[str, str], argparse.ArgumentParser],
                open_heap: Callable[..., Any]) -> None:
    """Add ``rewrite-classes`` through `cli._parser`'s `command` (which adds ``program``);
    `open_heap(args, read_only=False)` opens the program's existing heap (the CLI's own)."""
    p = command("rewrite-classes", _TEXT)
    p.description = (
        "Write every stored object of a class renamed in the current version's\n"
        "__durable_renames__ again under its new name, and every record that refers to one,\n"
        "in batches (a progress bar on a terminal). Once a pack has removed the history from\n"
        "before the rewrite, a deploy without those rename entries is accepted."
    )
    p.epilog = EXAMPLE
    p.add_argument("--batch", type=_positive, default=1000, metavar="N",
                   help="records written per transaction (default 1000)")
    p.set_defaults(run=_run, open_heap=open_heap)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is too small: give 1 or more")
    return n


def _run(args: argparse.Namespace) -> int:
    import contextlib

    from ._ops import progress
    from ._versions import rewrite_classes

    with args.open_heap(args, read_only=False) as heap, contextlib.redirect_stdout(sys.stderr):
        with progress(None, "rewrite-classes") as bar:
            shown = [0]

            def moved(done: int, total: int) -> None:
                bar.total = total  # known once each round's scan has counted
                bar.update(done - shown[0])
                shown[0] = done

            report = rewrite_classes(heap, args.program, batch=args.batch, on_progress=moved)
    renames = ", ".join(f"{k} -> {v}" for k, v in sorted(report.renames.items()))
    print(f"rewrote {report.records} record{'' if report.records == 1 else 's'} in "
          f"{report.batches} transaction{'' if report.batches == 1 else 's'} ({renames}).")
    print("The rename entries can go from __durable_renames__ once history from before now is "
          f"packed away: durable-heap pack {args.program} --days 0 (or any pack once this rewrite "
          "is older than its --days); a deploy without them is refused until then.")
    return 0
