"""Injectable time: everything that waits or compares timestamps takes a Clock, so tests can move time."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from typing import Protocol
from zoneinfo import ZoneInfo


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""

    def sleep(self, seconds: float) -> None:
        """Wait; a test clock moves its time forward instead."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def connection_today(timezone_name: str, clock: Clock) -> date:
    """Today's date in a connection's zone, by `clock`: the one place "today" is read for a connection."""
    return clock.now().astimezone(ZoneInfo(timezone_name)).date()


def day_closes_at(day: date, timezone_name: str, grace: timedelta) -> datetime:
    """When a connection's approval day counts as over: its midnight in the connection's zone, plus `grace`."""
    return datetime.combine(day + timedelta(days=1), dt_time(), ZoneInfo(timezone_name)) + grace


def last_complete_day(timezone_name: str, grace: timedelta, now: datetime) -> date:
    """The newest approval day that has ended in the connection's zone at least `grace` before `now`."""
    candidate = (now - grace).astimezone(ZoneInfo(timezone_name)).date() - timedelta(days=1)
    while day_closes_at(candidate + timedelta(days=1), timezone_name, grace) <= now:
        candidate += timedelta(days=1)  # only on a day that lasts less than 24 h (a DST switch within the grace)
    return candidate


def next_clock_hour(now: datetime) -> datetime:
    """The start of the UTC clock hour after `now`: when Exact's per-endpoint error counts start again."""
    return now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
