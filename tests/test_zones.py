"""Zoned datetimes (``tzinfo=zoneinfo.ZoneInfo(...)``) stored end to end (durable_heap._zones).

They were accepted by assignment and then failed at commit inside ZODB's pickler.
Each test writes in one process and reads in another, so that the reader meets the
zone first in a record (zoneinfo not imported yet), as a restarted program does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, run, write

PROGRAM = """
    import dataclasses, datetime, zoneinfo
    from durable_heap import Object, state

    PARIS = zoneinfo.ZoneInfo("Europe/Paris")

    @dataclasses.dataclass
    class Meeting:
        title: str
        at: datetime.datetime

    class Event(Object):
        def __init__(self, at):
            self.at = at

    def book():
        at = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=PARIS)
        state.when = at
        state.by_day = {"tue": at}
        state.times = [at, datetime.time(8, 0, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo"))]
        state.meeting = Meeting("plan", at)
        state.event = Event(datetime.datetime(2026, 3, 29, 1, 30, tzinfo=PARIS))
        state.zone = zoneinfo.ZoneInfo("America/New_York")
        return "booked"
"""

READ = """
    import sys
    import durable_heap as dh
    assert "zoneinfo" not in sys.modules  # the zone is met first in a record
    with dh.open(sys.argv[1]) as heap, heap.transaction() as state:
        at = state.when
        print(at.isoformat(), at.tzinfo.key, state.by_day["tue"] == at, state.times[0] == at,
              state.times[1].tzinfo.key, state.meeting.at == at, state.meeting.at.tzinfo.key,
              state.event.at.isoformat(), state.zone.key)
"""


def test_zoned_datetimes_are_stored_and_read_back_by_a_new_process(tmp_path: Path) -> None:
    app = write(tmp_path / "cal.py", PROGRAM)
    out = cli("call", str(app), "book")
    assert out.returncode == 0 and out.stdout.strip() == '"booked"', out.stderr
    reader = write(tmp_path / "read.py", READ)
    out = run([str(reader), str(tmp_path / ".durable-heap" / "cal.fs")])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "2026-12-01T09:30:00+01:00", "Europe/Paris", "True", "True", "Asia/Tokyo", "True",
        "Europe/Paris", "2026-03-29T01:30:00+01:00", "America/New_York"]


def test_zoned_datetimes_export_and_import_keep_their_zone(tmp_path: Path) -> None:
    app = write(tmp_path / "cal.py", PROGRAM)
    assert cli("call", str(app), "book").returncode == 0
    out = cli("export", str(app), "--path", "state.by_day")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"tue": {"$datetime": ["2026-12-01T09:30:00+01:00", "Europe/Paris"]}}
    dump = tmp_path / "days.json"
    dump.write_text(out.stdout)
    fresh = tmp_path / "fresh.fs"
    out = cli("import", str(app), str(dump), "--path", "state.by_day", "--replace",
              "--storage", str(fresh))
    assert out.returncode == 0, out.stderr
    again = cli("export", str(app), "--path", "state.by_day",
              "--storage", str(fresh))
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(dump.read_text()), again.stderr


def test_a_zone_made_from_a_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    import datetime

    import durable_heap as dh

    files = [Path(folder, "Europe", "Paris") for folder in zoneinfo.TZPATH]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        pytest.skip("no system zone files here")
    with found.open("rb") as f:
        zone = zoneinfo.ZoneInfo.from_file(f)
    with dh.open(tmp_path / "h.fs") as heap:
        with pytest.raises(dh.NotPersistableError, match="a ZoneInfo made from a file has no key"):
            with heap.transaction() as state:
                state.when = datetime.datetime(2026, 12, 1, tzinfo=zone)
        with heap.transaction() as state:
            assert "when" not in state  # nothing was stored; the heap still works
            state.n = 1
