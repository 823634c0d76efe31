"""The allowlist: which globals (classes and callables) a stored record may name.

A ZODB record is a pickle, and unpickling imports and calls the globals it
names: a record whose ``__reduce__`` names ``os.system`` runs a command the
moment it is loaded, read-only or not. So every global a record names goes
through `Allowlist.check` before it is imported, wherever records are
unpickled: in the heap's class factory (`Heap._find_class`; `Connection` adds
the record's oid to a refusal), and in conflict resolution inside the storage
(`guard_conflicts`: in this process for FileStorage, in the server under ZEO).
Nothing else unpickles records: the stub inference of `_types` reads objects
through the heap's connections, and the legacy class scan of `_values` reads
opcodes (`record_globals`), like the checks here.

A global is allowed when it is

1. one of `DEFAULT_ALLOWED`: exact names, never whole modules (everything in
   ZODB would admit ``ZODB.FileStorage.FileStorage``, which a reduce could call
   with ``create=True`` to empty a file): the persistent classes of
   durable_heap, persistent and BTrees that records use, a short list of
   plain-data types and value-only functions of the standard library, and
   copyreg's reconstructors;
2. matched by the user's patterns (``allow=["pkg.module.Class", "pkg.*"]``;
   ``pkg.*`` admits the classes and functions *defined* in ``pkg`` and its
   submodules, for your own trusted data modules);
3. a class defined by a deployed program (the version layer's modules);
4. a class or function the heap's class registry recorded when an object of it
   was stored through durable_heap's API, outside the standard library and
   ZODB's family (so no registry entry can admit ``os.system`` or a storage).
   A ZEO server reads the registry from its records (`StoredRegistry`).

Whatever is in `NEVER` (``builtins.eval``, ``os.*``, ``subprocess.*``, ...)
is refused even when a pattern or the registry names it.

What this protects: a crafted *record* (a record written with raw ZODB, by
another tool or a less careful peer) cannot run code by being loaded. It does
not make a crafted *heap* safe: a heap holds its programs' source, which runs
when they load, and the registry is a record of the heap too; heap files and
ZEO peers must still be trusted.
"""

from __future__ import annotations

import builtins
import copyreg
import functools
import io
import logging
import os
import pickle
import pickletools
import re
import sys
import types
from collections.abc import Callable, Collection, Iterable
from itertools import chain
from typing import Any

import ZODB
import ZODB.Connection
from ZODB._compat import PersistentPickler, PersistentUnpickler
from ZODB.ConflictResolution import BadClassName as _BadClassName
from ZODB.ConflictResolution import PersistentReference as _PersistentReference
from ZODB.ConflictResolution import PersistentReferenceFactory as _References
from ZODB.ConflictResolution import _unresolvable
from ZODB.ConflictResolution import find_global as _zodb_find_global
from ZODB.ConflictResolution import persistent_id as _zodb_persistent_id
from ZODB.ConflictResolution import tryToResolveConflict as _zodb_resolve  # noqa: N813 - ZODB's name
from ZODB.POSException import ConflictError

from ._errors import ClassNotAllowedError
from ._fastpickle import PLAIN_ATOMS as _PLAIN_ATOMS
from ._fastpickle import BufferedObjectReader, speed_up
from ._format import INLINE_CLASSES, STORED_CLASSES
from ._zones import ZONE_CLASS
from ._zones import ensure as ensure_zones

__all__ = [
    "DB",
    "DEFAULT_ALLOWED",
    "ENV_ALLOW",
    "LIBRARY_ROOTS",
    "NEVER",
    "Allowlist",
    "StoredRegistry",
    "Connection",
    "defined_classes",
    "env_patterns",
    "guard_conflicts",
    "record_globals",
    "refused",
    "resolution_globals",
    "registrable",
]

#: Environment variable with more patterns (comma or space separated), read by
#: `durable_heap.open` and ``durable-heap zeo``; added to ``allow=``/``--allow``.
ENV_ALLOW = "DURABLE_HEAP_ALLOW"

_SAFE_BUILTINS = (
    # types
    "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
    "object", "range", "set", "slice", "str", "tuple", "Ellipsis", "NotImplemented",
    # functions of values only, storable by name (``state.key = len``); never eval, exec,
    # compile, open, getattr/setattr, __import__, globals/vars, input or breakpoint
    "abs", "all", "any", "bin", "callable", "chr", "divmod", "hash", "hex", "isinstance",
    "issubclass", "len", "max", "min", "oct", "ord", "repr", "round", "sorted", "sum",
)

#: The BTrees package's families (key and value types: O object, I/L int 32/64 bits,
#: U/Q unsigned, F float): module ``BTrees.<fam>BTree``.
_BTREE_FAMILIES = ("OO", "IO", "OI", "II", "IF", "LO", "OL", "LL", "LF", "UU", "UO", "OU", "UI",
                   "IU", "UF", "QQ", "QO", "OQ", "QF")

#: Globals every heap may load: exact names, each a class (or a reconstructor
#: that only calls the classes it is given, which are checked themselves).
DEFAULT_ALLOWED: frozenset[str] = frozenset(
    {
        # durable_heap's stored classes: the one list is the stored format's
        *STORED_CLASSES,
        *INLINE_CLASSES,
        # ZODB's root, and the persistent containers of raw ZODB code
        "persistent.mapping.PersistentMapping",
        "persistent.list.PersistentList",
        # Every BTrees family and kind: our containers, registry and versions use
        # five families' trees and buckets, and users store any of them in state
        # (an OOTreeSet, an IIBTree...): refused here, a value that was accepted and
        # committed could not be read back. Their state is plain keys and values,
        # set by C code that calls nothing of the record's.
        *(f"BTrees.{fam}BTree.{fam}{kind}" for fam in _BTREE_FAMILIES
          for kind in ("BTree", "Bucket", "TreeSet", "Set")),
        "BTrees.Length.Length",
        # plain data of the standard library
        "collections.Counter",
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.deque",
        "datetime.date",
        "datetime.datetime",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        ZONE_CLASS,  # a zoned datetime's zone, stored by its key (see `_zones`)
        "decimal.Decimal",
        "fractions.Fraction",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "pathlib.WindowsPath",
        "types.SimpleNamespace",
        "uuid.SafeUUID",
        "uuid.UUID",
        *(f"builtins.{name}" for name in _SAFE_BUILTINS),
        # module-level data of programs, kept with their versions' durable globals
        # since 0.2: ``from __future__ import annotations``, a compiled pattern, a
        # logger (each rebuilt by name: a function of plain values only)
        "__future__._Feature",
        "re._compile",
        "re.RegexFlag",
        "logging.getLogger",
        # what pickle itself emits for plain objects (protocols 0-2 and __reduce__s
        # that use them): they create an instance of a class that is checked too
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
    }
)

#: durable_heap and the ZODB family: only their exact `DEFAULT_ALLOWED` names load
#: (their modules hold storages, servers and functions that write files).
LIBRARY_ROOTS: frozenset[str] = frozenset({
    "durable_heap", "ZODB", "ZEO", "BTrees", "persistent", "transaction", "zodbpickle",
    "zope", "zc", "zodburi", "relstorage",
})

#: Modules (and their submodules) whose globals are never loaded, whatever a
#: pattern, the registry or an exact ``allow=`` name says (the safe builtins and
#: the other `DEFAULT_ALLOWED` names excepted): they run code or processes, import,
#: unpickle, open files or connections, or are storages.
NEVER: frozenset[str] = LIBRARY_ROOTS | frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess",
    "_posixsubprocess", "sys", "importlib", "pickle", "_pickle", "pickletools", "marshal",
    "shutil", "socket", "_socket", "ssl", "ctypes", "_ctypes", "code", "codeop", "runpy",
    "pty", "multiprocessing", "_multiprocessing", "signal", "_signal", "tempfile",
    "webbrowser", "pdb", "bdb", "io", "_io", "codecs", "_codecs", "operator", "_operator",
    "functools", "_functools", "copyreg", "copy", "types", "inspect", "gc", "threading",
    "_thread", "asyncio", "concurrent", "select", "selectors", "mmap", "fcntl", "resource",
    "platform", "getpass", "glob", "zipfile", "tarfile", "gzip", "bz2", "lzma", "zipimport",
    "pkgutil", "site", "sysconfig", "logging", "sqlite3", "dbm", "shelve", "http.server",
    "urllib", "ftplib", "smtplib", "imaplib", "poplib", "xmlrpc", "socketserver", "cProfile",
    "profile", "trace", "timeit", "doctest", "unittest", "venv", "ensurepip", "setuptools",
    "pip", "distutils", "atexit", "fileinput", "wave", "aifc", "sunau", "telnetlib",
})

#: The safe builtins by identity: a module may re-export ``int`` and stay loadable.
_SAFE_BUILTIN_OBJECTS: dict[int, Any] = {
    id(getattr(builtins, n)): getattr(builtins, n) for n in _SAFE_BUILTINS
}

#: Types whose pickles name no global at all.
_NO_GLOBALS = frozenset({type(None), bool, int, float, str, bytes})

_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
_MISS: Any = object()


def registrable(module: str) -> bool:
    """Whether the class registry may admit globals of `module`: not the standard
    library's, not durable_heap's or the ZODB family's (only exact names load there)."""
    root = module.partition(".")[0]
    if not root:
        return False  # no module (a bound builtin): nothing a record could name
    found = _REGISTRABLE.get(root)
    if found is None:
        found = _REGISTRABLE[root] = not (root in sys.stdlib_module_names or _in_never(root))
    return found


_REGISTRABLE: dict[str, bool] = {}


def env_patterns() -> list[str]:
    """The patterns in ``$DURABLE_HEAP_ALLOW`` (comma or space separated)."""
    return [p for p in re.split(r"[\s,]+", os.environ.get(ENV_ALLOW, "")) if p]


def defined_classes(module: types.ModuleType) -> list[str]:
    """The exact names of the classes `module` defines itself (not those it imports)."""
    here = module.__name__
    return sorted(
        f"{here}.{name}" for name, obj in vars(module).items()
        if isinstance(obj, type) and _defined_in(obj, here, name) and not _never(here, name)
    )


def _defined_in(obj: Any, module: str, name: str, *, package: str | None = None) -> bool:
    """True when `obj` is a class or function that `module` itself defines as `name`
    (under `package` when given), not one it imported from elsewhere."""
    if not isinstance(obj, (type, types.FunctionType)):
        return False
    home = getattr(obj, "__module__", None) or ""
    if name not in (getattr(obj, "__name__", None), getattr(obj, "__qualname__", None)):
        return False
    if package is not None:
        return home == package or home.startswith(package + ".")
    return home == module


def _in_never(module: str) -> bool:
    """True when `module` or a package above it is in `NEVER`."""
    while module:
        if module in NEVER:
            return True
        module = module.rpartition(".")[0]
    return False


def _never(module: str, name: str, obj: Any = _MISS) -> bool:
    """True for names (and objects) that are never allowed: `NEVER`'s modules."""
    if _in_never(module) and f"{module}.{name}" not in DEFAULT_ALLOWED:
        return True
    if obj is _MISS or id(obj) in _SAFE_BUILTIN_OBJECTS:
        return False
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str):
        return False  # a bound builtin such as random.random: named exactly by the user
    path = f"{home}.{getattr(obj, '__qualname__', '')}"
    return _in_never(home) and path not in DEFAULT_ALLOWED


def refused(name: str, oid: bytes | None = None) -> ClassNotAllowedError:
    """The error for a record that names `name` outside the allowlist."""
    where = f"record 0x{oid.hex().lstrip('0') or '0'}" if oid is not None else "a record"
    module, _, attr = name.rpartition(".")
    if _never(module, attr):
        how = (
            f"{name} can never be allowed (loading it could run code or touch files): the "
            "record was probably crafted. Restore it from a backup, or remove it (see "
            "'A crafted record' in docs/operations.md)"
        )
    else:
        how = (
            f"If the record is yours and you trust it, allow the class: "
            f"durable_heap.open(target, allow=[{name!r}]), `--allow {name}` on the command "
            f"line, or {ENV_ALLOW}={name} (allow=['pkg.*'] admits your own module pkg); "
            "otherwise restore the record from a backup"
        )
    return ClassNotAllowedError(
        f"{where} names {name}, which is not on the allowlist of classes a record may "
        f"load, so nothing of it was loaded (loading it could run code). {how}.",
        name=name,
        oid=oid,
    )


class Allowlist:
    """The globals one heap (or one ZEO server) lets its records name; see the module doc.

    `programs` is the live set of the deployed programs' module roots, and
    `registered(conn, path)` answers from the heap's class registry; a server
    has no programs, and reads the registry from its storage
    (`read_registry_from`). Allowed answers are cached: the hot path of a load
    is one dict lookup.
    """

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        programs: Collection[str] = (),
        registered: Callable[[Any, str], bool] | None = None,
    ) -> None:
        if isinstance(allow, str):
            allow = [allow]  # allow="pkg.*" means one pattern, not its letters
        self.patterns = tuple(dict.fromkeys(allow))
        self._exact: set[str] = set()
        self._packages: list[str] = []
        for pattern in self.patterns:
            self._add(pattern)
        self._programs = programs
        self._registered = registered
        #: (module, name) pairs known to be allowed: the class factory's fast path
        #: is ``pair in allowed`` (only grows: the registry never forgets a class).
        self.allowed: set[tuple[str, str]] = {
            (n.rpartition(".")[0], n.rpartition(".")[2]) for n in DEFAULT_ALLOWED
        }
        # A program's classes, with the module they were found in: allowed while that
        # module is the loaded one (a deploy replaces it).
        self._program_classes: dict[tuple[str, str], Any] = {}

    def _add(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not (
            _NAME.match(pattern.removesuffix(".*")) and "." in pattern
        ):
            raise ClassNotAllowedError(
                f"allow pattern {pattern!r} is not a dotted name: give a class as "
                "'pkg.module.Class', or 'pkg.*' for the classes of your own module pkg",
                name=str(pattern),
            )
        if pattern.endswith(".*"):
            package = pattern[:-2]
            if not registrable(package):
                raise ClassNotAllowedError(
                    f"allow pattern {pattern!r} names a module of the standard library, "
                    "durable_heap or ZODB, whose globals include functions that run code or "
                    "write files: name the exact classes instead (such as 'collections.ChainMap')",
                    name=pattern,
                )
            self._packages.append(package)
            return
        module, _, name = pattern.rpartition(".")
        if _never(module, name):
            raise ClassNotAllowedError(
                f"{pattern} can never be allowed: loading it could run code or touch files "
                f"(durable_heap refuses the globals of {module.partition('.')[0]} in records)",
                name=pattern,
            )
        self._exact.add(pattern)

    def __repr__(self) -> str:
        return f"<durable_heap allowlist: defaults + {list(self.patterns)!r}>"

    def read_registry_from(self, storage: Any) -> None:
        """For a ZEO server, which has no connection: answer the registry question
        from `storage`'s records (`StoredRegistry`)."""
        reader = StoredRegistry(storage)
        self._registered = lambda _conn, path: reader(path)

    def check(self, conn: Any, module: str, name: str) -> None:
        """Return if a record may name ``module.name``; raise `ClassNotAllowedError` if not.

        `conn` (or None) is the connection loading the record, for the registry.
        Only allowed modules are imported, never one that is refused.
        """
        key = (module, name)
        if key in self.allowed:
            return
        found = self._program_classes.get(key, _MISS)
        if found is not _MISS and sys.modules.get(module) is found:
            return
        path = f"{module}.{name}"
        token = self._decide(conn, module, name, path)
        if token is _MISS:
            raise refused(path)
        if token is None:
            self.allowed.add(key)
        else:
            self._program_classes[key] = token

    def allows(self, conn: Any, module: str, name: str) -> bool:
        """`check` as a question."""
        try:
            self.check(conn, module, name)
        except ClassNotAllowedError:
            return False
        return True

    def loads_again(self, conn: Any, value: Any) -> bool:
        """Whether `value`, once stored, would load again: each global its pickle names
        is allowed, or is a class of a user's module, which storing registers."""
        if type(value) in _NO_GLOBALS:
            return True
        # -- PROTECTED: ZODB._compat.PersistentPickler (ZODB 6.4) --
        # ZODB's own pickler class (zodbpickle's, protocol 3), which ZODB does not
        # export elsewhere: the names it writes are those a stored record holds.
        # Pinned by tests/test_zodb_internals.py.
        from ZODB._compat import PersistentPickler
        # -- end PROTECTED --

        buf = io.BytesIO()
        try:
            # ZODB's own pickler (its names differ from pickle's for nested classes);
            # persistent objects are references, checked when they load themselves.
            PersistentPickler(_as_reference, buf, 3).dump(value)
            names = record_globals(buf.getvalue())
        except Exception:  # noqa: BLE001 - not ours to judge: storing it reports it
            return True
        for path in names:
            module, _, name = path.rpartition(".")
            if path == "?" or not (registrable(module) or self.allows(conn, module, name)):
                return False
        return True

    def _decide(self, conn: Any, module: str, name: str, path: str) -> Any:
        """None (allowed), a program module (allowed while loaded), or _MISS (refused)."""
        if _never(module, name):
            return _MISS
        if path in self._exact:
            if path == ZONE_CLASS:
                ensure_zones()  # a loaded zone pickles again by key (a merge, a copy)
            return None if self._resolves_safely(module, name, None) else _MISS
        for package in self._packages:
            if module == package or module.startswith(package + "."):
                return None if self._resolves_safely(module, name, package) else _MISS
        root = module.partition(".")[0]
        if root in self._programs:
            # A program's modules come from the heap's stored source (trusted like
            # the heap): the classes it defines itself, not what it imported (nor its
            # functions, unless stored by name: then the registry lists them).
            found = self._lookup(module, name)
            if found is None or (isinstance(found, type) and _defined_in(found, module, name, package=root)):
                return sys.modules.get(module)
        if self._registered is not None and registrable(module):
            try:
                listed = self._registered(conn, path)
            except ClassNotAllowedError:
                raise
            except Exception:  # noqa: BLE001 - an unreadable registry admits nothing
                listed = False
            if listed and self._resolves_safely(module, name, module):
                return None
        return _MISS

    @staticmethod
    def _lookup(module: str, name: str) -> Any:
        """The object ``module.name`` (importing an allowed module), None if it is
        missing (ZODB then makes a broken class: harmless), _MISS if unsafe to ask."""
        import importlib

        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = importlib.import_module(module)
            except Exception:  # noqa: BLE001 - not importable: ZODB makes it a broken class
                return None
        return getattr(mod, name, None)

    def _resolves_safely(self, module: str, name: str, package: str | None) -> bool:
        """The object exists nowhere (broken), or is allowed by what it is: by a pattern
        or the registry only a class or function defined there; never one of `NEVER`."""
        found = self._lookup(module, name)
        if found is None:
            return True
        if _never(module, name, found):
            return False
        return package is None or _defined_in(found, module, name, package=package)


def _as_reference(obj: Any) -> Any:
    """`loads_again`'s persistent_id: a persistent object is a reference, named by id."""
    return id(obj) if getattr(obj, "_p_jar", _MISS) is not _MISS and not isinstance(obj, type) else None


# --- records as opcodes: what conflict resolution would unpickle -------------------------

_GLOBAL_OPS = frozenset({"GLOBAL", "INST"})
#: A ZODB record is two pickles, its class and its state; what may follow them (the
#: checksum seal of `durable_heap._integrity`) is not pickle data, and unpicklers stop
#: before it.
_RECORD_PICKLES = range(2)
_UNCHECKABLE_OPS = frozenset({"STACK_GLOBAL", "EXT1", "EXT2", "EXT4"})


def record_globals(data: bytes) -> list[str]:
    """Every global the pickles in `data` (a ZODB record: class, then state) name.

    Read from the opcodes with `pickletools`, so nothing is imported or called.
    Globals that only the running unpickler could name (protocol 4's
    STACK_GLOBAL, copyreg's extension codes; ZODB writes protocol 3, which
    never uses them) are reported as ``"?"``: the caller refuses them.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in _RECORD_PICKLES:
        if stream.tell() >= len(data):
            break
        for op, arg, _ in pickletools.genops(stream):
            if op.name in _GLOBAL_OPS:
                found.append(str(arg).replace(" ", "."))
            elif op.name in _UNCHECKABLE_OPS:
                found.append("?")
    return found


_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


@functools.lru_cache(maxsize=512)
def _resolution_globals_seen(data: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`resolution_globals`, remembered: the merges of concurrent commits to one record
    read the same old and committed records again and again (the result depends on
    the bytes alone)."""
    used, referenced = resolution_globals(data)
    return tuple(used), tuple(referenced)


#: Opcode bytes the opcode scan reports as "?" (copyreg's extension codes, protocol 4
#: and 5): a record that holds one of these bytes anywhere takes the scan.
_NOT_PROTOCOL_3 = re.compile(rb"[\x82-\x84\x8c-\x98]")


class _Inert:
    """What `_named_globals` unpickles every global as: it accepts everything, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _Naming(pickle.Unpickler):
    """An unpickler that imports and calls nothing: each global it meets is recorded
    and stands in as `_Inert` (Python's "restricting globals" hook, ``find_class``)."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.named: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle protocol
        self.named.add((module, name))
        return _Inert

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle protocol
        return _Inert()


def _named_globals(data: bytes) -> set[tuple[str, str]] | None:
    """Every global a protocol-3 record names, read at C speed; None to take the scan.

    The fast path of `_GuardedResolver.check_record`: when every global a record
    names passes the allowlist as a used class, the opcode scan
    (`resolution_globals`), which sorts them into used and only-referenced ones,
    cannot refuse it. None when the record holds an opcode byte of copyreg's
    extensions or of protocol 4 (the scan's "?"), or cannot be read this way.
    """
    if _NOT_PROTOCOL_3.search(data):
        return None
    reader = _Naming(io.BytesIO(data))
    try:
        for _ in _RECORD_PICKLES:
            reader.load()
    except Exception:  # noqa: BLE001 - anything unusual takes the scan
        return None
    return reader.named


def resolution_globals(data: bytes) -> tuple[list[str], list[str]]:
    """The globals of a record split by use: (used, referenced).

    *referenced* are those only ever used as the class of a persistent
    reference (ZODB writes ``oid, GLOBAL cls, TUPLE2, BINPERSID``, and fetches
    the class from the memo for the next reference): conflict resolution wraps
    such a class in a ``PersistentReference`` and never calls it or makes an
    instance. Every other use (called by REDUCE, made by NEWOBJ, the record's
    own class, kept in a container) is *used*. Read from the opcodes, with a
    one-slot stack model (the top item, and the memo slots that hold a class or
    a reference tuple): anything it cannot follow counts as used, and opcodes of
    protocol 4 or copyreg's extension codes give ``"?"``.
    """
    used: list[str] = []
    referenced: list[str] = []
    memo: dict[Any, tuple[str, str]] = {}  # one unpickler reads both pickles: one memo
    stream = io.BytesIO(data)
    for _ in _RECORD_PICKLES:
        if stream.tell() >= len(data):
            break
        top: tuple[str, str] | None = None  # ("class" | "ref", name) on top of the stack
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if op.proto > 3 or name in _UNCHECKABLE_OPS:
                used.append("?")
                continue
            if name in _PUTS:  # copies the top into the memo, leaves it on the stack
                if top is None:
                    memo.pop(arg, None)
                else:
                    memo[arg] = top
                continue
            if top is not None:
                kind, cls = top
                if kind == "class" and name == "TUPLE2":
                    top = ("ref", cls)
                    continue
                if kind == "ref" and name == "BINPERSID":
                    referenced.append(cls)
                    top = None
                    continue
                used.append(cls)  # any other use of a class we follow
                top = None
            if name == "GLOBAL":
                top = ("class", str(arg).replace(" ", "."))
            elif name == "INST":
                used.append(str(arg).replace(" ", "."))
            elif name in _GETS:
                top = memo.get(arg)
    return used, referenced


# --- the class registry, read by a server from raw records ---------------------------------

#: The root mapping's key of the class registry (`durable_heap._values.CLASSES_KEY`).
_CLASSES_KEY = "durable_heap.classes"
_MAX_REGISTRY_RECORDS = 10_000


class StoredRegistry:
    """The heap's class registry (an OOBTree of class paths in the root mapping), read
    from the storage's raw records: what a ZEO server's conflict resolution consults.

    The records are unpickled with every global replaced by its dotted name (a
    string: nothing is imported, and a crafted REDUCE of one fails), and
    persistent references kept as they are; the paths are the strings found in
    the tree's records. Read again when a path is not found (the registry grows).
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.paths: frozenset[str] = frozenset()

    def __call__(self, path: str) -> bool:
        if path not in self.paths:
            try:
                self.paths = self._read()
            except Exception:  # noqa: BLE001 - unreadable: the registry admits nothing
                return False
        return path in self.paths

    def _load(self, oid: bytes) -> Any:
        # -- PROTECTED: ZODB._compat.PersistentUnpickler (ZODB 6.4) --
        # ZODB's unpickler with a find_global and a persistent_load of ours, so
        # the registry is read without importing anything. Pinned by
        # tests/test_zodb_internals.py.
        from ZODB._compat import PersistentUnpickler
        from ZODB.utils import z64

        # -- end PROTECTED --

        data, _ = self.storage.load(oid or z64)
        unpickler = PersistentUnpickler(lambda module, name: f"{module}.{name}", lambda ref: ref,
                                        io.BytesIO(data))
        unpickler.load()  # the record's class
        return unpickler.load()

    def _read(self) -> frozenset[str]:
        root = self._load(b"")
        data = root.get("data") if isinstance(root, dict) else None
        ref = data.get(_CLASSES_KEY) if isinstance(data, dict) else None
        found: set[str] = set()
        todo: list[Any] = [ref]
        seen: set[bytes] = set()
        while todo and len(seen) < _MAX_REGISTRY_RECORDS:
            item = todo.pop()
            if isinstance(item, str):
                found.add(item)
            elif isinstance(item, (tuple, list)):
                if len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], str):
                    oid = item[0]  # a persistent reference (oid, class path): a bucket
                    if oid not in seen:
                        seen.add(oid)
                        todo.append(self._load(oid))
                else:
                    todo.extend(item)
        return frozenset(found - {"BTrees.OOBTree.OOBucket", "BTrees.OOBTree.OOBTree"})


# --- conflict resolution inside the storage -----------------------------------------------

_log = logging.getLogger("durable_heap.allow")


#: Stored records whose globals a guard remembers (`_GuardedResolver._stored_ok`).
_NAMES_KEPT = 256


class _GuardedResolver:
    """A storage's ``tryToResolveConflict``, run only on records the allowlist admits.

    ZODB's conflict resolution (``ZODB.ConflictResolution.tryToResolveConflict``,
    ZODB 6.x) unpickles the new, old and committed states with its own
    ``find_global``, which imports anything, and it runs inside the storage: in
    this process for a FileStorage, in the server process under ZEO. We check
    the three records' opcodes first and, on a refusal, raise the ConflictError
    ZODB itself raises for records it cannot resolve: the client retries or
    reports a conflict, and the server logs which class it refused.
    """

    _dh_guarded = True

    def __init__(self, storage: Any, resolve: Callable[..., Any], allowlist: Allowlist) -> None:
        self.storage, self.resolve, self.allowlist = storage, resolve, allowlist
        # (oid, serial) -> the globals that stored record names, for records already
        # read here (see `_stored_ok`). Only called inside the storage's store, under
        # its lock; a dict's get and set are atomic besides.
        self._names: dict[tuple[bytes, bytes], frozenset[tuple[str, str]]] = {}
        #: Stored records' states unpickled by `_resolve_checked` (see `_States`).
        self._states = _States()

    def __call__(self, oid: bytes, committed_serial: bytes, old_serial: bytes, newpickle: bytes,
                 committed_data: bytes = b"") -> Any:
        if getattr(self.resolve, "__func__", None) is _zodb_resolve and not _EXTENSIONS:
            merged = _resolve_checked(self.storage, self.allowlist, oid, committed_serial, old_serial,
                                      newpickle, committed_data, self._states)
            if merged is not None:
                return self._noted(oid, merged)
        try:
            self._check(oid, committed_serial, old_serial, newpickle, committed_data)
        except Exception as exc:  # noqa: BLE001 - any doubt: leave the conflict unresolved
            from ZODB.POSException import ConflictError

            if isinstance(exc, ConflictError):
                raise
            what = str(exc) if isinstance(exc, ClassNotAllowedError) else f"{type(exc).__name__}: {exc}"
            _log.warning("conflict on record 0x%s not resolved: %s", oid.hex().lstrip("0") or "0", what)
            raise ConflictError(oid=oid, serials=(committed_serial, old_serial), data=newpickle) from None
        return self._noted(oid, self.resolve(oid, committed_serial, old_serial, newpickle, committed_data))

    def _noted(self, oid: bytes, merged: Any) -> Any:
        """`merged`, first handed to a storage that keeps the records it stores
        (`durable_heap._revisions`: ``store`` writes it, and cannot tell what it was)."""
        note = getattr(self.storage, "_dh_note_merge", None)
        if note is not None and type(merged) is bytes:
            note(oid, merged)
        return merged

    def _check(self, oid: bytes, committed_serial: bytes, old_serial: bytes, newpickle: bytes,
               committed_data: bytes) -> None:
        storage = self.storage
        # Records reach the resolver as stored (a wrapper such as a checksum or
        # compression layer transforms them); ZODB's resolver untransforms them with
        # this hook of ConflictResolvingStorage, and so do we.
        # -- PROTECTED: ConflictResolvingStorage._crs_untransform_record_data (ZODB 6.4) --
        # The hook ZODB's own resolver reads records through; without it (a storage
        # that does not resolve conflicts) the records are as stored. Pinned by
        # tests/test_damage.py and tests/test_zodb_internals.py.
        untransform = getattr(storage, "_crs_untransform_record_data", lambda data: data)
        # -- end PROTECTED --
        self.check_record(untransform(newpickle), oid)
        if committed_data:  # handed over with the call (a ZEO client's own merge): checked as given
            self.check_record(untransform(committed_data), oid)
        for serial in (old_serial,) if committed_data else (old_serial, committed_serial):
            if not self._stored_ok(oid, serial):
                named = self._checked(untransform(storage.loadSerial(oid, serial)), oid)
                if named is not None:
                    if len(self._names) >= _NAMES_KEPT:
                        self._names.clear()
                    self._names[oid, serial] = frozenset(named)

    def _stored_ok(self, oid: bytes, serial: bytes) -> bool:
        """Whether the stored record of `oid` at `serial`, read here before, names only
        globals the allowlist admits now.

        A stored record never changes (FileStorage writes each revision once; pack
        drops old revisions and never rewrites one; undo writes new revisions under
        new tids), so what it names is remembered: the concurrent commits to one
        bucket are merged against the same old and committed revisions again and
        again (issue 18: reading them was a fifth of a merge). The names are checked
        against the allowlist at every use: a deploy may replace a program's module.
        """
        named = self._names.get((oid, serial))
        return named is not None and all(self.allowlist.allows(None, m, n) for m, n in named)

    def check_record(self, record: bytes, oid: bytes | None = None) -> None:
        """Raise `ClassNotAllowedError` if conflict resolution may not unpickle `record`
        (as ZODB stored it, untransformed): for resolvers that hand records over one by
        one (RelStorage's, see `durable_heap._relstorage`)."""
        self._checked(record, oid)

    def _checked(self, record: bytes, oid: bytes | None) -> set[tuple[str, str]] | None:
        """`check_record`; the globals the record names when its fast path decided."""
        named = _named_globals(record)
        if named is not None and all(self.allowlist.allows(None, m, n) for m, n in named):
            return named  # every global passes as a used one: the scan cannot refuse it
        used, referenced = _resolution_globals_seen(record)
        for path in used:
            if path == "?":
                raise ClassNotAllowedError(
                    "its state names a global through opcodes the check cannot read "
                    "(protocol 4 or copyreg extensions), which ZODB never writes"
                )
            module, _, name = path.rpartition(".")
            try:
                self.allowlist.check(None, module, name)
            except ClassNotAllowedError as exc:
                raise refused(path, oid) from exc
        for path in referenced:
            # A reference's class is looked up (ZODB's find_global) but never
            # called: harmless if its module is loaded already, or cannot be
            # imported at all (a program's class on a server: ZODB's BadClass,
            # and the merge still works). A module that would be imported (its
            # top level run) for a record needs allowing.
            module, _, name = path.rpartition(".")
            if _never(module, name) or (module not in sys.modules and _importable(module)):
                if not self.allowlist.allows(None, module, name):
                    raise refused(path, oid)
        return None


# -- PROTECTED: ZODB.ConflictResolution internals (ZODB 6.4) --
# ``tryToResolveConflict`` (the function storages bind as their method),
# ``find_global``, ``state``'s way of reading a revision, ``PersistentReferenceFactory``,
# ``persistent_id``, ``_unresolvable``, and ``ZODB._compat``'s pickler and unpickler
# at protocol 3. `_resolve_checked` is ZODB's resolver step by step; pinned by
# tests/test_zodb_internals.py and proven byte for byte by tests/test_merge_path.py
# (imported at the top of this module).

_resolve_log = logging.getLogger("ZODB.ConflictResolution")
#: copyreg's registered extension codes (the dict itself: copyreg changes it in place).
_EXTENSIONS: dict[int, Any] = vars(copyreg)["_inverted_registry"]


class _Slot:
    """Stands for a `PersistentReference` (which cannot be hashed) in a state pickled by
    `_plain_pickle`'s table: compared by identity."""

    __slots__ = ()


class _Uncommon(Exception):
    """A reference whose data is not ``(oid, class)``: not for `_States` (see there)."""


class _States:
    """The states of stored records that merges unpickled, by the record's bytes; and the
    references all of them share.

    The merges of concurrent commits to one bucket unpickle the same stored revisions
    again and again (one commit's revision is the next merge's committed one, then
    later ones' old one). A state kept here is one that nothing can change: a tuple of
    plain atoms, tuples of them and references (`_plain_table`), which is what a
    Dict's bucket of plain values holds. Kept by the stored bytes, as the storage
    returns them (a kept revision comes back as the same object, its hash computed
    once): equal bytes, equal state. With it the globals the record named, checked
    against the allowlist again at every use (a deploy may drop a class).

    Trap: BTrees' C merge of buckets compares the three states' next-bucket
    references by identity (``PersistentReference`` does not hash, and ZODB's
    resolver gives equal references one object per merge, through one
    ``PersistentReferenceFactory``). So every state unpickled here, the new one too,
    takes its references from one factory that lives as long as the states kept: a
    reference met again is the same object, as within one merge in ZODB's resolver.
    Only references of the usual form ``(oid, class)``: the pickle of the merge then
    does not depend on which merge made a reference (the class is one object, and the
    pickler's memo would otherwise tell equal strings of references made by different
    merges from one string, as in the names of a class that cannot be imported); a
    merge meeting any other form is made without kept states.
    """

    KEPT = 64

    def __init__(self) -> None:
        self.references = _References()
        self.kept: dict[bytes, tuple[tuple[tuple[str, str], ...], Any]] = {}

    def get(self, data: bytes, check: Callable[[Any, str, str], None]) -> Any:
        """The state of stored `data` if kept, its globals checked again; else _MISS."""
        found = self.kept.get(data)
        if found is None:
            return _MISS
        names, state = found
        for module, name in names:
            check(None, module, name)  # ClassNotAllowedError: the full path decides
        return state

    def keep(self, data: bytes, names: list[tuple[str, str]], state: Any, references: Any) -> None:
        """Keep `state` (unpickled from stored `data` with `references`, naming `names`)
        if it cannot change and its references are the factory's of now."""
        if references is not self.references or _plain_table(state) is None:
            return
        if len(self.kept) >= self.KEPT:
            # Forget the states and the references together: a kept state's
            # references must be the factory's own.
            self.kept = {}
            self.references = _References()
            return
        self.kept[data] = (tuple(names), state)


def _resolve_checked(storage: Any, allowlist: Allowlist, oid: bytes, committed_serial: bytes,
                     old_serial: bytes, newpickle: bytes, committed_data: bytes,
                     states: _States | None = None) -> bytes | None:
    """ZODB's ``tryToResolveConflict``, with every global the three records name checked
    against `allowlist` as the unpickler meets it; None to leave the merge to the
    guarded full path (`_GuardedResolver._check`, then ZODB's own resolver).

    Issue 18: the full path read each record twice, once for the check (an opcode
    scan in Python whenever the record held a byte that may be a protocol-4 opcode:
    any int or text byte from 0x82 to 0x98, one record in three of a Dict of ints) and
    once for the merge, and re-pickled the merged state through ZODB's Python
    ``persistent_id``, called for every object (86 calls for a bucket of 40 entries).

    Why it is as strict as the check: ZODB's unpickler (zodbpickle's, protocol 3) looks
    up every global a record names through its ``find_class``, here the allowlist's
    check before ZODB's ``find_global`` (which imports), as a use; it does not read
    protocol 4's opcodes at all (STACK_GLOBAL fails). copyreg's extension codes, the
    one way a pickle names a global without that lookup (a code already in
    ``copyreg._extension_cache`` skips it), work only while an extension is
    registered: the caller then takes the full path, which refuses them. A global
    the allowlist refuses here (even one the full path admits, as the class of a
    reference only) leaves the merge to the full path, which decides and logs it.
    Everything else is ZODB's resolver as it is: the same unpickler, references,
    class, ``_p_resolveConflict``, pickler (byte for byte, `_plain_pickle`) and the
    same ConflictError when the class refuses the merge. The old and committed states
    may come from `states` (stored records unpickled before, or merged here: `_States`).
    """
    check = allowlist.check
    named: list[tuple[str, str]] = []

    def find_global(module: str, name: str) -> Any:
        check(None, module, name)  # ClassNotAllowedError: the full path decides
        named.append((module, name))
        return _zodb_find_global(module, name)

    def stored_state(data: bytes) -> Any:
        if states is None:
            return _state(untransform(data), find_global, persistent_load)
        state = states.get(data, check)
        if state is _MISS:
            start = len(named)
            state = _state(untransform(data), find_global, persistent_load)
            states.keep(data, named[start:], state, references)
        return state

    untransform: Any = getattr(storage, "_crs_untransform_record_data", None)
    transform: Any = getattr(storage, "_crs_transform_record_data", None)
    if untransform is None or transform is None:
        return None
    if states is None:
        references = _References()
        persistent_load = references.persistent_load
    else:
        references = states.references
        shared_load = references.persistent_load

        def persistent_load(ref: Any) -> Any:
            found = shared_load(ref)
            data = found.data
            if not (type(data) is tuple and len(data) == 2 and type(data[0]) is bytes
                    and isinstance(data[1], type)):
                raise _Uncommon
            return found

    try:
        new = untransform(newpickle)
        unpickler = PersistentUnpickler(find_global, persistent_load, io.BytesIO(new))
        meta = unpickler.load()
        if isinstance(meta, tuple):
            klass, newargs = meta[0], meta[1] or ()
            if isinstance(klass, tuple):
                klass = find_global(*klass)
        else:
            klass, newargs = meta, ()
        if klass in _unresolvable:
            return None
        resolve = getattr(klass.__new__(klass, *newargs), "_p_resolveConflict", None)
        if resolve is None:
            return None
        old_data = storage.loadSerial(oid, old_serial)
        if not committed_data:
            committed_data = storage.loadSerial(oid, committed_serial)
        newstate = unpickler.load()
        old, committed = stored_state(old_data), stored_state(committed_data)
    except _Uncommon:  # a reference kept states cannot share: this merge without them
        return _resolve_checked(storage, allowlist, oid, committed_serial, old_serial, newpickle,
                                committed_data)
    except Exception:  # noqa: BLE001 - a refusal, or anything unusual: the full path decides
        return None
    try:
        resolved = resolve(old, committed, newstate)
    except (ConflictError, _BadClassName) as exc:  # the class refused the merge: as ZODB reports it
        _resolve_log.debug("Conflict resolution on %s failed with %s: %s", klass, type(exc).__name__, exc)
        raise ConflictError(oid=oid, serials=(committed_serial, old_serial), data=new) from None
    except Exception:  # noqa: BLE001 - ZODB logs and refuses it: its own path does so
        return None
    try:
        merged: bytes = transform(_plain_pickle(meta, resolved))
    except Exception:  # noqa: BLE001 - ZODB's path reports it
        return None
    if states is not None:
        # The record stored now is the committed one of the next merge on this bucket:
        # its state is this one (unpickling those bytes gives it back, exactly: plain
        # atoms and tuples), and what it names is among what this merge named.
        states.keep(merged, list(dict.fromkeys(named)), resolved, references)
    return merged


def _state(data: bytes, find_global: Callable[..., Any], persistent_load: Callable[..., Any]) -> Any:
    """A record's state, as ``ZODB.ConflictResolution.state`` reads it."""
    unpickler = PersistentUnpickler(find_global, persistent_load, io.BytesIO(data))
    unpickler.load()  # the class
    return unpickler.load()


def _plain_pickle(meta: Any, state: Any) -> bytes:
    """The record ZODB's resolver pickles, byte for byte, fast for a bucket of plain atoms.

    ZODB's pickler asks ``persistent_id`` (a Python function) about every object; it
    answers None but for a `PersistentReference`. When `state` is a tuple of entries
    of plain atoms (or tuples of them) and references (a bucket's state: entries, then
    its next bucket), the pickler asks a dict's C ``get`` instead, each reference
    standing in as a hashable `_Slot` keyed to ZODB's answer for it
    (`durable_heap._fastpickle` does the same for the records a commit writes).
    """
    out = io.BytesIO()
    pickler = PersistentPickler(_zodb_persistent_id, out, 3)
    pickler.dump(meta)
    table = _plain_table(state)
    if table is None:
        pickler.dump(state)
    else:
        answers, state = table
        pickler.persistent_id = answers.get
        pickler.dump(state)
    return out.getvalue()


def _plain_items(items: tuple[Any, ...]) -> bool:
    """Whether `items` holds plain atoms only, or (a bucket's ``seq, entry, ...``) plain
    atoms at even places and tuples of plain atoms at odd ones: passes in C."""
    kinds = set(map(type, items[0::2]))
    odd = set(map(type, items[1::2]))
    if odd == {tuple}:
        odd = set(map(type, chain.from_iterable(items[1::2])))
    return kinds <= _PLAIN_ATOMS and odd <= _PLAIN_ATOMS


def _plain_table(state: Any) -> tuple[dict[Any, Any], Any] | None:
    """(ZODB's answers by `_Slot`, `state` with its references as slots), or None."""
    if type(state) is not tuple:
        return None
    answers: dict[Any, Any] = {}
    parts: list[Any] = []
    for part in state:
        if type(part) is _PersistentReference:
            slot = _Slot()
            answers[slot] = part.data
            parts.append(slot)
            continue
        if type(part) is not tuple or not _plain_items(part):
            return None
        parts.append(part)
    return answers, tuple(parts)
# -- end PROTECTED --


def _importable(module: str) -> bool:
    """Whether importing `module` would find a module to run, found without running any:
    only the first missing package of the path is looked for, under loaded parents."""
    import importlib.util

    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in sys.modules:
            continue
        try:
            return importlib.util.find_spec(name) is not None  # its parent is loaded
        except (ImportError, ValueError):
            return False
    return True


# -- PROTECTED: ConflictResolvingStorage.tryToResolveConflict, replaced per instance --
# (ZODB 6.4, ZEO 6.2: see the docstring for where storages call it). Pinned by
# tests/test_allow.py and tests/test_zodb_internals.py.
def guard_conflicts(storage: Any, allowlist: Allowlist) -> None:
    """Make `storage`, and the storages it wraps (``.base``), resolve conflicts only on
    records whose globals `allowlist` admits.

    The hook is an instance attribute over the storage's ``tryToResolveConflict``
    (``ZODB.ConflictResolution.ConflictResolvingStorage``), the method storages
    call on themselves: in ZODB 6.4, ``FileStorage.store`` and its undo
    (FileStorage.py lines 610 and 1005), ``DemoStorage.store``, and in ZEO 6.2
    ``ClientStorage.tpc_vote`` for client-side resolution (ClientStorage.py line
    848). ZEO's own server replaces it the same way for
    ``client_conflict_resolution`` (StorageServer.py line 771). A test
    (tests/test_allow.py) fails if these calls move.
    """
    seen: set[int] = set()
    current = storage
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        resolve = getattr(current, "tryToResolveConflict", None)
        if resolve is not None and not getattr(resolve, "_dh_guarded", False):
            current.tryToResolveConflict = _GuardedResolver(current, resolve, allowlist)
        current = getattr(current, "base", None)
# -- end PROTECTED --


# --- ZODB's log line for a refused load ---------------------------------------------------


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """Drop ZODB's "Couldn't load state" traceback for a refusal: the error says it all."""
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None:
        if isinstance(exc, ClassNotAllowedError):
            return False
        exc = exc.__cause__
    return True


# -- PROTECTED: the "ZODB.Connection" logger's failed-load line (ZODB 6.4) --
# ZODB.Connection.setstate logs every failed load with its traceback before
# re-raising it; a refusal is an expected outcome, reported by the error itself.
logging.getLogger("ZODB.Connection").addFilter(_not_a_refusal)
# -- end PROTECTED --


# --- connections that name the record a refusal came from ---------------------------------


def _refusal_in(exc: BaseException) -> ClassNotAllowedError | None:
    while exc is not None:
        if isinstance(exc, ClassNotAllowedError):
            return exc
        exc = exc.__cause__  # type: ignore[assignment]
    return None


class Connection(ZODB.Connection.Connection):
    """ZODB's connection, whose loads refused by the allowlist name the record's oid.

    The class factory does not know which record it serves; `setstate` and
    `get` do. ZODB wraps a refusal during ``setstate`` in an empty
    ``StateLoadError`` (``ZODB.serialize.ObjectReader.getState``): unwrap it.
    """

    def setstate(self, obj: Any) -> None:
        try:
            super().setstate(obj)
        except Exception as exc:
            refusal = _refusal_in(exc)
            if refusal is None:
                raise
            raise _located(refusal, obj._p_oid) from None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # PROTECTED: ZODB's Connection makes its ObjectReader here (``_reader``): the
        # same, reading records through a buffered stream (`_fastpickle`).
        self._reader.__class__ = BufferedObjectReader

    def _store_objects(self, writer: Any, transaction: Any) -> None:
        # PROTECTED: ZODB's Connection stores every record of a commit (or a
        # savepoint) through an ObjectWriter handed to this method (``_commit``):
        # plain bucket states pickle faster through it (see `_fastpickle`).
        speed_up(writer)
        super()._store_objects(writer, transaction)

    def get(self, oid: bytes) -> Any:
        try:
            return super().get(oid)
        except Exception as exc:
            refusal = _refusal_in(exc)
            if refusal is None:
                raise
            raise _located(refusal, oid) from None


def _located(refusal: ClassNotAllowedError, oid: bytes | None) -> ClassNotAllowedError:
    """The innermost record's refusal keeps its oid; otherwise this record's is added."""
    if refusal.oid is not None or oid is None or not refusal.name:
        return refusal
    return refused(refusal.name, oid)


class DB(ZODB.DB):
    """ZODB's DB, making its connections of `Connection` (the class attribute
    ``ZODB.DB.DB.klass`` is ZODB's hook for that, ZODB 5 and 6)."""

    klass = Connection
