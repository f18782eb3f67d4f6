"""ExactClient: reads and posts to Exact Online's REST API with pacing, typed errors and safe POST retries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import httpx

from expensify_exact.api.exact.auth import ExactAuth
from expensify_exact.api.exact.odata import clean_record, guid_literal, has_odata_error, parse_error, string_literal
from expensify_exact.api.exact.paging import iter_pages
from expensify_exact.api.http.client import PacedClient
from expensify_exact.api.http.pacing import ExactRateLimits, RateLimitBoard
from expensify_exact.api.http.redaction import redact_text, redact_url
from expensify_exact.clock import Clock
from expensify_exact.errors import (
    ApiError,
    AuthenticationError,
    ConnectionStopped,
    DivisionAccessError,
    ErrorBudgetExhausted,
    RejectedByApi,
    TransientApiError,
)

SERVICE = "exact"
GJE_PATH = "generaljournalentry/GeneralJournalEntries"
ENTRY_SELECT = ("EntryID", "EntryNumber", "JournalCode", "FinancialYear", "FinancialPeriod", "Currency",
                "Status", "Type", "Division")
TRANSACTION_LINE_SELECT = ("ID", "EntryID", "EntryNumber", "LineNumber", "Date", "FinancialYear",
                           "FinancialPeriod", "JournalCode", "GLAccount", "GLAccountCode", "AmountDC",
                           "AmountFC", "AmountVATFC", "Currency", "VATCode", "CostCenter", "CostUnit",
                           "Description", "Notes", "Status", "Type")
GJE_LINES_PATH = "generaljournalentry/GeneralJournalEntryLines"
ENTRY_LINE_SELECT = ("ID", "EntryID", "EntryNumber", "Description", "GLAccount", "AmountFC", "CostCenter",
                     "CostUnit")
# Keeps each $filter of `EntryID eq guid'…' or …` far below Exact's 6000-character URL cap (§4.4).
ENTRY_IDS_PER_QUERY = 40
# A `$filter` of `or` clauses is cut into batches whose encoded query string stays below this (the sheet's 6000
# characters, §4.4, is stricter than IIS's query-string limit, §13).
MAX_FILTER_CHARS = 5000
BODY_EXCERPT = 500
# Errors an endpoint may earn per division and clock hour before the connector stops calling it (Exact blocks at
# 10, exact-online.md §6); the rest waits for the next hour or run.
ERROR_BUDGET_PER_ENDPOINT = 5
_ENDPOINT = re.compile(r"/api/v1/(?:\d+/)?(?P<endpoint>[A-Za-z]+(?:/[A-Za-z]+)*)")


class ErrorBudget(Protocol):
    """Errors Exact answered per endpoint in the current clock hour, shared by whoever uses the division."""

    def spent(self, endpoint: str) -> int: ...

    def add(self, endpoint: str, status: int | None, message: str) -> int: ...


class MemoryErrorBudget:
    """An ErrorBudget of this process only (when no state DB is given)."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._counts: dict[tuple[str, datetime], int] = {}

    def _hour(self) -> datetime:
        return self._clock.now().replace(minute=0, second=0, microsecond=0)

    def spent(self, endpoint: str) -> int:
        return self._counts.get((endpoint, self._hour()), 0)

    def add(self, endpoint: str, status: int | None, message: str) -> int:
        key = (endpoint, self._hour())
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]


class AnswerKind(StrEnum):
    """What Exact's answer to one POST of an entry says, before anything is looked up (exact-online.md §7, §13)."""

    CREATED = "created"  # 2xx; `entry` is Exact's echo (its EntryID may differ from the one sent)
    REFUSED = "refused"  # 5xx carrying Exact's message (a validation error, normally not stored; look it up to be sure)
    UNKNOWN = "unknown"  # 5xx without a message, a timeout or a dropped connection: it may have landed
    REJECTED = "rejected"  # another 4xx (400, 404, 405, 409, 415, 422, …): the request was not processed
    NOT_SENT = "not_sent"  # still 429 after the waits: not processed


@dataclass(frozen=True)
class PostAnswer:
    """Exact's answer to one POST of an entry: its `AnswerKind`, the echoed entry, the status and Exact's words."""

    kind: AnswerKind
    entry: dict[str, Any] | None = None
    status: int | None = None
    message: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently a GET is sent again after a 5xx or a network error."""

    max_retries: int
    first_seconds: float
    longest_seconds: float

    def seconds_before(self, retry: int) -> float:
        """The wait before retry number `retry` (1, 2, …): doubling from `first_seconds`, capped."""
        return min(self.longest_seconds, self.first_seconds * 2 ** (retry - 1))


class DivisionCheckCache(Protocol):
    """Where a successful division check is remembered for a while (`snapshots.DivisionChecks`)."""

    def fresh(self) -> bool: ...

    def record(self) -> None: ...


class ExactClient(PacedClient):
    """One Exact Online division, reached through a paced, authenticated httpx.Client.

    Every request waits for ExactRateLimits (exact-online.md §6); GETs are retried on 5xx and
    network errors with bounded exponential backoff, POSTs never blindly (see
    `send_general_journal_entry`); 4xx answers are raised at once, because Exact blocks a key
    after 10 errors per endpoint and hour; every error answer counts toward `error_budget`, and an endpoint
    that has earned `errors_per_endpoint` of them this hour is not called again until the next hour.
    """

    def __init__(self, base_url: str, division: int, auth: ExactAuth, clock: Clock,
                 transport: httpx.BaseTransport | None = None, timeout: float = 30.0,
                 max_get_retries: int = 3, daily_reserve: int = 50, *,
                 verify_division: bool = True, backoff_seconds: float = 1.0, max_backoff_seconds: float = 30.0,
                 rate_limit_board: RateLimitBoard | None = None, error_budget: ErrorBudget | None = None,
                 errors_per_endpoint: int = ERROR_BUDGET_PER_ENDPOINT,
                 division_checks: DivisionCheckCache | None = None):
        self.base_url = base_url.rstrip("/")
        self.division = int(division)
        self.rate_limits = ExactRateLimits(daily_reserve=daily_reserve, board=rate_limit_board)
        super().__init__(self.rate_limits, clock, transport, timeout, base_url=self.base_url, auth=auth,
                         headers={"Accept": "application/json"})  # else Exact answers Atom XML (§4.1)
        self._retries = Backoff(max_get_retries, backoff_seconds, max_backoff_seconds)
        self._verify_division = verify_division
        self._division_checked = False
        self._division_checks = division_checks
        self.error_budget = error_budget or MemoryErrorBudget(clock)
        self.errors_per_endpoint = errors_per_endpoint

    def __repr__(self) -> str:
        return f"ExactClient(base_url={self.base_url!r}, division={self.division})"

    # --- divisions -------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """The authorized user (`current/Me`), including `CurrentDivision` (exact-online.md §3).

        Raises:
            ApiError: or a subclass, see `get_all`.
        """
        rows = self._collect("/api/v1/current/Me", {})
        if not rows:
            raise ApiError(SERVICE, "current/Me returned no user")
        return rows[0]

    def divisions(self, via_division: int | None = None) -> list[dict[str, Any]]:
        """Divisions this authorization can reach (`system/Divisions`, exact-online.md §3).

        Args:
            via_division: the division to put in the URL; defaults to the configured one.
                Asking through `CurrentDivision` works even when the configured one is wrong.
        """
        division = self.division if via_division is None else via_division
        # `Main` is not selectable on system/Divisions (400, exact-online.md §3).
        return self._collect(f"/api/v1/{division}/system/Divisions", {"$select": "Code,Description,Current"})

    def check_division(self) -> None:
        """Verify the configured division is reachable; done automatically before first use.

        Raises:
            DivisionAccessError: it is not; the message lists the divisions that are.
        """
        me = self.me()
        current = me.get("CurrentDivision")
        available = self.divisions(via_division=current if current is not None else self.division)
        codes = {int(d["Code"]) for d in available if str(d.get("Code", "")).strip().lstrip("-").isdigit()}
        if self.division not in codes:
            listing = ", ".join(f"{int(d['Code'])} ({d.get('Description') or '?'})" for d in available) or "none"
            raise DivisionAccessError(
                SERVICE, f"division {self.division} is not accessible with this authorization. Available: "
                         f"{listing}. Set the connection's division to one of these, or re-authorize and grant "
                         f"division {self.division} on Exact's consent screen")
        self._division_checked = True
        if self._division_checks is not None:
            self._division_checks.record()

    # --- reading ---------------------------------------------------------------------------

    def get_all(self, path: str, select: Sequence[str], filter: str | None = None,
                orderby: str | None = None) -> list[dict[str, Any]]:
        """All rows of a division collection, following `__next` to the end.

        Args:
            path: the endpoint below the division, e.g. `financial/GLAccounts`.
            select: the fields to return; always sent, since some endpoints refuse queries
                without it and unselected fields cost bandwidth (exact-online.md §4.6).
            filter: an OData `$filter` built with the odata literal helpers.
            orderby: an OData `$orderby`.

        Returns:
            Rows with `/Date(ms)/` values as Amsterdam datetimes and padded codes stripped.

        Raises:
            DivisionAccessError: the division is not reachable.
            TransientApiError: 5xx/network errors outlasted the retries, or 429s did.
            RateLimitExhausted: the daily budget (minus the reserve) is used up.
            ApiError: any other refusal, e.g. a 400 for a bad query.
        """
        return list(self.iter_rows(path, select, filter=filter, orderby=orderby))

    def iter_rows(self, path: str, select: Sequence[str], filter: str | None = None,
                  orderby: str | None = None) -> Iterator[dict[str, Any]]:
        """Like `get_all`, but yields rows page by page."""
        if not select:
            raise ValueError("select must name at least one field")
        params = {"$select": ",".join(select)}
        if filter:
            params["$filter"] = filter
        if orderby:
            params["$orderby"] = orderby
        self._ensure_division()
        for page in iter_pages(self._get, self._division_path(path), params):
            for row in page:
                yield clean_record(row)

    def get_entry(self, entry_id: str) -> dict[str, Any] | None:
        """A general journal entry by its EntryID, or None if Exact does not have it.

        Asks with `$filter=EntryID eq guid'…'` rather than the key path: a missing entry is then an
        empty page, not a 404, and 404s count toward Exact's 10-errors-per-endpoint-and-hour block
        (exact-online.md §6), which would also stop the POSTs on that endpoint.

        Raises:
            ApiError: or a subclass, as for `get_all`.
        """
        self._ensure_division()
        params = {"$select": ",".join(ENTRY_SELECT), "$filter": f"EntryID eq {guid_literal(entry_id)}"}
        response = self._get(self._division_path(GJE_PATH), params, allow_404=True)
        if response.status_code == 404:
            return None
        d = response.json().get("d")
        if isinstance(d, dict) and isinstance(d.get("results"), list):
            d = d["results"][0] if d["results"] else None
        return clean_record(d) if d else None

    def transaction_lines(self, entry_ids: Iterable[str],
                          select: Sequence[str] = TRANSACTION_LINE_SELECT) -> list[dict[str, Any]]:
        """The booked lines (`financialtransaction/TransactionLines`) of the given entries (§5.12)."""
        ids = list(dict.fromkeys(str(e) for e in entry_ids))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), ENTRY_IDS_PER_QUERY):
            chunk = ids[start:start + ENTRY_IDS_PER_QUERY]
            flt = " or ".join(f"EntryID eq {guid_literal(e)}" for e in chunk)
            rows.extend(self.get_all("financialtransaction/TransactionLines", select, filter=flt))
        return rows

    def sync_rows(self, path: str, select: Sequence[str], since: int = 1) -> list[dict[str, Any]]:
        """Every row of a `sync/…` endpoint changed after row version `since` (`Timestamp gt {since}L`, 1000 a page,
        exact-online.md §4.3), in Timestamp order; `Timestamp` is always selected. Sync endpoints take no other
        filter, and reading them satisfies mandatory filtering (§4.6, §13)."""
        fields = list(dict.fromkeys(["Timestamp", *select]))
        rows = self.get_all(path, fields, filter=f"Timestamp gt {int(since)}L")
        for row in rows:
            row["Timestamp"] = int(row["Timestamp"])  # sync may send numbers as strings (§4.5)
        return rows

    def entry_lines_by_description(self, descriptions: Iterable[str],
                                   select: Sequence[str] = ENTRY_LINE_SELECT) -> list[dict[str, Any]]:
        """The general journal entry lines whose Description equals one of `descriptions`, exactly.

        `generaljournalentry/GeneralJournalEntryLines` has no sync twin (exact-online.md §5.1), so mandatory
        filtering does not apply to it under any reading (§4.6, §13); an equality filter on a string Exact stores as
        sent is plain OData v2 (§4.4). Batched so no query string grows past MAX_FILTER_CHARS.

        Raises:
            ApiError: as for `get_all`; a 400 means Exact refused this kind of query.
        """
        clauses = [f"Description eq {string_literal(d)}" for d in dict.fromkeys(descriptions) if d]
        rows: list[dict[str, Any]] = []
        for flt in _or_batches(clauses):
            rows.extend(self.get_all(GJE_LINES_PATH, select, filter=flt))
        return rows

    # --- writing ---------------------------------------------------------------------------

    def send_general_journal_entry(self, body: Mapping[str, Any]) -> PostAnswer:
        """POST one general journal entry, once, and say what the answer means (see PostAnswer).

        Never retried here and never looked up here: whether an entry whose fate is open landed is decided by
        `settlement`, by keys Exact certainly stores.

        Raises:
            ErrorBudgetExhausted: this hour's error budget of the endpoint is spent; nothing was sent.
            RateLimitExhausted: the daily budget is used up; nothing was sent.
            AuthenticationError: still 401 after one token refresh; nothing was processed.
            ConnectionStopped, DivisionAccessError: 403 (the Reason says why); nothing was processed.
        """
        self._ensure_division()
        url = self._division_path(GJE_PATH)
        self._check_error_budget(url)
        try:
            response = self._http.post(url, json=dict(body), headers={"Prefer": "return=representation"})
        except httpx.TransportError as exc:
            return PostAnswer(AnswerKind.UNKNOWN, message=f"the POST failed with {type(exc).__name__}")
        if response.status_code in (200, 201):
            entry = clean_record(response.json().get("d") or {})
            if entry.get("EntryNumber") is None and entry.get("EntryID"):
                # Without Prefer: return=representation Exact returns nulls (§4.1); read it back.
                entry = self.get_entry(str(entry["EntryID"])) or entry
            return PostAnswer(AnswerKind.CREATED, entry=entry, status=response.status_code)
        self._count_error(response)
        message, reason = parse_error(response)
        message = redact_text(message, limit=BODY_EXCERPT)
        status = response.status_code
        if status == 429:
            return PostAnswer(AnswerKind.NOT_SENT, status=status, message=message)
        if status >= 500:
            kind = AnswerKind.REFUSED if has_odata_error(response) else AnswerKind.UNKNOWN
            return PostAnswer(kind, status=status, message=message, reason=reason)
        if status in (401, 403):
            raise self._error_for(response)
        return PostAnswer(AnswerKind.REJECTED, status=status, message=message, reason=reason)

    def delete_general_journal_entry(self, entry_id: str) -> None:
        """Delete a general journal entry by key (DELETE answers 204, exact-online.md §4.1, §5); only
        `preflight --write-test` does this, to remove its own test entry.

        Raises:
            ApiError: or a subclass; a 404 means there is no such entry.
        """
        self._ensure_division()
        response = self._http.delete(self._division_path(f"{GJE_PATH}({guid_literal(entry_id)})"))
        if response.status_code not in (200, 204):
            raise self._error_for(response)

    # --- internals -------------------------------------------------------------------------

    def _ensure_division(self) -> None:
        if self._verify_division and not self._division_checked:
            if self._division_checks is not None and self._division_checks.fresh():
                self._division_checked = True  # checked recently; a lost access still fails with 403
                return
            self.check_division()

    def _division_path(self, path: str) -> str:
        return f"/api/v1/{self.division}/{path.lstrip('/')}"

    def _collect(self, url: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        return [clean_record(row) for page in iter_pages(self._get, url, params) for row in page]

    def _get(self, url: str, params: Mapping[str, str] | None, allow_404: bool = False) -> httpx.Response:
        """GET with bounded retries on 5xx and network errors; raises a typed error otherwise."""
        attempt = 0
        while True:
            self._check_error_budget(url)
            try:
                response = self._http.get(url, params=params)
            except httpx.TransportError as exc:
                if attempt >= self._retries.max_retries:
                    raise TransientApiError(SERVICE, f"GET {redact_url(url)} failed after {attempt + 1} attempts: "
                                                     f"{type(exc).__name__}") from exc
            else:
                if response.status_code < 400:
                    return response
                self._count_error(response)
                if allow_404 and response.status_code == 404:
                    return response
                if response.status_code < 500 or attempt >= self._retries.max_retries:
                    raise self._error_for(response)
            self._clock.sleep(self._retries.seconds_before(attempt + 1))
            attempt += 1

    def _check_error_budget(self, url: str) -> None:
        endpoint = _endpoint_of(url)
        spent = self.error_budget.spent(endpoint)
        if spent >= self.errors_per_endpoint:
            raise ErrorBudgetExhausted(
                SERVICE, f"Exact answered {spent} errors on {endpoint} in division {self.division} this hour; the "
                         f"connector stops calling it until the next clock hour (Exact blocks an app at 10). "
                         f"See `expensify-exact status`", status=None)

    def _count_error(self, response: httpx.Response) -> None:
        """Count an error answer toward the endpoint's hourly budget as Exact counts it: a 4xx other than 429 (a
        wait), or a 5xx in which Exact itself answered (a validation error); an outage page is not the app's error."""
        status = response.status_code
        if (400 <= status < 500 and status != 429) or (status >= 500 and has_odata_error(response)):
            message, _ = parse_error(response)
            self.error_budget.add(_endpoint_of(str(response.request.url)), response.status_code,
                                  redact_text(message, limit=BODY_EXCERPT))

    def _error_for(self, response: httpx.Response) -> ApiError:
        """Exact's answer as a typed, secret-free exception (exact-online.md §7)."""
        message, reason = parse_error(response)
        status = response.status_code
        method = response.request.method
        where = f"{method} {redact_url(response.request.url)}"
        kw = {"status": status, "reason": reason,
              "body_excerpt": redact_text(response.text, limit=BODY_EXCERPT) or None}
        text = f"{where}: {redact_text(message, limit=BODY_EXCERPT)}"
        if status == 401:
            return AuthenticationError(SERVICE, text, **kw)
        if status == 403 and reason and "division" in reason.lower():
            return DivisionAccessError(SERVICE, f"{text}; division {self.division} is not reachable with this "
                                                "authorization (re-authorize and grant it, or fix the "
                                                "configured division)", **kw)
        if status == 403:
            return ConnectionStopped(SERVICE, f"{text}; Exact refuses this connection (Reason: {reason or 'none'})"
                                              f"; nothing more is sent through it in this run", **kw)
        if status == 429:
            return TransientApiError(SERVICE, f"{text}; rate limit still exceeded after retries "
                                              f"({self.rate_limits.status()})", **kw)
        if status == 500 and method == "POST":
            return RejectedByApi(SERVICE, text, **kw)
        if status >= 500:
            return TransientApiError(SERVICE, text, **kw)
        return ApiError(SERVICE, text, **kw)


def _endpoint_of(url: str) -> str:
    """`…/api/v1/123/financial/GLAccounts(guid'…')?…` → `financial/GLAccounts` (what Exact counts errors by)."""
    match = _ENDPOINT.search(url)
    return match.group("endpoint") if match else url.split("?", 1)[0]


def _or_batches(clauses: Sequence[str], limit: int = MAX_FILTER_CHARS) -> Iterator[str]:
    """`a or b or …` filters, each short enough once URL-encoded (a GUID clause roughly doubles in length)."""
    batch: list[str] = []
    size = 0
    for clause in clauses:
        cost = len(httpx.QueryParams({"f": clause}).__str__()) + 8
        if batch and size + cost > limit:
            yield " or ".join(batch)
            batch, size = [], 0
        batch.append(clause)
        size += cost
    if batch:
        yield " or ".join(batch)
