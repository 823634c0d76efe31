"""postgresql:// heaps on RelStorage, against a real PostgreSQL cluster the tests start.

The cluster (`durable_heap.testing.PostgresCluster`) runs once for the session
(the ``postgres_cluster`` fixture); each test gets its own database
(``postgresql_url``). Where PostgreSQL cannot run, these tests are skipped with
the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import durable_heap as dh
from durable_heap._targets import parse_target
from durable_heap.pytest_plugin import require_postgres
from durable_heap.testing import PostgresCluster
from tests.conftest import ROOT, cli, run, write
from tests.test_zeo import _results, _start_workers, merge_or_conflict

#: DURABLE_HEAP_SOAK=1: the restart test restarts the server 20 times instead of twice.
SOAK = os.environ.get("DURABLE_HEAP_SOAK", "") not in ("", "0")

# --- targets (no server needed) -----------------------------------------------------------


def test_targets_parse_with_the_password_kept_out_of_every_text() -> None:
    t = parse_target("postgresql://ann:s%3Acret@db.example:6543/app?keep_history=0")
    assert (t.scheme, t.location, t.password) == ("postgresql", "ann@db.example:6543/app", "s:cret")
    assert "s:cret" not in str(t) and "s:cret" not in repr(t) and "s%3Acret" not in repr(t)
    sock = parse_target("postgresql:///app?host=/run/postgresql")
    assert sock.location == "/app" and sock.options == {"host": "/run/postgresql"}
    assert parse_target("postgres://u@h/db").scheme == "postgresql"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("postgresql://ann:pw@host/", "names no database"),
        ("postgresql://ann:pw@host:99999/db", "the port must be a number"),
        ("postgresql://ann:pw@host/db?keep_history=maybe", "keep_history='maybe' must be 1 or 0"),
        ("postgresql://ann:pw@host/db?colour=red", "unknown option colour; a postgresql:// target takes"),
        ("postgresql://ann:pw@host/db?wait_timeout=0", "wait_timeout='0' must be a number > 0"),
        ("postgresql://ann:pw@host/db?host=/x", "names a host twice"),
        ("postgresql://ann:pw@host/db?sslmode=always", "sslmode='always' must be one of disable"),
        ("postgresql://ann:pw@host/db?read_only=1&read_only=0", "more than once"),
    ],
)
def test_bad_postgresql_targets_are_refused_before_connecting_without_the_password(
    target: str, message: str
) -> None:
    with pytest.raises(dh.UnknownTargetError, match=message) as info:
        dh.open(target)
    assert "pw" not in str(info.value).replace("postgresql", "")


def test_without_the_extra_the_error_names_it(tmp_path: Path) -> None:
    script = write(tmp_path / "no_extra.py", """
        import sys
        sys.modules["relstorage"] = None  # as if RelStorage were not installed
        import durable_heap as dh
        assert "relstorage" not in sys.modules or sys.modules["relstorage"] is None
        try:
            dh.open("postgresql://ann@127.0.0.1:1/db?wait_timeout=1")
        except dh.StorageError as exc:
            print(exc)
    """)
    out = run([str(script)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pip install 'durable-heap[postgresql]'" in out.stdout


def test_import_durable_heap_does_not_import_relstorage_or_psycopg2() -> None:
    out = run(["-c", "import sys, durable_heap; print(sorted(m for m in ('relstorage', 'psycopg2') "
                     "if m in sys.modules))"])
    assert out.stdout.strip() == "[]", out.stderr


# --- one process ------------------------------------------------------------------------------


def test_containers_actions_and_counter_survive_a_reopen(postgresql_url: str) -> None:
    with dh.open(postgresql_url) as heap:
        with heap.transaction() as state:
            state.users = {"ann": {"age": 3}}
            state.log = [1, 2]
            state.hits = dh.Counter()

        @heap.action
        def visit(name: str) -> None:
            heap.state.hits += 1
            heap.state.log.append(name)
            heap.state.users.setdefault(name, {"age": 0})

        visit("bob")
        visit("ann")
    with dh.open(postgresql_url) as heap:
        assert heap.state.users == {"ann": {"age": 3}, "bob": {"age": 0}}
        assert heap.state.log == [1, 2, "bob", "ann"]
        assert heap.state.hits == 2
        assert isinstance(heap.state.users, dh.Dict)
        notes = [d["description"] for d in heap.db.undoLog(0, 5)]
        assert any("visit('ann')" in str(n) for n in notes)


def test_read_only_reads_and_refuses_writes_and_an_empty_database_clearly(postgresql_url: str) -> None:
    with pytest.raises(dh.StorageError, match="no heap in the database .* cannot be opened read-only"):
        dh.open(postgresql_url + "&read_only=1")
    with dh.open(postgresql_url) as heap, heap.transaction() as state:
        state.x = 1
    for heap in (dh.open(postgresql_url + "&read_only=1"), dh.open(postgresql_url, read_only=True)):
        with heap:
            assert heap.state.x == 1
            with pytest.raises(dh.StorageError, match="read-only"):
                with heap.transaction() as state:
                    state.x = 2
    with dh.open(postgresql_url) as heap:
        assert heap.state.x == 1


def test_asyncio_tasks_over_postgresql(postgresql_url: str) -> None:
    """As over ZEO (tests/test_async.py): each task its own transaction, conflicts retried."""
    from tests.test_async import _gather_example, _racing_increments, _run

    with dh.open(postgresql_url) as heap:
        assert _gather_example(heap, use_async=True) == ["A start", "A end"]
        _run(_racing_increments(heap, 20), timeout=180)
        assert heap.state.n == 20


def test_pack_keeps_the_current_state_and_drops_old_revisions(postgresql_url: str) -> None:
    with dh.open(postgresql_url) as heap:
        for i in range(5):
            with heap.transaction() as state:
                state.x = i
                state.setdefault("items", []).append(i)
        then = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(0.05)
        with heap.transaction() as state:
            state.x = 99
        assert len(heap.db.undoLog(0, 100)) >= 7
        heap.pack(days=0)  # the default keeps a week
        assert heap.state.x == 99 and heap.state.items == [0, 1, 2, 3, 4]
        assert heap.db.undoLog(0, 100) == []
        with pytest.raises(dh.StorageError, match="removed by a pack"):
            with heap.state_at(then):
                pass
    with dh.open(postgresql_url) as heap:
        assert heap.state.x == 99


def test_cache_and_lock_options_reach_relstorage(postgresql_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "rs-cache"
    url = f"{postgresql_url}&cache_local_mb=5&cache_dir={cache}&commit_lock_timeout=7"
    for _ in range(2):  # the second open reads the persistent cache files the first wrote
        with dh.open(url) as heap:
            with heap.transaction() as state:
                state.n = state.get("n", 0) + 1
            opts = heap.db.storage._options  # RelStorage's Options
            assert (opts.cache_local_mb, opts.cache_local_dir, opts.commit_lock_timeout) == (
                5, str(cache), 7)
            assert opts.keep_history is True
    assert cache.is_dir() and (cache.stat().st_mode & 0o777) == 0o700
    with dh.open(postgresql_url) as heap:
        assert heap.state.n == 2


def test_state_at_a_past_time_reads_that_time_not_the_current_value(postgresql_url: str) -> None:
    """The bug of issue 16: RelStorage's stale lastTransaction() made state_at(t) show x=2."""
    with dh.open(postgresql_url) as heap:
        with heap.transaction() as state:
            state.x = 1
        time.sleep(0.05)
        then = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(0.05)
        with heap.transaction() as state:
            state.x = 2
        with heap.state_at(then) as old:
            assert old.x == 1
        # A time after the last commit (as seen by a fresh view) is the newest state.
        with heap.state_at(datetime.datetime.now(datetime.timezone.utc)) as now:
            assert now.x == 2
    # Another process commits; this heap's own storage has not polled since.
    with dh.open(postgresql_url) as heap:
        assert heap.state.x == 2
        with dh.open(postgresql_url) as other, other.transaction() as state:
            state.x = 3
        with heap.state_at(datetime.datetime.now(datetime.timezone.utc)) as now:
            assert now.x == 3


def test_history_free_database_refuses_state_at_and_inspect_at_clearly(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres_cluster.create_database(f"free_{os.getpid()}", keep_history="0")
    app = write(tmp_path / "app.py", """
        from durable_heap import state
        state.setdefault("n", 0)
        def bump():
            state.n += 1
            return state.n
    """)
    try:
        assert cli("call", str(app), "bump", "--storage", url, cwd=tmp_path).stdout.strip() == "1"
        with dh.open(url) as heap:
            assert heap.state.n == 1
            with pytest.raises(dh.StorageError, match="keeps no history") as info:
                with heap.state_at(datetime.datetime.now(datetime.timezone.utc)):
                    pass
            assert "keep_history=0" in str(info.value)
        out = cli("inspect", str(app), "--at", "1", "--storage", url, cwd=tmp_path)
        assert out.returncode != 0 and "keeps no history" in out.stderr, out.stderr
        # The other mode's target is refused, naming the option that opens it.
        with pytest.raises(dh.StorageError, match=r"history-free RelStorage heap.*\?keep_history=0"):
            dh.open(url.replace("&keep_history=0", ""))
    finally:
        postgres_cluster.drop_database(f"free_{os.getpid()}")


def test_cli_deploy_call_versions_and_inspect_at_a_version(postgresql_url: str, tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", """
        from durable_heap import state
        state.setdefault("n", 0)
        def bump():
            state.n += 1
            return state.n
    """)
    env = {"DURABLE_HEAP_STORAGE": postgresql_url}
    assert cli("call", str(app), "bump", cwd=tmp_path, env=env).stdout.strip() == "1"
    assert cli("call", str(app), "bump", cwd=tmp_path, env=env).stdout.strip() == "2"
    write(tmp_path / "app.py", app.read_text().replace("state.n += 1", "state.n += 10"))
    assert cli("call", str(app), "bump", cwd=tmp_path, env=env).stdout.strip() == "12"
    versions = cli("versions", str(app), cwd=tmp_path, env=env)
    assert versions.returncode == 0 and "2" in versions.stdout, versions.stderr
    old = cli("inspect", str(app), "--at", "1", cwd=tmp_path, env=env)
    assert old.returncode == 0, old.stderr
    assert "2" in old.stdout and "12" not in old.stdout
    now = cli("inspect", str(app), cwd=tmp_path, env=env)
    assert now.returncode == 0 and "12" in now.stdout, now.stderr
    types = cli("types", str(app), cwd=tmp_path, env=env)
    assert types.returncode == 0 and "n: int" in types.stdout, types.stdout + types.stderr
    assert postgresql_url.split("?")[0] not in types.stderr  # no noise from RelStorage


# --- errors -------------------------------------------------------------------------------------


def test_no_server_fails_after_the_wait_timeout_naming_host_and_port() -> None:
    require_postgres()
    start = time.monotonic()
    with pytest.raises(dh.ServerUnavailableError, match=r"127\.0\.0\.1:1 .*within 1 s") as info:
        dh.open("postgresql://ann:secret@127.0.0.1:1/db?wait_timeout=1")
    assert 0.9 <= time.monotonic() - start < 15
    assert "secret" not in str(info.value)


def test_a_server_started_late_is_waited_for(tmp_path: Path) -> None:
    require_postgres()
    cluster = PostgresCluster()
    try:
        cluster.start()
        url = cluster.create_database("late")
        cluster.stop()
        script = write(tmp_path / "late.py", f"""
            import durable_heap as dh
            with dh.open({url + "&wait_timeout=60"!r}) as heap, heap.transaction() as state:
                state.n = 1
            print("opened")
        """)
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting
        cluster.start()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip() == "opened", err
    finally:
        cluster.close()


def test_refused_login_missing_database_and_the_password_sources(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    role, db = f"ann_{os.getpid()}", f"owned_{os.getpid()}"
    postgres_cluster.create_role(role, "right pass")
    postgres_cluster.execute(f'CREATE DATABASE "{db}" OWNER "{role}"')
    try:
        with pytest.raises(dh.StorageError, match="refused the login") as info:
            dh.open(postgres_cluster.tcp_url(db, role, "wrong-pass"))
        assert "wrong-pass" not in str(info.value) and "PGPASSWORD" in str(info.value)
        start = time.monotonic()
        with pytest.raises(dh.StorageError, match="refused the connection") as no_tls:
            dh.open(postgres_cluster.tcp_url(db, role, "right pass", sslmode="require"))
        assert not isinstance(no_tls.value, dh.ServerUnavailableError)
        assert time.monotonic() - start < 15  # refused at once, not waited on as a missing server
        with pytest.raises(dh.StorageError, match="does not exist") as missing:
            dh.open(postgres_cluster.tcp_url("nowhere", role, "right pass"))
        assert "createdb nowhere" in str(missing.value)
        # The password in the URL; then from PGPASSWORD; then from a pgpass file.
        with dh.open(postgres_cluster.tcp_url(db, role, "right pass")) as heap:
            with heap.transaction() as state:
                state.n = 1
            assert "right pass" not in repr(heap.target) + str(heap.target)
        script = write(tmp_path / "pw.py", f"""
            import durable_heap as dh
            with dh.open({postgres_cluster.tcp_url(db, role)!r}) as heap:
                print(heap.state.n)
        """)
        assert run([str(script)], env={"PGPASSWORD": "right pass"}).stdout.strip() == "1"
        pgpass = tmp_path / "pgpass"
        pgpass.write_text(f"127.0.0.1:{postgres_cluster.port}:{db}:{role}:right pass\n")
        pgpass.chmod(0o600)
        out = run([str(script)], env={"PGPASSFILE": str(pgpass)})
        assert out.stdout.strip() == "1", out.stderr
        nopass = run([str(script)], env={"PGPASSFILE": str(tmp_path / "none")})
        assert nopass.returncode != 0 and "refused the login" in nopass.stderr
    finally:
        postgres_cluster.drop_database(db)
        postgres_cluster.execute(f'DROP ROLE "{role}"')


# --- many processes, one heap (the ZEO tests' workers, on PostgreSQL) ---------------------------


@pytest.mark.slow
def test_four_processes_int_counter_and_containers_lose_nothing(postgresql_url: str) -> None:
    with dh.open(postgresql_url) as heap:
        with heap.transaction() as state:
            state.count = 0
            state.hits = dh.Counter()
            state.big = {f"seed-{i}": i for i in range(100)}
            state.log = [f"seed-{i}" for i in range(100)]
        ints = _results(_start_workers("int", postgresql_url, 20, 4))
        assert sum(r["acked"] for r in ints) == 80
        counters = _results(_start_workers("counter", postgresql_url, 20, 4))
        # Counter merges in the client process (RelStorage resolves conflicts there): no retries.
        assert sum(r["tries"] for r in counters) == sum(r["acked"] for r in counters) == 80
        _results(_start_workers("dict", postgresql_url, 20, 4))
        with heap.transaction() as state:
            assert state.count == 80 and state.hits == 80
            added = {f"w{k}-{i}" for k in range(4) for i in range(20)}
            assert set(state.big) == {f"seed-{i}" for i in range(100)} | added
            log = list(state.log)
        for k in range(4):
            assert [x for x in log if x.startswith(f"w{k}-")] == [f"w{k}-{i}" for i in range(20)]


def test_concurrent_changes_merge_in_the_client_or_conflict_clearly(postgresql_url: str) -> None:
    merge_or_conflict(postgresql_url)


def test_while_the_server_is_down_actions_fail_clearly_then_work_once_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_postgres()
    cluster = PostgresCluster()
    errors: list[str] = []
    try:
        cluster.start()
        cluster.create_role("ann", "pw-9f3k")
        cluster.execute('CREATE DATABASE down OWNER ann')
        url = cluster.tcp_url("down", "ann", "pw-9f3k", wait_timeout="1")
        with dh.open(url) as heap:

            @heap.action
            def bump() -> int:
                heap.state.n = heap.state.get("n", 0) + 1
                return int(heap.state.n)

            assert bump() == 1
            cluster.restart("immediate")  # while the heap is idle: as a crash and recovery
            assert bump() == 2  # its dead connections are replaced, no error
            cluster.stop()
            with pytest.raises(dh.ServerUnavailableError, match="lost the connection to the PostgreSQL") as a:
                bump()  # not retried as a conflict: one clear error
            with pytest.raises(dh.ServerUnavailableError) as b:
                bump()  # still down: still clear
            errors += [str(a.value), str(b.value), repr(heap), str(heap.target)]
            cluster.start()
            assert bump() == 3  # the next action connects again: nothing counted twice
            assert heap.state.n == 3
            errors += [str(d["description"]) for d in heap.db.undoLog(0, 10)]
    finally:
        cluster.close()
    assert "127.0.0.1" in errors[0]
    shown = errors + [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert not [line for line in shown if "pw-9f3k" in line]


@pytest.mark.slow
def test_four_processes_creating_one_heap_at_once(postgresql_url: str) -> None:
    results = _results(_start_workers("fresh", postgresql_url, 5, 4))
    assert sum(r["acked"] for r in results) == 20
    with dh.open(postgresql_url) as heap:
        assert heap.state.count == 20


@pytest.mark.slow
def test_database_restarted_mid_run_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    """Two processes commit mixed actions while the server is killed (as a crash) and
    restarted, or stopped fast and restarted, twice, and again until each process has
    met a restart: every acknowledged action is there, none reported as not committed
    is, every error is a clear ServerUnavailableError, and each worker commits again after."""
    require_postgres()
    cluster = PostgresCluster()
    try:
        cluster.start()
        url = cluster.create_database("faults") + "&wait_timeout=60"
        with dh.open(url) as heap, heap.transaction() as state:
            state.count = 0
            state.hits = dh.Counter()
            state.items = []
            state.table = {}
        met = tmp_path / "met"  # a worker creates met/<id> when an action first meets a restart
        met.mkdir()
        procs = _start_workers("faults", url, 0, 2, env={"DURABLE_HEAP_TEST_MET": str(met)})
        # A worker backing off from a conflict (up to 0.5 s) can sleep through a short
        # restart: go on restarting (at most 12 times) until each one has met one.
        restarts = 20 if SOAK else 2
        for n in range(max(restarts, 12)):
            if n >= restarts and len(list(met.iterdir())) == len(procs):
                break
            time.sleep(1.5)
            cluster.restart(("immediate", "fast")[n % 2])
        time.sleep(1.0)
        for p in procs:
            p.stdin.write("stop\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        summaries: list[dict[str, Any]] = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            summaries.append(json.loads(out.strip().splitlines()[-1]))
        with dh.open(url) as heap:
            table = dict(heap.state.table)
            items = list(heap.state.items)
            count, hits = heap.state.count, int(heap.state.hits)
        for wid, summary in enumerate(summaries):
            assert summary["last"] == "acked", summary  # it recovered
            clear = {"ServerUnavailableError(none)", "ServerUnavailableError(unknown)"}
            assert set(summary["errors"]) <= clear, summary["examples"]
            assert summary["errors"], "no action met the restarts: the test did not test them"
            for i in summary["acked"]:
                assert f"{wid}-{i}" in table and f"{wid}-{i}" in items
            for i in summary["not_committed"]:
                assert f"{wid}-{i}" not in table
        acked = sum(len(s["acked"]) for s in summaries)
        doubt = sum(len(s["in_doubt"]) for s in summaries)
        assert acked <= count <= acked + doubt and count == hits == len(items)
    finally:
        cluster.close()


# --- durable-heap copy --------------------------------------------------------------------------


def _history(storage_target: str) -> list[tuple[bytes, str, list[tuple[bytes, bytes]]]]:
    """Every transaction of a heap: (tid, note, [(oid, record without seal)])."""
    from durable_heap._integrity import strip
    from durable_heap._storage import open_storage
    from durable_heap._targets import parse_target

    storage = open_storage(parse_target(storage_target), read_only=True)
    try:
        out = []
        for txn in storage.iterator():
            note = txn.description.decode() if isinstance(txn.description, bytes) else txn.description
            out.append((txn.tid, note, sorted((r.oid, strip(r.data)) for r in txn)))
        return out
    finally:
        storage.close()


@pytest.mark.slow
def test_copy_file_to_postgresql_and_back_keeps_every_record_and_the_history(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    source = tmp_path / "app.fs"
    with dh.open(source) as heap:
        with heap.transaction() as state:
            state.x = 1
            state.big = {f"k{i}": i for i in range(200)}
        then = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(0.05)

        @heap.action
        def change(i: int) -> None:
            heap.state.x = i
            heap.state.big[f"k{i}"] = -i

        for i in range(2, 7):
            change(i)
    pg = postgres_cluster.create_database(f"copy_{os.getpid()}")
    back = tmp_path / "back.fs"
    try:
        out = cli("copy", str(source), pg, "--no-progress")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("copied 8 transactions"), out.stdout
        original = _history(str(source))
        assert _history(pg) == original  # same ids, notes and records, in order
        with dh.open(pg) as heap:
            assert heap.state.x == 6 and heap.state.big["k3"] == -3
            with heap.state_at(then) as old:  # the history came along
                assert old.x == 1 and old.big["k3"] == 3
        again = cli("copy", str(source), pg)
        assert again.returncode != 0 and "already holds a heap" in again.stderr
        from durable_heap._copy import copy

        result = copy(pg, str(back), progress=True)  # the progress bar's scan first, then the copy
        assert (result.transactions, result.records) == (8, sum(len(r) for _, _, r in original))
        assert _history(str(back)) == original
        with dh.open(back) as heap:  # a checked, sealed FileStorage again
            assert heap.state.x == 6
            with heap.state_at(then) as old:
                assert old.x == 1
    finally:
        postgres_cluster.drop_database(f"copy_{os.getpid()}")


# --- the allowlist in RelStorage's conflict resolution --------------------------------------------


def test_a_crafted_record_in_relstorage_conflict_resolution_runs_nothing(
    postgresql_url: str, tmp_path: Path
) -> None:
    """RelStorage resolves conflicts in the committing process, through its own resolver
    object (not the storage's tryToResolveConflict): the allowlist guards it too."""
    import transaction
    import ZODB.POSException
    from BTrees.OOBTree import OOBucket

    from tests.test_allow import Shell

    marker = tmp_path / "marker"
    with dh.open(postgresql_url) as heap:
        with heap.transaction() as state:
            state.bucket = OOBucket({"x": 1})  # resolves its own conflicts
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        one, two = heap.db.open(transaction_manager=tm1), heap.db.open(transaction_manager=tm2)
        try:
            b1, b2 = one.root()["durable_heap.state"].bucket, two.root()["durable_heap.state"].bucket
            b1["a"], b2["b"] = Shell(marker), 2
            tm1.commit()  # the crafted state is committed ...
            with pytest.raises(ZODB.POSException.ConflictError):
                tm2.commit()  # ... and never unpickled to merge
            tm2.abort()
        finally:
            one.close()
            two.close()
    assert not marker.exists()


# --- the benchmark runs (no timing asserted) ------------------------------------------------------


@pytest.mark.slow
def test_postgresql_benchmark_produces_every_row(postgres_cluster: PostgresCluster) -> None:
    systems = "dh_pg,raw_pg,dh_pg_free,raw_pg_rpc4,dh_zeo,raw_zeo,dh_file,raw_file"
    out = run(["-m", "benchmarks.postgresql", "--sizes", "300", "--commits", "3", "--rounds", "1",
               "--systems", systems], timeout=600)
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)["300"]
    assert set(table) == set(systems.split(","))
    assert table["raw_pg"]["ratio_to_raw_pg"] == 1.0 and all(r["median_ms"] > 0 for r in table.values())
    out = run(["-m", "benchmarks.postgresql", "--clients", "1,2", "--seconds", "1", "--sizes", "200"],
              timeout=600)
    assert out.returncode == 0, out.stderr
    rates = json.loads(out.stdout)
    assert set(rates) == {"dh_pg", "dh_zeo"} and all(v > 0 for r in rates.values() for v in r.values())


def test_copy_into_a_history_free_database_keeps_the_current_state(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    source = tmp_path / "app.fs"
    with dh.open(source) as heap:
        for i in range(5):
            with heap.transaction() as state:
                state.x = i
                state.setdefault("items", []).append(i)
    name = f"free_copy_{os.getpid()}"
    free = postgres_cluster.create_database(name, keep_history="0")
    try:
        out = cli("copy", str(source), free)
        assert out.returncode == 0, out.stderr
        assert out.stderr == ""  # no progress bar when stderr is not a terminal
        with dh.open(free) as heap:
            assert heap.state.x == 4 and heap.state.items == [0, 1, 2, 3, 4]
            with pytest.raises(dh.StorageError, match="keeps no history"):
                with heap.state_at(datetime.datetime.now(datetime.timezone.utc)):
                    pass
        same = cli("copy", str(source), str(source))
        assert same.returncode != 0 and "onto itself" in same.stderr
    finally:
        postgres_cluster.drop_database(name)


def test_lost_connections_are_told_from_the_servers_own_errors(postgres_cluster: PostgresCluster) -> None:
    """The error map's rule on real psycopg2 errors: a dropped connection is a lost server
    (ServerUnavailableError), an error the server reports is a storage fault."""
    import psycopg2

    from durable_heap._errormap import disconnected, is_fault

    conn = postgres_cluster.connect()
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as bad_sql:
                cur.execute("SELECT * FROM no_such_table")
            assert is_fault(bad_sql.value) and not disconnected(bad_sql.value)
            pid = conn.get_backend_pid()
            postgres_cluster.execute("SELECT pg_terminate_backend(%s)", pid)
            with pytest.raises(psycopg2.Error) as dropped:
                cur.execute("SELECT 1")
            assert disconnected(dropped.value) and is_fault(dropped.value)
    finally:
        conn.close()


# --- durable execution's scheduler (issue 14) over PostgreSQL --------------------------------------

PG_TIMERS = """
import sys, os
import durable_heap as dh
heap = dh.open(sys.argv[1])

@heap.action
def fire(n):
    heap.state.fired[n] = heap.state.fired.get(n, 0) + 1
    heap.state.by[os.getpid()] = heap.state.by.get(os.getpid(), 0) + 1
"""


@pytest.mark.slow
def test_two_schedulers_over_postgresql_fire_each_timer_once(postgresql_url: str, tmp_path: Path) -> None:
    """As the ZEO test of the workflows suite: 200 timers, two processes running what is due."""
    from durable_heap.testing import subprocess_env

    (tmp_path / "pt.py").write_text(PG_TIMERS)
    env = subprocess_env({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    setup = ("import sys\nfrom pt import *\nwith heap.transaction() as s:\n"
             "    s.fired = {}\n    s.by = {}\n"
             "with heap.transaction():\n    [fire.invoke_in(1.5, n) for n in range(200)]\n")
    subprocess.run([sys.executable, "-c", setup, postgresql_url], cwd=tmp_path, env=env, check=True,
                   timeout=60)
    loop = ("import sys, time\nfrom pt import *\nt = time.time() + 1.6\n"
            "while time.time() < t: time.sleep(0.01)\n"
            "n = 0\nwhile True:\n    k = heap.run_due()\n    n += k\n    if not k: break\nprint(n)\n")
    procs = [subprocess.Popen([sys.executable, "-c", loop, postgresql_url], cwd=tmp_path, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert sum(int(o.strip() or 0) for o, _ in outs) == 200, outs
    with dh.open(postgresql_url) as heap:
        fired = dict(heap.state.fired)
        assert sorted(fired) == list(range(200)) and set(fired.values()) == {1}
        assert heap.timers() == []


@pytest.mark.slow
def test_copy_from_a_zeo_server_into_postgresql(zeo_server: Any, postgres_cluster: PostgresCluster) -> None:
    with dh.open(zeo_server.url) as heap:
        for i in range(3):
            with heap.transaction() as state:
                state.x = i
    name = f"from_zeo_{os.getpid()}"
    pg = postgres_cluster.create_database(name)
    try:
        out = cli("copy", zeo_server.url, pg)
        assert out.returncode == 0, out.stderr
        assert _history(pg) == _history(zeo_server.url)
        with dh.open(pg) as heap:
            assert heap.state.x == 2
    finally:
        postgres_cluster.drop_database(name)
