"""Approval days run after they had closed, and reports a run left for later with when to try them again."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import days_posted, deferred_reports


class Deferral(NamedTuple):
    """A deferred report: its approval day, when it may be tried again (None: unknown), when it was deferred."""

    partition_date: str
    resets_at: datetime | None
    deferred_at: datetime


class DayStore(StoreBase):
    def day_mark_posted(self, connection: str, day: str, run_id: str | None) -> None:
        """Record that `day` was run after it closed; the first such run's time is kept."""
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(days_posted.insert().values(connection=connection, day=day, posted_at=utcnow(),
                                                             run_id=run_id))
            except sa.exc.IntegrityError:
                pass

    def days_posted(self, connection: str, days: list[str] | None = None) -> dict[str, datetime]:
        """day -> when it was first run after it closed, for `days` (default: all of the connection's)."""
        query = sa.select(days_posted.c.day, days_posted.c.posted_at).where(days_posted.c.connection == connection)
        if days is not None:
            query = query.where(days_posted.c.day.in_(list(days)))
        with self.engine.connect() as conn:
            return {r.day: aware(r.posted_at) for r in conn.execute(query)}

    def last_day_posted(self, connection: str) -> tuple[str, datetime] | None:
        """The connection's newest closed day that was run, and when."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(days_posted.c.day, days_posted.c.posted_at)
                               .where(days_posted.c.connection == connection)
                               .order_by(days_posted.c.day.desc()).limit(1)).first()
        return (row.day, aware(row.posted_at)) if row else None

    def deferred_put(self, connection: str, reports: dict[str, str], resets_at: datetime | None) -> None:
        """Record reports (report ID -> approval day) left for a later run, not to be tried before `resets_at`."""
        now = utcnow()
        for report_id, day in reports.items():
            self._upsert(deferred_reports, {"connection": connection, "report_id": report_id},
                         {"partition_date": day, "deferred_at": now, "resets_at": resets_at})

    def deferred_clear(self, connection: str, report_ids: list[str]) -> None:
        if not report_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(deferred_reports.delete().where(deferred_reports.c.connection == connection,
                                                         deferred_reports.c.report_id.in_(list(report_ids))))

    def deferred(self, connection: str) -> dict[str, Deferral]:
        """report ID -> its deferral, for the connection's deferred reports."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(deferred_reports).where(deferred_reports.c.connection == connection))
            return {r.report_id: Deferral(r.partition_date, aware(r.resets_at), aware(r.deferred_at)) for r in rows}
