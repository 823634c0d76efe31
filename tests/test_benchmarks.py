"""The benchmark suite's quick mode runs and produces every system's row (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import SHOWN
from tests.conftest import run


def test_quick_benchmarks_produce_every_row(tmp_path: Path) -> None:
    out_json = tmp_path / "results.json"
    out = run(["-m", "benchmarks", "--quick", "--json", str(out_json)], timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads(out_json.read_text())["results"]
    for workload, systems in SHOWN.items():
        for system in systems:
            assert results[workload][system]["10000"], (workload, system)
    commit = results["commit"]["durable_heap"]["10000"]
    assert commit["median_ms"] > 0 and 0 < commit["bytes_per_commit"] < 2048
    assert "### Targets" in out.stdout


def test_quick_deploy_benchmark() -> None:
    out = run(["-m", "benchmarks.deploy", "--quick", "--reps", "3", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [r["size"] for r in data["rows"]] == [1_000, 10_000]
    for row in data["rows"]:
        assert row["deploy_ms"] > 0 and row["deploy_migrate_ms"] > 0
        assert row["versions"] == 1 + 2 * (3 + 2)  # the first load, then every timed deploy
    assert set(data["ratios"]) == {"deploy_ms", "deploy_migrate_ms"}


def test_zeo_loads_counts_the_messages_of_a_commit() -> None:
    out = run(["-m", "benchmarks.zeo_loads", "--size", "2000", "--commits", "20"], timeout=300)
    assert out.returncode == 0, out.stderr
    ours, raw = out.stdout.splitlines()
    assert ours.startswith("durable_heap Dict over ZEO:") and "ping (round trip) 1" in ours
    assert raw.startswith("raw ZEO") and "ping" not in raw and "vote (round trip) 1" in raw


def test_quick_threads_benchmark() -> None:
    """Threads committing at once, on this disk and with the 2 ms fsync library."""
    out = run(["-m", "benchmarks.threads", "--quick", "--json", "-"], timeout=300)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout.splitlines()[-1])["runs"]
    assert sorted(runs) == sorted(f"{d}|{n}|{s}" for d in (0.0, 2.0) for n in (2,)
                                  for s in ("durable_heap", "raw_zodb", "sqlite"))
    for key, (r,) in runs.items():
        assert r["commits_per_s"] > 0, key
        if not key.endswith("sqlite"):  # sqlite's fsyncs are in C: not counted
            assert 0 < r["fsyncs_per_commit"] <= 1.5, (key, r)  # counted over the same interval


def test_quick_follow_benchmark() -> None:
    out = run(["-m", "benchmarks.follow", "--quick", "--json"], timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    data = json.loads(out.stdout)
    assert data["plain_read_only_us"] > 0 and data["following_idle_us"] > 0
    assert data["catch_up_per_commit_us"] > 0 and data["batch"] == 100


def test_quick_async_tasks_benchmark() -> None:
    out = run(["-m", "benchmarks.async_tasks", "--quick", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert [(r["workers"], r["mode"]) for r in rows] == [
        (n, mode) for n in (1, 4) for mode in ("tasks", "to_thread", "threads")]
    for row in rows:
        assert row["verified"] and row["commits"] == 80 and row["commits_per_s"] > 0, row
        assert row["ticks"] > 0 and 0 <= row["lag_median_ms"] <= row["lag_worst_ms"], row


def test_quick_checksum_benchmark() -> None:
    out = run(["-m", "benchmarks.checksum", "--quick", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = ("heap_read_us", "heap_commit_ms", "hot_load_us", "commit_ms", "commit_cpu_ms", "open_index_ms",
            "open_scan_ms")
    for row in rows:
        assert data[row]["zodb"] > 0 and data[row]["durable_heap"] > 0, row
        assert "overhead_pct" in data[row]


def test_quick_ops_benchmark() -> None:
    out = run(["-m", "benchmarks.ops", "--quick", "--only", "verify", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert all(data["seconds"][k] > 0 for k in ("verify", "fsrefs", "backup", "repozo"))
    assert data["verify_over_fsrefs"] > 0 and data["backup_over_repozo"] > 0
    out = run(["-m", "benchmarks.ops", "--only", "exchange", "--entries", "500", "--rounds", "1", "--json"],
              timeout=300)
    assert out.returncode == 0, out.stderr
    x = json.loads(out.stdout)["exchange"]
    assert all(x["seconds"][k] > 0 for k in ("export", "json_dump", "import", "sqlite"))
    assert x["bytes"]["export_json"] == x["bytes"]["json_dump"] + 1  # the same JSON, and a newline
    assert x["peak_rss_mb"]["import"] > 0
def test_quick_serve_benchmark_measures_both_systems() -> None:
    out = run(["-m", "benchmarks.serve", "--quick", "--client", "httpx", "--requests", "60", "--json"],
              timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {r["system"] for r in data["rows"]} == {"durable_heap", "sqlite"}
    for row in data["rows"]:
        assert row["errors"] == 0 and row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert data["summary"][0]["rps_ratio"] > 0


@pytest.mark.slow
def test_quick_workflows_benchmark() -> None:
    out = run(["-m", "benchmarks.workflows", "--quick", "--json"], timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    steps = data["steps"]["durable_heap"]
    assert steps["plain"] > 0 and all(steps[str(n)] > 0 for n in (0, 1, 3, 10))
    assert data["wake"]["same_process_filestorage"]["p50_ms"] > 0 and data["wake"]["over_zeo"]["n"] == 20
    assert data["scale"]["full"]["timers"] >= 2 * data["scale"]["n"]  # its timers are all there
    assert set(data["replay"]) == {"10", "100"}
    assert data["deploy"]["unchanged_s"] > 0 and data["deploy"]["changed_s"] > 0


def test_quick_rewrite_benchmark() -> None:
    out = run(["-m", "benchmarks.rewrite", "--quick", "--reps", "1", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["rows"]
    assert row["size"] == 2_000 and row["durable_heap_s"] > 0 and row["raw_zodb_s"] > 0


def test_tail_benchmark_interleaves_both_systems() -> None:
    out = run(["-m", "benchmarks.tail", "--sizes", "2000", "--commits", "20"], timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 2,000 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["durable_heap", "raw_zodb"]
    assert all(r.split("|")[6].strip() == "0.00" for r in rows)  # full caches: nothing loaded
    assert all(int(r.split("|")[8].strip().replace(",", "")) > 0 for r in rows)  # bytes per commit
    assert out.stdout.count("median wall") == 1 and "mean CPU" in out.stdout


@pytest.mark.slow
def test_cold_start_benchmark_runs_every_case() -> None:
    out = run(["-m", "benchmarks.cold", "--rounds", "1", "--size", "1000"], timeout=300)
    assert out.returncode == 0, out.stderr
    cases = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    assert cases == ["bare", "import", "open sqlite3", "open raw ZODB", "open durable_heap",
                     "call python", "call cli"]
    assert "`import durable_heap`" in out.stdout and "`durable-heap call`" in out.stdout


def test_every_system_has_its_own_plot_colour() -> None:
    from benchmarks.style import COLOURS, SPARE, colour, style
    from benchmarks.systems import SYSTEMS

    assert set(SYSTEMS) <= set(COLOURS)
    given = [colour(s) for s in SYSTEMS]
    assert len(set(given)) == len(given), "two systems share a plot colour"
    assert not set(SPARE) & set(COLOURS.values())
    assert colour("a_new_system") in SPARE and colour("a_new_system") == colour("a_new_system")
    markers = [style(s)["marker"] for s in COLOURS]
    assert len(set(markers)) == len(markers)


def test_the_commit_plot_draws_each_system_in_its_own_colour() -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in CI
    import matplotlib.pyplot as plt  # in the test extra: absent, this fails loudly

    from benchmarks.__main__ import commit_figure
    from benchmarks.style import colour

    results = {"commit": {s: {"10000": {"median_ms": 1.0 + i, "bytes_per_commit": 100.0 + i},
                              "100000": {"median_ms": 2.0 + i, "bytes_per_commit": 200.0 + i}}
                          for i, s in enumerate(SHOWN["commit"])}}
    fig = commit_figure(plt, results, "median_ms", "ms")
    try:
        lines = fig.axes[0].get_lines()
        assert len(lines) == len(SHOWN["commit"]) > 10  # more than matplotlib's ten-colour cycle
        colours = [line.get_color() for line in lines]
        assert colours == [colour(s) for s in SHOWN["commit"]] and len(set(colours)) == len(colours)
        assert [line.get_xdata().tolist() for line in lines][0] == [10000, 100000]
    finally:
        plt.close(fig)


def test_quick_inline_benchmark() -> None:
    out = run(["-m", "benchmarks.inline", "--quick", "--json"], timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for system in ("flat", "nested", "records", "sqlite"):
        assert data[system]["cpu_s"] > 0 and data[system]["bytes_per_commit"] > 0, system
    assert data["nested"]["file_mb"] < data["records"]["file_mb"]  # inline: fewer bytes
    assert all(v > 0 for v in data["ratios"].values())
