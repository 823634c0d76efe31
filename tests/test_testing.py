"""durable_heap.testing and its pytest plugin, as a user's own tests use them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import durable_heap as dh
from durable_heap.testing import load_program, subprocess_env, temporary_heap, zeo_server


def test_testing_imports_without_pytest() -> None:
    code = "import sys, durable_heap.testing; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), check=True)
    assert out.stdout.strip() == "False"


def test_temporary_heap_is_a_real_file_removed_afterwards() -> None:
    with temporary_heap() as heap:
        path = str(heap.target)
        assert os.path.exists(path)
        with heap.transaction() as state:
            state.n = 1
    assert not os.path.exists(path)
    assert heap.status is dh.HeapStatus.CLOSED


def test_load_program_deploys_and_calls() -> None:
    with temporary_heap() as heap:
        app = load_program(heap, """
            from durable_heap import state
            state.setdefault("count", 0)

            def count():
                state.count += 1
                return state.count
        """)
        assert [app.call("count"), app.call("count")] == [1, 2]
        assert [v.number for v in heap.versions("app")] == [1]


def test_zeo_server_serves_two_heaps_and_restarts() -> None:
    with zeo_server() as server:
        with dh.open(server.url) as one, dh.open(server.url) as two:
            with one.transaction() as state:
                state.n = 1
            assert two.state.n == 1
        server.kill()
        server.start()
        with dh.open(server.url) as again:
            assert again.state.n == 1


def test_the_pytest_plugin_gives_users_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        def test_uses_the_fixtures(heap, reopen, heap_path, zeo_server):
            with heap.transaction() as state:
                state.n = 1
            assert reopen(heap).state.n == 1
            assert heap_path.exists()
            assert zeo_server.url.startswith("zeo://127.0.0.1:")
    """))
    eps = {ep.value for ep in metadata.entry_points(group="pytest11")}
    args = [] if "durable_heap.pytest_plugin" in eps else ["-p", "durable_heap.pytest_plugin"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                          "test_user.py"], cwd=tmp_path, capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
