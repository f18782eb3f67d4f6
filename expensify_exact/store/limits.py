"""What each API's rate limits have seen of a credential, shared by every process using it: Exact's reported
budgets, Expensify's recent requests, and the errors Exact answered per endpoint and hour."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import error_budget, rate_limits, request_log


class LimitStore(StoreBase):
    def rate_limits_get(self, scope: str) -> dict[str, Any] | None:
        """The budgets last published for `scope` (column name -> value, datetimes in UTC), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rate_limits).where(rate_limits.c.scope == scope)).one_or_none()
        if row is None:
            return None
        return {k: aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items() if k != "scope"}

    def rate_limits_put(self, scope: str, values: dict[str, Any]) -> None:
        self._upsert(rate_limits, {"scope": scope}, values)

    def request_log_add(self, scope: str, at: datetime, keep: timedelta) -> None:
        """Record a request sent at `at`, forgetting this scope's requests older than `keep` before it."""
        with self.engine.begin() as conn:
            conn.execute(request_log.insert().values(scope=scope, at=at))
            conn.execute(request_log.delete().where(request_log.c.scope == scope, request_log.c.at < at - keep))

    def request_log_since(self, scope: str, since: datetime) -> list[datetime]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(request_log.c.at).where(request_log.c.scope == scope,
                                                                  request_log.c.at > since)
                                .order_by(request_log.c.at))
            return [aware(r.at) for r in rows]
    def error_budget_add(self, scope: str, hour: datetime, status: int | None, message: str | None) -> int:
        """Count one error Exact answered for `scope` in the clock hour starting at `hour`; returns the new count."""
        with self.engine.begin() as conn:
            where = [error_budget.c.scope == scope, error_budget.c.hour == hour]
            values = {"last_status": status, "last_message": (message or "")[:500], "updated_at": utcnow()}
            if not conn.execute(error_budget.update().where(*where)
                                .values(errors=error_budget.c.errors + 1, **values)).rowcount:
                try:
                    with conn.begin_nested():
                        conn.execute(error_budget.insert().values(scope=scope, hour=hour, errors=1, **values))
                except sa.exc.IntegrityError:  # another process counted the first one at the same moment
                    conn.execute(error_budget.update().where(*where)
                                 .values(errors=error_budget.c.errors + 1, **values))
            conn.execute(error_budget.delete().where(error_budget.c.hour < hour - timedelta(days=2)))
            return conn.execute(sa.select(error_budget.c.errors).where(*where)).scalar_one()

    def error_budget_count(self, scope: str, hour: datetime) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(error_budget.c.errors).where(
                error_budget.c.scope == scope, error_budget.c.hour == hour)).scalar()
        return int(value or 0)

    def error_budget_rows(self, since: datetime) -> list[dict[str, Any]]:
        """Every scope's error count for the clock hours starting at or after `since`."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(error_budget).where(error_budget.c.hour >= since)
                                .order_by(error_budget.c.scope, error_budget.c.hour))
            return [dict(r._mapping) | {"hour": aware(r.hour), "updated_at": aware(r.updated_at)} for r in rows]
