"""The ``durable-heap`` command.

    durable-heap call PROGRAM FUNCTION [ARGS...]   run FUNCTION as one action
    durable-heap deploy PROGRAM [--note TEXT]      deploy the file as the next version
    durable-heap versions PROGRAM                  list the deployed versions
    durable-heap rollback PROGRAM --to N           deploy version N's source again
    durable-heap inspect PROGRAM [--at N|TIME]     print the program's state
    durable-heap check PROGRAM                     list stored classes the code lost
    durable-heap rewrite-classes PROGRAM           rewrite objects of renamed classes
    durable-heap watch PROGRAM                     deploy the file whenever it changes
    durable-heap types PROGRAM [--write|--check]   a typed State stub; check declared types
    durable-heap zeo --storage FILE [--address A]  serve a heap to other processes
    durable-heap copy SOURCE TARGET                copy a heap into a new, empty target
    durable-heap serve PROGRAM [--port P]          serve the program over HTTP
    durable-heap worker PROGRAM                    run the program's scheduler (timers, wakes)
    durable-heap run-due PROGRAM                   run what is due once, print how many
    durable-heap workflows PROGRAM [--id ID]       list workflows (--cancel ID, --retry ID)
    durable-heap timers PROGRAM                    list timers and dead letters (--retry, --drop)
    durable-heap pack|backup|restore|verify|log|stats ...  operations (docs/operations.md)
    durable-heap export PROGRAM [--path P] > FILE  the state (or a part) as JSON
    durable-heap import PROGRAM FILE [--path P]    load JSON: merged, or --replace; all or nothing
    durable-heap completion bash|zsh               a shell completion script

PROGRAM is a ``.py`` file or a package folder. Options may come anywhere
(``--storage TARGET``, ``--traceback``, ``--allow PATTERN``: a class the heap's
records may load, beyond the defaults); arguments after ``--`` are never read
as options. Each argument is parsed as JSON where it parses (``3``, ``"x"``,
``[1, 2]``, ``true``), else passed as a string; ``-k NAME=VALUE`` passes a
keyword argument. The result is printed as JSON, or as its ``repr`` when it is
not JSON data, alone on stdout: what the program prints goes to stderr.
Errors print one line on stderr and exit non-zero (1: the program, its
function or a deploy failed, 2: bad usage or a missing program, function,
version or heap).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
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
            help="the heap: a path, file:///abs/path.fs, zeo://HOST:PORT, postgresql://USER@HOST/DB or "
            "memory:// (default: "
            "$DURABLE_HEAP_STORAGE, else .durable-heap/<program>.fs beside the program)",
        )
        p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
        p.add_argument(
            "--allow", action="append", default=[], metavar="PATTERN",
            help="let the heap's records load this class too: pkg.module.Class, or pkg.* for "
            "your own module pkg (repeatable; also $DURABLE_HEAP_ALLOW)",
        )

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("program", help="the program: a .py file or a package folder")
        commands[name] = p
        return p

    commands: dict[str, argparse.ArgumentParser] = {}
    call = command("call", "run a function of a program as one transaction")
    # Optional to argparse, checked in _call: else a missing function is reported as
    # "the following arguments are required: function, args", though args are optional.
    call.add_argument("function", nargs="?", help="the function to call")
    call.add_argument("args", nargs="*", help="arguments: JSON where it parses, else strings")
    call.add_argument("-k", "--kwarg", action="append", default=[], metavar="NAME=VALUE",
                      help="a keyword argument, VALUE read as the arguments are (repeatable); "
                      "a positional argument containing '=' stays positional")
    call.add_argument("--no-deploy", action="store_true",
                      help="run the current version even if the file changed")
    call.add_argument("--each", metavar="FILE",
                      help="call FUNCTION once per line of FILE (- : stdin), each line's JSON array "
                      "(positional) or object (keyword) arguments after ARGS; one action each, "
                      "results one per line (durable_heap._exchange.call_each)")
    dep = command("deploy", "deploy the program file as its next version")
    dep.add_argument("--note", help="a note recorded with the version")
    dep.add_argument("--force", action="store_true",
                     help="deploy although stored objects use classes the new code dropped")
    command("versions", "list the deployed versions of a program")
    rb = command("rollback", "deploy an earlier version's stored source again, as a new version")
    rb.add_argument("--to", type=int, required=True, metavar="N", help="the version to go back to")
    rb.add_argument("--note", help="a note recorded with the version")
    rb.add_argument("--force", action="store_true", help="as for deploy")
    insp = command("inspect", "print a program's state as a tree")
    insp.add_argument("--depth", type=_count, default=3, help="levels to show (default 3)")
    insp.add_argument("--limit", type=_count, default=20, help="entries shown per container (default 20)")
    insp.add_argument("--at", metavar="N|TIME",
                      help="the state while version N was current, or at an ISO time (UTC by default)")
    command("check", "list stored classes that the current version no longer defines")
    w = command("watch", "deploy the program whenever its file changes (until interrupted)")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between checks (default 1)")
    ty = command("types", "print a typed State stub inferred from the stored data and the source")
    mode = ty.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write it beside the program as <name>_state.py")
    mode.add_argument("--check", action="store_true",
                    help="compare the stored data with the program's declared State; exit 1 on mismatches")
    ty.add_argument("--force", action="store_true", help="with --write: overwrite a file it did not generate")
    # durable-heap serve (durable_heap._serve)
    _serve_options(command("serve", "serve a program over HTTP: POST /<function>, endpoint(), /_health"))
    _workflow_commands(command)
    from ._rewrite_cli import add_command as add_rewrite  # durable-heap rewrite-classes

    add_rewrite(command, _open_existing)
    for p in commands.values():
        common(p)

    from ._zeo_server import add_command

    commands["zeo"] = zeo = add_command(sub)
    zeo.epilog = EXAMPLES["zeo"]
    zeo.formatter_class = argparse.RawDescriptionHelpFormatter
    # durable-heap copy (issue 16): its parser and its run in durable_heap._copy
    from ._copy import add_command as add_copy

    commands["copy"] = copy = add_copy(sub)
    copy.epilog = EXAMPLES["copy"]
    copy.formatter_class = argparse.RawDescriptionHelpFormatter

    # --- operations: pack, backup, restore, verify, log, stats (durable_heap._ops) ------------
    from ._ops import add_commands as add_operations

    commands.update(add_operations(sub, common))
    # --- export, import (durable_heap._exchange) -------------------------------------------
    from ._exchange import add_commands as add_exchange

    commands.update(add_exchange(sub, common))
    from ._completion import add_command as add_completion  # durable-heap completion bash|zsh

    commands["completion"] = add_completion(sub, lambda: _parser()[0])
    return parser, commands


def _count(text: str) -> int:
    """A whole number >= 0 (``--depth``, ``--limit``): a negative one is refused, not ignored."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative: give 0 or more")
    return n


#: The example at the end of each command's --help.
EXAMPLES = {
    "call": "example:\n  durable-heap call tracker.py add_task web 'fix login' -k assignee=ann\n"
            "  durable-heap call counter.py count --storage zeo://127.0.0.1:8100\n"
            "  durable-heap call tracker.py add_task --each tasks.jsonl   # a line: [\"web\", \"fix login\"]",
    "deploy": "example:\n  durable-heap deploy tracker.py --note 'owner field'",
    "versions": "example:\n  durable-heap versions tracker.py",
    "rollback": "The state stays as it is today: a rollback runs the old code on today's state,\n"
                "with no down-migration, and runs no named migration (@durable_heap.migration);\n"
                "the old version's migrate(state, previous) is called, with previous the version\n"
                "rolled back from. Undo data changes with a forward deploy instead.\n\n"
                "example:\n  durable-heap rollback tracker.py --to 3",
    "inspect": "example:\n  durable-heap inspect tracker.py --depth 2 --limit 5\n"
               "  durable-heap inspect tracker.py --at 2026-11-30T12:00",
    "check": "example:\n  durable-heap check tracker.py",
    "watch": "example:\n  durable-heap watch tracker.py --interval 0.5",
    "types": "example:\n  durable-heap types tracker.py --write\n  durable-heap types tracker.py --check",
    "zeo": "example:\n  durable-heap zeo --storage data/app.fs --address 127.0.0.1:8100",
    "copy": "example:\n  durable-heap copy data/app.fs postgresql://app@db.internal/app",
    "worker": "example:\n  durable-heap worker onboarding.py",
    "run-due": "example:\n  durable-heap run-due onboarding.py",
    "workflows": "example:\n  durable-heap workflows onboarding.py --status waiting",
    "timers": "example:\n  durable-heap timers onboarding.py",
    "serve": "example:\n  durable-heap serve tracker.py --port 8000\n"
             "  curl -X POST localhost:8000/add_task -d '[\"web\", \"fix login\"]'",
}


def _copy(args: argparse.Namespace) -> int:
    from ._copy import run_copy

    return run_copy(args)


def _serve_options(srv: argparse.ArgumentParser) -> None:
    """The options of ``durable-heap serve`` (see `durable_heap._serve`)."""
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--workers", type=int, default=1, metavar="N",
                     help="N processes on a ZEO server started for the heap file (default 1)")
    srv.add_argument("--threads", type=int, default=16, metavar="N",
                     help="calls in flight per process (default 16; on a heap file one is on the CPU "
                          "at a time, the others wait for their fsync or elsewhere)")
    srv.add_argument("--attempts", type=int, metavar="N",
                     help="tries of a call that meets conflicts before it answers 409 (default 10)")
    srv.add_argument("--debug", action="store_true", help="tracebacks in error answers")
    srv.add_argument("--inspect", action="store_true",
                     help="serve the state inspector at /_inspect (loopback only)")
    srv.add_argument("--no-watch", action="store_true", help="do not deploy the file when it changes")
    srv.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    srv.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    srv.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback --host without TLS (behind a TLS-terminating proxy)")


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
    run = {"call": _call, "deploy": _deploy, "versions": _versions, "rollback": _rollback,
           "inspect": _inspect, "check": _check, "watch": _watch, "types": _types,
           "zeo": _zeo, "copy": _copy, "serve": _serve, **_WORKFLOW_COMMANDS}.get(args.command)
    run = run or args.run  # the operations (_ops) set their own
    try:
        return run(args)
    except KeyboardInterrupt:
        from ._ops import quiet_interrupted_calls

        quiet_interrupted_calls()
        print("durable-heap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_is_a_pipe():
            return _report(exc, args)
        # The reader of the output left (`durable-heap workflows app.py | head`): stop
        # quietly, as Unix tools do, instead of an "internal error". What the command
        # committed before printing stays committed. Python's own flush at exit would
        # raise again on the closed pipe: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:  # noqa: BLE001 - every error becomes one clear line
        return _report(exc, args)


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError):  # closed, or not a real file
        return False


class _FunctionFailed(Exception):
    """The user's function (or program top level) raised: report it as theirs."""

    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(where)
        self.where, self.exc = where, exc


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    from ._errors import (
        ClassNotAllowedError,
        DurableHeapError,
        FunctionNotFoundError,
        ProgramError,
        ProgramNotFoundError,
        StorageError,
        VersionNotFoundError,
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
    code = getattr(shown, "exit_code", None)  # the operations' own (_ops.CommandError)
    if isinstance(code, int):
        return code
    usage = (ProgramNotFoundError, FunctionNotFoundError, VersionNotFoundError, StorageError)
    if isinstance(shown, ClassNotAllowedError):
        return EXIT_FAILED  # the heap's content, not how the command was used
    return EXIT_USAGE if isinstance(shown, usage) else EXIT_FAILED


def _announce(version: Any) -> None:
    print(f"durable-heap: deployed {version.program} version {version.number} "
          f"(source {version.source_hash[:12]})", file=sys.stderr)


def _zeo(args: argparse.Namespace) -> int:
    from ._zeo_server import run_server

    return run_server(args)


def _serve(args: argparse.Namespace) -> int:
    """``durable-heap serve``: see `durable_heap._serve`."""
    try:
        import uvicorn  # noqa: F401 - only to say what is missing
    except ImportError:
        from ._errors import ProgramError

        raise ProgramError("durable-heap serve needs uvicorn: pip install 'durable-heap[serve]'") from None
    from ._serve import ServeConfig, check_host, run

    _check_program(args, file_required=True)
    if args.workers < 1 or args.threads < 1 or (args.attempts is not None and args.attempts < 1):
        print("durable-heap: error: --workers, --threads and --attempts must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if bool(args.tls_cert) != bool(args.tls_key):
        print("durable-heap: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_USAGE
    config = ServeConfig(
        program=os.path.abspath(args.program), target=_target(args), host=args.host, port=args.port,
        workers=args.workers, threads=args.threads, attempts=args.attempts, debug=args.debug,
        inspect=args.inspect,
        watch=not args.no_watch, allow=list(args.allow), tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    check_host(config, args.insecure)
    return run(config)


def _check_program(args: argparse.Namespace, *, file_required: bool) -> None:
    """Refuse a missing or misnamed program before any heap file is created."""
    from ._errors import ProgramNotFoundError
    from ._program import read_source

    if os.path.exists(args.program):
        read_source(args.program)
        return
    target = _target(args)
    if file_required or ("://" not in target and not os.path.exists(target)):
        raise ProgramNotFoundError(f"there is no program file {args.program!r}")


def _call(args: argparse.Namespace) -> int:
    import contextlib

    import durable_heap

    from ._errors import DurableHeapError
    from ._ops import UsageError
    from ._versions import load

    if args.function is None:
        raise UsageError(
            f"which function of {args.program}? give its name after the program: "
            f"durable-heap call {args.program} FUNCTION [ARGS...] [-k NAME=VALUE ...]"
        )
    values = [parse_arg(a) for a in args.args]
    kwargs = parse_kwargs(args.kwarg)
    _check_program(args, file_required=False)
    # The result alone on stdout: what the program prints (its top level, migrate,
    # the function) goes to stderr, so that scripts can parse the result.
    stdout = sys.stdout
    with _open(args) as heap, contextlib.redirect_stdout(sys.stderr):
        program = load(heap, args.program, deploy=not args.no_deploy, on_deploy=_announce)
        if args.each is not None:
            return _call_each(args, program, values, kwargs, stdout)
        try:
            # One transaction: the program's top level (when loaded), the function,
            # and the result's rendering (it may read durable objects).
            text = program._call(args.function, tuple(values), kwargs, _format_call)
        except DurableHeapError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise _FunctionFailed(f"{args.function}()", exc) from exc
        if isinstance(text, durable_heap.Workflow):  # a workflow started: it ran after the commit
            text = f"{text.id} {text.status}"
    print(text)
    return 0


def _call_each(args: argparse.Namespace, program: Any, values: list[Any], kwargs: dict[str, Any],
               out: Any) -> int:
    """``call --each FILE``: one action per line (see `durable_heap._exchange.call_each`)."""
    import contextlib

    import durable_heap

    from ._errors import DurableHeapError
    from ._exchange import call_each, file_size
    from ._ops import UsageError, progress

    def invoke(more: tuple[Any, ...], extra: dict[str, Any]) -> str:
        try:
            text = program._call(args.function, (*values, *more), {**kwargs, **extra}, _format_call)
        except DurableHeapError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise _FunctionFailed(f"{args.function}()", exc) from exc
        return f"{text.id} {text.status}" if isinstance(text, durable_heap.Workflow) else str(text)

    stdin = args.each == "-"
    if not stdin and not os.path.isfile(args.each):
        raise UsageError(f"--each {args.each!r}: there is no such file")
    name = "stdin" if stdin else args.each
    lines = contextlib.nullcontext(sys.stdin) if stdin else open(args.each, encoding="utf-8")  # noqa: SIM115
    with lines as f, progress(None if stdin else file_size(args.each), f"call {args.function}", "B") as bar:
        done = call_each(invoke, f, name=name, bar=bar, out=out)
    print(f"durable-heap: {done:,} call{'s' if done != 1 else ''} of {args.function}", file=sys.stderr)
    return 0


def _format_call(value: Any) -> Any:
    from ._workflows import Workflow

    return value if isinstance(value, Workflow) else format_result(value)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``-k NAME=VALUE`` options as keyword arguments (VALUE read as `parse_arg` reads)."""
    from ._ops import UsageError

    kwargs: dict[str, Any] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name.isidentifier():
            raise UsageError(f"-k {item!r}: a keyword argument is NAME=VALUE, NAME a Python name")
        if name in kwargs:
            raise UsageError(f"-k {name}= is given twice: give each keyword argument once")
        kwargs[name] = parse_arg(text)
    return kwargs


def _open(args: argparse.Namespace, **options: Any) -> Any:
    """`durable_heap.open` on the command's target, saying on stderr when a server keeps it waiting."""
    import durable_heap

    from ._ops import waiting_notice

    target = _target(args)
    with waiting_notice(target):
        return durable_heap.open(target, allow=args.allow, **options)


def _deploy(args: argparse.Namespace) -> int:
    import contextlib

    from ._versions import deploy

    _check_program(args, file_required=True)
    with _open(args) as heap, contextlib.redirect_stdout(sys.stderr):  # the program's prints
        version, new = deploy(heap, args.program, note=args.note, force=args.force)
    if new:
        _announce(version)
    else:
        print(f"durable-heap: {version.program} is unchanged: version {version.number} is current",
              file=sys.stderr)
    print(version.number)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    import contextlib

    from ._versions import rollback

    with _open_existing(args, read_only=False) as heap, contextlib.redirect_stdout(sys.stderr):
        version, new = rollback(heap, args.program, args.to, note=args.note, force=args.force)
    if new:
        print(f"durable-heap: rolled {version.program} back to version {args.to}'s source, "
              f"deployed as version {version.number}", file=sys.stderr)
    else:
        print(f"durable-heap: {version.program} version {version.number} already runs version "
              f"{args.to}'s source: nothing deployed", file=sys.stderr)
    print(version.number)
    return 0


def _versions(args: argparse.Namespace) -> int:
    from ._versions import versions

    with _open_existing(args) as heap:
        listed = versions(heap, args.program)
    if not listed:
        from ._errors import ProgramNotFoundError

        raise ProgramNotFoundError(f"{args.program} has no deployed versions in {_target(args)}")
    print(f"   {'version':>7}  {'deployed (UTC)':<19}  {'source':<12}  note")
    for v in listed:
        mark = "*" if v.current else " "
        when = v.deployed_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f" {mark} {v.number:>7}  {when}  {v.source_hash[:12]}  {v.note}")
    return 0


def _open_existing(args: argparse.Namespace, read_only: bool = True) -> Any:
    """Open the program's heap read-only; a missing heap file is a usage error."""
    from ._errors import StorageError

    target = _target(args)
    if "://" not in target and not os.path.exists(target):
        raise StorageError(f"{args.program} has no heap yet at {target}: `durable-heap call` creates it")
    return _open(args, read_only=read_only)


def _inspect(args: argparse.Namespace) -> int:
    from ._heap import read_transaction
    from ._versions import load_discarded, parse_time, state_at, version_at

    # Read-only: works beside a running program, and never writes.
    with _open_existing(args) as heap:
        if args.at is None:
            load_discarded(heap, args.program)  # its classes must exist to show its objects
            with read_transaction(heap):
                lines = render(heap.state, depth=args.depth, limit=args.limit)
        else:
            try:
                when: Any = int(args.at) if args.at.isdigit() else parse_time(args.at)
            except ValueError as exc:
                print(f"durable-heap: error: --at: {exc}", file=sys.stderr)
                return EXIT_USAGE
            number = when if isinstance(when, int) else version_at(heap, args.program, when)
            # Definitions only: that version's top level may not fit today's state.
            load_discarded(heap, args.program, number, definitions_only=True)
            with state_at(heap, when, args.program) as old:
                lines = render(old, depth=args.depth, limit=args.limit)
    print("\n".join(lines))
    return 0


def _check(args: argparse.Namespace) -> int:
    from ._heap import read_transaction
    from ._versions import broken_classes, load_discarded

    with _open_existing(args) as heap:
        module = load_discarded(heap, args.program)
        with read_transaction(heap) as conn:
            broken = broken_classes(conn, module.__name__, heap.renames)
    if not broken:
        print(f"{module.__name__}: every stored class is defined by the current version")
        return 0
    print(f"{module.__name__}: stored objects use classes the current version does not define "
          "(they load as broken objects; their data is kept):")
    for path in broken:
        print(f"  {path}")
    print("Define them again, or map them to their new names in __durable_renames__.")
    return EXIT_FAILED


def _watch(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from ._errors import DurableHeapError
    from ._versions import auto_deploy, file_stamp

    _check_program(args, file_required=True)
    with _open(args) as heap, contextlib.redirect_stdout(sys.stderr):
        print(f"durable-heap: watching {args.program} (Ctrl-C stops)", file=sys.stderr, flush=True)
        stamp: Any = object()
        try:
            while True:
                now = file_stamp(os.path.abspath(args.program))
                if now != stamp and now is not None:  # gone for a moment (an editor's save): wait
                    stamp = now
                    try:
                        version = auto_deploy(heap, args.program)
                    except DurableHeapError as exc:
                        print(f"durable-heap: error: {exc}", file=sys.stderr, flush=True)
                    else:
                        if version is not None:
                            _announce(version)
                        sys.stderr.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _types(args: argparse.Namespace) -> int:
    import durable_heap

    from ._errors import ProgramError
    from ._heap import read_transaction
    from ._program import module_name, read_source
    from ._types import GENERATED_MARK, check_declared, declared_state, infer_stub
    from ._versions import load_discarded

    name = module_name(args.program)
    on_disk = os.path.exists(args.program)
    target = _target(args)
    exists = "://" in target or os.path.exists(target)
    # The file on disk is what the editor and the next deploy see; without a heap
    # yet, the stub comes from the source alone (a fresh in-memory heap).
    from ._ops import waiting_notice

    with waiting_notice(target):
        opened = durable_heap.open(target if exists else "memory://", read_only=exists, allow=args.allow)
    with opened as heap:
        module = load_discarded(heap, args.program, from_file=on_disk)
        texts = list(read_source(args.program).files.values()) if on_disk else []
        with read_transaction(heap):
            if args.check:
                declared = declared_state(module)
                if declared is None:
                    print(f"{name} declares no State class (class State(durable_heap.State)): "
                          "nothing to check")
                    return 0
                mismatches = check_declared(heap.state, declared, module)
            else:
                stub = infer_stub(heap.state, name, texts, args.program)
    if args.check:
        for m in mismatches:
            print(m)
        if mismatches:
            print(f"{len(mismatches)} mismatch{'es' if len(mismatches) > 1 else ''} between the "
                  f"stored data and {name}.State", file=sys.stderr)
            return EXIT_FAILED
        print(f"the stored data matches {name}.State")
        return 0
    if not args.write:
        print(stub, end="")
        return 0
    path = os.path.join(os.path.dirname(os.path.abspath(args.program).rstrip(os.sep)), f"{name}_state.py")
    if os.path.exists(path) and not args.force:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if not first.startswith(GENERATED_MARK):
            raise ProgramError(
                f"{path} exists and was not generated by durable-heap types: not overwritten "
                "(move it away, or use --force)"
            )
    with open(path, "w", encoding="utf-8") as f:
        f.write(stub)
    print(f"durable-heap: wrote {path}", file=sys.stderr)
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


# --- durable execution: worker, run-due, workflows, timers --------------------------------


def _workflow_commands(command: Any) -> None:
    """Add the durable-execution commands (`command(name, help)` makes a subparser)."""
    w = command("worker", "run the program's scheduler: timers, wakes, events (until SIGTERM)")
    w.add_argument("--poll", type=float, default=None,
                   help="seconds between looks for work that nothing rang the worker for (default 1; "
                        "0.1 on PostgreSQL, which pushes nothing: other processes' work waits for it)")
    command("run-due", "run the program's due timers, wakes and events once; print how many ran")
    wf = command("workflows", "list the program's workflows: status, what each waits on, since when")
    wf.add_argument("--id", help="show one workflow in full, with its journal")
    wf.add_argument("--status", help="only workflows of this status",  # _workflows.STATUSES
                    choices=("running", "waiting", "done", "failed", "blocked", "cancelled"))
    wf.add_argument("--cancel", metavar="ID", help="cancel the workflow ID")
    wf.add_argument("--retry", metavar="ID", help="run the blocked or failed workflow ID again")
    t = command("timers", "list the heap's pending timers and dead letters")
    t.add_argument("--retry", metavar="ID", help="queue the dead letter ID again")
    t.add_argument("--drop", metavar="ID", help="cancel the timer (or drop the dead letter) ID")


def _worker(args: argparse.Namespace) -> int:
    import durable_heap

    from ._versions import load

    _check_program(args, file_required=False)
    with durable_heap.open(_target(args), allow=args.allow) as heap:
        program = load(heap, args.program, on_deploy=_announce)
        program.module  # noqa: B018 - loads it: its actions and workflows are known by name
        print(f"durable-heap: worker for {program.name} on {heap.target} (stop with SIGTERM)",
              file=sys.stderr, flush=True)
        heap.run_scheduler(poll=args.poll, tick=lambda: program.module)
    print("durable-heap: worker stopped", file=sys.stderr)
    return 0


def _run_due(args: argparse.Namespace) -> int:
    import durable_heap

    from ._versions import load

    _check_program(args, file_required=False)
    with durable_heap.open(_target(args), allow=args.allow) as heap:
        program = load(heap, args.program, on_deploy=_announce)
        program.module  # noqa: B018 - loads it
        print(heap.run_due())
    return 0


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _waits(info: dict[str, Any]) -> str:
    waiting = info["waiting_on"]
    if info["stuck"]:
        return "its runner stopped answering (lease expired): a scheduler takes it over"
    if info["status"] == "blocked":
        return f"blocked: {info['reason']}"
    if info["status"] == "failed":
        return f"failed: {info['error']}"
    if not waiting:
        return ""
    if "sleep" in waiting:
        return f"sleep until {_when(waiting['sleep'])}"
    if "promise" in waiting:
        if "resolved" in waiting:  # its wake is queued: a scheduler runs it (none is running?)
            return (f"promise {waiting['promise']!r} resolved at {_when(waiting['resolved'])}: "
                    "its wake is due (run by durable-heap worker or run-due)")
        until = f" until {_when(waiting['until'])}" if waiting["until"] is not None else ""
        return f"promise {waiting['promise']!r}{until}"
    return ", ".join(f"{k} {_when(v)}" for k, v in waiting.items())


def _workflows(args: argparse.Namespace) -> int:

    writes = bool(args.cancel or args.retry)
    with _open_existing(args, read_only=not writes) as heap:
        if args.cancel:
            done = heap.workflow_by_id(args.cancel).cancel()
            print(f"{args.cancel} {'cancelled' if done else 'had finished already: nothing to cancel'}")
            return 0 if done else EXIT_FAILED
        if args.retry:
            done = heap.workflow_by_id(args.retry).retry()
            print(f"{args.retry} {'queued to run again' if done else 'is neither blocked nor failed'}")
            return 0 if done else EXIT_FAILED
        if args.id:
            info = heap.workflow_by_id(args.id).info
            for key in ("id", "function", "status", "since", "stuck", "reason", "error", "result"):
                value = info[key]
                print(f"{key:>9}: {_when(value) if key == 'since' else format_result(value)}")
            print(f"{'waits':>9}: {_waits(info) or '-'}")
            print(f"{'journal':>9}: {info['steps']} entries" + ("" if info["journal"] or not info["steps"]
                                                              else " (dropped after its retention)"))
            for e in info["journal"]:
                error = f"  raised {e['error']}" if e["error"] else ""
                detail = e["detail"] if e["kind"] == "step" else ""
                if e.get("replayed"):
                    detail += f" (replayed as {e['replayed']}: its arguments changed)"
                print(f"{e['number']:>9}. {e['kind']} {e['name']} {detail}{error}".rstrip())
            return 0
        print(f"{'id':<32}  {'status':<9}  {'since (UTC)':<19}  {'function':<24}  waits on")
        from ._workflows import summaries

        for info in summaries(heap, args.status):  # records only, from the status index
            status = "stuck" if info["stuck"] else info["status"]
            print(f"{info['id']:<32}  {status:<9}  {_when(info['since'])}  {info['function']:<24}  "
                  f"{_waits(info)}")
    return 0


def _timers(args: argparse.Namespace) -> int:

    writes = bool(args.retry or args.drop)
    with _open_existing(args, read_only=not writes) as heap:
        timers = heap.timers()
        if writes:
            wanted = args.retry or args.drop
            found = [t for t in timers if t.id == wanted]
            if not found:
                print(f"durable-heap: there is no timer {wanted!r}", file=sys.stderr)
                return EXIT_USAGE
            done = found[0].retry() if args.retry else found[0].cancel()
            print(f"{wanted} {'queued again' if args.retry and done else 'dropped' if done else 'unchanged'}")
            return 0
        width = max([24, *(len(t.id) for t in timers)])  # a cron's id is its declaration: long
        print(f"{'id':<{width}}  {'due (UTC)':<19}  {'kind':<6}  {'tries':>5}  target")
        for t in timers:
            target = ".".join(t.target) if isinstance(t.target, tuple) else str(t.target)
            due = "dead letter" if t.dead else _when(t.due)
            error = f"  last error: {t.error}" if t.error else ""
            origin = f" ({t.origin})" if t.origin else ""
            print(f"{t.id:<{width}}  {due:<19}  {t.kind:<6}  {t.attempts:>5}  {target}{origin}{error}")
    return 0


_WORKFLOW_COMMANDS = {"worker": _worker, "run-due": _run_due, "workflows": _workflows, "timers": _timers}

