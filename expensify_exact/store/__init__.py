"""The connector's own state: SQLite by default, PostgreSQL in production, through one SQLAlchemy Core schema.
Tables are prefixed `ee_` so they can share a database with Dagster's own storage.

Holds lease locks, encrypted secrets and Exact tokens, the posted ledger, the quarantine, the append-only audit log
and what each API's rate limits have seen of a credential (Exact's reported budgets, Expensify's recent requests),
which every process sharing the credential reads before calling.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from expensify_exact.errors import StateStoreError

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "ee_schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)
locks = sa.Table(
    "ee_locks", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
)
secrets = sa.Table(
    "ee_secrets", metadata,
    sa.Column("scope", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("ciphertext", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
exact_tokens = sa.Table(
    "ee_exact_tokens", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("ciphertext", sa.Text, nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("refresh_issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
posted_ledger = sa.Table(
    "ee_posted_ledger", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending | posted
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("entry_id", sa.String(36), nullable=False),
    sa.Column("entry_number", sa.Integer, nullable=True),
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("transaction_ids", sa.Text, nullable=False),
    sa.Column("total_cents", sa.BigInteger, nullable=False),
    sa.Column("intent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("posted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    # Our EntryID, sent with the POST (migration 4). Exact may assign its own (exact-online.md §13); `entry_id` then
    # holds Exact's once the entry is posted, and this column keeps ours.
    sa.Column("client_entry_id", sa.String(36), nullable=True),
    # The POST body of the intent (without EntryID, migration 4): what a later run looks for in Exact's lines when
    # the outcome was never heard, even if the report has changed since.
    sa.Column("body", sa.Text, nullable=True),
)
quarantine = sa.Table(
    "ee_quarantine", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # open | resolved | ignored | replayed
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of {code, transaction_id, dimension, value, message}
    sa.Column("transaction_ids", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=True),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("resolution_note", sa.Text, nullable=True),
)
audit_log = sa.Table(
    "ee_audit_log", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("connection", sa.String(100), nullable=True),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("report_id", sa.String(64), nullable=True),
    sa.Column("transaction_ids", sa.Text, nullable=True),
    sa.Column("entry_id", sa.String(36), nullable=True),
    sa.Column("entry_number", sa.Integer, nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)

# The two entries an approved CHANGED_AFTER_POSTING correction posts (the reversal of the posted entry and the
# corrected entry), as intents written together before either POST, so a crash between them is settled, not redone.
corrections = sa.Table(
    "ee_corrections", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("entry_id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # reversal | correction
    sa.Column("replaces_entry_id", sa.String(36), nullable=False),  # the ledger's posted entry being corrected
    sa.Column("status", sa.String(16), nullable=False),  # pending | posted
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the exact POST body (without EntryID): a retry sends the same entry
    sa.Column("entry_number", sa.Integer, nullable=True),
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("transaction_ids", sa.Text, nullable=False),
    sa.Column("total_cents", sa.BigInteger, nullable=False),
    sa.Column("intent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("posted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    # The EntryID Exact gave the posted entry, when it is not ours (migration 4, exact-online.md §13).
    sa.Column("exact_entry_id", sa.String(36), nullable=True),
)

# What an API last said about a credential's budgets (e.g. Exact's X-RateLimit-* headers for one division), so a
# run that starts in a minute another run used up waits instead of collecting a 429. Advisory, overwritten per call.
rate_limits = sa.Table(
    "ee_rate_limits", metadata,
    sa.Column("scope", sa.String(100), primary_key=True),  # e.g. exact:division:<n>
    sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("remaining_minutely", sa.Integer, nullable=True),
    sa.Column("minutely_limit", sa.Integer, nullable=True),
    sa.Column("minutely_resets_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("remaining_daily", sa.Integer, nullable=True),
    sa.Column("daily_limit", sa.Integer, nullable=True),
    sa.Column("daily_resets_at", sa.DateTime(timezone=True), nullable=True),
)

# When requests went out with one credential of an API that does not report budgets (Expensify: 5 per 10 s, 20 per
# 60 s), so the steps and processes using it count the same window. Rows older than a few minutes are pruned.
request_log = sa.Table(
    "ee_request_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(100), nullable=False),  # e.g. expensify:<connection>
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_ee_request_log_scope_at", "scope", "at"),
)

# What the connector has learned about how a connection's services behave where the reference leaves it open
# (e.g. `exact_keeps_client_entry_id`, written by `preflight --write-test`). JSON values; None = unknown.
connection_facts = sa.Table(
    "ee_connection_facts", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

# Errors Exact answered per division, endpoint and clock hour, counted by every process using the state DB, so
# the connector stops calling an endpoint well before Exact's block at 10 errors an hour (exact-online.md §6).
error_budget = sa.Table(
    "ee_error_budget", metadata,
    sa.Column("scope", sa.String(200), primary_key=True),  # exact:<division>:<endpoint>
    sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),  # start of the UTC clock hour
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_message", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Columns a migration adds to a table an earlier one created (a fresh database gets them with the table).
ADDED_COLUMNS: dict[int, list[tuple[sa.Table, str]]] = {
    4: [(posted_ledger, "client_entry_id"), (posted_ledger, "body"), (corrections, "exact_entry_id")],
}

# Each Exact division's last dimension snapshot (snapshots.py): per table the rows as Exact returned them, the cursor
# an incremental read continues from (sync Timestamp or Modified), when it was last read in full and last checked.
# A cache of Exact's state, not posting state: losing it costs one full read. `dimension` "division_access" records
# the last successful division check.
dimension_snapshots = sa.Table(
    "ee_dimension_snapshots", metadata,
    sa.Column("scope", sa.String(100), primary_key=True),  # exact:division:<n>
    sa.Column("dimension", sa.String(40), primary_key=True),
    sa.Column("rows", sa.Text, nullable=False),  # JSON list of records
    sa.Column("cursor", sa.String(64), nullable=True),
    sa.Column("meta", sa.Text, nullable=False),  # JSON: source, confirmed-missing codes, webhook event seen
    sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
)

# Approval days whose run came after the day had ended in the connection's zone (plus the grace): a report that
# first shows up in such a day later is a late approval, and `status` and the digest say when the newest was posted.
days_posted = sa.Table(
    "ee_days_posted", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),  # the first run after the day closed
    sa.Column("run_id", sa.String(64), nullable=True),
)

# Reports a run left for later (Exact's daily budget or an endpoint's hourly error budget ran out, Exact refused the
# connection, or a POST got no certain answer), until a later run settles them; the sensor
# `post_deferred_after_reset` reruns their days once `resets_at` has passed.
deferred_reports = sa.Table(
    "ee_deferred_reports", metadata,
    sa.Column("connection", sa.String(100), primary_key=True),
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("partition_date", sa.String(10), nullable=False),
    sa.Column("deferred_at", sa.DateTime(timezone=True), nullable=False),
    # Not before: Exact's daily X-RateLimit-Reset for a spent daily budget, else the next clock hour; None = unknown.
    sa.Column("resets_at", sa.DateTime(timezone=True), nullable=True),
)

# What was mailed or posted to a chat once and must not go out again: a digest per connection and day, an alert per
# dedupe key. A row is claimed before sending and marked sent after; a claim left by a crash expires.
notifications = sa.Table(
    "ee_notifications", metadata,
    sa.Column("key", sa.String(300), primary_key=True),  # e.g. digest:<connection>:<day>, alert:<kind>:...
    sa.Column("connection", sa.String(100), nullable=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # sending | sent
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),  # JSON: where it went (channel names), never a URL or address list
)

# Versioned migrations: each entry creates or alters what its version introduced. Never edit a shipped one.
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
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class Deferral(NamedTuple):
    """A deferred report: its approval day, when it may be tried again (None: unknown), when it was deferred."""

    partition_date: str
    resets_at: datetime | None
    deferred_at: datetime


@dataclass(frozen=True)
class LedgerRow:
    connection: str
    report_id: str
    status: str
    content_hash: str
    entry_id: str
    entry_number: int | None
    partition_date: str | None
    transaction_ids: list[str]
    total_cents: int
    posted_at: datetime | None
    client_entry_id: str | None = None  # the EntryID we sent; `entry_id` is Exact's once posted
    body: dict | None = None  # the intent's POST body (without EntryID), when recorded


@dataclass(frozen=True)
class QuarantineItem:
    connection: str
    report_id: str
    status: str
    partition_date: str | None
    reasons: list[dict]
    transaction_ids: list[str]
    content_hash: str | None
    first_seen_at: datetime
    updated_at: datetime
    resolution_note: str | None


@dataclass(frozen=True)
class CorrectionRow:
    connection: str
    report_id: str
    entry_id: str
    kind: str
    replaces_entry_id: str
    status: str
    content_hash: str
    body: dict
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


def default_state_url() -> str:
    """`EXPENSIFY_EXACT_STATE_URL`, else a SQLite file under `$DAGSTER_HOME` (or the working directory)."""
    if url := os.environ.get("EXPENSIFY_EXACT_STATE_URL"):
        return url
    home = os.environ.get("DAGSTER_HOME") or os.path.join(os.getcwd(), ".dagster_home")
    os.makedirs(home, exist_ok=True)
    return f"sqlite:///{os.path.join(home, 'expensify_exact_state.db')}"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class StateStore:
    """All reads and writes of the connector's state. Safe to share across threads and processes."""

    def __init__(self, url: str | None = None):
        self.url = url or default_state_url()
        kwargs: dict[str, Any] = {"future": True}
        if self.url.startswith("sqlite"):
            # Several processes write the same file: wait for a writer instead of failing with "database is locked".
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if self.url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    # --- schema -------------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version now in force."""
        with self.engine.begin() as conn:
            schema_migrations.create(conn, checkfirst=True)
            applied = {row.version for row in conn.execute(sa.select(schema_migrations.c.version))}
            for version, description, tables in MIGRATIONS:
                if version in applied:
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
                conn.execute(schema_migrations.insert().values(version=version, description=description,
                                                               applied_at=_utcnow()))
            newest = max(applied | {v for v, _, _ in MIGRATIONS})
        if newest > SCHEMA_VERSION:
            raise StateStoreError(f"the state database has schema version {newest}, newer than this connector "
                                  f"({SCHEMA_VERSION}); upgrade expensify-exact")
        return newest

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar_one()

    # --- lease locks (work the same on SQLite and PostgreSQL, and expire if their holder dies) -------
    @contextmanager
    def lock(self, name: str, ttl_seconds: float = 120.0, wait_seconds: float = 300.0) -> Iterator[None]:
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait_seconds
        delay = 0.02
        while not self._try_lock(name, owner, ttl_seconds):
            if time.monotonic() > deadline:
                raise StateStoreError(f"could not take the lock {name!r} within {wait_seconds:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            with self.engine.begin() as conn:
                conn.execute(locks.update().where(locks.c.name == name, locks.c.owner == owner)
                             .values(owner=None, expires_at=None))

    def _try_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        now = _utcnow()
        with self.engine.begin() as conn:
            taken = conn.execute(
                locks.update()
                .where(locks.c.name == name, sa.or_(locks.c.owner.is_(None), locks.c.expires_at < now))
                .values(owner=owner, expires_at=now + timedelta(seconds=ttl_seconds))
            ).rowcount
            if taken:
                return True
            try:
                with conn.begin_nested():
                    conn.execute(locks.insert().values(name=name, owner=owner,
                                                       expires_at=now + timedelta(seconds=ttl_seconds)))
                return True
            except sa.exc.IntegrityError:
                pass
            # A holder killed on this host (SIGKILL, OOM) never releases: take over at once instead of waiting
            # out its lease. Holders on other hosts can only be outlived by the lease.
            holder = conn.execute(sa.select(locks.c.owner).where(locks.c.name == name)).scalar_one_or_none()
            if holder and _holder_is_dead_here(holder):
                return bool(conn.execute(
                    locks.update().where(locks.c.name == name, locks.c.owner == holder)
                    .values(owner=owner, expires_at=now + timedelta(seconds=ttl_seconds))).rowcount)
            return False

    # --- secrets and tokens (ciphertext only; vault.py encrypts) -------------------------------------
    def put_secret(self, scope: str, name: str, ciphertext: str) -> None:
        self._upsert(secrets, {"scope": scope, "name": name},
                     {"ciphertext": ciphertext, "updated_at": _utcnow()})

    def get_secret(self, scope: str, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(secrets.c.ciphertext)
                                .where(secrets.c.scope == scope, secrets.c.name == name)).scalar_one_or_none()

    def list_secrets(self) -> list[tuple[str, str, datetime]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(secrets.c.scope, secrets.c.name, secrets.c.updated_at)
                                .order_by(secrets.c.scope, secrets.c.name))
            return [(r.scope, r.name, _aware(r.updated_at)) for r in rows]

    def put_token_blob(self, connection: str, ciphertext: str, issued_at: datetime, refresh_issued_at: datetime) -> None:
        self._upsert(exact_tokens, {"connection": connection},
                     {"ciphertext": ciphertext, "issued_at": issued_at, "refresh_issued_at": refresh_issued_at,
                      "updated_at": _utcnow()})

    def get_token_blob(self, connection: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(exact_tokens.c.ciphertext)
                                .where(exact_tokens.c.connection == connection)).scalar_one_or_none()

    def token_ages(self) -> dict[str, tuple[datetime, datetime]]:
        """connection -> (access token issued at, refresh token issued at); no secrets."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(exact_tokens.c.connection, exact_tokens.c.issued_at,
                                          exact_tokens.c.refresh_issued_at))
            return {r.connection: (_aware(r.issued_at), _aware(r.refresh_issued_at)) for r in rows}

    def reencrypt_all(self, transform) -> int:
        """Rewrite every ciphertext through `transform` in one transaction (key rotation)."""
        count = 0
        with self.engine.begin() as conn:
            for row in conn.execute(sa.select(secrets)).all():
                conn.execute(secrets.update().where(secrets.c.scope == row.scope, secrets.c.name == row.name)
                             .values(ciphertext=transform(row.ciphertext)))
                count += 1
            for row in conn.execute(sa.select(exact_tokens)).all():
                conn.execute(exact_tokens.update().where(exact_tokens.c.connection == row.connection)
                             .values(ciphertext=transform(row.ciphertext)))
                count += 1
        return count

    # --- posted ledger -------------------------------------------------------------------------------
    def ledger_get(self, connection: str, report_id: str) -> LedgerRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(posted_ledger).where(posted_ledger.c.connection == connection,
                                                              posted_ledger.c.report_id == report_id)).first()
        return _ledger_row(row) if row else None

    def ledger_rows(self, connection: str | None = None, status: str | None = None) -> list[LedgerRow]:
        query = sa.select(posted_ledger).order_by(posted_ledger.c.connection, posted_ledger.c.report_id)
        if connection:
            query = query.where(posted_ledger.c.connection == connection)
        if status:
            query = query.where(posted_ledger.c.status == status)
        with self.engine.connect() as conn:
            return [_ledger_row(r) for r in conn.execute(query)]

    def ledger_write_intent(self, connection: str, report_id: str, *, content_hash: str, entry_id: str,
                            partition_date: str | None, transaction_ids: list[str], total_cents: int,
                            run_id: str | None, body: dict | None = None) -> None:
        """Record that `entry_id` (with `body`) is about to be posted. Refuses to overwrite a posted row."""
        values = {"status": "pending", "content_hash": content_hash, "entry_id": entry_id,
                  "partition_date": partition_date, "transaction_ids": json.dumps(transaction_ids),
                  "total_cents": total_cents, "intent_at": _utcnow(), "run_id": run_id, "entry_number": None,
                  "posted_at": None, "client_entry_id": entry_id,
                  "body": json.dumps(body, sort_keys=True) if body is not None else None}
        with self.engine.begin() as conn:
            # Write first, read after: two runs racing for one report then queue on the write lock instead of both
            # reading "no row" and one failing on the primary key (overlapping backfills running at once).
            try:
                with conn.begin_nested():
                    conn.execute(posted_ledger.insert().values(connection=connection, report_id=report_id, **values))
                return
            except sa.exc.IntegrityError:
                pass
            replaced = conn.execute(posted_ledger.update().where(
                posted_ledger.c.connection == connection, posted_ledger.c.report_id == report_id,
                posted_ledger.c.status != "posted").values(**values)).rowcount
            if not replaced:
                raise StateStoreError(f"report {report_id} is already posted for {connection}; refusing a new intent")

    def ledger_mark_posted(self, connection: str, report_id: str, entry_id: str, entry_number: int | None,
                           exact_entry_id: str | None = None) -> None:
        """Record the intent `entry_id` (ours) as posted; Exact's own EntryID, if it assigned one, replaces it in
        `entry_id` while `client_entry_id` keeps ours."""
        with self.engine.begin() as conn:
            conn.execute(posted_ledger.update().where(
                posted_ledger.c.connection == connection, posted_ledger.c.report_id == report_id,
                posted_ledger.c.entry_id == entry_id,
            ).values(status="posted", entry_number=entry_number, posted_at=_utcnow(),
                     entry_id=exact_entry_id.lower() if exact_entry_id else entry_id))

    def ledger_drop_intent(self, connection: str, report_id: str, entry_id: str) -> None:
        """Forget a pending intent that Exact is known not to hold (it refused the entry)."""
        with self.engine.begin() as conn:
            conn.execute(posted_ledger.delete().where(
                posted_ledger.c.connection == connection, posted_ledger.c.report_id == report_id,
                posted_ledger.c.entry_id == entry_id, posted_ledger.c.status == "pending"))

    # --- quarantine ----------------------------------------------------------------------------------
    def quarantine_put(self, connection: str, report_id: str, *, partition_date: str | None, reasons: list[dict],
                       transaction_ids: list[str], content_hash: str | None) -> None:
        """Open (or refresh) the quarantine item of a report. One row per report, never duplicated.

        An item an operator ignored keeps that status (and note) while its reasons are refreshed: ignoring means
        "do not ask again about this report", so a rerun of its day must not reopen it.
        """
        now = _utcnow()
        values = {"status": "open", "partition_date": partition_date, "reasons": json.dumps(reasons),
                  "transaction_ids": json.dumps(transaction_ids), "content_hash": content_hash, "updated_at": now,
                  "resolution_note": None}
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    exists = conn.execute(sa.select(quarantine.c.report_id, quarantine.c.status).where(
                        quarantine.c.connection == connection, quarantine.c.report_id == report_id)).first()
                    row = values
                    if exists and exists.status == "ignored":
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

    def quarantine_set_status(self, connection: str, report_id: str, status: str, note: str | None = None) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
            ).values(status=status, resolution_note=note, updated_at=_utcnow())).rowcount)

    def quarantine_items(self, connection: str | None = None, status: str | None = "open",
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

    def quarantine_close(self, connection: str, report_id: str, status: str, note: str,
                         expected_status: str = "open") -> bool:
        """Move an item out of `expected_status` (an operator's resolve or ignore); False if it was not in it."""
        with self.engine.begin() as conn:
            return bool(conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
                quarantine.c.status == expected_status,
            ).values(status=status, resolution_note=note, updated_at=_utcnow())).rowcount)

    # --- correction intents (reversal + corrected entry of an approved CHANGED_AFTER_POSTING report) ---
    def corrections_write_intents(self, connection: str, report_id: str, intents: list[dict],
                                  run_id: str | None = None) -> list[CorrectionRow]:
        """Record every entry an approval is about to post, in one transaction, before the first POST.

        Each intent has entry_id, kind, replaces_entry_id, content_hash, body, partition_date, transaction_ids and
        total_cents. An intent already recorded (same entry ID) is kept as it is, posted or not.
        """
        now = _utcnow()
        with self.engine.begin() as conn:
            for intent in intents:
                exists = conn.execute(sa.select(corrections.c.entry_id).where(
                    corrections.c.connection == connection, corrections.c.report_id == report_id,
                    corrections.c.entry_id == intent["entry_id"])).first()
                if exists:
                    continue
                conn.execute(corrections.insert().values(
                    connection=connection, report_id=report_id, entry_id=intent["entry_id"], kind=intent["kind"],
                    replaces_entry_id=intent["replaces_entry_id"], status="pending",
                    content_hash=intent["content_hash"], body=json.dumps(intent["body"], sort_keys=True),
                    entry_number=None, partition_date=intent.get("partition_date"),
                    transaction_ids=json.dumps(intent.get("transaction_ids") or []),
                    total_cents=int(intent.get("total_cents") or 0), intent_at=now, posted_at=None, run_id=run_id))
        return self.corrections_for(connection, report_id)

    def corrections_for(self, connection: str, report_id: str,
                        replaces_entry_id: str | None = None) -> list[CorrectionRow]:
        query = (sa.select(corrections).where(corrections.c.connection == connection,
                                              corrections.c.report_id == report_id)
                 .order_by(corrections.c.intent_at, corrections.c.kind.desc(), corrections.c.entry_id))
        if replaces_entry_id:
            query = query.where(corrections.c.replaces_entry_id == replaces_entry_id)
        with self.engine.connect() as conn:
            return [_correction_row(r) for r in conn.execute(query)]

    def correction_mark_posted(self, connection: str, report_id: str, entry_id: str, entry_number: int | None,
                               exact_entry_id: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(corrections.update().where(
                corrections.c.connection == connection, corrections.c.report_id == report_id,
                corrections.c.entry_id == entry_id,
            ).values(status="posted", entry_number=entry_number, posted_at=_utcnow(),
                     exact_entry_id=exact_entry_id.lower() if exact_entry_id and exact_entry_id.lower() != entry_id
                     else None))

    def correction_drop_intent(self, connection: str, report_id: str, entry_id: str) -> None:
        """Forget a pending correction intent that Exact is known not to hold."""
        with self.engine.begin() as conn:
            conn.execute(corrections.delete().where(
                corrections.c.connection == connection, corrections.c.report_id == report_id,
                corrections.c.entry_id == entry_id, corrections.c.status == "pending"))

    def correction_complete(self, connection: str, report_id: str, *, replaces_entry_id: str, content_hash: str,
                            entry_id: str, entry_number: int | None, partition_date: str | None,
                            transaction_ids: list[str], total_cents: int, run_id: str | None, note: str,
                            client_entry_id: str | None = None) -> None:
        """Point the ledger at the posted corrected entry (`entry_id` as Exact holds it, `client_entry_id` the one
        sent) and close the quarantine item, in one transaction.

        Compare-and-set on the ledger's entry: refuses if the ledger no longer holds `replaces_entry_id` as posted.
        """
        now = _utcnow()
        with self.engine.begin() as conn:
            updated = conn.execute(posted_ledger.update().where(
                posted_ledger.c.connection == connection, posted_ledger.c.report_id == report_id,
                posted_ledger.c.entry_id == replaces_entry_id, posted_ledger.c.status == "posted",
            ).values(content_hash=content_hash, entry_id=entry_id, entry_number=entry_number,
                     partition_date=partition_date, transaction_ids=json.dumps(transaction_ids),
                     total_cents=total_cents, posted_at=now, run_id=run_id,
                     client_entry_id=client_entry_id or entry_id, body=None)).rowcount
            if not updated:
                raise StateStoreError(f"report {report_id} of {connection} no longer has entry {replaces_entry_id} "
                                      f"posted in the ledger; refusing to record its correction")
            conn.execute(quarantine.update().where(
                quarantine.c.connection == connection, quarantine.c.report_id == report_id,
            ).values(status="resolved", resolution_note=note, updated_at=now))

    # --- audit log (append-only: there is no update or delete here) ----------------------------------
    def audit(self, event: str, *, connection: str | None = None, report_id: str | None = None,
              transaction_ids: list[str] | None = None, entry_id: str | None = None, entry_number: int | None = None,
              run_id: str | None = None, partition_date: str | None = None, detail: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(audit_log.insert().values(
                at=_utcnow(), connection=connection, event=event, report_id=report_id,
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
            return [dict(r._mapping) | {"at": _aware(r.at)} for r in conn.execute(query)]

    # --- shared rate-limit records -------------------------------------------------------------------
    def rate_limits_get(self, scope: str) -> dict[str, Any] | None:
        """The budgets last published for `scope` (column name -> value, datetimes in UTC), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rate_limits).where(rate_limits.c.scope == scope)).one_or_none()
        if row is None:
            return None
        return {k: _aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items() if k != "scope"}

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
            return [_aware(r.at) for r in rows]

    # --- connection facts ----------------------------------------------------------------------------
    def connection_fact_get(self, connection: str, name: str) -> Any | None:
        """A fact recorded for `connection` (JSON value), or None when unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(connection_facts.c.value).where(
                connection_facts.c.connection == connection, connection_facts.c.name == name)).first()
        return json.loads(row.value) if row else None

    def connection_fact_put(self, connection: str, name: str, value: Any, detail: dict | None = None) -> None:
        """Record (or replace) a fact; `detail` says how it was learned (e.g. the test entry's IDs)."""
        self._upsert(connection_facts, {"connection": connection, "name": name},
                     {"value": json.dumps(value), "detail": json.dumps(detail, default=str) if detail else None,
                      "recorded_at": _utcnow()})

    def connection_facts(self, connection: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(connection_facts).order_by(connection_facts.c.connection, connection_facts.c.name)
        if connection:
            query = query.where(connection_facts.c.connection == connection)
        with self.engine.connect() as conn:
            return [{"connection": r.connection, "name": r.name, "value": json.loads(r.value),
                     "detail": json.loads(r.detail) if r.detail else None, "recorded_at": _aware(r.recorded_at)}
                    for r in conn.execute(query)]

    # --- per-endpoint error budget -------------------------------------------------------------------
    def error_budget_add(self, scope: str, hour: datetime, status: int | None, message: str | None) -> int:
        """Count one error Exact answered for `scope` in the clock hour starting at `hour`; returns the new count."""
        with self.engine.begin() as conn:
            where = [error_budget.c.scope == scope, error_budget.c.hour == hour]
            values = {"last_status": status, "last_message": (message or "")[:500], "updated_at": _utcnow()}
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
            return [dict(r._mapping) | {"hour": _aware(r.hour), "updated_at": _aware(r.updated_at)} for r in rows]

    # --- dimension snapshots ------------------------------------------------------------------------
    def snapshot_get(self, scope: str, dimension: str) -> dict[str, Any] | None:
        """The stored snapshot of one dimension table (rows and meta parsed from JSON), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(dimension_snapshots).where(
                dimension_snapshots.c.scope == scope, dimension_snapshots.c.dimension == dimension)).one_or_none()
        if row is None:
            return None
        return {"rows": json.loads(row.rows), "cursor": row.cursor, "meta": json.loads(row.meta),
                "refreshed_at": _aware(row.refreshed_at), "checked_at": _aware(row.checked_at)}

    def snapshot_put(self, scope: str, dimension: str, *, rows: list[dict], cursor: str | None, meta: dict,
                     refreshed_at: datetime, checked_at: datetime) -> None:
        """Store one dimension table's snapshot; `rows` and `meta` must be JSON-serializable."""
        self._upsert(dimension_snapshots, {"scope": scope, "dimension": dimension},
                     {"rows": json.dumps(rows), "cursor": cursor, "meta": json.dumps(meta),
                      "refreshed_at": refreshed_at, "checked_at": checked_at})

    def snapshot_drop(self, scope: str, dimension: str | None = None) -> int:
        """Forget a division's stored snapshot (one table, or all): the next run reads it in full."""
        where = [dimension_snapshots.c.scope == scope]
        if dimension is not None:
            where.append(dimension_snapshots.c.dimension == dimension)
        with self.engine.begin() as conn:
            return conn.execute(dimension_snapshots.delete().where(*where)).rowcount

    # --- closed approval days and deferred reports ------------------------------------------------------
    def day_mark_posted(self, connection: str, day: str, run_id: str | None) -> None:
        """Record that `day` was run after it closed; the first such run's time is kept."""
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(days_posted.insert().values(connection=connection, day=day, posted_at=_utcnow(),
                                                             run_id=run_id))
            except sa.exc.IntegrityError:
                pass

    def days_posted(self, connection: str, days: list[str] | None = None) -> dict[str, datetime]:
        """day -> when it was first run after it closed, for `days` (default: all of the connection's)."""
        query = sa.select(days_posted.c.day, days_posted.c.posted_at).where(days_posted.c.connection == connection)
        if days is not None:
            query = query.where(days_posted.c.day.in_(list(days)))
        with self.engine.connect() as conn:
            return {r.day: _aware(r.posted_at) for r in conn.execute(query)}

    def last_day_posted(self, connection: str) -> tuple[str, datetime] | None:
        """The connection's newest closed day that was run, and when."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(days_posted.c.day, days_posted.c.posted_at)
                               .where(days_posted.c.connection == connection)
                               .order_by(days_posted.c.day.desc()).limit(1)).first()
        return (row.day, _aware(row.posted_at)) if row else None

    def deferred_put(self, connection: str, reports: dict[str, str], resets_at: datetime | None) -> None:
        """Record reports (report ID -> approval day) left for a later run, not to be tried before `resets_at`."""
        now = _utcnow()
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
            return {r.report_id: Deferral(r.partition_date, _aware(r.resets_at), _aware(r.deferred_at)) for r in rows}
    # --- notifications sent once (digest mails, alerts) -----------------------------------------------
    def notification_claim(self, key: str, *, kind: str, connection: str | None, force: bool = False,
                           stale_after: timedelta = timedelta(minutes=15)) -> bool:
        """Take the right to send `key`: False if it was sent already or another process is sending it now.

        `force` takes it even if it was sent (an explicit resend). A claim older than `stale_after` that was never
        marked sent belongs to a process that died mid-send, and is taken over.
        """
        now = _utcnow()
        values = {"connection": connection, "kind": kind, "status": "sending", "claimed_at": now, "sent_at": None,
                  "detail": None}
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(notifications.insert().values(key=key, **values))
                return True
            except sa.exc.IntegrityError:
                pass
            takeable = (sa.true() if force else
                        sa.and_(notifications.c.status == "sending", notifications.c.claimed_at < now - stale_after))
            return bool(conn.execute(notifications.update().where(notifications.c.key == key, takeable)
                                     .values(**values)).rowcount)

    def notification_sent(self, key: str, detail: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(notifications.update().where(notifications.c.key == key).values(
                status="sent", sent_at=_utcnow(), detail=json.dumps(detail, sort_keys=True) if detail else None))

    def notification_release(self, key: str) -> None:
        """Give a claim back after a failed send, so the next attempt sends it."""
        with self.engine.begin() as conn:
            conn.execute(notifications.delete().where(notifications.c.key == key,
                                                      notifications.c.status == "sending"))

    def notifications_sent(self, kind: str | None = None, connection: str | None = None) -> list[dict]:
        query = sa.select(notifications).where(notifications.c.status == "sent").order_by(notifications.c.sent_at)
        if kind:
            query = query.where(notifications.c.kind == kind)
        if connection:
            query = query.where(notifications.c.connection == connection)
        with self.engine.connect() as conn:
            return [dict(r._mapping) | {"sent_at": _aware(r.sent_at), "claimed_at": _aware(r.claimed_at)}
                    for r in conn.execute(query)]

    # --- helpers -------------------------------------------------------------------------------------
    def _upsert(self, table: sa.Table, keys: dict, values: dict) -> None:
        where = [table.c[k] == v for k, v in keys.items()]
        with self.engine.begin() as conn:
            if not conn.execute(table.update().where(*where).values(**values)).rowcount:
                conn.execute(table.insert().values(**keys, **values))

    def dispose(self) -> None:
        self.engine.dispose()


def _holder_is_dead_here(owner: str) -> bool:
    """Whether a lock owner ("host:pid:nonce") is a process of this host that no longer runs (or is a zombie)."""
    host, _, rest = owner.partition(":")
    return process_gone_here(host, rest.partition(":")[0])


def process_gone_here(host: str, pid_text: str, started: str | None = None) -> bool:
    """Whether process `pid_text` of `host` no longer runs: same host, and no such pid, a zombie, or (with `started`,
    its start time in clock ticks after boot from /proc/<pid>/stat) another process that reuses the pid now."""
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = process_stat(pid)
    if fields is None:
        return False
    return fields[0] == "Z" or (started is not None and fields[19] != started)  # killed, not yet reaped / reused


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, start time at [19]); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an intent must survive a crash the moment it is written
    cursor.close()


def _quarantine_item(r) -> QuarantineItem:
    return QuarantineItem(r.connection, r.report_id, r.status, r.partition_date, json.loads(r.reasons),
                          json.loads(r.transaction_ids), r.content_hash, _aware(r.first_seen_at), _aware(r.updated_at),
                          r.resolution_note)


def _correction_row(r) -> CorrectionRow:
    return CorrectionRow(r.connection, r.report_id, r.entry_id, r.kind, r.replaces_entry_id, r.status,
                         r.content_hash, json.loads(r.body), r.entry_number, r.partition_date,
                         json.loads(r.transaction_ids), r.total_cents, _aware(r.posted_at), r.exact_entry_id)


def _ledger_row(row) -> LedgerRow:
    return LedgerRow(row.connection, row.report_id, row.status, row.content_hash, row.entry_id, row.entry_number,
                     row.partition_date, json.loads(row.transaction_ids), row.total_cents, _aware(row.posted_at),
                     row.client_entry_id, json.loads(row.body) if row.body else None)
