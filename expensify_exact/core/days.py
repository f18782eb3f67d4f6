"""Which approval days each connection runs when: a day once it has ended in the connection's zone plus the grace,
with a look-back over the days before it; the days holding deferred reports once their time to try again has come
(Exact's daily reset, or the next clock hour); and the day whose look-back window has closed, for reconciliation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from expensify_exact.clock import last_complete_day
from expensify_exact.config import Connection
from expensify_exact.store import StateStore


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
    """A rerun of the days holding deferred reports whose time to try again has come: Exact's daily reset for a
    spent daily budget, the next clock hour for the rest (an endpoint's spent error budget, a refused connection, a
    POST without a certain answer; see `posting`).

    The run key names the newest of those times and the newest deferral among them, so each reset asks once, and a
    report deferred again (its time moves on) or deferred just after a run was asked for gets a run of its own.
    """
    due = {rid: d for rid, d in store.deferred(conn.name).items() if d.resets_at is None or d.resets_at <= now}
    if not due:
        return None
    resets = [d.resets_at for d in due.values() if d.resets_at is not None]
    stamp = max(resets).isoformat() if resets else "unknown"
    latest = max(d.deferred_at for d in due.values()).isoformat()
    days = sorted(date.fromisoformat(d.partition_date) for d in due.values())
    return DayRun(conn.name, days[0], days[-1], f"{conn.name}:deferred:{stamp}:{latest}",
                  f"{len(due)} deferred report(s) on {len(set(days))} day(s), to be tried again from {stamp}")


def reconciliation_day(conn: Connection, store: StateStore) -> date | None:
    """The newest day no later run re-exports: `lookback_days` before the newest closed day that was posted."""
    last = store.last_day_posted(conn.name)
    if last is None:
        return None
    return date.fromisoformat(last[0]) - timedelta(days=conn.posting.lookback_days)
