"""The systems under test, each doing the same logical work on a key -> value map.

Every system implements ``build(path, n)`` (create the store with keys
``k0000000``..), ``open(path)``, ``change(i, value)`` (one entry changed and made
durable), ``read(key)`` and ``close()``. Keys and values are small (a 8-char
string and an int), the shape of most service state.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from typing import Any


def key(i: int) -> str:
    return f"k{i:07d}"


class System:
    name = "?"
    note = ""
    durable = True
    max_size = 10**9  # sizes above this are skipped (too slow to be worth measuring)
    rewrites_all = False  # every commit writes the whole store
    zeo = False  # opened through a ZEO server that the runner starts over the store
    modules: tuple[str, ...] = ()

    def prepare(self) -> None:
        """Import what `open` needs, so that a cold open does not time imports."""
        for m in self.modules:
            __import__(m)

    def build(self, path: str, n: int) -> None:
        raise NotImplementedError

    def open(self, path: str) -> None:
        raise NotImplementedError

    def change(self, i: int, value: int) -> None:
        raise NotImplementedError

    def read(self, k: str) -> Any:
        raise NotImplementedError

    def files(self, path: str) -> list[str]:
        return [path]

    def iterate(self) -> int:
        """Go through every (key, value) once; return how many there were."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class DurableHeapDict(System):
    name = "durable_heap Dict"
    modules = ("durable_heap",)

    def build(self, path: str, n: int) -> None:
        import durable_heap as dh

        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.d = {key(i): i for i in range(n)}

    def open(self, path: str) -> None:
        import durable_heap as dh

        self.heap = dh.open(path)

    def change(self, i: int, value: int) -> None:
        with self.heap.transaction() as state:
            state.d[key(i)] = value

    def read(self, k: str) -> Any:
        return self.heap.state.d[k]

    def iterate(self) -> int:
        with self.heap.transaction() as state:
            return sum(1 for _ in state.d.items())

    def close(self) -> None:
        self.heap.close()


class DurableHeapList(DurableHeapDict):
    name = "durable_heap List"

    def build(self, path: str, n: int) -> None:
        import durable_heap as dh

        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.lst = list(range(n))

    def change(self, i: int, value: int) -> None:
        with self.heap.transaction() as state:
            state.lst[i] = value

    def read(self, k: str) -> Any:
        return self.heap.state.lst[int(k[1:])]

    def iterate(self) -> int:
        with self.heap.transaction() as state:
            return sum(1 for _ in state.lst)


class DurableHeapWatched(DurableHeapDict):
    """Values are plain dataclass instances changed in place: the watch must notice."""

    name = "durable_heap Dict of dataclasses, changed in place"
    max_size = 1_000_000  # the same structure as the Dict: 10M adds nothing but minutes

    def build(self, path: str, n: int) -> None:
        import durable_heap as dh
        from benchmarks.items import Rec

        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.d = {key(i): Rec(i) for i in range(n)}

    def change(self, i: int, value: int) -> None:
        with self.heap.transaction() as state:
            state.d[key(i)].value = value

    def read(self, k: str) -> Any:
        return self.heap.state.d[k].value


class DurableHeapObjects(DurableHeapWatched):
    """Values are durable_heap.Object instances: each its own record."""

    name = "durable_heap Dict of Objects, changed in place"

    def build(self, path: str, n: int) -> None:
        import durable_heap as dh
        from benchmarks.items import Obj

        with dh.open(path) as heap:
            with heap.transaction() as state:
                state.d = {key(i): Obj(i) for i in range(n)}


class RawZODB(System):
    """What a ZODB expert writes: Persistent items in an OOBTree, raw transaction API."""

    name = "raw ZODB (OOBTree of Persistent)"
    modules = ("transaction", "ZODB", "ZODB.FileStorage", "BTrees.OOBTree", "benchmarks.items")

    def value(self, i: int) -> Any:
        from benchmarks.items import Item

        return Item(i)

    def build(self, path: str, n: int) -> None:
        from BTrees.OOBTree import OOBTree

        self.open(path)
        tree = self.conn.root()["d"] = OOBTree()
        for i in range(n):
            tree[key(i)] = self.value(i)
        self.tm.commit()
        self.close()

    def open(self, path: str) -> None:
        import transaction
        import ZODB
        import ZODB.FileStorage

        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(path), cache_size=50_000)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.tm)
        self.tree = self.conn.root().get("d")

    def change(self, i: int, value: int) -> None:
        self.tree[key(i)].value = value
        self.tm.commit()

    def read(self, k: str) -> Any:
        return self.tree[k].value

    def iterate(self) -> int:
        return sum(1 for _ in self.tree.items())

    def close(self) -> None:
        self.db.close()


class RawOOBTree(RawZODB):
    """The plain OOBTree of key -> value (no Persistent items): the bulk-load baseline."""

    name = "raw ZODB (OOBTree)"

    def value(self, i: int) -> Any:
        return i

    def change(self, i: int, value: int) -> None:
        self.tree[key(i)] = value
        self.tm.commit()

    def read(self, k: str) -> Any:
        return self.tree[k]


class SQLite(System):
    name = "sqlite3 (WAL, synchronous=FULL)"
    sync = "FULL"

    def _connect(self, path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.sync}")
        return conn

    def build(self, path: str, n: int) -> None:
        conn = self._connect(path)
        conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO kv VALUES (?, ?)", ((key(i), i) for i in range(n)))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def open(self, path: str) -> None:
        self.conn = self._connect(path)

    def change(self, i: int, value: int) -> None:
        self.conn.execute("UPDATE kv SET v = ? WHERE k = ?", (value, key(i)))

    def read(self, k: str) -> Any:
        return self.conn.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()[0]

    def iterate(self) -> int:
        return sum(1 for _ in self.conn.execute("SELECT k, v FROM kv"))

    def files(self, path: str) -> list[str]:
        return [path, path + "-wal"]

    def close(self) -> None:
        self.conn.close()


class SQLiteNormal(SQLite):
    name = "sqlite3 (WAL, synchronous=NORMAL)"
    note = "not durable on power loss"
    durable = False
    sync = "NORMAL"


class Pickle(System):
    """The naive approach: pickle the whole dict and fsync it on every change."""

    name = "pickle whole heap + fsync"
    max_size = 1_000_000
    rewrites_all = True

    def build(self, path: str, n: int) -> None:
        self.data = {key(i): i for i in range(n)}
        self.path = path
        self._save()

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.data, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def open(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.data = pickle.load(f)  # noqa: S301 - our own file

    def change(self, i: int, value: int) -> None:
        self.data[key(i)] = value
        self._save()

    def read(self, k: str) -> Any:
        return self.data[k]

    def iterate(self) -> int:
        return sum(1 for _ in self.data.items())


def _dbm_name() -> str:
    for mod in ("dbm.gnu", "dbm.ndbm"):
        try:
            __import__(mod)
            return mod
        except ImportError:
            continue
    return "dbm.dumb"


class Shelve(System):
    """The standard library's persistent dict (on whatever dbm this Python has)."""

    name = f"shelve ({_dbm_name()})"
    note = "no fsync: not durable on power loss"
    durable = False
    max_size = 1_000_000

    def build(self, path: str, n: int) -> None:
        self.open(path)
        for i in range(n):
            self.db[key(i)] = i
        self.close()

    def open(self, path: str) -> None:
        import shelve

        self.db = shelve.open(path)

    def change(self, i: int, value: int) -> None:
        self.db[key(i)] = value
        self.db.sync()

    def read(self, k: str) -> Any:
        return self.db[k]

    def iterate(self) -> int:
        return sum(1 for _ in self.db.items())

    def files(self, path: str) -> list[str]:
        import glob

        return glob.glob(path + "*")

    def close(self) -> None:
        self.db.close()


class DiskCache(System):
    """diskcache.Cache: a popular persistent dict on SQLite (an optional extra)."""

    name = "diskcache"
    modules = ("diskcache",)
    max_size = 1_000_000  # builds about 10x slower than the others: 10M would take half an hour

    def build(self, path: str, n: int) -> None:
        self.open(path)
        with self.cache.transact():
            for i in range(n):
                self.cache[key(i)] = i
        self.close()

    def open(self, path: str) -> None:
        import diskcache

        self.cache = diskcache.Cache(path, sqlite_synchronous=2)  # FULL: durable commits

    def change(self, i: int, value: int) -> None:
        self.cache[key(i)] = value

    def read(self, k: str) -> Any:
        return self.cache[k]

    def iterate(self) -> int:
        count = 0
        for k in self.cache.iterkeys():  # diskcache iterates keys; values are one read each
            self.cache[k]
            count += 1
        return count

    def files(self, path: str) -> list[str]:
        import glob

        return glob.glob(path + "/*")

    def close(self) -> None:
        self.cache.close()


class FsyncFloor(System):
    """Append about 200 bytes and fsync: no durable store commits faster on this disk."""

    name = "fsync floor (200 B append + fsync)"

    def build(self, path: str, n: int) -> None:
        open(path, "wb").close()

    def open(self, path: str) -> None:
        self.f = open(path, "ab")  # noqa: SIM115

    def change(self, i: int, value: int) -> None:
        self.f.write(b"x" * 200)
        self.f.flush()
        os.fsync(self.f.fileno())

    def read(self, k: str) -> Any:
        return None

    def close(self) -> None:
        self.f.close()


def zeo_address() -> str:
    """The ``zeo://`` address of the server the runner started for this store."""
    return os.environ["BENCH_ZEO"]


class DurableHeapZEO(DurableHeapDict):
    """The durable_heap Dict through a ZEO server (``durable-heap zeo``), default options."""

    name = "durable_heap Dict over ZEO"
    max_size = 1_000_000
    zeo = True

    def open(self, path: str) -> None:
        import durable_heap as dh

        self.heap = dh.open(zeo_address())

    def change(self, i: int, value: int) -> None:
        self.heap.run(self._put, i, value)  # an action: retried if clients conflict

    def _put(self, i: int, value: int) -> None:
        self.heap.state.d[key(i)] = value


class DurableHeapZEONoSync(DurableHeapZEO):
    """As above, without the round trip that starts each transaction (``server_sync=0``)."""

    name = "durable_heap Dict over ZEO, server_sync=0"
    note = "relies on pushed invalidations"

    def open(self, path: str) -> None:
        import durable_heap as dh

        self.heap = dh.open(zeo_address() + "?server_sync=0")


class RawZODBZEO(RawZODB):
    """Raw ZODB (Persistent items in an OOBTree) through the same kind of ZEO server."""

    name = "raw ZEO (OOBTree of Persistent, ZEO's default client)"
    max_size = 1_000_000
    zeo = True
    server_sync = False  # ZEO's default
    modules = (*RawZODB.modules, "ZEO.ClientStorage")

    def open(self, path: str) -> None:
        if "BENCH_ZEO" not in os.environ:  # building: on the file, before the server starts
            super().open(path)
            return
        import transaction
        import ZEO
        import ZODB

        host, port = zeo_address()[len("zeo://"):].rsplit(":", 1)
        client = ZEO.client((host, int(port)), server_sync=self.server_sync)
        self.db = ZODB.DB(client, cache_size=50_000)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.tm)
        self.tree = self.conn.root().get("d")

    def change(self, i: int, value: int) -> None:
        from ZODB.POSException import ConflictError

        while True:
            try:
                self.tree[key(i)].value = value
                self.tm.commit()
                return
            except ConflictError:  # never expected on distinct entries; retried like an action
                self.tm.abort()


class RawZODBZEOSync(RawZODBZEO):
    """Raw ZEO with ``server_sync=True``: the freshness durable_heap's default gives."""

    name = "raw ZEO, server_sync=True, explicit begin"
    note = "the same read-your-writes guarantee as durable_heap's default"
    server_sync = True

    def change(self, i: int, value: int) -> None:
        # Only an explicit begin asks the server (ZODB starts implicit transactions
        # without that round trip); durable_heap's actions begin explicitly.
        self.tm.begin()
        super().change(i, value)


class PlainDict(System):
    name = "plain dict (in memory)"
    durable = False

    def build(self, path: str, n: int) -> None:
        self.n = n

    def open(self, path: str) -> None:
        self.data = {key(i): i for i in range(self.n)} if hasattr(self, "n") else {}

    def read(self, k: str) -> Any:
        return self.data[k]


SYSTEMS: dict[str, type[System]] = {
    "durable_heap": DurableHeapDict,
    "durable_heap_list": DurableHeapList,
    "durable_heap_watched": DurableHeapWatched,
    "durable_heap_objects": DurableHeapObjects,
    "raw_zodb": RawZODB,
    "raw_oobtree": RawOOBTree,
    "sqlite_full": SQLite,
    "sqlite_normal": SQLiteNormal,
    "pickle": Pickle,
    "shelve": Shelve,
    "diskcache": DiskCache,
    "fsync": FsyncFloor,
    "dict": PlainDict,
    "durable_heap_zeo": DurableHeapZEO,
    "durable_heap_zeo_nosync": DurableHeapZEONoSync,
    "raw_zodb_zeo": RawZODBZEO,
    "raw_zodb_zeo_sync": RawZODBZEOSync,
}
