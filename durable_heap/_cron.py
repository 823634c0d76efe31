"""Cron specs: the next tick, from the scheduled time (no drift), in a time zone.

Parsing and matching are cronsim's (the evaluator of Healthchecks.io, pure
Python, maintained, with careful daylight-saving handling), rather than our
own: five fields (minute hour day month weekday) and the usual ``@daily``
style aliases. Ticks are computed in the cron's zone (``zoneinfo``; None means
UTC) and stored as UTC timestamps. Daylight saving follows cronsim, which
follows Debian's cron: a tick in the hour skipped in spring runs once when the
clocks jump (at the new time); a tick in the hour repeated in autumn runs once,
at its first occurrence.

Missed ticks (the scheduler was down, or late by more than `GRACE` seconds):
``"once"`` (the default) runs one catch-up tick, then goes on from now;
``"all"`` runs every missed tick in turn; ``"skip"`` runs none and goes on
from now.
"""

from __future__ import annotations

import datetime

from ._errors import WorkflowError

__all__ = ["GRACE", "MISSED", "check", "next_tick", "plan"]

#: Seconds a tick may be late and still count as on time.
GRACE = 60.0
MISSED = ("once", "all", "skip")


# cronsim and zoneinfo are imported on first use: opening a heap imports durable
# execution (the Heap class has its methods), and most heaps never hold a cron.


def _zone(tz: str | None) -> datetime.tzinfo:
    if tz is None:
        return datetime.timezone.utc
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise WorkflowError(
            f"unknown time zone {tz!r}: give an IANA name such as 'Europe/Paris', or None for UTC"
        ) from exc


def check(spec: str, tz: str | None, missed: str) -> None:
    """Raise `WorkflowError` for a spec that does not parse, an unknown zone or policy."""
    if missed not in MISSED:
        raise WorkflowError(f"missed must be one of {', '.join(map(repr, MISSED))}, not {missed!r}")
    from cronsim import CronSim, CronSimError

    zone = _zone(tz)
    try:
        CronSim(spec, datetime.datetime.now(zone))
    except (CronSimError, ValueError, TypeError) as exc:
        raise WorkflowError(
            f"the cron spec {spec!r} does not parse ({exc}): give five fields, minute hour day "
            "month weekday, such as '0 9 * * 1' (Mondays at 9:00)"
        ) from exc


def next_tick(spec: str, tz: str | None, after: float) -> float:
    """The first tick strictly after the timestamp `after`."""
    from cronsim import CronSim

    zone = _zone(tz)
    start = datetime.datetime.fromtimestamp(after, zone)
    return next(CronSim(spec, start)).timestamp()


def plan(spec: str, tz: str | None, missed: str, scheduled: float, now: float) -> tuple[bool, float]:
    """For the tick `scheduled` firing at `now`: (run it?, the next tick's time)."""
    late = now - scheduled > GRACE
    if not late:
        return True, next_tick(spec, tz, scheduled)
    if missed == "all":
        return True, next_tick(spec, tz, scheduled)
    return missed == "once", next_tick(spec, tz, now)
