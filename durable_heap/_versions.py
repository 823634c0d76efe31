"""Versions: deploys that hand `state` from one version of a program to the next.

Each heap keeps, per program (by module name), the list of its deployed
versions -- number, UTC time, source hash, the full source, a note -- and which
one is current. Every process runs the *current version's stored source*, not
the file on disk: a broken file never stops a program from loading its state.

A deploy, all in one transaction (a failure commits nothing, and the previous
version stays in force):

1. compile the new source (a syntax error stops here);
2. take the old modules out of `sys.modules` and have every connection drop
   its cached objects, so stored objects load as instances of the new classes;
3. run the new top level (``state.setdefault(...)`` initialisation); a
   program that declares ``class State(durable_heap.State)`` gets its root
   made an instance of it, missing annotated names set from their defaults;
4. refuse if stored objects use a class the new version no longer defines
   (the class registry of `_values` answers without a scan), unless forced:
   before any migration, which would fail on those broken objects instead;
5. run the named migrations (`_migrations`) the heap has not recorded, in
   definition order, and record them (a first deploy records them unrun, a
   rollback neither runs nor records any);
6. call ``migrate(state, previous)`` if the program defines it and a version
   came before (at every deploy, rollbacks included);
7. record the version and the new version's durable globals.

Durable globals are the module-level data of a version (``hits = []``): kept
in the heap per version, bound into the module at the start of each call and
saved at its end. A new version starts from what its own top level makes.

History comes from ZODB: a version record is never changed after its deploy,
so its ``_p_serial`` is the deploy's transaction id, and a historical
connection ``before`` the next version's deploy shows the state as it was
while a version was current.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import transaction
import transaction.interfaces
import ZODB.broken
import ZODB.POSException
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.DB import getTID

from . import _migrations as migrations
from . import _rewrite as rewriting
from ._containers import Dict
from ._errormap import translate_storage_error
from ._errors import (
    ClassNotAllowedError,
    DeployError,
    DurableHeapError,
    FunctionNotFoundError,
    NotPersistableError,
    ProgramError,
    ProgramNotFoundError,
    StorageError,
    VersionNotFoundError,
)
from ._format import PROGRAMS_KEY, ROOT_KEY
from ._heap import HeapEngine, read_transaction, state
from ._kinds import is_atomic
from ._notes import hidden_note
from ._program import (
    Compiled,
    Source,
    compile_source,
    install,
    module_name,
    read_source,
    restore,
    swap_out,
    top_level_names,
    where,
)
from ._registry import ensure_registry, program_roots, stored_classes
from ._retry import RETRIED, call_note, retry
from ._state import State
from ._types import apply_declared, declared_state
from ._watch import view_changes, watched_plain_ids
from ._workflows import WorkflowFunction, deploy_check, set_globals_binder, set_resolver

__all__ = [
    "PROGRAMS_KEY",
    "Program",
    "Version",
    "Versions",
    "auto_deploy",
    "broken_classes",
    "deploy",
    "load",
    "load_discarded",
    "public_functions",
    "rewrite_classes",
    "rollback",
    "state_at",
    "versions",
]


class _ModuleLock:
    """A readers-writer lock over the programs' modules: calls share it (`calling`), a
    deploy or a module reload holds it alone (`swapping`).

    Modules are process-wide: a call still running the old version's code when
    another thread swaps the modules would fail to commit (its objects' classes
    are no longer the ones their paths name). So a deploy waits for the calls
    in flight, and calls wait for the deploy. Reentrant per thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls = 0
        self._owner: int | None = None
        self._owner_depth = 0
        self._waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Held while a program call runs: waits while modules are being swapped."""
        depth = getattr(self._local, "depth", 0)
        me = threading.get_ident()
        if depth == 0 and self._owner != me:
            with self._cond:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._calls += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._owner != me:
                with self._cond:
                    self._calls -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Held while modules are swapped: waits for the calls in flight; refused inside one."""
        me = threading.get_ident()
        if self._owner == me:
            self._owner_depth += 1
            try:
                yield
            finally:
                self._owner_depth -= 1
            return
        if getattr(self._local, "depth", 0):
            raise ProgramError("a deploy cannot run inside a program call")
        with self._cond:
            self._waiting += 1
            try:
                while self._owner is not None or self._calls:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._owner = me
        try:
            yield
        finally:
            with self._cond:
                self._owner = None
                self._cond.notify_all()


_modules = _ModuleLock()


class _MustReload(Exception):
    """Internal: the current version must be loaded, which needs `_modules.swapping()`."""


class _VersionRecord(Persistent):
    """One deployed version. Never changed after its deploy commits: its
    ``_p_serial`` is then the deploy's transaction id (used by `state_at`)."""

    def __init__(self, number: int, source: Source, note: str) -> None:
        self.number = number
        self.deployed_at = datetime.datetime.now(datetime.timezone.utc)
        self.source_hash = source.hash
        self.files = dict(source.files)
        self.origin = source.origin
        self.is_package = source.is_package
        self.note = note

    def source(self, name: str) -> Source:
        return Source(name, self.origin, dict(self.files), self.is_package)


class _ProgramRecord(Persistent):
    """A program's versions, the current one, and the durable globals of each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current = 0
        #: Hash of the source last deployed *from the file*: a call deploys only
        #: when the file differs from it, so a rollback is not undone by the next call.
        self.file_hash: str | None = None
        self.versions = IOBTree()  # number -> _VersionRecord
        self.globals = IOBTree()  # number -> Dict of durable globals


@dataclass(frozen=True)
class Version:
    """A deployed version of a program, as `Heap.versions` lists it."""

    program: str
    number: int
    deployed_at: datetime.datetime  # UTC
    source_hash: str
    note: str
    origin: str  # the file or package folder it was deployed from
    files: tuple[str, ...]
    current: bool

    def __str__(self) -> str:
        return f"{self.program} version {self.number}"


def _version_of(rec: _ProgramRecord, number: int) -> Version:
    """The `Version` (what users see) of version `number` of the program record `rec`."""
    v = rec.versions[number]
    return Version(rec.name, v.number, v.deployed_at, v.source_hash, v.note, v.origin,
                   tuple(sorted(v.files)), number == rec.current)


def _record(conn: Any, name: str) -> _ProgramRecord | None:
    programs = conn.root().get(PROGRAMS_KEY)
    return programs.get(name) if programs is not None else None


def _read(heap: HeapEngine, func: Callable[[Any], Any]) -> Any:
    """Run ``func(connection)`` in a transaction of its own (reads only)."""
    with read_transaction(heap) as conn:
        return func(conn)


@contextlib.contextmanager
def _swapped_in(heap: HeapEngine, name: str, renames: dict[str, str], *,
                reset_caches: bool = True) -> Iterator[None]:
    """Make room for a version of program `name` that the block installs; on an
    exception, put everything back as it was.

    Takes the program's modules out of ``sys.modules`` (`swap_out`), sets its
    rename table, lists it in `program_roots` (its classes are registered and
    allowed), and with `reset_caches` has every connection drop its cached
    objects (`HeapEngine.classes_changed`), so that stored objects load as
    instances of the new classes. Undone on an exception: the old modules, the
    old rename table, `program_roots` as it was, and the caches dropped again
    once no transaction is open here (inside one, the transaction is aborted
    and this thread's cache must not be reset under it). A block that succeeds
    keeps the new version installed. Without `reset_caches`: called while an
    object loads (`install_stored_definitions`), where no cache may be touched.
    """
    saved = swap_out(name)
    old_renames = heap.set_renames(name, renames)
    listed = name in program_roots
    program_roots.add(name)
    if reset_caches:
        heap.classes_changed()
    try:
        yield
    except BaseException:
        restore(name, saved)
        heap.set_renames(name, old_renames)
        if not listed:
            program_roots.discard(name)
        if reset_caches and not heap.in_transaction:
            heap.classes_changed()
        raise


def _outside_transactions(heap: HeapEngine, what: str) -> Any:
    local = heap._thread()
    if local.depth:
        raise ProgramError(
            f"{what} runs in a transaction of its own: call it outside transactions and actions"
        )
    return local


# --- deploy ----------------------------------------------------------------------------


def deploy(heap: HeapEngine, program: str | os.PathLike[str], *, note: str | None = None,
           force: bool = False) -> tuple[Version, bool]:
    """Deploy the program file or package at `program`; return (version, whether new).

    Source equal to the current version's deploys nothing and returns it.
    """
    source = read_source(program)
    text = note if note is not None else f"from {os.path.basename(source.origin)}"
    return _deploy(heap, source, note=text, force=force, from_file=True)


def auto_deploy(heap: HeapEngine, program: str | os.PathLike[str], *, force: bool = False) -> Version | None:
    """Deploy `program` when its file differs from the source last deployed from it."""
    source = read_source(program)

    def seen(conn: Any) -> bool:
        rec = _record(conn, source.name)
        return rec is not None and rec.current > 0 and rec.file_hash == source.hash

    if _read(heap, seen):
        return None
    version, new = _deploy(heap, source, note=f"from {os.path.basename(source.origin)}",
                           force=force, from_file=True)
    return version if new else None


def rollback(heap: HeapEngine, program: str | os.PathLike[str], to: int, *, note: str | None = None,
             force: bool = False) -> tuple[Version, bool]:
    """Deploy version `to`'s stored source again, as a new version; state is kept."""
    name = module_name(program)

    def source_of(conn: Any) -> tuple[Source, bool]:
        rec = _existing(conn, name, heap)
        if to not in rec.versions:
            raise VersionNotFoundError(
                f"{name} has no version {to} (its versions: {_span(rec)}); nothing was deployed"
            )
        return rec.versions[to].source(name), rec.current == to

    source, current = _read(heap, source_of)
    if current:
        return _read(heap, lambda conn: (_version_of(_existing(conn, name, heap), to), False))  # type: ignore[no-any-return]
    return _deploy(heap, source, note=note or f"rollback to version {to}", force=force, from_file=False,
                   rolling_back=True)


def _existing(conn: Any, name: str, heap: HeapEngine) -> _ProgramRecord:
    rec = _record(conn, name)
    if rec is None or not rec.current:
        raise ProgramNotFoundError(f"{name} has never been deployed to the heap {heap.target}")
    return rec


def _span(rec: _ProgramRecord) -> str:
    numbers = list(rec.versions.keys())
    return f"{numbers[0]} to {numbers[-1]}" if len(numbers) > 1 else str(numbers[0])


def _deploy(heap: HeapEngine, source: Source, *, note: str, force: bool,
            from_file: bool, rolling_back: bool = False) -> tuple[Version, bool]:
    _outside_transactions(heap, "a deploy")
    try:
        compiled = compile_source(source)
    except DeployError as exc:
        rec = _read(heap, lambda conn: _record(conn, source.name))
        current = rec.current if rec is not None else 0
        raise DeployError(f"{exc}; {_kept(source.name, current)}", exc.cause) from exc.cause
    with _modules.swapping():
        return retry(lambda: _deploy_once(heap, compiled, note, force, from_file, rolling_back),
                     attempts=heap.max_attempts, note=f"deploy {source.name}")


def _deploy_once(heap: HeapEngine, compiled: Compiled, note: str, force: bool,
                 from_file: bool, rolling_back: bool = False) -> tuple[Version, bool]:
    source = compiled.source
    name = source.name
    local = heap._thread()
    with heap._transaction(local, f"deploy {name}: unchanged"):
        same = _unchanged(local.conn, source, from_file)
    if same is not None:
        return same, False
    progress = _Progress()
    try:
        with _swapped_in(heap, name, compiled.renames):
            txn_note = f"deploy {name}: {note}" if note else f"deploy {name}"
            with heap._transaction(local, txn_note), heap.activate():
                return _deploy_in_transaction(heap, local.conn, compiled, note, force, from_file,
                                              progress, rolling_back), True
    except (RETRIED, DeployError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever failed, the deploy did
        raise _deploy_error(name, progress.stage, exc, source, progress.current) from exc


def _unchanged(conn: Any, source: Source, from_file: bool) -> Version | None:
    """The current version if its source is `source` (then nothing is deployed), else None."""
    rec = _record(conn, source.name)
    if rec is None or not rec.current or rec.versions[rec.current].source_hash != source.hash:
        return None
    if from_file and rec.file_hash != source.hash:
        rec.file_hash = source.hash  # the file was seen: a call will not deploy it again
    return _version_of(rec, rec.current)


class _Progress:
    """How far a deploy got, for its error: the stage running, the version it replaces."""

    stage = "its top level"
    current = 0


def _deploy_in_transaction(heap: HeapEngine, conn: Any, compiled: Compiled, note: str,
                           force: bool, from_file: bool, progress: _Progress,
                           rolling_back: bool = False) -> Version:
    """Steps 3-7 of a deploy (see the module's docstring), in its transaction."""
    source = compiled.source
    name = source.name
    rec = _record(conn, name)
    current = progress.current = rec.current if rec is not None else 0
    module = _install_or_refuse(heap, conn, compiled, force, current)
    previous = _version_of(rec, current) if rec is not None and current else None
    progress.stage = ""
    # Before any migration runs: one that touches objects of a class this version
    # dropped would fail on a broken object (AttributeError) and hide the reason.
    ensure_registry(conn)  # a heap from before the registry: scanned once, here
    rewriting.forget(conn, [p for p in _unresolved(conn, name, heap.renames) if _rewritten_away(conn, p)])
    declared = declared_state(module)
    # A former declared State of the program leaves the registry by `apply_declared` below.
    removed = [p for p in broken_classes(conn, name, heap.renames)
               if declared is not None or p.rpartition(".")[2] != "State"]
    if removed and not force:
        raise DeployError(_removed_message(conn, name, removed, current, source.origin), removed=removed)
    number = rec.versions.maxKey() + 1 if rec is not None and len(rec.versions) else 1
    _run_migrations(heap, conn, compiled, number, previous is None, rolling_back, progress)
    migrate = module.__dict__.get("migrate")
    if callable(migrate) and previous is not None:  # a first deploy has nothing to migrate
        progress.stage = "migrate()"
        migrate(heap.state, previous)
    progress.stage = ""
    apply_declared(conn, declared, name)
    removed = broken_classes(conn, name, heap.renames)  # as before migrations, State included
    if removed and not force:
        raise DeployError(_removed_message(conn, name, removed, current, source.origin), removed=removed)
    deploy_check(heap, name, force=force)  # waiting workflows, timers, crons (`_workflows`)
    if rec is None:
        programs = conn.root().get(PROGRAMS_KEY)
        if programs is None:
            programs = conn.root()[PROGRAMS_KEY] = OOBTree()
        rec = programs[name] = _ProgramRecord(name)
    rec.versions[number] = _VersionRecord(number, source, note)
    rec.current = number
    if from_file:
        rec.file_hash = source.hash
    durable = rec.globals[number] = Dict()
    _save_globals(module, durable, conn, heap)
    return _version_of(rec, number)


def _install_or_refuse(heap: HeapEngine, conn: Any, compiled: Compiled, force: bool,
                       current: int) -> types.ModuleType:
    """`install` the new version (its top level runs); when that raises while stored
    objects use classes the version dropped, refuse for that reason first."""
    source = compiled.source
    try:
        return install(compiled)
    except RETRIED:
        raise
    except Exception as exc:
        # A top level that touches objects of a class this version dropped fails on a
        # broken object: say so first, as after it (`_dropped_while_failing`).
        removed = _dropped_while_failing(conn, compiled, heap.renames)
        if removed and not force:
            files = [source.filename(rel) for rel in source.files]
            also = (f"its top level raised {where(exc, files)}, perhaps on one of those objects "
                    "(they load as broken objects, without their attributes)")
            message = _removed_message(conn, source.name, removed, current, source.origin, also)
            raise DeployError(message, exc, removed=removed) from exc
        raise


def _run_migrations(heap: HeapEngine, conn: Any, compiled: Compiled, number: int, first: bool,
                    rolling_back: bool, progress: _Progress) -> None:
    """Run the version's named migrations not yet recorded, recording each (`_migrations`):
    a first deploy records them all unrun (the top level made today's shape), a
    rollback neither runs nor records any (it keeps today's state)."""
    name = compiled.source.name
    try:
        named = migrations.defined([m for k, m in list(sys.modules.items()) if k in compiled.code])
    except DeployError as exc:
        raise DeployError(f"deploy of {name} failed: {exc}; {_kept(name, progress.current)}") from None
    if first:
        migrations.record(conn, name, [n for n, _ in named], number)
    elif not rolling_back:
        for migration_name, func in migrations.pending(conn, name, named):
            progress.stage = f"migration {migration_name}"
            func(heap.state)
            migrations.record(conn, name, [migration_name], number)
    progress.stage = ""


def _kept(name: str, current: int) -> str:
    if current:
        return f"nothing was committed and version {current} stays in force"
    return "nothing was committed"


def _deploy_error(name: str, stage: str, exc: BaseException, source: Source, current: int) -> DeployError:
    files = [source.filename(rel) for rel in source.files]
    if isinstance(exc, DurableHeapError) and not stage:
        what = str(exc)
    else:
        what = f"{stage + ' raised ' if stage else ''}{where(exc, files)}"
    return DeployError(f"deploy of {name} failed: {what}; {_kept(name, current)}", exc)


def _removed_message(conn: Any, name: str, removed: list[str], current: int, origin: str,
                     also: str = "") -> str:
    listed = ", ".join(removed)
    hints = [hint for path in removed if (hint := _rename_hint(conn, name, path, origin))]
    also = f"; {also}" if also else ""
    if hints:
        return (
            f"deploy of {name} refused: stored objects use classes this version no longer defines: "
            f"{listed}. {' '.join(hints)} Or deploy with force (--force) to leave those objects "
            f"unloadable (their data is kept){also}; {_kept(name, current)}"
        )
    return (
        f"deploy of {name} refused: stored objects use classes this version no longer defines: "
        f"{listed}. Keep those classes, map them to their new names in __durable_renames__ "
        f"(e.g. {{'{removed[0]}': '{name}.NewName'}}), or deploy with force (--force) to leave "
        f"those objects unloadable (their data is kept){also}; {_kept(name, current)}"
    )


def _rename_hint(conn: Any, name: str, path: str, origin: str) -> str:
    """What to do about the removed class `path` if it was renamed (by an earlier
    version's ``__durable_renames__``, or a rewrite); "" if it was not."""
    marker = rewriting.entry(conn, path)
    new = _earlier_rename(conn, name, path) or (marker.get("new") if marker is not None else None)
    if new is None:
        return ""
    keep = f"keep {{'{path}': '{new}'}} in __durable_renames__"
    program = os.path.basename(origin.rstrip(os.sep))
    if marker is not None and marker.get("finished") is not None:
        when = marker["finished"].strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"Every stored {path} object was rewritten as {new} (durable-heap rewrite-classes, "
            f"finished {when} UTC), but the history from before then still names {path}: "
            f"{keep} until a pack removes that history (durable-heap pack {program} --days 0, or "
            f"any pack once the rewrite is older than its --days); then the entry can go."
        )
    return (
        f"{path} was renamed to {new} by __durable_renames__, and stored records still name "
        f"{path}: {keep} until `durable-heap rewrite-classes {program}` has written them all "
        f"under {new} and a pack has removed the history from before that rewrite; then the "
        f"entry can go."
    )


def _earlier_rename(conn: Any, name: str, path: str) -> str | None:
    """The new path that the latest earlier version of `name` mapping `path` gave it."""
    rec = _record(conn, name)
    if rec is None:
        return None
    for number in reversed(list(rec.versions.keys())):
        try:
            table = compile_source(rec.versions[number].source(name), definitions_only=True).renames
        except DeployError:
            continue
        if path in table:
            return table[path]
    return None


def broken_classes(conn: Any, name: str, renames: dict[str, str]) -> list[str]:
    """Stored class paths of program `name` that the loaded code no longer defines.

    Not those whose objects were all rewritten under their new path (`_rewrite`)
    with no history left from before the rewrite: nothing names them any more.
    """
    return [path for path in _unresolved(conn, name, renames) if not _rewritten_away(conn, path)]


def _dropped_while_failing(conn: Any, compiled: Compiled, renames: dict[str, str]) -> list[str]:
    """`broken_classes` of a version whose top level raised part way: of the classes that
    do not resolve, those its source never defines (the others it did not reach)."""
    defined = top_level_names(compiled)
    removed = []
    for path in broken_classes(conn, compiled.source.name, renames):
        module, _, rest = renames.get(path, path).rpartition(".")
        while module and module not in defined:  # a nested class: Outer.Inner
            module, _, outer = module.rpartition(".")
            rest = f"{outer}.{rest}"
        if rest.partition(".")[0] not in defined.get(module, set()):
            removed.append(path)
    return removed


def _unresolved(conn: Any, name: str, renames: dict[str, str]) -> list[str]:
    return sorted(
        path for path in stored_classes(conn)
        if path.partition(".")[0] == name and not _resolves(renames.get(path, path))
    )


def _rewritten_away(conn: Any, path: str) -> bool:
    marker = rewriting.entry(conn, path)
    return (marker is not None and marker.get("finished") is not None
            and not rewriting.history_remains(conn, marker))


def _resolves(path: str) -> bool:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        module = sys.modules.get(modname)
        if module is None:
            try:
                module = importlib.import_module(modname)
            except Exception:  # noqa: BLE001,S112 - not a module: try a shorter prefix
                continue
        obj: Any = module
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return False
        return not (isinstance(obj, type) and issubclass(obj, ZODB.broken.Broken))
    return False


# --- durable globals ---------------------------------------------------------------------

_NOT_DATA = (types.ModuleType, type, type(state), HeapEngine)
_MISSING = object()  # a marker nothing stores


def _save_globals(module: types.ModuleType, durable: Dict, conn: Any, heap: HeapEngine) -> None:
    """Store the data globals that differ from `durable`, binding the module to the
    stored twins: after a deploy's top level (all of them), after a call (those it
    rebound: ``global n; n += 1``).

    Values that cannot be stored (a lock, a socket), or that would not load again
    (they name a class outside the heap's allowlist), stay process-local, as the
    top level makes them; plain objects read from state are state's, not globals.
    """
    held: set[int] | None = None
    names = set()
    get = durable.get
    # The data globals: not dunders, functions, classes or modules (after every call).
    for name, value in list(vars(module).items()):
        if name.startswith("__") or isinstance(value, _NOT_DATA) or callable(value):
            continue
        names.add(name)
        stored = get(name, _MISSING)
        if stored is value or (
            is_atomic(value) and type(stored) is type(value) and stored == value
        ):
            continue
        if held is None:
            held = watched_plain_ids(conn)
        if id(value) in held:
            continue
        try:
            if not heap.allowlist.loads_again(conn, value):
                raise NotPersistableError(name, value)
            durable[name] = value
        except NotPersistableError:
            if name in durable:  # now holds something unstorable: process-local from here on
                del durable[name]
            continue
        module.__dict__[name] = durable[name]
    for name in [n for n in durable if n not in names and n not in vars(module)]:
        del durable[name]


_globals_locks: dict[str, threading.RLock] = {}


def _globals_lock(name: str) -> threading.RLock:
    """The lock of program `name`'s durable globals, shared by its calls and its workflows'
    steps: module globals are process-wide, bound to one thread's objects at a time."""
    return _globals_locks.setdefault(name, threading.RLock())


@contextlib.contextmanager
def _bound_globals(heap: HeapEngine, name: str, save: bool) -> Iterator[None]:
    """Durable execution's hook: program `name`'s durable globals bound while a workflow's
    body (`save` False: it may not change them) or one of its steps runs (`save`: in the
    step's transaction, whose changes to them are saved as a call's are)."""
    module = sys.modules.get(name)
    source = getattr(module, "__durable_source__", None)
    durable = None
    if module is not None and source is not None:
        with read_transaction(heap) as conn:  # joins the step's transaction
            rec = _record(conn, name)
            if rec is not None and rec.current:
                number = rec.current
                if rec.versions[number].source_hash != source:  # another version is loaded here
                    number = next((n for n in reversed(list(rec.versions.keys()))
                                   if rec.versions[n].source_hash == source), 0)
                durable = rec.globals.get(number)
    if module is None or durable is None or not len(durable):
        yield
        return
    with _globals_lock(name):
        module.__dict__.update(durable.items())
        yield
        if save:
            _save_globals(module, durable, heap.connection, heap)


set_globals_binder(_bound_globals)


# --- running the current version ----------------------------------------------------------


class Program:
    """A program loaded against a heap: calls run the current version as actions.

    Each call is one transaction that first makes sure the module is the heap's
    current version (reloading it when another process deployed or rolled
    back), binds the version's durable globals, runs the function, and saves
    the globals it changed. With ``watch=True`` each call first deploys the
    program file if it changed (at most one check a second): hot reload
    without a restart.
    """

    def __init__(self, heap: HeapEngine, program: str | os.PathLike[str], *, watch: bool = False) -> None:
        self.heap = heap
        self.path = os.path.abspath(program)
        self.name = module_name(program)
        self.watch = watch
        #: Called with each version that `watch` deployed.
        self.on_deploy: Callable[[Version], None] | None = None
        self._module: types.ModuleType | None = None
        self._loaded: tuple[int, str] = (0, "")
        self._stamp: Any = None
        self._checked = 0.0
        self._globals_lock = _globals_lock(self.name)

    def __repr__(self) -> str:
        return f"<durable_heap.Program {self.name} version {self._loaded[0] or '?'}>"

    @property
    def module(self) -> types.ModuleType:
        """The loaded module of the current version."""
        with _modules.swapping():
            self.heap._run(self._ensure, (True,), {}, f"load {self.name}", self.heap.max_attempts)
        assert self._module is not None
        return self._module

    @property
    def version(self) -> Version:
        """The heap's current version of this program."""
        def current(conn: Any) -> Version:
            rec = _existing(conn, self.name, self.heap)
            return _version_of(rec, rec.current)

        return _read(self.heap, current)  # type: ignore[no-any-return]

    def call(self, function: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``function(*args, **kwargs)`` of the current version as one action."""
        return self._call(function, args, kwargs, None)

    # -- PROTECTED: for the CLI (`durable-heap call`); not public API ----------------------

    def _call(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              then: Callable[[Any], Any] | None, attempts: int | None = None) -> Any:
        """`call`, and ``then(result)`` in the same transaction (it may read durable objects).

        `attempts`: tries on conflicts (default: the heap's).
        """
        if self.watch:
            self.deploy_if_changed()
        # Before its version is loaded, a function's redact marks are unknown: the note
        # hides every argument until the transaction names the function (_in_transaction).
        module = self._module
        # The function the note was made for (None: its marks unknown, every argument
        # hidden): `_in_transaction` makes the note again only for another function.
        noted = getattr(module, function, None) if module is not None else None
        note = (call_note(function, args, kwargs, noted) if module is not None
                else hidden_note(function, args, kwargs))
        run = self.heap._run
        with _modules.calling():
            try:
                return run(self._in_transaction, (function, args, kwargs, then, False, noted, note), {},
                           note, attempts or self.heap.max_attempts)
            except _MustReload:
                if self.heap.in_transaction:
                    raise ProgramError(
                        f"{self.name}: the program's current version is not loaded yet, and loading "
                        "it cannot join a transaction in progress: make the first call of a new "
                        "version outside transactions and actions"
                    ) from None
        # A new version to load (or the first call): with no other call in flight.
        with _modules.swapping():
            return run(self._in_transaction, (function, args, kwargs, then, True, noted, note), {},
                       note, attempts or self.heap.max_attempts)

    # -- running the current version ------------------------------------------------------

    def _in_transaction(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                        then: Callable[[Any], Any] | None, may_swap: bool,
                        noted: Any = None, note: str | None = None) -> Any:
        loaded_here, rec = self._ensure_record(may_swap)
        try:
            module = self._module
            assert module is not None
            func = _function(module, function)
            # The note as the function's `redact` marks say, now that it is known: `_call`
            # made it already for `noted` (the same function unless a version was loaded
            # since); set again when nested, where the outer transaction's note was in force.
            txn = self.heap.transaction_manager.get()
            if func is not noted or note is None:
                txn.description = call_note(function, args, kwargs, func)
            elif txn.description != note:
                txn.description = note
            conn = self.heap.connection
            durable = rec.globals.get(self._loaded[0])
            # Module globals are process-wide but bound to this thread's objects:
            # a program with durable globals runs one call at a time.
            lock = self._globals_lock if durable is not None and len(durable) else contextlib.nullcontext()
            declared = declared_state(module)
            root_class = type(conn.root()[ROOT_KEY])
            if declared is not None and root_class is not declared and not self.heap.read_only:
                # A plain script wrote the root as a plain State (see `Heap._find_class`).
                apply_declared(conn, declared)
            with self.heap.activate(), lock:
                if durable is not None:
                    module.__dict__.update(durable.items())
                result = func(*args, **kwargs)
                if inspect.iscoroutine(result):  # an ``async def`` function: run in this transaction
                    result = _run_coroutine(function, result)
                if durable is not None:
                    _save_globals(module, durable, conn, self.heap)
                return then(result) if then is not None else result
        except BaseException:
            if loaded_here:
                self._module = None  # its top level's changes are rolled back: run it again
            raise

    def _loaded_is(self, number: int, source_hash: str) -> bool:
        return (
            self._module is not None
            and self._loaded == (number, source_hash)
            and sys.modules.get(self.name) is self._module
        )

    def _ensure(self, may_swap: bool) -> bool:
        """Load the current version unless it is loaded; True when it was loaded now.

        Loading swaps modules: without `may_swap` (the caller holds
        `_modules.swapping()`), raise `_MustReload`.
        """
        return self._ensure_record(may_swap)[0]

    def _ensure_record(self, may_swap: bool) -> tuple[bool, _ProgramRecord]:
        """`_ensure`, and the program's record it read (a call reads its globals from it)."""
        heap = self.heap
        rec = _existing(heap.connection, self.name, heap)
        number = rec.current
        version = rec.versions[number]
        if self._loaded_is(number, version.source_hash):
            return False, rec
        if not may_swap:
            raise _MustReload
        compiled = compile_source(version.source(self.name))
        try:
            # At the start of the transaction: nothing changed yet, caches may go.
            with _swapped_in(heap, self.name, compiled.renames), heap.activate():
                self._module = install(compiled)
        except ClassNotAllowedError:
            raise  # the heap's content, not the program, is at fault
        except Exception as exc:
            files = [compiled.source.filename(rel) for rel in compiled.source.files]
            raise ProgramError(
                f"{self.name} version {number} raised at load: {where(exc, files)}"
            ) from exc
        self._loaded = (number, version.source_hash)
        # Read again: the swap reset the connection's caches (`_swapped_in`), so the
        # record read above is no longer the one this connection holds.
        return True, _existing(heap.connection, self.name, heap)

    def deploy_if_changed(self) -> Version | None:
        """Deploy the program file if it changed since it was last deployed from."""
        now = time.monotonic()
        if now - self._checked < 1.0 and self._stamp is not None:
            return None
        self._checked = now
        stamp = file_stamp(self.path)
        if stamp == self._stamp or stamp is None:  # unchanged, or gone: the current version serves
            return None
        self._stamp = stamp  # after a failed deploy the same file is not tried again
        version = auto_deploy(self.heap, self.path)
        if version is not None and self.on_deploy is not None:
            self.on_deploy(version)
        return version


def file_stamp(path: str) -> Any:
    """Sizes and modification times of a program's files: cheap change detection."""
    if os.path.isdir(path):
        return tuple(
            (os.path.join(d, n), os.stat(os.path.join(d, n)).st_mtime_ns, os.stat(os.path.join(d, n)).st_size)
            for d, _, names in sorted(os.walk(path)) for n in sorted(names) if n.endswith(".py")
        )
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def public_functions(module: types.ModuleType) -> dict[str, Any]:
    """What a program offers to be called by name (``durable-heap call``, serve's ``POST
    /<name>``): the functions and the workflows (``@durable_heap.workflow``) it defines,
    not private ones, not its hooks (``migrate``, ``endpoint``, migrations)."""
    name = module.__name__
    return {
        n: v for n, v in vars(module).items()
        if not n.startswith("_") and n not in ("migrate", "endpoint")
        and ((isinstance(v, types.FunctionType) and v.__module__ == name and not migrations.is_migration(v))
             or (isinstance(v, WorkflowFunction) and v.name[0] == name))
    }


def _function(module: types.ModuleType, function: str) -> Callable[..., Any]:
    func = getattr(module, function, None)
    if migrations.is_migration(func):
        raise FunctionNotFoundError(
            f"{module.__name__}.{function} is a migration (@durable_heap.migration): it runs once, "
            "at the deploy that brings it, and cannot be called"
        )
    if func is None or not callable(func) or function.startswith("_"):
        listed = ", ".join(sorted(public_functions(module))) or "none"
        raise FunctionNotFoundError(
            f"{module.__name__} has no function {function!r} (its functions: {listed})"
        )
    return func  # type: ignore[no-any-return]


def load(heap: HeapEngine, program: str | os.PathLike[str], *, deploy: bool = True, watch: bool = False,
         on_deploy: Callable[[Version], None] | None = None) -> Program:
    """A `Program` for `program`, deploying its file first when it changed (``deploy``)."""
    path = os.path.abspath(program)
    if deploy and os.path.exists(path):
        version = auto_deploy(heap, path)
        if version is not None and on_deploy is not None:
            on_deploy(version)
    else:
        name = module_name(path)
        if _read(heap, lambda conn: _record(conn, name)) is None:
            if not os.path.exists(path):
                raise ProgramNotFoundError(f"there is no program file {os.fspath(program)!r}")
            raise ProgramError(
                f"{name} has never been deployed to the heap {heap.target}: deploy it first "
                f"(durable-heap deploy {os.fspath(program)})"
            )
    prog = Program(heap, path, watch=watch)
    prog.on_deploy = on_deploy
    prog._stamp = file_stamp(path)
    return prog


def versions(heap: HeapEngine, program: str | os.PathLike[str]) -> list[Version]:
    """Every deployed version of `program`, oldest first."""
    name = module_name(program)

    def listing(conn: Any) -> list[Version]:
        rec = _record(conn, name)
        return [] if rec is None else [_version_of(rec, n) for n in rec.versions.keys()]

    return _read(heap, listing)  # type: ignore[no-any-return]


# --- read-only views ----------------------------------------------------------------------


def load_discarded(heap: HeapEngine, program: str | os.PathLike[str], number: int | None = None,
                   *, from_file: bool = False, definitions_only: bool = False) -> types.ModuleType:
    """Load version `number` (default: current; the file if never deployed, or
    with `from_file`) for a read-only view: its top level runs in a transaction
    that is aborted (with `definitions_only`, only its definitions run)."""
    name = module_name(program)

    def source_of(conn: Any) -> Source | None:
        rec = _record(conn, name)
        if rec is None or not rec.current:
            return None
        n = number if number is not None else rec.current
        if n not in rec.versions:
            raise VersionNotFoundError(f"{name} has no version {n} (its versions: {_span(rec)})")
        return rec.versions[n].source(name)  # type: ignore[no-any-return]

    source: Source | None = None if from_file else _read(heap, source_of)
    if source is None:
        if number is not None:
            raise ProgramNotFoundError(f"{name} has never been deployed to the heap {heap.target}")
        source = read_source(program)
    compiled = compile_source(source, definitions_only=definitions_only)
    try:
        # Kept installed after the view: the caller reads stored objects of its classes.
        with _swapped_in(heap, name, compiled.renames), read_transaction(heap), heap.activate():
            module = install(compiled)
    except ClassNotAllowedError:
        raise  # the heap's content, not the program, is at fault
    except Exception as exc:
        files = [source.filename(rel) for rel in source.files]
        raise ProgramError(f"{name} raised at load: {where(exc, files)}") from exc
    return module


def install_stored_definitions(heap: HeapEngine, conn: Any, name: str) -> str:
    """Install the definitions of program `name`'s current version, read through `conn`.

    For a process that reads a program's objects without having loaded the
    program (a plain script): ZODB's own lookup would import the module from
    ``sys.path`` -- the file on disk, whatever version it holds, its top level
    run -- or make broken objects. What runs is the version's definitions
    (`compile_source` with ``definitions_only``, as for ``inspect --at``);
    `Program` replaces them with the whole version at its first call. Called by
    `Heap._find_class` while an object is being loaded, so it never begins or
    ends a transaction. Returns "installed"; "absent" (not a program of this
    heap); "failed" (a program whose definitions need its top level); or
    "unknown" (the root mapping itself is being loaded: nothing to read yet).
    """
    root = conn.root()
    if root._p_changed and "data" not in root.__dict__:
        return "unknown"
    try:
        programs = root.get(PROGRAMS_KEY)
        rec = programs.get(name) if programs is not None else None
        if rec is None or not rec.current:
            return "absent"
        compiled = compile_source(rec.versions[rec.current].source(name), definitions_only=True)
    except Exception:  # noqa: BLE001 - unreadable now: ZODB's own lookup decides
        return "absent"
    try:
        with _swapped_in(heap, name, compiled.renames, reset_caches=False):
            install(compiled, path_first=False)
    except Exception:  # noqa: BLE001 - a definition that needs the top level: broken objects
        return "failed"
    return "installed"


def rewrite_classes(heap: HeapEngine, program: str | os.PathLike[str], *, batch: int = 1000,
                    on_progress: Callable[[int, int], None] | None = None) -> rewriting.RewriteReport:
    """Write every stored record that names a class renamed by the current version's
    ``__durable_renames__`` again, under the new path (`_rewrite.rewrite`)."""
    _outside_transactions(heap, "a rewrite of renamed classes")
    name = module_name(program)

    def current(conn: Any) -> Source:
        rec = _existing(conn, name, heap)
        return rec.versions[rec.current].source(name)  # type: ignore[no-any-return]

    renames = compile_source(_read(heap, current), definitions_only=True).renames
    with _modules.swapping():
        load_discarded(heap, program)  # the current version's classes and rename table, here
    with _modules.calling():  # a deploy in this process waits: the classes must stay
        return rewriting.rewrite(heap, name, renames, batch=batch, on_progress=on_progress)


def version_at(heap: HeapEngine, program: str | os.PathLike[str], when: datetime.datetime) -> int | None:
    """The version of `program` that was current at `when` (None: none yet)."""
    name = module_name(program)
    with _historical(heap, {"at": when}, when.isoformat()) as conn:
        rec = _record(conn, name)
        return rec.current if rec is not None and rec.current else None


@contextlib.contextmanager
def state_at(heap: HeapEngine, when: int | datetime.datetime | str,
             program: str | os.PathLike[str] | None = None) -> Iterator[Any]:
    """The state as it was: while version `when` of `program` was current (its
    last moment before the next deploy), or at a time (a datetime, or ISO text;
    without a zone, UTC). Read-only; packing limits how far back it reaches."""
    if isinstance(when, str):
        when = parse_time(when)
    if isinstance(when, datetime.datetime):
        utc = datetime.timezone.utc
        when = when.astimezone(utc) if when.tzinfo else when.replace(tzinfo=utc)
        kwargs: dict[str, Any] = {"at": when}
        label = when.isoformat()
    else:
        if program is None:
            raise ValueError("a version number needs the program it belongs to")
        name = module_name(program)
        number = when

        def next_deploy(conn: Any) -> bytes | None:
            rec = _existing(conn, name, heap)
            if number not in rec.versions:
                raise VersionNotFoundError(f"{name} has no version {number} (its versions: {_span(rec)})")
            later = list(rec.versions.keys(number + 1))
            if not later:
                return None
            record = rec.versions[later[0]]
            record._p_activate()  # a ghost's serial is not known yet
            return record._p_serial  # type: ignore[no-any-return]

        before = _read(heap, next_deploy)
        kwargs = {"before": before} if before is not None else {}
        label = f"version {number}"
    with _historical(heap, kwargs, label) as conn:
        try:
            root = conn.root()[ROOT_KEY]
            root._p_activate()
        except (ZODB.POSException.POSKeyError, KeyError) as exc:
            raise translate_storage_error(exc, label, action="history") from exc
        yield root


@contextlib.contextmanager
def _historical(heap: HeapEngine, kwargs: dict[str, Any], label: str) -> Iterator[Any]:
    """A read-only connection to the state at `kwargs` (``at``/``before`` of ZODB's
    ``DB.open``), always historical: writes are refused (`check_writable`), and a
    plain object changed in place is reported when the view ends (`view_changes`)."""
    tm = transaction.TransactionManager()
    conn = heap.db.open(transaction_manager=tm, **_in_the_past(heap, kwargs))
    conn._dh_view = label  # for the wording of a refused write (a pooled connection: reset each time)
    try:
        try:
            conn.root()
        except (ZODB.POSException.POSKeyError, KeyError) as exc:
            raise translate_storage_error(exc, label, action="history") from exc
        yield conn
        changed = view_changes(conn)  # not reached when the block raised
        if changed is not None:
            raise StorageError(
                f"{changed} was changed in place in the read-only view of the state at {label} "
                "(heap.state_at); nothing was saved. Make changes through heap.state, in a "
                "transaction."
            )
    finally:
        tm.abort()
        conn.close()


_POLL_LOCK = threading.Lock()


def _in_the_past(heap: HeapEngine, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``DB.open`` arguments for a historical connection, never the current one.

    ZODB opens the current, writable connection when neither ``at`` nor
    ``before`` is given (the current version has no next deploy to end it), and
    refuses a time after its last commit ("cannot open an historical connection
    in the future"): both mean the newest state, read at the last commit. A time
    after now is now: ZODB's TimeStamp wraps for far years (9999 reads as a time
    before the heap existed).
    """
    at = kwargs.get("at")
    before: bytes | None = kwargs.get("before")
    if isinstance(at, datetime.datetime):
        at = min(at, datetime.datetime.now(datetime.timezone.utc))
        before = getTID(at, None)
    storage = heap.db.storage
    if getattr(storage, "keep_history", True) is False:  # RelStorage's history-free mode
        raise StorageError(
            f"the heap {heap.target} keeps no history (a history-free database, keep_history=0): "
            "only its current state exists, so there is no state of an earlier time or version "
            "to show. Copy it into a history-preserving database (durable-heap copy) to keep "
            "history from then on."
        )
    # The last commit as known after a sync: a read-only FileStorage reads the
    # writer's new transactions there, a ZEO client with server_sync asks its server.
    # RelStorage trap (4.3): its sync() only rolls back, and the DB's own storage
    # instance (never a connection's) keeps the lastTransaction() of its last poll,
    # so a time after that poll read as "in the future" to DB.open; it polls here,
    # one thread at a time (a RelStorage instance is not thread-safe).
    with _POLL_LOCK:
        sync = getattr(storage, "sync", None)
        if sync is not None:
            sync()
        poll = getattr(storage, "poll_invalidations", None)
        if poll is not None:
            poll()
        last: bytes = heap.db.lastTransaction()
    if before is None or before > last:
        return {"at": last}
    return {"before": before}


def parse_time(text: str) -> datetime.datetime:
    """An ISO time (``2026-11-28T10:00``, ``2026-11-28 10:00:00+01:00``); UTC without a zone."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a version number nor an ISO time such as 2026-11-28T10:00"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


# --- the version layer's part of `durable_heap.Heap` ---------------------------------------


class Versions(HeapEngine):
    """The methods the version layer adds to `durable_heap.Heap` (a mixin of `_facade.Heap`).

    It also registers the layer's policy with the engine's class lookup: a
    program this process has not loaded is installed from its deployed version
    (`install_stored_definitions`), never imported from whatever file
    ``sys.path`` finds.
    """

    def install_definitions(self, conn: Any, root: str) -> str:
        """The engine's hook (`HeapEngine.install_definitions`): from the heap's stored versions."""
        return install_stored_definitions(self, conn, root)

    def deploy(self, program: str | os.PathLike[str], *, note: str | None = None,
               force: bool = False) -> Version:
        """Deploy a program file or package as its next version, in one transaction.

        Runs the new top level, its named migrations not yet run here
        (``@durable_heap.migration``) and its ``migrate(state, previous)``; raises
        `DeployError` (and commits nothing) when anything fails. Source equal to
        the current version's deploys nothing and returns the current version.
        `force` deploys although stored objects use classes the code dropped.
        """
        return deploy(self, program, note=note, force=force)[0]

    def rollback(self, program: str | os.PathLike[str], to: int, *, note: str | None = None,
                 force: bool = False) -> Version:
        """Deploy version `to`'s stored source again, as a new version: today's state is
        kept (no down-migration), no named migration runs."""
        return rollback(self, program, to, note=note, force=force)[0]

    def rewrite_classes(self, program: str | os.PathLike[str], *, batch: int = 1000,
                        on_progress: Callable[[int, int], None] | None = None) -> rewriting.RewriteReport:
        """Write every stored object of a class that the current version renames (its
        ``__durable_renames__``) again under the new path, and every record that refers
        to one, `batch` records per transaction (``on_progress(done, total)`` after each).

        Once a pack has removed the history from before it, a deploy may drop those
        rename entries. Safe while the heap is in use (a conflicting batch is retried).
        """
        return rewrite_classes(self, program, batch=batch, on_progress=on_progress)

    def versions(self, program: str | os.PathLike[str]) -> list[Version]:
        """Every deployed version of a program (a path or module name), oldest first."""
        return versions(self, program)

    def load(self, program: str | os.PathLike[str], *, deploy: bool = True,
             watch: bool = False) -> Program:
        """The program, ready to call: ``heap.load("app.py").call("add", "ann")``.

        With `deploy`, its file is deployed first when it differs from the source
        last deployed from it; with `watch`, again before any call once it changes.
        """
        return load(self, program, deploy=deploy, watch=watch)

    def state_at(self, when: int | datetime.datetime | str,
                 program: str | os.PathLike[str] | None = None) -> contextlib.AbstractContextManager[State]:
        """Read-only state as it was: ``with heap.state_at(1, "app.py") as old: ...``.

        `when` is a version number of `program` (its last moment as the current
        version) or a time (datetime or ISO text; UTC without a zone).
        """
        return state_at(self, when, program)


def _program_function(module: str, qualname: str) -> Any:
    """Durable execution's lookup of a stored name: a program's function, as loaded here.

    A program is never imported from whatever file ``sys.path`` finds: one this
    process has not loaded is an error that says to load it.
    """
    root = module.partition(".")[0]
    if root not in program_roots:
        return None
    obj: Any = sys.modules.get(module)
    if obj is None:
        from ._errors import WorkflowError

        raise WorkflowError(
            f"{module}.{qualname} belongs to the program {root}, which this process has not "
            f"loaded: run the scheduler with the program (durable-heap worker {root}.py)"
        )
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


set_resolver(_program_function)



def _run_coroutine(function: str, coro: Any) -> Any:
    """Run an ``async def`` program function's coroutine to its end, in this thread's transaction.

    It gets an event loop of its own (``asyncio.run``); the heap finds no task
    transaction there, so ``state`` is the call's transaction, and the actions
    and ``async with heap.transaction()`` blocks it runs join it (they are
    nested). A thread that already runs an event loop cannot run another one.
    """
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise ProgramError(
        f"the program function {function} is async def, and it was called from a coroutine "
        "(an event loop runs in this thread): await it in an async action of your own, or "
        "call it from a thread with no event loop"
    )
