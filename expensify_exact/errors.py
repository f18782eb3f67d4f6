"""The connector's exception tree. Every message is safe to log: no secret ever goes into one."""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


class ConfigError(ConnectorError):
    """A mappings/ file is invalid; names the file and line so the user can fix it."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


class VaultError(ConnectorError):
    """A secret is missing, or the store cannot be decrypted with the configured key."""


class StateStoreError(ConnectorError):
    """The connector's own state database is unusable (locked too long, wrong schema version)."""


class LockBusy(StateStoreError):
    """A lock stayed held by a live holder for longer than the caller would wait."""


class ApiError(ConnectorError):
    """An answer from Expensify or Exact Online that is not a success."""

    def __init__(self, service: str, message: str, *, status: int | None = None,
                 reason: str | None = None, body_excerpt: str | None = None):
        self.service = service
        self.status = status
        self.reason = reason
        self.body_excerpt = body_excerpt
        self.api_message = message
        parts = [f"{service}: {message}"]
        if status is not None:
            parts.append(f"(HTTP {status}" + (f", Reason: {reason})" if reason else ")"))
        super().__init__(" ".join(parts))


class TransientApiError(ApiError):
    """5xx, timeouts, dropped connections, 429s that outlasted the retries: safe to try again later."""


class RateLimitExhausted(ApiError):
    """A daily budget is used up; the run stops cleanly and resumes after `resets_at`."""

    def __init__(self, service: str, message: str, *, resets_at=None, **kw):
        self.resets_at = resets_at
        super().__init__(service, message, **kw)


class AuthenticationError(ApiError):
    """Credentials were refused (Expensify) or a token could not be obtained (Exact)."""


class ReconsentRequired(AuthenticationError):
    """Exact's refresh token is spent or expired: a person must run `expensify-exact authorize` again."""


class DivisionAccessError(ApiError):
    """The configured Exact division is not reachable with this authorization."""


class RejectedByApi(ApiError):
    """The API understood the request and refused it (Exact validation error, Expensify responseCode != 200)."""


class ErrorBudgetExhausted(ApiError):
    """This hour's error budget of one Exact endpoint is spent: the connector stops calling it until the next clock
    hour, well before Exact's own block at 10 errors (exact-online.md §6); what it would have done waits."""


class ConnectionStopped(ApiError):
    """Exact answered 403 (blocked, no rights or licence; see the Reason): nothing more goes through this
    connection in this run."""
