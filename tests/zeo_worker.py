"""A client process of the ZEO tests: ``python -m tests.zeo_worker MODE URL N [ID]``.

It opens the heap, prints ``ready`` and waits for a line on stdin, so that the test
can start every worker at once; then runs N actions and prints a JSON summary
(acknowledged actions, tries including conflict retries, errors).

Modes: ``int`` (``state.count += 1``), ``counter`` (``state.hits += 1`` on a
Counter), ``dict`` (a new key in ``state.big`` and an item appended to
``state.log``), ``loop`` (``int``, paced, going on through ServerUnavailableError),
``inflight`` (one action, then one killed mid-way by the test, then one more),
``fresh`` (``int`` on a heap the workers all create at once), ``faults`` (actions
until a line ``stop`` on stdin, each bumping a plain int and a Counter, appending to
a List and writing a Dict, while the test kills and restarts the server; the summary
lists which actions were acknowledged, in doubt, or not committed, and counts every
other error by kind; with ``DURABLE_HEAP_TEST_MET`` set to a folder, the worker
creates the file ``<folder>/<wid>`` at its first ServerUnavailableError, so the test
can go on restarting the server until every worker has met a restart).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from typing import Any

import durable_heap as dh


def faults(url: str, wid: str) -> None:
    """The ``faults`` mode: mixed actions through server kills, every outcome recorded."""
    faulthandler.enable()  # a crash in C code leaves its traceback in the log
    heap = dh.open(url, attempts=500)
    print("ready", flush=True)
    sys.stdin.readline()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()

    @heap.action
    def mixed(i: int) -> None:
        state: Any = heap.state
        state.count += 1
        state.hits += 1
        state.items.append(f"{wid}-{i}")
        state.table[f"{wid}-{i}"] = {"worker": wid, "i": i}  # a new Dict: new oids
        state.table[f"last-{wid}"] = i

    acked: list[int] = []
    in_doubt: list[int] = []
    not_committed: list[int] = []
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    last = ""
    met = os.environ.get("DURABLE_HEAP_TEST_MET")
    i = after_stop = 0
    while True:
        if stop.is_set():  # go on until an action succeeds: the test checks each worker recovered
            if last == "acked" or after_stop == 50:
                break
            after_stop += 1
        try:
            mixed(i)
            acked.append(i)
            last = "acked"
        except dh.ServerUnavailableError as exc:
            unknown = getattr(exc, "outcome_unknown", True)  # before the fix: no such attribute
            (in_doubt if unknown else not_committed).append(i)
            kind = f"ServerUnavailableError({'unknown' if unknown else 'none'})"
            errors[kind] = errors.get(kind, 0) + 1
            examples.setdefault(kind, str(exc))
            if met and last != kind:
                open(os.path.join(met, wid), "a").close()
            last = kind
        except Exception as exc:  # noqa: BLE001 - every other error is what the test looks for
            in_doubt.append(i)  # whatever it was, it may have committed
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            errors[kind] = errors.get(kind, 0) + 1
            examples.setdefault(kind, str(exc)[:300])
            last = kind
        i += 1
    print(json.dumps({"acked": acked, "in_doubt": in_doubt, "not_committed": not_committed,
                      "errors": errors, "examples": examples, "last": last}), flush=True)
    heap.close()


def main() -> None:
    mode, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wid = sys.argv[4] if len(sys.argv) > 4 else "0"
    if mode == "faults":
        faults(url, wid)
        return
    if mode == "fresh":  # every worker opens a heap nobody has created yet, at once
        print("ready", flush=True)
        sys.stdin.readline()
    heap = dh.open(url, attempts=500)
    tries = 0
    if mode != "fresh":
        print("ready", flush=True)
        sys.stdin.readline()

    @heap.action
    def step(i: int) -> None:
        nonlocal tries
        tries += 1
        state: Any = heap.state
        if mode in ("int", "loop", "inflight"):
            state.count += 1
        elif mode == "fresh":
            state.count = state.get("count", 0) + 1
        elif mode == "counter":
            state.hits += 1
        elif mode == "dict":
            state.big[f"w{wid}-{i}"] = i
            state.log.append(f"w{wid}-{i}")

    acked, errors = 0, []
    if mode == "inflight":
        step(0)
        acked += 1

        @heap.action
        def interrupted() -> None:
            heap.state.count += 100
            print("inside", flush=True)
            sys.stdin.readline()  # the test kills the server, then lets us commit

        try:
            interrupted()
            errors.append("committed without a server")
        except dh.ServerUnavailableError as exc:
            errors.append(str(exc))
        step(1)  # waits for the server to be back
        acked += 1
    else:
        for i in range(n):
            try:
                step(i)
            except dh.ServerUnavailableError as exc:
                errors.append(str(exc))
                continue
            acked += 1
            if mode == "loop":
                print("ack", flush=True)
                time.sleep(0.01)
    print(json.dumps({"acked": acked, "tries": tries, "errors": errors}), flush=True)
    heap.close()


if __name__ == "__main__":
    main()
