"""The comparison endpoint of `benchmarks.serve`: FastAPI + sqlite3 (WAL, synchronous=FULL).

The same one-entry update as the durable_heap program, written the way a
careful FastAPI user would: a sync endpoint (run in the thread pool), one
sqlite3 connection per thread, ``BEGIN IMMEDIATE`` ... ``COMMIT``, a busy
timeout for the other worker processes. The database path comes in
``$BENCH_SQLITE``; the table is made (with `KEYS` rows) by `create`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from fastapi import Body, FastAPI

KEYS = 1000
#: CPU seconds of Python work per request (``$BENCH_WORK_MS``, see `benchmarks.serve --work-ms`).
WORK = float(os.environ.get("BENCH_WORK_MS", "0")) / 1000

app = FastAPI()
_local = threading.local()


def _conn() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(os.environ["BENCH_SQLITE"], timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        _local.conn = conn
    return conn


def create(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE items (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    conn.executemany("INSERT INTO items VALUES (?, 0)", [(f"k{i}",) for i in range(KEYS)])
    conn.close()


@app.post("/bump")
def bump(args: list[str] = Body(...)) -> dict[str, int]:  # noqa: B008 - FastAPI's way
    end = time.thread_time() + WORK  # the same Python work as the durable_heap program's
    while time.thread_time() < end:
        pass
    conn = _conn()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE items SET n = n + 1 WHERE k = ?", (args[0],))
        (n,) = conn.execute("SELECT n FROM items WHERE k = ?", (args[0],)).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return {"result": n}


def main() -> None:
    """Serve `app` the way `durable-heap serve` serves a program: the same uvicorn, the same
    listening socket (TCP_NODELAY on, see `durable_heap._serve._listen`), N worker processes."""
    import argparse

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from durable_heap._serve import ServeConfig, _listen

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    config = uvicorn.Config("benchmarks.serve_sqlite_app:app", host="127.0.0.1", port=args.port,
                            workers=args.workers, log_level="warning", access_log=False)
    sock = _listen(ServeConfig(program="", target="", port=args.port), config.backlog)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
