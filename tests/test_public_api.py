"""The public surface: a flat, sorted, complete __all__, and a light import."""

from __future__ import annotations

import subprocess
import sys

import durable_heap
from durable_heap import _containers, _errors, _heap, _state


def test_all_is_sorted_and_complete() -> None:
    names = durable_heap.__all__
    assert names == sorted(names, key=str.lower) or names == sorted(names)
    for name in names:
        assert hasattr(durable_heap, name), name
    for module in (_containers, _errors, _heap, _state):
        for name in module.__all__:
            if not name.startswith("_") and name not in ("stable_hash",):
                assert name in names, f"{module.__name__}.{name} is not exported"


def test_errors_subclass_the_builtins_they_refine() -> None:
    assert issubclass(durable_heap.NotPersistableError, TypeError)
    assert issubclass(durable_heap.UnknownTargetError, ValueError)
    assert issubclass(durable_heap.ProgramNotFoundError, FileNotFoundError)
    for name in _errors.__all__:
        assert issubclass(getattr(_errors, name), durable_heap.DurableHeapError)


def test_import_stays_light() -> None:
    code = (
        "import sys, durable_heap\n"
        "heavy = ('ZEO', 'argparse', 'sqlite3', 'socket', 'durable_heap.cli')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_py_typed_is_shipped() -> None:
    from importlib import resources

    assert resources.files("durable_heap").joinpath("py.typed").is_file()


def test_import_is_lazy_and_every_name_resolves() -> None:
    """``import durable_heap`` loads no ZODB (issue 18: cold start); each name loads on use."""
    code = (
        "import sys, durable_heap as dh\n"
        "heavy = ('BTrees', 'ZODB', 'persistent', 'transaction', 'durable_heap._containers',\n"
        "         'durable_heap._heap', 'durable_heap._workflows', 'durable_heap._versions')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "missing = [n for n in dh.__all__ if n not in dir(dh)]\n"
        "from durable_heap import Dict\n"
        "print('BTrees' in sys.modules, missing, all(getattr(dh, n) is not None for n in dh.__all__))\n"
        "print(dh.Dict is Dict is sys.modules['durable_heap._containers'].Dict)\n"
        "try:\n"
        "    dh.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[]", "True [] True", "True", "module 'durable_heap' has no attribute 'no_such_name'",
    ]
