"""A commit whose finish fails while other commits wait for an fsync: every waiter
is answered (acknowledged if its fsync returned, an error if not), none hangs.

ZODB trap (ZODB 6.4, ``FileStorage._finish``): when writing the transaction's status
byte fails (its flush: EIO, EFBIG), ZODB calls ``close()`` while holding the
storage's ``_lock``; group commit's close waits for the fsync running in another
thread (the leader), which needs ``_lock`` to deliver: the two waited on each other
for ever, and so did every later commit.

Real FileStorage, real threads, in a subprocess (a process-wide file-size limit, and
a hang must be killable). The status byte's write fails for real: after the second
commit's vote, ``RLIMIT_FSIZE`` is set to the status byte's offset, so the kernel
refuses the one-byte write there (EFBIG; SIGXFSZ ignored). The leader's fsync is
held by a gate on ``os.fsync`` (group commit looks it up at each call) until the
failing commit is inside ZODB's close. Nothing of the storage is mocked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from durable_heap.testing import subprocess_env

SCRIPT = r"""
import faulthandler, logging, os, resource, signal, sys, threading
import transaction
from ZODB import DB
from ZODB.utils import u64
from persistent import Persistent
from durable_heap._filestorage import FileStorage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel says EFBIG instead of killing us

class Item(Persistent):
    n = 0

path = sys.argv[1]
fs = FileStorage(path)
db = DB(fs)
with db.transaction() as conn:
    conn.root()["a"], conn.root()["b"] = Item(), Item()
    conn.root()["pad"] = b"x" * 200_000  # the data file is far larger than its index

real_fsync = os.fsync
entered, release = threading.Event(), threading.Event()
def fsync(fd):
    entered.set()
    if not release.wait(60):
        print("the held fsync was never released", flush=True)
        os._exit(4)
    real_fsync(fd)
os.fsync = fsync

in_close = threading.Event()
class Closing(logging.Handler):
    def emit(self, record):
        if "Failure in _finish" in record.getMessage():
            in_close.set()  # ZODB logs it, then calls close() under _lock
logging.getLogger("ZODB.FileStorage").addHandler(Closing())

class LimitAfterVote:
    # A data manager that votes after the storage (a later sortKey): the storage's
    # transaction is written and flushed; its status byte is at _pos + 16.
    def __init__(self):
        self.limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    def sortKey(self): return "~ after the storage"
    def abort(self, txn): pass
    def tpc_begin(self, txn): pass
    def commit(self, txn): pass
    def tpc_vote(self, txn):
        resource.setrlimit(resource.RLIMIT_FSIZE, (fs._pos + 16, self.limit[1]))
    def tpc_finish(self, txn): pass
    def tpc_abort(self, txn): pass

UNLIMITED = resource.getrlimit(resource.RLIMIT_FSIZE)
results = {}
def commit(key, limit_after_vote):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        txn = tm.begin()
        conn.root()[key].n += 1
        if limit_after_vote:
            txn.join(LimitAfterVote())
        tm.commit()
        results[key] = "acknowledged"
    except BaseException as exc:
        results[key] = f"{type(exc).__name__}: {exc}"
    finally:
        if limit_after_vote:
            resource.setrlimit(resource.RLIMIT_FSIZE, UNLIMITED)
        try:
            conn.close()
        except BaseException:
            pass

leader = threading.Thread(target=commit, args=("a", False), daemon=True)
leader.start()
assert entered.wait(30), "the leader's fsync never began"
failing = threading.Thread(target=commit, args=("b", True), daemon=True)
failing.start()
if not in_close.wait(30):
    print("the status byte's write did not fail:", results, flush=True)
    os._exit(5)
release.set()
leader.join(30)
failing.join(30)
if leader.is_alive() or failing.is_alive():
    print("HANG", results, flush=True)
    faulthandler.dump_traceback(all_threads=True)  # where they wait: on stderr
    os._exit(3)
print("a", results["a"], flush=True)
print("b", results["b"], flush=True)
try:
    with db.transaction() as conn:
        conn.root()["a"].n += 1
    print("later: committed", flush=True)
except BaseException as exc:
    print(f"later: {type(exc).__name__}", flush=True)
os._exit(0)
"""

CHECK = r"""
import sys
from persistent import Persistent
from ZODB import DB

class Item(Persistent):  # the class the records name (__main__.Item)
    n = 0

from durable_heap._filestorage import FileStorage
db = DB(FileStorage(sys.argv[1]))
with db.transaction() as conn:
    print(conn.root()["a"].n, conn.root()["b"].n)
"""


def test_a_failed_finish_while_a_commit_waits_for_its_fsync_hangs_no_one(tmp_path: Path) -> None:
    """The leader's fsync held; a second commit's status byte fails to write (EFBIG),
    so ZODB closes the storage holding ``_lock``; then the fsync returns. Both
    threads return: the leader acknowledged (its fsync covered it), the second with
    the error; a later commit fails (the storage is closed); the file opens with
    the leader's commit. Fails without the fix: the two threads hang (the test
    says HANG; the subprocess is killed after its timeout otherwise)."""
    path = tmp_path / "app.fs"
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True,
                              env=subprocess_env(), timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the commits hung: {exc.stdout!r}") from None
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert out[0] == "a acknowledged", proc.stdout
    assert out[1].startswith("b OSError") and "File too large" in out[1], proc.stdout
    assert out[2].startswith("later: ") and out[2] != "later: committed", proc.stdout
    check = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    a, b = map(int, check.stdout.split())
    assert a == 1 and b in (0, 1), check.stdout


def test_the_zodb_internals_the_fix_relies_on() -> None:
    """ZODB's ``_finish`` closes the storage in its ``except`` (called by
    ``tpc_finish`` holding ``_lock``), and that lock tells whether this thread holds
    it (``_is_owned``, which group commit's close asks)."""
    import inspect

    from ZODB.BaseStorage import BaseStorage
    from ZODB.FileStorage import FileStorage as ZODBFileStorage

    finish = inspect.getsource(ZODBFileStorage._finish)
    assert finish.index("self._finish_finish(tid)") < finish.index("self.close()")
    assert "with self._lock:" in inspect.getsource(BaseStorage.tpc_finish)
    assert "self._finish(" in inspect.getsource(BaseStorage.tpc_finish)
    storage = ZODBFileStorage.__new__(ZODBFileStorage)
    BaseStorage.__init__(storage, "x")
    assert storage._lock._is_owned() is False
    with storage._lock:
        assert storage._lock._is_owned() is True
