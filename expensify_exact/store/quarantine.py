"""The quarantine: one item per report that could not be posted, with its reasons (and, for a report changed after
posting, the drafted correction), until replayed, resolved, ignored or approved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import quarantine


class QuarantineStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"  # dealt with: outside the connector, already posted, or a correction approved
    IGNORED = "ignored"  # never to be posted, nor asked about again
    REPLAYED = "replayed"  # posted by a later run


@dataclass(frozen=True)
class QuarantineItem:
    connection: str
    report_id: str
    status: QuarantineStatus
    partition_date: str | None
    reasons: list[dict]
    transaction_ids: list[str]
    content_hash: str | None
    first_seen_at: datetime
    updated_at: datetime
    resolution_note: str | None
    correction: dict | None = None  # CHANGED_AFTER_POSTING: {reverse_entry_id, corrected_entry}


class QuarantineStore(StoreBase):
    def quarantine_put(self, connection: str, report_id: str, *, partition_date: str | None, reasons: list[dict],
                       transaction_ids: list[str], content_hash: str | None, correction: dict | None = None) -> None:
        """Open (or refresh) the quarantine item of a report. One row per report, never duplicated.

        An item an operator ignored keeps that status (and note) while its reasons are refreshed: ignoring means
        "do not ask again about this report", so a rerun of its day must not reopen it.
        """
        now = utcnow()
        values = {"status": QuarantineStatus.OPEN, "partition_date": partition_date, "reasons": json.dumps(reasons),
                  "transaction_ids": json.dumps(transaction_ids), "content_hash": content_hash, "updated_at": now,
                  "resolution_note": None,
                  "correction": json.dumps(correction, sort_keys=True) if correction is not None else None}
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    exists = conn.execute(sa.select(quarantine.c.report_id, quarantine.c.status).where(
                        quarantine.c.connection == connection, quarantine.c.report_id == report_id)).first()
                    row = values
                    if exists and exists.status == QuarantineStatus.IGNORED:
                        row = {k: v for k, v in values.items() if k not in ("status", "resolution_note")}
                    if exists:
                        conn.execute(quarantine.update().where(quarantine.c.connection == connection,
                                                               quarantine.c.report_id == report_id).values(**row))
                    else:
                        conn.execute(quarantine.insert().values(connection=connection, report_id=report_id,
                                                                first_seen_at=now, **row))
                return
            except sa.exc.IntegrityError:
                if attempt:
                    raise
                # Another run quarantined the same report between our read and our insert: update theirs.

    def quarantine_set_status(self, connection: str, report_id: str, status: QuarantineStatus,
                              note: str | None = None) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
            ).values(status=status, resolution_note=note, updated_at=utcnow())).rowcount)

    def quarantine_items(self, connection: str | None = None, status: QuarantineStatus | None = QuarantineStatus.OPEN,
                         report_ids: list[str] | None = None) -> list[QuarantineItem]:
        query = sa.select(quarantine).order_by(quarantine.c.partition_date, quarantine.c.report_id)
        if connection:
            query = query.where(quarantine.c.connection == connection)
        if status:
            query = query.where(quarantine.c.status == status)
        if report_ids is not None:
            query = query.where(quarantine.c.report_id.in_(list(report_ids)))
        with self.engine.connect() as conn:
            return [_quarantine_item(r) for r in conn.execute(query)]

    def quarantine_get(self, connection: str, report_id: str) -> QuarantineItem | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(quarantine).where(quarantine.c.connection == connection,
                                                           quarantine.c.report_id == report_id)).first()
        return _quarantine_item(row) if row else None

    def quarantine_close(self, connection: str, report_id: str, status: QuarantineStatus, note: str,
                         expected_status: QuarantineStatus = QuarantineStatus.OPEN) -> bool:
        """Move an item out of `expected_status` (an operator's resolve or ignore); False if it was not in it."""
        with self.engine.begin() as conn:
            return bool(conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
                quarantine.c.status == expected_status,
            ).values(status=status, resolution_note=note, updated_at=utcnow())).rowcount)


def _quarantine_item(r) -> QuarantineItem:
    return QuarantineItem(r.connection, r.report_id, QuarantineStatus(r.status), r.partition_date,
                          json.loads(r.reasons), json.loads(r.transaction_ids), r.content_hash, aware(r.first_seen_at),
                          aware(r.updated_at), r.resolution_note, json.loads(r.correction) if r.correction else None)
