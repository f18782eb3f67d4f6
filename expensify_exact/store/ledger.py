"""The intent ledger: every entry the connector posts (a report's post, a correction's reversal and corrected entry)
is written as an intent before its POST and marked posted after, so a crash in between is settled, never redone; and
the posted ledger per report, the entry that stands for it now."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa

from expensify_exact.errors import StateStoreError
from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.quarantine import QuarantineStatus
from expensify_exact.store.schema import intents, quarantine


class IntentKind(StrEnum):
    POST = "post"  # a report's entry
    REVERSAL = "reversal"  # of a posted entry, by an approved correction
    CORRECTION = "correction"  # the corrected entry that then stands for the report


class IntentStatus(StrEnum):
    PENDING = "pending"  # written before the POST; its fate in Exact is unknown until settled
    POSTED = "posted"


@dataclass(frozen=True)
class NewIntent:
    """An entry about to be posted: its EntryID (ours), the POST body without EntryID, and what it stands for."""

    kind: IntentKind
    entry_id: str
    content_hash: str
    body: dict
    partition_date: str | None
    transaction_ids: list[str]
    total_cents: int
    replaces_entry_id: str | None = None  # a reversal's or correction's: the posted entry it corrects


@dataclass(frozen=True)
class Intent:
    connection: str
    report_id: str
    kind: IntentKind
    entry_id: str  # the EntryID we sent
    status: IntentStatus
    replaces_entry_id: str | None
    content_hash: str
    body: dict | None  # None only for a post intent from before bodies were kept
    entry_number: int | None
    partition_date: str | None
    transaction_ids: list[str]
    total_cents: int
    posted_at: datetime | None
    exact_entry_id: str | None = None  # Exact's EntryID when it assigned its own

    @property
    def posted_entry_id(self) -> str:
        """The EntryID under which Exact holds this entry."""
        return self.exact_entry_id or self.entry_id


@dataclass(frozen=True)
class LedgerRow:
    """The entry that stands for a report: its post, or the corrected entry of an approved correction."""

    connection: str
    report_id: str
    status: IntentStatus
    content_hash: str
    entry_id: str  # as Exact holds it once posted
    entry_number: int | None
    partition_date: str | None
    transaction_ids: list[str]
    total_cents: int
    posted_at: datetime | None
    client_entry_id: str | None = None  # the EntryID we sent
    body: dict | None = None  # the intent's POST body (without EntryID), when recorded


class LedgerStore(StoreBase):
    def ledger_get(self, connection: str, report_id: str) -> LedgerRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(intents).where(intents.c.connection == connection,
                                                        intents.c.report_id == report_id, intents.c.stands)).first()
        return _ledger_row(row) if row else None

    def ledger_rows(self, connection: str | None = None, status: IntentStatus | None = None) -> list[LedgerRow]:
        query = sa.select(intents).where(intents.c.stands).order_by(intents.c.connection, intents.c.report_id)
        if connection:
            query = query.where(intents.c.connection == connection)
        if status:
            query = query.where(intents.c.status == status)
        with self.engine.connect() as conn:
            return [_ledger_row(r) for r in conn.execute(query)]

    def ledger_find_entry(self, connection: str, entry_id: str) -> LedgerRow | None:
        """The ledger row (posted or pending) whose entry, as Exact holds it, is `entry_id`; None if none is."""
        held = sa.func.lower(sa.func.coalesce(intents.c.exact_entry_id, intents.c.entry_id))
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(intents).where(intents.c.connection == connection, intents.c.stands,
                                                        held == entry_id.strip("{}").lower())).first()
        return _ledger_row(row) if row else None

    def intents_write(self, connection: str, report_id: str, new: Sequence[NewIntent], run_id: str | None) -> None:
        """Record every entry about to be posted, in one transaction, before the first POST.

        A post intent becomes the report's ledger entry, replacing a pending one; it is refused if the report's entry
        is posted. A reversal or correction intent already recorded (same entry ID) is kept as it is, posted or not.

        Raises:
            StateStoreError: the report is already posted.
        """
        with self.engine.begin() as conn:
            for intent in new:
                values = {"status": IntentStatus.PENDING, "content_hash": intent.content_hash,
                          "body": json.dumps(intent.body, sort_keys=True), "exact_entry_id": None,
                          "entry_number": None, "partition_date": intent.partition_date,
                          "transaction_ids": json.dumps(list(intent.transaction_ids)),
                          "total_cents": int(intent.total_cents), "intent_at": utcnow(), "posted_at": None,
                          "run_id": run_id, "replaces_entry_id": intent.replaces_entry_id}
                key = {"connection": connection, "report_id": report_id, "kind": intent.kind,
                       "entry_id": intent.entry_id}
                if intent.kind is IntentKind.POST:
                    _write_post_intent(conn, key, values)
                elif not conn.execute(sa.select(intents.c.entry_id).where(*_where(key))).first():
                    conn.execute(intents.insert().values(**key, stands=False, **values))

    def intents_for(self, connection: str, report_id: str, replaces_entry_id: str | None = None) -> list[Intent]:
        """A report's intents of every kind (only those correcting `replaces_entry_id`, if given), oldest first."""
        query = (sa.select(intents).where(intents.c.connection == connection, intents.c.report_id == report_id)
                 .order_by(intents.c.intent_at, intents.c.kind.desc(), intents.c.entry_id))
        if replaces_entry_id:
            query = query.where(intents.c.replaces_entry_id == replaces_entry_id)
        with self.engine.connect() as conn:
            return [_intent(r) for r in conn.execute(query)]

    def intent_mark_posted(self, connection: str, report_id: str, kind: IntentKind, entry_id: str,
                           entry_number: int | None, exact_entry_id: str | None = None) -> None:
        """Record the intent `entry_id` (ours) as posted, with Exact's own EntryID if it assigned another."""
        theirs = exact_entry_id.lower() if exact_entry_id and exact_entry_id.lower() != entry_id else None
        with self.engine.begin() as conn:
            conn.execute(intents.update().where(*_where(_key(connection, report_id, kind, entry_id))).values(
                status=IntentStatus.POSTED, entry_number=entry_number, posted_at=utcnow(), exact_entry_id=theirs))

    def intent_drop(self, connection: str, report_id: str, kind: IntentKind, entry_id: str) -> None:
        """Forget a pending intent that Exact is known not to hold (it refused the entry, or never got it)."""
        with self.engine.begin() as conn:
            conn.execute(intents.delete().where(*_where(_key(connection, report_id, kind, entry_id)),
                                                intents.c.status == IntentStatus.PENDING))

    def correction_complete(self, connection: str, report_id: str, *, replaces_entry_id: str, entry_id: str,
                            note: str) -> None:
        """Make the posted corrected entry `entry_id` (ours) the report's ledger entry in place of `replaces_entry_id`
        (as Exact holds it) and close the quarantine item, in one transaction.

        Raises:
            StateStoreError: the ledger no longer holds `replaces_entry_id` as posted, or the correction is not
                posted; nothing changed.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            retired = conn.execute(intents.update().where(
                intents.c.connection == connection, intents.c.report_id == report_id, intents.c.stands,
                intents.c.status == IntentStatus.POSTED,
                sa.func.coalesce(intents.c.exact_entry_id, intents.c.entry_id) == replaces_entry_id,
            ).values(stands=False)).rowcount
            standing = retired and conn.execute(intents.update().where(
                *_where(_key(connection, report_id, IntentKind.CORRECTION, entry_id)),
                intents.c.status == IntentStatus.POSTED).values(stands=True)).rowcount
            if not standing:
                raise StateStoreError(f"report {report_id} of {connection} no longer has entry {replaces_entry_id} "
                                      f"posted in the ledger; refusing to record its correction")
            conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
            ).values(status=QuarantineStatus.RESOLVED, resolution_note=note, updated_at=now))


def _write_post_intent(conn, key: dict, values: dict) -> None:
    # Write first, read after: two runs racing for one report then queue on the write lock instead of both reading
    # "no row" and one failing on the unique standing entry (overlapping backfills running at once).
    try:
        with conn.begin_nested():
            conn.execute(intents.insert().values(**key, stands=True, **values))
        return
    except sa.exc.IntegrityError:
        pass
    replaced = conn.execute(intents.update().where(
        intents.c.connection == key["connection"], intents.c.report_id == key["report_id"], intents.c.stands,
        intents.c.status != IntentStatus.POSTED).values(entry_id=key["entry_id"], **values)).rowcount
    if not replaced:
        raise StateStoreError(f"report {key['report_id']} is already posted for {key['connection']}; "
                              f"refusing a new intent")


def _key(connection: str, report_id: str, kind: IntentKind, entry_id: str) -> dict:
    return {"connection": connection, "report_id": report_id, "kind": kind, "entry_id": entry_id}


def _where(key: dict) -> list:
    return [intents.c[name] == value for name, value in key.items()]


def _intent(r) -> Intent:
    return Intent(r.connection, r.report_id, IntentKind(r.kind), r.entry_id, IntentStatus(r.status),
                  r.replaces_entry_id, r.content_hash, json.loads(r.body) if r.body else None, r.entry_number,
                  r.partition_date, json.loads(r.transaction_ids), r.total_cents, aware(r.posted_at),
                  r.exact_entry_id)


def _ledger_row(r) -> LedgerRow:
    return LedgerRow(r.connection, r.report_id, IntentStatus(r.status), r.content_hash,
                     r.exact_entry_id or r.entry_id, r.entry_number, r.partition_date, json.loads(r.transaction_ids),
                     r.total_cents, aware(r.posted_at), r.entry_id, json.loads(r.body) if r.body else None)
