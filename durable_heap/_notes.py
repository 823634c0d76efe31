"""Transaction notes: what the heap's history (``durable-heap log``) says about each commit.

An action's note is its call, ``add_user('ann', role='admin')``, arguments shortened;
a ``with heap.transaction()`` block without a note gets the place it was written,
``transaction in add_user (app.py:12)``, so that no entry of the log is blank.

Notes stay in the heap's history for ever (until a pack drops the transaction), so
arguments that are secrets must be kept out of them: `redact` marks a function's
arguments (all, or by name) as not logged; they show as ``<redacted>``.
"""

from __future__ import annotations

import functools
import inspect
import os
import reprlib
from collections.abc import Callable
from types import CodeType
from typing import Any, TypeVar, overload

__all__ = ["REDACTED", "block_note", "call_note", "hidden_note", "redact"]

F = TypeVar("F", bound=Callable[..., Any])

#: What a redacted argument shows as in a note.
REDACTED = "<redacted>"
#: The attribute `redact` sets: True (every argument) or a frozenset of parameter names.
_MARK = "__durable_redact__"

_note_repr = reprlib.Repr()
_note_repr.maxstring = 40
_note_repr.maxother = 40
_note_repr.maxlist = _note_repr.maxdict = _note_repr.maxtuple = _note_repr.maxset = 4


@overload
def redact(func: F, /) -> F: ...


@overload
def redact(*names: str) -> Callable[[F], F]: ...


def redact(*names: Any) -> Any:
    """Keep a function's arguments out of its transaction notes (the heap's history).

    ``@redact`` hides every argument; ``@redact("password", "token")`` hides those
    parameters (given by position or by name; a ``*args`` or ``**kwargs`` name hides
    all that it collects). Put it under ``@heap.action`` or on a program's function.

    >>> @redact("password")
    ... def login(user, password): ...
    >>> call_note("login", ("ann", "hunter2"), {}, login)
    "login('ann', <redacted>)"
    """
    if len(names) == 1 and callable(names[0]):
        setattr(names[0], _MARK, True)
        return names[0]
    for n in names:
        if not isinstance(n, str) or not n.isidentifier():
            msg = f"redact() takes parameter names (strings), not {n!r}"
            raise TypeError(msg)
    hidden = frozenset(names)

    def mark(f: F) -> F:
        setattr(f, _MARK, hidden if hidden else True)
        return f

    return mark


def call_note(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              func: Callable[..., Any] | None = None) -> str:
    """``name('arg', n=2)``, arguments shortened and those `func` redacts hidden."""
    hidden = _hidden(func)
    if hidden is True:
        return hidden_note(name, args, kwargs)
    if hidden:
        positional = _positional_names(func, len(args))
        parts = [REDACTED if positional[i] in hidden else _note_repr.repr(a) for i, a in enumerate(args)]
        star = _var_keyword(func)
        parts += [f"{k}={REDACTED if k in hidden or star in hidden else _note_repr.repr(v)}"
                  for k, v in kwargs.items()]
        return f"{name}({', '.join(parts)})"
    parts = [_note_repr.repr(a) for a in args]
    parts += [f"{k}={_note_repr.repr(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def hidden_note(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(<redacted>, k=<redacted>)``: a note for a function whose marks are not known yet."""
    parts = [REDACTED] * len(args) + [f"{k}={REDACTED}" for k in kwargs]
    return f"{name}({', '.join(parts)})"


def _hidden(func: Any) -> bool | frozenset[str]:
    if func is None:
        return False
    mark = getattr(func, _MARK, None)
    if mark is None:
        mark = getattr(getattr(func, "__wrapped__", None), _MARK, None)
    return mark if mark is True or isinstance(mark, frozenset) else False


def _positional_names(func: Any, n: int) -> list[str]:
    """The parameter name each of `n` positional arguments binds to (``*args``' name past it)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return [""] * n
    names: list[str] = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            names += [p.name] * max(n - len(names), 0)
            break
    return (names + [""] * n)[:n]


def _var_keyword(func: Any) -> str:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return ""
    return next((p.name for p in params if p.kind is p.VAR_KEYWORD), "")


@functools.lru_cache(maxsize=4096)  # one per place in the code: formatted once, not per transaction
def block_note(code: CodeType | None, line: int) -> str | None:
    """The default note of a ``with heap.transaction()`` block written at `code`, `line`."""
    if code is None:
        return None
    where = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    place = f"{os.path.basename(code.co_filename)}:{line}"
    if where == "<module>":
        return f"transaction at {place}"
    return f"transaction in {where} ({place})"
