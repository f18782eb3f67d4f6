"""The state store's engine (SQLite by default, PostgreSQL in production), migrated on open, and the small helpers
every concern's methods share."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from expensify_exact.store.migrations import migrate
from expensify_exact.store.schema import schema_migrations


def default_state_url() -> str:
    """`EXPENSIFY_EXACT_STATE_URL`, else a SQLite file under `$DAGSTER_HOME` (or the working directory)."""
    if url := os.environ.get("EXPENSIFY_EXACT_STATE_URL"):
        return url
    home = os.environ.get("DAGSTER_HOME") or os.path.join(os.getcwd(), ".dagster_home")
    os.makedirs(home, exist_ok=True)
    return f"sqlite:///{os.path.join(home, 'expensify_exact_state.db')}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    """A datetime read back as UTC: SQLite hands back naive datetimes, and everything stored is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class StoreBase:
    """The engine, opened and migrated; safe to share across threads and processes."""

    def __init__(self, url: str | None = None):
        self.url = url or default_state_url()
        kwargs: dict[str, Any] = {"future": True}
        if self.url.startswith("sqlite"):
            # Several processes write the same file: wait for a writer instead of failing with "database is locked".
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A step works on many connections side by side (defs.partitions.parallel_connections), each thread
            # holding a database connection for a moment at a time: at most 20 per process, so four runs at once
            # stay well inside PostgreSQL's default 100; a thread that finds none free waits for one.
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=15, pool_timeout=300)
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if self.url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version now in force."""
        return migrate(self.engine)

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar_one()

    def _upsert(self, table: sa.Table, keys: dict, values: dict) -> None:
        where = [table.c[k] == v for k, v in keys.items()]
        with self.engine.begin() as conn:
            if not conn.execute(table.update().where(*where).values(**values)).rowcount:
                conn.execute(table.insert().values(**keys, **values))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an intent must survive a crash the moment it is written
    cursor.close()
