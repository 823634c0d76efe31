"""Stubs inferred from what is stored: ``durable-heap types`` writes a typed `State`.

`infer_stub` writes a Python stub -- ``class State(durable_heap.State)`` with
one annotated attribute per stored name -- from a bounded sample of the stored
data merged with the names the program's source assigns. The sampling helpers
(`sample`, `attributes`, `infer`) also serve `_types.check_declared`.

Sampling bounds the cost: `SAMPLE` entries of each container (the first and
the last ones), `DEPTH` levels, so a 10M-entry Dict costs what 50 entries do.
"""

from __future__ import annotations

import ast
import enum
import keyword
import os
import re
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from persistent import Persistent
from ZODB.broken import Broken

from ._containers import Dict, List, Set
from ._kinds import is_atomic
from ._state import Object, State

__all__ = ["DEPTH", "GENERATED_MARK", "SAMPLE", "Context", "attributes", "infer", "infer_stub", "sample"]

#: First line of every generated stub: `--write` overwrites only files that start so.
GENERATED_MARK = "# durable-heap: generated stub"
SAMPLE = 50
DEPTH = 6


@dataclass
class Context:
    programs: set[str]
    imports: set[str] = field(default_factory=set)
    program_imports: set[tuple[str, str]] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    uses_any: bool = False
    # class -> sampled instances, in the order found
    instances: dict[type, list[Any]] = field(default_factory=dict)


def sample(values: Iterable[Any], n: int = SAMPLE) -> list[Any]:
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


def _class_name(tp: type, ctx: Context) -> str:
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


def infer(value: Any, ctx: Context, depth: int) -> str:
    """The type of `value` as annotation text, reading at most a sample of it."""
    if value is None:
        return "None"
    if depth <= 0:
        ctx.uses_any = True
        return "Any"
    tp = type(value)
    if isinstance(value, (Dict, dict)):
        items = sample(value.items())
        if not items:
            ctx.uses_any = True
            return "dict[Any, Any]"
        keys = _union(infer(k, ctx, depth - 1) for k, _ in items)
        vals = _union(infer(v, ctx, depth - 1) for _, v in items)
        return f"dict[{keys}, {vals}]"
    if isinstance(value, (List, list)):
        return _container("list", _list_sample(value), ctx, depth)
    if isinstance(value, (Set, set)):
        return _container("set", sample(value), ctx, depth)
    if isinstance(value, frozenset):
        return _container("frozenset", sample(value), ctx, depth)
    if tp is tuple:
        if 0 < len(value) <= 6:
            return f"tuple[{', '.join(infer(v, ctx, depth - 1) for v in value)}]"
        return _container("tuple", sample(value), ctx, depth, suffix=", ...")
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


def _container(kind: str, items: list[Any], ctx: Context, depth: int, suffix: str = "") -> str:
    if not items:
        ctx.uses_any = True
        return f"{kind}[Any{suffix}]"
    return f"{kind}[{_union(infer(v, ctx, depth - 1) for v in items)}{suffix}]"


def attributes(obj: Any) -> dict[str, Any]:
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
    ctx = Context(programs={program})
    names: dict[str, str] = {}
    for name, value in sorted(attributes(root).items()):
        names[name] = infer(value, ctx, DEPTH)
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
                for attr, value in attributes(obj).items():
                    attrs.setdefault(attr, set()).add(infer(value, ctx, DEPTH - 1))
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


def _render(names: dict[str, str], classes: dict[type, dict[str, str]], ctx: Context, origin: str) -> str:
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
