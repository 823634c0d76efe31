"""Programs: a Python file whose top level uses ``state``, loaded against a heap.

Loading a program creates a new module object under a stable name (the file's
stem: ``counter.py`` -> ``counter``), so pickled references to its classes
(``counter.User``) resolve to the loaded code; runs its top level in one
transaction with the heap active (so ``state.setdefault(...)`` initialisation is
committed); and hands back the module, whose functions are then called as
actions. Keeping these steps in `load` is what lets the version layer add deploy
records (source hash, history, migrate) around them without a rewrite.
"""

from __future__ import annotations

import os
import sys
import traceback
import types
from typing import Any

from ._errors import FunctionNotFoundError, ProgramError, ProgramNotFoundError
from ._heap import Heap

__all__ = ["call", "default_target", "load", "module_name"]

STATE_DIR = ".durable-heap"


def default_target(program: str) -> str:
    """Where a program's heap lives unless told: ``.durable-heap/<stem>.fs`` beside it."""
    path = os.path.abspath(program)
    return os.path.join(os.path.dirname(path), STATE_DIR, module_name(path) + ".fs")


def module_name(program: str) -> str:
    """The stable module name of a program: its file stem."""
    return os.path.splitext(os.path.basename(os.path.abspath(program)))[0]


def _check_name(name: str, path: str) -> None:
    if not name.isidentifier():
        raise ProgramError(
            f"{path}: the program name {name!r} is not a Python identifier; rename the "
            "file (its stem becomes the module name stored with its objects)"
        )
    existing = sys.modules.get(name)
    clash = name in sys.stdlib_module_names or (
        existing is not None and getattr(existing, "__file__", None) != path
    )
    if clash:
        raise ProgramError(
            f"{path}: the program name {name!r} is also the name of an installed module; "
            "rename the file (its stem becomes the module name stored with its objects)"
        )


def load(heap: Heap, program: str, *, commit: bool = True) -> types.ModuleType:
    """Load `program` against `heap`: run its top level in one transaction.

    With ``commit=False`` the top level runs in a transaction that is aborted
    (for read-only views such as ``durable-heap inspect``).
    """
    path = os.path.abspath(program)
    if not os.path.isfile(path):
        raise ProgramNotFoundError(f"there is no program file {program!r}")
    name = module_name(path)
    _check_name(name, path)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        raise ProgramError(f"{program}, line {exc.lineno}: syntax error: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgramError(f"cannot read {program}: {exc}") from exc
    module = types.ModuleType(name)
    module.__file__ = path
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        with heap.activate():
            if commit:
                heap._run(exec, (code, module.__dict__), {}, f"load {name}", heap.max_attempts)
            else:
                _run_discarded(heap, code, module.__dict__)
    except Exception as exc:
        del sys.modules[name]
        raise ProgramError(f"{program} raised at load: {_where(exc, path)}") from exc
    return module


def _run_discarded(heap: Heap, code: Any, namespace: dict[str, Any]) -> None:
    tm = heap.transaction_manager
    tm.begin()
    try:
        exec(code, namespace)  # noqa: S102 - running the user's program is the point
    finally:
        tm.abort()


def call(heap: Heap, module: types.ModuleType, function: str, args: list[Any]) -> Any:
    """Call ``module.function(*args)`` as one action of `heap`."""
    func = getattr(module, function, None)
    if func is None or not callable(func) or function.startswith("_"):
        names = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            and isinstance(v, types.FunctionType)
        )
        listed = ", ".join(names) if names else "none"
        raise FunctionNotFoundError(
            f"{module.__file__} has no function {function!r} (its functions: {listed})"
        )
    with heap.activate():
        return heap._run(func, tuple(args), {}, None, heap.max_attempts)


def _where(exc: BaseException, path: str) -> str:
    """``Type: message (file, line N)`` with the program's own innermost line."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    msg = f"{type(exc).__name__}: {exc}"
    return f"{msg} (line {line})" if line else msg
