"""Many customers in one sandbox: each Exact division keeps its own limits and is made only when used, each partner
login its own rate limit and policies, and a scale scenario's reports post like the demo's.

Everything goes over real HTTP on 127.0.0.1 against `SandboxServer(scale=…)`, the way a benchmark drives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, time, timedelta, timezone

import httpx
import pytest

from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.expensify_app import RATE_LIMIT_MESSAGE
from expensify_exact_sandbox.scale import PartnerCredential, ScaleScenario
from expensify_exact_sandbox.server import SandboxServer

# Mid-minute, so sixty-one calls cannot straddle a clock minute; frozen, so nothing moves unless a test moves it.
START = datetime(2026, 12, 6, 9, 0, 5, tzinfo=timezone.utc)
DAY = date(2026, 12, 5)
SCENARIO = ScaleScenario(connections=6, reports_per_policy=20, day=DAY, credentials=2)
EXPORT_TEMPLATE = ('{"reports":[<#list reports as r>{"reportID":"${r.reportID}","policyID":"${r.policyID}",'
                   '"policyName":"${r.policyName}"}<#sep>,</#list>]}')


@pytest.fixture
def server():
    with SandboxServer(clock=SandboxClock(start=START, frozen=True), scale=SCENARIO) as running:
        running.expensify.set_knobs(render_delay_seconds=0)
        yield running


@pytest.fixture
def exact(server):
    with httpx.Client(base_url=server.exact_url, timeout=10) as client:
        yield client


@pytest.fixture
def expensify(server):
    with httpx.Client(base_url=server.expensify_url, timeout=10) as client:
        yield client


def access_token(exact: httpx.Client, refresh_token: str) -> dict:
    answer = exact.post("/api/oauth2/token", data={
        "grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": S.EXACT_CLIENT_ID,
        "client_secret": S.EXACT_CLIENT_SECRET})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}", "Accept": "application/json"}


def journals(exact: httpx.Client, headers: dict, division: int) -> httpx.Response:
    return exact.get(f"/api/v1/{division}/financial/Journals", headers=headers, params={"$select": "Code"})


def job(credential, **inner) -> dict:
    return {"requestJobDescription": json.dumps(
        {"credentials": {"partnerUserID": credential.user_id, "partnerUserSecret": credential.secret}, **inner})}


def policy_list(expensify: httpx.Client, credential) -> httpx.Response:
    return expensify.post("", data=job(credential, type="get", inputSettings={"type": "policyList"}))


def export(expensify: httpx.Client, credential, policies: list[str]) -> list[dict]:
    filters = {"approvedAfter": (DAY - timedelta(days=1)).isoformat(), "endDate": DAY.isoformat()}
    if policies:
        filters["policyIDList"] = ",".join(policies)
    answer = expensify.post("", data={**job(credential, type="file", outputSettings={"fileExtension": "json"},
                                            inputSettings={"type": "combinedReportData", "filters": filters}),
                                      "template": EXPORT_TEMPLATE})
    assert answer.status_code == 200 and not answer.text.startswith("{"), answer.text
    download = expensify.post("", data=job(credential, type="download", fileName=answer.text,
                                           fileSystem="integrationServer"))
    return json.loads(download.text)["reports"]


def test_a_customer_division_is_made_on_first_use_seeded_like_the_demo_but_with_its_own_ids(server, exact):
    first, second = SCENARIO.division(0), SCENARIO.division(1)
    assert first not in server.exact.ledgers and second not in server.exact.ledgers
    assert server.exact.entries(first) == []
    assert first not in server.exact.ledgers, "reading the entries of an unused division does not make its books"

    headers = access_token(exact, SCENARIO.refresh_token(0))
    me = exact.get("/api/v1/current/Me", headers=headers).json()["d"]["results"][0]
    assert me["CurrentDivision"] == first
    divisions = exact.get(f"/api/v1/{first}/system/Divisions", headers=headers,
                          params={"$select": "Code,Current"}).json()["d"]["results"]
    assert [(d["Code"], d["Current"]) for d in divisions] == [(first, True)], "a customer's user sees its own only"
    assert first in server.exact.ledgers and second not in server.exact.ledgers

    codes = {row["Code"] for row in journals(exact, headers, first).json()["d"]["results"]}
    assert codes == {j.code for j in S.JOURNALS}
    assert server.exact.gl_account_id("4500", first) != server.exact.gl_account_id("4500", S.DIVISION)


def test_a_customer_consent_reaches_its_own_division_only(server, exact):
    headers = access_token(exact, SCENARIO.refresh_token(0))
    assert journals(exact, headers, SCENARIO.division(1)).status_code == 403
    assert journals(exact, headers, S.DIVISION).status_code == 403
    demo = access_token(exact, S.EXACT_INITIAL_REFRESH_TOKEN)
    assert journals(exact, demo, SCENARIO.division(0)).status_code == 403
    assert journals(exact, demo, S.DIVISION).status_code == 200
    assert SCENARIO.division(1) not in server.exact.ledgers


def test_the_61st_call_of_a_minute_on_one_division_is_a_429_while_another_division_still_answers(server, exact):
    busy, quiet = SCENARIO.division(2), SCENARIO.division(3)
    busy_headers = access_token(exact, SCENARIO.refresh_token(2))
    quiet_headers = access_token(exact, SCENARIO.refresh_token(3))
    assert [journals(exact, busy_headers, busy).status_code for _ in range(60)] == [200] * 60
    refused = journals(exact, busy_headers, busy)
    assert refused.status_code == 429 and refused.headers["X-RateLimit-Minutely-Remaining"] == "0"
    answered = journals(exact, quiet_headers, quiet)
    assert answered.status_code == 200 and answered.headers["X-RateLimit-Minutely-Remaining"] == "59"

    stats = server.exact.stats
    assert stats["calls_by_division"][str(busy)] == 61 and stats["calls_by_division"][str(quiet)] == 1
    assert stats["max_calls_per_minute"][str(busy)] == 61
    assert stats["rate_limited_by_division"] == {str(busy): {"minutely": 1, "daily": 0}}

    server.clock.advance(60)
    assert journals(exact, busy_headers, busy).status_code == 200, "a new clock minute, a new budget"


def test_each_customer_division_has_its_own_daily_budget(server, exact):
    server.exact.set_knobs(daily_limit=3)
    spent, fresh = SCENARIO.division(4), SCENARIO.division(5)
    spent_headers = access_token(exact, SCENARIO.refresh_token(4))
    assert [journals(exact, spent_headers, spent).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert journals(exact, access_token(exact, SCENARIO.refresh_token(5)), fresh).status_code == 200
    assert server.exact.stats["rate_limited_by_division"] == {str(spent): {"minutely": 0, "daily": 1}}


def test_each_customer_division_has_its_own_error_budget(server, exact):
    blocked, fine = SCENARIO.division(0), SCENARIO.division(1)
    blocked_headers = access_token(exact, SCENARIO.refresh_token(0))
    unfiltered = [exact.get(f"/api/v1/{blocked}/financial/GLAccounts", headers=blocked_headers,
                            params={"$select": "Code"}).status_code for _ in range(10)]
    assert unfiltered == [400] * 10, "mandatory filtering refuses a GLAccounts read without a $filter"
    assert journals(exact, blocked_headers, blocked).status_code == 200, "the budget is per endpoint"
    refused = exact.get(f"/api/v1/{blocked}/financial/GLAccounts", headers=blocked_headers,
                        params={"$select": "Code", "$filter": "Code eq '4500'"})
    assert refused.status_code == 403 and refused.headers["Reason"] == "BlockedByErrorLimit"
    answered = exact.get(f"/api/v1/{fine}/financial/GLAccounts", headers=access_token(exact, SCENARIO.refresh_token(1)),
                         params={"$select": "Code", "$filter": "Code eq '4500'"})
    assert answered.status_code == 200


def test_each_customer_user_has_its_own_200_token_calls_a_day(server, exact):
    server.exact.set_knobs(token_calls_per_day=1)
    access_token(exact, SCENARIO.refresh_token(0))
    access_token(exact, SCENARIO.refresh_token(1))
    access_token(exact, S.EXACT_INITIAL_REFRESH_TOKEN)


def test_each_partner_login_sees_its_own_policies_only(server, expensify):
    server.expensify.set_knobs(rate_limiting=False)  # the limiter has its own test below
    first, second = SCENARIO.partner(0), SCENARIO.partner(1)
    listed = {p["id"] for p in policy_list(expensify, first).json()["policyList"]}
    assert listed == {SCENARIO.policy_id(i) for i in (0, 2, 4)} == \
        {SCENARIO.policy_id(i) for i in range(SCENARIO.connections) if SCENARIO.credential(i) == first}

    mine = export(expensify, first, [])
    assert len(mine) == 3 * SCENARIO.reports_per_policy
    assert {r["policyID"] for r in mine} == listed
    assert {r["policyName"] for r in mine} == {SCENARIO.customer_name(i) for i in (0, 2, 4)}
    assert export(expensify, first, [SCENARIO.policy_id(1)]) == [], "another login's policy exports nothing"
    assert len(export(expensify, second, [SCENARIO.policy_id(1)])) == SCENARIO.reports_per_policy
    demo = PartnerCredential("demo", S.EXPENSIFY_PARTNER_USER_ID, S.EXPENSIFY_PARTNER_USER_SECRET)
    assert export(expensify, demo, [SCENARIO.policy_id(0)]) == [], "the demo login owns none of them"
    assert {r["policyID"] for r in export(expensify, demo, [])} == {S.POLICY_ID}

    swapped = PartnerCredential("swapped", first.user_id, second.secret)
    assert policy_list(expensify, swapped).json()["responseCode"] == 404

    stats = server.expensify.stats
    assert stats["export_jobs_by_credential"][first.user_id] == {START.date().isoformat(): 2}
    assert stats["export_jobs_by_credential"][second.user_id] == {START.date().isoformat(): 1}


def test_a_second_partner_login_has_its_own_five_requests_per_ten_seconds(server, expensify):
    first, second = SCENARIO.partner(0), SCENARIO.partner(1)
    assert [policy_list(expensify, first).status_code for _ in range(5)] == [200] * 5
    refused = policy_list(expensify, first)
    assert refused.status_code == 429 and refused.text == RATE_LIMIT_MESSAGE
    assert policy_list(expensify, second).json()["responseCode"] == 200

    stats = server.expensify.stats
    assert stats["rate_limited_by_credential"] == {first.user_id: 1}
    assert stats["requests_by_credential"] == {first.user_id: 6, second.user_id: 1}
    server.clock.advance(10)
    assert policy_list(expensify, first).status_code == 200, "the window slides on"


def test_the_scenario_is_deterministic_and_its_reports_are_approved_on_the_day_in_amsterdam_too():
    again = ScaleScenario(connections=6, reports_per_policy=20, day=DAY, credentials=2)
    assert again.plan() == SCENARIO.plan()
    assert len({SCENARIO.policy_id(i) for i in range(6)}) == 6 and SCENARIO.policy_id(0) != S.POLICY_ID
    reports = [r for i in range(6) for r in SCENARIO.reports(i)]
    assert len({r.report_id for r in reports}) == 120
    assert len({e.transaction_id for r in reports for e in r.expenses}) == sum(len(r.expenses) for r in reports)
    assert all(r.approved.date() == DAY and 7 <= r.approved.hour <= 20 and r.state == "APPROVED" for r in reports)
    categories = {e.category for r in reports for e in r.expenses}
    offices = {e.tag.split(":")[0] for r in reports for e in r.expenses}
    assert "Gifts" not in categories and "Eindhoven" not in offices, "none of the demo's seeded problems"
    with pytest.raises(ValueError):
        ScaleScenario(connections=2, day=DAY, first_division=S.DIVISION - 1)


def test_serve_with_connections_opens_the_customers_and_scale_plan_lists_them(tmp_path):
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "expensify_exact_sandbox.cli", "scale-plan", "--connections", "3", "--credentials",
         "2", "--day", DAY.isoformat()], capture_output=True, text=True, check=True).stdout)
    scenario = ScaleScenario(connections=3, credentials=2, day=DAY)
    assert plan == scenario.plan()

    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "expensify_exact_sandbox.cli", "serve", "--exact-port", "0", "--expensify-port",
         "0", "--connections", "3", "--credentials", "2", "--day", DAY.isoformat()],
        stdout=subprocess.PIPE, text=True)
    try:
        exact_url = process.stdout.readline().split()[-1]
        process.stdout.readline()
        assert "3 customers" in process.stdout.readline()
        with httpx.Client(base_url=exact_url, timeout=10) as exact:
            headers = access_token(exact, plan["connections"][2]["exact_refresh_token"])
            assert journals(exact, headers, plan["connections"][2]["division"]).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_customers_reports_export_with_its_login_and_all_post_in_its_own_division(
        server, tmp_path, state_url, monkeypatch):
    """Through the connector itself, with the shipped mappings pointed at customer 1: every report validates and
    Exact takes every entry, in the customer's division and nowhere else."""
    from expensify_exact.cli.main import main
    from expensify_exact.config import load_project_config
    from expensify_exact.core.connections import build_exact_client, build_expensify_client
    from expensify_exact.core.draft_checks import split_invalid_drafts
    from expensify_exact.core.expense_lines import normalize_reports
    from expensify_exact.core.journal import build_journal_drafts, content_hash, entry_body, entry_id_for
    from expensify_exact.core.snapshots import fetch_dimensions
    from expensify_exact.store import StateStore
    from expensify_exact.store.vault import CredentialVault
    from tests.conftest import write_mappings

    customer = 1
    login = SCENARIO.credential(customer)
    monkeypatch.setenv("EXPENSIFY_PARTNER_USER_ID", login.user_id)
    monkeypatch.setenv("EXPENSIFY_PARTNER_USER_SECRET", login.secret)
    monkeypatch.setenv("EXACT_REFRESH_TOKEN", SCENARIO.refresh_token(customer))
    mappings = write_mappings(tmp_path / "mappings", server, expensify__poll_interval_seconds=0.05,
                              expensify__policy_ids=[SCENARIO.policy_id(customer)],
                              exact__division=SCENARIO.division(customer))
    connection = load_project_config(mappings).connections[0].name
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 connection, "--from-env"]) == 0
    config = load_project_config(mappings)
    conn = config.connection(connection)
    store = StateStore(state_url)
    vault = CredentialVault(store)
    clock = server.clock
    try:
        with build_expensify_client(conn, vault, clock=clock) as expensify:
            reports = expensify.export_reports(DAY, DAY, conn.expensify.policy_ids, timezone=conn.timezone,
                                               source_timezone=conn.expensify.timestamp_timezone)
        assert len(reports) == SCENARIO.reports_per_policy
        normalized = normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
        assert normalized.malformed.empty, normalized.malformed
        with build_exact_client(conn, vault, store, clock=clock) as exact:
            drafts = build_journal_drafts(normalized.lines, conn, config, fetch_dimensions(exact), run_date=DAY)
            drafts, failures = split_invalid_drafts(drafts)
            assert failures.empty and drafts.rejections.empty, (failures, drafts.rejections)
            kinds = []
            for report_id, lines in drafts.lines.groupby("report_id"):
                body = entry_body(lines)
                body["EntryID"] = entry_id_for(connection, report_id, content_hash(body))
                kinds.append(exact.send_general_journal_entry(body).kind)
    finally:
        store.dispose()
    assert [str(k) for k in kinds] == [str(kinds[0])] * SCENARIO.reports_per_policy and "created" in str(kinds[0])
    assert len(server.exact.entries(SCENARIO.division(customer))) == SCENARIO.reports_per_policy
    assert server.exact.entries(S.DIVISION) == [] and SCENARIO.division(0) not in server.exact.ledgers
    assert server.exact.stats["posts_by_division"] == {str(SCENARIO.division(customer)): SCENARIO.reports_per_policy}
