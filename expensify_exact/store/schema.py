"""The state store's tables, one SQLAlchemy Core schema for SQLite and PostgreSQL, prefixed `ee_` so they can share
a database with Dagster's own storage. `migrations.py` creates and alters them, version by version."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


def connection_key() -> sa.Column:
    """The connection a row belongs to, leading its primary key: one width for the name in every table."""
    return sa.Column("connection", sa.String(100), primary_key=True)


def report_key() -> list[sa.Column]:
    """A row per Expensify report of a connection: (connection, report_id) lead its primary key."""
    return [connection_key(), sa.Column("report_id", sa.String(64), primary_key=True)]


def moment(name: str, *, nullable: bool = False) -> sa.Column:
    """A point in time: every timestamp the store keeps is timezone-aware (UTC on the way in, aware on the way out)."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


schema_migrations = sa.Table(
    "ee_schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    moment("applied_at"),
)
locks = sa.Table(
    "ee_locks", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=True),
    moment("expires_at", nullable=True),
)
secrets = sa.Table(
    "ee_secrets", metadata,
    sa.Column("scope", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("ciphertext", sa.Text, nullable=False),
    moment("updated_at"),
)
exact_tokens = sa.Table(
    "ee_exact_tokens", metadata,
    connection_key(),
    sa.Column("ciphertext", sa.Text, nullable=False),
    moment("issued_at"),
    moment("refresh_issued_at"),
    moment("updated_at"),
)

# Every entry the connector is about to post or has posted (migration 8): a report's post, and the reversal and
# corrected entry of an approved CHANGED_AFTER_POSTING correction. An intent is written before its POST and marked
# posted after, so a crash in between is settled by asking Exact, never by posting again. The one row per report
# with `stands` set is the report's ledger entry: the post, until an approved correction takes its place.
intents = sa.Table(
    "ee_intents", metadata,
    *report_key(),
    sa.Column("kind", sa.String(16), primary_key=True),  # IntentKind: post | reversal | correction
    sa.Column("entry_id", sa.String(36), primary_key=True),  # the EntryID we send
    sa.Column("status", sa.String(16), nullable=False),  # IntentStatus: pending | posted
    sa.Column("stands", sa.Boolean, nullable=False),  # the entry that stands for the report now
    sa.Column("replaces_entry_id", sa.String(36), nullable=True),  # a correction's: the posted entry it corrects
    sa.Column("content_hash", sa.String(64), nullable=False),
    # The POST body without EntryID: a retry sends the same entry, and a later run looks for its lines in Exact
    # when the outcome was never heard. None only for post intents from before bodies were kept.
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("exact_entry_id", sa.String(36), nullable=True),  # Exact's EntryID, when it assigned its own
    sa.Column("entry_number", sa.Integer, nullable=True),
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("transaction_ids", sa.Text, nullable=False),
    sa.Column("total_cents", sa.BigInteger, nullable=False),
    moment("intent_at"),
    moment("posted_at", nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Index("ux_ee_intents_standing", "connection", "report_id", unique=True,
             sqlite_where=sa.text("stands"), postgresql_where=sa.text("stands")),
)
quarantine = sa.Table(
    "ee_quarantine", metadata,
    *report_key(),
    sa.Column("status", sa.String(16), nullable=False),  # QuarantineStatus: open | resolved | ignored | replayed
    sa.Column("partition_date", sa.String(10), nullable=True),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of {code, transaction_id, dimension, value, message}
    sa.Column("transaction_ids", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=True),
    moment("first_seen_at"),
    moment("updated_at"),
    sa.Column("resolution_note", sa.Text, nullable=True),
    # A CHANGED_AFTER_POSTING item's drafted correction, JSON {reverse_entry_id, corrected_entry} (migration 8).
    sa.Column("correction", sa.Text, nullable=True),
)
audit_log = sa.Table(
    "ee_audit_log", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    moment("at"),
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

# What an API last said about a credential's budgets (e.g. Exact's X-RateLimit-* headers for one division), so a
# run that starts in a minute another run used up waits instead of collecting a 429. Advisory, overwritten per call.
rate_limits = sa.Table(
    "ee_rate_limits", metadata,
    sa.Column("scope", sa.String(100), primary_key=True),  # e.g. exact:division:<n>
    moment("observed_at"),
    sa.Column("remaining_minutely", sa.Integer, nullable=True),
    sa.Column("minutely_limit", sa.Integer, nullable=True),
    moment("minutely_resets_at", nullable=True),
    sa.Column("remaining_daily", sa.Integer, nullable=True),
    sa.Column("daily_limit", sa.Integer, nullable=True),
    moment("daily_resets_at", nullable=True),
)

# When requests went out with one credential of an API that does not report budgets (Expensify: 5 per 10 s, 20 per
# 60 s), so the steps and processes using it count the same window. Rows older than a few minutes are pruned.
request_log = sa.Table(
    "ee_request_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(100), nullable=False),  # e.g. expensify:<connection>
    moment("at"),
    sa.Index("ix_ee_request_log_scope_at", "scope", "at"),
)

# What the connector has learned about how a connection's services behave where the reference leaves it open
# (e.g. `exact_keeps_client_entry_id`, written by `preflight --write-test`). JSON values; None = unknown.
connection_facts = sa.Table(
    "ee_connection_facts", metadata,
    connection_key(),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    moment("recorded_at"),
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
    moment("updated_at"),
)

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
    moment("refreshed_at"),
    moment("checked_at"),
)

# Approval days whose run came after the day had ended in the connection's zone (plus the grace): a report that
# first shows up in such a day later is a late approval, and `status` and the digest say when the newest was posted.
days_posted = sa.Table(
    "ee_days_posted", metadata,
    connection_key(),
    sa.Column("day", sa.String(10), primary_key=True),
    moment("posted_at"),  # the first run after the day closed
    sa.Column("run_id", sa.String(64), nullable=True),
)

# Reports a run left for later (Exact's daily budget or an endpoint's hourly error budget ran out, Exact refused the
# connection, or a POST got no certain answer), until a later run settles them; the sensor
# `post_deferred_after_reset` reruns their days once `resets_at` has passed.
deferred_reports = sa.Table(
    "ee_deferred_reports", metadata,
    *report_key(),
    sa.Column("partition_date", sa.String(10), nullable=False),
    moment("deferred_at"),
    # Not before: Exact's daily X-RateLimit-Reset for a spent daily budget, else the next clock hour; None = unknown.
    moment("resets_at", nullable=True),
)

# What was mailed or posted to a chat once and must not go out again: a digest per connection and day, an alert per
# dedupe key. A row is claimed before sending and marked sent after; a claim left by a crash expires.
notifications = sa.Table(
    "ee_notifications", metadata,
    sa.Column("key", sa.String(300), primary_key=True),  # e.g. digest:<connection>:<day>, alert:<kind>:...
    sa.Column("connection", sa.String(100), nullable=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # sending | sent
    moment("claimed_at"),
    moment("sent_at", nullable=True),
    sa.Column("detail", sa.Text, nullable=True),  # JSON: where it went (channel names), never a URL or address list
)
