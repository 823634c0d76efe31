"""durable_heap's pytest plugin: fixtures over `durable_heap.testing`.

Registered through the ``pytest11`` entry point when durable_heap is installed,
so a project's tests can ask for these fixtures without a conftest:

* ``heap_path``: where a test's heap file goes (``<tmp_path>/data/heap.fs``);
* ``heap``: a heap on a real FileStorage at ``heap_path``, closed afterwards;
* ``reopen``: ``reopen(heap)`` closes a heap and opens its file again;
* ``zeo_server``: a real ``durable-heap zeo`` server on a free loopback port
  (a `durable_heap.testing.ZeoServer`: ``.url``, ``.kill()``, ``.start()``);
* ``postgres_cluster``: one throwaway PostgreSQL cluster for the whole test run
  (a `durable_heap.testing.PostgresCluster`), and ``postgresql_url``: a new
  database in it for each test, as a ``postgresql://`` target. Where PostgreSQL
  cannot run the tests that use them are skipped, saying why; with ``CI=true``
  they fail instead, so that CI never passes without them.

A fixture of the same name in a project's own conftest.py takes precedence.
This module imports pytest; `durable_heap.testing` does not.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import durable_heap as dh

from .testing import PostgresCluster, ZeoServer, postgres_unavailable

__all__ = ["heap", "heap_path", "postgres_cluster", "postgresql_url", "reopen", "require_postgres",
           "zeo_server"]


@pytest.fixture
def heap_path(tmp_path: Path) -> Path:
    """The path of the test's heap file (its folder does not exist yet)."""
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
def reopen(heap_path: Path) -> Iterator[Callable[[dh.Heap], dh.Heap]]:
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


@pytest.fixture
def zeo_server(tmp_path: Path) -> Iterator[ZeoServer]:
    """A real ZEO server (``durable-heap zeo``) on 127.0.0.1, a free port, a fresh heap file."""
    server = ZeoServer(tmp_path / "server" / "app.fs")
    server.start()
    try:
        yield server
    finally:
        server.close()


def require_postgres() -> None:
    """Skip the calling test where PostgreSQL cannot run (fail under ``CI=true``)."""
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and PostgreSQL cannot run: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL cannot run here: {reason}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the whole run (started once, stopped at the end)."""
    require_postgres()
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


_databases = itertools.count(1)


@pytest.fixture
def postgresql_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A ``postgresql://`` target of a new, empty database, dropped after the test."""
    name = f"test_{os.getpid()}_{next(_databases)}"
    if not postgres_cluster.running():  # a test stopped it and failed before starting it again
        postgres_cluster.start()
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        if postgres_cluster.running():
            postgres_cluster.drop_database(name)
