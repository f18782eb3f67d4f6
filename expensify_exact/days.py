"""Which approval days each connection runs when: a day once it has ended in the connection's zone plus the grace,
with a look-back over the days before it; the days still holding deferred reports once Exact's budget has reset;
and the day whose look-back window has closed, for reconciliation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from expensify_exact.clock import last_complete_day
from expensify_exact.config import Connection
from expensify_exact.state import StateStore


@dataclass(frozen=True)
class DayRun:
    """One run a connection needs: the approval days `start`..`end`, asked for once under `key`."""

    connection: str
    start: date
    end: date
    key: str
    reason: str


def grace(conn: Connection) -> timedelta:
    return timedelta(hours=conn.posting.grace_hours)


def closed_day(conn: Connection, now: datetime) -> date:
    """The connection's newest approval day that is over (in its zone, plus the grace) at `now`."""
    return last_complete_day(conn.timezone, grace(conn), now)


def daily_run(conn: Connection, now: datetime, first_day: date) -> DayRun | None:
    """The morning run of the newest closed day, re-exporting the `lookback_days` before it in the same job."""
    day = closed_day(conn, now)
    if day < first_day:
        return None
    start = max(first_day, day - timedelta(days=conn.posting.lookback_days))
    return DayRun(conn.name, start, day, f"{conn.name}:{day.isoformat()}",
                  f"{day} ended in {conn.timezone} (+{conn.posting.grace_hours:g} h); look-back from {start}")


def deferred_run(conn: Connection, store: StateStore, now: datetime) -> DayRun | None:
    """A rerun of the days that still hold deferred reports, once Exact's daily budget has reset.

    The reset time is the newest one known: what the division's shared rate-limit record (`ee_rate_limits`) last
    saw in `X-RateLimit-Reset`, else what the deferral recorded. The run key carries it, so each reset asks once.
    """
    deferred = store.deferred(conn.name)
    if not deferred:
        return None
    board = store.rate_limits_get(f"exact:division:{conn.exact.division}") or {}
    resets = [r for r in [board.get("daily_resets_at"), *(reset for _day, reset in deferred.values())] if r]
    reset = max(resets) if resets else None
    if reset is not None and now < reset:
        return None
    days = sorted(date.fromisoformat(day) for day, _reset in deferred.values())
    stamp = reset.isoformat() if reset else "unknown"
    return DayRun(conn.name, days[0], days[-1], f"{conn.name}:deferred:{stamp}",
                  f"{len(deferred)} deferred report(s) on {len(set(days))} day(s); Exact's budget reset at {stamp}")


def reconciliation_day(conn: Connection, store: StateStore) -> date | None:
    """The newest day no later run re-exports: `lookback_days` before the newest closed day that was posted."""
    last = store.last_day_posted(conn.name)
    if last is None:
        return None
    return date.fromisoformat(last[0]) - timedelta(days=conn.posting.lookback_days)
