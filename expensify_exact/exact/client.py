"""ExactClient: reads and posts to Exact Online's REST API with pacing, typed errors and safe POST retries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import httpx

from expensify_exact.clock import Clock
from expensify_exact.errors import (
    ApiError,
    AuthenticationError,
    DivisionAccessError,
    RejectedByApi,
    TransientApiError,
)
from expensify_exact.exact.auth import ExactAuth
from expensify_exact.exact.odata import clean_record, guid_literal, has_odata_error, parse_error
from expensify_exact.exact.paging import iter_pages
from expensify_exact.http.pacing import ExactRateLimits, PacedTransport, RateLimitBoard
from expensify_exact.http.redaction import redact_text, redact_url

SERVICE = "exact"
GJE_PATH = "generaljournalentry/GeneralJournalEntries"
ENTRY_SELECT = ("EntryID", "EntryNumber", "JournalCode", "FinancialYear", "FinancialPeriod", "Currency",
                "Status", "Type", "Division")
TRANSACTION_LINE_SELECT = ("ID", "EntryID", "EntryNumber", "LineNumber", "Date", "FinancialYear",
                           "FinancialPeriod", "JournalCode", "GLAccount", "GLAccountCode", "AmountDC",
                           "AmountFC", "AmountVATFC", "Currency", "VATCode", "CostCenter", "CostUnit",
                           "Description", "Notes", "Status", "Type")
# Keeps each $filter of `EntryID eq guid'…' or …` far below Exact's 6000-character URL cap (§4.4).
ENTRY_IDS_PER_QUERY = 40
BODY_EXCERPT = 500


class ExactClient:
    """One Exact Online division, reached through a paced, authenticated httpx.Client.

    Every request waits for ExactRateLimits (exact-online.md §6); GETs are retried on 5xx and
    network errors with bounded exponential backoff, POSTs never blindly (see
    `post_general_journal_entry`); 4xx answers are raised at once, because Exact blocks a key
    after 10 errors per endpoint and hour.
    """

    def __init__(self, base_url: str, division: int, auth: ExactAuth, clock: Clock,
                 transport: httpx.BaseTransport | None = None, timeout: float = 30.0,
                 max_get_retries: int = 3, daily_reserve: int = 50, *,
                 verify_division: bool = True, backoff_seconds: float = 1.0, max_backoff_seconds: float = 30.0,
                 rate_limit_board: RateLimitBoard | None = None):
        self.base_url = base_url.rstrip("/")
        self.division = int(division)
        self.rate_limits = ExactRateLimits(daily_reserve=daily_reserve, board=rate_limit_board)
        self._clock = clock
        self._max_get_retries = max_get_retries
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._verify_division = verify_division
        self._division_checked = False
        paced = PacedTransport(transport or httpx.HTTPTransport(retries=2), self.rate_limits, clock)
        self._http = httpx.Client(base_url=self.base_url, auth=auth, transport=paced, timeout=timeout,
                                  headers={"Accept": "application/json"})  # else Exact answers Atom XML (§4.1)

    def __repr__(self) -> str:
        return f"ExactClient(base_url={self.base_url!r}, division={self.division})"

    @property
    def calls_made(self) -> int:
        """HTTP answers received so far (including 401 and 429 answers that were retried)."""
        return self.rate_limits.calls_made

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ExactClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # --- writing ---------------------------------------------------------------------------

    def post_general_journal_entry(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a general journal entry, at most once.

        The body must carry a client-made `EntryID`. If the answer is lost or is a 5xx (timeout,
        dropped connection, 500, 503, …), Exact is asked by that EntryID whether the entry landed
        before anything else happens (exact-online.md §7); if it did, it is returned.

        Args:
            body: the GeneralJournalEntries POST body (§5.10), including `EntryID`.

        Returns:
            The created entry, with at least `EntryID` and `EntryNumber`.

        Raises:
            RejectedByApi: Exact refused the entry (HTTP 500 with an error message, e.g. unbalanced)
                and it did not land.
            TransientApiError: it did not land, or its fate is unknown; posting again later with
                the same EntryID is safe.
            DivisionAccessError, AuthenticationError, RateLimitExhausted, ApiError: see `get_all`.
        """
        entry_id = body.get("EntryID")
        if not entry_id:
            raise ValueError("the entry needs a client-made EntryID: it is what makes a re-post safe")
        guid_literal(entry_id)  # fails fast on a malformed GUID
        self._ensure_division()
        url = self._division_path(GJE_PATH)
        try:
            response = self._http.post(url, json=dict(body), headers={"Prefer": "return=representation"})
        except httpx.TransportError as exc:
            return self._landed_or_raise(str(entry_id), f"the POST failed with {type(exc).__name__}", exc)
        if response.status_code in (200, 201):
            entry = clean_record(response.json().get("d") or {})
            if entry.get("EntryNumber") is None:
                # Without Prefer: return=representation Exact returns nulls (§4.1); read it back.
                entry = self.get_entry(str(entry_id)) or entry
            return entry
        if response.status_code >= 500:
            # Even a 500 with Exact's message is checked first: a rejection must not be recorded
            # for an entry that landed anyway.
            rejection = self._error_for(response) if has_odata_error(response) else None
            return self._landed_or_raise(str(entry_id), f"the POST got HTTP {response.status_code}", None,
                                         rejection=rejection)
        raise self._error_for(response)

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

    def _landed_or_raise(self, entry_id: str, what: str, cause: BaseException | None,
                         rejection: ApiError | None = None) -> dict[str, Any]:
        try:
            landed = self.get_entry(entry_id)
        except (TransientApiError, httpx.TransportError) as exc:
            raise TransientApiError(SERVICE, f"{what}, and checking whether entry {entry_id} landed failed too; "
                                             "its fate is unknown: look it up by EntryID before posting "
                                             "again") from (cause or exc)
        if landed is not None:
            return landed
        if rejection is not None:
            raise rejection
        raise TransientApiError(SERVICE, f"{what}; entry {entry_id} did not land, so it may be posted again "
                                         "with the same EntryID") from cause

    def _ensure_division(self) -> None:
        if self._verify_division and not self._division_checked:
            self.check_division()

    def _division_path(self, path: str) -> str:
        return f"/api/v1/{self.division}/{path.lstrip('/')}"

    def _collect(self, url: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        return [clean_record(row) for page in iter_pages(self._get, url, params) for row in page]

    def _get(self, url: str, params: Mapping[str, str] | None, allow_404: bool = False) -> httpx.Response:
        """GET with bounded retries on 5xx and network errors; raises a typed error otherwise."""
        attempt = 0
        while True:
            try:
                response = self._http.get(url, params=params)
            except httpx.TransportError as exc:
                if attempt >= self._max_get_retries:
                    raise TransientApiError(SERVICE, f"GET {redact_url(url)} failed after {attempt + 1} attempts: "
                                                     f"{type(exc).__name__}") from exc
            else:
                if response.status_code < 400 or (allow_404 and response.status_code == 404):
                    return response
                if response.status_code < 500 or attempt >= self._max_get_retries:
                    raise self._error_for(response)
            self._clock.sleep(min(self._max_backoff, self._backoff * 2 ** attempt))
            attempt += 1

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
        if status == 429:
            return TransientApiError(SERVICE, f"{text}; rate limit still exceeded after retries "
                                              f"({self.rate_limits.status()})", **kw)
        if status == 500 and method == "POST":
            return RejectedByApi(SERVICE, text, **kw)
        if status >= 500:
            return TransientApiError(SERVICE, text, **kw)
        return ApiError(SERVICE, text, **kw)
