"""The daily digest as an accountant and a mail client see it: every section present, the fix for every
quarantine reason and finding, Expensify's free text never turned into markup, and the stored document renders
the same later in either format.
"""

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from expensify_exact.core.digest import Digest, build_digest, read_digest, render_html, render_markdown, write_digest
from expensify_exact.core.journal import REASON_FIXES, Reason
from expensify_exact.core.reconcile import FINDING_COLUMNS, FINDING_FIXES, TOTALS_COLUMNS, Finding, Reconciliation
from expensify_exact.store import LedgerRow, QuarantineItem

DAY = "2026-11-03"
NOW = datetime(2026, 11, 4, 6, 0, tzinfo=timezone.utc)
EVIL = '<script>alert("x")</script> | *bold* [link](http://evil)'


def _ledger(report, total, day=DAY):
    return LedgerRow("vh", report, "posted", "h", "e-" + report, 26900010, day, ["T1", "T2"], total, NOW)


def _item(report, code, message, day=DAY):
    return QuarantineItem("vh", report, "open", day, [{"code": code, "message": message, "transaction_id": "T9"}],
                          ["T9"], None, NOW, NOW, None)


def _recon(findings=()):
    frame = pd.DataFrame([{c: None for c in FINDING_COLUMNS} | f for f in findings], columns=FINDING_COLUMNS)
    totals = pd.DataFrame([{"gl_account_code": "4510", "cost_center": "AMS", "currency": "EUR",
                            "expected_cents": 18950, "actual_cents": 18950, "difference_cents": 0}],
                          columns=TOTALS_COLUMNS)
    return Reconciliation("vh", DAY, frame, totals, {"reports_approved": 2, "entries_checked": 1,
                                                     "exact_lines_read": 4},
                          exact_status={"calls_made": 5, "remaining_daily": 4870,
                                        "daily_resets_at": "2026-11-05T00:00:00+00:00", "remaining_minutely": 55})


def _digest(**kw):
    args = dict(connection="vh", day=DAY, ledger=[_ledger("R1", 18950), _ledger("R0", 500, day="2026-11-01")],
                quarantine=[_item("R2", "UNKNOWN_COST_CENTER", "cost center EHV does not exist"),
                            _item("R3", "UNMAPPED_CATEGORY", "category 'Gifts' maps to no GL account",
                                  day="2026-10-30")],
                reconciliation=_recon(), now=NOW,
                token_ages={"vh": (NOW - timedelta(minutes=4), NOW - timedelta(days=25))})
    return build_digest(**(args | kw))


def test_a_digest_lists_posted_reports_the_quarantine_with_fixes_findings_and_health():
    text = render_markdown(_digest())
    assert text.startswith("# Expense posting digest — vh — Tuesday 3 November 2026")
    assert "| R1 | 26900010 | EUR 189.50 | 2 | posted 2026-11-04 |" in text
    assert "R0" not in text, "only the day's reports are listed as posted"
    assert REASON_FIXES[Reason.UNKNOWN_COST_CENTER] in text and REASON_FIXES[Reason.UNMAPPED_CATEGORY] in text
    assert "## Waiting in quarantine: still open from earlier days" in text
    assert "Report R3 (approved 2026-10-30, transaction T9) — UNMAPPED_CATEGORY: category 'Gifts' maps to no GL account. Fix: " in text
    assert "0 findings" in text
    assert "daily budget left: 4870 (resets 2026-11-05 00:00 UTC)" in text
    assert "Access token issued 4 min ago" in text
    assert "re-authorize soon" in text, "25 of 30 idle days are gone: the accountant must be warned"


def test_each_finding_is_shown_with_what_to_do():
    recon = _recon([{"code": "MISSING_IN_EXACT", "report_id": "R1", "entry_number": 26900010,
                     "message": "entry 26900010 (189.50) of report R1 is not in Exact any more"}])
    text = render_markdown(_digest(reconciliation=recon))
    assert "| MISSING_IN_EXACT | R1 | 26900010 |" in text
    assert FINDING_FIXES[Finding.MISSING_IN_EXACT] in text
    assert "1 difference(s) that need attention" in text


def test_a_day_without_reconciliation_says_so_instead_of_claiming_a_clean_book():
    text = render_markdown(_digest(reconciliation=None))
    assert "has not run for this day" in text and "0 findings" not in text


@pytest.mark.parametrize("render, forbidden", [
    (render_html, ["<script>", "<a ", "*bold*" + "</"]),
    (render_markdown, ["<script>", "| *bold*", "[link](http"]),
])
def test_free_text_from_expensify_is_escaped_in_both_formats(render, forbidden):
    text = render(_digest(quarantine=[_item("R9", "UNMAPPED_TAG", EVIL)]))
    for needle in forbidden:
        assert needle not in text
    if render is render_html:
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


def test_a_pipe_in_a_table_cell_does_not_break_the_markdown_table():
    recon = _recon([{"code": "AMOUNT_CHANGED_IN_EXACT", "report_id": "R1", "message": "a | b"}])
    row = next(line for line in render_markdown(_digest(reconciliation=recon)).splitlines()
               if line.startswith("| AMOUNT_CHANGED"))
    assert row.count(" | ") == 5 and "a \\| b" in row


def test_a_written_digest_reads_back_and_renders_identically(tmp_path):
    digest = _digest()
    paths = write_digest(digest, tmp_path)
    assert paths["md"] == tmp_path / "vh" / f"{DAY}.md" and paths["html"].read_text().startswith("<!DOCTYPE html>")
    again = read_digest("vh", DAY, tmp_path)
    assert isinstance(again, Digest)
    assert again.render("md") == paths["md"].read_text() == digest.render("md")
    assert read_digest("vh", "2026-11-02", tmp_path) is None


def test_outcomes_of_the_posting_run_tell_posted_now_from_already_posted():
    outcomes = pd.DataFrame([
        {"connection": "vh", "partition_date": DAY, "report_id": "R1", "outcome": "posted", "entry_id": "e1",
         "entry_number": 26900010, "reason_codes": [], "reasons": [], "transaction_ids": ["T1"], "total_cents": 18950},
        {"connection": "vh", "partition_date": DAY, "report_id": "R4", "outcome": "already_posted", "entry_id": "e4",
         "entry_number": 26900004, "reason_codes": [], "reasons": [], "transaction_ids": ["T4"], "total_cents": 100}])
    digest = _digest(outcomes=outcomes)
    assert digest.headline.startswith("1 report(s) posted (EUR 189.50), 1 already in Exact")
    assert "| R4 | 26900004 | EUR 1.00 | 1 | already posted |" in render_markdown(digest)
