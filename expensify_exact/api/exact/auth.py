"""Which token an Exact request carries: TokenRefresher (lock → reload → refresh → persist) and ExactAuth (one retry on 401)."""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from datetime import datetime, timedelta

import httpx

from expensify_exact.api.exact.odata import parse_error
from expensify_exact.api.exact.tokens import ExactTokens, TokenStore, parse_token_response
from expensify_exact.api.http.redaction import redact_text
from expensify_exact.clock import Clock
from expensify_exact.errors import AuthenticationError, ReconsentRequired, TransientApiError

SERVICE = "exact"
REFRESH_FLOOR_SECONDS = 570    # exact-online.md §2.4: no new token sooner than 570 s after the last
REFRESH_MARGIN_SECONDS = 120
REFRESH_IDLE_DAYS = 30         # exact-online.md §2.3: an unused refresh token dies after 30 days
IDLE_WARNING_DAYS = 25


class TokenRefresher:
    """Hands out a valid access token for one connection and rotates the pair when it is time.

    Several processes may share a connection, so a refresh happens under `store.lock`, re-reads
    the store first (a sibling may already have rotated), and saves the new pair before anything
    uses it: the old refresh token is spent the moment Exact answers (exact-online.md §2.6).
    """

    def __init__(self, store: TokenStore, connection: str, token_url: str, client_id: str,
                 client_secret: str, clock: Clock, *,
                 transport: httpx.BaseTransport | None = None,
                 http_client_factory: Callable[[], httpx.Client] | None = None,
                 refresh_floor_seconds: float = REFRESH_FLOOR_SECONDS,
                 refresh_margin_seconds: float = REFRESH_MARGIN_SECONDS,
                 idle_warning_days: float = IDLE_WARNING_DAYS,
                 timeout: float = 30.0):
        self.store = store
        self.connection = connection
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        # Its own small client per refresh: the token endpoint has its own quota (§2.4) and must not wait behind
        # the paced API client, which may be the one asking for this token.
        self._http_client = http_client_factory or (lambda: httpx.Client(transport=transport, timeout=timeout))
        self.refresh_floor = timedelta(seconds=refresh_floor_seconds)
        self.refresh_margin = timedelta(seconds=refresh_margin_seconds)
        self.idle_warning = timedelta(days=idle_warning_days)
        self._tokens: ExactTokens | None = None
        self.refreshes = 0  # successful rotations by this refresher, for metrics and tests

    def __repr__(self) -> str:
        return f"TokenRefresher(connection={self.connection!r}, token_url={self.token_url!r}, client_secret=***)"

    def refresh_window_opens(self, tokens: ExactTokens) -> datetime:
        """The first moment inside both rules: ≤ margin before expiry and ≥ floor after issuance."""
        return max(tokens.access_expires_at - self.refresh_margin, tokens.issued_at + self.refresh_floor)

    def current(self) -> ExactTokens:
        """The tokens to use now, refreshing only once the refresh window is open.

        Raises:
            ReconsentRequired: nothing is stored, or the refresh token is spent or expired.
            AuthenticationError: Exact refused the refresh for another reason.
            TransientApiError: the token endpoint could not be reached.
        """
        tokens = self._tokens or self._load()
        self._tokens = tokens
        if not self._due(tokens, self._clock.now()):
            return tokens
        return self.refresh(stale=tokens)

    def refresh(self, stale: ExactTokens | None = None, force: bool = False) -> ExactTokens:
        """Rotate the token pair, unless a sibling process already did.

        Args:
            stale: the tokens the caller holds; if the store has different, still-valid ones,
                those are returned without calling Exact.
            force: refresh even before the window opens (after a 401 on a supposedly valid
                token); Exact may still refuse before the 570 s floor, and then the current
                token is kept.

        Returns:
            Tokens that were valid when returned (or the still-current pair after a too-early refusal).
        """
        with self.store.lock(self.connection):
            stored = self._load()
            now = self._clock.now()
            rotated_by_sibling = stale is not None and stored.refresh_token != stale.refresh_token
            if rotated_by_sibling and stored.is_valid_at(now):
                self._tokens = stored
                return stored
            if not rotated_by_sibling and not force and not self._due(stored, now):
                self._tokens = stored
                return stored
            tokens = self._refresh_locked(stored)
            self._tokens = tokens
            return tokens

    def _due(self, tokens: ExactTokens, now: datetime) -> bool:
        # An access token that died before the floor (a short expires_in) is due as well; Exact
        # may then answer "too early", which _refresh_locked waits out.
        return now >= self.refresh_window_opens(tokens) or not tokens.is_valid_at(now)

    def refresh_token_idle_warning(self, now: datetime | None = None) -> str | None:
        """A warning when the refresh token is close to Exact's 30-day idle expiry, else None."""
        now = now or self._clock.now()
        tokens = self.store.load(self.connection)
        if tokens is None:
            return None
        age = now - tokens.issued_at
        if age < self.idle_warning:
            return None
        expires = tokens.issued_at + timedelta(days=REFRESH_IDLE_DAYS)
        return (f"Exact refresh token of connection {self.connection!r} is {age.days} days old and expires "
                f"unused around {expires:%Y-%m-%d} (exact-online.md §2.3); run any sync before then, or "
                f"re-authorize afterwards with `expensify-exact authorize --connection {self.connection}`")

    def _load(self) -> ExactTokens:
        tokens = self.store.load(self.connection)
        if tokens is None:
            raise ReconsentRequired(SERVICE, f"no Exact tokens stored for connection {self.connection!r}; "
                                             f"run `expensify-exact authorize --connection {self.connection}`")
        return tokens

    def _refresh_locked(self, stored: ExactTokens) -> ExactTokens:
        outcome = self._post_refresh(stored)
        if isinstance(outcome, ExactTokens):
            return outcome
        if outcome == "too_early":
            now = self._clock.now()
            if stored.is_valid_at(now):
                # Exact did not consume the refresh token (§2.4): keep using the access token.
                return stored
            self._clock.sleep((stored.issued_at + self.refresh_floor - now).total_seconds())
            outcome = self._post_refresh(stored)
            if isinstance(outcome, ExactTokens):
                return outcome
            raise AuthenticationError(SERVICE, "Exact keeps refusing the token refresh as too early "
                                               "although the access token has expired", status=400,
                                      reason="TooEarlyToRefreshTokens")
        # outcome == "old_refresh_token": a process outside our lock may have rotated (§2.6 step 5).
        reloaded = self.store.load(self.connection)
        if reloaded is not None and reloaded.refresh_token != stored.refresh_token:
            return reloaded
        raise self._reconsent("Exact says the stored refresh token was already used (\"Old refresh "
                              "token used.\"): another program refreshed it without sharing the result")

    def _post_refresh(self, stored: ExactTokens) -> ExactTokens | str:
        form = {"refresh_token": stored.refresh_token, "grant_type": "refresh_token",
                "client_id": self._client_id, "client_secret": self._client_secret}
        requested_at = self._clock.now()
        try:
            with self._http_client() as http:
                response = http.post(self.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            # Not retried: if Exact rotated before the connection dropped, a retry with the old
            # refresh token would only earn "Old refresh token used".
            raise TransientApiError(SERVICE, f"token endpoint unreachable: {type(exc).__name__}") from exc
        if response.status_code == 200:
            tokens = parse_token_response(response.json(), requested_at, self._clock.now(), stored.refresh_token)
            # Persist before anyone uses the new access token: the old refresh token is already spent.
            self.store.save(self.connection, tokens)
            self.refreshes += 1
            return tokens
        return self._classify_refusal(response, stored)

    def _classify_refusal(self, response: httpx.Response, stored: ExactTokens) -> str:
        message, reason = parse_error(response)
        error, description = _token_error(response)
        text = f"{reason or ''} {error} {description} {message}".lower()
        if "toearlytorefreshtokens" in text or "access_token not expired" in text or "access token not expired" in text:
            return "too_early"  # 400 observed, 401 documented (exact-online.md §2.4)
        if "old refresh token used" in text:
            return "old_refresh_token"
        safe = redact_text(message, secrets=(stored.refresh_token, stored.access_token, self._client_secret),
                           limit=300)
        if response.status_code >= 500:
            raise TransientApiError(SERVICE, f"token endpoint failed: {safe}", status=response.status_code,
                                    reason=reason)
        if error == "invalid_grant" or (error == "invalid_request" and "expired" in description.lower()):
            raise self._reconsent(f"Exact refused the refresh token ({safe})")
        raise AuthenticationError(SERVICE, f"token refresh refused: {safe}; check the client id and secret "
                                           f"of connection {self.connection!r}",
                                  status=response.status_code, reason=reason)

    def _reconsent(self, why: str) -> ReconsentRequired:
        return ReconsentRequired(SERVICE, f"{why}. A person must re-authorize: run "
                                          f"`expensify-exact authorize --connection {self.connection}`")


class ExactAuth(httpx.Auth):
    """Bearer auth for Exact Online: rotating refresh token, at most one refresh-and-retry on 401."""

    requires_request_body = True  # the retry re-sends the same body

    def __init__(self, refresher: TokenRefresher):
        self.refresher = refresher

    def __repr__(self) -> str:
        return f"ExactAuth({self.refresher!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # sync_auth_flow, not auth_flow: refreshing takes a lock and writes to the store (STYLE.md §3).
        token = self.refresher.current()
        request.headers["Authorization"] = f"Bearer {token.access_token}"
        response = yield request
        if response.status_code != 401:
            return
        # One refresh, one retry; never a loop, since 401s count toward Exact's error limit (§2.6 step 6).
        token = self.refresher.refresh(stale=token, force=True)
        request.headers["Authorization"] = f"Bearer {token.access_token}"
        response = yield request
        if response.status_code == 401:
            response.read()
            message, reason = parse_error(response)
            challenge = response.headers.get("WWW-Authenticate", "")
            raise AuthenticationError(
                SERVICE, "Exact refused a freshly refreshed access token: "
                         + redact_text(f"{message} {challenge}".strip(),
                                       secrets=(token.access_token, token.refresh_token), limit=300),
                status=401, reason=reason)

    def async_auth_flow(self, request: httpx.Request):
        raise RuntimeError("ExactAuth is sync-only: use it with httpx.Client, not AsyncClient")


def _token_error(response: httpx.Response) -> tuple[str, str]:
    """`error` and `error_description` of an RFC 6749 token-endpoint body (exact-online.md §2.5)."""
    try:
        body = json.loads(response.text)
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error")
    return (error if isinstance(error, str) else ""), str(body.get("error_description") or "")
