"""The Exact Online OAuth state machine: auth codes, access tokens and single-use rotating refresh tokens.

Follows exact-online.md §2.3–§2.7. Callers hold the simulator's lock; every method is pure state + clock.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

from expensify_exact_sandbox.exact_odata import Reply
from expensify_exact_sandbox.seed import (
    EXACT_CLIENT_ID,
    EXACT_CLIENT_SECRET,
    EXACT_INITIAL_REFRESH_TOKEN,
    EXACT_REDIRECT_URI,
)

_FAR_PAST = datetime(2000, 1, 1, tzinfo=timezone.utc)
DEMO_USER = "finance"  # the demo firm's Exact user: every consent but a customer division's is theirs
TOO_EARLY = "Rate limit exceeded: access_token not expired"


@dataclass(eq=False)  # a consent is itself: compared by identity, never by its (cyclic) token list
class Chain:
    """One consent: the refresh tokens it has rotated through share it (the sheet's chainId, §2.5)."""

    chain_id: str
    client_id: str
    last_issued_at: datetime  # when this chain last got an access token; the 570 s floor counts from here
    user: str = DEMO_USER  # the Exact user who consented: the 200 token calls a day count per app and user (§2.4)
    # a customer's user reaches only its own division, which is also its CurrentDivision; None: the demo user,
    # whose divisions are the `accessible_divisions` knob
    division: int | None = None
    refresh_tokens: list["RefreshToken"] = field(default_factory=list, repr=False)  # every one it rotated through


@dataclass
class RefreshToken:
    value: str
    chain: Chain
    issued_at: datetime
    used: bool = False
    successor: str | None = None

    def __post_init__(self):
        self.chain.refresh_tokens.append(self)


@dataclass
class AccessToken:
    value: str
    client_id: str
    chain: Chain
    expires_at: datetime


@dataclass
class AuthCode:
    value: str
    client_id: str
    redirect_uri: str
    expires_at: datetime
    used: bool = False


def normalize_client_id(client_id: str | None) -> str:
    # exact-online.md §2.1: configs sometimes carry the GUID in braces
    return (client_id or "").strip().strip("{}").lower()


def _json(status: int, payload: dict | str, headers: list[tuple[str, str]] | None = None,
          refusal: str | None = None) -> Reply:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return Reply(status, [("Content-Type", "application/json; charset=utf-8"), *(headers or [])],
                 body.encode(), refusal=refusal)


def _us_time(moment: datetime) -> str:
    # exact-online.md §2.5 prints "10/11/2022 9:18:20 PM" (a .NET en-US timestamp)
    hour = moment.hour % 12 or 12
    return f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment:%M:%S} {'AM' if moment.hour < 12 else 'PM'}"


class TokenAuthority:
    """Issues and checks tokens for the one registered sandbox app (seed.EXACT_CLIENT_ID)."""

    def __init__(self, clock, knobs):
        self._clock = clock
        self._knobs = knobs
        self.clients = {normalize_client_id(EXACT_CLIENT_ID): (EXACT_CLIENT_SECRET, EXACT_REDIRECT_URI)}
        self.codes: dict[str, AuthCode] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.daily_calls: dict[tuple[str, str, str], int] = {}  # (client, user, day)
        # the seeded token behaves as if its access token was issued long ago: refreshable immediately
        chain = Chain(secrets.token_hex(8), normalize_client_id(EXACT_CLIENT_ID), _FAR_PAST)
        self.refresh_tokens[EXACT_INITIAL_REFRESH_TOKEN] = RefreshToken(
            EXACT_INITIAL_REFRESH_TOKEN, chain, self._clock.now())

    # -- authorization endpoint ----------------------------------------------------------------------
    def authorize(self, params: dict[str, str]) -> Reply:
        """Auto-consents and redirects back with a single-use code (§2.1)."""
        client_id = normalize_client_id(params.get("client_id"))
        redirect_uri = params.get("redirect_uri", "")
        if client_id not in self.clients or redirect_uri != self.clients[client_id][1]:
            return Reply(400, [("Content-Type", "text/html")],
                         b"<html><body>Invalid client or redirect_uri</body></html>")
        state = {"state": params["state"]} if "state" in params else {}
        if params.get("response_type") == "token":
            access, _ = self._issue(Chain(secrets.token_hex(8), client_id, self._clock.now()), refresh=False)
            fragment = urlencode({"access_token": access.value, "token_type": "bearer",
                                  "expires_in": str(self._knobs.access_token_seconds), **state})
            return Reply(302, [("Location", f"{redirect_uri}#{fragment}")])
        if params.get("response_type") != "code":
            return Reply(400, [("Content-Type", "text/html")], b"<html><body>Unsupported response_type</body></html>")
        # the real code contains "!", so the callback carries %21 (§2.1)
        value = f"{secrets.token_urlsafe(4)}!IAAAA{secrets.token_urlsafe(24)}"
        self.codes[value] = AuthCode(value, client_id, redirect_uri,
                                     self._clock.now() + timedelta(seconds=self._knobs.auth_code_seconds))
        query = urlencode({"code": value, **state})
        sep = "&" if "?" in redirect_uri else "?"
        return Reply(302, [("Location", f"{redirect_uri}{sep}{query}")])

    # -- token endpoint ------------------------------------------------------------------------------
    def token(self, form: dict[str, str]) -> tuple[Reply, str, bool]:
        """Answers one token call. Returns (reply, client_id, rotated) so the caller can count and fault."""
        now = self._clock.now()
        client_id = normalize_client_id(form.get("client_id"))
        # §2.4: per app and user; a grant that names no known consent is counted against the demo user
        presented = self.refresh_tokens.get(form.get("refresh_token", "")) if form.get("grant_type") == \
            "refresh_token" else None
        day_key = (client_id, presented.chain.user if presented else DEMO_USER, now.date().isoformat())
        self.daily_calls[day_key] = self.daily_calls.get(day_key, 0) + 1
        if client_id not in self.clients or form.get("client_secret") != self.clients[client_id][0]:
            return _json(400, {"error": "invalid_request"}, refusal="invalid_client"), client_id, False
        if self.daily_calls[day_key] > self._knobs.token_calls_per_day:
            # §2.4: 200 token calls per key/user/day; the refusal's shape is not documented [?]
            return _json(self._knobs.token_daily_limit_status,
                         {"error": "access_denied", "error_description": "Rate limit exceeded: token calls per day"},
                         [("Reason", "TooManyTokenRequests: Rate limit exceeded")],
                         refusal="daily_token_limit"), client_id, False
        grant = form.get("grant_type")
        if grant == "authorization_code":
            return self._exchange_code(form, client_id, now)
        if grant == "refresh_token":
            return self._refresh(form.get("refresh_token", ""), client_id, now)
        return _json(400, {"error": "unsupported_grant_type"}, refusal="unsupported_grant_type"), client_id, False

    def _exchange_code(self, form, client_id, now) -> tuple[Reply, str, bool]:
        code = self.codes.get(form.get("code", ""))
        if (code is None or code.used or code.expires_at < now or code.client_id != client_id
                or form.get("redirect_uri") != code.redirect_uri):
            # exact-online.md §2.5: a used or expired code gets a plain-text Bad Request
            return (Reply(400, [("Content-Type", "text/plain")], b"Bad Request", refusal="bad_code"),
                    client_id, False)
        code.used = True
        access, refresh = self._issue(Chain(secrets.token_hex(8), client_id, now))
        return self._token_reply(access, refresh), client_id, True

    def _refresh(self, value: str, client_id: str, now: datetime) -> tuple[Reply, str, bool]:
        token = self.refresh_tokens.get(value)
        if token is None or token.chain.client_id != client_id:
            return _json(400, {"error": "invalid_grant", "error_description":
                               "Token is not allowed, because of invalid or empty chainId"},
                         refusal="invalid_grant"), client_id, False
        if token.used and not self._grace_allows(token):
            return _json(401, {"error": "unauthorized_client", "error_description": "Old refresh token used."},
                         refusal="old_refresh_token_used"), client_id, False
        expires_at = token.issued_at + timedelta(days=self._knobs.refresh_idle_days)
        if now > expires_at:
            # .NET serializes "/" as "\/" in this message (§2.5)
            msg = f"The refresh token expired at {_us_time(expires_at)} and it is now {_us_time(now)}."
            body = json.dumps({"error": "invalid_request", "error_description": msg}).replace("/", "\\/")
            return _json(400, body, refusal="refresh_token_expired"), client_id, False
        if (now - token.chain.last_issued_at).total_seconds() < self._knobs.refresh_floor_seconds:
            # §2.4: refused without consuming the presented refresh token [?]
            return _json(self._knobs.too_early_status, {"error": "access_denied", "error_description": TOO_EARLY},
                         [("Reason", f"TooEarlyToRefreshTokens: {TOO_EARLY}")],
                         refusal="too_early"), client_id, False
        access, refresh = self._issue(token.chain)
        for other in token.chain.refresh_tokens:  # the chain's own, not every token of every customer
            if other is not refresh:
                other.used = True
        token.successor = refresh.value
        return self._token_reply(access, refresh), client_id, True

    def _grace_allows(self, token: RefreshToken) -> bool:
        # §2.3 [?]: the previous refresh token stays valid until its successor has itself been used
        if not self._knobs.allow_previous_refresh_until_new_used or token.successor is None:
            return False
        successor = self.refresh_tokens.get(token.successor)
        return successor is not None and not successor.used

    def _issue(self, chain: Chain, refresh: bool = True) -> tuple[AccessToken, RefreshToken | None]:
        now = self._clock.now()
        chain.last_issued_at = now
        access = AccessToken("AAEAA" + secrets.token_urlsafe(48), chain.client_id, chain,
                             now + timedelta(seconds=self._knobs.access_token_seconds))
        self.access_tokens[access.value] = access
        new_refresh = None
        if refresh:
            new_refresh = RefreshToken(f"{secrets.token_urlsafe(4)}!IAAAA{secrets.token_urlsafe(40)}", chain, now)
            self.refresh_tokens[new_refresh.value] = new_refresh
        return access, new_refresh

    def _token_reply(self, access: AccessToken, refresh: RefreshToken) -> Reply:
        # exact-online.md §2.2: expires_in is a string and token_type is lower-case "bearer"
        return _json(200, {"access_token": access.value, "token_type": "bearer",
                           "expires_in": str(self._knobs.access_token_seconds), "refresh_token": refresh.value})

    def issue_consent(self, refreshable_now: bool = False) -> dict:
        """A brand-new chain, as if a person consented again (control API)."""
        client_id = normalize_client_id(EXACT_CLIENT_ID)
        chain = Chain(secrets.token_hex(8), client_id, self._clock.now())
        access, refresh = self._issue(chain)
        if refreshable_now:
            chain.last_issued_at = _FAR_PAST
        return {"access_token": access.value, "refresh_token": refresh.value,
                "expires_in": str(self._knobs.access_token_seconds), "token_type": "bearer"}

    def add_customer_consent(self, refresh_token: str, division: int) -> None:
        """A customer's own user consented for its one division: `refresh_token` starts a chain refreshable at
        once (as the seeded demo token is), counted as its own user for the daily token limit."""
        chain = Chain(secrets.token_hex(8), normalize_client_id(EXACT_CLIENT_ID), _FAR_PAST,
                      user=f"customer-{division}", division=division)
        self.refresh_tokens[refresh_token] = RefreshToken(refresh_token, chain, self._clock.now())

    def check_access(self, header: str | None) -> AccessToken | None:
        if not header or not header.lower().startswith("bearer "):
            return None
        token = self.access_tokens.get(header[7:].strip())
        if token is None or token.expires_at <= self._clock.now():
            return None
        return token
