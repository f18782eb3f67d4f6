"""ExactClient against scripted Exact answers (httpx.MockTransport) and, when present, the sandbox simulator.

The client must read every page exactly once, post every entry at most once even when answers get
lost, and turn Exact's refusals into typed, secret-free errors without hammering the API.
"""

import json
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs

import httpx
import pytest

from expensify_exact.api.exact.auth import ExactAuth, TokenRefresher
from expensify_exact.api.exact.client import ExactClient
from expensify_exact.api.exact.odata import AMSTERDAM
from expensify_exact.api.exact.tokens import ExactTokens, InMemoryTokenStore
from expensify_exact.core.connections import StoredRateLimitBoard
from expensify_exact.core.settlement import find_posted, post_and_settle
from expensify_exact.errors import (
    ApiError,
    ConnectionStopped,
    DivisionAccessError,
    ErrorBudgetExhausted,
    RateLimitExhausted,
    TransientApiError,
)
from tests.factories import FakeClock as _FakeClock

BASE = "https://start.exactonline.nl"
DIV = 123456
T0 = datetime(2024, 5, 13, 8, 0, tzinfo=timezone.utc)


def FakeClock(start: datetime = T0) -> _FakeClock:
    return _FakeClock(start)


ENTRY = "8c1f2d3e-0000-4000-8000-000000000001"
SECRET = "client-secret-value"


def odata_error(status: int, message: str, reason: str | None = None) -> httpx.Response:
    headers = {"Reason": reason} if reason else {}
    return httpx.Response(status, headers=headers,
                          json={"error": {"code": "", "message": {"lang": "", "value": message}}})


class FakeExact:
    """A scripted Exact: Me, Divisions, paged collections, GeneralJournalEntries by key and POST.

    `routes` maps (method, path) to a list of responses or callables, consumed in order; the default
    handlers answer Me/Divisions and entries stored in `entries`.
    """

    def __init__(self, divisions=(DIV,)):
        self.divisions = divisions
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], list] = {}
        self.entries: dict[str, dict] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/api/oauth2/token":
            raise AssertionError("no refresh expected")
        key = (request.method, request.url.path)
        if self.routes.get(key):
            answer = self.routes[key].pop(0)
            return answer(request) if callable(answer) else answer
        path = request.url.path
        if path == "/api/v1/current/Me":
            return httpx.Response(200, json={"d": {"results": [{"CurrentDivision": self.divisions[0],
                                                                "FullName": "Test User"}]}})
        if path.endswith("/system/Divisions"):
            return httpx.Response(200, json={"d": {"results": [
                {"Code": d, "Description": f"Company {d}", "Current": i == 0} for i, d in enumerate(self.divisions)]}})
        if path.endswith("/GeneralJournalEntries") and request.method == "GET":
            match = re.fullmatch(r"EntryID eq guid'([0-9a-f-]+)'", query(request).get("$filter", ""))
            entry = self.entries.get(match.group(1)) if match else None
            return httpx.Response(200, json={"d": {"results": [entry] if entry else []}})
        if path.endswith("/GeneralJournalEntries") and request.method == "POST":
            return self.store_entry(request)
        return odata_error(404, f"no route for {path}")

    def store_entry(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        entry = {"EntryID": body["EntryID"], "EntryNumber": 24900000 + len(self.entries) + 1,
                 "JournalCode": body.get("JournalCode"), "Created": "/Date(1710507600000)/"}
        self.entries[body["EntryID"]] = entry
        return httpx.Response(201, json={"d": entry})

    def api_requests(self, path_part: str = "", method: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if path_part in r.url.path and (method is None or r.method == method)]


def make_client(app, clock=None, **kw) -> ExactClient:
    clock = clock or FakeClock()
    store = InMemoryTokenStore({"c": ExactTokens("access-secret-1", "refresh-secret-1",
                                                 clock.now() + timedelta(seconds=600), clock.now())})
    refresher = TokenRefresher(store, "c", f"{BASE}/api/oauth2/token", "cid", SECRET, clock,
                               transport=httpx.MockTransport(app))
    return ExactClient(BASE, DIV, ExactAuth(refresher), clock, transport=httpx.MockTransport(app), **kw)


def query(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}


# --- reading -----------------------------------------------------------------------------------

def page(rows, next_url=None):
    d = {"results": rows}
    if next_url:
        d["__next"] = next_url
    return httpx.Response(200, json={"d": d})


def test_get_all_follows_next_verbatim_including_the_empty_page_after_a_full_one():
    app = FakeExact()
    path = f"/api/v1/{DIV}/financial/GLAccounts"
    next1 = f"{BASE}{path}?$select=Code,Description&$skiptoken=guid'00000000-0000-0000-0000-000000000002'"
    next2 = f"{BASE}{path}?$select=Code,Description&$skiptoken=guid'00000000-0000-0000-0000-000000000004'"
    app.routes[("GET", path)] = [
        page([{"Code": "  1", "Description": "a"}, {"Code": "  2", "Description": "b"}], next1),
        page([{"Code": "  3", "Description": "c"}, {"Code": "  4", "Description": "d"}], next2),
        page([]),  # a full last page still had __next (§4.3)
    ]
    with make_client(app) as client:
        rows = client.get_all("financial/GLAccounts", select=["Code", "Description"], filter="Blocked eq false")
    assert [r["Code"] for r in rows] == ["1", "2", "3", "4"]
    gets = app.api_requests("GLAccounts")
    assert query(gets[0]) == {"$select": "Code,Description", "$filter": "Blocked eq false"}
    # later pages are the link exactly, without the first query's options appended again
    assert [str(r.url) for r in gets[1:]] == [str(httpx.URL(next1)), str(httpx.URL(next2))]
    assert all(r.headers["Accept"] == "application/json" for r in app.requests)


def test_two_interleaved_queries_keep_their_own_paging_state():
    app = FakeExact()
    a, b = f"/api/v1/{DIV}/financial/GLAccounts", f"/api/v1/{DIV}/hrm/Costcenters"
    app.routes[("GET", a)] = [page([{"Code": "A1"}], f"{BASE}{a}?$skiptoken=1"), page([{"Code": "A2"}])]
    app.routes[("GET", b)] = [page([{"Code": "B1"}], f"{BASE}{b}?$skiptoken=1"), page([{"Code": "B2"}])]
    with make_client(app) as client:
        ia = client.iter_rows("financial/GLAccounts", ["Code"])
        ib = client.iter_rows("hrm/Costcenters", ["Code"])
        got = [next(ia)["Code"], next(ib)["Code"], next(ia)["Code"], next(ib)["Code"]]
    assert got == ["A1", "B1", "A2", "B2"]


def test_rows_get_amsterdam_datetimes():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/FinancialPeriods")] = [
        page([{"StartDate": "/Date(1640995200000)/", "FinYear": 2022}])]
    with make_client(app) as client:
        rows = client.get_all("financial/FinancialPeriods", ["StartDate", "FinYear"])
    assert rows == [{"StartDate": datetime(2022, 1, 1, tzinfo=AMSTERDAM), "FinYear": 2022}]


@pytest.mark.parametrize("link, ok", [
    ("../financial/GLAccounts?$skiptoken=2", True),                          # relative form from the docs
    ("https://evil.example/api/v1/1/financial/GLAccounts?$skiptoken=2", False),  # never send the token elsewhere
])
def test_next_links_are_resolved_but_never_leave_the_host(link, ok):
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [page([{"Code": "1"}], link), page([{"Code": "2"}])]
    with make_client(app) as client:
        if ok:
            assert len(client.get_all("financial/GLAccounts", ["Code"])) == 2
        else:
            with pytest.raises(ApiError, match="another host"):
                client.get_all("financial/GLAccounts", ["Code"])


def test_division_is_checked_once_and_a_wrong_one_names_the_available_ones():
    app = FakeExact(divisions=(111, 222))
    with make_client(app) as client:
        with pytest.raises(DivisionAccessError) as info:
            client.get_all("financial/GLAccounts", ["Code"])
    assert "123456" in str(info.value) and "111 (Company 111)" in str(info.value) and "222" in str(info.value)
    assert not app.api_requests("GLAccounts")  # nothing division-bound was sent

    ok = FakeExact()
    with make_client(ok) as client:
        ok.routes[("GET", f"/api/v1/{DIV}/financial/Journals")] = [page([]), page([])]
        client.get_all("financial/Journals", ["Code"])
        client.get_all("financial/Journals", ["Code"])
    assert len(ok.api_requests("current/Me")) == 1


def test_403_no_division_access_is_a_division_error():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [odata_error(403, "Forbidden", "NoDivisionAccess")]
    with make_client(app) as client:
        with pytest.raises(DivisionAccessError, match="NoDivisionAccess"):
            client.get_all("financial/GLAccounts", ["Code"])


@pytest.mark.parametrize("status, message, reason", [
    (400, "Please add a $select or a $top=1 statement to the query string.", None),  # mandatory $select
    (404, "Not found", None),                                                         # unknown endpoint
    (403, "Forbidden", "LicenseExpired"),                                            # licence problem
])
def test_4xx_is_raised_at_once_with_exacts_message_and_reason(status, message, reason):
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [odata_error(status, message, reason)] * 5
    with make_client(app, verify_division=False) as client:
        with pytest.raises(ApiError) as info:
            client.get_all("financial/GLAccounts", ["Code"])
    assert type(info.value) is (ConnectionStopped if status == 403 else ApiError)
    assert message in str(info.value) and info.value.status == status and info.value.reason == reason
    assert len(app.api_requests("GLAccounts")) == 1  # no retry: 4xx count toward Exact's error limit


def test_get_retries_5xx_and_network_errors_with_exponential_backoff():
    app = FakeExact()
    clock = FakeClock()

    def drop(request):
        raise httpx.ConnectError("connection reset")

    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [
        httpx.Response(503), drop, odata_error(500, "Internal error"), page([{"Code": "1"}])]
    with make_client(app, clock=clock, verify_division=False) as client:
        assert client.get_all("financial/GLAccounts", ["Code"]) == [{"Code": "1"}]
    assert clock.sleeps == [1.0, 2.0, 4.0]


def test_get_gives_up_after_max_retries_with_a_transient_error():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [httpx.Response(503)] * 10
    with make_client(app, max_get_retries=2, verify_division=False) as client:
        with pytest.raises(TransientApiError):
            client.get_all("financial/GLAccounts", ["Code"])
    assert len(app.api_requests("GLAccounts")) == 3


def test_429_with_only_minutely_headers_is_waited_out():
    app = FakeExact()
    clock = FakeClock(datetime(2024, 5, 13, 8, 18, 25, tzinfo=timezone.utc))
    reset = datetime(2024, 5, 13, 8, 19, tzinfo=timezone.utc)
    times: list[datetime] = []

    def limited(request):
        times.append(clock.now())
        return httpx.Response(429, headers={"X-RateLimit-Minutely-Remaining": "0",
                                            "X-RateLimit-Minutely-Reset": str(int(reset.timestamp() * 1000))})

    def ok(request):
        times.append(clock.now())
        return page([{"Code": "1"}])

    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [limited, ok]
    with make_client(app, clock=clock, verify_division=False) as client:
        assert len(client.get_all("financial/GLAccounts", ["Code"])) == 1
        assert client.rate_limits.remaining_daily is None  # absent, so unknown rather than 0
    assert times[1] == reset + timedelta(seconds=1)


def test_429_after_the_transport_retries_is_transient():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [httpx.Response(429)] * 10
    with make_client(app, verify_division=False) as client:
        with pytest.raises(TransientApiError, match="rate limit"):
            client.get_all("financial/GLAccounts", ["Code"])
    assert len(app.api_requests("GLAccounts")) == 4


def test_daily_reserve_stops_before_sending():
    app = FakeExact()
    reset = datetime(2024, 5, 14, tzinfo=timezone.utc)
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [
        httpx.Response(200, headers={"X-RateLimit-Remaining": "10", "X-RateLimit-Reset": str(int(reset.timestamp() * 1000))},
                       json={"d": {"results": [{"Code": "1"}]}})]
    with make_client(app, verify_division=False, daily_reserve=10) as client:
        client.get_all("financial/GLAccounts", ["Code"])
        with pytest.raises(RateLimitExhausted) as info:
            client.get_all("financial/GLAccounts", ["Code"])
        assert client.calls_made == 1
    assert info.value.resets_at == reset


def test_transaction_lines_filter_by_entry_ids():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financialtransaction/TransactionLines")] = [page([{"EntryID": ENTRY}])]
    with make_client(app, verify_division=False) as client:
        assert client.transaction_lines([ENTRY, ENTRY]) == [{"EntryID": ENTRY}]
    assert query(app.api_requests("TransactionLines")[0])["$filter"] == f"EntryID eq guid'{ENTRY}'"


# --- posting -----------------------------------------------------------------------------------

BODY = {"EntryID": ENTRY, "JournalCode": "90", "GeneralJournalEntryLines": [
    {"GLAccount": "3c534e79-c4fe-44d2-9765-00b30573c2de", "AmountFC": 100.0},
    {"GLAccount": "4c534e79-c4fe-44d2-9765-00b30573c2de", "AmountFC": -100.0}]}


def test_post_returns_entry_id_and_number_and_asks_for_the_representation():
    app = FakeExact()
    with make_client(app, verify_division=False) as client:
        answer = client.send_general_journal_entry(BODY)
    assert answer.kind == "created" and answer.entry["EntryID"] == ENTRY and answer.entry["EntryNumber"] == 24900001
    post = app.api_requests("GeneralJournalEntries", "POST")[0]
    assert post.headers["Prefer"] == "return=representation"
    assert post.headers["Content-Type"] == "application/json"
    assert json.loads(post.content) == BODY


@pytest.mark.parametrize("failure,kind,status", [
    ("timeout", "unknown", None), ("dropped", "unknown", None), ("502", "unknown", 502),
    ("500_with_message", "refused", 500), ("400", "rejected", 400), ("404", "rejected", 404),
    ("409", "rejected", 409), ("415", "rejected", 415), ("422", "rejected", 422),
])
def test_every_answer_to_a_post_is_classified_and_nothing_is_retried_or_looked_up_here(failure, kind, status):
    app = FakeExact()

    def answer(request):
        if failure == "timeout":
            raise httpx.ReadTimeout("read timed out")
        if failure == "dropped":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if failure == "502":
            return httpx.Response(502, text="<html>Bad gateway</html>")
        if failure == "500_with_message":
            return odata_error(500, "This entry is not balanced on: 2024 / 03 (Type: Other) - Difference: EUR 1,00")
        return odata_error(int(failure), "Bad Request - Error in query syntax.")

    app.routes[("POST", f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntries")] = [answer]
    with make_client(app, verify_division=False) as client:
        result = client.send_general_journal_entry(BODY)
        spent = client.error_budget.spent("generaljournalentry/GeneralJournalEntries")
    assert (result.kind, result.status) == (kind, status)
    if failure == "500_with_message":
        assert result.message.startswith("This entry is not balanced")
    assert len(app.api_requests("GeneralJournalEntries", "POST")) == 1
    assert app.api_requests("GeneralJournalEntries", "GET") == []
    assert spent == (0 if failure in ("timeout", "dropped", "502") else 1)  # what Exact counts: not outages


def test_a_403_on_post_stops_the_connection_with_the_reason():
    app = FakeExact()
    app.routes[("POST", f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntries")] = [
        odata_error(403, "Forbidden", "BlockedByErrorLimit")]
    with make_client(app, verify_division=False) as client:
        with pytest.raises(ConnectionStopped, match="BlockedByErrorLimit"):
            client.send_general_journal_entry(BODY)


def test_a_429_on_post_is_resent_because_it_was_not_processed():
    app = FakeExact()
    app.routes[("POST", f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntries")] = [httpx.Response(429)]
    with make_client(app, verify_division=False) as client:
        assert client.send_general_journal_entry(BODY).entry["EntryID"] == ENTRY
    assert len(app.entries) == 1


def test_an_endpoint_with_five_errors_this_hour_is_not_called_again():
    app = FakeExact()
    path = f"/api/v1/{DIV}/financial/Journals"
    app.routes[("GET", path)] = [odata_error(400, "Bad Request - Error in query syntax.")] * 5
    with make_client(app, verify_division=False) as client:
        for _ in range(5):
            with pytest.raises(ApiError):
                client.get_all("financial/Journals", ["Code"])
        with pytest.raises(ErrorBudgetExhausted, match="5 errors on financial/Journals"):
            client.get_all("financial/Journals", ["Code"])
        app.routes[("GET", f"/api/v1/{DIV}/hrm/Costcenters")] = [page([{"Code": "A"}])]
        assert client.get_all("hrm/Costcenters", ["Code"]) == [{"Code": "A"}]  # other endpoints go on
    assert len(app.api_requests("Journals")) == 5


def test_long_or_filters_are_batched_below_the_url_limit():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntryLines")] = [page([])] * 20
    descriptions = [f"R{n:011d}/{n:08d} Hotel & Café 'De Gouden Leeuw' #{n}" for n in range(300)]
    with make_client(app, verify_division=False) as client:
        client.entry_lines_by_description(descriptions)
    requests = app.api_requests("GeneralJournalEntryLines")
    assert len(requests) > 1 and all(len(r.url.query) <= 6000 for r in requests)
    sent = [c for r in requests for c in query(r)["$filter"].split(" or ")]
    assert sent == [f"Description eq '{d.replace(chr(39), chr(39) * 2)}'" for d in descriptions]


@pytest.mark.parametrize("answer", [
    httpx.Response(200, json={"d": {"results": []}}),  # an empty page: the usual "not there"
    odata_error(404, "Not found"),                      # tolerated too
])
def test_get_entry_returns_none_when_exact_has_no_such_entry(answer):
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntries")] = [answer]
    with make_client(app, verify_division=False) as client:
        assert client.get_entry(ENTRY) is None
    assert query(app.requests[0]) == {"$select": "EntryID,EntryNumber,JournalCode,FinancialYear,FinancialPeriod,"
                                                 "Currency,Status,Type,Division",
                                      "$filter": f"EntryID eq guid'{ENTRY}'"}


def test_errors_and_reprs_never_contain_tokens_or_secrets():
    app = FakeExact()
    app.routes[("GET", f"/api/v1/{DIV}/financial/GLAccounts")] = [
        lambda r: odata_error(400, f"bad token {r.headers['Authorization']} refresh_token=refresh-secret-1")]
    with make_client(app, verify_division=False) as client:
        with pytest.raises(ApiError) as info:
            client.get_all("financial/GLAccounts", ["Code"])
        texts = [str(info.value), repr(info.value), info.value.body_excerpt or "", repr(client)]
    for text in texts:
        assert "access-secret-1" not in text and "refresh-secret-1" not in text and SECRET not in text


# --- against the sandbox simulator -------------------------------------------------------------
# The simulator is written from the reference sheet, not from this client, so agreement here means
# the client survives the behaviour the sheet describes (paging, rate limits, lost answers).

from expensify_exact.api.exact.regions import token_url  # noqa: E402
from expensify_exact_sandbox import seed as S  # noqa: E402
from expensify_exact_sandbox.clock import SandboxClock  # noqa: E402
from expensify_exact_sandbox.exact_app import ExactSimulator  # noqa: E402
from expensify_exact_sandbox.server import SandboxServer  # noqa: E402

SIM_BASE = "http://exact.sandbox"


class DroppingWSGITransport(httpx.WSGITransport):
    """WSGITransport that turns the simulator's "close the socket" signal into what a real socket gives."""

    def handle_request(self, request):
        try:
            return super().handle_request(request)
        except Exception as exc:
            if getattr(exc, "drop_connection", False):
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                                request=request) from exc
            raise


def sim_tokens(sim, clock) -> ExactTokens:
    issued = sim.issue_tokens()
    now = clock.now()
    return ExactTokens(issued["access_token"], issued["refresh_token"],
                       now + timedelta(seconds=int(issued["expires_in"])), now)


def sim_client(sim, clock, base, transport, store=None, connection="sbx", division=S.DIVISION, **kw):
    if store is None:
        store = InMemoryTokenStore({connection: sim_tokens(sim, clock)})
    refresher = TokenRefresher(store, connection, token_url(base), S.EXACT_CLIENT_ID, S.EXACT_CLIENT_SECRET,
                               clock, transport=transport)
    return ExactClient(base, division, ExactAuth(refresher), clock, transport=transport, **kw)


def in_process(**knobs):
    clock = SandboxClock(start=datetime.now(timezone.utc).replace(microsecond=0), frozen=True)
    sim = ExactSimulator(seed=S.build_seed(clock.now().date()), clock=clock)
    sim.public_base_url = SIM_BASE
    if knobs:
        sim.set_knobs(**knobs)
    return sim, clock, DroppingWSGITransport(app=sim)


def entry_body(sim, entry_id: str, amount: float = 100.0) -> dict:
    today = date_today_iso()
    return {"EntryID": entry_id, "JournalCode": "91", "GeneralJournalEntryLines": [
        {"GLAccount": sim.gl_account_id("4510"), "AmountFC": amount, "Date": today, "Description": "Hotel"},
        {"GLAccount": sim.gl_account_id("1650"), "AmountFC": -amount, "Date": today, "Description": "Hotel"}]}


def date_today_iso() -> str:
    return datetime.now(AMSTERDAM).date().isoformat()


def test_sim_paging_reads_every_row_once_including_the_empty_last_page():
    sim, clock, transport = in_process()
    with sim_client(sim, clock, SIM_BASE, transport) as client:
        everything = client.get_all("hrm/Costcenters", ["ID", "Code", "Description"])
        sim.set_knobs(page_size=1)  # every page is full, so the last __next leads to an empty page
        calls_before = client.calls_made
        paged = client.get_all("hrm/Costcenters", ["ID", "Code", "Description"])
        assert client.calls_made - calls_before == len(everything) + 1
    assert len(everything) >= 4
    assert sorted(r["ID"] for r in paged) == sorted(r["ID"] for r in everything)


def test_sim_wrong_division_names_the_reachable_ones():
    sim, clock, transport = in_process()
    with sim_client(sim, clock, SIM_BASE, transport, division=999999) as client:
        with pytest.raises(DivisionAccessError) as info:
            client.get_all("financial/GLAccounts", ["Code"])
    assert str(S.DIVISION) in str(info.value) and str(S.SECOND_DIVISION) in str(info.value)


def test_sim_minute_budget_is_paced_ahead_without_any_429():
    sim, clock, transport = in_process(minutely_limit=5)
    start = clock.now()
    with sim_client(sim, clock, SIM_BASE, transport, verify_division=False) as client:
        for _ in range(12):
            client.get_all("financial/Journals", ["Code"])
    assert sim.stats["rate_limited"]["minutely"] == 0
    # 12 calls at 5 per clock minute need three minutes (§6: fixed clock-minute windows)
    assert clock.now() >= start.replace(second=0) + timedelta(minutes=2)


def test_sim_429s_caused_by_a_sibling_are_waited_out():
    sim, clock, transport = in_process(minutely_limit=5)
    store = InMemoryTokenStore({"sbx": sim_tokens(sim, clock)})
    a = sim_client(sim, clock, SIM_BASE, transport, store=store, verify_division=False)
    b = sim_client(sim, clock, SIM_BASE, transport, store=store, verify_division=False)
    with a, b:
        for _ in range(5):
            a.get_all("financial/Journals", ["Code"])  # b does not know the minute is used up
        assert b.get_all("financial/Journals", ["Code"])
    assert sim.stats["rate_limited"]["minutely"] >= 1


def test_sim_siblings_sharing_the_state_db_board_wait_instead_of_collecting_a_429(store):
    """The same two clients as above, but publishing their budgets in the state DB, as every run does."""
    sim, clock, transport = in_process(minutely_limit=5)
    start = clock.now()
    tokens = InMemoryTokenStore({"sbx": sim_tokens(sim, clock)})
    a = sim_client(sim, clock, SIM_BASE, transport, store=tokens, verify_division=False,
                   rate_limit_board=StoredRateLimitBoard(store, S.DIVISION))
    b = sim_client(sim, clock, SIM_BASE, transport, store=tokens, verify_division=False,
                   rate_limit_board=StoredRateLimitBoard(store, S.DIVISION))
    with a, b:
        for _ in range(5):
            a.get_all("financial/Journals", ["Code"])
        assert b.get_all("financial/Journals", ["Code"])
        for _ in range(4):
            a.get_all("financial/Journals", ["Code"])  # a learns that b took one of the new minute's five
        a.get_all("financial/Journals", ["Code"])
    assert sim.stats["rate_limited"]["minutely"] == 0
    assert max(sim.stats["max_calls_per_minute"].values()) == 5
    assert clock.now() >= start.replace(second=0) + timedelta(minutes=2)
    assert store.rate_limits_get(f"exact:division:{S.DIVISION}")["minutely_limit"] == 5


def test_sim_post_creates_the_entry_and_echoes_exacts_own_entry_id():
    sim, clock, transport = in_process()
    entry_id = "5f0c8a8e-0000-4000-8000-000000000101"
    with sim_client(sim, clock, SIM_BASE, transport) as client:
        created = client.send_general_journal_entry(entry_body(sim, entry_id)).entry
        lines = client.transaction_lines([created["EntryID"]])
    assert created["EntryID"] != entry_id and isinstance(created["EntryNumber"], int)  # strict by default
    assert len(lines) == 2 and sum(line["AmountFC"] for line in lines) == 0


def test_sim_unbalanced_entry_is_refused_with_exacts_message():
    sim, clock, transport = in_process()
    body = entry_body(sim, "5f0c8a8e-0000-4000-8000-000000000102")
    body["GeneralJournalEntryLines"][1]["AmountFC"] = -99.0
    with sim_client(sim, clock, SIM_BASE, transport) as client:
        answer = client.send_general_journal_entry(body)
    assert (answer.kind, answer.status) == ("refused", 500) and "not balanced" in answer.message
    assert sim.entries() == []


@pytest.mark.parametrize("keeps", [False, True], ids=["exact_assigns_entry_ids", "exact_keeps_ours"])
@pytest.mark.parametrize("fault", ["store_then_drop", "store_then_http_500", "drop_before_store",
                                   "http_503_before_store"])
def test_sim_post_with_a_lost_answer_yields_exactly_one_entry(store, fault, keeps):
    sim, clock, transport = in_process(keep_client_entry_ids=keeps)
    sim.faults.arm("exact.post_entry", fault)
    body = entry_body(sim, "5f0c8a8e-0000-4000-8000-000000000103")
    with sim_client(sim, clock, SIM_BASE, transport) as client:
        settled = post_and_settle(client, store, "sbx", body)
        if fault.endswith("before_store"):
            assert settled.outcome == "unknown"  # the caller keeps the intent; the next run looks again
            again = post_and_settle(client, store, "sbx", body) if find_posted(
                client, store, "sbx", body, sent_entry_id=body["EntryID"]) is None else None
            settled = again
        else:
            assert settled.found_by == ("EntryID" if keeps else "lines")
    assert settled.outcome == "posted" and [e["EntryID"] for e in sim.entries()] == [settled.entry_id]
    assert (settled.entry_id == body["EntryID"]) is keeps
    assert sim.stats["posts"]["attempted"] == (2 if fault.endswith("before_store") else 1)


def test_sim_get_entry_finds_posted_and_misses_unknown():
    sim, clock, transport = in_process()
    with sim_client(sim, clock, SIM_BASE, transport) as client:
        entry_id = client.send_general_journal_entry(
            entry_body(sim, "5f0c8a8e-0000-4000-8000-000000000104")).entry["EntryID"]
        assert client.get_entry(entry_id)["EntryNumber"] >= 1
        assert client.get_entry("5f0c8a8e-0000-4000-8000-0000000009ff") is None


def test_sim_over_http_post_that_times_out_after_storing_is_found_not_reposted(store):
    with SandboxServer() as server:
        sim = server.exact
        sim.set_knobs(timeout_seconds=1.0)
        sim.faults.arm("exact.post_entry", "store_then_timeout")
        body = entry_body(sim, "5f0c8a8e-0000-4000-8000-000000000105")
        transport = httpx.HTTPTransport()
        with sim_client(sim, server.clock, server.exact_url, transport, timeout=0.3) as client:
            settled = post_and_settle(client, store, "sbx", body)
        assert settled.outcome == "posted" and settled.found_by == "lines"
        assert [e["EntryID"] for e in sim.entries()] == [settled.entry_id]
        assert sim.stats["posts"]["attempted"] == 1


def test_sim_over_http_dropped_answer_and_paging_and_429():
    with SandboxServer() as server:
        sim = server.exact
        sim.set_knobs(page_size=4)
        transport = httpx.HTTPTransport()
        with sim_client(sim, server.clock, server.exact_url, transport) as client:
            rows = client.get_all("hrm/Costcenters", ["Code"], orderby="Code")
            assert [r["Code"] for r in rows] == sorted(c.code for c in S.COST_CENTERS)
            sim.faults.arm("exact.api", "rate_limit")
            assert client.get_all("financial/Journals", ["Code"])
            sim.faults.arm("exact.post_entry", "store_then_drop")
            assert client.send_general_journal_entry(entry_body(sim, "5f0c8a8e-0000-4000-8000-000000000106")).kind \
                == "unknown"
        assert len(sim.entries()) == 1
        assert sim.stats["rate_limited"]["minutely"] == 1
