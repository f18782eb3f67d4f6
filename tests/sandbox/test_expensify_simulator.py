"""The Expensify simulator must be as awkward as the real Integration Server (expensify.md §1–§7, §10).

A client that only passes a friendlier fake is worthless, so these tests pin the awkward parts: verdicts inside
HTTP 200, bare-filename answers, asynchronous renders, labels at job time, tight rate limits and FreeMarker errors.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import date, datetime, timezone
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest

from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.expensify_app import RATE_LIMIT_MESSAGE, ExpensifySimulator
from expensify_exact_sandbox.faults import FaultSwitches

TODAY = date(2026, 8, 10)
URL = "/Integration-Server/ExpensifyIntegrations"
CREDS = {"partnerUserID": S.EXPENSIFY_PARTNER_USER_ID, "partnerUserSecret": S.EXPENSIFY_PARTNER_USER_SECRET}
JSON_TEMPLATE = (
    '{"reports":[<#list reports as report>{"reportID":"${report.reportID}","status":"${report.status}",'
    '"approved":"${report.approved}","total":${report.total?c},"expenses":[<#list report.transactionList as e>'
    '{"id":"${e.transactionID}","amount":${e.amount?c},'
    '"modifiedAmount":"<#if e.modifiedAmount?is_number>${e.modifiedAmount?c}</#if>",'
    '"merchant":"${e.merchant?json_string}","modifiedMerchant":"${e.modifiedMerchant?json_string}",'
    '"glCode":"${e.categoryGlCode}","ntag1":"${e.ntag1!""}","card":"${e.cardNumber}",'
    '"reimbursable":${e.reimbursable?c},"receipt":"${(e.receiptObject.url)!""}"}<#sep>,</#list>]}<#sep>,</#list>],'
    '"end":true}'
)
RECON_TEMPLATE = (
    '[<#list cards as card, reports><#list reports as report><#list report.transactionList as t>'
    '{"card":"${card.name?json_string}","owner":"${card.owner}","reportID":${report.ID?c},'
    '"id":"${t.ID?c}","amount":${t.amount?c},"original":${t.originalAmount?c},'
    '"shown":${(-t.originalAmount/100)?c}}<#sep>,</#list><#sep>,</#list><#sep>,</#list>]'
)


@pytest.fixture
def clock():
    return SandboxClock(start=datetime(2026, 8, 10, 12, 0, tzinfo=timezone.utc), frozen=True)


@pytest.fixture
def faults():
    return FaultSwitches()


@pytest.fixture
def sim(clock, faults):
    simulator = ExpensifySimulator(S.build_seed(TODAY), clock, faults)
    simulator.set_knobs(rate_limiting=False)  # most tests are about other things; the limiter has its own tests
    return simulator


@pytest.fixture
def client(sim):
    with httpx.Client(transport=httpx.WSGITransport(app=sim), base_url="http://sandbox") as c:
        yield c


def post(client, job, template=None, *, creds=True, as_query=False, raw_job=None):
    if creds and "credentials" not in job:
        job = {**job, "credentials": CREDS}
    params = {"requestJobDescription": raw_job if raw_job is not None else json.dumps(job)}
    if template is not None:
        params["template"] = template
    if as_query:
        return client.post(URL, params=params, headers={"Content-Type": "application/json"})
    return client.post(URL, data=params)


def export_job(filters=None, **extra):
    job = {"type": "file", "onReceive": {"immediateResponse": ["returnRandomFileName"]},
           "inputSettings": {"type": "combinedReportData", "reportState": "APPROVED,REIMBURSED",
                             "filters": filters if filters is not None else {"startDate": "2026-07-01"}},
           "outputSettings": {"fileExtension": "json"}}
    for key, value in extra.items():
        if key in ("reportState", "limit", "employeeEmail"):
            job["inputSettings"][key] = value
        else:
            job[key] = value
    return job


def download(client, name, file_system="integrationServer"):
    return post(client, {"type": "download", "fileName": name, "fileSystem": file_system})


def export_and_fetch(client, clock, template=JSON_TEMPLATE, **kw):
    answer = post(client, export_job(**kw), template)
    assert answer.status_code == 200 and not answer.text.startswith("{"), answer.text
    clock.advance(2.5)
    return download(client, answer.text).text


def envelope(response):
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain;charset=utf-8"
    return response.json()


# --- transport (§1) --------------------------------------------------------------------------------------------


def test_parameters_are_read_from_the_query_string_as_well_as_the_form_body(client):
    body = post(client, {"type": "get", "inputSettings": {"type": "policyList"}})
    query = post(client, {"type": "get", "inputSettings": {"type": "policyList"}}, as_query=True)
    assert envelope(body)["responseCode"] == 200
    assert envelope(query) == envelope(body)


def test_single_quoted_pseudo_json_is_accepted_like_the_official_script_sends_it(client):
    raw = ("{'type':'get','credentials':{'partnerUserID':'%s','partnerUserSecret':'%s'},"
           "'inputSettings':{'type':'policyList','adminOnly':true}}"
           % (S.EXPENSIFY_PARTNER_USER_ID, S.EXPENSIFY_PARTNER_USER_SECRET))
    assert envelope(post(client, {}, raw_job=raw))["policyList"][0]["id"] == S.POLICY_ID


def test_python_true_literal_is_rejected_with_a_tomcat_jsonobject_page(client):
    raw = str({"type": "get", "credentials": CREDS, "inputSettings": {"type": "policyList", "adminOnly": True}})
    answer = post(client, {}, raw_job=raw)
    assert answer.status_code == 500
    assert "HTTP Status 500 - JSONObject" in answer.text


def test_missing_request_job_description_is_a_tomcat_500_page(client):
    answer = client.post(URL, data={"template": "x"})
    assert answer.status_code == 500 and "text/html" in answer.headers["content-type"]
    assert "HTTP Status 500 - requestJobDescription" in answer.text


def test_missing_credentials_answer_403_inside_http_200(client):
    answer = post(client, {"type": "get", "inputSettings": {"type": "policyList"}}, creds=False)
    assert envelope(answer) == {"responseMessage": "No authentication method specified", "responseCode": 403}


def test_wrong_credentials_answer_404_by_default_and_401_when_knobbed(client, sim):
    job = {"type": "get", "credentials": {**CREDS, "partnerUserSecret": "nope"},
           "inputSettings": {"type": "policyList"}}
    assert envelope(post(client, job)) == {"responseMessage": "Authentication error", "responseCode": 404}
    sim.set_knobs(auth_error_code=401)
    assert envelope(post(client, job))["responseCode"] == 401


# --- exporter validation (§2.1) ----------------------------------------------------------------------------------

VALIDATION_CASES = [
    # (why, job changes, template, expected code, message fragment)
    ("filters are required", {"filters": None}, JSON_TEMPLATE, 410, "Bad request"),
    ("empty filters are rejected", {"filters": {}}, JSON_TEMPLATE, 410, "Bad request"),
    ("endDate alone selects nothing", {"filters": {"endDate": "2026-08-01"}}, JSON_TEMPLATE, 410, "Bad request"),
    ("dates must be yyyy-mm-dd", {"filters": {"startDate": "16-01-01"}}, JSON_TEMPLATE, 410,
     "Malformed date '16-01-01'. Expected format is yyyy-MM-dd"),
    ("approvedAfter is a date too", {"filters": {"approvedAfter": "2026-7-1"}}, JSON_TEMPLATE, 410, "Malformed date"),
    ("old startDate needs an endDate", {"filters": {"startDate": "2025-01-01"}}, JSON_TEMPLATE, 410, "endDate"),
    ("window may not exceed a year", {"filters": {"startDate": "2025-01-01", "endDate": "2026-02-01"}},
     JSON_TEMPLATE, 410, "one year"),
    ("template is its own form field", {}, None, 410, "No Template Submitted"),
    ("reportState values are checked", {"reportState": "APPROVED,DONE"}, JSON_TEMPLATE, 410, "reportState"),
    ("limit is a number in a string", {"limit": "ten"}, JSON_TEMPLATE, 410, "limit"),
]


@pytest.mark.parametrize("why,changes,template,code,fragment", VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
def test_exporter_rejects_bad_requests_inside_http_200(client, why, changes, template, code, fragment):
    filters = changes.pop("filters") if "filters" in changes else {"startDate": "2026-07-01"}
    job = export_job(filters, **changes)
    if filters is None:
        del job["inputSettings"]["filters"]
    body = envelope(post(client, job, template))
    assert body["responseCode"] == code
    assert fragment in body["responseMessage"]


def test_template_nested_inside_the_json_counts_as_missing(client):
    job = export_job(template=JSON_TEMPLATE)
    assert envelope(post(client, job)) == {"responseMessage": "No Template Submitted", "responseCode": 410}


def test_export_answers_a_bare_filename_with_the_basename_glued_to_a_uuid(client):
    plain = post(client, export_job(), JSON_TEMPLATE)
    assert re.fullmatch(r"export[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\.json", plain.text)
    named = post(client, export_job(outputSettings={"fileExtension": "csv", "fileBasename": "myExport"}), "x")
    assert re.fullmatch(r"myExport[0-9a-f-]{36}\.csv", named.text)
    # the GO/PD spelling fileBaseName is an unknown key, silently ignored
    misspelt = post(client, export_job(outputSettings={"fileExtension": "csv", "fileBaseName": "mine"}), "x")
    assert misspelt.text.startswith("export")


# --- asynchronous render and download (§2.2, §2.3) ---------------------------------------------------------------


def test_download_is_empty_until_the_render_delay_has_passed(client, clock):
    name = post(client, export_job(), JSON_TEMPLATE).text
    early = download(client, name)
    assert early.status_code == 200 and early.content == b""
    clock.advance(1.0)
    assert download(client, name).content == b""
    clock.advance(1.5)
    assert json.loads(download(client, name).text)["end"] is True


def test_not_ready_can_be_an_error_envelope_instead(client, clock, sim):
    sim.set_knobs(not_ready_behaviour="error", render_delay_seconds=10)
    name = post(client, export_job(), JSON_TEMPLATE).text
    assert envelope(download(client, name)) == {"responseMessage": "File not found", "responseCode": 404}
    clock.advance(10)
    assert download(client, name).text.startswith('{"reports"')


def test_not_ready_fault_delays_a_ready_file_once(client, clock, faults):
    name = post(client, export_job(), JSON_TEMPLATE).text
    clock.advance(5)
    faults.arm("expensify.download", "not_ready")
    assert download(client, name).content == b""
    assert download(client, name).text.startswith('{"reports"')


def test_download_from_the_wrong_file_system_is_not_found(client, clock):
    name = post(client, export_job(), JSON_TEMPLATE).text
    clock.advance(5)
    assert envelope(download(client, name, "reconciliation"))["responseCode"] == 404
    assert envelope(download(client, "export-never-made.json"))["responseMessage"] == "File not found"


def test_an_empty_selection_renders_the_template_over_no_reports(client, clock):
    out = export_and_fetch(client, clock, filters={"reportIDList": "R00DOESNOTEX"})
    assert json.loads(out) == {"reports": [], "end": True}


def test_an_empty_selection_can_be_an_error_instead(client, clock, sim):
    sim.set_knobs(empty_result_behaviour="error")
    name = post(client, export_job({"reportIDList": "R00DOESNOTEX"}), JSON_TEMPLATE).text
    clock.advance(5)
    assert envelope(download(client, name))["responseCode"] == 404


def test_numbers_printed_without_c_keep_their_grouping_comma(client, clock):
    out = export_and_fetch(client, clock, template="<#list reports as r>${r.total};</#list>",
                           filters={"reportIDList": S._report_id(101)})
    assert out == "14,370;"


def test_a_template_error_becomes_the_file_not_a_silently_fixed_output(client, clock, sim):
    out = export_and_fetch(client, clock, template="<#list reports as r>${r.transactionList[0].reimbursable}</#list>")
    assert out.startswith("FreeMarker template error:")
    assert "Can't convert boolean to string automatically" in out
    sim.set_knobs(render_error_behaviour="envelope")
    name = post(client, export_job(), "${reports[0].nope}").text
    clock.advance(5)
    body = envelope(download(client, name))
    assert body["responseCode"] == 500 and "null or missing" in body["responseMessage"]


# --- selection filters ---------------------------------------------------------------------------------------------


def exported(client, clock, **kw):
    return json.loads(export_and_fetch(client, clock, **kw))["reports"]


def test_approved_after_is_strictly_after_the_given_day(client, clock, sim):
    approved_days = {r["reportID"]: r["approved"][:10] for r in sim.reports()
                     if r["state"] in ("APPROVED", "REIMBURSED")}
    day = "2026-07-31"
    assert day in approved_days.values()  # the boundary day exists in the seed, so an off-by-one shows
    got = exported(client, clock, filters={"approvedAfter": day})
    assert {r["reportID"] for r in got} == {rid for rid, d in approved_days.items() if d > day}


def test_approved_after_leaves_unapproved_reports_alone_unless_knobbed(client, clock, sim):
    submitted = [r["reportID"] for r in sim.reports() if r["state"] == "SUBMITTED"]
    got = exported(client, clock, filters={"approvedAfter": "2026-08-01"}, reportState="SUBMITTED,APPROVED")
    assert set(submitted) <= {r["reportID"] for r in got}
    sim.set_knobs(approved_after_keeps_unapproved=False)
    got = exported(client, clock, filters={"approvedAfter": "2026-08-01"}, reportState="SUBMITTED,APPROVED")
    assert not set(submitted) & {r["reportID"] for r in got}


def test_start_and_end_dates_are_inclusive_on_the_later_of_submitted_and_created(client, clock, sim):
    target = next(r for r in sim.reports() if r["state"] == "APPROVED")
    day = max(target["created"], target["submitted"])[:10]
    got = exported(client, clock, filters={"startDate": day, "endDate": day})
    assert target["reportID"] in {r["reportID"] for r in got}
    for r in sim.reports():
        if r["reportID"] in {g["reportID"] for g in got}:
            assert max(r["created"], r["submitted"])[:10] == day


def test_report_state_limit_and_id_list_narrow_the_selection(client, clock, sim):
    reimbursed = exported(client, clock, reportState="REIMBURSED")
    assert reimbursed and {r["status"] for r in reimbursed} == {"Reimbursed"}
    assert len(exported(client, clock, limit="3")) == 3
    some = [r["reportID"] for r in sim.reports()][:2]
    assert {r["reportID"] for r in exported(client, clock, filters={"reportIDList": ",".join(some)})} == set(some)


def test_drafts_only_come_out_when_named_by_id(client, clock, sim):
    rid = sim.add_report(name="Draft", employee_email=S.EMPLOYEES[0].email, state="OPEN",
                         expenses=[{"merchant": "X", "category": "Meals", "tag": "Amsterdam:Internal", "amount": 100}])
    job = export_job({"startDate": "2026-07-01"})
    del job["inputSettings"]["reportState"]
    name = post(client, job, JSON_TEMPLATE).text
    clock.advance(3)
    assert rid not in download(client, name).text
    assert rid in export_and_fetch(client, clock, filters={"reportIDList": rid}, reportState="OPEN")


def test_mark_as_exported_labels_at_job_time_and_the_label_filter_excludes_them(client, clock, sim):
    job = export_job(onFinish=[{"actionName": "markAsExported", "label": "Exact"}])
    post(client, job, JSON_TEMPLATE)
    labelled = [r["reportID"] for r in sim.reports() if sim.labels(r["reportID"]) == ["Exact"]]
    assert labelled, "labels must land before any download"
    again = exported(client, clock, filters={"startDate": "2026-07-01", "markedAsExported": "Exact"})
    assert not {r["reportID"] for r in again} & set(labelled)


def test_test_flag_suppresses_on_finish_actions(client, sim):
    post(client, export_job(onFinish=[{"actionName": "markAsExported", "label": "Exact"}], test="true"), JSON_TEMPLATE)
    assert all(not sim.labels(r["reportID"]) for r in sim.reports())


# --- data model (§3) ---------------------------------------------------------------------------------------------


def test_seeded_edits_put_the_truth_in_the_modified_fields(client, clock):
    expenses = [e for r in exported(client, clock) for e in r["expenses"]]
    edited = [e for e in expenses if e["modifiedAmount"]]
    assert edited, "some seeded expense must be modified so precedence is testable"
    for e in edited:
        assert int(e["modifiedAmount"]) != e["amount"]
        assert e["modifiedMerchant"] and e["modifiedMerchant"] != e["merchant"]
    assert any(e["modifiedAmount"] == "" and e["modifiedMerchant"] == "" for e in expenses)


def test_expense_fields_carry_gl_codes_tag_levels_cards_and_receipts(client, clock):
    expenses = [e for r in exported(client, clock) for e in r["expenses"]]
    assert {"4500", "4520"} <= {e["glCode"] for e in expenses}
    gifts = exported(client, clock, filters={"reportIDList": S._report_id(101)})[0]["expenses"]
    assert "" in {e["glCode"] for e in gifts}  # the seeded category without a GL code
    assert {e["ntag1"] for e in expenses} >= {"Amsterdam", "Rotterdam"}
    assert any(e["card"] == "5412XXXXXXXX4242" and e["reimbursable"] is False for e in expenses)
    assert any(e["receipt"].startswith("https://www.expensify.com/receipts/") for e in expenses)
    timestamps = [r["approved"] for r in exported(client, clock)]
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", t) for t in timestamps)


def test_report_timestamps_are_empty_strings_when_not_reached(sim):
    rid = sim.add_report(name="Fresh", employee_email=S.EMPLOYEES[1].email, state="SUBMITTED",
                         expenses=[{"merchant": "X", "category": "Taxi", "tag": "", "amount": 500}])
    model = sim.export_model([rid])["reports"][0]
    assert model["approved"] == "" and model["reimbursed"] == "" and model["submitted"]
    assert model["approvers"] == []


def test_untaxed_expenses_lack_tax_amount_so_templates_need_a_default(sim):
    expenses = [e for r in sim.export_model()["reports"] for e in r["transactionList"]]
    untaxed = [e for e in expenses if not e["hasTax"]]
    assert untaxed and all(e["taxAmount"] is None for e in untaxed)
    sim.set_knobs(untaxed_fields="zero")
    assert all(e["taxAmount"] == 0 for r in sim.export_model()["reports"] for e in r["transactionList"]
               if not e["hasTax"])


# --- policies, cards, reconciliation (§4, §6) --------------------------------------------------------------------


def test_policy_getter_validates_fields_and_policy_ids(client):
    missing_fields = {"type": "get", "inputSettings": {"type": "policy", "policyIDList": [S.POLICY_ID]}}
    assert envelope(post(client, missing_fields))["responseCode"] == 410
    missing_ids = {"type": "get", "inputSettings": {"type": "policy", "fields": ["categories"]}}
    assert envelope(post(client, missing_ids)) == {"responseMessage": "Required parameter 'policyIDList' is missing",
                                                   "responseCode": 410}
    # Sections outside the documented list (expensify.md §4.2) are refused, the strictest reading.
    unknown = {"type": "get", "inputSettings": {"type": "policy", "fields": ["categories", "approvalRules"],
                                                "policyIDList": [S.POLICY_ID]}}
    assert envelope(post(client, unknown))["responseCode"] == 410


def test_policy_getter_returns_only_requested_sections_with_gl_codes(client):
    job = {"type": "get", "inputSettings": {"type": "policy", "fields": ["categories", "tax", "employees"],
                                            "policyIDList": [S.POLICY_ID]}}
    info = envelope(post(client, job))["policyInfo"][S.POLICY_ID]
    assert set(info) == {"categories", "tax", "employees"}
    cats = {c["name"]: c for c in info["categories"]}
    # A category without a GL code carries no glCode key at all, as in the official doc's sample.
    assert cats["Travel"]["glCode"] == "4500" and "enabled" not in cats["Gifts"] and "glCode" not in cats["Gifts"]
    assert info["tax"]["name"] == "Tax"
    assert {r["rateID"] for r in info["tax"]["rates"]} == {"id_TAX_21", "id_TAX_9", "id_TAX_0"}


@pytest.mark.parametrize("shape", ["levels", "flat", "both"])
def test_tags_come_in_the_shape_the_knob_asks_for(client, sim, shape):
    sim.set_knobs(tag_shape=shape)
    job = {"type": "get", "inputSettings": {"type": "policy", "fields": ["tags"],
                                            "policyIDList": [S.POLICY_ID, "F1E2D3C4B5A69788"]}}
    info = envelope(post(client, job))["policyInfo"]
    main, personal = info[S.POLICY_ID]["tags"], info["F1E2D3C4B5A69788"]["tags"]
    if shape == "flat":
        assert "Amsterdam:P1001 Rijkswaterstaat" in {t["name"] for t in main}
    else:
        assert [lvl["name"] for lvl in main] == ["Office", "Project"]
        assert {t["name"] for t in main[0]["tags"]} == set(S.OFFICE_TAGS)
    assert (personal == []) == (shape in ("flat", "both"))


def test_domain_card_list_needs_the_admin_domain(client):
    ok = envelope(post(client, {"type": "get", "inputSettings": {"type": "domainCardList", "domain": S.CARD_DOMAIN}}))
    assert {c["cardID"] for c in ok["domainCardList"]} == {c.card_id for c in S.CARDS}
    denied = post(client, {"type": "get", "inputSettings": {"type": "domainCardList", "domain": "other.com"}})
    assert envelope(denied)["responseCode"] == 403


def recon_job(kind="All", **settings):
    base = {"type": kind, "startDate": "2026-07-01", "endDate": "2026-08-10", "domain": S.CARD_DOMAIN,
            "feed": "export_all_feeds", "async": False}
    return {"type": "reconciliation", "inputSettings": {**base, **settings},
            "outputSettings": {"fileExtension": "json"}}


def test_reconciliation_is_synchronous_and_downloads_from_its_own_file_system(client):
    answer = envelope(post(client, recon_job(), RECON_TEMPLATE))
    assert re.fullmatch(r"is_reconciliation_\d{19}\.json", answer["filename"])
    assert answer["responseMessage"] == "OK" and answer["responseCode"] == 200
    rows = json.loads(download(client, answer["filename"], "reconciliation").text)
    assert rows
    assert envelope(download(client, answer["filename"], "integrationServer"))["responseCode"] == 404


def test_reconciliation_spend_is_negative_raw_and_the_default_negation_shows_it_positive(client):
    rows = json.loads(download(client, envelope(post(client, recon_job(), RECON_TEMPLATE))["filename"],
                               "reconciliation").text)
    assert all(r["original"] < 0 and r["shown"] > 0 for r in rows)
    assert {r["card"] for r in rows} == {c.name for c in S.CARDS}


def test_unreported_card_transactions_sit_on_report_zero(client):
    rows = json.loads(download(client, envelope(post(client, recon_job("Unreported"), RECON_TEMPLATE))["filename"],
                               "reconciliation").text)
    assert {r["reportID"] for r in rows} == {0}
    assert {r["id"] for r in rows} == {u.transaction_id for u in S.build_seed(TODAY).unreported_card_transactions}


def test_reconciliation_validates_dates_extension_template_and_domain(client):
    assert "startDate" in envelope(post(client, recon_job(startDate=None), RECON_TEMPLATE))["responseMessage"]
    bad_ext = recon_job()
    bad_ext["outputSettings"] = {"fileExtension": "pdf"}
    assert envelope(post(client, bad_ext, RECON_TEMPLATE))["responseCode"] == 410
    assert envelope(post(client, recon_job(), None))["responseMessage"] == "No Template Submitted"
    assert envelope(post(client, recon_job(domain="other.com"), RECON_TEMPLATE))["responseCode"] == 403
    broken = envelope(post(client, recon_job(), "${cards}"))
    assert broken == {"responseMessage": "Error encountered while trying to write reconcilation report to file.",
                      "responseCode": 500}


def test_one_feed_limits_the_cards(client):
    rows = json.loads(download(client, envelope(post(client, recon_job(feed="amex"), RECON_TEMPLATE))["filename"],
                               "reconciliation").text)
    assert {r["card"] for r in rows} == {"Amex - Daan"}


# --- report status updater (§5.1) --------------------------------------------------------------------------------


def test_report_status_updater_reimburses_approved_and_skips_the_rest(client, sim):
    approved = next(r["reportID"] for r in sim.reports() if r["state"] == "APPROVED")
    submitted = next(r["reportID"] for r in sim.reports() if r["state"] == "SUBMITTED")
    job = {"type": "update", "inputSettings": {"type": "reportStatus", "status": "REIMBURSED",
                                               "filters": {"reportIDList": f"{approved},{submitted}"}}}
    body = envelope(post(client, job))
    assert body["responseCode"] == 200 and body["reportIDs"] == [approved]
    assert body["skippedReports"] == [{"reason": "Report is in status 'Processing'", "reportID": submitted}]
    job["inputSettings"]["status"] = "APPROVED"
    assert envelope(post(client, job)) == {"responseMessage": "Status 'APPROVED' is not supported", "responseCode": 410}


# --- rate limits and faults (§7) ---------------------------------------------------------------------------------


def test_sixth_request_within_ten_seconds_is_rate_limited_with_http_429(client, sim, clock):
    sim.set_knobs(rate_limiting=True)
    job = {"type": "get", "inputSettings": {"type": "policyList"}}
    for _ in range(5):
        assert post(client, job).status_code == 200
    limited = post(client, job)
    assert limited.status_code == 429 and limited.text == RATE_LIMIT_MESSAGE
    clock.advance(10.01)
    assert post(client, job).status_code == 200
    assert sim.stats["rate_limited"] == 1 and sim.stats["max_in_10s"][S.EXPENSIFY_PARTNER_USER_ID] == 6


def test_twenty_per_minute_binds_even_when_paced_under_five_per_ten_seconds(client, sim, clock):
    sim.set_knobs(rate_limiting=True)
    name = post(client, export_job(), JSON_TEMPLATE).text
    for _ in range(19):
        clock.advance(2.5)
        assert download(client, name).status_code == 200  # downloads count against the budget
    clock.advance(2.5)
    assert download(client, name).status_code == 429
    assert sim.stats["max_in_60s"][S.EXPENSIFY_PARTNER_USER_ID] == 21


def test_any_target_faults_change_the_answer_once(client, faults):
    job = {"type": "get", "inputSettings": {"type": "policyList"}}
    faults.arm("expensify.any", "rate_limit")
    faults.arm("expensify.any", "html_500")
    faults.arm("expensify.any", "envelope_500")
    assert post(client, job).status_code == 429
    html_page = post(client, job)
    assert html_page.status_code == 500 and "HTTP Status 500" in html_page.text
    assert envelope(post(client, job))["responseCode"] == 500
    assert envelope(post(client, job))["responseCode"] == 200


def test_concurrent_requests_are_all_counted(sim):
    def worker():
        with httpx.Client(transport=httpx.WSGITransport(app=sim), base_url="http://sandbox") as c:
            for _ in range(10):
                assert post(c, {"type": "get", "inputSettings": {"type": "policyList"}}).status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sim.stats["requests_by_job"]["get"] == 40


# --- control API (§10 of the brief) ------------------------------------------------------------------------------


def test_control_api_edits_reopens_and_reapproves_a_report(client, clock):
    reports = client.get("/_sandbox/expensify/reports").json()
    target = next(r for r in reports if r["state"] == "APPROVED")
    txn = target["expenses"][0]["transactionID"]
    clock.advance(3600)
    edited = client.post(f"/_sandbox/expensify/reports/{target['reportID']}", json={
        "expenses": [{"transactionID": txn, "amount": 9999, "category": "Hotel", "tag": "Utrecht:Internal"}],
        "state": "APPROVED", "approved": "now"}).json()
    assert edited["expenses"][0]["amount"] == 9999 and edited["expenses"][0]["category"] == "Hotel"
    assert edited["approved"] == "2026-08-10 13:00:00"
    got = exported(client, clock, filters={"approvedAfter": "2026-08-09"})
    exp = next(e for r in got if r["reportID"] == target["reportID"] for e in r["expenses"] if e["id"] == txn)
    assert exp["modifiedAmount"] == "9999" and exp["glCode"] == "4510"


def test_control_api_adds_reports_sets_knobs_arms_faults_and_reports_stats(client, clock):
    created = client.post("/_sandbox/expensify/reports", json={
        "reportName": "Added", "employeeEmail": S.EMPLOYEES[2].email, "state": "APPROVED",
        "expenses": [{"merchant": "Added BV", "category": "Meals", "tag": "Rotterdam:Internal", "amount": 1234}]})
    rid = created.json()["reportID"]
    knobs = client.post("/_sandbox/expensify/knobs", json={"render_delay_seconds": 0}).json()
    assert knobs["render_delay_seconds"] == 0
    assert client.post("/_sandbox/expensify/knobs", json={"no_such_knob": 1}).status_code == 400
    assert rid in download(client, post(client, export_job({"reportIDList": rid}), JSON_TEMPLATE).text).text
    client.post("/_sandbox/expensify/faults", json={"target": "expensify.any", "fault": "rate_limit"})
    assert post(client, {"type": "get", "inputSettings": {"type": "policyList"}}).status_code == 429
    stats = client.get("/_sandbox/expensify/stats").json()
    assert stats["export_jobs"] == 1 and stats["downloads"] == 1 and stats["requests_by_job"]["file"] == 1


# --- real HTTP ---------------------------------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_export_and_download_work_over_real_http(sim, clock):
    server = make_server("127.0.0.1", 0, sim, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with httpx.Client(base_url=base, timeout=5) as c:
            name = post(c, export_job(), JSON_TEMPLATE)
            assert name.headers["content-type"] == "text/plain;charset=utf-8"
            assert download(c, name.text).content == b""
            clock.advance(3)
            assert json.loads(download(c, name.text).text)["end"] is True
            assert c.get("/_sandbox/expensify/stats").json()["downloads"] == 2
            assert c.get(URL).status_code == 405
    finally:
        server.shutdown()
        server.server_close()
