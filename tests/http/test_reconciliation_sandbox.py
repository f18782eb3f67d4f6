"""Reconciliation against the Exact sandbox over real HTTP: what a bookkeeper can do behind the connector's back
(delete an entry, edit an amount or a cost center, book a report twice, settle a card account wrongly) and what
the connector can miss (an approved report that was never posted) are each found with the right reason code,
and a month where nothing of the kind happened reports zero findings and says so.

The demo data is posted with the plain-Python chain (export → normalize → drafts → post_drafts), not through
Dagster, so these tests stay fast and test the reconciliation alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from urllib.parse import unquote

import httpx
import pandas as pd
import pytest

from expensify_exact.cli.main import main
from expensify_exact.clock import SystemClock, connection_today
from expensify_exact.core import readback, reconcile
from expensify_exact.core.connections import build_exact_client
from expensify_exact.core.expense_lines import NormalizedLines, normalize_reports
from expensify_exact.core.journal import JournalDrafts, build_journal_drafts
from expensify_exact.core.posting import post_drafts
from expensify_exact.core.reconcile import Finding
from expensify_exact.core.snapshots import fetch_dimensions
from expensify_exact.defs.resources import ConnectorResource

CONNECTION = "vermeerhals-nl"


@dataclass
class Posted:
    connector: ConnectorResource
    lines_by_day: dict[str, NormalizedLines]
    outcomes: pd.DataFrame

    @property
    def conn(self):
        return self.connector.project().connection(CONNECTION)

    def reconcile(self, days=None) -> dict[str, reconcile.Reconciliation]:
        wanted = {d: v for d, v in self.lines_by_day.items() if days is None or d in days}
        return reconcile.reconcile_days(self.conn, self.connector.project(), wanted, self.connector.store(),
                                        self.connector.exact_client(self.conn), today=self.today)

    @property
    def today(self) -> date:
        return connection_today(self.conn.timezone, self.connector.clock())

    def posted(self) -> pd.DataFrame:
        return self.outcomes[self.outcomes["outcome"] == "posted"].sort_values(["partition_date", "report_id"])


def _post_window(sandbox, mappings, state_url, start: date, end: date, skip: set[str] = frozenset()) -> Posted:
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 CONNECTION, "--from-env"]) == 0
    connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
    project = connector.project()
    conn = project.connection(CONNECTION)
    with connector.expensify_client(conn) as client:
        reports = client.export_reports(start, end, conn.expensify.policy_ids, timezone=conn.timezone,
                                        source_timezone=conn.expensify.timestamp_timezone)
    normalized = normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
    exact = connector.exact_client(conn)
    drafts = build_journal_drafts(normalized.lines, conn, project, fetch_dimensions(exact), run_date=end)
    drafts = JournalDrafts(lines=drafts.lines[~drafts.lines["report_id"].isin(skip)], rejections=drafts.rejections)
    run = post_drafts(drafts, connection=CONNECTION, store=connector.store(), client=exact, clock=SystemClock())
    days = [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
    by_day = {d: NormalizedLines(normalized.lines[normalized.lines["partition_date"] == d],
                                 normalized.malformed.iloc[0:0]) for d in days}
    return Posted(connector, by_day, run.frame())


@pytest.fixture
def week(sandbox, sandbox_mappings, state_url) -> Posted:
    today = sandbox.seed.today
    return _post_window(sandbox, sandbox_mappings, state_url, today - timedelta(days=8), today - timedelta(days=1))


def _codes(results: dict[str, reconcile.Reconciliation]) -> dict[str, set[str]]:
    """report ID → the finding codes about it."""
    out: dict[str, set[str]] = {}
    for result in results.values():
        for f in result.findings.itertuples(index=False):
            out.setdefault(f.report_id, set()).add(f.code)
    return out


def test_a_clean_month_reports_zero_findings_and_says_so(sandbox, sandbox_mappings, state_url):
    today = sandbox.seed.today
    first_seeded = today - timedelta(days=31)
    month = (today - timedelta(days=15)).replace(day=1)
    start = max(month, first_seeded)
    next_month = (month + timedelta(days=32)).replace(day=1)
    end = min(next_month - timedelta(days=1), today - timedelta(days=1))
    posted = _post_window(sandbox, sandbox_mappings, state_url, start, end)
    assert len(posted.posted()) >= 5, "the month must hold real postings to prove anything"
    sandbox.exact.reset_stats()

    client = posted.connector.exact_client(posted.conn)
    days = reconcile.reconcile_days(posted.conn, posted.connector.project(), posted.lines_by_day,
                                    posted.connector.store(), client, today=posted.today)
    result = reconcile.reconcile_connection_month(posted.conn, month.isoformat()[:7], days, list(days),
                                                  posted.connector.store(), client)

    assert result.findings.empty, result.findings.to_string()
    assert result.summary().startswith(f"{CONNECTION} {month:%Y-%m}: 0 findings")
    assert result.stats["reports_posted"] == len(posted.posted())
    assert (result.totals["difference_cents"] == 0).all() and len(result.totals) > 3
    # Card spend without a booked card statement is waiting, not wrong.
    assert set(result.card_accounts["status"]) == {"awaiting settlement"}
    # Within the rate limits, every read accepted under mandatory filtering: the division check and the six dimension
    # tables once (GL accounts through the sync twin), the report look-up (GeneralJournalEntryLines by Description),
    # TransactionLines by EntryID in batched pages of 60, and one scan of the sync twin for the period's journal and
    # card accounts (pages of 1000): never a call per entry or per day.
    calls = sandbox.exact.stats["calls"]
    entries = sandbox.exact.entries()
    lines = sum(len(e["transaction_lines"]) for e in entries)
    line_pages = -(-sum(len(e["lines"]) for e in entries) // 60)
    lookups = calls["GET generaljournalentry/GeneralJournalEntryLines"]
    assert lookups <= line_pages + -(-len(posted.posted()) // readback.REPORTS_PER_QUERY), calls
    by_id, synced = calls["GET financialtransaction/TransactionLines"], calls["GET sync/Financial/TransactionLines"]
    assert by_id <= 2 * -(-lines // 60) + 1, calls
    assert synced <= lines // 1000 + 1, calls
    assert sum(calls.values()) - by_id - synced - lookups <= 2 + 6 + 1, calls


def test_an_entry_deleted_in_exact_is_found_as_missing(sandbox, week):
    victim = week.posted().iloc[0]
    sandbox.exact.delete_entry(victim["entry_id"])

    results = week.reconcile([victim["partition_date"]])

    assert _codes(results) == {victim["report_id"]: {Finding.MISSING_IN_EXACT}, "": {Finding.TOTALS_DIFFER}}
    finding = results[victim["partition_date"]].findings.iloc[0]
    assert finding["entry_number"] == victim["entry_number"] and finding["expected_cents"] == victim["total_cents"]


def test_an_amount_edited_in_exact_is_found_with_both_amounts(sandbox, week):
    victim = week.posted().iloc[1]
    entry = next(e for e in sandbox.exact.entries() if e["EntryID"] == victim["entry_id"])
    credit = next(t for t in entry["transaction_lines"] if t["AmountFC"] < 0)  # the payable line: no VAT split
    sandbox.exact.patch_line(victim["entry_id"], credit["LineNumber"], amount_fc=credit["AmountFC"] - 10)

    results = week.reconcile([victim["partition_date"]])

    assert _codes(results)[victim["report_id"]] == {Finding.AMOUNT_CHANGED_IN_EXACT}
    found = results[victim["partition_date"]].findings.query("code == 'AMOUNT_CHANGED_IN_EXACT'").iloc[0]
    assert found["actual_cents"] - found["expected_cents"] == -1000
    assert found["gl_account_code"] == credit["GLAccountCode"]


def test_a_cost_center_edited_in_exact_is_found_as_a_dimension_change(sandbox, week):
    victim = week.posted().iloc[2]
    entry = next(e for e in sandbox.exact.entries() if e["EntryID"] == victim["entry_id"])
    debit = next(t for t in entry["transaction_lines"] if t["CostCenter"])
    other = "RTM" if debit["CostCenter"] != "RTM" else "AMS"
    sandbox.exact.patch_line(victim["entry_id"], debit["LineNumber"], cost_center=other)

    results = week.reconcile([victim["partition_date"]])

    assert _codes(results)[victim["report_id"]] == {Finding.DIMENSION_CHANGED_IN_EXACT}
    message = results[victim["partition_date"]].findings.query("code == 'DIMENSION_CHANGED_IN_EXACT'").iloc[0][
        "message"]
    assert f"cost center {other} in Exact, {debit['CostCenter']} posted" in message
    totals = results[victim["partition_date"]].findings.query("code == 'TOTALS_DIFFER'")
    assert set(totals["cost_center"]) == {other, debit["CostCenter"]}


def test_an_approved_report_that_was_never_posted_is_found(sandbox, sandbox_mappings, state_url):
    today = sandbox.seed.today
    start, end = today - timedelta(days=4), today - timedelta(days=1)
    regular = sandbox.seed.reports[:30]  # the seed's plain reports: each maps cleanly and would be posted
    skipped = next(r.report_id for r in regular if start <= r.approved.date() <= end - timedelta(days=1))
    posted = _post_window(sandbox, sandbox_mappings, state_url, start, end, skip={skipped})

    results = posted.reconcile()

    assert _codes(results) == {skipped: {Finding.NOT_POSTED}}
    assert "neither in the posted ledger nor in quarantine" in next(
        r for r in results.values() if not r.clean).findings.iloc[0]["message"]


def test_a_report_booked_twice_in_exact_is_found(sandbox, week):
    victim = week.posted().iloc[0]
    entry = next(e for e in sandbox.exact.entries() if e["EntryID"] == victim["entry_id"])
    copy = {"JournalCode": entry["JournalCode"], "FinancialYear": entry["FinancialYear"],
            "FinancialPeriod": entry["FinancialPeriod"], "EntryID": "0b9d8c7e-6f5a-4b3c-8d2e-1f0a9b8c7d6e",
            "GeneralJournalEntryLines": [
                {k: line[k] for k in ("GLAccount", "AmountFC", "Description", "Notes", "CostCenter", "CostUnit",
                                      "VATCode") if line.get(k) is not None} for line in entry["lines"]]}
    copy_id = week.connector.exact_client(week.conn).send_general_journal_entry(copy).entry["EntryID"]

    results = week.reconcile([victim["partition_date"]])

    assert _codes(results)[victim["report_id"]] == {Finding.POSTED_TWICE}
    twice = results[victim["partition_date"]].findings.query("code == 'POSTED_TWICE'").iloc[0]
    assert twice["entry_id"] == copy_id and "(ledger)" in twice["message"]


class RefusingStringFunctions(httpx.BaseTransport):
    """An Exact that refuses `startswith(…)` in a $filter with 400 (whether it takes them bare is unconfirmed, §13)."""

    def __init__(self):
        self._inner = httpx.HTTPTransport(retries=2)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and "startswith" in unquote(str(request.url)):
            return httpx.Response(400, json={"error": {"code": "", "message": {
                "lang": "", "value": "Bad Request - Error in query syntax."}}}, request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def test_a_copy_nobody_recorded_is_found_even_where_exact_refuses_startswith(sandbox, week):
    victim = week.posted().iloc[0]
    entry = next(e for e in sandbox.exact.entries() if e["EntryID"] == victim["entry_id"])
    copy = {"JournalCode": entry["JournalCode"], "FinancialYear": entry["FinancialYear"],
            "FinancialPeriod": entry["FinancialPeriod"],
            "GeneralJournalEntryLines": [
                {k: line[k] for k in ("GLAccount", "AmountFC", "Description", "Notes", "CostCenter", "CostUnit",
                                      "VATCode") if line.get(k) is not None} for line in entry["lines"]]}
    copy_id = week.connector.exact_client(week.conn).send_general_journal_entry(copy).entry["EntryID"]
    sandbox.exact.reset_stats()

    with build_exact_client(week.conn, week.connector.vault(), week.connector.store(),
                            transport=RefusingStringFunctions()) as client:
        lines = readback.read_back_entries(client, [victim["entry_id"]], [victim["report_id"]])

    assert set(lines["entry_id"]) == {victim["entry_id"].lower(), copy_id.lower()}
    assert sandbox.exact.stats["calls"]["GET sync/Financial/TransactionLines"] >= 1


def test_a_card_account_that_does_not_net_to_zero_after_its_settlement_is_found(sandbox, week):
    client = week.connector.exact_client(week.conn)
    bank = sandbox.exact.add_gl_account("1100", "ING Bank", 12)
    days = week.reconcile()
    periods = pd.Series([(e["FinancialYear"], e["FinancialPeriod"]) for e in sandbox.exact.entries()])
    year, number = periods.value_counts().index[0]  # the week's busiest month
    month = f"{year}-{number:02d}"
    in_month = {d: r for d, r in days.items() if d.startswith(month)}
    before = reconcile.reconcile_connection_month(week.conn, month, in_month, list(in_month), week.connector.store(),
                                                  client)
    owed = before.card_accounts.set_index("gl_account_code")["ours_cents"]
    account = owed.index[0]
    card_id = sandbox.exact.gl_account_id(account)
    short = -int(owed[account]) - 500  # the statement paid 5.00 less than the card spend we booked

    client.send_general_journal_entry({
        "JournalCode": "90", "FinancialYear": year, "FinancialPeriod": number,
        "EntryID": "5e7c1d2a-3b4f-4a6e-9c8d-7f6e5d4c3b2a",
        "GeneralJournalEntryLines": [
            {"GLAccount": card_id, "AmountFC": short / 100, "Description": "Creditcard statement"},
            {"GLAccount": bank["ID"], "AmountFC": -short / 100, "Description": "Creditcard statement"}]})
    after = reconcile.reconcile_connection_month(week.conn, month, in_month, list(in_month), week.connector.store(),
                                                 client)

    assert before.findings.query("code == 'CARD_LIABILITY_NOT_NETTED'").empty
    nets = after.findings.query("code == 'CARD_LIABILITY_NOT_NETTED'")
    assert list(nets["gl_account_code"]) == [account]
    assert int(nets.iloc[0]["actual_cents"]) == -500
    assert after.card_accounts.set_index("gl_account_code").loc[account, "status"] == "open"
