"""The durable-heap command, end to end, in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    dest = tmp_path / "counter.py"
    shutil.copy(ROOT / "examples" / "counter.py", dest)
    return dest


def test_counter_counts_across_processes(counter: Path) -> None:
    outs = [cli("call", str(counter), "count") for _ in range(3)]
    assert [o.stdout.strip() for o in outs] == ["1", "2", "3"], outs[-1].stderr
    assert all(o.returncode == 0 for o in outs)
    assert (counter.parent / ".durable-heap" / "counter.fs").is_file()


def test_storage_option_and_environment(counter: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "c.fs"
    assert cli("call", str(counter), "count", "--storage", str(other)).stdout.strip() == "1"
    assert cli("call", "--storage", str(other), str(counter), "count").stdout.strip() == "2"
    env = {"DURABLE_HEAP_STORAGE": f"file://{other}"}
    assert cli("call", str(counter), "count", env=env).stdout.strip() == "3"
    assert not (counter.parent / ".durable-heap").exists()


def test_arguments_and_results(tmp_path: Path) -> None:
    prog = write(tmp_path / "echo.py", """
        from durable_heap import state
        state.setdefault("seen", [])

        def echo(*args):
            state.seen.append(list(args))
            return {"args": list(args), "types": [type(a).__name__ for a in args]}

        def seen():
            return state.seen          # a durable List: printed as JSON

        def opaque():
            return object()
    """)
    out = cli("call", str(prog), "echo", "3", "x", "[1, 2]", '{"a": null}', "true", "--", "--storage")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "args": [3, "x", [1, 2], {"a": None}, True, "--storage"],
        "types": ["int", "str", "list", "dict", "bool", "str"],
    }
    seen = json.loads(cli("call", str(prog), "seen").stdout)
    assert seen == [[3, "x", [1, 2], {"a": None}, True, "--storage"]]
    assert cli("call", str(prog), "opaque").stdout.startswith("<object object at")


def test_missing_program_and_function(tmp_path: Path, counter: Path) -> None:
    out = cli("call", str(tmp_path / "nope.py"), "count")
    assert out.returncode == 2 and "no program file" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = cli("call", str(counter), "nope")
    assert out.returncode == 2 and "has no function 'nope' (its functions: count)" in out.stderr
    out = cli("frobnicate")
    assert out.returncode == 2


def test_program_that_raises_at_import(tmp_path: Path) -> None:
    prog = write(tmp_path / "bad.py", """
        from durable_heap import state
        state.before = 1
        x = 1 / 0
    """)
    out = cli("call", str(prog), "f")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert ("deploy of bad failed: its top level raised ZeroDivisionError: division by zero "
            "(bad.py, line 4)") in out.stderr
    out = cli("call", str(prog), "f", "--traceback")
    assert "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr
    syntax = write(tmp_path / "syn.py", "def f(:\n    pass\n")
    out = cli("call", str(syntax), "f")
    assert out.returncode == 1 and "syn.py, line 1: syntax error" in out.stderr


def test_function_that_raises_rolls_back(tmp_path: Path) -> None:
    prog = write(tmp_path / "acct.py", """
        from durable_heap import state
        state.setdefault("balance", 10)

        def withdraw(n):
            state.balance -= n
            if state.balance < 0:
                raise ValueError(f"insufficient funds for {n}")
            return state.balance
    """)
    assert cli("call", str(prog), "withdraw", "4").stdout.strip() == "6"
    out = cli("call", str(prog), "withdraw", "7")
    assert out.returncode == 1
    assert "withdraw() raised ValueError: insufficient funds for 7" in out.stderr
    assert cli("call", str(prog), "withdraw", "6").stdout.strip() == "0"


def test_unstorable_value_from_a_program(tmp_path: Path) -> None:
    prog = write(tmp_path / "keep.py", """
        from durable_heap import state
        state.setdefault("keep", {})

        def remember():
            state.keep["cb"] = lambda: 1
    """)
    out = cli("call", str(prog), "remember")
    assert out.returncode == 1
    assert "state.keep['cb'] cannot be stored" in out.stderr


def test_locked_heap_from_the_cli(counter: Path) -> None:
    import os
    import subprocess
    import sys

    target = counter.parent / ".durable-heap" / "counter.fs"
    code = (
        "import sys, durable_heap as dh; h = dh.open(sys.argv[1]); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        out = cli("call", str(counter), "count")
        assert out.returncode == 2 and "open in another process" in out.stderr and "zeo://" in out.stderr
    finally:
        holder.communicate("", timeout=30)


def test_inspect(tmp_path: Path) -> None:
    prog = write(tmp_path / "shop.py", """
        from durable_heap import state, Object

        class Item(Object):
            def __init__(self, name):
                self.name = name

        state.setdefault("items", {})
        state.setdefault("log", [])

        def fill(n):
            for i in range(n):
                state.items[f"i{i}"] = Item(f"item {i}")
            state.log.extend(range(n))
    """)
    assert cli("call", str(prog), "fill", "500").returncode == 0
    out = cli("inspect", str(prog), "--depth", "2", "--limit", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("state: durable_heap._state.State")
    assert "├── items: Dict (500 entries)" in lines
    assert "│   ├── 'i0': shop.Item" in lines
    assert "│   └── ... 497 more" in lines
    assert "└── log: List (500 items)" in lines
    out = cli("inspect", str(tmp_path / "none.py"))
    assert out.returncode == 2
    write(tmp_path / "fresh.py", "x = 1\n")
    out = cli("inspect", str(tmp_path / "fresh.py"))
    assert out.returncode == 2 and "no heap yet" in out.stderr


def test_program_name_clashing_with_a_module(tmp_path: Path) -> None:
    prog = write(tmp_path / "json.py", "def f():\n    return 1\n")
    out = cli("call", str(prog), "f")
    assert out.returncode == 1 and "also the name of an installed module" in out.stderr


def test_top_level_references_are_valid_in_the_function(tmp_path: Path) -> None:
    prog = write(tmp_path / "cfgprog.py", """
        import dataclasses
        from durable_heap import state

        @dataclasses.dataclass
        class Cfg:
            retries: int = 0

        CFG = state.setdefault("cfg", Cfg())   # a plain object taken at load

        def bump():
            CFG.retries += 1
            return CFG.retries
    """)
    outs = [cli("call", str(prog), "bump") for _ in range(3)]
    assert [o.stdout.strip() for o in outs] == ["1", "2", "3"], outs[-1].stderr


def test_read_only_commands_load_a_program_that_declares_crons_and_subscriptions(tmp_path: Path) -> None:
    """inspect, check, types and export load the deployed program, whose top level
    declares a cron and a subscription (as the docs' programs do): those joined the
    load's read-only transaction's place with their own, which ZODB refused
    (AlreadyInTransaction, reported as "raised at load: NoTransaction"). They now join
    it, and nothing is written."""
    prog = write(tmp_path / "news.py", """
        import durable_heap as dh
        from durable_heap import state

        state.setdefault("sent", [])

        def digest(kind):
            state.sent.append(kind)

        @dh.on("user.joined")
        def welcome(user):
            state.sent.append(user)

        weekly = dh.active_heap().action(digest).cron("0 9 * * 1", "weekly", tz="Europe/Paris")
    """)
    assert cli("deploy", str(prog)).returncode == 0
    heap_file = tmp_path / ".durable-heap" / "news.fs"
    size = heap_file.stat().st_size
    timers = cli("timers", str(prog))
    assert timers.returncode == 0 and "news.digest" in timers.stdout, timers.stderr
    header, row = timers.stdout.splitlines()[:2]  # a cron's long id widens the column
    assert row.index("20") == header.index("due (UTC)"), timers.stdout
    for command in (["inspect"], ["check"], ["types"], ["export"]):
        out = cli(*command, str(prog))
        assert out.returncode == 0, (command, out.stderr)
        assert "raised at load" not in out.stderr
    assert "sent: List (0 items)" in cli("inspect", str(prog)).stdout
    assert heap_file.stat().st_size == size  # read-only: nothing was committed
    assert cli("timers", str(prog)).stdout == timers.stdout


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    """``durable-heap inspect app.py | head`` reported "internal error: BrokenPipeError"."""
    import subprocess
    import sys

    prog = write(tmp_path / "big.py", """
        from durable_heap import state

        def fill():
            state.items = {f"k{i}": i for i in range(20000)}
    """)
    assert cli("call", str(prog), "fill").returncode == 0
    reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                              stdin=subprocess.PIPE)
    assert reader.stdin is not None
    writer = subprocess.run([sys.executable, "-m", "durable_heap", "inspect", str(prog), "--limit", "20000"],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    reader.stdin.close()
    reader.wait(10)
    assert writer.returncode == 141, writer.stderr  # 128 + SIGPIPE, as a Unix tool's
    assert writer.stderr == ""
