"""ExpensifyClient over HTTP: request shapes and error typing against scripted answers, then whole flows
against the Expensify simulator.

Expensify answers almost everything with HTTP 200 and hides the verdict in `responseCode`, renders exports
asynchronously without a ready signal, and rate-limits at 5 requests per 10 s: each of these, handled
wrongly, either loses reports silently or gets the credential throttled.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import httpx
import pytest

from expensify_exact.api.expensify.client import ExpensifyClient
from expensify_exact.core.expense_lines import normalize_reports
from expensify_exact.errors import AuthenticationError, RejectedByApi, TransientApiError
from expensify_exact_sandbox import seed as sandbox_seed
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.server import SandboxServer

URL = "https://expensify.test/Integration-Server/ExpensifyIntegrations"
USER, SECRET = "aa_finance_example_nl", "s3cret-partner-value"
T0 = datetime(2026, 8, 3, 9, 0, tzinfo=timezone.utc)


class ScriptedExpensify:
    """A callable server: answers each request with the next scripted (status, body) and records the job."""

    def __init__(self, *answers: tuple[int, str]):
        self.answers = list(answers)
        self.jobs: list[dict] = []
        self.forms: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.forms.append(form)
        self.jobs.append(json.loads(form["requestJobDescription"]))
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return httpx.Response(status, text=body, headers={"Content-Type": "text/plain;charset=utf-8"})


def scripted_client(app: ScriptedExpensify, clock: SandboxClock | None = None, **kw) -> ExpensifyClient:
    return ExpensifyClient(URL, USER, SECRET, clock or SandboxClock(T0, frozen=True),
                           transport=httpx.MockTransport(app), **kw)


def envelope(code: int, message: str) -> tuple[int, str]:
    return 200, json.dumps({"responseMessage": message, "responseCode": code})


def export_file(*reports: dict) -> tuple[int, str]:
    return 200, json.dumps({"reports": list(reports), "count": len(reports), "end": True})


EXPORT_ERROR_CASES = [
    # Wrong partner credentials, as measured live: 404 with "Authentication error".
    (envelope(404, "Authentication error"), AuthenticationError),
    # Other clients see the same message with 401.
    (envelope(401, "Authentication error"), AuthenticationError),
    # No credentials in the job at all.
    (envelope(403, "No authentication method specified"), AuthenticationError),
    # The template went missing from the form: a validation error, retrying will not help.
    (envelope(410, "No Template Submitted"), RejectedByApi),
    # Expensify's generic server failure: worth retrying later.
    (envelope(500, "Error encountered while trying to write report to file."), TransientApiError),
    # An undocumented code is still a refusal, not a success.
    (envelope(666, "Rule already exists"), RejectedByApi),
    # Servlet-level failures come as Tomcat HTML pages.
    ((500, "<html><head><title>HTTP Status 500 - JSONObject text must begin with '{'</title></head></html>"),
     TransientApiError),
    # The exporter answered nothing at all.
    ((200, ""), TransientApiError),
]


@pytest.mark.parametrize(("answer", "error"), EXPORT_ERROR_CASES)
def test_export_reports_raises_typed_errors_carrying_expensifys_message(answer, error):
    client = scripted_client(ScriptedExpensify(answer))
    with pytest.raises(error) as caught:
        client.export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"])
    if answer[1].startswith("{"):
        assert json.loads(answer[1])["responseMessage"] in str(caught.value)
    assert SECRET not in str(caught.value) and USER not in str(caught.value)
    assert SECRET not in repr(caught.value) and SECRET not in (caught.value.body_excerpt or "")


def test_errors_never_carry_credentials_even_when_expensify_echoes_them():
    echo = envelope(410, f"Bad request for partnerUserID {USER} with partnerUserSecret {SECRET}")
    with pytest.raises(RejectedByApi) as caught:
        scripted_client(ScriptedExpensify(echo)).get_policies(["P1"])
    for text in (str(caught.value), repr(caught.value), caught.value.body_excerpt, caught.value.api_message):
        assert SECRET not in text and USER not in text


def test_client_repr_hides_credentials():
    client = scripted_client(ScriptedExpensify((200, "")))
    assert SECRET not in repr(client) and USER not in repr(client)


def test_a_dropped_connection_is_transient_and_does_not_chain_the_request_holding_the_secret():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = ExpensifyClient(URL, USER, SECRET, SandboxClock(T0, frozen=True), transport=httpx.MockTransport(refuse))
    with pytest.raises(TransientApiError, match="connection failed") as caught:
        client.get_policies(["P1"])
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_export_job_sends_template_as_its_own_form_field_and_selects_approved_reports():
    app = ScriptedExpensify((200, "export0fd99e06-a636-4974-b6bc-3ceb12163386.json"), export_file())
    scripted_client(app).export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1", "P2"])
    form, job = app.forms[0], app.jobs[0]
    assert form["template"].lstrip().startswith("<#--") and "template" not in job
    assert job["type"] == "file" and job["onReceive"] == {"immediateResponse": ["returnRandomFileName"]}
    assert job["inputSettings"]["type"] == "combinedReportData"
    assert job["inputSettings"]["reportState"] == "APPROVED,REIMBURSED"
    assert job["inputSettings"]["filters"] == {"approvedAfter": "2026-07-30", "endDate": "2026-08-02",
                                               "policyIDList": "P1,P2"}
    assert "onFinish" not in job, "the first export must never label reports"
    assert app.jobs[1] == {"type": "download", "credentials": {"partnerUserID": USER, "partnerUserSecret": SECRET},
                           "fileName": "export0fd99e06-a636-4974-b6bc-3ceb12163386.json",
                           "fileSystem": "integrationServer"}


DOWNLOAD_NOT_READY_CASES = [
    # Nothing rendered yet: an empty 200 body.
    (200, ""),
    # The file is not there yet: an error envelope.
    envelope(404, "File not found"),
    # Half-written JSON.
    (200, '{"reports":[{"reportID":"R1"'),
    # Parses, but the trailer is missing: not complete.
    (200, json.dumps({"reports": []})),
]


@pytest.mark.parametrize("not_ready", DOWNLOAD_NOT_READY_CASES)
def test_download_polls_until_the_file_is_complete(not_ready):
    clock = SandboxClock(T0, frozen=True)
    app = ScriptedExpensify((200, "export1.json"), not_ready, not_ready, export_file())
    client = scripted_client(app, clock, poll_interval_seconds=5)
    assert client.export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"]) == []
    assert client.calls["export"] == 1 and client.calls["download"] == 3
    assert (clock.now() - T0).total_seconds() >= 15  # first wait + two polls that were not ready


def test_download_gives_up_after_the_poll_timeout_with_a_transient_error():
    clock = SandboxClock(T0, frozen=True)
    app = ScriptedExpensify((200, "export1.json"), (200, ""))
    client = scripted_client(app, clock, poll_interval_seconds=5, poll_timeout_seconds=60)
    with pytest.raises(TransientApiError, match="not ready after 60 s"):
        client.export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"])
    assert (clock.now() - T0).total_seconds() <= 60
    assert client.calls["download"] <= 12


def test_download_stops_at_once_when_credentials_are_refused():
    app = ScriptedExpensify((200, "export1.json"), envelope(404, "Authentication error"))
    client = scripted_client(app)
    with pytest.raises(AuthenticationError):
        client.export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"])
    assert client.calls["download"] == 1


def test_download_rejects_a_file_whose_trailer_count_disagrees():
    app = ScriptedExpensify((200, "export1.json"), (200, json.dumps({"reports": [], "count": 3, "end": True})))
    with pytest.raises(TransientApiError, match="trailer counts 3"):
        scripted_client(app).export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"])


def test_a_429_is_waited_out_and_then_retried():
    clock = SandboxClock(T0, frozen=True)
    app = ScriptedExpensify((429, "You have been rate-limited."), (200, "export1.json"), export_file())
    client = scripted_client(app, clock)
    assert client.export_reports(date(2026, 8, 1), date(2026, 8, 1), ["P1"]) == []
    assert client.calls_made == 3 and client.calls["export"] == 1
    assert (clock.now() - T0).total_seconds() >= 10


def test_a_429_that_outlasts_the_retries_becomes_a_transient_error():
    app = ScriptedExpensify((429, "You have been rate-limited. Please try again later."))
    with pytest.raises(TransientApiError, match="rate-limited") as caught:
        scripted_client(app).get_policies(["P1"])
    assert caught.value.status == 429


def test_mark_exported_labels_only_the_given_reports_in_a_separate_job():
    app = ScriptedExpensify((200, "export2.json"))
    client = scripted_client(app)
    client.mark_exported(["R1", "R2"], "expensify-exact")
    client.mark_exported([], "expensify-exact")  # nothing to label: no request at all
    [job] = app.jobs
    assert job["inputSettings"]["filters"] == {"reportIDList": "R1,R2"}
    assert job["onFinish"] == [{"actionName": "markAsExported", "label": "expensify-exact"}]
    assert client.calls["mark_exported"] == 1 and client.calls["download"] == 0


def test_policy_getter_flattens_both_tag_shapes():
    body = {"responseCode": 200, "policyInfo": {
        # Categories without a GL code: no key (the official sample), null or empty; a code typed as a number.
        "P1": {"categories": [{"name": "Meals", "glCode": "4520", "enabled": True}, {"name": "Old"},
                              {"name": "Parking", "glCode": None}, {"name": "Fuel", "glCode": 4510, "enabled": False}],
               "tags": [{"name": "Enterprise:Jean-Luc Picard", "enabled": True, "glCode": ""},
                        {"name": "Ratio 1\\:2", "glCode": "7"}],
               "tax": {"name": "Tax", "default": "id_TAX_21", "rates": [{"rate": 21, "name": "Hoog", "rateID": "id_TAX_21"}]}},
        "P2": {"tags": [{"name": "Office", "tags": [{"name": "Amsterdam", "enabled": True, "glCode": "AMS"}]},
                        {"name": "Project", "tags": [{"name": "P1001", "enabled": False, "glCode": ""}]}],
               "tax": {}}}}
    app = ScriptedExpensify((200, json.dumps(body)))
    policies = scripted_client(app).get_policies(["P1", "P2"])
    assert app.jobs[0]["inputSettings"] == {"type": "policy", "fields": ["categories", "tags", "tax"],
                                            "policyIDList": ["P1", "P2"]}
    p1, p2 = policies["P1"], policies["P2"]
    assert [(c.name, c.gl_code, c.enabled) for c in p1.categories] == [
        ("Meals", "4520", True), ("Old", "", True), ("Parking", "", True), ("Fuel", "4510", False)]
    # A flat path implies its parent level ("Enterprise"), listed after the explicit entries.
    assert [(t.level, t.name, t.gl_code, t.path) for t in p1.tags] == [
        (2, "Jean-Luc Picard", "", "Enterprise:Jean-Luc Picard"), (1, "Ratio 1:2", "7", "Ratio 1\\:2"),
        (1, "Enterprise", "", "Enterprise")]
    assert [(t.level, t.name, t.gl_code, t.enabled, t.list_name) for t in p2.tags] == [
        (1, "Amsterdam", "AMS", True, "Office"), (2, "P1001", "", False, "Project")]
    assert [(r.rate_id, r.rate) for r in p1.tax_rates] == [("id_TAX_21", 21.0)] and p1.default_tax_rate_id == "id_TAX_21"
    assert p2.tax_rates == ()


def test_reconciliation_flips_the_sign_and_keeps_unreported_transactions_only():
    rows = [{"transactionID": "9001", "reportID": 0, "cardID": "4242", "amount": -7420, "modifiedAmount": 0,
             "currency": "EUR", "created": "2026-07-31", "merchant": "Shell", "modifiedMerchant": ""},
            {"transactionID": "9002", "reportID": 0, "cardID": "4242", "amount": 1500, "modifiedAmount": None,
             "currency": "EUR", "created": "2026-07-31", "merchant": "Refund"},
            {"transactionID": "9003", "reportID": 77, "cardID": "4242", "amount": -100, "currency": "EUR"},
            None]
    app = ScriptedExpensify(
        (200, json.dumps({"filename": "is_reconciliation_5429137734434770049.json", "responseMessage": "OK",
                          "responseCode": 200})),
        (200, json.dumps({"transactions": rows, "end": True})))
    client = scripted_client(app)
    result = client.unreported_card_transactions(date(2026, 7, 1), date(2026, 7, 31), "example.nl")
    assert [(t["transaction_id"], t["amount_cents"]) for t in result] == [("9001", 7420), ("9002", -1500)]
    job, download = app.jobs
    assert job["inputSettings"] == {"type": "Unreported", "startDate": "2026-07-01", "endDate": "2026-07-31",
                                    "domain": "example.nl", "feed": "export_all_feeds", "async": False}
    assert "template" in app.forms[0] and download["fileSystem"] == "reconciliation"


# ------------------------------------------------------------------------------------ against the simulator

AMSTERDAM = "Europe/Amsterdam"
TODAY = T0.date()


@pytest.fixture(scope="module")
def sandbox():
    # One server for the module: stopping one takes a second. Each test gets a fresh minute (below).
    with SandboxServer(clock=SandboxClock(T0, frozen=True)) as server:
        server.defaults = server.expensify.set_knobs()
        yield server


@pytest.fixture
def sim_client(sandbox):
    sandbox.expensify.set_knobs(**sandbox.defaults)
    sandbox.faults.clear()
    sandbox.clock.advance(61)  # the previous test's requests leave every rate window
    client = ExpensifyClient(sandbox.expensify_url, sandbox_seed.EXPENSIFY_PARTNER_USER_ID,
                             sandbox_seed.EXPENSIFY_PARTNER_USER_SECRET, sandbox.clock, poll_timeout_seconds=120)
    yield client
    client.close()
    stats = sandbox.expensify.stats
    # Whatever the test did, the credential never went over Expensify's limits (expensify.md §7).
    assert max(stats["max_in_10s"].values(), default=0) <= 5
    assert max(stats["max_in_60s"].values(), default=0) <= 20


def approved_local_day(report: sandbox_seed.Report) -> date:
    return report.approved.replace(tzinfo=timezone.utc).astimezone(ZoneInfo(AMSTERDAM)).date()


def a_day_with_reports(seed: sandbox_seed.Seed) -> date:
    return max(approved_local_day(r) for r in seed.approved_reports if approved_local_day(r) < TODAY)


def test_daily_partition_holds_exactly_the_reports_approved_that_day_in_amsterdam(sandbox, sim_client):
    seed = sandbox.seed
    late = [r for r in seed.approved_reports if r.approved.hour >= 22]
    assert late, "the seed must approve some reports at 22:00-23:59 UTC, the next day in Amsterdam"
    for offset in range(1, 32):
        day = TODAY - timedelta(days=offset)
        reports = sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
        expected = {r.report_id for r in seed.approved_reports if approved_local_day(r) == day}
        assert {r["reportID"] for r in reports} == expected, day
        lines = normalize_reports(reports, AMSTERDAM).lines
        assert set(lines["partition_date"]) <= {day.isoformat()}
    # Each daily partition costs one export job and, with the default 2 s render, one download.
    assert sim_client.calls["export"] == 31 and sim_client.calls["download"] == 31


def test_export_waits_out_a_delayed_render_on_the_shared_clock(sandbox, sim_client):
    sandbox.expensify.set_knobs(render_delay_seconds=12)
    started = sandbox.clock.now()
    day = a_day_with_reports(sandbox.seed)
    reports = sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
    assert reports and sim_client.calls["download"] == 3  # after 5 s and 10 s: not yet; after 15 s: there
    assert 12 <= (sandbox.clock.now() - started).total_seconds() < 30


def test_export_treats_not_found_envelopes_as_not_ready(sandbox, sim_client):
    sandbox.expensify.set_knobs(render_delay_seconds=8, not_ready_behaviour="error")
    day = a_day_with_reports(sandbox.seed)
    assert sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
    assert sim_client.calls["download"] == 2


def test_complete_but_empty_export_is_told_apart_from_not_ready(sandbox, sim_client):
    sandbox.expensify.set_knobs(render_delay_seconds=8)
    started = sandbox.clock.now()
    day = date(2025, 1, 15)  # long before the seed: no report matches
    assert sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM) == []
    # Returned as soon as the rendered (empty) file was there, not after the poll timeout.
    assert sim_client.calls["download"] == 2 and (sandbox.clock.now() - started).total_seconds() < 20


def test_export_that_never_produces_a_file_fails_instead_of_reporting_no_reports(sandbox, sim_client):
    # If Expensify answered "no file" for an empty selection (expensify.md §2.3 candidate B), emptiness
    # cannot be proven: the client must fail loudly rather than post an empty day.
    sandbox.expensify.set_knobs(empty_result_behaviour="error")
    day = date(2025, 1, 15)
    with pytest.raises(TransientApiError, match="not ready after 120 s"):
        sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID])


SIM_ERROR_CASES = [
    # Wrong secret, with the live server's responseCode 404.
    ({"auth_error_code": 404}, None, AuthenticationError, "Authentication error"),
    # Wrong secret, with the 401 other clients assume.
    ({"auth_error_code": 401}, None, AuthenticationError, "Authentication error"),
    # An HTTP-200 envelope with responseCode 500.
    ({}, "envelope_500", TransientApiError, "responseCode 500"),
    # A Tomcat HTML error page.
    ({}, "html_500", TransientApiError, "HTTP 500"),
]


@pytest.mark.parametrize(("knobs", "fault", "error", "text"), SIM_ERROR_CASES)
def test_simulator_errors_become_typed_errors(sandbox, sim_client, knobs, fault, error, text):
    sandbox.expensify.set_knobs(**knobs)
    secret = sandbox_seed.EXPENSIFY_PARTNER_USER_SECRET if fault else "wrong-secret-value"
    if fault:
        sandbox.faults.arm("expensify.any", fault)
    client = ExpensifyClient(sandbox.expensify_url, sandbox_seed.EXPENSIFY_PARTNER_USER_ID, secret, sandbox.clock)
    with pytest.raises(error, match=text) as caught:
        client.export_reports(TODAY, TODAY, [sandbox_seed.POLICY_ID])
    assert secret not in str(caught.value) and secret not in (caught.value.body_excerpt or "")


def test_a_simulated_429_is_waited_out(sandbox, sim_client):
    sandbox.faults.arm("expensify.any", "rate_limit", times=2)
    before = sandbox.expensify.stats["rate_limited"]
    started = sandbox.clock.now()
    policies = sim_client.get_policies([sandbox_seed.POLICY_ID])
    assert sandbox_seed.POLICY_ID in policies
    assert sandbox.expensify.stats["rate_limited"] - before == 2
    assert (sandbox.clock.now() - started).total_seconds() >= 20


def test_a_burst_of_jobs_never_exceeds_five_requests_per_ten_seconds(sandbox, sim_client):
    before = sandbox.expensify.stats["rate_limited"]
    for _ in range(12):
        sim_client.get_policies([sandbox_seed.POLICY_ID])
    assert sandbox.expensify.stats["rate_limited"] == before  # never refused: paced before sending
    # (the fixture checks the simulator's own per-window maxima after every test)


def test_clients_sharing_the_state_db_request_log_stay_inside_the_window_together(sandbox, sim_client, store):
    """The steps of a run each build their own client; Expensify counts them together (expensify.md §7)."""
    from expensify_exact.core.connections import StoredRequestLog

    before = sandbox.expensify.stats["rate_limited"]
    clients = [ExpensifyClient(sandbox.expensify_url, sandbox_seed.EXPENSIFY_PARTNER_USER_ID,
                               sandbox_seed.EXPENSIFY_PARTNER_USER_SECRET, sandbox.clock,
                               request_log=StoredRequestLog(store, "vermeerhals-nl")) for _ in range(3)]
    started = sandbox.clock.now()
    for round_ in range(4):
        for client in clients:
            client.get_policies([sandbox_seed.POLICY_ID])
    for client in clients:
        client.close()
    assert sandbox.expensify.stats["rate_limited"] == before  # 12 requests, never one refused
    # 12 requests at 5 per 10 s: the sixth and the eleventh had to wait for the window
    assert (sandbox.clock.now() - started).total_seconds() >= 20
    assert len(store.request_log_since("expensify:vermeerhals-nl", started - timedelta(seconds=1))) == 12


def test_a_365_day_backfill_takes_two_export_jobs(sandbox, sim_client):
    jobs_before = sandbox.expensify.stats["export_jobs"]
    reports = sim_client.export_reports(TODAY - timedelta(days=365), TODAY - timedelta(days=1),
                                        [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
    assert sandbox.expensify.stats["export_jobs"] - jobs_before == 2
    expected = {r.report_id for r in sandbox.seed.approved_reports
                if TODAY - timedelta(days=365) <= approved_local_day(r) <= TODAY - timedelta(days=1)}
    assert {r["reportID"] for r in reports} == expected
    assert len(reports) == len(expected)  # the overlap between the two jobs is deduplicated


@pytest.mark.parametrize("shape", ["levels", "flat", "both"])
def test_policy_getter_reads_every_tag_shape(sandbox, sim_client, shape):
    sandbox.expensify.set_knobs(tag_shape=shape)
    policies = sim_client.get_policies([sandbox_seed.POLICY_ID])
    tags = {(t.level, t.name) for p in policies.values() for t in p.tags}
    assert {(1, "Amsterdam"), (1, "Eindhoven"), (2, "P1001 Rijkswaterstaat"), (2, "Internal")} <= tags
    policy = policies[sandbox_seed.POLICY_ID]
    assert {c.name: c.gl_code for c in policy.categories}["Travel"] == "4500"
    assert {r.name for r in policy.tax_rates} == {name for name, _, _ in sandbox_seed.TAX_RATES}
    assert sim_client.calls["policy"] == 1


@pytest.mark.parametrize("gl_codes", ["as_set", "always"])
def test_policy_getter_asks_only_documented_sections_and_reads_categories_without_a_gl_code(sandbox, sim_client,
                                                                                            gl_codes):
    # The sandbox refuses undocumented sections (410) and leaves glCode out where none is set, or sends "".
    sandbox.expensify.set_knobs(category_gl_codes=gl_codes)
    categories = {c.name: c for c in sim_client.get_policies([sandbox_seed.POLICY_ID])[sandbox_seed.POLICY_ID]
                  .categories}
    assert (categories["Gifts"].gl_code, categories["Gifts"].enabled) == ("", True)
    assert categories["Travel"].gl_code == "4500"


def test_reconciliation_returns_unreported_card_spend_as_positive_cents(sandbox, sim_client):
    result = sim_client.unreported_card_transactions(TODAY - timedelta(days=30), TODAY, sandbox_seed.CARD_DOMAIN)
    expected = {(t.transaction_id, t.amount, t.currency, t.card.card_id)
                for t in sandbox.seed.unreported_card_transactions}
    assert {(t["transaction_id"], t["amount_cents"], t["currency"], int(t["card_id"])) for t in result} == expected
    assert sim_client.calls["reconciliation"] == 1


def test_mark_exported_labels_only_the_given_reports(sandbox, sim_client):
    day = a_day_with_reports(sandbox.seed)
    reports = sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
    everyone = [r.report_id for r in sandbox.seed.reports]
    assert all(sandbox.expensify.labels(rid) == [] for rid in everyone), "the first export labelled reports"
    chosen = [reports[0]["reportID"]]
    sim_client.mark_exported(chosen, "expensify-exact")
    labelled = {rid for rid in everyone if "expensify-exact" in sandbox.expensify.labels(rid)}
    assert labelled == set(chosen)


def test_calls_per_daily_partition(sandbox, sim_client):
    # What one daily run costs against the simulator's default 2 s render: export, one download, policy.
    day = TODAY - timedelta(days=1)
    before = sandbox.expensify.stats["requests"]
    sim_client.export_reports(day, day, [sandbox_seed.POLICY_ID], timezone=AMSTERDAM)
    sim_client.get_policies([sandbox_seed.POLICY_ID])
    assert sim_client.calls == {"export": 1, "download": 1, "policy": 1, "reconciliation": 0, "mark_exported": 0}
    assert sandbox.expensify.stats["requests"] - before == 3

