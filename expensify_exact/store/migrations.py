"""Versioned migrations of the state schema: each creates or alters what its version introduced, and the runner
applies the missing ones in order, once, recording each in `ee_schema_migrations`. Never edit a shipped one."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from expensify_exact.errors import StateStoreError
from expensify_exact.store.schema import (
    audit_log,
    connection_facts,
    days_posted,
    deferred_reports,
    dimension_snapshots,
    error_budget,
    exact_tokens,
    intents,
    locks,
    moment,
    notifications,
    quarantine,
    rate_limits,
    report_key,
    request_log,
    schema_migrations,
    secrets,
)

# Tables of versions 1-7 that migration 8 moved into `ee_intents` and dropped: the posted ledger (one row per
# report) and the correction intents (reversal and corrected entry of an approved CHANGED_AFTER_POSTING report).
legacy = sa.MetaData()


def _entry_columns() -> list[sa.Column]:
    """The columns both legacy tables had for the entry they record."""
    return [sa.Column("entry_number", sa.Integer, nullable=True),
            sa.Column("partition_date", sa.String(10), nullable=True),
            sa.Column("transaction_ids", sa.Text, nullable=False),
            sa.Column("total_cents", sa.BigInteger, nullable=False),
            moment("intent_at"),
            moment("posted_at", nullable=True),
            sa.Column("run_id", sa.String(64), nullable=True)]


posted_ledger = sa.Table(
    "ee_posted_ledger", legacy,
    *report_key(),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("entry_id", sa.String(36), nullable=False),  # Exact's EntryID once posted
    *_entry_columns(),
    sa.Column("client_entry_id", sa.String(36), nullable=True),  # ours (migration 4)
    sa.Column("body", sa.Text, nullable=True),  # migration 4
)
corrections = sa.Table(
    "ee_corrections", legacy,
    *report_key(),
    sa.Column("entry_id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("replaces_entry_id", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    *_entry_columns(),
    sa.Column("exact_entry_id", sa.String(36), nullable=True),  # migration 4
)


def _move_to_intents(conn: Connection) -> None:
    """Migration 8: every ledger row and correction intent becomes an intent, each pending one still pending (the
    next run settles it by asking Exact); the drafted correction of a CHANGED_AFTER_POSTING item leaves its reason
    for the quarantine's own column. A ledger row an approved correction had taken over stands as that correction."""
    moved = conn.execute(sa.select(corrections)).all()
    completed = {(r.connection, r.report_id, r.entry_id) for r in moved if r.kind == "correction"
                 and r.status == "posted"}
    standing: set[tuple[str, str, str]] = set()
    rows = []
    for r in conn.execute(sa.select(posted_ledger)).all():
        ours = r.client_entry_id or r.entry_id
        if (r.connection, r.report_id, ours) in completed:
            standing.add((r.connection, r.report_id, ours))
            continue
        rows.append(_intent(r, kind="post", entry_id=ours, stands=True, replaces_entry_id=None,
                            exact_entry_id=r.entry_id if r.entry_id != ours else None))
    for r in moved:
        rows.append(_intent(r, kind=r.kind, entry_id=r.entry_id, replaces_entry_id=r.replaces_entry_id,
                            stands=(r.connection, r.report_id, r.entry_id) in standing and r.kind == "correction",
                            exact_entry_id=r.exact_entry_id))
    if rows:
        conn.execute(intents.insert(), rows)
    for item in conn.execute(sa.select(quarantine.c.connection, quarantine.c.report_id, quarantine.c.reasons)).all():
        reasons = json.loads(item.reasons)
        drafted = [r.pop("correction") for r in reasons if "correction" in r]
        if drafted:
            conn.execute(quarantine.update().where(
                quarantine.c.connection == item.connection, quarantine.c.report_id == item.report_id,
            ).values(reasons=json.dumps(reasons), correction=drafted[0]))
    corrections.drop(conn)
    posted_ledger.drop(conn)


def _intent(r, **values) -> dict:
    return {"connection": r.connection, "report_id": r.report_id, "status": r.status, "content_hash": r.content_hash,
            "body": r.body, "entry_number": r.entry_number, "partition_date": r.partition_date,
            "transaction_ids": r.transaction_ids, "total_cents": r.total_cents, "intent_at": r.intent_at,
            "posted_at": r.posted_at, "run_id": r.run_id} | values


MIGRATIONS: list[tuple[int, str, list[sa.Table]]] = [
    (1, "locks, secrets, tokens, ledger, quarantine, audit log",
     [locks, secrets, exact_tokens, posted_ledger, quarantine, audit_log]),
    (2, "correction intents for approved CHANGED_AFTER_POSTING reports", [corrections]),
    (3, "rate-limit budgets and request times shared by the processes using one credential",
     [rate_limits, request_log]),
    (4, "connection facts, per-endpoint error budget, client and Exact EntryIDs",
     [connection_facts, error_budget]),
    (5, "each division's last dimension snapshot, refreshed incrementally", [dimension_snapshots]),
    (6, "approval days posted after they closed, and deferred reports with when to try them again",
     [days_posted, deferred_reports]),
    (7, "digests and alerts sent once", [notifications]),
    (8, "one intent ledger for posts and corrections; drafted corrections in their own quarantine column",
     [intents]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# Columns a migration adds to a table an earlier one created (a fresh database gets them with the table).
ADDED_COLUMNS: dict[int, list[tuple[sa.Table, str]]] = {
    4: [(posted_ledger, "client_entry_id"), (posted_ledger, "body"), (corrections, "exact_entry_id")],
    8: [(quarantine, "correction")],
}
# What a migration does to the rows, after its tables and columns exist.
DATA_STEPS: dict[int, Callable[[Connection], None]] = {8: _move_to_intents}


def migrate(engine: Engine, up_to: int = SCHEMA_VERSION) -> int:
    """Apply the migrations missing from the database, up to version `up_to`; returns the newest version applied.

    Raises:
        StateStoreError: the database is newer than this connector.
    """
    with engine.begin() as conn:
        schema_migrations.create(conn, checkfirst=True)
        applied = {row.version for row in conn.execute(sa.select(schema_migrations.c.version))}
        for version, description, tables in MIGRATIONS:
            if version in applied or version > up_to:
                continue
            for table in tables:
                table.create(conn, checkfirst=True)
            for table, column in ADDED_COLUMNS.get(version, []):
                table.create(conn, checkfirst=True)
                present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
                if column not in present:
                    col = table.c[column]
                    conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column} "
                                         f"{col.type.compile(dialect=conn.dialect)}"))
            if step := DATA_STEPS.get(version):
                step(conn)
            conn.execute(schema_migrations.insert().values(version=version, description=description,
                                                           applied_at=datetime.now(timezone.utc)))
            applied.add(version)
        newest = max(applied)
    if newest > SCHEMA_VERSION:
        raise StateStoreError(f"the state database has schema version {newest}, newer than this connector "
                              f"({SCHEMA_VERSION}); upgrade expensify-exact")
    return newest
