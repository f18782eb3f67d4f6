"""Each Exact division's last dimension snapshot, a cache read incrementally: losing it costs one full read."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware
from expensify_exact.store.schema import dimension_snapshots


class SnapshotStore(StoreBase):
    def snapshot_get(self, scope: str, dimension: str) -> dict[str, Any] | None:
        """The stored snapshot of one dimension table (rows and meta parsed from JSON), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(dimension_snapshots).where(
                dimension_snapshots.c.scope == scope, dimension_snapshots.c.dimension == dimension)).one_or_none()
        if row is None:
            return None
        return {"rows": json.loads(row.rows), "cursor": row.cursor, "meta": json.loads(row.meta),
                "refreshed_at": aware(row.refreshed_at), "checked_at": aware(row.checked_at)}

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
