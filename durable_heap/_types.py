"""Typed state: a declared `State` class, and stubs inferred from what is stored.

* `typed_state(State)` gives a program ``state`` typed as its own `State`
  subclass. A program that declares one gets its root made an instance of it
  (at deploy, in the deploy's transaction): stored names are kept, annotated
  names that are missing get their class default (mutable defaults copied,
  never shared).
* `infer_stub` writes a Python stub -- ``class State(durable_heap.State)``
  with one annotated attribute per stored name -- from a bounded sample of the
  stored data merged with the names the program's source assigns.
* `check_declared` compares stored data with the declared annotations.

Sampling bounds the cost: `SAMPLE` entries of each container (the first and
the last ones), `DEPTH` levels, so a 10M-entry Dict costs what 50 entries do.
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import copy
import enum
import keyword
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar, cast

from persistent import Persistent
from ZODB.broken import Broken

from ._containers import Dict, List, Set
from ._errors import NotPersistableError
from ._format import CLASSES_KEY, ROOT_KEY
from ._heap import active_heap, state
from ._kinds import is_atomic
from ._registry import program_roots
from ._state import Object, State

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

#: First line of every generated stub: `--write` overwrites only files that start so.
GENERATED_MARK = "# durable-heap: generated stub"
SAMPLE = 50
DEPTH = 6


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


# --- inference ---------------------------------------------------------------------------


@dataclass
class _Context:
    programs: set[str]
    imports: set[str] = field(default_factory=set)
    program_imports: set[tuple[str, str]] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    uses_any: bool = False
    # class -> sampled instances, in the order found
    instances: dict[type, list[Any]] = field(default_factory=dict)


def _sample(values: Iterable[Any], n: int = SAMPLE) -> list[Any]:
    return list(islice(values, n))


def _list_sample(value: Any) -> list[Any]:
    n = len(value)
    if n <= SAMPLE:
        return list(value)
    half = SAMPLE // 2
    return [value[i] for i in range(half)] + [value[i] for i in range(n - half, n)]


def _union(parts: Iterable[str]) -> str:
    found = set(parts)
    if not found:
        return "Any"
    if "Any" in found:
        return "Any"
    if "int" in found and "float" in found:
        found.discard("int")  # a float annotation accepts ints
    if "bool" in found and "int" in found:
        found.discard("bool")
    ordered = sorted(found - {"None"}) + (["None"] if "None" in found else [])
    return " | ".join(ordered)


def _class_name(tp: type, ctx: _Context) -> str:
    if issubclass(tp, Broken):
        ctx.broken.add(f"{tp.__module__}.{tp.__name__}")
        ctx.uses_any = True
        return "Any"
    module, qual = tp.__module__, tp.__qualname__
    if "<locals>" in qual or not _reachable(tp):
        ctx.uses_any = True  # no name a stub could import it by
        return "Any"
    if module == "builtins":
        return qual
    if module.partition(".")[0] in ctx.programs:
        ctx.program_imports.add((module, qual.split(".")[0]))
        return qual
    if module.startswith("durable_heap"):
        return f"durable_heap.{qual}" if qual in ("Counter", "Object", "State") else "Any"
    ctx.imports.add(module)
    return f"{module}.{qual}"


def _reachable(tp: type) -> bool:
    """Whether ``module.qualname`` names `tp` (not so for ``builtin_function_or_method``)."""
    found: Any = sys.modules.get(tp.__module__)
    for part in tp.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is tp


def _infer(value: Any, ctx: _Context, depth: int) -> str:
    """The type of `value` as annotation text, reading at most a sample of it."""
    if value is None:
        return "None"
    if depth <= 0:
        ctx.uses_any = True
        return "Any"
    tp = type(value)
    if isinstance(value, (Dict, dict)):
        items = _sample(value.items())
        if not items:
            ctx.uses_any = True
            return "dict[Any, Any]"
        keys = _union(_infer(k, ctx, depth - 1) for k, _ in items)
        vals = _union(_infer(v, ctx, depth - 1) for _, v in items)
        return f"dict[{keys}, {vals}]"
    if isinstance(value, (List, list)):
        return _container("list", _list_sample(value), ctx, depth)
    if isinstance(value, (Set, set)):
        return _container("set", _sample(value), ctx, depth)
    if isinstance(value, frozenset):
        return _container("frozenset", _sample(value), ctx, depth)
    if tp is tuple:
        if 0 < len(value) <= 6:
            return f"tuple[{', '.join(_infer(v, ctx, depth - 1) for v in value)}]"
        return _container("tuple", _sample(value), ctx, depth, suffix=", ...")
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        ctx.uses_any = True  # stored functions and classes: not worth a Callable stub
        return "Any"
    if isinstance(value, enum.Enum) or (is_atomic(value) and not isinstance(value, Persistent)):
        return _class_name(tp, ctx)
    name = _class_name(tp, ctx)
    if name != "Any" and not isinstance(value, State) and not name.startswith("durable_heap."):
        found = ctx.instances.setdefault(tp, [])
        if len(found) < SAMPLE:
            found.append(value)
    return name


def _container(kind: str, items: list[Any], ctx: _Context, depth: int, suffix: str = "") -> str:
    if not items:
        ctx.uses_any = True
        return f"{kind}[Any{suffix}]"
    return f"{kind}[{_union(_infer(v, ctx, depth - 1) for v in items)}{suffix}]"


def _attributes(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Object):
        return obj._dh_as_dict()
    if isinstance(obj, Persistent):
        obj._p_activate()
    d = getattr(obj, "__dict__", None)
    return {k: v for k, v in d.items() if not k.startswith(("_p_", "_v_"))} if isinstance(d, dict) else {}


def _source_names(files: Iterable[str]) -> dict[str, str]:
    """Names the program's source assigns in state, with the type of literal values."""
    found: dict[str, str] = {}
    for text in files:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            name, expr = _state_assignment(node)
            if name is not None and name not in found:
                found[name] = _literal_type(expr)
    return found


def _state_assignment(node: ast.AST) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "state":
                return t.attr, node.value
            if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "state"
                    and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)):
                return t.slice.value, node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "state" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value, node.args[1] if len(node.args) > 1 else None
    return None, None


def _literal_type(expr: ast.expr | None) -> str:
    if expr is None:
        return "Any"
    if isinstance(expr, ast.Constant):
        return "None" if expr.value is None else type(expr.value).__name__
    kinds = {ast.List: "list[Any]", ast.Dict: "dict[Any, Any]", ast.Set: "set[Any]",
             ast.Tuple: "tuple[Any, ...]"}
    for kind, text in kinds.items():
        if isinstance(expr, kind):
            return text
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
        made = {"list": "list[Any]", "dict": "dict[Any, Any]", "set": "set[Any]", "frozenset":
                "frozenset[Any]", "int": "int", "float": "float", "str": "str", "bytes": "bytes"}
        return made.get(expr.func.id, "Any")
    return "Any"


def infer_stub(root: Any, program: str, sources: Iterable[str], origin: str) -> str:
    """The stub text for the state `root` of `program`, merged with its source."""
    ctx = _Context(programs={program})
    names: dict[str, str] = {}
    for name, value in sorted(_attributes(root).items()):
        names[name] = _infer(value, ctx, DEPTH)
    for name, literal in _source_names(sources).items():
        if name not in names:
            names[name] = literal
            ctx.uses_any = ctx.uses_any or "Any" in literal
    classes: dict[type, dict[str, str]] = {}
    done: set[type] = set()
    while set(ctx.instances) - done:
        for cls in sorted(set(ctx.instances) - done, key=lambda c: (c.__module__, c.__qualname__)):
            done.add(cls)
            attrs: dict[str, set[str]] = {}
            for obj in ctx.instances[cls]:
                for attr, value in _attributes(obj).items():
                    attrs.setdefault(attr, set()).add(_infer(value, ctx, DEPTH - 1))
            classes[cls] = {a: _union(t) for a, t in sorted(attrs.items())}
    return _render(names, classes, ctx, origin)


_TOKEN = re.compile(r"(?<![\w.])[A-Za-z_]\w*")


def _attribute_name(name: str) -> bool:
    """Whether `name` can be a plain annotated attribute of the stub's State class."""
    return name.isidentifier() and not keyword.iskeyword(name) and not hasattr(State, name)


def _free_name(name: str, taken: dict[str, str]) -> str:
    """`name`, with trailing underscores while a stored name has it (leading ones
    would be mangled inside the class body)."""
    while name in taken:
        name += "_"
    return name


def _render(names: dict[str, str], classes: dict[type, dict[str, str]], ctx: _Context, origin: str) -> str:
    stem = os.path.splitext(os.path.basename(origin.rstrip(os.sep)))[0]
    lines = [
        f"{GENERATED_MARK}: do not edit; run `durable-heap types {origin} --write` again.",
        "# The names and types of the data stored in state (containers sampled), merged with",
        "# the names the program's source assigns. Use it in the program with:",
        "#     from typing import TYPE_CHECKING",
        "#     if TYPE_CHECKING:",
        f"#         from {stem}_state import State",
        "#     state: State = durable_heap.state",
        "from __future__ import annotations",
        "",
    ]
    attrs = {n: t for n, t in names.items() if _attribute_name(n)}
    aside = {n: t for n, t in names.items() if n not in attrs}
    # An attribute named like something its annotations use (`list`, `Any`, a
    # class, a module) would shadow it inside the class body: use an alias there.
    used = {tok for text in attrs.values() for tok in _TOKEN.findall(text)}
    aliases = {tok: _free_name(f"_{tok}", attrs) for tok in used & set(attrs)}
    imports = [f"import {module}" for module in sorted(ctx.imports)]
    typing_names: list[str] = []
    roots = {m.partition(".")[0] for m in ctx.imports}
    program_names = {name: module for module, name in ctx.program_imports}
    for tok in sorted(aliases):
        alias = aliases[tok]
        if tok == "Any":
            typing_names.append(f"Any as {alias}")
        elif tok == "durable_heap" or tok in roots:
            imports.append(f"import {tok} as {alias}")
        elif tok in program_names:
            ctx.program_imports.add((program_names[tok], f"{tok} as {alias}"))
        else:
            builtins_alias = _free_name("_builtins", attrs)
            imports.append(f"import builtins as {builtins_alias}")
            aliases[tok] = f"{builtins_alias}.{tok}"
    lines += sorted(set(imports))
    if ctx.program_imports:
        typing_names.append("TYPE_CHECKING")
    if ctx.uses_any or any("Any" in t for t in names.values()):
        typing_names.append("Any")
    if typing_names:
        lines.append(f"from typing import {', '.join(sorted(typing_names))}")
    lines += ["", "import durable_heap", ""]
    if ctx.program_imports:
        lines.append("if TYPE_CHECKING:")
        for module, name in sorted(ctx.program_imports):
            lines.append(f"    from {module} import {name}")
        lines.append("")
    for path in sorted(ctx.broken):
        lines.append(f"# {path}: its objects cannot be loaded (the class is missing): typed Any")
    if ctx.broken:
        lines.append("")
    lines += ["", "class State(durable_heap.State):"]
    if not attrs:
        lines.append("    pass")
    for name, text in sorted(attrs.items()):
        if aliases:
            text = _TOKEN.sub(lambda m: aliases.get(m.group(), m.group()), text)
        lines.append(f"    {name}: {text}")
    if aside:
        lines += ["", "", "# Stored under names that cannot be attributes here (reach them as state[name]):"]
        lines += [f"#     state[{n!r}]: {t}" for n, t in sorted(aside.items())]
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        lines += ["", "", f"# {cls.__module__}.{cls.__qualname__} as stored (sampled):"]
        lines += [f"#     {a}: {t}" for a, t in classes[cls].items()] or ["#     (no attributes)"]
    return "\n".join(lines).rstrip() + "\n"


# --- checking stored data against declared annotations ----------------------------------


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
    stored = _attributes(obj)
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
        ctx = _Context(programs=set(program_roots))
        out.append(Mismatch(path, _hint_text(hint), _infer(value, ctx, 2)))
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
            for k, v in _sample(value.items()):
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
            for v in _sample(value):
                _check(v, args[0], f"{path} member {v!r}", out, depth - 1, namespace)
    return True

