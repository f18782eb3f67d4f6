"""The Exact Online simulator must be as awkward as the API in shared/reference/exact-online.md.

Each test pins one quirk a client has to survive; if the simulator grew friendlier, a test here fails.
Most talk to the WSGI app in-process; the connection-dropping faults go over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import xml.etree.ElementTree as ET
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.exact_app import DropConnection, ExactSimulator
from expensify_exact_sandbox.faults import FaultSwitches
from expensify_exact_sandbox.server import SandboxServer

BASE = "https://start.exactonline.nl"
DIV = S.DIVISION
GJE = f"/api/v1/{DIV}/generaljournalentry/GeneralJournalEntries"
TOKEN_URL = "/api/oauth2/token"
START = datetime(2026, 3, 10, 9, 0, 5, tzinfo=timezone.utc)


@pytest.fixture
def clock():
    return SandboxClock(start=START, frozen=True)


@pytest.fixture
def sim(clock):
    return ExactSimulator(seed=None, clock=clock, faults=FaultSwitches())


@pytest.fixture
def http(sim):
    with httpx.Client(transport=httpx.WSGITransport(app=sim), base_url=BASE) as client:
        yield client


def refresh(http, token, **overrides):
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": S.EXACT_CLIENT_ID,
            "client_secret": S.EXACT_CLIENT_SECRET, **overrides}
    return http.post(TOKEN_URL, data=form)


@pytest.fixture
def tokens(http):
    response = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def h(tokens):
    return {"Authorization": f"Bearer {tokens['access_token']}", "Accept": "application/json"}


def get(http, h, path, **params):
    return http.get(path if path.startswith(("/", "http")) else f"/api/v1/{DIV}/{path}", headers=h, params=params)


def odata_message(response) -> str:
    return response.json()["error"]["message"]["value"]


def entry(sim, lines, journal="90", entry_id=None, **header):
    body = {"JournalCode": journal, "FinancialYear": 2026, "FinancialPeriod": 3, "GeneralJournalEntryLines": [
        {"Date": "2026-03-05", **line} for line in lines], **header}
    if entry_id:
        body["EntryID"] = entry_id
    return body


def gl(sim, code):
    return sim.gl_account_id(code)


def simple_lines(sim, amount=50.0, **extra):
    return [{"GLAccount": gl(sim, "4510"), "AmountFC": amount, "Description": "Hotel", **extra},
            {"GLAccount": gl(sim, "1650"), "AmountFC": -amount, "Description": "Hotel"}]


def post(http, h, body, prefer=True):
    headers = {**h, "Prefer": "return=representation"} if prefer else h
    return http.post(GJE, json=body, headers=headers)


# --- OAuth (§2) --------------------------------------------------------------------------------------

def authorize(http, state="xyz"):
    return http.get("/api/oauth2/auth", params={"client_id": S.EXACT_CLIENT_ID, "redirect_uri": S.EXACT_REDIRECT_URI,
                                                "response_type": "code", "force_login": "0", "state": state})


def test_authorize_auto_consents_and_redirects_with_a_url_encoded_bang_in_the_code_and_the_state():
    sim = ExactSimulator(clock=SandboxClock(start=START, frozen=True))
    with httpx.Client(transport=httpx.WSGITransport(app=sim), base_url=BASE) as http:
        response = authorize(http)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(S.EXACT_REDIRECT_URI + "?")
    assert "%21" in location and "!" not in location
    query = parse_qs(urlsplit(location).query)
    assert "!" in query["code"][0] and query["state"] == ["xyz"]


def exchange(http, code, **overrides):
    return http.post(TOKEN_URL, data={"grant_type": "authorization_code", "code": code,
                                      "redirect_uri": S.EXACT_REDIRECT_URI, "client_id": S.EXACT_CLIENT_ID,
                                      "client_secret": S.EXACT_CLIENT_SECRET, **overrides})


def test_code_exchange_returns_expires_in_as_a_string_and_a_lowercase_bearer_type(http):
    code = parse_qs(urlsplit(authorize(http).headers["Location"]).query)["code"][0]
    body = exchange(http, code).json()
    assert body["expires_in"] == "600" and body["token_type"] == "bearer"
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}


def test_an_auth_code_is_single_use_and_its_reuse_gets_a_plain_bad_request(http):
    code = parse_qs(urlsplit(authorize(http).headers["Location"]).query)["code"][0]
    assert exchange(http, code).status_code == 200
    again = exchange(http, code)
    assert (again.status_code, again.text) == (400, "Bad Request")


def test_an_auth_code_expires_after_three_minutes(http, clock):
    code = parse_qs(urlsplit(authorize(http).headers["Location"]).query)["code"][0]
    clock.advance(181)
    assert (exchange(http, code).status_code, exchange(http, code).text) == (400, "Bad Request")


def test_a_wrong_client_secret_gets_a_bare_invalid_request(http):
    response = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN, client_secret="nope")
    assert (response.status_code, response.json()) == (400, {"error": "invalid_request"})


def test_the_seeded_refresh_token_is_refreshable_at_once_and_a_reused_one_gets_old_refresh_token_used(http, sim):
    first = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert first.status_code == 200 and first.json()["refresh_token"] != S.EXACT_INITIAL_REFRESH_TOKEN
    reused = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert reused.status_code == 401
    assert reused.json() == {"error": "unauthorized_client", "error_description": "Old refresh token used."}
    assert sim.stats["old_refresh_token_used"] == 1 and sim.stats["token"]["refreshes"] == 1


def test_refreshing_within_570_seconds_is_refused_without_consuming_the_refresh_token(http, clock, tokens):
    early = refresh(http, tokens["refresh_token"])
    assert early.status_code == 400
    assert early.json() == {"error": "access_denied",
                            "error_description": "Rate limit exceeded: access_token not expired"}
    assert early.headers["Reason"] == "TooEarlyToRefreshTokens: Rate limit exceeded: access_token not expired"
    clock.advance(569)
    assert refresh(http, tokens["refresh_token"]).status_code == 400
    clock.advance(1)
    assert refresh(http, tokens["refresh_token"]).status_code == 200  # the refused attempts did not burn it


def test_the_too_early_status_is_a_knob_because_exacts_own_doc_says_401(http, sim, tokens):
    sim.set_knobs(too_early_status=401)
    assert refresh(http, tokens["refresh_token"]).status_code == 401


def test_an_unknown_refresh_token_gets_the_invalid_chain_id_message(http):
    response = refresh(http, "garbage")
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant",
                               "error_description": "Token is not allowed, because of invalid or empty chainId"}


def test_a_refresh_token_idle_for_more_than_30_days_expires_with_a_dated_message(http, clock, tokens):
    clock.advance(30 * 86400 + 1)
    response = refresh(http, tokens["refresh_token"])
    assert response.status_code == 400 and "\\/" in response.text  # .NET escapes the slashes
    body = response.json()
    assert body["error"] == "invalid_request"
    assert body["error_description"].startswith("The refresh token expired at 4/9/2026 9:00:05 AM and it is now")


def test_the_grace_knob_keeps_the_previous_refresh_token_valid_until_its_successor_is_used(http, clock, sim, tokens):
    sim.set_knobs(allow_previous_refresh_until_new_used=True)
    clock.advance(600)
    second = refresh(http, tokens["refresh_token"]).json()
    clock.advance(600)
    assert refresh(http, tokens["refresh_token"]).status_code == 200  # successor unused: grace applies
    clock.advance(600)
    sim.set_knobs(allow_previous_refresh_until_new_used=False)
    assert refresh(http, second["refresh_token"]).status_code == 401


def test_the_token_endpoint_allows_200_calls_per_client_per_day(http, sim):
    sim.set_knobs(token_calls_per_day=3)
    codes = [refresh(http, "garbage").status_code for _ in range(3)]
    assert codes == [400, 400, 400]
    refused = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert refused.status_code == 400 and refused.json()["error"] == "access_denied"


def test_an_access_token_dies_after_600_seconds_with_www_authenticate_and_an_empty_body(http, clock, h):
    assert get(http, h, "financial/Journals", **{"$select": "Code"}).status_code == 200
    clock.advance(600)
    response = get(http, h, "financial/Journals", **{"$select": "Code"})
    assert response.status_code == 401 and response.content == b""
    assert "access token expired" in response.headers["WWW-Authenticate"]


def test_the_control_api_issues_a_fresh_consent_whose_refresh_token_works(http, clock):
    issued = http.post("/_sandbox/exact/refresh_tokens", json={}).json()
    assert refresh(http, issued["refresh_token"]).status_code == 400  # just consented: too early
    clock.advance(570)
    assert refresh(http, issued["refresh_token"]).status_code == 200


# --- divisions and routing (§3, §7) ------------------------------------------------------------------

def test_current_me_is_a_collection_of_one_and_carries_no_rate_limit_headers(http, h):
    response = get(http, h, "/api/v1/current/Me")
    results = response.json()["d"]["results"]
    assert len(results) == 1 and results[0]["CurrentDivision"] == DIV
    assert results[0]["__metadata"]["type"] == "Exact.Web.Api.System.Me"
    assert "X-RateLimit-Remaining" not in response.headers


def test_a_division_without_access_gets_403_no_division_access(http, sim, h):
    response = get(http, h, "/api/v1/999999/financial/Journals", **{"$select": "Code"})
    assert response.status_code == 403 and response.headers["Reason"] == "NoDivisionAccess"
    sim.set_knobs(accessible_divisions=[DIV])
    assert get(http, h, f"/api/v1/{S.SECOND_DIVISION}/financial/Journals").status_code == 403
    assert get(http, h, "system/Divisions").json()["d"]["results"][0]["Code"] == DIV


def test_an_unknown_endpoint_is_404_with_an_odata_error_body(http, h):
    response = get(http, h, "financial/NoSuchThing")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message"}


def test_system_divisions_has_current_but_selecting_main_is_a_400(http, h):
    rows = get(http, h, "system/Divisions").json()["d"]["results"]
    assert {r["Code"]: r["Current"] for r in rows} == {DIV: True, S.SECOND_DIVISION: False}
    assert get(http, h, "system/Divisions", **{"$select": "Code,Main"}).status_code == 400
    assert get(http, h, "hrm/Divisions", **{"$select": "Code,Main"}).status_code == 200


# --- OData (§4) --------------------------------------------------------------------------------------

def test_without_accept_json_the_answer_is_well_formed_atom_xml(http, tokens):
    response = http.get(f"/api/v1/{DIV}/financial/Journals",
                        headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert response.headers["Content-Type"].startswith("application/atom+xml")
    feed = ET.fromstring(response.content)
    assert feed.tag == "{http://www.w3.org/2005/Atom}feed"
    assert len(feed.findall("{http://www.w3.org/2005/Atom}entry")) == 3


def test_paging_gives_60_rows_an_absolute_next_and_an_empty_page_after_a_full_last_page(http, sim, h):
    for n in range(116):  # 4 seeded + 116 = exactly two full pages
        sim.add_cost_center(f"X{n:03d}", f"Extra {n}")
    first = get(http, h, "hrm/Costcenters", **{"$select": "ID,Code"}).json()["d"]
    assert len(first["results"]) == 60
    assert first["__next"].startswith(f"{BASE}/api/v1/{DIV}/hrm/Costcenters?")
    assert f"$skiptoken=guid'{first['results'][-1]['ID']}'" in first["__next"]
    second = http.get(first["__next"], headers=h).json()["d"]
    assert len(second["results"]) == 60 and "__next" in second
    third = http.get(second["__next"], headers=h).json()["d"]
    assert third == {"results": []}
    codes = [r["Code"] for r in first["results"] + second["results"]]
    assert len(set(codes)) == 120


def test_top_is_capped_at_the_page_size_and_a_short_page_has_no_next(http, sim, h):
    for n in range(70):
        sim.add_cost_unit(f"U{n:03d}")
    capped = get(http, h, "hrm/Costunits", **{"$top": "100"}).json()["d"]
    assert len(capped["results"]) == 60
    short = get(http, h, "hrm/Costunits", **{"$top": "5"}).json()["d"]
    assert len(short["results"]) == 5 and "__next" not in short


def test_select_returns_only_the_selected_fields_plus_metadata(http, h):
    row = get(http, h, "financial/GLAccounts", **{"$select": "Code,Type", "$filter": "Code eq '4500'"}
              ).json()["d"]["results"][0]
    assert set(row) == {"__metadata", "Code", "Type"}
    assert row["__metadata"]["type"] == "Exact.Web.Api.Models.GLAccount"
    assert row["__metadata"]["uri"].startswith(f"{BASE}/api/v1/{DIV}/financial/GLAccounts(guid'")


@pytest.mark.parametrize(("flt", "expected"), [
    ("Code eq '4500'", {"4500"}),
    ("Code eq '4500' or (Code eq '4510' and IsBlocked eq false)", {"4500", "4510"}),
    ("IsBlocked eq true", {"4800"}),
    ("Type eq 25", {"1650"}),
    ("Type ge 24 and Type lt 25", {"1500"}),
    ("UseCostcenter ne 0", {"4500"}),
    ("ID eq guid'" + S.stable_guid("glaccount", "4600") + "'", {"4600"}),
    ("Description eq 'Taxi en openbaar vervoer'", {"4530"}),
    ("startswith(Code,'47')", {"4700"}),
    ("not (Type le 121)", {"4700"}),
])
def test_filter_supports_operators_parentheses_and_typed_literals(http, sim, h, flt, expected):
    sim.set_knobs(mandatory_filtering=False)  # the filter language itself, not which fields satisfy the rule
    response = get(http, h, "financial/GLAccounts", **{"$select": "Code", "$filter": flt})
    assert {r["Code"] for r in response.json()["d"]["results"]} == expected


def test_string_literals_escape_quotes_by_doubling_them(http, sim, h):
    sim.add_cost_center("OHARE", "O'Hare desk")
    rows = get(http, h, "hrm/Costcenters", **{"$filter": "Description eq 'O''Hare desk'"}).json()["d"]["results"]
    assert [r["Code"] for r in rows] == ["OHARE"]


def test_datetime_literals_and_date_values_are_amsterdam_wall_clock(http, h):
    # period 2026/3 starts 2026-03-01 00:00 Amsterdam; /Date()/ encodes that wall-clock time as if it were UTC
    rows = get(http, h, "financial/FinancialPeriods",
               **{"$filter": "StartDate eq datetime'2026-03-01T00:00:00'"}).json()["d"]["results"]
    assert [(r["FinYear"], r["FinPeriod"]) for r in rows] == [(2026, 3)]
    assert rows[0]["StartDate"] == "/Date(1772323200000)/"
    created = get(http, h, "financial/Journals", **{"$select": "Created"}).json()["d"]["results"][0]["Created"]
    ms = int(created[6:-2])
    utc = (START.timestamp() - 400 * 86400) * 1000
    assert ms - utc == 3600 * 1000  # winter: CET is UTC+1


@pytest.mark.parametrize(("flt", "message"), [
    ("Code eq", "Bad Request - Error in query syntax."),
    ("Code eq '4500", "Bad Request - Error in query syntax."),
    ("(Code eq '4500'", "Bad Request - Error in query syntax."),
    ("Code === '1'", "Bad Request - Error in query syntax."),
    ("ID eq guid'dsadsds'", "Unrecognized 'Edm.Guid' literal 'guid'dsadsds'' in '6'."),
    ("Nope eq 1", "No property 'Nope' exists in type 'Exact.Web.Api.Models.GLAccount' at position 0."),
    ("ID eq '4500'", "Operator 'eq' incompatible with operand types 'System.Guid' and 'System.String' at position 3."),
])
def test_malformed_filters_are_400_with_exacts_messages(http, h, flt, message):
    response = get(http, h, "financial/GLAccounts", **{"$filter": flt})
    assert response.status_code == 400 and odata_message(response) == message


def test_entries_and_transaction_lines_refuse_a_read_without_select_unless_top_is_1(http, sim, h):
    sim.set_knobs(mandatory_filtering=False)  # the $select rule alone
    for path in ("generaljournalentry/GeneralJournalEntries", "financialtransaction/TransactionLines",
                 "sync/Financial/TransactionLines", "bulk/Financial/TransactionLines"):
        refused = get(http, h, path)
        assert refused.status_code == 400
        assert odata_message(refused) == "Please add a $select or a $top=1 statement to the query string."
        assert get(http, h, path, **{"$top": "1"}).status_code == 200
        assert get(http, h, path, **{"$select": "EntryID"}).status_code == 200


def test_orderby_sorts_descending(http, h):
    rows = get(http, h, "financial/Journals", **{"$orderby": "Code desc"}).json()["d"]["results"]
    assert [r["Code"] for r in rows] == ["91", "90", "20"]


def test_pad_codes_pads_dimension_and_journal_codes_and_search_codes_are_always_padded(http, sim, h):
    assert get(http, h, "hrm/Costcenters", **{"$filter": "Code eq 'AMS'"}).json()["d"]["results"][0]["Code"] == "AMS"
    search = get(http, h, "financial/GLAccounts", **{"$filter": "Code eq '4500'"}).json()["d"]["results"][0]
    assert search["SearchCode"] != search["SearchCode"].strip()
    sim.set_knobs(pad_codes=True)
    for path, code in (("hrm/Costcenters", "AMS"), ("hrm/Costunits", "INT"), ("financial/Journals", "90")):
        rows = get(http, h, path, **{"$filter": f"Code eq '{code}'"}).json()["d"]["results"]
        assert rows[0]["Code"] == code.rjust(8)


# --- rate limits and the error budget (§6) -----------------------------------------------------------

def test_every_division_call_carries_six_rate_limit_headers_with_ms_resets(http, h):
    response = get(http, h, "financial/Journals")
    headers = response.headers
    assert headers["X-RateLimit-Limit"] == "5000" and headers["X-RateLimit-Remaining"] == "4999"
    assert headers["X-RateLimit-Reset"] == str(int(datetime(2026, 3, 11, tzinfo=timezone.utc).timestamp() * 1000))
    assert headers["X-RateLimit-Minutely-Limit"] == "60" and headers["X-RateLimit-Minutely-Remaining"] == "59"
    assert headers["X-RateLimit-Minutely-Reset"] == str(int(datetime(2026, 3, 10, 9, 1, tzinfo=timezone.utc)
                                                            .timestamp() * 1000))


def test_the_61st_call_in_a_clock_minute_gets_an_empty_429_with_only_minutely_headers(http, clock, sim, h):
    for _ in range(60):
        assert get(http, h, "financial/Journals").status_code == 200
    refused = get(http, h, "financial/Journals")
    assert refused.status_code == 429 and refused.content == b""
    assert refused.headers["X-RateLimit-Minutely-Remaining"] == "0"
    assert "X-RateLimit-Remaining" not in refused.headers
    assert get(http, h, f"/api/v1/{S.SECOND_DIVISION}/financial/Journals").status_code == 200  # per division
    clock.advance(55)  # 09:01:00 — a fixed clock-minute window, not a sliding one
    assert get(http, h, "financial/Journals").status_code == 200
    stats = sim.stats
    assert stats["rate_limited"]["minutely"] == 1 and stats["max_calls_per_minute"][str(DIV)] == 61


def test_the_daily_limit_gives_a_429_with_only_the_daily_headers(http, sim, h):
    sim.set_knobs(daily_limit=2)
    get(http, h, "financial/Journals")
    get(http, h, "financial/Journals")
    refused = get(http, h, "financial/Journals")
    assert refused.status_code == 429 and refused.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Minutely-Remaining" not in refused.headers
    assert sim.stats["rate_limited"]["daily"] == 1


def test_ten_errors_in_a_clock_hour_block_that_endpoint_for_the_rest_of_the_hour(http, clock, sim, h):
    ok = {"$select": "Code", "$filter": "Code eq '4500'"}
    for _ in range(10):
        assert get(http, h, "financial/GLAccounts", **{"$filter": "Code eq"}).status_code == 400
    blocked = get(http, h, "financial/GLAccounts", **ok)
    assert blocked.status_code == 403 and "blocked" in blocked.headers["Reason"].lower()
    assert get(http, h, "financial/Journals").status_code == 200  # other endpoints still work
    assert sim.stats["errors"][f"{DIV} financial/GLAccounts"] == 10
    clock.advance(3600 - 5)  # 10:00:00, the next clock hour
    h = {**h, "Authorization": f"Bearer {sim.issue_tokens()['access_token']}"}
    assert get(http, h, "financial/GLAccounts", **ok).status_code == 200
    sim.set_knobs(error_budget_enabled=False)
    for _ in range(12):
        get(http, h, "financial/GLAccounts", **{"$filter": "Code eq"})
    assert get(http, h, "financial/GLAccounts", **ok).status_code == 200


def test_token_refusals_count_toward_the_error_budget(http):
    for _ in range(10):
        refresh(http, "garbage")
    blocked = refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert blocked.status_code == 403 and blocked.headers["Reason"] == "BlockedByErrorLimit"


# --- posting (§5.8–§5.11) ----------------------------------------------------------------------------

def test_a_post_is_201_with_sequential_entry_numbers_and_stores_transaction_lines(http, sim, h):
    sim.set_knobs(keep_client_entry_ids=True)
    first = post(http, h, entry(sim, simple_lines(sim), entry_id="8c1f2d3e-0000-4000-8000-000000000001"))
    second = post(http, h, entry(sim, simple_lines(sim)))
    assert first.status_code == second.status_code == 201
    d1, d2 = first.json()["d"], second.json()["d"]
    assert d1["EntryID"] == "8c1f2d3e-0000-4000-8000-000000000001"
    assert (d1["EntryNumber"], d2["EntryNumber"]) == (26900001, 26900002)
    assert (d1["Status"], d1["Type"], d1["JournalCode"]) == (20, 90, "90")
    assert "__deferred" in d1["GeneralJournalEntryLines"]
    lines = get(http, h, "financialtransaction/TransactionLines",
                **{"$select": "EntryID,EntryNumber,LineNumber,AmountFC,Type,Status,GLAccountCode",
                   "$filter": f"EntryID eq guid'{d1['EntryID']}'"}).json()["d"]["results"]
    assert sorted((r["LineNumber"], r["GLAccountCode"], r["AmountFC"]) for r in lines) == [
        (1, "4510", 50.0), (2, "1650", -50.0)]
    assert {(r["Type"], r["Status"], r["EntryNumber"]) for r in lines} == {(90, 20, 26900001)}


def test_without_prefer_the_created_entity_has_null_properties_except_its_key(http, sim, h):
    d = post(http, h, entry(sim, simple_lines(sim)), prefer=False).json()["d"]
    assert d["EntryID"] and d["EntryNumber"] is None and d["JournalCode"] is None


def test_a_repeated_entry_id_is_a_500_data_already_exists(http, sim, h):
    sim.set_knobs(keep_client_entry_ids=True)
    body = entry(sim, simple_lines(sim), entry_id="8c1f2d3e-0000-4000-8000-000000000002")
    assert post(http, h, body).status_code == 201
    again = post(http, h, body)
    assert again.status_code == 500 and odata_message(again) == "Data already exists"
    assert len(sim.entries(DIV)) == 1


def test_a_post_needs_a_json_content_type(http, sim, h):
    response = http.post(GJE, content=json.dumps(entry(sim, simple_lines(sim))), headers=h)
    assert response.status_code == 415 and sim.entries(DIV) == []


def _line(sim, code, amount, **extra):
    return {"GLAccount": gl(sim, code), "AmountFC": amount, **extra}


@pytest.mark.parametrize(("build", "message"), [
    (lambda sim: entry(sim, simple_lines(sim), journal="20"), "Ongeldig: Dagboek"),
    (lambda sim: entry(sim, simple_lines(sim), journal="77"), "Ongeldig: Dagboek"),
    (lambda sim: entry(sim, []), "Verplicht: Boekingsregels"),
    (lambda sim: entry(sim, [{"GLAccount": S.stable_guid("glaccount", "9999"), "AmountFC": 0}]),
     "Ongeldig: Grootboekrekening"),
    (lambda sim: entry(sim, [_line(sim, "4800", 10), _line(sim, "1650", -10)]), "Geblokkeerd: Grootboekrekening"),
    (lambda sim: entry(sim, simple_lines(sim, CostCenter="EHV")), "Ongeldig: Kostenplaats"),
    (lambda sim: entry(sim, simple_lines(sim, CostCenter="DHG")), "Ongeldig: Kostenplaats"),  # ended 2024-12-31
    (lambda sim: entry(sim, simple_lines(sim, CostUnit="P9999")), "Ongeldig: Kostendrager"),
    (lambda sim: entry(sim, [_line(sim, "4500", 10), _line(sim, "1650", -10)]), "Verplicht: Kostenplaats"),
    (lambda sim: entry(sim, simple_lines(sim, VATCode="1"), journal="91"), "Not allowed: VAT-code"),
    (lambda sim: entry(sim, simple_lines(sim, VATCode="99")), "Ongeldig: Btw-code"),
    (lambda sim: entry(sim, simple_lines(sim), journal="91", Currency="USD"), "Ongeldig: Valuta"),
    (lambda sim: entry(sim, simple_lines(sim), FinancialYear=2019), "Ongeldig: Boekjaar"),
    (lambda sim: entry(sim, simple_lines(sim), FinancialPeriod=13), "Ongeldig: Periode"),
    (lambda sim: entry(sim, simple_lines(sim, Description="x" * 61)),
     "Description: de waarde is te lang (maximaal 60 tekens)"),
    (lambda sim: entry(sim, [_line(sim, "4510", 1250.5), _line(sim, "1650", -250.5)]),
     "This entry is not balanced on: 2026 / 03 (Type: Other) - Difference: EUR 1.000,00"),
])
def test_invalid_entries_are_refused_with_a_500_and_exacts_message(http, sim, h, build, message):
    response = post(http, h, build(sim))
    assert response.status_code == 500 and odata_message(response) == message
    assert sim.entries(DIV) == [] and sim.stats["posts"]["rejected"] == 1


def test_a_vat_code_of_empty_string_is_accepted_on_a_journal_without_vat(http, sim, h):
    assert post(http, h, entry(sim, simple_lines(sim, VATCode=""), journal="91")).status_code == 201


def test_closed_periods_knob_refuses_posting_into_that_period(http, sim, h):
    sim.set_knobs(closed_periods=[[2026, 3]])
    response = post(http, h, entry(sim, simple_lines(sim)))
    assert response.status_code == 500 and odata_message(response) == "Periode is afgesloten: 2026 / 03"


def test_an_including_vat_code_splits_the_gross_amount_into_base_and_a_vat_line_on_gl_to_claim(http, sim, h):
    body = entry(sim, [_line(sim, "4510", 109.0, VATCode="2", CostCenter="AMS"), _line(sim, "1650", -109.0)])
    assert post(http, h, body).status_code == 201
    tlines = sorted(sim.entries(DIV)[0]["transaction_lines"], key=lambda t: t["LineNumber"])
    assert [(t["GLAccountCode"], t["AmountFC"]) for t in tlines] == [("4510", 100.0), ("1500", 9.0),
                                                                      ("1650", -109.0)]


def test_an_excluding_vat_code_adds_vat_on_top_so_the_offset_must_carry_net_plus_vat(http, sim, h):
    net_only = entry(sim, [_line(sim, "4510", 100.0, VATCode="5"), _line(sim, "1650", -100.0)])
    refused = post(http, h, net_only)
    assert refused.status_code == 500 and "Difference: EUR 21,00" in odata_message(refused)
    with_vat = entry(sim, [_line(sim, "4510", 100.0, VATCode="5"), _line(sim, "1650", -121.0)])
    assert post(http, h, with_vat).status_code == 201


def test_a_foreign_currency_entry_gets_amount_dc_from_the_exchange_rate(http, sim, h):
    body = entry(sim, simple_lines(sim, 100.0), Currency="USD", ExchangeRate=0.9)
    assert post(http, h, body).status_code == 201
    tline = next(t for t in sim.entries(DIV)[0]["transaction_lines"] if t["GLAccountCode"] == "4510")
    assert (tline["Currency"], tline["AmountFC"], tline["AmountDC"]) == ("USD", 100.0, 90.0)


def test_unknown_properties_in_the_body_are_refused(http, sim, h):
    response = post(http, h, entry(sim, simple_lines(sim, YourRef="x")))
    assert response.status_code == 400 and "YourRef" in odata_message(response)


def test_an_entry_can_be_read_by_key_expanded_and_deleted(http, sim, h):
    sim.set_knobs(keep_client_entry_ids=True)
    entry_id = "8c1f2d3e-0000-4000-8000-000000000003"
    post(http, h, entry(sim, simple_lines(sim), entry_id=entry_id))
    one = get(http, h, f"{GJE}(guid'{entry_id}')", **{"$expand": "GeneralJournalEntryLines"}).json()["d"]
    assert len(one["GeneralJournalEntryLines"]["results"]) == 2
    deferred = get(http, h, f"{GJE}(guid'{entry_id}')", **{"$select": "GeneralJournalEntryLines"}).json()["d"]
    lines = http.get(deferred["GeneralJournalEntryLines"]["__deferred"]["uri"], headers=h).json()["d"]["results"]
    assert sorted(ln["AmountFC"] for ln in lines) == [-50.0, 50.0]
    blocked = {"$filter": "Code eq '4800' and IsBlocked eq true"}
    assert get(http, h, f"/api/v1/{DIV}/financial/GLAccounts/$count", **blocked).text == "1"
    assert http.delete(f"{GJE}(guid'{entry_id}')", headers=h).status_code == 204
    assert get(http, h, f"{GJE}(guid'{entry_id}')").status_code == 404
    assert [w["content"]["Action"] for w in sim.webhooks] == ["Update", "Delete"]


def test_a_post_queues_a_webhook_signed_with_an_uppercase_hmac_of_the_raw_content(http, sim, h):
    entry_id = post(http, h, entry(sim, simple_lines(sim))).json()["d"]["EntryID"]
    hook = http.get("/_sandbox/exact/webhooks").json()[0]
    raw = hook["body"]
    content_raw = raw[len('{"Content":'):raw.rindex(',"HashCode":')]
    expected = hmac.new(S.EXACT_WEBHOOK_SECRET.encode(), content_raw.encode(), hashlib.sha256).hexdigest().upper()
    assert json.loads(raw)["HashCode"] == expected
    content = json.loads(raw)["Content"]
    assert list(content) == ["Topic", "ClientId", "Division", "Action", "Key", "ExactOnlineEndpoint",
                             "EventCreatedOn"]
    assert (content["Topic"], content["Action"], content["Key"]) == ("GeneralJournalEntries", "Update", entry_id)


def test_sync_transaction_lines_page_by_timestamp_with_1000_rows(http, sim, h):
    sim.set_knobs(sync_page_size=3)
    for _ in range(2):
        post(http, h, entry(sim, simple_lines(sim)))
    page = get(http, h, "sync/Financial/TransactionLines",
               **{"$select": "Timestamp,EntryID,AmountFC", "$filter": "Timestamp gt 1L"}).json()["d"]
    stamps = [r["Timestamp"] for r in page["results"]]
    assert stamps == sorted(stamps) and len(stamps) == 3 and page["__next"].endswith(f"$skiptoken={stamps[-1]}L")
    rest = http.get(page["__next"], headers=h).json()["d"]["results"]
    assert len(rest) == 1 and rest[0]["Timestamp"] > stamps[-1]
    since = get(http, h, "sync/Financial/TransactionLines",
                **{"$select": "Timestamp", "$filter": f"Timestamp gt {stamps[-1]}L"}).json()["d"]["results"]
    assert len(since) == 1


def test_a_line_edited_behind_the_connectors_back_shows_up_in_reads_and_sync(http, sim, h):
    entry_id = post(http, h, entry(sim, simple_lines(sim, CostCenter="AMS"))).json()["d"]["EntryID"]
    before = max(t["Timestamp"] for t in sim.entries(DIV)[0]["transaction_lines"])
    patched = http.patch(f"/_sandbox/exact/entries/{entry_id}/lines/1", json={"AmountFC": 60.0, "CostCenter": "RTM"})
    assert patched.status_code == 200
    row = get(http, h, "financialtransaction/TransactionLines",
              **{"$select": "AmountFC,CostCenter",
                 "$filter": f"EntryID eq guid'{entry_id}' and LineNumber eq 1"}).json()["d"]["results"][0]
    assert (row["AmountFC"], row["CostCenter"]) == (60.0, "RTM")
    changed = get(http, h, "sync/Financial/TransactionLines",
                  **{"$select": "LineNumber", "$filter": f"Timestamp gt {before}L"}).json()["d"]["results"]
    assert [r["LineNumber"] for r in changed] == [1]
    assert http.delete(f"/_sandbox/exact/entries/{entry_id}").status_code == 200
    assert sim.entries(DIV) == []


# --- faults ------------------------------------------------------------------------------------------

def test_api_faults_give_a_429_with_minutely_headers_or_a_503(http, sim, h):
    sim.faults.arm("exact.api", "rate_limit")
    sim.faults.arm("exact.api", "http_503")
    limited = get(http, h, "financial/Journals")
    assert limited.status_code == 429 and limited.headers["X-RateLimit-Minutely-Remaining"] == "0"
    assert get(http, h, "financial/Journals").status_code == 503
    assert get(http, h, "financial/Journals").status_code == 200


@pytest.mark.parametrize(("fault", "status", "stored"), [
    ("http_500_before_store", 500, False),
    ("http_503_before_store", 503, False),
    ("store_then_http_500", 500, True),
])
def test_post_faults_answer_an_error_and_store_or_not(http, sim, h, fault, status, stored):
    sim.faults.arm("exact.post_entry", fault)
    assert post(http, h, entry(sim, simple_lines(sim))).status_code == status
    assert len(sim.entries(DIV)) == (1 if stored else 0)


@pytest.mark.parametrize(("fault", "status"), [("http_500", 500), ("http_503", 503)])
def test_token_faults_answer_an_error_without_rotating_the_refresh_token(http, sim, fault, status):
    sim.faults.arm("exact.token", fault)
    assert refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN).status_code == status
    assert refresh(http, S.EXACT_INITIAL_REFRESH_TOKEN).status_code == 200


def test_drop_before_store_raises_in_process_and_stores_nothing(http, sim, h):
    sim.faults.arm("exact.post_entry", "drop_before_store")
    with pytest.raises(DropConnection):
        post(http, h, entry(sim, simple_lines(sim)))
    assert sim.entries(DIV) == []


# --- over real HTTP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with SandboxServer(clock=SandboxClock(start=START)) as running:
        yield running


def _live_token(server) -> str:
    issued = server.exact.issue_tokens()
    return issued["access_token"]


def test_store_then_drop_stores_the_entry_and_closes_the_connection_without_an_answer(server):
    h = {"Authorization": f"Bearer {_live_token(server)}", "Accept": "application/json"}
    sim = server.exact
    sim.set_knobs(keep_client_entry_ids=True)
    body = entry(sim, simple_lines(sim), entry_id="8c1f2d3e-0000-4000-8000-0000000000d1")
    server.faults.arm("exact.post_entry", "store_then_drop")
    with httpx.Client(base_url=server.exact_url, timeout=5) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(GJE, json=body, headers=h)
        assert any(e["EntryID"] == body["EntryID"] for e in sim.entries(DIV))
        found = http.get(f"{GJE}(guid'{body['EntryID']}')", headers=h)
        assert found.status_code == 200 and found.json()["d"]["__metadata"]["uri"].startswith(server.exact_url)


def test_store_then_timeout_stores_the_entry_before_the_slow_answer(server):
    h = {"Authorization": f"Bearer {_live_token(server)}", "Accept": "application/json"}
    sim = server.exact
    sim.set_knobs(timeout_seconds=0.5, keep_client_entry_ids=True)
    body = entry(sim, simple_lines(sim), entry_id="8c1f2d3e-0000-4000-8000-0000000000d2")
    server.faults.arm("exact.post_entry", "store_then_timeout")
    with httpx.Client(base_url=server.exact_url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(GJE, json=body, headers=h)
    assert any(e["EntryID"] == body["EntryID"] for e in sim.entries(DIV))


def test_post_answer_delay_stores_every_entry_before_its_slow_answer(server):
    h = {"Authorization": f"Bearer {_live_token(server)}", "Accept": "application/json"}
    sim = server.exact
    body = entry(sim, simple_lines(sim), entry_id="8c1f2d3e-0000-4000-8000-0000000000d3")
    sim.set_knobs(post_answer_delay_seconds=0.5)
    try:
        with httpx.Client(base_url=server.exact_url, timeout=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                http.post(GJE, json=body, headers=h)
    finally:
        sim.set_knobs(post_answer_delay_seconds=0.0)  # the server is shared by the module's tests
    assert any(e["EntryID"] == body["EntryID"] for e in sim.entries(DIV))


def test_drop_after_rotate_loses_the_new_token_and_the_old_one_is_then_dead(server):
    server.exact.set_knobs(refresh_floor_seconds=0)
    issued = server.exact.issue_tokens(refreshable_now=True)
    server.faults.arm("exact.token", "drop_after_rotate")
    form = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
            "client_id": S.EXACT_CLIENT_ID, "client_secret": S.EXACT_CLIENT_SECRET}
    with httpx.Client(base_url=server.exact_url, timeout=5) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(TOKEN_URL, data=form)
        again = http.post(TOKEN_URL, data=form)
    assert again.status_code == 401 and again.json()["error_description"] == "Old refresh token used."
    server.exact.set_knobs(refresh_floor_seconds=570)


def test_the_control_api_sets_knobs_faults_and_dimensions_over_http(server):
    h = {"Authorization": f"Bearer {_live_token(server)}", "Accept": "application/json"}
    with httpx.Client(base_url=server.exact_url, timeout=5) as http:
        assert http.post("/_sandbox/exact/knobs", json={"pad_codes": True}).json()["pad_codes"] is True
        http.post("/_sandbox/exact/cost_centers", json={"code": "EHV", "description": "Eindhoven",
                                                         "end_date": "2025-01-31"})
        row = get(http, h, "hrm/Costcenters", **{"$filter": "Code eq 'EHV'"}).json()["d"]["results"][0]
        assert row["Code"] == "     EHV" and row["EndDate"] == "/Date(1738281600000)/"
        added = http.post("/_sandbox/exact/gl_accounts", json={"code": "4999", "blocked": True}).json()
        assert added["IsBlocked"] is True and added["ID"] == S.stable_guid("glaccount", "4999")
        http.post("/_sandbox/exact/faults", json={"target": "exact.api", "fault": "http_503", "times": 1})
        assert get(http, h, "financial/Journals").status_code == 503
        stats = http.get("/_sandbox/exact/stats").json()
        assert stats["calls"]["GET financial/Journals"] >= 1 and stats["faults"]["exact.api:http_503"] >= 1
        assert http.post("/_sandbox/exact/knobs", json={"no_such_knob": 1}).status_code == 400
        http.post("/_sandbox/exact/knobs", json={"pad_codes": False})


def test_webhook_targets_receive_the_raw_signed_body(server):
    received: list[bytes] = []
    done = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()
            done.set()

        def log_message(self, *args):
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.handle_request, daemon=True).start()
    sim = server.exact
    sim.set_knobs(webhook_targets=[f"http://127.0.0.1:{receiver.server_port}/hook"])
    h = {"Authorization": f"Bearer {_live_token(server)}", "Accept": "application/json"}
    try:
        with httpx.Client(base_url=server.exact_url, timeout=5) as http:
            assert post(http, h, entry(sim, simple_lines(sim))).status_code == 201
        assert done.wait(5)
        assert received[0].decode() == sim.webhooks[-1]["body"]
    finally:
        sim.set_knobs(webhook_targets=[])
        receiver.server_close()


def test_dates_in_posted_bodies_accept_plain_iso_dates(http, sim, h):
    body = entry(sim, simple_lines(sim))
    body["GeneralJournalEntryLines"][0]["Date"] = "2026-03-05T00:00:00"
    assert post(http, h, body).status_code == 201
    assert sim.entries(DIV)[0]["lines"][0]["Date"] == date(2026, 3, 5).isoformat()


# --- strict by default where the truth is open (§13) ---------------------------------------------------

def test_by_default_exact_assigns_its_own_entry_id_and_ignores_the_clients(http, sim, h):
    ours = "8c1f2d3e-0000-4000-8000-0000000000e1"
    echoed = post(http, h, entry(sim, simple_lines(sim), entry_id=ours)).json()["d"]["EntryID"]
    assert echoed != ours and [e["EntryID"] for e in sim.entries(DIV)] == [echoed]
    again = post(http, h, entry(sim, simple_lines(sim), entry_id=ours))
    assert again.status_code == 201 and len(sim.entries(DIV)) == 2  # no duplicate-key protection either
    sim.set_knobs(keep_client_entry_ids=True)
    kept = "8c1f2d3e-0000-4000-8000-0000000000e2"
    assert post(http, h, entry(sim, simple_lines(sim), entry_id=kept)).json()["d"]["EntryID"] == kept


@pytest.mark.parametrize("path,allowed", [
    ("financial/GLAccounts", "ID,Code"), ("bulk/Financial/GLAccounts", "ID,Code"),
    ("financialtransaction/TransactionLines", "ID,EntryID"), ("bulk/Financial/TransactionLines", "ID,EntryID"),
])
def test_endpoints_with_a_sync_twin_refuse_a_read_without_a_mandatory_filter_field(http, sim, h, path, allowed):
    entry_id = post(http, h, entry(sim, simple_lines(sim))).json()["d"]["EntryID"]
    select = {"$select": "ID"}
    for flt in (None, "startswith(Code,'4')" if "GL" in path else "JournalCode eq '90'", "Description eq 'Hotel'"):
        refused = get(http, h, path, **select, **({"$filter": flt} if flt else {}))
        assert refused.status_code == 400
        assert odata_message(refused).endswith(f"must have a $filter parameter with one of the following fields "
                                               f"in the url: {allowed}")
    good = "Code eq '4510' or Code eq '1650'" if "GL" in path else f"EntryID eq guid'{entry_id}'"
    assert len(get(http, h, path, **select, **{"$filter": good}).json()["d"]["results"]) == 2
    assert get(http, h, "hrm/Costcenters").status_code == 200  # no sync twin, no mandatory filter
    sim.set_knobs(mandatory_filtering=False)
    assert get(http, h, path, **select).status_code == 200


@pytest.mark.parametrize("path", ["sync/Financial/GLAccounts", "sync/Financial/TransactionLines"])
def test_sync_twins_read_from_a_timestamp_watermark_only(http, sim, h, path):
    post(http, h, entry(sim, simple_lines(sim)))
    for flt in (None, "Timestamp ge 1L", "Timestamp gt 1", "ID eq null", "Timestamp gt 1L and ID eq null"):
        refused = get(http, h, path, **{"$select": "Timestamp", **({"$filter": flt} if flt else {})})
        assert refused.status_code == 400 and "Timestamp" in odata_message(refused)
    rows = get(http, h, path, **{"$select": "Timestamp,ID", "$filter": "Timestamp gt 1L"}).json()["d"]["results"]
    stamps = [r["Timestamp"] for r in rows]
    assert stamps == sorted(stamps) and len(rows) >= 2
    later = get(http, h, path, **{"$select": "Timestamp", "$filter": f"Timestamp gt {stamps[-2]}L"}).json()["d"]
    assert [r["Timestamp"] for r in later["results"]] == [stamps[-1]]


def test_a_changed_gl_account_gets_a_new_sync_timestamp(http, sim, h):
    def newest():
        rows = get(http, h, "sync/Financial/GLAccounts",
                   **{"$select": "Timestamp,Code", "$filter": "Timestamp gt 1L"}).json()["d"]["results"]
        return max(rows, key=lambda r: r["Timestamp"])
    before = newest()
    sim.block_gl_account("4500")
    after = newest()
    assert after["Code"] == "4500" and after["Timestamp"] > before["Timestamp"]


def test_a_query_string_over_8_kb_is_refused_with_400(http, sim, h):
    ids = [f"8c1f2d3e-0000-4000-8000-{n:012d}" for n in range(200)]
    flt = " or ".join(f"EntryID eq guid'{e}'" for e in ids)
    path = "financialtransaction/TransactionLines"
    refused = get(http, h, path, **{"$select": "ID", "$filter": flt})
    assert refused.status_code == 400 and odata_message(refused) == "Bad Request - Query String Too Long"
    half = " or ".join(f"EntryID eq guid'{e}'" for e in ids[:60])
    assert get(http, h, path, **{"$select": "ID", "$filter": half}).status_code == 200


def test_validation_errors_on_post_are_500_and_malformed_requests_400(http, sim, h):
    unbalanced = entry(sim, [_line(sim, "4510", 50.0), _line(sim, "1650", -40.0)])
    assert post(http, h, unbalanced).status_code == 500
    bad_guid_in_body = entry(sim, [{"GLAccount": "not-a-guid", "AmountFC": 1.0}, _line(sim, "1650", -1.0)])
    assert post(http, h, bad_guid_in_body).status_code == 500
    bad_json = http.post(GJE, content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert post(http, h, entry(sim, simple_lines(sim), Colour="red")).status_code == 400  # unknown field
    assert get(http, h, f"{GJE}(guid'nope')").status_code == 400
    bad_filter = get(http, h, "financialtransaction/TransactionLines", **{"$select": "ID",
                                                                          "$filter": "EntryID eq guid'nope'"})
    assert bad_filter.status_code == 400 and "Unrecognized 'Edm.Guid' literal" in odata_message(bad_filter)
    assert sim.entries(DIV) == []


def test_validation_500s_count_toward_the_error_block_but_outages_do_not(http, sim, h):
    unbalanced = entry(sim, [_line(sim, "4510", 50.0), _line(sim, "1650", -40.0)])
    for _ in range(5):
        sim.faults.arm("exact.post_entry", "http_503_before_store")
        assert post(http, h, unbalanced).status_code == 503
    for _ in range(9):
        assert post(http, h, unbalanced).status_code == 500
    assert sim.stats["errors"][f"{DIV} generaljournalentry/GeneralJournalEntries"] == 9
    assert post(http, h, entry(sim, simple_lines(sim))).status_code == 201
    assert post(http, h, unbalanced).status_code == 500  # the 10th
    blocked = post(http, h, entry(sim, simple_lines(sim)))
    assert blocked.status_code == 403 and "blocked" in blocked.headers["Reason"].lower()
    assert get(http, h, "financialtransaction/TransactionLines",
               **{"$select": "ID", "$filter": f"EntryID eq guid'{S.stable_guid('x', 'y')}'"}).status_code == 200
