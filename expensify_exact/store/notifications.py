"""Digests and alerts sent once: a claim before sending, marked sent after; a claim left by a crash expires."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import notifications


class NotificationStore(StoreBase):
    def notification_claim(self, key: str, *, kind: str, connection: str | None, force: bool = False,
                           stale_after: timedelta = timedelta(minutes=15)) -> bool:
        """Take the right to send `key`: False if it was sent already or another process is sending it now.

        `force` takes it even if it was sent (an explicit resend). A claim older than `stale_after` that was never
        marked sent belongs to a process that died mid-send, and is taken over.
        """
        now = utcnow()
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
                status="sent", sent_at=utcnow(), detail=json.dumps(detail, sort_keys=True) if detail else None))

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
            return [dict(r._mapping) | {"sent_at": aware(r.sent_at), "claimed_at": aware(r.claimed_at)}
                    for r in conn.execute(query)]
