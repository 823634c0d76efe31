"""Crash safety: SIGKILL at random moments loses no acknowledged commit and the heap opens."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import durable_heap as dh
from tests.conftest import ROOT

WRITER = """
import sys, durable_heap as dh
heap = dh.open(sys.argv[1])
with heap.transaction() as state:
    state.setdefault("n", 0)
    state.setdefault("log", [])
    state.setdefault("index", {})

@heap.action
def step():
    s = heap.state
    s.n += 1
    s.log.append(s.n)
    s.index[f"k{s.n}"] = {"n": s.n, "tags": [s.n]}
    return s.n

while True:
    n = step()
    print(n, flush=True)   # acknowledged: the commit returned
"""


def test_sigkill_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    path = tmp_path / "crash.fs"
    rnd = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    acked = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # started and committed at least once
        assert first.strip()
        time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        lines = [first] + out.splitlines()
        acked = max([acked] + [int(x) for x in lines if x.strip().isdigit()])
        with dh.open(path) as heap:
            s = heap.state
            assert acked <= s.n <= acked + 1  # at most the one in flight is extra
            assert list(s.log) == list(range(1, s.n + 1))
            assert len(s.index) == s.n
            assert s.index[f"k{s.n}"] == {"n": s.n, "tags": [s.n]}
            acked = s.n
    assert acked > 12
