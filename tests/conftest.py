"""Shared fixtures: real FileStorage heaps in temporary folders, and the CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable_heap as dh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def heap_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "heap.fs"


@pytest.fixture
def heap(heap_path: Path) -> Iterator[dh.Heap]:
    """A heap on a real FileStorage in a temporary folder."""
    h = dh.open(heap_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def reopen(heap_path: Path):  # type: ignore[no-untyped-def]
    """Close a heap and open its file again (returns the new heap)."""
    opened: list[dh.Heap] = []

    def _reopen(h: dh.Heap) -> dh.Heap:
        h.close()
        new = dh.open(heap_path)
        opened.append(new)
        return new

    yield _reopen
    for h in opened:
        h.close()


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python module or script in a subprocess with this interpreter."""
    full_env = dict(os.environ)
    full_env.pop("DURABLE_HEAP_STORAGE", None)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``durable-heap ARGS...`` as a new process."""
    return run(["-m", "durable_heap", *args], cwd=cwd, env=env, timeout=timeout)
