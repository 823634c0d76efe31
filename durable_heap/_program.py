"""Programs as code: read a program's source, compile it, and run it as a module.

A program is a Python file (``app.py``, module ``app``) or a package (a folder
``app/`` with ``__init__.py`` and submodules, module ``app`` and ``app.*``).
Its module name is stable -- the file stem or folder name -- because pickles
name classes by module path: objects of ``app.User`` stored by one version are
found again as ``app.User`` of the next.

The code that runs is always a `Source` held in memory (the version layer keeps
it in the heap), never whatever is on disk at that moment: a meta-path finder
serves the program's modules from it, and `linecache` is taught its lines so
tracebacks show the code that actually ran. This module knows nothing about
heaps or versions; `_versions` builds deploys and history on it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import os
import sys
import traceback
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._defaults import serve_defaults
from ._errors import DeployError, ProgramError, ProgramNotFoundError

__all__ = [
    "RENAMES_NAME",
    "STATE_DIR",
    "Compiled",
    "Source",
    "Swapped",
    "compile_source",
    "default_target",
    "install",
    "module_name",
    "read_source",
    "restore",
    "swap_out",
    "top_level_names",
    "where",
]

STATE_DIR = ".durable-heap"
#: The program-level name of the class rename table.
RENAMES_NAME = "__durable_renames__"


def module_name(program: str | os.PathLike[str]) -> str:
    """The stable module name of a program: its file stem, or its folder's name."""
    path = os.path.abspath(program)
    if os.path.basename(path) == "__init__.py":
        path = os.path.dirname(path)
    return os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]


def default_target(program: str | os.PathLike[str]) -> str:
    """Where a program's heap lives unless told: ``.durable-heap/<name>.fs`` beside it."""
    path = os.path.abspath(program)
    if os.path.basename(path) == "__init__.py":
        path = os.path.dirname(path)
    return os.path.join(os.path.dirname(path.rstrip(os.sep)), STATE_DIR, module_name(path) + ".fs")


@dataclass(frozen=True)
class Source:
    """A program's code: its module name, where it came from, and its files' text."""

    name: str
    origin: str  # absolute path of the file, or of the package folder
    files: dict[str, str]  # relative path -> text; a single file is {"<name>.py": text}
    is_package: bool

    @property
    def hash(self) -> str:
        """SHA-256 over the files' paths and texts: equal code, equal hash."""
        h = hashlib.sha256()
        for rel in sorted(self.files):
            h.update(rel.encode() + b"\0" + self.files[rel].encode("utf-8") + b"\0")
        return h.hexdigest()

    def filename(self, rel: str) -> str:
        """The absolute file name a relative path of this source stands for."""
        return os.path.join(self.origin, rel) if self.is_package else self.origin

    def module_of(self, rel: str) -> str:
        """The module name of a relative path (``sub/__init__.py`` -> ``name.sub``)."""
        if not self.is_package:
            return self.name
        parts = rel[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join([self.name, *parts])


def read_source(program: str | os.PathLike[str]) -> Source:
    """Read a program file or package folder from disk."""
    path = os.path.abspath(program)
    if os.path.basename(path) == "__init__.py":
        path = os.path.dirname(path)
    name = module_name(path)
    _check_name(name, path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "__init__.py")):
            raise ProgramError(
                f"{program} is a folder without __init__.py: a program is a .py file or a "
                "package folder"
            )
        files = {}
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d.isidentifier())
            for n in sorted(names):
                if n.endswith(".py"):
                    full = os.path.join(folder, n)
                    files[os.path.relpath(full, path).replace(os.sep, "/")] = _read(full, program)
        return Source(name, path, files, True)
    if not os.path.isfile(path):
        raise ProgramNotFoundError(f"there is no program file {os.fspath(program)!r}")
    return Source(name, path, {os.path.basename(path): _read(path, program)}, False)


def _read(path: str, program: Any) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgramError(f"cannot read {os.fspath(program)}: {exc}") from exc


def _check_name(name: str, path: str) -> None:
    if not name.isidentifier():
        raise ProgramError(
            f"{path}: the program name {name!r} is not a Python identifier; rename it "
            "(the name becomes the module name stored with its objects)"
        )
    existing = sys.modules.get(name)
    ours = existing is not None and getattr(existing, "__durable_source__", None) is not None
    clash = name in sys.stdlib_module_names or (
        existing is not None and not ours and getattr(existing, "__file__", None) != path
    )
    if clash:
        raise ProgramError(
            f"{path}: the program name {name!r} is also the name of an installed module; "
            "rename it (the name becomes the module name stored with its objects)"
        )


@dataclass(frozen=True)
class Compiled:
    """A `Source` compiled: code per module name, and its class rename table."""

    source: Source
    code: dict[str, tuple[types.CodeType, str, bool]]  # module -> (code, filename, is package)
    renames: dict[str, str]


def compile_source(source: Source, *, definitions_only: bool = False) -> Compiled:
    """Compile every file of `source`; a syntax error becomes a `DeployError`.

    With `definitions_only`, only imports, functions, classes and module-level
    assignments that do not use the heap (`_HEAP_NAMES`) are kept: enough to
    load stored objects (``Point = namedtuple(...)``, ``Color = Enum(...)``,
    aliases included) for a view of the past or for a script that never loaded
    the program, without running a top level against state it was not written for.
    """
    code: dict[str, tuple[types.CodeType, str, bool]] = {}
    renames: dict[str, str] = {}
    for rel, text in sorted(source.files.items()):
        filename = source.filename(rel)
        try:
            tree = ast.parse(text, filename)
            if definitions_only:
                tree.body = [node for node in tree.body if _is_definition(node)]
            compiled = compile(tree, filename, "exec", dont_inherit=True)  # not our __future__ imports
        except SyntaxError as exc:
            shown = os.path.basename(filename) if not source.is_package else f"{source.name}/{rel}"
            raise DeployError(f"{shown}, line {exc.lineno}: syntax error: {exc.msg}", exc) from exc
        renames.update(_renames(tree, filename))
        code[source.module_of(rel)] = (compiled, filename, rel.endswith("__init__.py"))
    return Compiled(source, code, renames)


#: Names whose use marks an assignment as work on the heap, left out of definitions.
_HEAP_NAMES = frozenset({"state", "typed_state", "active_heap", "heap"})


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        return not any(
            (isinstance(n, ast.Name) and n.id in _HEAP_NAMES)
            or (isinstance(n, ast.Attribute) and n.attr in _HEAP_NAMES)
            for n in ast.walk(node.value)
        )
    return False


def _renames(tree: ast.Module, filename: str) -> dict[str, str]:
    """The literal ``__durable_renames__ = {...}`` of a module, read before it runs.

    Read from the syntax tree so that objects of renamed classes that the top
    level itself touches already load as the new classes.
    """
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == RENAMES_NAME for t in node.targets
        ):
            try:
                table = ast.literal_eval(node.value)
            except ValueError:
                table = None
            ok = isinstance(table, dict) and all(
                isinstance(k, str) and isinstance(v, str) and "." in k and "." in v
                for k, v in table.items()
            )
            if not ok:
                raise DeployError(
                    f"{filename}, line {node.lineno}: {RENAMES_NAME} must be a literal dict of "
                    "'module.OldClass': 'module.NewClass' strings"
                )
            return dict(table)  # type: ignore[arg-type]
    return {}


def top_level_names(compiled: Compiled) -> dict[str, set[str]]:
    """Per module of `compiled`, the names its top level binds (classes, functions,
    imports, assignments), read from its syntax: what it defines once it has run,
    whether or not it ran to the end."""
    names: dict[str, set[str]] = {}
    for rel, text in compiled.source.files.items():
        found: set[str] = set()
        try:
            tree = ast.parse(text)
        except SyntaxError:  # compile_source reported it already
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update((a.asname or a.name).partition(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        names[compiled.source.module_of(rel)] = found
    return names


class _StoredFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a program's modules from its compiled source, ahead of the disk."""

    def __init__(self, compiled: Compiled) -> None:
        self.compiled = compiled

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self.compiled.code.get(fullname)
        if entry is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=entry[1], is_package=entry[2])
        if spec is not None:
            spec.has_location = True
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        code, filename, _ = self.compiled.code[module.__name__]
        module.__file__ = filename
        module.__durable_source__ = self.compiled.source.hash  # type: ignore[attr-defined]
        exec(code, module.__dict__)  # noqa: S102 - running the user's program is the point


@dataclass
class Swapped:
    """What `swap_out` took away: a program's modules, finder and source lines."""

    modules: dict[str, types.ModuleType]
    finders: list[Any]
    lines: dict[str, Any]


def swap_out(name: str) -> Swapped:
    """Take a program's modules (``name`` and ``name.*``) and its finder away.

    Until `install` puts new ones in place, the program's classes cannot be
    found at all (ZODB then makes broken objects), rather than be imported again
    from the old source by another thread.
    """
    prefix = name + "."
    taken = {k: m for k, m in list(sys.modules.items()) if k == name or k.startswith(prefix)}
    for k in taken:
        del sys.modules[k]
    finders = [f for f in sys.meta_path if isinstance(f, _StoredFinder) and f.compiled.source.name == name]
    sys.meta_path[:] = [f for f in sys.meta_path if f not in finders]
    lines = {}
    for finder in finders:
        for _, filename, _ in finder.compiled.code.values():
            if filename in linecache.cache:
                lines[filename] = linecache.cache[filename]
    return Swapped(taken, finders, lines)


def restore(name: str, swapped: Swapped) -> None:
    """Put back what `swap_out` took, dropping what was loaded since."""
    dropped = swap_out(name)
    for filename in dropped.lines:
        linecache.cache.pop(filename, None)
    sys.modules.update(swapped.modules)
    sys.meta_path[:0] = swapped.finders
    linecache.cache.update(swapped.lines)


def install(compiled: Compiled, *, path_first: bool = True) -> types.ModuleType:
    """Import the program from `compiled`: its top level runs now, in the caller's transaction.

    The caller has taken the previous modules out with `swap_out` (and puts them
    back with `restore` if this raises). The program's folder joins ``sys.path``
    so that its neighbours import: first (as when the program runs as a script),
    or with ``path_first=False`` last, behind the importing process's own.
    """
    source = compiled.source
    for rel, text in source.files.items():
        filename = source.filename(rel)
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    finder = _StoredFinder(compiled)
    sys.meta_path.insert(0, finder)
    folder = os.path.dirname(source.origin)
    if folder not in sys.path:
        if path_first:
            sys.path.insert(0, folder)
        else:
            sys.path.append(folder)
    importlib.invalidate_caches()
    # Built here rather than by import_module, which would hand back whatever
    # module of that name is in sys.modules at the moment.
    spec = finder.find_spec(source.name, None)
    assert spec is not None
    top = importlib.util.module_from_spec(spec)
    sys.modules[source.name] = top
    finder.exec_module(top)
    for loaded in [m for k, m in list(sys.modules.items()) if k in compiled.code]:
        serve_defaults(loaded)
    return top


def where(exc: BaseException, filenames: Iterable[str]) -> str:
    """``Type: message (file, line N)``, at the program's own innermost line."""
    names = set(filenames)
    at = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in names:
            at = (frame.filename, frame.lineno)
    msg = f"{type(exc).__name__}: {exc}"
    if at is None:
        return msg
    return f"{msg} ({os.path.basename(at[0])}, line {at[1]})"
