"""The ``durable-heap`` command.

    durable-heap call PROGRAM.py FUNCTION [ARGS...]   run FUNCTION as one action
    durable-heap inspect PROGRAM.py [--depth N]        print the program's state
    durable-heap zeo --storage FILE [--address A]      serve a heap to other processes

Options may come anywhere (``--storage TARGET``, ``--traceback``); arguments
after ``--`` are never read as options. Each argument is parsed as JSON where
it parses (``3``, ``"x"``, ``[1, 2]``, ``true``), else passed as a string. The
result is printed as JSON, or as its ``repr`` when it is not JSON data.
Errors print one line on stderr and exit non-zero (1: the program or its
function failed, 2: bad usage or a missing program, function or heap).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from itertools import islice
from typing import Any

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="durable-heap",
        description="Durable state for Python programs: no save step.",
    )
    parser.add_argument("--version", action="version", version=f"durable-heap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--storage",
            metavar="TARGET",
            help="the heap: a path, file:///abs/path.fs, zeo://HOST:PORT or memory:// (default: "
            "$DURABLE_HEAP_STORAGE, else .durable-heap/<program>.fs beside the program)",
        )
        p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")

    call = sub.add_parser("call", help="run a function of a program as one transaction")
    call.add_argument("program", help="the program file, e.g. counter.py")
    call.add_argument("function", help="the function to call")
    call.add_argument("args", nargs="*", help="arguments: JSON where it parses, else strings")
    common(call)

    insp = sub.add_parser("inspect", help="print a program's state as a tree")
    insp.add_argument("program", help="the program file, e.g. counter.py")
    insp.add_argument("--depth", type=int, default=3, help="levels to show (default 3)")
    insp.add_argument("--limit", type=int, default=20, help="entries shown per container (default 20)")
    common(insp)

    from ._zeo import add_command

    zeo = add_command(sub)
    return parser, {"call": call, "inspect": insp, "zeo": zeo}


def _target(args: argparse.Namespace) -> str:
    from ._program import default_target

    return args.storage or os.environ.get("DURABLE_HEAP_STORAGE") or default_target(args.program)


def parse_arg(text: str) -> Any:
    """A command-line argument: JSON where it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_result(value: Any) -> str:
    """JSON for JSON data (durable containers included), else ``repr``."""
    from ._containers import to_builtin

    try:
        return json.dumps(to_builtin(value), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    parser, commands = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # help, --version, or a usage error
        return EXIT_USAGE
    # Options may follow the program's arguments: parse each command intermixed.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    try:
        if args.command == "call":
            return _call(args)
        if args.command == "zeo":
            from ._zeo import run_server

            return run_server(args)
        return _inspect(args)
    except KeyboardInterrupt:
        print("durable-heap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one clear line
        return _report(exc, args)


class _FunctionFailed(Exception):
    """The user's function (or program top level) raised: report it as theirs."""

    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(where)
        self.where, self.exc = where, exc


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    from ._errors import (
        DurableHeapError,
        FunctionNotFoundError,
        ProgramError,
        ProgramNotFoundError,
        StorageError,
    )

    shown = exc.exc if isinstance(exc, _FunctionFailed) else exc
    if args.traceback:
        traceback.print_exception(shown)
    hint = "" if args.traceback else " (--traceback shows where)"
    if isinstance(exc, _FunctionFailed):
        message = f"{exc.where} raised {type(shown).__name__}: {shown}{hint}"
    elif isinstance(exc, DurableHeapError):
        message = str(exc)
        if exc.__cause__ is not None and not args.traceback and isinstance(exc, ProgramError):
            message += hint
    else:
        message = f"internal error: {type(exc).__name__}: {exc}{hint}"
    print(f"durable-heap: error: {message}", file=sys.stderr)
    usage = (ProgramNotFoundError, FunctionNotFoundError, StorageError)
    return EXIT_USAGE if isinstance(shown, usage) else EXIT_FAILED


def _call(args: argparse.Namespace) -> int:
    import durable_heap

    from ._errors import DurableHeapError
    from ._heap import call_note
    from ._program import call, load

    values = [parse_arg(a) for a in args.args]
    if not os.path.isfile(args.program):
        from ._errors import ProgramNotFoundError

        raise ProgramNotFoundError(f"there is no program file {args.program!r}")
    def load_and_call() -> str:
        # One transaction for the top level and the function: references the top
        # level takes (CFG = state.setdefault(...)) stay valid in the function.
        module = load(heap, args.program)
        try:
            result = call(heap, module, args.function, values)
        except DurableHeapError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise _FunctionFailed(f"{args.function}()", exc) from exc
        return format_result(result)  # may read durable objects

    with durable_heap.open(_target(args)) as heap:
        note = call_note(args.function, tuple(values), {})
        text = heap._run(load_and_call, (), {}, note, heap.max_attempts)
    print(text)
    return 0



def _inspect(args: argparse.Namespace) -> int:
    import durable_heap

    from ._errors import ProgramNotFoundError, StorageError
    from ._program import load

    if not os.path.isfile(args.program):
        raise ProgramNotFoundError(f"there is no program file {args.program!r}")
    target = _target(args)
    if "://" not in target and not os.path.exists(target):
        raise StorageError(f"{args.program} has no heap yet at {target}: `durable-heap call` creates it")
    # Read-only: works beside a running program, and never writes.
    with durable_heap.open(target, read_only=True) as heap:
        load(heap, args.program, commit=False)  # its classes must exist to show its objects
        tm = heap.transaction_manager
        tm.begin()
        try:
            lines = render(heap.state, depth=args.depth, limit=args.limit)
        finally:
            tm.abort()
    print("\n".join(lines))
    return 0


def render(obj: Any, *, depth: int = 3, limit: int = 20, name: str = "state") -> list[str]:
    """The tree of `obj` as text lines, `depth` levels and `limit` entries deep.

    Reads only what it shows: a huge container costs `limit` entries, not a scan.
    """
    lines = [f"{name}{_summary(obj)}"]
    _render(obj, "", depth, limit, lines)
    return lines


def _children(obj: Any, limit: int) -> tuple[list[tuple[str, Any]], int]:
    from ._containers import Dict, List, Set
    from ._state import Object

    if isinstance(obj, (Dict, dict)):
        items = [(repr(k), v) for k, v in islice(obj.items(), limit)]
        return items, len(obj)
    if isinstance(obj, (List, list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(islice(obj, limit))], len(obj)
    if isinstance(obj, (Set, set, frozenset)):
        return [("-", v) for v in islice(obj, limit)], len(obj)
    if isinstance(obj, Object):
        attrs = obj._dh_as_dict()
        return list(islice(attrs.items(), limit)), len(attrs)
    return [], 0


def _summary(obj: Any) -> str:
    from ._containers import Dict, List, Set
    from ._state import Object

    if isinstance(obj, (Dict, List, Set)):
        n = len(obj)
        unit = "item" if isinstance(obj, List) else "entry" if isinstance(obj, Dict) else "member"
        plural = unit if n == 1 else ("entries" if unit == "entry" else unit + "s")
        return f": {type(obj).__name__} ({n:,} {plural})"
    if isinstance(obj, Object):
        return f": {type(obj).__module__}.{type(obj).__qualname__}"
    text = repr(obj)
    return ": " + (text if len(text) <= 80 else text[:77] + "...")


def _render(obj: Any, prefix: str, depth: int, limit: int, lines: list[str]) -> None:
    if depth <= 0:
        return
    children, total = _children(obj, limit)
    more = total - len(children)
    for i, (label, child) in enumerate(children):
        last = i == len(children) - 1 and more <= 0
        lines.append(f"{prefix}{'└── ' if last else '├── '}{label}{_summary(child)}")
        _render(child, prefix + ("    " if last else "│   "), depth - 1, limit, lines)
    if more > 0:
        lines.append(f"{prefix}└── ... {more:,} more")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
