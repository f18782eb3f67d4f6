"""Exactly-once posting against a scripted Exact, in both EntryID modes: intents, settlement after a crash, and the
rule for every answer to a POST (exact-online.md §7, §13)."""

import io
from datetime import date, datetime, timezone

import pytest

from expensify_exact import progress
from expensify_exact.api.exact.client import PostAnswer
from expensify_exact.cli.progress_view import LineView
from expensify_exact.clock import SystemClock
from expensify_exact.config import load_project_config
from expensify_exact.core.journal import build_journal_drafts, entry_body
from expensify_exact.core.posting import post_drafts
from expensify_exact.core.settlement import KEEPS_CLIENT_ENTRY_ID
from expensify_exact.core.verdicts import preview
from expensify_exact.errors import ApiError, ConnectionStopped, ErrorBudgetExhausted, RateLimitExhausted
from expensify_exact.notify import alerts
from tests.conftest import MAPPINGS
from tests.factories import expense_line, lines, seed_dimensions

CONFIG = load_project_config(MAPPINGS)
CONN = CONFIG.connections[0]


def drafts_for(*rows):
    return build_journal_drafts(lines(*rows), CONN, CONFIG, seed_dimensions(), run_date=date(2026, 11, 25))


class ScriptedExact:
    """Holds entries like Exact. `keeps_ids=False` assigns Exact's own EntryIDs (the strict reading of §13);
    `fail_next` lists what the next POSTs do instead of answering normally."""

    def __init__(self, keeps_ids: bool):
        self.keeps_ids = keeps_ids
        self.entries: dict[str, dict] = {}
        self.posts = 0
        self.lookups: list[str] = []
        self.fail_next: list[str] = []
        self.lines_query_refused = False
        self._stamp = 1000

    def _store(self, body):
        entry_id = body["EntryID"] if self.keeps_ids else f"eeee0000-0000-4000-8000-{len(self.entries) + 1:012d}"
        number = 26900000 + len(self.entries) + 1
        rows = []
        for line in body["GeneralJournalEntryLines"]:
            self._stamp += 1
            rows.append({**line, "EntryID": entry_id, "EntryNumber": number, "Timestamp": self._stamp})
        self.entries[entry_id] = {"EntryID": entry_id, "EntryNumber": number, "lines": rows}
        return {"EntryID": entry_id, "EntryNumber": number}

    def get_entry(self, entry_id):
        self.lookups.append("EntryID")
        entry = self.entries.get(entry_id)
        return None if entry is None else {k: v for k, v in entry.items() if k != "lines"}

    def entry_lines_by_description(self, descriptions):
        self.lookups.append("lines")
        if self.lines_query_refused:
            raise ApiError("exact", "A required filter is missing.", status=400)
        wanted = set(descriptions)
        return [r for e in self.entries.values() for r in e["lines"] if r["Description"] in wanted]

    def sync_rows(self, path, select, since=1):
        self.lookups.append("sync")
        assert path == "sync/Financial/TransactionLines"
        return [r for e in self.entries.values() for r in e["lines"] if r["Timestamp"] > since]

    def send_general_journal_entry(self, body):
        self.posts += 1
        action = self.fail_next.pop(0) if self.fail_next else "ok"
        if action == "budget":
            raise RateLimitExhausted("exact", "daily limit", resets_at="tomorrow")
        if action == "error_budget":
            raise ErrorBudgetExhausted("exact", "5 errors on generaljournalentry/GeneralJournalEntries this hour")
        if action == "forbidden":
            raise ConnectionStopped("exact", "Forbidden", status=403, reason="BlockedUser")
        if action == "reject_500":
            return PostAnswer("refused", status=500, message="Ongeldig: Kostenplaats")
        if action == "reject_400":
            return PostAnswer("rejected", status=400, message="Bad Request - Error in query syntax.")
        if action == "throttled":
            return PostAnswer("not_sent", status=429)
        if action in ("store_then_500", "lost_answer", "store_then_503"):
            self._store(body)
            if action == "store_then_500":
                return PostAnswer("refused", status=500, message="An error has occurred.")
            return PostAnswer("unknown", status=503 if action == "store_then_503" else None, message="dropped")
        if action == "timeout_not_stored":
            return PostAnswer("unknown", message="ReadTimeout")
        assert action == "ok", action
        return PostAnswer("created", entry=self._store(body), status=201)


@pytest.fixture(params=[False, True], ids=["exact_assigns_entry_ids", "exact_keeps_ours"])
def exact(request):
    return ScriptedExact(keeps_ids=request.param)


def run(store, exact, *report_ids, **kw):
    drafts = drafts_for(*(expense_line(report_id=r, transaction_id=str(1000 + i)) for i, r in enumerate(report_ids)))
    return post_drafts(drafts, connection=CONN.name, store=store, client=exact, **({"clock": SystemClock()} | kw))


def test_posts_each_report_once_records_exacts_entry_id_and_a_rerun_skips_them(store, exact):
    first = run(store, exact, "R1", "R2")
    assert [o.outcome for o in first.outcomes] == ["posted", "posted"]
    assert exact.posts == 2 and exact.lookups == [], "a normal post is one request"
    row = store.ledger_get(CONN.name, "R1")
    assert row.entry_id in exact.entries and first.outcomes[0].entry_id == row.entry_id
    assert (row.client_entry_id == row.entry_id) is exact.keeps_ids
    second = run(store, exact, "R1", "R2")
    assert [o.outcome for o in second.outcomes] == ["already_posted", "already_posted"]
    assert exact.posts == 2 and len(exact.entries) == 2


@pytest.mark.parametrize("fault", ["lost_answer", "store_then_503", "store_then_500"])
def test_an_answer_lost_after_exact_stored_it_is_found_by_the_reports_lines(store, exact, fault):
    exact.fail_next = [fault]
    result = run(store, exact, "R1", "R2")
    assert [o.outcome for o in result.outcomes] == ["posted", "posted"]
    assert len(exact.entries) == 2 and exact.posts == 2
    row = store.ledger_get(CONN.name, "R1")
    assert row.status == "posted" and row.entry_id in exact.entries
    # found by the EntryID we sent if Exact kept it; else "not found by EntryID" is never taken as "not there"
    assert exact.lookups == (["EntryID"] if exact.keeps_ids else ["EntryID", "lines"])


def test_a_pending_intent_left_by_a_crash_is_settled_before_anything_is_posted(store, exact):
    drafts = drafts_for(expense_line(report_id="R1"))
    body = None

    class Crash(BaseException):
        pass

    def crash_after_store(body_sent):
        nonlocal body
        body = body_sent
        exact._store(body_sent)
        raise Crash()

    exact.send_general_journal_entry = crash_after_store
    with pytest.raises(Crash):
        post_drafts(drafts, connection=CONN.name, store=store, client=exact, clock=SystemClock())
    assert store.ledger_get(CONN.name, "R1").status == "pending"
    del exact.send_general_journal_entry
    rerun = post_drafts(drafts, connection=CONN.name, store=store, client=exact, clock=SystemClock())
    assert [o.outcome for o in rerun.outcomes] == ["already_posted"]
    assert exact.posts == 0 and len(exact.entries) == 1
    assert store.ledger_get(CONN.name, "R1").entry_id in exact.entries


def test_the_recorded_fact_that_exact_assigns_its_own_ids_skips_the_entry_id_lookup(store):
    exact = ScriptedExact(keeps_ids=False)
    store.connection_fact_put(CONN.name, KEEPS_CLIENT_ENTRY_ID, False)
    exact.fail_next = ["lost_answer"]
    assert run(store, exact, "R1").outcomes[0].outcome == "posted"
    assert exact.lookups == ["lines"]


def test_a_wrong_fact_never_causes_a_second_post(store):
    exact = ScriptedExact(keeps_ids=False)
    store.connection_fact_put(CONN.name, KEEPS_CLIENT_ENTRY_ID, True)  # wrong: Exact assigns its own
    exact.fail_next = ["lost_answer"]
    assert run(store, exact, "R1").outcomes[0].outcome == "posted"
    assert exact.lookups == ["EntryID", "lines"] and len(exact.entries) == 1


def test_a_post_without_an_answer_that_did_not_land_is_deferred_and_the_run_goes_on(store, exact):
    exact.fail_next = ["timeout_not_stored"]
    result = run(store, exact, "R1", "R2")
    assert [o.outcome for o in result.outcomes] == ["deferred", "posted"]
    assert "no certain answer" in result.outcomes[0].reasons[0]["message"]
    assert store.ledger_get(CONN.name, "R1").status == "pending"  # the next run looks again first
    rerun = run(store, exact, "R1", "R2")
    assert [o.outcome for o in rerun.outcomes] == ["posted", "already_posted"]
    assert len(exact.entries) == 2


def test_a_500_with_exacts_message_that_did_not_land_is_quarantined_with_the_message(store, exact):
    exact.fail_next = ["reject_500"]
    result = run(store, exact, "R1", "R2")
    assert [o.outcome for o in result.outcomes] == ["quarantined", "posted"]
    item = store.quarantine_items(CONN.name)[0]
    assert item.reasons[0]["code"] == "REJECTED_BY_EXACT" and item.reasons[0]["message"] == "Ongeldig: Kostenplaats"
    assert item.reasons[0]["value"] == "500" and store.ledger_get(CONN.name, "R1") is None
    assert "lines" in exact.lookups  # a 500 is checked before it is believed


def test_a_400_is_quarantined_with_status_and_message_without_a_lookup(store, exact):
    exact.fail_next = ["reject_400"]
    result = run(store, exact, "R1", "R2")
    assert [o.outcome for o in result.outcomes] == ["quarantined", "posted"]
    reason = store.quarantine_items(CONN.name)[0].reasons[0]
    assert (reason["value"], reason["message"]) == ("400", "Bad Request - Error in query syntax.")
    assert exact.lookups == [] and store.ledger_get(CONN.name, "R1") is None


def test_a_429_that_outlasts_the_waits_defers_the_report_without_an_intent(store, exact):
    exact.fail_next = ["throttled"]
    result = run(store, exact, "R1", "R2")
    assert [o.outcome for o in result.outcomes] == ["deferred", "posted"]
    assert store.ledger_get(CONN.name, "R1") is None


@pytest.mark.parametrize("stop,words,alert_kind,title", [
    ("budget", "daily call budget", alerts.REPORTS_DEFERRED, "Exact's daily budget ran out: 2 report(s) deferred"),
    ("error_budget", "5 errors", alerts.REPORTS_DEFERRED, "2 report(s) deferred to the next run"),
    ("forbidden", "BlockedUser", alerts.CONNECTION_REFUSED, "Exact refused the connection: 2 report(s) deferred")])
def test_a_stop_of_the_connection_defers_the_rest_with_the_reason(store, exact, stop, words, alert_kind, title):
    exact.fail_next = ["ok", stop]
    events: list = []
    with progress.subscribed(events.append):
        result = run(store, exact, "R1", "R2", "R3", run_id="run-1")
    assert [o.outcome for o in result.outcomes] == ["posted", "deferred", "deferred"]
    assert "2 report(s) wait" in result.stopped_reason and words in result.stopped_reason
    assert words in result.outcomes[1].reasons[0]["message"]
    # The display hears of the stop once, with the reason, and of every report settled.
    [stopped] = [e for e in events if isinstance(e, progress.PostingStopped)]
    assert stopped.deferred == 2 and words in stopped.reason
    assert [(e.report_id, e.outcome) for e in events if isinstance(e, progress.ReportSettled)] == [
        ("R1", "posted"), ("R2", "deferred"), ("R3", "deferred")]
    # The operators are told, once per run: a refused connection as its own kind of alert.
    [alert] = alerts.deferred_reports(CONN, store, datetime.now(timezone.utc))
    assert alert.kind == alert_kind and title in alert.title
    assert words in alert.text and "R2, R3" in alert.text and "run-1" in alert.text
    assert [r.status for r in store.ledger_rows()] == ["posted"]
    rerun = run(store, exact, "R1", "R2", "R3")
    assert [o.outcome for o in rerun.outcomes] == ["already_posted", "posted", "posted"]


def test_reports_deferred_one_by_one_are_shown_and_alerted_with_their_own_reasons(store, exact):
    exact.fail_next = ["timeout_not_stored", "throttled"]
    shown = io.StringIO()
    with progress.subscribed(LineView(shown, None)):
        result = run(store, exact, "R1", "R2", "R3", run_id="run-2")
    assert [o.outcome for o in result.outcomes] == ["deferred", "deferred", "posted"]
    lines = shown.getvalue().splitlines()
    assert len(lines) == 2
    assert "report R1 deferred: no certain answer from Exact" in lines[0]
    assert "report R2 deferred: Exact kept answering 429" in lines[1]
    [alert] = alerts.deferred_reports(CONN, store, datetime.now(timezone.utc))
    assert alert.kind == alerts.REPORTS_DEFERRED and "2 report(s) deferred to the next run" in alert.title
    text = alert.text.splitlines()
    assert any(line.startswith("- no certain answer from Exact") and line.endswith(": R1") for line in text)
    assert any(line.startswith("- Exact kept answering 429") and line.endswith(": R2") for line in text)


def test_when_exact_refuses_the_lines_query_the_sync_twin_finds_the_entry(store):
    exact = ScriptedExact(keeps_ids=False)
    exact.lines_query_refused = True
    exact.fail_next = ["lost_answer"]
    assert run(store, exact, "R1").outcomes[0].outcome == "posted"
    assert exact.lookups[-2:] == ["lines", "sync"] and len(exact.entries) == 1


def test_a_changed_report_after_posting_is_quarantined_not_posted_again(store, exact):
    post_drafts(drafts_for(expense_line(report_id="R1")), connection=CONN.name, store=store, client=exact, clock=SystemClock())
    edited = drafts_for(expense_line(report_id="R1", converted_amount_cents=9999, amount_cents=9999))
    result = post_drafts(edited, connection=CONN.name, store=store, client=exact, clock=SystemClock())
    assert result.outcomes[0].reason_codes == ["CHANGED_AFTER_POSTING"]
    assert exact.posts == 1
    item = store.quarantine_items(CONN.name)[0]
    assert item.reasons[0]["value"] in exact.entries and "correction" not in item.reasons[0]
    assert item.correction == {"reverse_entry_id": item.reasons[0]["value"],
                               "corrected_entry": entry_body(edited.lines)}


def test_the_preview_reports_the_verdict_posting_then_acts_on_and_writes_nothing(store, exact):
    # What a dry run shows for each case: posting the same drafts afterwards must do exactly that.
    post_drafts(drafts_for(expense_line(report_id="R1"), expense_line(report_id="R2", transaction_id="2001")),
                connection=CONN.name, store=store, client=exact, clock=SystemClock())
    drafts = drafts_for(expense_line(report_id="R1"),  # unchanged: already posted
                        expense_line(report_id="R2", transaction_id="2001", converted_amount_cents=9999,
                                     amount_cents=9999),  # changed after posting
                        expense_line(report_id="R3", transaction_id="3001"),  # new
                        expense_line(report_id="R4", transaction_id="4001", category="Gifts"))  # fails a rule
    before = (store.ledger_rows(), store.quarantine_items(status=None), store.audit_rows(), exact.posts)
    verdicts = {v.report_id: v for v in preview(drafts, connection=CONN.name, store=store)}
    assert (store.ledger_rows(), store.quarantine_items(status=None), store.audit_rows(), exact.posts) == before
    assert {r: v.action for r, v in verdicts.items()} == {"R1": "already_posted", "R2": "quarantine", "R3": "post",
                                                          "R4": "quarantine"}
    assert verdicts["R2"].reason_codes == ["CHANGED_AFTER_POSTING"]
    assert verdicts["R2"].entry_id == store.ledger_get(CONN.name, "R2").entry_id
    assert verdicts["R4"].reason_codes == ["UNMAPPED_CATEGORY"] and verdicts["R4"].body is None
    new = verdicts["R3"]
    assert new.entry_id and new.content_hash and len(new.body["GeneralJournalEntryLines"]) == 2

    outcomes = {o.report_id: o for o in post_drafts(drafts, connection=CONN.name, store=store, client=exact, clock=SystemClock()).outcomes}
    assert {r: o.outcome for r, o in outcomes.items()} == {"R1": "already_posted", "R2": "quarantined",
                                                           "R3": "posted", "R4": "quarantined"}
    assert outcomes["R2"].reasons == verdicts["R2"].reasons and outcomes["R4"].reasons == verdicts["R4"].reasons
    ledger = store.ledger_get(CONN.name, "R3")
    assert new.entry_id in (ledger.client_entry_id, ledger.entry_id) and ledger.content_hash == new.content_hash
    assert exact.entries[outcomes["R3"].entry_id]["lines"][0]["Description"] == \
        new.body["GeneralJournalEntryLines"][0]["Description"]


def test_a_pending_intent_is_previewed_as_a_lookup_before_any_post(store, exact):
    exact.fail_next = ["timeout_not_stored"]
    run(store, exact, "R1")
    assert store.ledger_get(CONN.name, "R1").status == "pending"
    [verdict] = preview(drafts_for(expense_line(report_id="R1", transaction_id="1000")), connection=CONN.name,
                        store=store)
    assert verdict.action == "settle_pending" and store.ledger_get(CONN.name, "R1").entry_id in verdict.note


@pytest.mark.parametrize("fault, retry_at", [
    ("error_budget", "next_hour"), ("forbidden", "next_hour"), ("timeout_not_stored", "next_hour"),
    ("throttled", "next_hour"), ("budget_with_reset", "daily_reset"),
])
def test_every_deferred_report_is_recorded_with_when_the_sensor_may_try_it_again(store, exact, fault, retry_at):
    """Not only a spent daily budget defers: an endpoint's spent error budget, a 403 and an uncertain or throttled
    POST do too. Each is recorded for `post_deferred_after_reset`: at Exact's daily reset, else the next clock hour;
    its plan asks for the report's day then and not before, and a rerun that settles the report forgets it."""
    from datetime import datetime, timedelta, timezone

    from expensify_exact.core.days import deferred_run

    now = datetime(2026, 11, 25, 12, 20, tzinfo=timezone.utc)
    daily_reset = datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc)
    wanted = {"next_hour": datetime(2026, 11, 25, 13, 0, tzinfo=timezone.utc), "daily_reset": daily_reset}[retry_at]

    class Clock:
        def now(self):
            return now

    if fault == "budget_with_reset":
        def out_of_budget(body):
            raise RateLimitExhausted("exact", "daily limit", resets_at=daily_reset)
        exact.send_general_journal_entry = out_of_budget
    else:
        exact.fail_next = [fault]
    result = run(store, exact, "R1", clock=Clock())
    assert [o.outcome for o in result.outcomes] == ["deferred"]
    deferral = store.deferred(CONN.name)["R1"]
    assert (deferral.partition_date, deferral.resets_at) == ("2026-11-10", wanted)
    assert deferred_run(CONN, store, wanted - timedelta(minutes=1)) is None
    plan = deferred_run(CONN, store, wanted)
    assert (plan.start, plan.end) == (date(2026, 11, 10), date(2026, 11, 10))
    if fault != "budget_with_reset":
        assert [o.outcome for o in run(store, exact, "R1", clock=Clock()).outcomes] == ["posted"]
        assert store.deferred(CONN.name) == {}
