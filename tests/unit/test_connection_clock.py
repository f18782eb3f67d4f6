"""One clock for "today" and "the last complete day" in a connection's own timezone."""

from datetime import date, datetime, timedelta, timezone

import pytest

from expensify_exact.clock import connection_today, day_closes_at, last_complete_day
from tests.factories import FakeClock

HOUR = timedelta(hours=1)


@pytest.mark.parametrize("utc, zone, expected", [
    # Los Angeles' 24 November ends at 08:00 UTC on the 25th; with the grace hour it is complete at 09:00 UTC
    ("2026-11-25T08:59:00", "America/Los_Angeles", "2026-11-23"),
    ("2026-11-25T09:00:00", "America/Los_Angeles", "2026-11-24"),
    # at the same moment Amsterdam's 24th has long been over, and Tokyo's 25th too
    ("2026-11-25T09:00:00", "Europe/Amsterdam", "2026-11-24"),
    ("2026-11-25T16:00:00", "Asia/Tokyo", "2026-11-25"),
    # the night summer time begins in Amsterdam (29 March 2026 has 23 hours)
    ("2026-03-29T22:59:00", "Europe/Amsterdam", "2026-03-28"),
    ("2026-03-29T23:00:00", "Europe/Amsterdam", "2026-03-29"),
])
def test_last_complete_day_is_over_in_the_connections_zone_plus_the_grace(utc, zone, expected):
    now = datetime.fromisoformat(utc).replace(tzinfo=timezone.utc)
    day = last_complete_day(zone, HOUR, now)
    assert day.isoformat() == expected
    assert day_closes_at(day, zone, HOUR) <= now < day_closes_at(day + timedelta(days=1), zone, HOUR)


def test_today_comes_from_the_clock_in_the_connections_zone():
    clock = FakeClock(datetime(2026, 11, 25, 7, 30, tzinfo=timezone.utc))
    assert connection_today("America/Los_Angeles", clock) == date(2026, 11, 24)
    assert connection_today("Europe/Amsterdam", clock) == date(2026, 11, 25)
