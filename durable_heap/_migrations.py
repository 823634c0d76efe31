"""Named migrations: module-level functions of a program that run exactly once per heap.

    @durable_heap.migration
    def owner_from_assignee(state):
        for t in state.tasks.values():
            t.owner = t.assignee
            del t.assignee

A deploy runs, in its own transaction, every migration of the new version that
the heap has not recorded yet, in the order the program defines them (the order
their decorators ran), and records each by name (``program.function``, or the
name given: ``@migration(name="0002-owners")``) in the heap's migration record
(`MIGRATIONS_KEY`). A migration that raises fails the deploy: nothing is
committed, and the next deploy runs it again. A recorded migration that a later
version no longer defines is fine (its work is done). A first deploy records
the version's migrations without running them: there is no earlier state, and
the top level makes the state in its current shape (as ``migrate`` is not
called at a first deploy either). A rollback runs and records none.

This module knows no heap: `_versions` calls `pending` and `record` inside the
deploy's transaction.
"""

from __future__ import annotations

import datetime
import itertools
import types
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from BTrees.OOBTree import OOBTree

from ._errors import DeployError, ProgramError
from ._format import MIGRATIONS_KEY

__all__ = [
    "MIGRATION_MARK", "defined", "is_migration", "migration", "name_of", "pending", "record", "recorded",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute the decorator sets on a migration: (definition order, name or None).
MIGRATION_MARK = "__durable_migration__"
_order = itertools.count()


@overload
def migration(func: F, /) -> F: ...
@overload
def migration(*, name: str | None = None) -> Callable[[F], F]: ...


def migration(func: Any = None, /, *, name: str | None = None) -> Any:
    """Mark a module-level function ``f(state)`` of a program as a named migration.

    It runs at the first deploy that brings it, in that deploy's transaction,
    and never again in this heap (see the module docstring). `name` (default
    ``module.function``) is what the heap records: give one to keep a migration
    recorded as done when its function is renamed or moved.
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ProgramError(f"a migration's name must be a non-empty string, not {name!r}")

    def mark(f: F) -> F:
        if not isinstance(f, types.FunctionType):
            raise ProgramError(
                f"@durable_heap.migration marks a function f(state), not {type(f).__name__} {f!r}"
            )
        if "." in f.__qualname__:
            raise ProgramError(
                f"{f.__module__}.{f.__qualname__}: a migration must be a module-level function "
                "(the heap records it by name, and a deploy finds it in the program's modules)"
            )
        setattr(f, MIGRATION_MARK, (next(_order), name))
        return f

    if func is not None:
        return mark(func)
    return mark


def name_of(func: Any) -> str:
    """The name a migration is recorded under."""
    _, given = getattr(func, MIGRATION_MARK)
    return given if given is not None else f"{func.__module__}.{func.__qualname__}"


def is_migration(value: Any) -> bool:
    """Whether `value` is a function marked with `migration`."""
    return isinstance(value, types.FunctionType) and hasattr(value, MIGRATION_MARK)


def defined(modules: Iterable[types.ModuleType]) -> list[tuple[str, Callable[..., Any]]]:
    """The migrations the program's `modules` define, in definition order, by name.

    Only functions defined in those modules count (one imported from a
    submodule into the package is the same function, listed once). Two with one
    name are a `DeployError`.
    """
    found: dict[int, tuple[int, str, Callable[..., Any]]] = {}
    names = {m.__name__ for m in modules}
    for module in modules:
        for value in list(vars(module).values()):
            if is_migration(value) and value.__module__ in names and id(value) not in found:
                found[id(value)] = (getattr(value, MIGRATION_MARK)[0], name_of(value), value)
    listed = sorted(found.values(), key=lambda item: item[0])
    seen: dict[str, Callable[..., Any]] = {}
    for _, name, func in listed:
        if name in seen:
            raise DeployError(
                f"two migrations are named {name!r} ({seen[name].__qualname__} and "
                f"{func.__qualname__}): give each a name of its own"
            )
        seen[name] = func
    return [(name, func) for _, name, func in listed]


def recorded(conn: Any, program: str) -> Any:
    """The heap's record of `program`'s migrations that ran (name -> (version, UTC time)),
    or None when none were ever recorded."""
    table = conn.root().get(MIGRATIONS_KEY)
    return table.get(program) if table is not None else None


def pending(conn: Any, program: str,
            migrations: list[tuple[str, Callable[..., Any]]]) -> list[tuple[str, Callable[..., Any]]]:
    """Those of `migrations` that the heap has not recorded as run, in their order."""
    done = recorded(conn, program)
    return [(n, f) for n, f in migrations if done is None or n not in done]


def record(conn: Any, program: str, names: Iterable[str], version: int) -> None:
    """Record `names` as run (in the caller's transaction), by deploy of `version`."""
    names = list(names)
    if not names:
        return
    root = conn.root()
    table = root.get(MIGRATIONS_KEY)
    if table is None:
        table = root[MIGRATIONS_KEY] = OOBTree()
    done = table.get(program)
    if done is None:
        done = table[program] = OOBTree()
    when = datetime.datetime.now(datetime.timezone.utc)
    for name in names:
        done[name] = (version, when)
