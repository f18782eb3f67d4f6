"""The reconciliation's comparisons as pure functions: each kind of disagreement between Expensify, the ledger and
Exact gets its own reason code, and agreement — VAT split off by Exact, corrections that reverse an entry on
purpose, card spend not yet settled — is never reported as a difference.
"""

from datetime import datetime, timezone

import pandas as pd
import pytest

from expensify_exact.core.readback import exact_lines_frame, trace_ids
from expensify_exact.core.reconcile import (
    EXPECTED_COLUMNS,
    Finding,
    card_liability_balances,
    reconcile_day,
    reconcile_month,
)
from expensify_exact.store import LedgerRow, QuarantineItem

DAY = "2026-11-03"
NOW = datetime(2026, 11, 4, tzinfo=timezone.utc)
E1, E2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


def _approved(*rows) -> pd.DataFrame:
    """(report, transaction, converted cents) → the expense-lines columns reconciliation reads."""
    return pd.DataFrame([{"report_id": r, "transaction_id": t, "converted_amount_cents": c, "partition_date": DAY}
                         for r, t, c in rows], columns=["report_id", "transaction_id", "converted_amount_cents",
                                                        "partition_date"])


def _expected(*rows) -> pd.DataFrame:
    """(report, transaction, GL, cost center, cents) → EXPECTED_COLUMNS."""
    return pd.DataFrame([{"report_id": r, "transaction_id": t, "gl_account_code": g, "cost_center": cc,
                          "cost_unit": "", "amount_cents": a, "currency": "EUR"} for r, t, g, cc, a in rows],
                        columns=EXPECTED_COLUMNS)


def _tline(entry, n, report, tx, gl, amount, cc=None, vat_code=None, vat_type=None, number=26900001):
    return {"ID": f"{entry[:8]}-{n}", "EntryID": entry, "EntryNumber": number, "LineNumber": n,
            "GLAccountCode": gl, "AmountFC": amount, "Currency": "EUR", "CostCenter": cc, "CostUnit": None,
            "VATCode": vat_code, "VATType": vat_type, "FinancialYear": 2026, "FinancialPeriod": 11,
            "JournalCode": "90", "Description": f"{report}/{tx} Hotel Okura",
            "Notes": None if vat_type == "O" else f"Expensify report {report}, transaction {tx}: Hotel Okura | Hotel"}


def _ledger(report="R1", entry=E1, total=10000, tids=("T1",), status="posted", day=DAY) -> LedgerRow:
    return LedgerRow("c", report, status, "hash", entry, 26900001, day, list(tids), total, NOW)


def _held(report, code="UNKNOWN_COST_CENTER", status="open") -> QuarantineItem:
    return QuarantineItem("c", report, status, DAY, [{"code": code, "message": "…"}], ["T9"], None, NOW, NOW, None)


R1_APPROVED = _approved(("R1", "T1", 10000))
R1_EXPECTED = _expected(("R1", "T1", "4510", "AMS", 10000), ("R1", "T1", "1650", "", -10000))
R1_IN_EXACT = [_tline(E1, 1, "R1", "T1", "4510", 100.0, "AMS"), _tline(E1, 2, "R1", "T1", "1650", -100.0)]


def _run(approved=R1_APPROVED, expected=R1_EXPECTED, ledger=(_ledger(),), quarantine=(), exact=R1_IN_EXACT,
         **kw):
    return reconcile_day(connection="c", day=DAY, approved=approved,
                         malformed=pd.DataFrame(columns=["report_id", "transaction_id", "reason", "detail"]),
                         expected=expected, ledger=list(ledger), quarantine=list(quarantine),
                         exact=exact_lines_frame(exact), **kw)


def _found(result) -> set[tuple[str, str]]:
    return {(f.code, f.report_id) for f in result.findings.itertuples(index=False)}


CASES = [
    # The baseline every other case changes one thing of: all three sides agree.
    ("clean", {}, set()),
    # Exact splits VAT off an including code; folded back, the gross amount still matches.
    ("vat split by Exact", {"exact": [_tline(E1, 1, "R1", "T1", "4510", 91.74, "AMS", "2", "I"),
                                      _tline(E1, 2, "R1", "T1", "1500", 8.26, None, "2", "O"),
                                      _tline(E1, 3, "R1", "T1", "1650", -100.0)]}, set()),
    # A report held in quarantine is settled, not missing.
    ("quarantined", {"ledger": (), "exact": [], "expected": R1_EXPECTED.iloc[0:0], "quarantine": (_held("R1"),)},
     set()),
    # Approved, yet neither posted nor held back.
    ("never posted", {"ledger": (), "exact": [], "expected": R1_EXPECTED.iloc[0:0]},
     {("NOT_POSTED", "R1")}),
    # A crash left an intent: still not posted as far as the books go.
    ("pending intent", {"ledger": (_ledger(status="pending"),), "exact": []}, {("NOT_POSTED", "R1")}),
    # Deleted in Exact: missing, and the day's totals no longer agree.
    ("deleted in Exact", {"exact": []}, {("MISSING_IN_EXACT", "R1"), ("TOTALS_DIFFER", "")}),
    ("amount edited", {"exact": [_tline(E1, 1, "R1", "T1", "4510", 90.0, "AMS"),
                                 _tline(E1, 2, "R1", "T1", "1650", -100.0)]},
     {("AMOUNT_CHANGED_IN_EXACT", "R1"), ("TOTALS_DIFFER", "")}),
    ("cost center edited", {"exact": [_tline(E1, 1, "R1", "T1", "4510", 100.0, "RTM"),
                                      _tline(E1, 2, "R1", "T1", "1650", -100.0)]},
     {("DIMENSION_CHANGED_IN_EXACT", "R1"), ("TOTALS_DIFFER", "")}),
    ("account edited", {"exact": [_tline(E1, 1, "R1", "T1", "4520", 100.0, "AMS"),
                                  _tline(E1, 2, "R1", "T1", "1650", -100.0)]},
     {("ACCOUNT_CHANGED_IN_EXACT", "R1"), ("TOTALS_DIFFER", "")}),
    # A second entry carries the same report in its descriptions.
    ("booked twice", {"exact": R1_IN_EXACT + [_tline(E2, 1, "R1", "T1", "4510", 100.0, "AMS", number=26900002),
                                              _tline(E2, 2, "R1", "T1", "1650", -100.0, number=26900002)]},
     {("POSTED_TWICE", "R1"), ("TOTALS_DIFFER", "")}),
    # An approved correction reversed the first entry on purpose: three entries, no duplicate.
    ("reversed by a correction", {
        "ledger": (_ledger(entry=E2),),
        "exact": R1_IN_EXACT + [_tline(E2, 1, "R1", "T1", "4510", 100.0, "AMS", number=26900002),
                                _tline(E2, 2, "R1", "T1", "1650", -100.0, number=26900002)],
        "reversed_entry_ids": {E1}}, set()),
    # The report changed in Expensify after posting and nobody quarantined that.
    ("changed in Expensify", {"approved": _approved(("R1", "T1", 12000)),
                              "expected": _expected(("R1", "T1", "4510", "AMS", 12000),
                                                    ("R1", "T1", "1650", "", -12000))},
     {("LEDGER_DIFFERS_FROM_EXPENSIFY", "R1")}),
    # ... but once posting quarantined it as CHANGED_AFTER_POSTING, the fix is already on its way.
    ("change already quarantined", {"approved": _approved(("R1", "T1", 12000)),
                                    "quarantine": (_held("R1", "CHANGED_AFTER_POSTING"),)}, set()),
    # The ledger holds a report for the day that Expensify no longer lists as approved.
    ("posted, no longer approved", {"approved": _approved(), "expected": R1_EXPECTED.iloc[0:0]},
     {("POSTED_NOT_APPROVED", "R1")}),
]


@pytest.mark.parametrize("name, changes, expected", CASES, ids=[c[0] for c in CASES])
def test_each_disagreement_has_its_own_reason_code(name, changes, expected):
    assert _found(_run(**changes)) == expected


def test_an_amount_change_reports_both_amounts_and_the_account():
    result = _run(exact=[_tline(E1, 1, "R1", "T1", "4510", 90.0, "AMS"), _tline(E1, 2, "R1", "T1", "1650", -100.0)])
    found = result.findings.query("code == 'AMOUNT_CHANGED_IN_EXACT'").iloc[0]
    assert (found["gl_account_code"], found["expected_cents"], found["actual_cents"]) == ("4510", 10000, 9000)
    assert found["message"] == "transaction T1 on GL 4510: 90.00 in Exact, 100.00 posted"


def test_a_clean_day_summary_says_zero_findings():
    result = _run()
    assert result.clean and result.summary().startswith("c 2026-11-03: 0 findings — Exact matches Expensify")


@pytest.mark.parametrize("description, notes, expected", [
    ("R00abc/4056 Hotel", "Expensify report R00abc, transaction 4056: Hotel | Hotel", ("R00abc", "4056")),
    # The VAT line Exact splits off keeps the Description but has no Notes.
    ("R00abc/4056 Hotel", None, ("R00abc", "4056")),
    # A bank line that merely contains a slash is not ours.
    ("ING/2026-10 creditcard statement", None, ("", "")),
    (None, None, ("", "")),
])
def test_trace_ids_come_from_notes_or_the_description(description, notes, expected):
    assert trace_ids(description, notes) == expected


def _account_lines(*rows):
    return exact_lines_frame([{"ID": f"x{i}", "EntryID": E1 if rid else E2, "LineNumber": i,
                               "GLAccountCode": "1660", "AmountFC": amount, "Currency": "EUR",
                               "Description": f"{rid}/1 Shell" if rid else "Creditcard statement"}
                              for i, (rid, amount) in enumerate(rows)])


@pytest.mark.parametrize("rows, status", [
    ([("R1", -50.0)], "awaiting settlement"),  # no statement booked yet: not a finding
    ([("R1", -50.0), ("", 50.0)], "nets to zero"),
    ([("R1", -50.0), ("", 45.0)], "open"),  # settled 5.00 short
])
def test_card_liability_is_judged_only_once_a_settlement_is_booked(rows, status):
    assert list(card_liability_balances(_account_lines(*rows), ["1660"])["status"]) == [status]


def test_a_month_rolls_up_days_and_flags_an_unsettled_card_account():
    clean = _run()
    month = reconcile_month(connection="c", month="2026-11", days={DAY: clean}, expected_days=[DAY, "2026-11-04"],
                            journal_lines=exact_lines_frame(R1_IN_EXACT),
                            account_lines=_account_lines(("R1", -50.0), ("", 45.0)), card_accounts=["1660"],
                            ledger=[_ledger()])
    assert _found(month) == {("CARD_LIABILITY_NOT_NETTED", "")}
    assert month.stats["days_missing"] == ["2026-11-04"]
    assert month.findings.iloc[0]["actual_cents"] == -500


def test_a_month_finds_a_report_booked_twice_on_different_days():
    journal = R1_IN_EXACT + [_tline(E2, 1, "R1", "T1", "4510", 100.0, "AMS", number=26900007)]
    month = reconcile_month(connection="c", month="2026-11", days={DAY: _run()}, expected_days=[DAY],
                            journal_lines=exact_lines_frame(journal), account_lines=_account_lines(),
                            card_accounts=["1660"], ledger=[_ledger()])
    assert _found(month) == {("POSTED_TWICE", "R1")}
    assert month.findings.iloc[0]["entry_number"] == 26900007


def test_a_clean_month_has_zero_findings_and_says_so():
    month = reconcile_month(connection="c", month="2026-11", days={DAY: _run()}, expected_days=[DAY],
                            journal_lines=exact_lines_frame(R1_IN_EXACT), account_lines=_account_lines(),
                            card_accounts=["1660"], ledger=[_ledger()])
    assert month.clean and "0 findings" in month.summary()
    assert Finding.CARD_LIABILITY_NOT_NETTED.value not in set(month.findings["code"])
