"""Shared helpers: the CLI and scripts in subprocesses (fixtures: durable_heap.pytest_plugin)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, source: str) -> Path:
    """Write a program file (its text dedented)."""
    path.write_text(textwrap.dedent(source))
    return path


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


# --- a real ZEO server: durable_heap.testing's, fixtures from its pytest plugin ------------
# (heap_path, heap, reopen and zeo_server come from durable_heap.pytest_plugin, loaded
# by the root conftest.py: one set of fixtures for users' tests and ours.)

from durable_heap.testing import ZeoServer  # noqa: E402 - re-exported for the tests

__all__ = ["ROOT", "ZeoServer", "cli", "run", "write"]
