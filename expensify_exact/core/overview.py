"""One overview of every connection, worst first: yesterday's posted reports, open quarantine by reason, the age of
the Exact refresh token, Exact's remaining budget, the last run and a verdict with its reasons, read from the state
database alone in a fixed handful of queries however many connections there are."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from expensify_exact.api.exact.auth import IDLE_WARNING_DAYS, REFRESH_IDLE_DAYS
from expensify_exact.clock import Clock, connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.store import StateStore
from expensify_exact.store.overview import RunRecord

# The audit event a run writes per connection when it is done with it (`record_run`): what the overview reads as
# the connection's last run, failed ones included.
RUN_EVENT = "connection_run"
# `secrets set --sandbox-demo` / `--from-env` store a refresh token with this issue time: its real age is unknown.
NEVER_EXCHANGED = datetime(2000, 1, 1, tzinfo=timezone.utc)
# A connection runs every day once the day is over; a last run older than this means the daily run is missing.
RUN_OVERDUE_AFTER = timedelta(hours=30)
# Exact's daily budget counts as nearly spent below this share of the division's daily limit.
BUDGET_LOW_SHARE = 0.1
BUDGET_SCOPE_PREFIX = "exact:division:"
ERROR_TEXT_LIMIT = 300


class Health(StrEnum):
    OK = "ok"
    ATTENTION = "attention"  # runs go on, but someone should look (or soon must)
    FAILING = "failing"  # the connection's reports are not being posted


SEVERITY = {Health.FAILING: 2, Health.ATTENTION: 1, Health.OK: 0}


class Concern(StrEnum):
    """Why a connection is not ok; each has one health it leads to."""

    NO_TOKENS = "no_tokens"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_OLD = "token_old"
    RUN_FAILED = "run_failed"
    RUN_STOPPED = "run_stopped"
    NEVER_RUN = "never_run"
    RUN_OVERDUE = "run_overdue"
    BUDGET_LOW = "budget_low"
    PENDING_INTENTS = "pending_intents"
    QUARANTINE_OPEN = "quarantine_open"


CONCERN_HEALTH = {Concern.NO_TOKENS: Health.FAILING, Concern.TOKEN_EXPIRED: Health.FAILING,
                  Concern.RUN_FAILED: Health.FAILING, Concern.TOKEN_OLD: Health.ATTENTION,
                  Concern.RUN_STOPPED: Health.ATTENTION, Concern.NEVER_RUN: Health.ATTENTION,
                  Concern.RUN_OVERDUE: Health.ATTENTION, Concern.BUDGET_LOW: Health.ATTENTION,
                  Concern.PENDING_INTENTS: Health.ATTENTION, Concern.QUARANTINE_OPEN: Health.ATTENTION}


@dataclass(frozen=True)
class Finding:
    concern: Concern
    text: str

    @property
    def health(self) -> Health:
        return CONCERN_HEALTH[self.concern]


@dataclass(frozen=True)
class Budget:
    """Exact's budget for a division as the last answer any process got reported it; None where unknown (a window
    that has reset since counts as unknown, not as spent)."""

    observed_at: datetime
    remaining_daily: int | None
    daily_limit: int | None
    daily_resets_at: datetime | None
    remaining_minutely: int | None
    minutely_limit: int | None


@dataclass(frozen=True)
class LastRun:
    """The newest run that worked on a connection: `outcome` "ok" / "stopped" / "failed" as the run recorded it,
    or "day posted" when only the closed day it ran is known."""

    at: datetime
    run_id: str | None
    outcome: str
    days: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Row:
    connection: str
    division: int
    timezone: str
    yesterday: str  # the approval day before today in the connection's zone
    posted_yesterday: int
    quarantine_open: int  # open items (reports)
    quarantine_by_reason: dict[str, int]  # reason code -> open reports with it
    token_refreshed_at: datetime | None  # None: no tokens stored, or a refresh token never exchanged yet
    token_age_days: float | None
    budget: Budget | None
    last_run: LastRun | None
    pending_intents: int
    deferred_reports: int
    findings: tuple[Finding, ...]

    @property
    def health(self) -> Health:
        return max((f.health for f in self.findings), key=SEVERITY.__getitem__, default=Health.OK)

    @property
    def why(self) -> str:
        """The findings, worst first, as one line."""
        ordered = sorted(self.findings, key=lambda f: -SEVERITY[f.health])
        return "; ".join(f.text for f in ordered)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the same fields `status --json` and the asset's metadata show."""
        budget, run = self.budget, self.last_run
        return {
            "connection": self.connection, "division": self.division, "health": str(self.health), "why": self.why,
            "findings": [{"concern": str(f.concern), "health": str(f.health), "text": f.text} for f in self.findings],
            "timezone": self.timezone,
            "yesterday": self.yesterday, "posted_yesterday": self.posted_yesterday,
            "quarantine_open": self.quarantine_open, "quarantine_by_reason": self.quarantine_by_reason,
            "token_refreshed_at": _iso(self.token_refreshed_at),
            "token_age_days": None if self.token_age_days is None else round(self.token_age_days, 1),
            "budget": None if budget is None else {
                "as_of": _iso(budget.observed_at), "remaining_daily": budget.remaining_daily,
                "daily_limit": budget.daily_limit, "daily_resets_at": _iso(budget.daily_resets_at),
                "remaining_minutely": budget.remaining_minutely, "minutely_limit": budget.minutely_limit},
            "last_run": None if run is None else {
                "at": _iso(run.at), "run_id": run.run_id, "outcome": run.outcome, "days": run.days,
                "counts": run.counts, "error": run.error},
            "pending_intents": self.pending_intents, "deferred_reports": self.deferred_reports,
        }


@dataclass(frozen=True)
class Totals:
    connections: int
    by_health: dict[str, int]
    posted_yesterday: int
    quarantine_open: int
    quarantine_by_reason: dict[str, int]
    by_concern: dict[str, int]  # concern -> connections having it
    pending_intents: int
    deferred_reports: int

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "by_health": self.by_health,
                "posted_yesterday": self.posted_yesterday, "quarantine_open": self.quarantine_open,
                "quarantine_by_reason": self.quarantine_by_reason, "by_concern": self.by_concern,
                "pending_intents": self.pending_intents, "deferred_reports": self.deferred_reports}


def record_run(store: StateStore, connection: str, run_id: str | None, days: list[str], *,
               counts: dict[str, int] | None = None, stopped: str | None = None, failed: str | None = None) -> None:
    """What a run did for one connection, for the overview: call it once per connection a run worked on, with the
    outcome counts (posted, quarantined, …), the reason it stopped early (a spent budget: the rest is deferred), or
    the error that failed it."""
    outcome = "failed" if failed else "stopped" if stopped else "ok"
    error = (failed or stopped or "")[:ERROR_TEXT_LIMIT] or None
    store.audit(RUN_EVENT, connection=connection, run_id=run_id,
                detail={"outcome": outcome, "days": _span(days), "counts": dict(counts or {}), "error": error})


def connection_overview(config: ProjectConfig, store: StateStore, clock: Clock) -> list[Row]:
    """Every configured connection's row, worst first (failing, then attention, then ok; more findings first)."""
    now = clock.now()
    yesterdays = {c.name: (connection_today(c.timezone, clock) - timedelta(days=1)).isoformat()
                  for c in config.connections}
    ledger = store.ledger_counts(yesterdays)
    quarantined = store.open_quarantine_reasons()
    tokens = store.token_ages()
    budgets = store.rate_limits_under(BUDGET_SCOPE_PREFIX)
    deferred = store.deferred_counts()
    runs = store.latest_audit_events(RUN_EVENT)
    days = store.latest_days_posted()
    rows = []
    for conn in config.connections:
        items = quarantined.get(conn.name, [])
        by_reason = Counter(code for reasons in items for code in {r.get("code", "?") for r in reasons})
        refreshed = tokens[conn.name][1] if conn.name in tokens else None
        exchanged = refreshed if refreshed is not None and refreshed > NEVER_EXCHANGED else None
        counts = ledger.get(conn.name)
        row = Row(
            connection=conn.name, division=conn.exact.division, timezone=conn.timezone,
            yesterday=yesterdays[conn.name], posted_yesterday=counts.posted_on_day if counts else 0,
            quarantine_open=len(items), quarantine_by_reason=dict(sorted(by_reason.items())),
            token_refreshed_at=exchanged,
            token_age_days=(now - exchanged).total_seconds() / 86400 if exchanged else None,
            budget=_budget(budgets.get(f"{BUDGET_SCOPE_PREFIX}{conn.exact.division}"), now),
            last_run=_last_run(runs.get(conn.name), days.get(conn.name)),
            pending_intents=counts.pending if counts else 0, deferred_reports=deferred.get(conn.name, 0),
            findings=(),
        )
        rows.append(_judged(row, conn, has_tokens=conn.name in tokens, now=now))
    return sorted(rows, key=lambda r: (-SEVERITY[r.health], -len(r.findings), -r.quarantine_open, r.connection))


def totals(rows: list[Row]) -> Totals:
    reasons: Counter[str] = Counter()
    concerns: Counter[str] = Counter()
    for row in rows:
        reasons.update(row.quarantine_by_reason)
        concerns.update({str(f.concern) for f in row.findings})
    health = Counter(str(row.health) for row in rows)
    return Totals(connections=len(rows), by_health={str(h): health.get(str(h), 0) for h in Health},
                  posted_yesterday=sum(r.posted_yesterday for r in rows),
                  quarantine_open=sum(r.quarantine_open for r in rows),
                  quarantine_by_reason=dict(sorted(reasons.items())), by_concern=dict(sorted(concerns.items())),
                  pending_intents=sum(r.pending_intents for r in rows),
                  deferred_reports=sum(r.deferred_reports for r in rows))


def display(row: dict[str, Any]) -> dict[str, str]:
    """A row (`Row.as_dict`, as `status --json` prints it) as the overview table shows it, one string per column:
    `status` prints it as text, the asset as Markdown."""
    run, budget = row["last_run"], row["budget"]
    reasons = ", ".join(f"{code} {n}" for code, n in row["quarantine_by_reason"].items())
    return {
        "health": row["health"], "connection": row["connection"], "division": str(row["division"]),
        "posted yesterday": str(row["posted_yesterday"]),
        "open quarantine": f"{row['quarantine_open']} ({reasons})" if row["quarantine_open"] else "0",
        "token age": "-" if row["token_age_days"] is None else f"{row['token_age_days']:.1f} d",
        "Exact calls left": "-" if budget is None or budget["remaining_daily"] is None else (
            f"{budget['remaining_daily']}/{budget['daily_limit']}" if budget["daily_limit"]
            else str(budget["remaining_daily"])),
        "last run": "never" if run is None else (f"{_minute(run['at'])} {(run['run_id'] or '-')[:8]} "
                                                 f"{run['outcome']}"),
        "why": row["why"],
    }


def display_totals(total: dict[str, Any]) -> dict[str, str]:
    """The totals (`Totals.as_dict`) as the table's last line, in the columns of `display`."""
    health, concerns = total["by_health"], total["by_concern"]
    reasons = ", ".join(f"{code} {n}" for code, n in total["quarantine_by_reason"].items())
    tokens = sum(concerns.get(str(c), 0) for c in (Concern.NO_TOKENS, Concern.TOKEN_EXPIRED, Concern.TOKEN_OLD))
    waiting = (f"; {total['pending_intents']} unsettled intent(s), {total['deferred_reports']} deferred report(s)"
               if total["pending_intents"] or total["deferred_reports"] else "")
    return {
        "health": "TOTAL", "connection": f"{total['connections']} connections", "division": "",
        "posted yesterday": str(total["posted_yesterday"]),
        "open quarantine": f"{total['quarantine_open']} ({reasons})" if total["quarantine_open"] else "0",
        "token age": f"{tokens} to renew", "Exact calls left": f"{concerns.get(str(Concern.BUDGET_LOW), 0)} low",
        "last run": f"{concerns.get(str(Concern.RUN_FAILED), 0)} failed",
        "why": f"{health['failing']} failing, {health['attention']} attention, {health['ok']} ok{waiting}",
    }


def _judged(row: Row, conn: Connection, *, has_tokens: bool, now: datetime) -> Row:
    found: list[Finding] = []
    if not has_tokens:
        found.append(Finding(Concern.NO_TOKENS, f"no Exact tokens: run `expensify-exact authorize --connection "
                                                f"{conn.name}`"))
    elif row.token_age_days is not None and row.token_age_days >= REFRESH_IDLE_DAYS:
        found.append(Finding(Concern.TOKEN_EXPIRED, f"Exact refresh token {row.token_age_days:.0f} days old, expired "
                                                    f"unused after {REFRESH_IDLE_DAYS}: run `expensify-exact "
                                                    f"authorize --connection {conn.name}`"))
    elif row.token_age_days is not None and row.token_age_days >= IDLE_WARNING_DAYS:
        found.append(Finding(Concern.TOKEN_OLD, f"Exact refresh token {row.token_age_days:.0f} days old, expires "
                                                f"unused at {REFRESH_IDLE_DAYS}"))
    run = row.last_run
    if run is None:
        found.append(Finding(Concern.NEVER_RUN, "no run recorded yet"))
    elif run.outcome == "failed":
        found.append(Finding(Concern.RUN_FAILED, f"last run failed: {run.error}"))
    elif run.outcome == "stopped":
        found.append(Finding(Concern.RUN_STOPPED, f"last run stopped early: {run.error}"))
    elif now - run.at > RUN_OVERDUE_AFTER:
        found.append(Finding(Concern.RUN_OVERDUE, f"last run {_hours(now - run.at)} ago"))
    budget = row.budget
    if budget is not None and budget.remaining_daily is not None and (
            budget.remaining_daily == 0 or (budget.daily_limit
                                            and budget.remaining_daily < budget.daily_limit * BUDGET_LOW_SHARE)):
        resets = f", resets {budget.daily_resets_at:%Y-%m-%d %H:%M}Z" if budget.daily_resets_at else ""
        found.append(Finding(Concern.BUDGET_LOW, f"Exact budget {budget.remaining_daily}"
                                                 f"{f'/{budget.daily_limit}' if budget.daily_limit else ''} "
                                                 f"calls left today{resets}"))
    if row.pending_intents:
        found.append(Finding(Concern.PENDING_INTENTS, f"{row.pending_intents} posting intent(s) unsettled"))
    if row.quarantine_open:
        found.append(Finding(Concern.QUARANTINE_OPEN, f"{row.quarantine_open} report(s) in quarantine"))
    return replace(row, findings=tuple(found))


def _budget(values: dict[str, Any] | None, now: datetime) -> Budget | None:
    if values is None:
        return None

    def current(remaining: int | None, resets_at: datetime | None) -> int | None:
        return None if resets_at is not None and resets_at <= now else remaining

    return Budget(observed_at=values["observed_at"],
                  remaining_daily=current(values["remaining_daily"], values["daily_resets_at"]),
                  daily_limit=values["daily_limit"], daily_resets_at=values["daily_resets_at"],
                  remaining_minutely=current(values["remaining_minutely"], values["minutely_resets_at"]),
                  minutely_limit=values["minutely_limit"])


def _last_run(recorded: RunRecord | None, day: RunRecord | None) -> LastRun | None:
    """The run's own record, unless a newer run posted a closed day without one."""
    if recorded is not None and (day is None or recorded.at >= day.at):
        detail = recorded.detail
        return LastRun(recorded.at, recorded.run_id, detail.get("outcome", "ok"), detail.get("days"),
                       detail.get("counts") or {}, detail.get("error"))
    if day is not None:
        return LastRun(day.at, day.run_id, "day posted", day.detail["day"])
    return None


def _span(days: list[str]) -> str | None:
    ordered = sorted(days)
    if not ordered:
        return None
    return ordered[0] if len(ordered) == 1 else f"{ordered[0]}..{ordered[-1]}"


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"


def _minute(iso: str) -> str:
    """2026-11-25T06:10:42+00:00 -> 2026-11-25 06:10Z (every time the store keeps is UTC)."""
    return f"{iso[:10]} {iso[11:16]}Z"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
