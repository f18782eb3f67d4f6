"""The append-only audit log: every intent, post, quarantine and operator action, with who and why; there is no
update or delete here."""

from __future__ import annotations

import json
from datetime import datetime

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import audit_log


class AuditStore(StoreBase):
    def audit(self, event: str, *, connection: str | None = None, report_id: str | None = None,
              transaction_ids: list[str] | None = None, entry_id: str | None = None, entry_number: int | None = None,
              run_id: str | None = None, partition_date: str | None = None, detail: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(audit_log.insert().values(
                at=utcnow(), connection=connection, event=event, report_id=report_id,
                transaction_ids=json.dumps(transaction_ids) if transaction_ids is not None else None,
                entry_id=entry_id, entry_number=entry_number, run_id=run_id, partition_date=partition_date,
                detail=json.dumps(detail, default=str, sort_keys=True) if detail else None))

    def audit_rows(self, connection: str | None = None, report_id: str | None = None,
                   since: datetime | None = None) -> list[dict]:
        query = sa.select(audit_log).order_by(audit_log.c.id)
        if connection:
            query = query.where(audit_log.c.connection == connection)
        if report_id:
            query = query.where(audit_log.c.report_id == report_id)
        if since:
            query = query.where(audit_log.c.at >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) | {"at": aware(r.at)} for r in conn.execute(query)]
