"""A local Exact Online REST API (OAuth, OData reads, journal-entry posting, rate limits, webhooks) as a WSGI app.

Built from shared/reference/exact-online.md only. Fault targets for `FaultSwitches` (see ExactSimulator):

* ``exact.api`` (every /api/v1 call): ``rate_limit`` (429 with minutely headers), ``http_503``.
* ``exact.post_entry`` (POST GeneralJournalEntries): ``http_400_before_store`` (a malformed-request refusal),
  ``http_500_before_store``, ``http_503_before_store``,
  ``drop_before_store``, ``store_then_http_500``, ``store_then_timeout`` (store, wait ``timeout_seconds`` real
  seconds, then answer 201), ``store_then_drop`` (store, then close the socket without answering). A store_then_*
  fault armed for a POST that fails validation is used up without effect. The knob ``post_answer_delay_seconds``
  slows every stored entry's answer the same way, without a fault.
* ``exact.token`` (POST /api/oauth2/token): ``http_500``, ``http_503``, ``drop_before_rotate``,
  ``drop_after_rotate`` (the grant succeeds and rotates the refresh token, but the answer never arrives).

Strict by default where the sheet leaves the truth open (§13): Exact assigns its own EntryID and ignores the client's
(`keep_client_entry_ids`), collection reads of endpoints with a sync twin need a `$filter` on an allowed field
(`mandatory_filtering`), query strings over 8 KB are refused, and every error an app earns (4xx except 429, and 5xx
carrying Exact's message) counts per client, division, endpoint and clock hour; from the 10th the endpoint answers
403 for the rest of that hour.

Customer divisions (`open_customer_division`, used by scale.ScaleScenario) each have their own Exact user: a
refresh token of their own, reaching that division only, with the 200 token calls a day counted per user (§2.4).
Their books are made on first use, so hundreds cost little until used.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import queue
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any, Iterable
from urllib.parse import parse_qsl, unquote

from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.exact_ledger import SPEC_BY_PATH, EntitySpec, Ledger, _f
from expensify_exact_sandbox.exact_oauth import TokenAuthority
from expensify_exact_sandbox.exact_odata import (
    AMSTERDAM,
    SELECT_REQUIRED,
    SYNTAX_ERROR,
    ODataError,
    Query,
    Reply,
    atom_feed,
    atom_single,
    error_json,
    error_xml,
    filter_fields,
    json_value,
    key_literal,
    parse_key_literal,
    parse_query,
    sort_key,
)
from expensify_exact_sandbox.faults import FaultSwitches

DEFAULT_BASE_URL = "https://start.exactonline.nl"
CONTROL_PREFIX = "/_sandbox/exact/"
# Fields that satisfy mandatory filtering on endpoints with a sync twin (exact-online.md §4.6, §13), strictest
# reading: the key and the natural key only. The bulk twins take the same fields.
MANDATORY_FILTER_FIELDS = {
    "financial/GLAccounts": ("ID", "Code"),
    "bulk/Financial/GLAccounts": ("ID", "Code"),
    "financialtransaction/TransactionLines": ("ID", "EntryID"),
    "bulk/Financial/TransactionLines": ("ID", "EntryID"),
}
_SYNC_FILTER = re.compile(r"^\s*Timestamp\s+gt\s+\d+L\s*$")
QUERY_STRING_TOO_LONG = "Bad Request - Query String Too Long"


class DropConnection(Exception):
    """Raised by the app when the server must close the TCP connection without writing a response."""

    drop_connection = True


@dataclass
class ExactKnobs:
    """Behaviour the sheet leaves open ([?]) or that tests want to bend. Set with `sim.set_knobs(...)`."""

    # OAuth (§2)
    access_token_seconds: int = 600
    auth_code_seconds: int = 180
    refresh_floor_seconds: int = 570
    refresh_idle_days: int = 30
    too_early_status: int = 400  # field reports say 400; Exact's own doc says 401 (§2.4)
    token_calls_per_day: int = 200
    token_daily_limit_status: int = 400
    allow_previous_refresh_until_new_used: bool = False
    www_authenticate: str = 'Bearer error="invalid_token", error_description="access token expired"'
    # divisions (§3)
    accessible_divisions: set[int] = field(default_factory=lambda: {S.DIVISION, S.SECOND_DIVISION})
    current_division: int = S.DIVISION
    # OData (§4)
    page_size: int = 60
    sync_page_size: int = 1000
    pad_codes: bool = False
    require_json_accept: bool = True
    select_required_on_key_reads: bool = False
    sync_values_as_strings: bool = False
    # §13 [?]: Exact may keep the client's EntryID (lenient) or assign its own and echo that one (strict default)
    keep_client_entry_ids: bool = False
    # §4.6/§13: endpoints with a sync twin refuse a collection GET without a $filter on an allowed field
    mandatory_filtering: bool = True
    # §4.4/§13: a longer query string is refused (IIS); batches of `or` filters must stay below it
    max_query_string_bytes: int = 8192
    # rate limits and error budget (§6)
    minutely_limit: int = 60
    daily_limit: int = 5000
    error_budget_enabled: bool = True
    error_budget: int = 10  # the 10th error of a clock hour blocks the endpoint for the rest of that hour
    error_block_reason: str = "BlockedByErrorLimit"
    # posting (§5)
    closed_periods: set[tuple[int, int]] = field(default_factory=set)
    enforce_field_lengths: bool = True
    description_max_length: int = 60
    notes_max_length: int = 255
    duplicate_entry_message: str = "Data already exists"
    disallowed_gl_types: set[int] = field(default_factory=set)
    entry_number_start: int = 26900001
    exchange_rates: dict[str, float] = field(default_factory=lambda: {"USD": 0.92, "GBP": 1.17, "CHF": 1.04})
    timeout_seconds: float = 3.0
    post_answer_delay_seconds: float = 0.0  # real seconds a stored entry's 201 takes, so a test can kill mid-POST
    # webhooks (§8)
    webhook_targets: list[str] = field(default_factory=list)

    def update(self, **changes: Any) -> None:
        valid = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in valid:
                raise ValueError(f"unknown Exact sandbox knob {name!r}; known: {sorted(valid)}")
            if name == "closed_periods":
                value = {tuple(p) for p in value}
            elif name in ("accessible_divisions", "disallowed_gl_types"):
                value = {int(v) for v in value}
            setattr(self, name, value)

    def as_json(self) -> dict:
        data = asdict(self)
        return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


_ME_SPEC = EntitySpec("current/Me", "Me", "UserID", _f(
    "UserID:g CurrentDivision:i FullName:s FirstName:s LastName:s Initials:s UserName:s Email:s Title:s Gender:s "
    "Language:s LanguageCode:s Legislation:s ServerTime:dt IsClientUser:b IsStarterUser:b"))
_ME_USER_ID = S.stable_guid("user", "finance")
_API_PATH = re.compile(r"^/api/v1/(?P<division>[^/]+)/(?P<rest>.+)$")
_ENTITY = re.compile(r"^(?P<path>[A-Za-z]+(?:/[A-Za-z]+)+?)(?:\((?P<key>[^)]*)\)(?:/(?P<nav>[A-Za-z]+))?)?"
                     r"(?P<count>/\$count)?$")


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _exact_answered(reply: Reply) -> bool:
    """Whether Exact's API itself produced this answer (not a proxy's HTML outage page or a dropped socket)."""
    if reply.drop:
        return False
    return not any(n.lower() == "content-type" and v.startswith("text/html") for n, v in reply.headers)


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _plain(value: Any) -> Any:
    """JSON-friendly copy for the control API (ISO dates rather than /Date()/)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


class ExactSimulator:
    """WSGI app simulating Exact Online for divisions 123456 and 234567 of the seed firm, and for any number of
    customer divisions (`open_customer_division`), each with its own user, books and limits.

    Args:
        seed: the shared demo data (only its `today` is used; master data comes from seed module constants).
        clock: all time (token expiry, rate windows, entry timestamps) is read from it.
        faults: switches consulted per call; targets and faults are listed in the module docstring.
    """

    def __init__(self, seed: S.Seed | None = None, clock: SandboxClock | None = None,
                 faults: FaultSwitches | None = None, knobs: ExactKnobs | None = None):
        self.seed = seed
        self.clock = clock or SandboxClock()
        self.faults = faults or FaultSwitches()
        self.knobs = knobs or ExactKnobs()
        self.public_base_url: str | None = None
        self._lock = threading.RLock()
        created = self.clock.now() - timedelta(days=400)
        self.ledgers = {
            S.DIVISION: Ledger.from_seed(S.DIVISION, "Vermeer & Hals Accountants B.V.", "NL", True, created),
            S.SECOND_DIVISION: Ledger.from_seed(S.SECOND_DIVISION, "Vermeer & Hals België BV", "BE", False, created),
        }
        self._customers: dict[int, str] = {}  # customer division -> its name; its ledger is made on first use
        self._pruned_minute = 0
        self.auth = TokenAuthority(self.clock, self.knobs)
        self._minute_calls: dict[tuple, int] = defaultdict(int)
        self._day_calls: dict[tuple, int] = defaultdict(int)
        self._seen_per_minute: dict[tuple, int] = defaultdict(int)
        self._errors: dict[tuple, int] = {}  # (client, division, endpoint, clock hour) -> errors earned
        self._webhooks: list[dict] = []
        self._webhook_queue: queue.Queue = queue.Queue()
        self._webhook_thread: threading.Thread | None = None
        self._webhook_lock = threading.Lock()
        self._stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict:
        return {"calls": Counter(), "calls_by_division": Counter(), "statuses": Counter(),
                "rate_limited": Counter(minutely=0, daily=0), "max_calls_per_minute": {},
                "rate_limited_by_division": {}, "posts_by_division": Counter(),
                "token": Counter(calls=0, refreshes=0, codes_exchanged=0, consents=0),
                "refusals": Counter(), "old_refresh_token_used": 0,
                "posts": Counter(attempted=0, created=0, rejected=0),
                "blocked_by_error_limit": 0, "errors": Counter(), "faults": Counter()}

    # ------------------------------------------------------------------------------------------------
    # WSGI
    # ------------------------------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response):
        reply = self.handle(environ)
        if reply.delay:
            time.sleep(reply.delay)  # outside the lock: other requests keep flowing meanwhile
        if reply.drop:
            raise DropConnection("sandbox fault: connection dropped")
        headers = list(reply.headers)
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("Content-Length", str(len(reply.body))))
        start_response(_status_line(reply.status), headers)
        return [reply.body]

    def handle(self, environ: dict) -> Reply:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        body = self._read_body(environ)
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path[len(CONTROL_PREFIX):], environ, body)
        with self._lock:
            if path == "/api/oauth2/auth" and method == "GET":
                return self.auth.authorize(dict(parse_qsl(environ.get("QUERY_STRING", ""))))
            if path == "/api/oauth2/token":
                return self._token(method, environ, body)
        if path.startswith("/api/"):
            return self._api(method, path, environ, body)
        return self._odata_reply(ODataError(404, "Resource not found for the segment ''."), environ)

    @staticmethod
    def _read_body(environ: dict) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        return environ["wsgi.input"].read(length) if length > 0 else b""

    def _base(self, environ: dict | None) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        if environ and environ.get("HTTP_HOST"):
            return f"{environ.get('wsgi.url_scheme', 'http')}://{environ['HTTP_HOST']}"
        return DEFAULT_BASE_URL

    def _wants_json(self, environ: dict) -> bool:
        # exact-online.md §4.1: without Accept: application/json Exact answers Atom XML
        return "application/json" in environ.get("HTTP_ACCEPT", "") or not self.knobs.require_json_accept

    def _odata_reply(self, error: ODataError, environ: dict) -> Reply:
        headers = [("Reason", error.reason)] if error.reason else []
        if self._wants_json(environ):
            return Reply(error.status, [("Content-Type", "application/json; charset=utf-8"), *headers],
                         error_json(error.message))
        return Reply(error.status, [("Content-Type", "application/xml; charset=utf-8"), *headers],
                     error_xml(error.message))

    # ------------------------------------------------------------------------------------------------
    # OAuth token endpoint (§2.2–§2.7)
    # ------------------------------------------------------------------------------------------------
    def _token(self, method: str, environ: dict, body: bytes) -> Reply:
        self._stats["token"]["calls"] += 1
        self._stats["calls"]["POST oauth2/token"] += 1
        fault = self._take("exact.token")
        if fault in ("http_500", "http_503"):
            code = int(fault[-3:])
            page = f"<html><body>{_status_line(code)}</body></html>".encode()
            return Reply(code, [("Content-Type", "text/html")], page)
        if fault == "drop_before_rotate":
            return Reply(0, drop=True)
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if method != "POST" or "form-urlencoded" not in environ.get("CONTENT_TYPE", ""):
            form = {}
        client_key = (form.get("client_id") or "?").strip("{}").lower()
        block_key = (client_key, None, "oauth2/token")
        if self._is_blocked(block_key):
            return Reply(403, [("Content-Type", "application/json"), ("Reason", self.knobs.error_block_reason)],
                         json.dumps({"error": "access_denied", "error_description": "Blocked by error limit"}).encode())
        reply, _client, rotated = self.auth.token(form)
        if reply.refusal:
            self._stats["refusals"][reply.refusal] += 1
            if reply.refusal == "old_refresh_token_used":
                self._stats["old_refresh_token_used"] += 1
        elif rotated:
            grant = form.get("grant_type")
            self._stats["token"]["refreshes" if grant == "refresh_token" else "codes_exchanged"] += 1
        self._stats["statuses"][str(reply.status)] += 1
        self._count_error(block_key, reply.status, _exact_answered(reply))
        if rotated and fault == "drop_after_rotate":
            return Reply(0, drop=True)
        return reply

    # ------------------------------------------------------------------------------------------------
    # REST API
    # ------------------------------------------------------------------------------------------------
    def _api(self, method: str, path: str, environ: dict, body: bytes) -> Reply:
        with self._lock:
            reply = self._api_locked(method, path, environ, body)
        self._deliver_webhooks()
        return reply

    def _api_locked(self, method: str, path: str, environ: dict, body: bytes):
        if path.rstrip("/") in ("/api/v1/current/Me", "/api/v1/current/me"):
            return self._me(method, environ)
        m = _API_PATH.match(path)
        division: int | None = None
        rest = path
        if m and m.group("division").isdigit():
            division, rest = int(m.group("division")), m.group("rest")
        em = _ENTITY.match(rest) if division is not None else None
        spec = SPEC_BY_PATH.get(em.group("path").lower()) if em else None
        endpoint = spec.path if spec else (em.group("path") if em else rest)
        self._stats["calls"][f"{method} {endpoint}"] += 1
        if division is None:
            return self._odata_reply(ODataError(404, "Resource not found for the segment 'v1'."), environ)

        self._stats["calls_by_division"][str(division)] += 1
        token = self.auth.check_access(environ.get("HTTP_AUTHORIZATION"))
        if token is None:
            known = self._token_owner(environ.get("HTTP_AUTHORIZATION"))
            self._count_error((known, division, endpoint), 401)
            self._stats["statuses"]["401"] += 1
            # exact-online.md §7: 401 carries the reason in WWW-Authenticate; the body is empty [?]
            return Reply(401, [("WWW-Authenticate", self.knobs.www_authenticate)])
        block_key = (token.client_id, division, endpoint)
        if self._is_blocked(block_key):
            self._stats["blocked_by_error_limit"] += 1
            self._stats["statuses"]["403"] += 1
            err = ODataError(403, "Forbidden - too many errors on this endpoint; blocked for an hour.",
                             reason=self.knobs.error_block_reason)
            return self._odata_reply(err, environ)
        limited, rate_headers = self._rate_limit(token.client_id, division)
        if limited is not None:
            self._stats["statuses"]["429"] += 1
            return limited

        fault = self._take("exact.api")
        if fault == "rate_limit":
            self._count_429(division, "minutely")
            reply = Reply(429, self._minutely_headers(0))
        elif fault == "http_503":
            reply = Reply(503, [("Content-Type", "text/html")], b"<html><body>Service Unavailable</body></html>")
        else:
            try:
                if division not in self._reachable(token) or not self._has_division(division):
                    raise ODataError(403, "Forbidden - WrongDivision", reason="NoDivisionAccess")  # §3 [?] body
                if spec is None:
                    raise ODataError(404, f"Resource not found for the segment '{rest.split('(')[0].split('/')[-1]}'.")
                if method not in spec.methods:
                    raise ODataError(405, f"The requested resource does not support http method '{method}'.")
                if len(environ.get("QUERY_STRING", "").encode()) > self.knobs.max_query_string_bytes:
                    raise ODataError(400, QUERY_STRING_TOO_LONG)  # §13: IIS refuses long query strings
                reply = self._dispatch(method, spec, em, division, environ, body)
            except ODataError as exc:
                reply = self._odata_reply(exc, environ)
            reply.headers.extend(rate_headers)
        self._stats["statuses"]["dropped" if reply.drop else str(reply.status)] += 1
        self._count_error(block_key, reply.status, _exact_answered(reply))
        return reply

    def _token_owner(self, header: str | None) -> str:
        if header and header.lower().startswith("bearer "):
            token = self.auth.access_tokens.get(header[7:].strip())
            if token is not None:
                return token.client_id
        return "?"

    def _me(self, method: str, environ: dict) -> Reply:
        # exact-online.md §3: no division in the URL, so no rate-limit headers and no daily count
        self._stats["calls"][f"{method} current/Me"] += 1
        token = self.auth.check_access(environ.get("HTTP_AUTHORIZATION"))
        if token is None:
            self._stats["statuses"]["401"] += 1
            return Reply(401, [("WWW-Authenticate", self.knobs.www_authenticate)])
        fault = self._take("exact.api")
        if fault == "rate_limit":
            return Reply(429, self._minutely_headers(0))
        if fault == "http_503":
            return Reply(503, [("Content-Type", "text/html")], b"<html><body>Service Unavailable</body></html>")
        current = token.chain.division if token.chain.division is not None else self.knobs.current_division
        row = {"UserID": _ME_USER_ID, "CurrentDivision": current, "FullName": "Finance Team",
               "FirstName": "Finance", "LastName": "Team", "Initials": "F.", "UserName": "finance.vermeerhals",
               "Email": S.APPROVER, "Title": "DHR", "Gender": "O", "Language": "NL", "LanguageCode": "nl-NL",
               "Legislation": "1", "ServerTime": self.clock.now(), "IsClientUser": False, "IsStarterUser": False}
        try:
            q = parse_query(parse_qsl(environ.get("QUERY_STRING", "")), _ME_SPEC.fields, "Exact.Web.Api.System.Me")
        except ODataError as exc:
            return self._odata_reply(exc, environ)
        out = {"__metadata": {"uri": f"{self._base(environ)}/api/v1/current/Me(guid'{_ME_USER_ID}')",
                              "type": "Exact.Web.Api.System.Me"}}
        for name in q.select or _ME_SPEC.fields:
            out[name] = json_value(row[name])
        return self._collection_reply([out], None, environ, "Me")

    # -- rate limits (§6) ----------------------------------------------------------------------------
    def _minutely_headers(self, remaining: int) -> list[tuple[str, str]]:
        now = self.clock.now()
        reset = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return [("X-RateLimit-Minutely-Limit", str(self.knobs.minutely_limit)),
                ("X-RateLimit-Minutely-Remaining", str(max(remaining, 0))),
                ("X-RateLimit-Minutely-Reset", str(_epoch_ms(reset)))]

    def _daily_headers(self, remaining: int) -> list[tuple[str, str]]:
        now = self.clock.now()
        reset = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
        return [("X-RateLimit-Limit", str(self.knobs.daily_limit)),
                ("X-RateLimit-Remaining", str(max(remaining, 0))),
                ("X-RateLimit-Reset", str(_epoch_ms(reset)))]

    def _rate_limit(self, client_id: str, division: int) -> tuple[Reply | None, list[tuple[str, str]]]:
        """Counts one call; returns a 429 if a window is full, else the six headers for the answer."""
        now = self.clock.now()
        minute = int(now.timestamp() // 60)
        mkey, dkey = (client_id, division, minute), (client_id, division, now.date())
        if minute != self._pruned_minute:  # once a minute, not per call: memory stays flat over many divisions
            self._pruned_minute = minute
            for table in (self._minute_calls, self._seen_per_minute):
                for key in [k for k in table if k[-1] < minute - 2]:
                    del table[key]
        seen = self._seen_per_minute[(division, minute)] = self._seen_per_minute[(division, minute)] + 1
        best = self._stats["max_calls_per_minute"]
        best[str(division)] = max(best.get(str(division), 0), seen)
        # §6: a 429 carries only the exceeded window's headers and an empty body
        if self._day_calls[dkey] >= self.knobs.daily_limit:
            self._count_429(division, "daily")
            return Reply(429, self._daily_headers(0)), []
        if self._minute_calls[mkey] >= self.knobs.minutely_limit:
            self._count_429(division, "minutely")
            return Reply(429, self._minutely_headers(0)), []
        self._day_calls[dkey] += 1
        self._minute_calls[mkey] += 1
        return None, (self._daily_headers(self.knobs.daily_limit - self._day_calls[dkey])
                      + self._minutely_headers(self.knobs.minutely_limit - self._minute_calls[mkey]))

    def _count_429(self, division: int, window: str) -> None:
        self._stats["rate_limited"][window] += 1
        by_division = self._stats["rate_limited_by_division"].setdefault(str(division), {"minutely": 0, "daily": 0})
        by_division[window] += 1

    # -- divisions (§3) ------------------------------------------------------------------------------------
    def open_customer_division(self, division: int, refresh_token: str, name: str) -> None:
        """A customer of its own: division `division` (seeded like the demo division: same GL accounts, cost
        centers, cost units, VAT codes, journals and financial years, but its own IDs and entries), reached only
        through `refresh_token`'s consent. Its books are made on the first call that uses them."""
        with self._lock:
            if division in self.ledgers and division not in self._customers:
                raise ValueError(f"division {division} is a demo division")
            self._customers[division] = name
            self.auth.add_customer_consent(refresh_token, division)

    def _has_division(self, division: int) -> bool:
        return division in self.ledgers or division in self._customers

    def _ledger(self, division: int) -> Ledger:
        ledger = self.ledgers.get(division)
        if ledger is None:
            if division not in self._customers:
                raise KeyError(f"no division {division}")
            created = self.clock.now() - timedelta(days=400)
            ledger = self.ledgers[division] = Ledger.from_seed(division, self._customers[division], "NL", True,
                                                               created)
        return ledger

    def _reachable(self, token) -> set[int]:
        """The divisions a token's user may use: a customer's user its own, the demo user the knob's."""
        if token.chain.division is not None:
            return {token.chain.division}
        return self.knobs.accessible_divisions

    # -- error budget (§6 table, §13) ------------------------------------------------------------------
    def _hour(self) -> datetime:
        return self.clock.now().replace(minute=0, second=0, microsecond=0)

    def _is_blocked(self, key: tuple) -> bool:
        """Whether (client, division, endpoint) has earned `error_budget` errors in this clock hour."""
        return bool(self.knobs.error_budget_enabled
                    and self._errors.get((*key, self._hour()), 0) >= self.knobs.error_budget)

    def _count_error(self, key: tuple, status: int, exact_answered: bool = True) -> None:
        """Count an error the app earned: any 4xx but 429, and a 5xx only when Exact itself answered it (an OData
        message, e.g. a validation error), not an outage page or a dropped connection."""
        if status < 400 or status == 429 or (status >= 500 and not exact_answered):
            return
        hour = self._hour()
        if len(self._errors) > 5000:  # keep memory flat during long soak runs
            for old in [k for k in self._errors if k[-1] < hour]:
                del self._errors[old]
        self._errors[(*key, hour)] = self._errors.get((*key, hour), 0) + 1
        self._stats["errors"][f"{key[1]} {key[2]}"] += 1

    def _take(self, target: str) -> str | None:
        fault = self.faults.take(target)
        if fault:
            self._stats["faults"][f"{target}:{fault}"] += 1
        return fault

    # -- dispatch ------------------------------------------------------------------------------------
    def _dispatch(self, method: str, spec: EntitySpec, em: re.Match, division: int, environ: dict, body: bytes):
        ledger = self._ledger(division)
        raw_key = em.group("key")
        key = None
        if raw_key is not None:
            key = parse_key_literal(raw_key)  # a wrong key path is the generic syntax error (§4.6)
            if spec.fields[spec.key] == "Edm.Guid" and not isinstance(key, str):
                raise ODataError(400, SYNTAX_ERROR)
        if method == "POST":
            if raw_key is not None:
                raise ODataError(405, "The requested resource does not support http method 'POST'.")
            return self._post_entry(ledger, environ, body)
        if method == "DELETE":
            if key is None:
                raise ODataError(405, "The requested resource does not support http method 'DELETE'.")
            return self._delete_entry(ledger, key, environ)
        nav = em.group("nav")
        if nav is not None:
            # the __deferred link of an entry's lines (§4.2) is a collection read of that entry's lines
            if nav not in spec.navigation:
                raise ODataError(404, f"Resource not found for the segment '{nav}'.")
            if str(key).lower() not in ledger.entries:
                raise ODataError(404, f"Resource not found for the segment '{spec.path.split('/')[-1]}'.")
            line_spec = SPEC_BY_PATH["generaljournalentry/generaljournalentrylines"]
            return self._get(line_spec, ledger, None, em.group("count") is not None, environ,
                             rows=ledger.entries[str(key).lower()]["lines"])
        return self._get(spec, ledger, key, em.group("count") is not None, environ)

    def _rows(self, spec: EntitySpec, ledger: Ledger) -> list[dict]:
        if spec.path in ("system/Divisions", "hrm/Divisions") and ledger.division in self._customers:
            return [self._division_row(ledger.division, current=True)]  # a customer's user sees its own only
        if spec.path == "system/Divisions":
            return [self._division_row(d, current=(d == self.knobs.current_division))
                    for d in sorted(self.knobs.accessible_divisions) if d in self.ledgers]
        if spec.path == "hrm/Divisions":
            return [self._division_row(d) for d in sorted(self.ledgers) if d not in self._customers]
        return ledger.rows(spec)

    def _division_row(self, division: int, current: bool = False) -> dict:
        ledger = self.ledgers[division]
        customer = ("vermeerhals", "1", "Vermeer & Hals") if division not in self._customers else \
            (f"customer-{division}", str(division), ledger.description)
        return {"Code": division, "Current": current, "Description": ledger.description, "Currency": ledger.currency,
                "Country": ledger.country, "HID": division // 10, "Main": ledger.main,
                "Customer": S.stable_guid("customer", customer[0]), "CustomerCode": customer[1],
                "CustomerName": customer[2], "Blocked": False, "Created": None, "Modified": None}

    def _get(self, spec: EntitySpec, ledger: Ledger, key: Any, count: bool, environ: dict,
             rows: list[dict] | None = None) -> Reply:
        params = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        q = parse_query(params, spec.fields, spec.full_type, spec.navigation)
        rows = self._rows(spec, ledger) if rows is None else rows
        key_edm = spec.fields[spec.key]
        if key is not None:
            if self.knobs.select_required_on_key_reads and spec.select_required and q.select is None:
                raise ODataError(400, SELECT_REQUIRED)
            match = [r for r in rows if sort_key(r.get(spec.key), key_edm) == sort_key(key, key_edm)]
            if not match:
                raise ODataError(404, f"Resource not found for the segment '{spec.path.split('/')[-1]}'.")
            out = self._render(spec, match[0], ledger, environ, q)
            if not self._wants_json(environ):
                return Reply(200, [("Content-Type", "application/atom+xml;type=entry;charset=utf-8")],
                             atom_single(out, self.clock.now()))
            return self._json(200, {"d": out})
        if spec.select_required and q.select is None and q.top != 1 and not count:
            # exact-online.md §4.6: these endpoints refuse an unbounded, unselected read
            raise ODataError(400, SELECT_REQUIRED)
        if self.knobs.mandatory_filtering:
            self._check_mandatory_filter(spec, dict(params).get("$filter"), q)
        if q.filter:
            rows = [r for r in rows if q.filter(r)]
        if count:
            return Reply(200, [("Content-Type", "text/plain; charset=utf-8")], str(len(rows)).encode())
        total = len(rows)
        rows = sorted(rows, key=lambda r: sort_key(r.get(spec.key), key_edm))
        for name, desc in reversed(q.orderby):
            rows.sort(key=lambda r, n=name: sort_key(r.get(n), spec.fields[n]), reverse=desc)
        if q.skiptoken is not None:
            token = sort_key(q.skiptoken, key_edm)
            at = next((i for i, r in enumerate(rows) if sort_key(r.get(spec.key), key_edm) == token), None)
            rows = rows[at + 1:] if at is not None else [r for r in rows
                                                          if sort_key(r.get(spec.key), key_edm) > token]
        rows = rows[q.skip:]
        page_size = self.knobs.sync_page_size if spec.page == "sync" else self.knobs.page_size
        limit = min(q.top, page_size) if q.top is not None else page_size
        page = rows[:limit]
        next_url = None
        # §4.3: a full page always carries __next, even when nothing follows
        if page and len(page) == page_size and (q.top is None or q.top > page_size):
            next_url = self._next_url(environ, key_literal(page[-1][spec.key], key_edm),
                                      None if q.top is None else q.top - page_size)
        out = [self._render(spec, r, ledger, environ, q) for r in page]
        return self._collection_reply(out, next_url, environ, spec.path.split("/")[-1],
                                      total if q.inlinecount else None)

    @staticmethod
    def _check_mandatory_filter(spec: EntitySpec, text: str | None, q: Query) -> None:
        """§4.6/§13: a sync endpoint reads from a `Timestamp gt NL` watermark; an endpoint with a sync twin only
        with a $filter that names one of its mandatory-filter fields."""
        if spec.page == "sync" and spec.path.startswith("sync/"):
            if text is None or not _SYNC_FILTER.match(text):
                raise ODataError(400, "A GET request for this endpoint must have a $filter parameter with one of "
                                      "the following fields in the url: Timestamp (as Timestamp gt 1L)")
            return
        allowed = MANDATORY_FILTER_FIELDS.get(spec.path)
        if allowed is None:
            return
        if text is None or not (filter_fields(text) & set(allowed)):
            raise ODataError(400, "This endpoint has mandatory filtering applied. A GET request for this endpoint "
                                  "must have a $filter parameter with one of the following fields in the url: "
                                  + ",".join(allowed))

    def _collection_reply(self, rows: list[dict], next_url: str | None, environ: dict, title: str,
                          count: int | None = None) -> Reply:
        if not self._wants_json(environ):
            self_url = self._base(environ) + environ.get("PATH_INFO", "")
            return Reply(200, [("Content-Type", "application/atom+xml;type=feed;charset=utf-8")],
                         atom_feed(title, self_url, rows, next_url, self.clock.now()))
        d: dict[str, Any] = {"results": rows}
        if count is not None:
            d["__count"] = str(count)  # OData v2 sends it as a string [?] (§4.2)
        if next_url:
            d["__next"] = next_url
        return self._json(200, {"d": d})

    @staticmethod
    def _json(status: int, payload: dict, extra: Iterable[tuple[str, str]] = ()) -> Reply:
        return Reply(status, [("Content-Type", "application/json; charset=utf-8"), ("DataServiceVersion", "2.0;"),
                              *extra], json.dumps(payload).encode())

    def _next_url(self, environ: dict, token: str, top: int | None) -> str:
        kept = []
        for part in environ.get("QUERY_STRING", "").split("&"):
            name = unquote(part.split("=", 1)[0])
            if part and name not in ("$skiptoken", "$skip", "$top"):
                kept.append(part)
        if top is not None:
            kept.append(f"$top={top}")
        kept.append(f"$skiptoken={token}")
        return f"{self._base(environ)}{environ.get('PATH_INFO', '')}?{'&'.join(kept)}"

    def _render(self, spec: EntitySpec, row: dict, ledger: Ledger, environ: dict, q: Query) -> dict:
        key_edm = spec.fields[spec.key]
        uri = f"{self._base(environ)}/api/v1/{ledger.division}/{spec.path}({key_literal(row[spec.key], key_edm)})"
        out: dict[str, Any] = {"__metadata": {"uri": uri, "type": spec.full_type}}
        names = q.select or [*spec.fields, *spec.navigation]
        for name in names:
            if name in spec.navigation:
                if name in q.expand:
                    line_spec = SPEC_BY_PATH["generaljournalentry/generaljournalentrylines"]
                    lines = ledger.entries[row["EntryID"]]["lines"]
                    out[name] = {"results": [self._render(line_spec, ln, ledger, environ, Query()) for ln in lines]}
                else:
                    out[name] = {"__deferred": {"uri": f"{uri}/{name}"}}
                continue
            value = row.get(name)
            if name == "Code" and spec.padded_code and self.knobs.pad_codes and value:
                value = f"{value:>8}"  # the pad_codes knob: Exact stores some codes right-aligned (§4.5)
            value = json_value(value)
            if spec.page == "sync" and self.knobs.sync_values_as_strings and isinstance(value, (int, float, bool)):
                value = str(value).lower() if isinstance(value, bool) else str(value)  # §4.5 [?]
            out[name] = value
        return out

    # -- POST / DELETE GeneralJournalEntries (§5.8–§5.11) --------------------------------------------
    def _post_entry(self, ledger: Ledger, environ: dict, body: bytes):
        self._stats["posts"]["attempted"] += 1
        fault = self._take("exact.post_entry")
        if fault == "http_400_before_store":
            raise ODataError(400, "Error processing request stream. The request body could not be read.")
        if fault == "http_500_before_store":
            raise ODataError(500, "An error has occurred.")
        if fault == "http_503_before_store":
            return Reply(503, [("Content-Type", "text/html")], b"<html><body>Service Unavailable</body></html>")
        if fault == "drop_before_store":
            return Reply(0, drop=True)
        if "application/json" not in environ.get("CONTENT_TYPE", ""):
            raise ODataError(415, "Unsupported media type requests.")
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            raise ODataError(400, "Error processing request stream. JSON text specified is not valid.") from None
        try:
            entry = ledger.post_entry(payload, self.knobs, self.clock.now())
        except ODataError:
            self._stats["posts"]["rejected"] += 1
            raise
        self._stats["posts"]["created"] += 1
        self._stats["posts_by_division"][str(ledger.division)] += 1
        header = entry["header"]
        self._queue_webhook(ledger.division, header["EntryID"], "Update", environ)
        if fault == "store_then_http_500":
            raise ODataError(500, "An error has occurred.")
        if fault == "store_then_drop":
            return Reply(0, drop=True)
        spec = SPEC_BY_PATH["generaljournalentry/generaljournalentries"]
        out = self._render(spec, header, ledger, environ, Query())
        if "return=representation" not in environ.get("HTTP_PREFER", ""):
            # §4.1: without Prefer the entity comes back with every property null (keys kept [?])
            out = {k: (v if k in ("__metadata", spec.key) else None) for k, v in out.items()}
        location = [("Location", out["__metadata"]["uri"])]
        if self._wants_json(environ):
            reply = self._json(201, {"d": out}, location)
        else:
            reply = Reply(201, [("Content-Type", "application/atom+xml;type=entry;charset=utf-8"), *location],
                          atom_single(out, self.clock.now()))
        reply.delay = float(self.knobs.post_answer_delay_seconds)
        if fault == "store_then_timeout":
            reply.delay = float(self.knobs.timeout_seconds)
        return reply

    def _delete_entry(self, ledger: Ledger, key: Any, environ: dict) -> Reply:
        entry_id = str(key).lower()
        if entry_id not in ledger.entries:
            raise ODataError(404, "Resource not found for the segment 'GeneralJournalEntries'.")
        del ledger.entries[entry_id]
        self._queue_webhook(ledger.division, entry_id, "Delete", environ)
        return Reply(204)

    # -- webhooks (§8) ---------------------------------------------------------------------------------
    def _queue_webhook(self, division: int, entry_id: str, action: str, environ: dict | None) -> dict:
        base = self._base(environ)
        content = {"Topic": "GeneralJournalEntries", "ClientId": S.EXACT_CLIENT_ID, "Division": division,
                   "Action": action, "Key": entry_id,
                   "ExactOnlineEndpoint": f"{base}/api/v1/{division}/generaljournalentry/"
                                          f"GeneralJournalEntries(guid'{entry_id}')",
                   "EventCreatedOn": self.clock.now().astimezone(AMSTERDAM).replace(tzinfo=None)
                   .isoformat(timespec="milliseconds")}
        content_json = json.dumps(content, separators=(",", ":"))
        # §8: HashCode = uppercase hex HMAC-SHA256 over the raw Content JSON, keyed with the app's webhook secret
        digest = hmac.new(S.EXACT_WEBHOOK_SECRET.encode(), content_json.encode(), hashlib.sha256).hexdigest().upper()
        record = {"content": content, "hash_code": digest,
                  "body": '{"Content":' + content_json + ',"HashCode":"' + digest + '"}', "deliveries": []}
        self._webhooks.append(record)
        for url in self.knobs.webhook_targets:
            self._webhook_queue.put((record, url))
        return record

    def _deliver_webhooks(self) -> None:
        # the worker clears _webhook_thread under the same lock when it finds the queue empty, so nothing strands
        with self._webhook_lock:
            if self._webhook_queue.empty() or self._webhook_thread is not None:
                return
            self._webhook_thread = threading.Thread(target=self._webhook_worker, name="exact-webhooks", daemon=True)
            self._webhook_thread.start()

    def _webhook_worker(self) -> None:
        import httpx  # only needed when a test configures webhook_targets

        while True:
            with self._webhook_lock:
                try:
                    record, url = self._webhook_queue.get_nowait()
                except queue.Empty:
                    self._webhook_thread = None
                    return
            try:
                resp = httpx.post(url, content=record["body"].encode(),
                                  headers={"Content-Type": "application/json"}, timeout=5.0)
                outcome = {"url": url, "status": resp.status_code}
            except httpx.HTTPError as exc:
                outcome = {"url": url, "error": type(exc).__name__}
            with self._lock:
                record["deliveries"].append(outcome)

    # ------------------------------------------------------------------------------------------------
    # Control API and Python helpers (not part of Exact; never rate-limited)
    # ------------------------------------------------------------------------------------------------
    def _control(self, method: str, route: str, environ: dict, body: bytes) -> Reply:
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return self._json(400, {"error": "body must be JSON"})
        params = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        try:
            result = self._control_route(method, route.strip("/"), data, params)
        except (KeyError, ValueError, TypeError) as exc:
            return self._json(400, {"error": str(exc)})
        if result is None:
            return self._json(404, {"error": f"no control route {method} {route}"})
        return self._json(200, _plain(result))

    def _control_route(self, method: str, route: str, data: dict, params: dict) -> Any:
        division = int(data.get("division") or params.get("division") or S.DIVISION)
        parts = route.split("/")
        if method == "GET" and route == "entries":
            divisions = [division] if ("division" in params) else sorted(self.ledgers)
            return {str(d): self.entries(d) for d in divisions}
        if method == "GET" and route == "stats":
            return self.stats
        if method == "GET" and route == "knobs":
            return self.knobs.as_json()
        if method == "POST" and route == "knobs":
            self.set_knobs(**data)
            return self.knobs.as_json()
        if method == "POST" and route == "faults":
            if "rate" in data:
                self.faults.set_rate(data["target"], float(data["rate"]), tuple(data["faults"]), data.get("seed"))
            else:
                self.faults.arm(data["target"], data["fault"], int(data.get("times", 1)))
            return {"ok": True}
        if method == "POST" and route in ("cost_centers", "cost_units"):
            add = self.add_cost_center if route == "cost_centers" else self.add_cost_unit
            end = date.fromisoformat(data["end_date"]) if data.get("end_date") else None
            return add(data["code"], data.get("description"), end_date=end, division=division)
        if method == "POST" and route == "gl_accounts":
            return self.add_gl_account(data["code"], data.get("description"), type_=data.get("type"),
                                       use_costcenter=data.get("use_costcenter"),
                                       use_costunit=data.get("use_costunit"), blocked=data.get("blocked"),
                                       division=division)
        if method == "DELETE" and len(parts) == 2 and parts[0] == "entries":
            return {"deleted": self.delete_entry(parts[1])}
        if method == "PATCH" and len(parts) == 4 and parts[0] == "entries" and parts[2] == "lines":
            return self.patch_line(parts[1], int(parts[3]), amount_fc=data.get("AmountFC"),
                                   cost_center=data.get("CostCenter", ...))
        if method == "POST" and route == "refresh_tokens":
            return self.issue_tokens(refreshable_now=bool(data.get("refreshable_now", False)))
        if method == "GET" and route == "webhooks":
            return self.webhooks
        return None

    def set_knobs(self, **changes: Any) -> None:
        """Change knobs by name (see ExactKnobs); unknown names raise ValueError."""
        with self._lock:
            self.knobs.update(**changes)

    @property
    def stats(self) -> dict:
        """Counters: calls per 'METHOD endpoint' and per division (`calls_by_division`), calls seen in the busiest
        clock minute per division (`max_calls_per_minute`, 429s included), 429s per window in all and per division
        (`rate_limited`, `rate_limited_by_division`), posts in all and created per division (`posts`,
        `posts_by_division`), token refreshes, refusals by reason, errors per 'division endpoint'."""
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._empty_stats()

    @property
    def webhooks(self) -> list[dict]:
        with self._lock:
            return copy.deepcopy(self._webhooks)

    def entries(self, division: int = S.DIVISION) -> list[dict]:
        """Posted entries of a division: header fields plus `lines` (as posted) and `transaction_lines`."""
        with self._lock:
            if division in self._customers and division not in self.ledgers:
                return []  # never used: reading it does not make its books
            out = []
            for entry in self._ledger(division).entries.values():
                out.append({**_plain(entry["header"]), "lines": _plain(entry["lines"]),
                            "transaction_lines": _plain(entry["transaction_lines"])})
            return out

    def gl_account_id(self, code: str, division: int = S.DIVISION) -> str:
        with self._lock:
            return self._ledger(division).gl_accounts[code]["ID"]

    def add_cost_center(self, code: str, description: str | None = None, end_date: date | None = None,
                        division: int = S.DIVISION) -> dict:
        """Add a cost center, or update its description and EndDate (None clears it)."""
        with self._lock:
            return _plain(self._ledger(division).upsert_dimension("costcenter", code, description, end_date,
                                                                  self.clock.now()))

    def add_cost_unit(self, code: str, description: str | None = None, end_date: date | None = None,
                      division: int = S.DIVISION) -> dict:
        with self._lock:
            return _plain(self._ledger(division).upsert_dimension("costunit", code, description, end_date,
                                                                  self.clock.now()))

    def add_gl_account(self, code: str, description: str | None = None, type_: int | None = None, *,
                       use_costcenter: int | None = None, use_costunit: int | None = None,
                       blocked: bool | None = None, division: int = S.DIVISION) -> dict:
        """Add a GL account or change an existing one (e.g. `blocked=True`); returns the row with its ID."""
        with self._lock:
            return _plain(self._ledger(division).upsert_gl_account(
                code, description, type_, use_costcenter=use_costcenter, use_costunit=use_costunit,
                blocked=blocked, now=self.clock.now()))

    def block_gl_account(self, code: str, blocked: bool = True, division: int = S.DIVISION) -> dict:
        return self.add_gl_account(code, blocked=blocked, division=division)

    def _find_entry(self, entry_id: str) -> tuple[Ledger, dict]:
        for ledger in self.ledgers.values():
            if entry_id.lower() in ledger.entries:
                return ledger, ledger.entries[entry_id.lower()]
        raise KeyError(f"no entry {entry_id}")

    def delete_entry(self, entry_id: str) -> str:
        """Delete an entry behind the connector's back (as a bookkeeper would in the UI); fires a Delete webhook."""
        with self._lock:
            ledger, _ = self._find_entry(entry_id)
            del ledger.entries[entry_id.lower()]
            self._queue_webhook(ledger.division, entry_id.lower(), "Delete", None)
        self._deliver_webhooks()
        return entry_id.lower()

    def patch_line(self, entry_id: str, line_no: int, amount_fc: float | None = None, cost_center: Any = ...) -> dict:
        """Edit TransactionLine `line_no` of an entry behind the connector's back (for reconciliation tests)."""
        with self._lock:
            ledger, entry = self._find_entry(entry_id)
            tline = next(t for t in entry["transaction_lines"] if t["LineNumber"] == line_no)
            source = next((ln for ln in entry["lines"] if ln["ID"] == tline.get("_gje_line")), None)
            now = self.clock.now()
            if amount_fc is not None:
                tline["AmountFC"] = float(amount_fc)
                tline["AmountDC"] = round(float(amount_fc) * tline["ExchangeRate"], 2)
                if source is not None and source["VATCode"] is None:
                    source["AmountFC"], source["AmountDC"] = tline["AmountFC"], tline["AmountDC"]
            if cost_center is not ...:
                row = ledger.cost_centers.get(cost_center) if cost_center else None
                for target in filter(None, (tline, source)):
                    target["CostCenter"] = cost_center or None
                    target["CostCenterDescription"] = row["Description"] if row else None
            for target in filter(None, (tline, source)):
                target["Modified"] = now
            tline["Timestamp"] = ledger.bump_timestamp()
            entry["header"]["Modified"] = now
            return _plain(tline)

    def issue_tokens(self, refreshable_now: bool = False) -> dict:
        """A fresh authorized token pair, as if a person consented again (§2.5: the only cure for a dead chain)."""
        with self._lock:
            self._stats["token"]["consents"] += 1
            return self.auth.issue_consent(refreshable_now=refreshable_now)
