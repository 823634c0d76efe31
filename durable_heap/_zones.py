"""Zoned datetimes: a `zoneinfo.ZoneInfo` is stored by its key.

    >>> import datetime, zoneinfo
    >>> when = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    >>> ensure()  # done for you before every commit and when a record names a ZoneInfo
    >>> import pickle; pickle.loads(pickle.dumps(when, protocol=3)) == when
    True

ZODB trap: ``ZoneInfo.__reduce__`` returns its class's ``_unpickle`` method, which
the standard pickler writes as ``builtins.getattr(zoneinfo.ZoneInfo, "_unpickle")``
at protocol 3. ZODB's pickler (zodbpickle) cannot write a method that way and
failed at commit ("attribute lookup __main__._unpickle failed"); and the allowlist
would never load ``getattr`` anyway. So a ZoneInfo is pickled (copyreg, for every
pickler of the process) as ``zoneinfo.ZoneInfo(key)``: the same zone, from the
system's or the tzdata package's zone files, as ``ZoneInfo(key)`` builds it, and
the allowlist admits ``zoneinfo.ZoneInfo`` by that exact name. What changes for
other picklers: the same zone comes back, by a call of the class instead of
``_unpickle`` (a ``ZoneInfo.no_cache`` zone comes back as the cached one of its key).

A zone made with ``ZoneInfo.from_file`` has no key: it cannot be stored by name,
and its commit fails with a `NotPersistableError` that says so.

``import zoneinfo`` costs a cold start several milliseconds (it imports
sysconfig), so it is not imported here: a ZoneInfo exists only once the program
imported zoneinfo, and `ensure` registers the reduction then, before each commit
(`_watch`) and whenever a record naming ``zoneinfo.ZoneInfo`` loads (`_allow`,
also inside a ZEO server's conflict resolution).
"""

from __future__ import annotations

import copyreg
import sys
from typing import Any

from ._errors import NotPersistableError

__all__ = ["ZONE_CLASS", "ensure"]

#: The exact name the allowlist admits.
ZONE_CLASS = "zoneinfo.ZoneInfo"

_registered = False


def ensure() -> None:
    """Make ZoneInfo pickle by key, once zoneinfo is imported (cheap when done or not yet)."""
    global _registered
    if _registered:
        return
    module = sys.modules.get("zoneinfo")
    if module is None:
        return  # no ZoneInfo can exist yet
    copyreg.pickle(module.ZoneInfo, _reduce)
    _registered = True


def _reduce(zone: Any) -> tuple[Any, tuple[str]]:
    key = zone.key
    if not isinstance(key, str):
        raise NotPersistableError(
            f"the zone {zone!r}", zone,
            "a ZoneInfo made from a file has no key to store it by; use zoneinfo.ZoneInfo(key) "
            "with the zone's name, such as 'Europe/Paris'")
    return type(zone), (key,)
