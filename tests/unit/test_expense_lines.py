"""Normalization of exported reports into expense lines: the contract the journal code builds on.

A wrong sign, a stray float or a shifted partition date posts wrong money to the ledger, and a line that
silently disappears is never posted at all, so every bad input must come back in `malformed`.
"""

from datetime import date, datetime, timezone

import pandas as pd
import pytest

from expensify_exact.api.expensify.client import export_windows
from expensify_exact.core.expense_lines import (
    COLUMNS,
    ExpenseLineSchema,
    normalize_reports,
    parse_report_timestamp,
    split_tag,
)


def report(**overrides) -> dict:
    base = {"reportID": "R00abc", "reportName": "July travel", "policyID": "7A3F", "policyName": "NL",
            "status": "Approved", "currency": "EUR", "total": 1234, "created": "2026-07-28 09:00:00",
            "submitted": "2026-07-29 10:00:00", "approved": "2026-07-31 12:00:00", "reimbursed": "",
            "accountEmail": "anna@example.nl", "transactionList": [expense()]}
    base.update(overrides)
    return base


def expense(**overrides) -> dict:
    base = {"transactionID": "4056343049275634494", "amount": 1234, "currency": "EUR", "convertedAmount": 1234,
            "currencyConversionRate": 1, "modifiedAmount": None, "modifiedCreated": "", "modifiedMerchant": "",
            "created": "2026-07-27", "merchant": "NS", "category": "Travel", "categoryGlCode": "4500",
            "tag": "Amsterdam:P1001", "ntag1": "Amsterdam", "ntag2": "P1001", "ntag3": "",
            "reimbursable": True, "billable": False, "taxName": "Laag 9%", "taxRate": 9, "taxAmount": 102,
            "taxCode": "id_TAX_9", "bank": "", "cardID": None, "cardNumber": "", "comment": "",
            "receiptURL": ""}
    base.update(overrides)
    return base


def one_line(rep: dict, tz: str = "Europe/Amsterdam") -> dict:
    result = normalize_reports([rep], tz)
    assert result.malformed.empty, result.malformed.to_dict("records")
    assert len(result.lines) == 1
    return result.lines.iloc[0].to_dict()


FIELD_CASES = [
    # The plain case: cents stay integers, the tag splits into levels.
    (report(), {"amount_cents": 1234, "converted_amount_cents": 1234, "tag_1": "Amsterdam", "tag_2": "P1001",
                "tag_3": "", "report_state": "APPROVED", "partition_date": "2026-07-31"}),
    # modifiedAmount / modifiedMerchant / modifiedCreated win over the originals when set.
    (report(transactionList=[expense(modifiedAmount=999, modifiedMerchant="NS (edited)", modifiedCreated="2026-07-20")]),
     {"amount_cents": 999, "merchant": "NS (edited)", "expense_date": "2026-07-20"}),
    # An empty modifiedMerchant / modifiedCreated means "not modified", not "blank".
    (report(transactionList=[expense(modifiedMerchant="", modifiedCreated="")]),
     {"merchant": "NS", "expense_date": "2026-07-27"}),
    # modifiedAmount 0 is "not modified" in Expensify's reconciliation dialect; never zero a real expense.
    (report(transactionList=[expense(modifiedAmount=0)]), {"amount_cents": 1234}),
    # A refund keeps its negative sign on both amounts.
    (report(transactionList=[expense(amount=-2290, convertedAmount=-2290, taxAmount=-189)]),
     {"amount_cents": -2290, "converted_amount_cents": -2290, "tax_amount_cents": -189}),
    # Foreign currency: original amount and currency kept, converted amount is in the report currency.
    (report(transactionList=[expense(amount=24900, currency="USD", convertedAmount=22940, currencyConversionRate=0.9213)]),
     {"amount_cents": 24900, "currency": "USD", "converted_amount_cents": 22940, "exchange_rate": 0.9213}),
    # No convertedAmount on a same-currency expense: the amount is already in the report currency.
    (report(transactionList=[expense(convertedAmount=None, currencyConversionRate=None)]),
     {"converted_amount_cents": 1234, "exchange_rate": 1.0}),
    # No convertedAmount but a rate: converted from it, rounded to whole cents.
    (report(transactionList=[expense(currency="USD", convertedAmount=None, currencyConversionRate=0.9213)]),
     {"converted_amount_cents": 1137}),
    # Booleans that FreeMarker printed as text are read as booleans.
    (report(transactionList=[expense(reimbursable="false", billable="true")]), {"reimbursable": False, "billable": True}),
    # An escaped colon is part of the level's name, not a level separator.
    (report(transactionList=[expense(tag="Office:Project\\:A")]),
     {"tag": "Office:Project\\:A", "tag_1": "Office", "tag_2": "Project:A"}),
    # No tag path but ntag levels: the levels are still filled.
    (report(transactionList=[expense(tag="", ntag1="Utrecht", ntag2="Internal")]),
     {"tag": "", "tag_1": "Utrecht", "tag_2": "Internal"}),
    # Card expenses keep the card; cash expenses with cardID 0 get "" like those without one.
    (report(transactionList=[expense(bank="ing_corporate", cardID=4242, cardNumber="5412XXXXXXXX4242")]),
     {"card_bank": "ing_corporate", "card_id": "4242", "card_number_masked": "5412XXXXXXXX4242"}),
    (report(transactionList=[expense(cardID=0)]), {"card_id": "", "card_bank": ""}),
    # Approved 22:30 UTC on 31 July is 1 August in Amsterdam (summer time, UTC+2).
    (report(approved="2026-07-31 22:30:00"), {"partition_date": "2026-08-01"}),
    # ... and 23:30 UTC on 31 January is 1 February in Amsterdam (winter time, UTC+1).
    (report(approved="2026-01-31 23:30:00"), {"partition_date": "2026-02-01"}),
    # 22:59 UTC in winter is still the same day in Amsterdam.
    (report(approved="2026-01-31 22:59:59"), {"partition_date": "2026-01-31"}),
    # The website's status names map to the exporter's reportState vocabulary.
    (report(status="Reimbursed", reimbursed="2026-08-02 08:00:00"), {"report_state": "REIMBURSED"}),
    # Timestamps are naive UTC in the export; they come out as aware UTC.
    (report(), {"approved_at": pd.Timestamp("2026-07-31 12:00:00", tz="UTC"),
                "submitted_at": pd.Timestamp("2026-07-29 10:00:00", tz="UTC")}),
    # Unicode, quotes and newlines pass through untouched.
    (report(transactionList=[expense(merchant='Café "Loetje"', comment="Team lunch\nafter workshop")]),
     {"merchant": 'Café "Loetje"', "comment": "Team lunch\nafter workshop"}),
]


@pytest.mark.parametrize(("rep", "expected"), FIELD_CASES)
def test_normalize_reports_maps_fields(rep, expected):
    line = one_line(rep)
    for column, value in expected.items():
        assert line[column] == value, column


MALFORMED_CASES = [
    # No transaction ID: the line cannot be tracked through posting.
    (expense(transactionID=""), "MISSING_ID"),
    # A decimal amount means the template or Expensify changed units; never guess.
    (expense(amount=12.5), "BAD_AMOUNT"),
    # A string amount that is not a whole number.
    (expense(amount="12.34"), "BAD_AMOUNT"),
    # No amount at all.
    (expense(amount=None), "BAD_AMOUNT"),
    # A foreign-currency expense with neither converted amount nor rate cannot be booked.
    (expense(currency="USD", convertedAmount=None, currencyConversionRate=None), "MISSING_CONVERSION"),
    # Currency must be an ISO code; lower case is not one.
    (expense(currency="eur"), "BAD_CURRENCY"),
    # An unparseable expense date.
    (expense(created="31-07-2026"), "BAD_DATE"),
    # A boolean that is neither true nor false.
    (expense(reimbursable="maybe"), "BAD_FLAG"),
]


@pytest.mark.parametrize(("exp", "reason"), MALFORMED_CASES)
def test_normalize_reports_returns_malformed_expenses_instead_of_dropping_them(exp, reason):
    good = expense(transactionID="1")
    result = normalize_reports([report(transactionList=[good, exp])], "Europe/Amsterdam")
    assert list(result.lines["transaction_id"]) == ["1"]
    assert list(result.malformed["reason"]) == [reason]
    assert result.malformed.iloc[0]["report_id"] == "R00abc"


REPORT_LEVEL_CASES = [
    # An approved report without an approval timestamp has no partition.
    (report(approved=""), "BAD_TIMESTAMP"),
    # A garbled timestamp.
    (report(approved="yesterday"), "BAD_TIMESTAMP"),
    # No report ID: nothing downstream could refer to the report.
    (report(reportID=""), "MISSING_ID"),
    # A report currency that is not ISO.
    (report(currency="Euro", transactionList=[expense(currency="EUR", convertedAmount=1234)]), "BAD_CURRENCY"),
]


@pytest.mark.parametrize(("rep", "reason"), REPORT_LEVEL_CASES)
def test_normalize_reports_flags_report_level_problems_on_every_line(rep, reason):
    result = normalize_reports([rep], "UTC")
    assert result.lines.empty
    assert list(result.malformed["reason"]) == [reason]


def test_normalize_reports_flags_both_copies_of_a_duplicate_transaction():
    result = normalize_reports([report(transactionList=[expense(), expense(), expense(transactionID="2")])], "UTC")
    assert list(result.lines["transaction_id"]) == ["2"]
    assert list(result.malformed["reason"]) == ["DUPLICATE", "DUPLICATE"]


def test_normalize_reports_output_has_exactly_the_contract_columns_and_dtypes():
    for reports in ([report()], []):
        lines = normalize_reports(reports, "UTC").lines
        assert {c: str(t) for c, t in lines.dtypes.items()} == {c: str(t) for c, t in COLUMNS.items()}
        ExpenseLineSchema.validate(lines)


def test_normalize_reports_keeps_reimbursed_at_null_until_reimbursed():
    line = one_line(report(reimbursed=""))
    assert pd.isna(line["reimbursed_at"])


def test_normalize_reports_reads_naive_timestamps_in_the_given_source_timezone():
    result = normalize_reports([report(approved="2026-07-31 23:30:00")], "Europe/Amsterdam",
                               source_timezone="Europe/Amsterdam")
    assert result.lines.iloc[0]["partition_date"] == "2026-07-31"
    assert result.lines.iloc[0]["approved_at"] == pd.Timestamp("2026-07-31 21:30:00", tz="UTC")


SPLIT_CASES = [
    # Empty tag: no levels.
    ("", []),
    # One level.
    ("Amsterdam", ["Amsterdam"]),
    # Levels joined by ":".
    ("Amsterdam:P1001 Rijkswaterstaat", ["Amsterdam", "P1001 Rijkswaterstaat"]),
    # "\:" is a literal colon inside a level.
    ("Office:Project\\:A", ["Office", "Project:A"]),
    # An escaped colon in the first level.
    ("Ratio 1\\:2:Sub", ["Ratio 1:2", "Sub"]),
    # Other backslashes are kept: only "\:" is an escape.
    ("C\\drive:x", ["C\\drive", "x"]),
    # Three levels, empty middle level kept in place.
    ("a::c", ["a", "", "c"]),
]


@pytest.mark.parametrize(("tag", "levels"), SPLIT_CASES)
def test_split_tag(tag, levels):
    assert split_tag(tag) == levels


TIMESTAMP_CASES = [
    # Expensify's naive report timestamp, read as UTC.
    ("2026-07-31 18:02:11", "UTC", datetime(2026, 7, 31, 18, 2, 11, tzinfo=timezone.utc)),
    # The same text in another source zone is another instant.
    ("2026-07-31 18:02:11", "Europe/Amsterdam", datetime(2026, 7, 31, 16, 2, 11, tzinfo=timezone.utc)),
    # A timestamp that carries its own offset keeps it.
    ("2026-07-31T18:02:11+02:00", "UTC", datetime(2026, 7, 31, 16, 2, 11, tzinfo=timezone.utc)),
    # Empty: the stage was not reached.
    ("", "UTC", None),
    (None, "UTC", None),
]


@pytest.mark.parametrize(("value", "zone", "expected"), TIMESTAMP_CASES)
def test_parse_report_timestamp(value, zone, expected):
    assert parse_report_timestamp(value, zone) == expected


WINDOW_CASES = [
    # A daily partition: one job, approvedAfter two days back (strictly-after + timezone margin), endDate +1.
    (date(2026, 7, 31), date(2026, 7, 31), [(date(2026, 7, 29), date(2026, 8, 1))]),
    # A 365-day backfill needs two jobs, each within the one-year endDate rule.
    (date(2025, 8, 1), date(2026, 7, 31), [(date(2025, 7, 30), date(2026, 7, 30)), (date(2026, 7, 30), date(2026, 8, 1))]),
    # Exactly as much as fits in one job: 363 days + the 2 margin days.
    (date(2025, 8, 1), date(2026, 7, 29), [(date(2025, 7, 30), date(2026, 7, 30))]),
]


@pytest.mark.parametrize(("start", "end", "expected"), WINDOW_CASES)
def test_export_windows(start, end, expected):
    windows = export_windows(start, end)
    assert [(w.approved_after, w.end_date) for w in windows] == expected
    assert all((w.end_date - w.approved_after).days <= 365 for w in windows)
