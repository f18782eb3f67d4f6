"""What the connector has learned about how a connection's services behave (e.g. whether Exact keeps the EntryID
sent), as JSON values."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import connection_facts


class FactStore(StoreBase):
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
                      "recorded_at": utcnow()})

    def connection_facts(self, connection: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(connection_facts).order_by(connection_facts.c.connection, connection_facts.c.name)
        if connection:
            query = query.where(connection_facts.c.connection == connection)
        with self.engine.connect() as conn:
            return [{"connection": r.connection, "name": r.name, "value": json.loads(r.value),
                     "detail": json.loads(r.detail) if r.detail else None, "recorded_at": aware(r.recorded_at)}
                    for r in conn.execute(query)]
