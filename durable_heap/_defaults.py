"""Dataclass defaults for objects stored before a field existed.

A program's dataclass that gains ``tags: list = field(default_factory=list)``
would load old instances without ``tags``: `serve_defaults` gives such classes
a ``__setstate__`` that fills the new fields' defaults (`fill_defaults`, also
used by `Object`).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from persistent import Persistent

__all__ = ["dataclass_defaults", "fill_defaults", "serve_defaults"]


_DEFAULTS: dict[type, tuple[tuple[str, Any, Any], ...]] = {}


def dataclass_defaults(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, default, factory) of each field of dataclass `cls` that has a default."""
    found = _DEFAULTS.get(cls)
    if found is None:
        found = ()
        if dataclasses.is_dataclass(cls):
            found = tuple(
                (f.name, f.default, None if f.default_factory is dataclasses.MISSING else f.default_factory)
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
        _DEFAULTS[cls] = found
    return found


def fill_defaults(obj: Any, attrs: dict[str, Any]) -> None:
    """Give an object loaded from an older shape the defaults of its newer fields."""
    for name, default, factory in dataclass_defaults(type(obj)):
        if name not in attrs:
            attrs[name] = factory() if factory is not None else default


def _setstate_with_defaults(self: Any, state: Any) -> None:
    attrs = state[0] if isinstance(state, tuple) else state
    if attrs:
        self.__dict__.update(attrs)
    if isinstance(state, tuple) and state[1]:
        for name, value in state[1].items():
            object.__setattr__(self, name, value)
    fill_defaults(self, self.__dict__)


def serve_defaults(module: types.ModuleType) -> None:
    """Let the plain dataclasses of a program module fill new fields' defaults on load.

    A dataclass that gains ``tags: list = field(default_factory=list)`` would
    otherwise load old instances without ``tags``. Classes that define their own
    ``__setstate__`` or use slots are left alone.
    """
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and dataclasses.is_dataclass(value)
            and not issubclass(value, Persistent)
            and "__slots__" not in value.__dict__
            and all("__setstate__" not in k.__dict__ for k in value.__mro__[:-1])
        ):
            value.__setstate__ = _setstate_with_defaults  # type: ignore[attr-defined]
