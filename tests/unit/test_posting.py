"""Exactly-once posting against a scripted Exact: intents, settlement after a crash, rejections, dry runs."""

from datetime import date

import pytest

from expensify_exact.config import load_project_config
from expensify_exact.errors import RateLimitExhausted, RejectedByApi, TransientApiError
from expensify_exact.posting import post_drafts
from expensify_exact.transform.journal import build_journal_drafts
from tests.conftest import MAPPINGS
from tests.factories import expense_line, lines, seed_dimensions

CONFIG = load_project_config(MAPPINGS)
CONN = CONFIG.connections[0]


def drafts_for(*rows):
    return build_journal_drafts(lines(*rows), CONN, CONFIG, seed_dimensions(), run_date=date(2026, 11, 25))


class ScriptedExact:
    """Holds entries by EntryID; `fail_next` lists what the next POSTs do instead of answering normally."""

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.posts = 0
        self.lookups = 0
        self.fail_next: list[str] = []

    def get_entry(self, entry_id):
        self.lookups += 1
        return self.entries.get(entry_id)

    def post_general_journal_entry(self, body):
        self.posts += 1
        action = self.fail_next.pop(0) if self.fail_next else "ok"
        if action == "reject":
            raise RejectedByApi("exact", "Ongeldig: Kostenplaats", status=500)
        if action == "budget":
            raise RateLimitExhausted("exact", "daily limit", resets_at="tomorrow")
        entry = {"EntryID": body["EntryID"], "EntryNumber": 26900000 + len(self.entries) + 1}
        if action in ("ok", "lost_answer"):
            self.entries[body["EntryID"]] = entry
        if action in ("lost_answer", "timeout_not_stored"):
            raise TransientApiError("exact", "connection dropped")
        return entry


def test_posts_each_report_once_and_a_rerun_skips_them(store):
    exact = ScriptedExact()
    drafts = drafts_for(expense_line(report_id="R1"), expense_line(report_id="R2"))
    first = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False, run_id="r1")
    assert [o.outcome for o in first.outcomes] == ["posted", "posted"]
    assert exact.posts == 2 and exact.lookups == 0, "a normal post is one request"
    second = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False, run_id="r2")
    assert [o.outcome for o in second.outcomes] == ["already_posted", "already_posted"]
    assert exact.posts == 2 and len(exact.entries) == 2


def test_a_lost_answer_is_settled_by_entry_id_and_never_posted_twice(store):
    exact = ScriptedExact()
    exact.fail_next = ["lost_answer"]
    drafts = drafts_for(expense_line(report_id="R1"))
    with pytest.raises(TransientApiError):
        post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert store.ledger_get(CONN.name, "R1").status == "pending"
    rerun = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert [o.outcome for o in rerun.outcomes] == ["already_posted"]
    assert exact.posts == 1 and len(exact.entries) == 1 and exact.lookups == 1
    assert store.ledger_get(CONN.name, "R1").status == "posted"


def test_a_pending_intent_that_never_landed_is_posted_on_the_next_run(store):
    exact = ScriptedExact()
    exact.fail_next = ["timeout_not_stored"]
    drafts = drafts_for(expense_line(report_id="R1"))
    with pytest.raises(TransientApiError):
        post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    rerun = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert [o.outcome for o in rerun.outcomes] == ["posted"]
    assert len(exact.entries) == 1 and exact.posts == 2


def test_a_rejection_by_exact_quarantines_the_report_with_exacts_message(store):
    exact = ScriptedExact()
    exact.fail_next = ["reject"]
    run = post_drafts(drafts_for(expense_line(report_id="R1")), connection=CONN.name, store=store, client=exact,
                      dry_run=False)
    assert run.outcomes[0].outcome == "quarantined"
    item = store.quarantine_items(CONN.name)[0]
    assert item.reasons[0]["code"] == "REJECTED_BY_EXACT" and "Ongeldig: Kostenplaats" in item.reasons[0]["message"]
    assert store.ledger_get(CONN.name, "R1") is None


def test_a_changed_report_after_posting_is_quarantined_not_posted_again(store):
    exact = ScriptedExact()
    post_drafts(drafts_for(expense_line(report_id="R1")), connection=CONN.name, store=store, client=exact,
                dry_run=False)
    edited = drafts_for(expense_line(report_id="R1", converted_amount_cents=9999, amount_cents=9999))
    run = post_drafts(edited, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert run.outcomes[0].reason_codes == ["CHANGED_AFTER_POSTING"]
    assert exact.posts == 1
    assert "corrected_entry" in store.quarantine_items(CONN.name)[0].reasons[0]["correction"]


def test_dry_run_writes_nothing_to_exact_ledger_or_quarantine(store):
    exact = ScriptedExact()
    drafts = drafts_for(expense_line(report_id="R1"), expense_line(report_id="R2", category="Gifts"))
    run = post_drafts(drafts, connection=CONN.name, store=store, client=None, dry_run=True)
    assert sorted(o.outcome for o in run.outcomes) == ["dry_run", "quarantined"]
    assert exact.posts == 0 and store.ledger_rows() == [] and store.quarantine_items() == []
    assert {r["event"] for r in store.audit_rows()} == {"dry_run"}


def test_a_used_up_daily_budget_defers_the_rest_without_failing(store):
    exact = ScriptedExact()
    exact.fail_next = ["ok", "budget"]
    drafts = drafts_for(expense_line(report_id="R1"), expense_line(report_id="R2"), expense_line(report_id="R3"))
    run = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert [o.outcome for o in run.outcomes] == ["posted", "deferred", "deferred"]
    assert "2 report(s) wait" in run.stopped_reason
    assert [r.status for r in store.ledger_rows()] == ["posted"]
    rerun = post_drafts(drafts, connection=CONN.name, store=store, client=exact, dry_run=False)
    assert [o.outcome for o in rerun.outcomes] == ["already_posted", "posted", "posted"]
