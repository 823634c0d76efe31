"""Typed state: a declared `State` class, and checks of stored data against it.

* `typed_state(State)` gives a program ``state`` typed as its own `State`
  subclass. A program that declares one gets its root made an instance of it
  (at deploy, in the deploy's transaction): stored names are kept, annotated
  names that are missing get their class default (mutable defaults copied,
  never shared).
* `check_declared` compares stored data (sampled, see `_stubs`) with the
  declared annotations.

Stubs inferred from the stored data (`infer_stub`) are `_stubs`' (re-exported
here for the CLI and older imports).
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from persistent import Persistent

from ._containers import Dict, List, Set
from ._errors import NotPersistableError
from ._format import CLASSES_KEY, ROOT_KEY
from ._heap import active_heap, state
from ._kinds import is_atomic
from ._registry import program_roots
from ._state import State
from ._stubs import DEPTH, GENERATED_MARK, SAMPLE, Context, attributes, infer, infer_stub, sample

__all__ = [
    "GENERATED_MARK",
    "Mismatch",
    "apply_declared",
    "check_declared",
    "declared_state",
    "infer_stub",
    "typed_state",
]

S = TypeVar("S", bound=State)


# --- the declared State ----------------------------------------------------------------


def typed_state(cls: type[S]) -> S:
    """``durable_heap.state``, typed as your `State` subclass for type checkers.

    >>> import durable_heap as dh
    >>> class MyState(dh.State):
    ...     count: int = 0
    >>> state = dh.typed_state(MyState)     # the same proxy as dh.state

    When a program's top level calls it with the program's own class, the
    root becomes an instance of that class (as a deploy does).
    """
    if not (isinstance(cls, type) and issubclass(cls, State)):
        raise TypeError(f"typed_state() takes a subclass of durable_heap.State, not {cls!r}")
    if cls is not State and cls.__module__.partition(".")[0] in program_roots:
        heap = active_heap()
        if heap.in_transaction:
            apply_declared(heap.connection, cls)
    return cast(S, state)


def declared_state(module: types.ModuleType) -> type[State] | None:
    """The program's own `State` subclass (a module-level ``State``), if it declares one.

    Only a class defined in the program counts: a ``State`` imported from
    elsewhere (a generated stub, say) must not become the class of the root.
    """
    cls = vars(module).get("State")
    if (isinstance(cls, type) and issubclass(cls, State) and cls is not State
            and cls.__module__.partition(".")[0] == module.__name__.partition(".")[0]):
        return cls
    return None


def _annotated_defaults(cls: type) -> Iterator[tuple[str, Any]]:
    """(name, class default) of each annotated attribute of `cls` above `State`."""
    seen = set()
    for klass in cls.__mro__:
        if klass is State or not issubclass(klass, State):
            break
        for name, hint in vars(klass).get("__annotations__", {}).items():
            if name in seen or "ClassVar" in str(hint) or name not in vars(klass):
                continue
            seen.add(name)
            yield name, vars(klass)[name]


def apply_declared(conn: Any, cls: type[State] | None, program: str | None = None) -> None:
    """Make the root an instance of `cls` with its missing defaults set (copied).

    With ``cls=None`` a root that is an instance of `program`'s former State
    class becomes a plain `State` again (its attributes kept). Either way no
    stored attribute is ever removed.
    """
    root = conn.root()
    st = root[ROOT_KEY]
    st._p_activate()
    current = type(st)
    if cls is None:
        # The program no longer declares a State: a root stored as its former
        # State class (loaded as a plain State, see `Heap._find_class`) is stored
        # as a plain State again, and that class path leaves the registry.
        registry = root.get(CLASSES_KEY)
        former = [p for p in (registry.keys() if registry is not None else ())
                  if p.partition(".")[0] == program and p.rpartition(".")[2] == "State"]
        if not former and current is State:
            return
        for path in former:
            del registry[path]
        conn.__dict__.pop("_dh_classes", None)
        cls = State
        st._p_changed = True
        root[ROOT_KEY] = st
    if current is not cls:
        st.__class__ = cls
        st._p_changed = True
        # The root mapping's reference names the class too: write it again.
        root[ROOT_KEY] = st
    for name, default in _annotated_defaults(cls):
        if name not in st.__dict__:
            try:
                value = copy.deepcopy(default)
            except Exception as exc:  # noqa: BLE001 - a lock, a socket...: not storable either
                raise NotPersistableError(f"{cls.__qualname__}.{name} (the default of state.{name})",
                                          default, f"it cannot even be copied: {exc}") from None
            setattr(st, name, value)


@dataclass(frozen=True)
class Mismatch:
    """Stored data that does not match a declared annotation."""

    path: str
    declared: str
    stored: str

    def __str__(self) -> str:
        if self.stored.startswith(_UNRESOLVED):
            return f"{self.path}: declared {self.declared}, {self.stored}"
        return f"{self.path}: declared {self.declared}, stored {self.stored}"


_UNRESOLVED = "not checked: the annotation does not resolve"


def _hint_text(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    return str(hint).replace("typing.", "")


def check_declared(root: Any, cls: type[State], module: types.ModuleType) -> list[Mismatch]:
    """Every mismatch between `root`'s stored data and `cls`'s annotations (sampled)."""
    out: list[Mismatch] = []
    _check_attributes(root, cls, "state", out, DEPTH, vars(module))
    return out


def _hints(cls: type, namespace: dict[str, Any], out: list[Mismatch]) -> dict[str, Any]:
    """`cls`'s annotations resolved; each one that cannot be is a mismatch (``Class.name``)."""
    with contextlib.suppress(Exception):  # else find which ones fail, below
        return typing.get_type_hints(cls, globalns=namespace)
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        globalns = {**vars(module), **namespace} if module is not None else namespace
        for name, hint in vars(klass).get("__annotations__", {}).items():
            one = type("_", (), {"__annotations__": {name: hint}})
            try:
                hints[name] = typing.get_type_hints(one, globalns=globalns, localns=dict(vars(klass)))[name]
            except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
                hints.pop(name, None)
                text = hint if isinstance(hint, str) else _hint_text(hint)
                found = Mismatch(f"{klass.__qualname__}.{name}", text,
                                 f"{_UNRESOLVED} ({type(exc).__name__}: {exc})")
                if found not in out:  # once per class, not once per sampled object
                    out.append(found)
    return hints


def _check_attributes(obj: Any, cls: type, path: str, out: list[Mismatch], depth: int,
                      namespace: dict[str, Any]) -> None:
    stored = attributes(obj)
    for name, hint in sorted(_hints(cls, namespace, out).items()):
        if typing.get_origin(hint) is typing.ClassVar or (cls is not State and name in vars(State)):
            continue
        where = f"{path}.{name}"
        if name not in stored:
            if not hasattr(cls, name):
                out.append(Mismatch(where, _hint_text(hint), "nothing (the name is not stored)"))
            continue
        _check(stored[name], hint, where, out, depth, namespace)


def _check(value: Any, hint: Any, path: str, out: list[Mismatch], depth: int,
           namespace: dict[str, Any]) -> None:
    if depth <= 0 or hint is Any or hint is object:
        return
    probe: list[Mismatch] = []
    if not _conforms(value, hint, path, probe, depth, namespace):
        ctx = Context(programs=set(program_roots))
        out.append(Mismatch(path, _hint_text(hint), infer(value, ctx, 2)))
    else:
        out.extend(probe)


def _conforms(value: Any, hint: Any, path: str, out: list[Mismatch], depth: int,
              namespace: dict[str, Any]) -> bool:
    """Whether `value` has the outer type of `hint`; inner mismatches go to `out`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner: list[Mismatch] = []
            if _conforms(value, arg, path, inner, depth, namespace):
                out.extend(inner)
                return True
        return False
    if origin is typing.Literal:
        return value in args
    base = origin or hint
    checks: dict[Any, tuple[type, ...]] = {
        dict: (dict, Dict), collections.abc.Mapping: (dict, Dict),
        collections.abc.MutableMapping: (dict, Dict),
        list: (list, List), collections.abc.Sequence: (list, List, tuple),
        collections.abc.MutableSequence: (list, List), set: (set, Set),
        collections.abc.Set: (set, Set, frozenset),
        collections.abc.MutableSet: (set, Set), frozenset: (frozenset,), tuple: (tuple,),
        float: (float, int), complex: (complex, float, int),
    }
    kinds = checks.get(base)
    if kinds is None:
        if not isinstance(base, type):
            return True  # a TypeVar, a Protocol alias...: not checked
        if not isinstance(value, base):
            return False
        holds_attributes = isinstance(value, Persistent) or not is_atomic(value)
        if holds_attributes and not isinstance(value, (Dict, List, Set)):
            _check_attributes(value, base, path, out, depth - 1, namespace)
        return True
    if not isinstance(value, kinds):
        return False
    return _conforms_inside(value, base, args, path, out, depth, namespace)


def _conforms_inside(value: Any, base: Any, args: tuple[Any, ...], path: str, out: list[Mismatch],
                     depth: int, namespace: dict[str, Any]) -> bool:
    """The sampled members of a container of the right kind, against its type arguments."""
    if args and depth > 1:
        if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping) and len(args) == 2:
            for k, v in sample(value.items()):
                _check(k, args[0], f"{path} key {k!r}", out, depth - 1, namespace)
                _check(v, args[1], f"{path}[{k!r}]", out, depth - 1, namespace)
        elif base is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                for i, v in enumerate(value[:SAMPLE]):
                    _check(v, args[0], f"{path}[{i}]", out, depth - 1, namespace)
            elif len(args) != len(value):
                return False
            else:
                for i, (v, a) in enumerate(zip(value, args, strict=True)):
                    _check(v, a, f"{path}[{i}]", out, depth - 1, namespace)
        elif isinstance(value, (list, List)):
            n = len(value)
            idx = list(range(n)) if n <= SAMPLE else [*range(SAMPLE // 2), *range(n - SAMPLE // 2, n)]
            for i in idx:
                _check(value[i], args[0], f"{path}[{i}]", out, depth - 1, namespace)
        else:
            for v in sample(value):
                _check(v, args[0], f"{path} member {v!r}", out, depth - 1, namespace)
    return True
