"""Encrypted secrets and Exact token blobs: ciphertext only (`vault.py` encrypts), and key rotation in one
transaction."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from expensify_exact.store.base import StoreBase, aware, utcnow
from expensify_exact.store.schema import exact_tokens, secrets


class SecretStore(StoreBase):
    def put_secret(self, scope: str, name: str, ciphertext: str) -> None:
        self._upsert(secrets, {"scope": scope, "name": name},
                     {"ciphertext": ciphertext, "updated_at": utcnow()})

    def get_secret(self, scope: str, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(secrets.c.ciphertext)
                                .where(secrets.c.scope == scope, secrets.c.name == name)).scalar_one_or_none()

    def list_secrets(self) -> list[tuple[str, str, datetime]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(secrets.c.scope, secrets.c.name, secrets.c.updated_at)
                                .order_by(secrets.c.scope, secrets.c.name))
            return [(r.scope, r.name, aware(r.updated_at)) for r in rows]

    def put_token_blob(self, connection: str, ciphertext: str, issued_at: datetime,
                       refresh_issued_at: datetime) -> None:
        self._upsert(exact_tokens, {"connection": connection},
                     {"ciphertext": ciphertext, "issued_at": issued_at, "refresh_issued_at": refresh_issued_at,
                      "updated_at": utcnow()})

    def get_token_blob(self, connection: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(exact_tokens.c.ciphertext)
                                .where(exact_tokens.c.connection == connection)).scalar_one_or_none()

    def token_ages(self) -> dict[str, tuple[datetime, datetime]]:
        """connection -> (access token issued at, refresh token issued at); no secrets."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(exact_tokens.c.connection, exact_tokens.c.issued_at,
                                          exact_tokens.c.refresh_issued_at))
            return {r.connection: (aware(r.issued_at), aware(r.refresh_issued_at)) for r in rows}

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
