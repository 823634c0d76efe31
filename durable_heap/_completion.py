"""``durable-heap completion bash|zsh|tcsh``: a shell completion script for the command.

Generated from the command's own argparse parser by shtab (the ``completion`` extra:
small, no dependencies, by tqdm's authors), so it knows every command and option of
this version and needs nothing at completion time: the script is static, no Python
runs when the shell completes (argcomplete, the other choice, starts the program on
every Tab). Program, file and folder arguments complete as paths.

    durable-heap completion bash > ~/.local/share/bash-completion/completions/durable-heap
    durable-heap completion zsh > "${fpath[1]}/_durable-heap"
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["SHELLS", "add_command", "script"]

SHELLS = ("bash", "zsh", "tcsh")
#: Positional arguments that name files (completed as paths) and folders.
_FILES = {"program", "file", "source", "target"}
_FOLDERS = {"dest"}

EXAMPLE = ("example:\n"
           "  durable-heap completion bash > ~/.local/share/bash-completion/completions/durable-heap\n"
           "  durable-heap completion zsh > \"${fpath[1]}/_durable-heap\"   # then: compinit")


def add_command(sub: Any, parser: Callable[[], argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``completion`` to the ``durable-heap`` parser (it sets ``run``); `parser` makes the
    whole command's parser (from `durable_heap.cli`, which this module does not import)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for durable-heap (needs the completion extra: "
        "pip install 'durable-heap[completion]').",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, help="the shell")
    p.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=lambda args: _run(parser(), args.shell))
    return p


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell`."""
    try:
        import shtab
    except ImportError:
        from ._ops import CommandError

        raise CommandError("durable-heap completion needs shtab: pip install 'durable-heap[completion]'"
                           ) from None
    for action in _actions(parser):
        if not action.option_strings and action.dest in _FILES:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif not action.option_strings and action.dest in _FOLDERS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif action.dest in ("storage", "output", "each", "tls_cert", "tls_key"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    return str(shtab.complete(parser, shell=shell))


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:  # argparse has no public walk of its tree
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                found.extend(_actions(sub))
    return found


def _run(parser: argparse.ArgumentParser, shell: str) -> int:
    print(script(parser, shell), end="")
    return 0
