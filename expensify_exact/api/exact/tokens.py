"""Exact Online OAuth tokens and where they live between runs (a store shared by every process of a connection)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterator, Protocol

from expensify_exact.errors import AuthenticationError


@dataclass(frozen=True)
class ExactTokens:
    """One access/refresh token pair. `issued_at` is when the pair arrived: the 570 s refresh floor counts from it."""

    access_token: str
    refresh_token: str
    access_expires_at: datetime
    issued_at: datetime

    def __repr__(self) -> str:
        return (f"ExactTokens(access_token=***, refresh_token=***, "
                f"access_expires_at={self.access_expires_at.isoformat()}, issued_at={self.issued_at.isoformat()})")

    __str__ = __repr__

    def is_valid_at(self, now: datetime, skew_seconds: float = 10.0) -> bool:
        """Whether the access token can still be sent at `now` (with a little skew, as picqer allows)."""
        return now < self.access_expires_at - timedelta(seconds=skew_seconds)


def parse_token_response(body: Mapping[str, Any], requested_at: datetime, received_at: datetime,
                         previous_refresh_token: str | None = None) -> ExactTokens:
    """Build ExactTokens from a 200 token-endpoint body (exact-online.md §2.2).

    Expiry counts from `requested_at` (the token may have been minted any time after it), the
    refresh floor from `received_at` (Exact counts 570 s from receipt, §2.4); both err on the safe side.

    Raises:
        AuthenticationError: the body lacks an access token or names another token type.
    """
    token_type = str(body.get("token_type") or "bearer")
    access = body.get("access_token")
    if not access or token_type.lower() != "bearer":  # "Bearer" and "bearer" both occur (§2.2)
        raise AuthenticationError("exact", "token endpoint answered 200 without a bearer access token")
    try:
        # Exact sends expires_in as a string, e.g. "600" (exact-online.md §2.2)
        expires_in = int(str(body.get("expires_in", "600")).strip())
    except ValueError:
        expires_in = 600
    refresh = body.get("refresh_token") or previous_refresh_token
    if not refresh:
        raise AuthenticationError("exact", "token endpoint answered 200 without a refresh token")
    return ExactTokens(
        access_token=str(access),
        refresh_token=str(refresh),
        access_expires_at=requested_at + timedelta(seconds=expires_in),
        issued_at=received_at,
    )


class TokenStore(Protocol):
    """Durable, shared token storage for named connections (the state DB in production)."""

    def lock(self, connection: str) -> AbstractContextManager[None]:
        """Exclusive across processes for as long as the context is held."""

    def load(self, connection: str) -> ExactTokens | None:
        """The stored tokens, or None if the connection was never authorized."""

    def save(self, connection: str, tokens: ExactTokens) -> None:
        """Persist the tokens; durable when it returns."""


class InMemoryTokenStore:
    """A TokenStore for tests and single-process use; the lock is per connection and per process."""

    def __init__(self, initial: Mapping[str, ExactTokens] | None = None):
        self._tokens: dict[str, ExactTokens] = dict(initial or {})
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.saves = 0

    @contextmanager
    def lock(self, connection: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(connection, threading.Lock())
        with lock:
            yield

    def load(self, connection: str) -> ExactTokens | None:
        with self._guard:
            return self._tokens.get(connection)

    def save(self, connection: str, tokens: ExactTokens) -> None:
        with self._guard:
            self._tokens[connection] = tokens
            self.saves += 1

    def __repr__(self) -> str:
        return f"InMemoryTokenStore(connections={sorted(self._tokens)})"
