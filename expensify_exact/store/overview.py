"""What the overview of all connections reads, each concern in one query for every connection at once (never a
query per connection): posted and pending ledger entries, open quarantine reasons, Exact budgets, deferred reports,
the latest run and the newest closed day per connection."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware
from expensify_exact.store.ledger import IntentStatus
from expensify_exact.store.quarantine import QuarantineStatus
from expensify_exact.store.schema import audit_log, days_posted, deferred_reports, intents, quarantine, rate_limits


class LedgerCounts(NamedTuple):
    """A connection's reports posted for one approval day, and its posting intents still unsettled."""

    posted_on_day: int
    pending: int


class RunRecord(NamedTuple):
    """The newest audit row of one event for a connection: when, which run, and its detail (JSON-decoded)."""

    at: datetime
    run_id: str | None
    detail: dict


class OverviewStore(StoreBase):
    def ledger_counts(self, day_of: Mapping[str, str]) -> dict[str, LedgerCounts]:
        """connection -> its reports posted for the approval day `day_of[connection]`, and its pending intents,
        for every connection in `day_of` (those without any row get none)."""
        days = set(day_of.values())
        standing = intents.c.stands & ((intents.c.status == IntentStatus.PENDING)
                                       | ((intents.c.status == IntentStatus.POSTED)
                                          & intents.c.partition_date.in_(sorted(days))))
        query = (sa.select(intents.c.connection, intents.c.status, intents.c.partition_date,
                           sa.func.count().label("n"))
                 .where(standing).group_by(intents.c.connection, intents.c.status, intents.c.partition_date))
        posted: dict[str, int] = {}
        pending: dict[str, int] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                if row.connection not in day_of:
                    continue
                if row.status == IntentStatus.PENDING:
                    pending[row.connection] = pending.get(row.connection, 0) + row.n
                if row.status == IntentStatus.POSTED and row.partition_date == day_of[row.connection]:
                    posted[row.connection] = posted.get(row.connection, 0) + row.n
        return {name: LedgerCounts(posted.get(name, 0), pending.get(name, 0)) for name in set(posted) | set(pending)}

    def open_quarantine_reasons(self) -> dict[str, list[list[dict]]]:
        """connection -> the reasons of each of its open quarantine items."""
        query = (sa.select(quarantine.c.connection, quarantine.c.reasons)
                 .where(quarantine.c.status == QuarantineStatus.OPEN))
        found: dict[str, list[list[dict]]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                found.setdefault(row.connection, []).append(json.loads(row.reasons))
        return found

    def rate_limits_under(self, prefix: str) -> dict[str, dict[str, Any]]:
        """scope -> the budgets last published for it, for every scope starting with `prefix` (e.g. exact:division:)."""
        query = sa.select(rate_limits).where(rate_limits.c.scope.startswith(prefix, autoescape=True))
        with self.engine.connect() as conn:
            return {row.scope: {k: aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()
                                if k != "scope"} for row in conn.execute(query)}

    def deferred_counts(self) -> dict[str, int]:
        """connection -> how many of its reports wait for a later run."""
        query = (sa.select(deferred_reports.c.connection, sa.func.count().label("n"))
                 .group_by(deferred_reports.c.connection))
        with self.engine.connect() as conn:
            return {row.connection: row.n for row in conn.execute(query)}

    def latest_days_posted(self) -> dict[str, RunRecord]:
        """connection -> its newest closed approval day that was run (in `detail["day"]`), when and by which run."""
        newest = (sa.select(days_posted.c.connection, sa.func.max(days_posted.c.day).label("day"))
                  .group_by(days_posted.c.connection).subquery())
        query = sa.select(days_posted).join(newest, (days_posted.c.connection == newest.c.connection)
                                            & (days_posted.c.day == newest.c.day))
        with self.engine.connect() as conn:
            return {row.connection: RunRecord(aware(row.posted_at), row.run_id, {"day": row.day})
                    for row in conn.execute(query)}

    def latest_audit_events(self, event: str) -> dict[str, RunRecord]:
        """connection -> its newest audit row of `event`."""
        newest = (sa.select(audit_log.c.connection, sa.func.max(audit_log.c.id).label("id"))
                  .where(audit_log.c.event == event, audit_log.c.connection.is_not(None))
                  .group_by(audit_log.c.connection).subquery())
        query = sa.select(audit_log.c.connection, audit_log.c.at, audit_log.c.run_id, audit_log.c.detail).join(
            newest, audit_log.c.id == newest.c.id)
        with self.engine.connect() as conn:
            return {row.connection: RunRecord(aware(row.at), row.run_id, json.loads(row.detail) if row.detail else {})
                    for row in conn.execute(query)}
