"""Builds the API clients of one configured connection from its settings and the encrypted credentials."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from expensify_exact.api.exact.auth import ExactAuth, TokenRefresher
from expensify_exact.api.exact.client import ExactClient
from expensify_exact.api.exact.regions import resolve_base_url, token_url
from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.api.expensify.client import ExpensifyClient
from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.clock import Clock, SystemClock
from expensify_exact.config import Connection
from expensify_exact.core.exports import by_credential, credential_of
from expensify_exact.core.snapshots import DivisionChecks
from expensify_exact.errors import VaultError
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault

logger = logging.getLogger(__name__)

# Names of the secrets in the vault: the Expensify partner login's under its credential (`secret_scope`), the rest
# under the connection.
EXPENSIFY_USER_ID = "expensify_partner_user_id"
EXPENSIFY_USER_SECRET = "expensify_partner_user_secret"
EXPENSIFY_SECRET_NAMES = (EXPENSIFY_USER_ID, EXPENSIFY_USER_SECRET)
EXACT_CLIENT_ID = "exact_client_id"
EXACT_CLIENT_SECRET = "exact_client_secret"
SECRET_NAMES = (EXPENSIFY_USER_ID, EXPENSIFY_USER_SECRET, EXACT_CLIENT_ID, EXACT_CLIENT_SECRET,
                "exact_webhook_secret")  # expensify_exact.core.webhooks.EXACT_WEBHOOK_SECRET


def secret_scope(conn: Connection, name: str) -> str:
    """Where the vault keeps the connection's secret `name`: the Expensify partner login under its credential
    (`exports.credential_of`: shared by every connection naming it, else the connection's own name), every other
    secret under the connection."""
    return credential_of(conn) if name in EXPENSIFY_SECRET_NAMES else conn.name


def store_expensify_login_command(group: list[Connection]) -> str:
    """The command that stores the Expensify partner login of these connections (one credential's): by its
    credential once any of them names it in `expensify.credential`, else by the one connection's name."""
    named = [c for c in group if c.expensify.credential]
    option = f"--credential {credential_of(named[0])}" if named else f"--connection {group[0].name}"
    return f"expensify-exact secrets set {option} --from-env"


def missing_expensify_credentials(vault: CredentialVault,
                                  connections: list[Connection]) -> dict[str, list[Connection]]:
    """The credentials whose partner login is not (fully) stored, each with the connections using it."""
    return {credential: group for credential, group in by_credential(connections).items()
            if not all(vault.has(credential, name) for name in EXPENSIFY_SECRET_NAMES)}


class ReadOnlyRecords:
    """The records the API clients share through the state DB, for a run that must write nothing there (a dry run):
    it reads what every other run and process recorded (rate budgets, Expensify's request log, Exact's errors this
    hour, the division check) and keeps what it adds itself in memory, so it paces and stops like any run."""

    def __init__(self, store: StateStore):
        self._store = store
        self._budgets: dict[str, dict[str, Any]] = {}
        self._requests: dict[str, list[datetime]] = {}
        self._errors: Counter[tuple[str, datetime]] = Counter()
        self._snapshots: dict[tuple[str, str], dict[str, Any]] = {}

    def rate_limits_get(self, scope: str) -> dict[str, Any] | None:
        return self._budgets.get(scope) or self._store.rate_limits_get(scope)

    def rate_limits_put(self, scope: str, values: dict[str, Any]) -> None:
        self._budgets[scope] = values

    def request_log_since(self, scope: str, since: datetime) -> list[datetime]:
        return sorted(self._store.request_log_since(scope, since) + [t for t in self._requests.get(scope, [])
                                                                       if t > since])

    def request_log_add(self, scope: str, at: datetime, keep: timedelta) -> None:
        self._requests.setdefault(scope, []).append(at)

    def error_budget_count(self, scope: str, hour: datetime) -> int:
        return self._store.error_budget_count(scope, hour) + self._errors[(scope, hour)]

    def error_budget_add(self, scope: str, hour: datetime, status: int | None, message: str | None) -> int:
        self._errors[(scope, hour)] += 1
        return self.error_budget_count(scope, hour)

    def snapshot_get(self, scope: str, dimension: str) -> dict[str, Any] | None:
        return self._snapshots.get((scope, dimension)) or self._store.snapshot_get(scope, dimension)

    def snapshot_put(self, scope: str, dimension: str, **snapshot: Any) -> None:
        self._snapshots[(scope, dimension)] = snapshot


class _Advisory:
    """What the shared rate-limit records have in common: the state DB is a help, not a dependency. If it
    cannot be read or written for a moment, pacing carries on with what this process saw itself (and a 429,
    should one come, is still waited out)."""

    def __init__(self, store: StateStore, scope: str):
        self._store = store
        self.scope = scope

    def _try(self, what: str, action, fallback=None):
        try:
            return action()
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("could not %s the shared rate-limit records of %s: %s", what, self.scope,
                           type(exc).__name__)
            return fallback


class StoredRateLimitBoard(_Advisory):
    """Shares one Exact division's reported budgets through the state DB between all runs and processes."""

    def __init__(self, store: StateStore, division: int):
        super().__init__(store, f"exact:division:{division}")

    def load(self) -> RateLimitSnapshot | None:
        values = self._try("read", lambda: self._store.rate_limits_get(self.scope))
        return RateLimitSnapshot(**values) if values else None

    def save(self, snapshot: RateLimitSnapshot) -> None:
        self._try("publish", lambda: self._store.rate_limits_put(self.scope, dataclasses.asdict(snapshot)))


class StoredRequestLog(_Advisory):
    """Records one Expensify credential's requests in the state DB, so every step, process and connection using
    the credential counts them in one window (Expensify's limits are per partner login)."""

    def __init__(self, store: StateStore, credential: str):
        super().__init__(store, f"expensify:{credential}")

    def since(self, moment: datetime) -> list[datetime]:
        return self._try("read", lambda: self._store.request_log_since(self.scope, moment), fallback=[])

    def add(self, at: datetime, keep: timedelta) -> None:
        self._try("record", lambda: self._store.request_log_add(self.scope, at, keep))


class StoredErrorBudget:
    """Counts the errors Exact answered per endpoint of one division and clock hour in the state DB, so every run
    and process using the division stays under the same budget (exact-online.md §6). Not advisory: if the count
    cannot be read, the call is not made (an error block would stop the whole division for an hour)."""

    def __init__(self, store: StateStore, division: int, clock: Clock):
        self._store = store
        self._division = division
        self._clock = clock

    def scope(self, endpoint: str) -> str:
        return f"exact:{self._division}:{endpoint}"

    def _hour(self) -> datetime:
        return self._clock.now().astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)

    def spent(self, endpoint: str) -> int:
        return self._store.error_budget_count(self.scope(endpoint), self._hour())

    def add(self, endpoint: str, status: int | None, message: str) -> int:
        return self._store.error_budget_add(self.scope(endpoint), self._hour(), status, message)


def exact_base_url(conn: Connection) -> str:
    return resolve_base_url(conn.exact.region.replace("_", " "), conn.exact.base_url)


def build_expensify_client(conn: Connection, vault: CredentialVault, clock: Clock | None = None,
                           transport=None, store: StateStore | ReadOnlyRecords | None = None) -> ExpensifyClient:
    """The client of the connection's Expensify credential (`credential_of`); it serves every connection sharing
    that credential, whose client settings config validation keeps equal. With `store`, it counts Expensify's
    windows over every request of the credential, from any connection or process."""
    credential = credential_of(conn)
    if missing_expensify_credentials(vault, [conn]):
        whose = f"credential {credential!r} of connection {conn.name}" if conn.expensify.credential else \
            f"connection {conn.name}"
        raise VaultError(f"the Expensify partner login of {whose} is not stored; run "
                         f"`{store_expensify_login_command([conn])}`")
    return ExpensifyClient(
        conn.expensify.endpoint_url,
        vault.get(credential, EXPENSIFY_USER_ID),
        vault.get(credential, EXPENSIFY_USER_SECRET),
        clock or SystemClock(),
        transport=transport,
        poll_interval_seconds=conn.expensify.poll_interval_seconds,
        poll_timeout_seconds=conn.expensify.poll_timeout_seconds,
        request_log=StoredRequestLog(store, credential) if store is not None else None,
    )


def build_token_refresher(conn: Connection, vault: CredentialVault, store: StateStore,
                          clock: Clock | None = None) -> TokenRefresher:
    return TokenRefresher(
        VaultTokenStore(store, vault), conn.name, token_url(exact_base_url(conn)),
        vault.get(conn.name, EXACT_CLIENT_ID), vault.get(conn.name, EXACT_CLIENT_SECRET), clock or SystemClock(),
    )


def build_exact_client(conn: Connection, vault: CredentialVault, store: StateStore, clock: Clock | None = None,
                       transport=None, records: StateStore | ReadOnlyRecords | None = None) -> ExactClient:
    """`records` keeps the budgets, error counts and division check the client shares (default: `store`). Tokens
    always go to `store`: Exact's refresh token is single-use, so a rotated one must be kept, even by a dry run."""
    clock = clock or SystemClock()
    records = records or store
    refresher = build_token_refresher(conn, vault, store, clock)
    return ExactClient(exact_base_url(conn), conn.exact.division, ExactAuth(refresher), clock, transport=transport,
                       rate_limit_board=StoredRateLimitBoard(records, conn.exact.division),
                       error_budget=StoredErrorBudget(records, conn.exact.division, clock),
                       division_checks=DivisionChecks(records, conn.exact.division, clock))


class VaultTokenStore:
    """Exact tokens encrypted in the state database; the lock is a lease lock, so it spans processes and hosts."""

    def __init__(self, store: StateStore, vault: CredentialVault):
        self._store = store
        self._vault = vault

    def __repr__(self) -> str:
        return f"VaultTokenStore(store={self._store.url!r})"

    def lock(self, connection: str):
        return self._store.lock(f"exact-token:{connection}", ttl_seconds=120, wait_seconds=300)

    def load(self, connection: str) -> ExactTokens | None:
        blob = self._store.get_token_blob(connection)
        if blob is None:
            return None
        data = json.loads(self._vault.decrypt(blob, f"Exact tokens of {connection}"))
        return ExactTokens(access_token=data["access_token"], refresh_token=data["refresh_token"],
                           access_expires_at=datetime.fromisoformat(data["access_expires_at"]),
                           issued_at=datetime.fromisoformat(data["issued_at"]))

    def save(self, connection: str, tokens: ExactTokens) -> None:
        blob = self._vault.encrypt(json.dumps({
            "access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
            "access_expires_at": tokens.access_expires_at.isoformat(), "issued_at": tokens.issued_at.isoformat()}))
        self._store.put_token_blob(connection, blob, issued_at=tokens.issued_at, refresh_issued_at=tokens.issued_at)
