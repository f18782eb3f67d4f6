"""Reading posted entries back from Exact for reconciliation: by EntryID, by report (through the lines' Description),
or a period of a journal's accounts through the sync twin; each line traced to its Expensify report and transaction,
with the VAT lines Exact splits off folded back into the amount they came from."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import pandas as pd

from expensify_exact.api.exact.odata import string_literal
from expensify_exact.core.snapshots import DimensionReader
from expensify_exact.errors import ApiError

# One read-back line of Exact, VAT folded back into the line it was split from, traced to its expense.
EXACT_LINE_COLUMNS = ["line_id", "entry_id", "entry_number", "line_number", "report_id", "transaction_id",
                      "gl_account_code", "cost_center", "cost_unit", "vat_code", "vat_type", "amount_cents",
                      "currency", "financial_year", "financial_period", "journal_code", "description"]
TRANSACTION_LINES = "financialtransaction/TransactionLines"
JOURNAL_ENTRY_LINES = "generaljournalentry/GeneralJournalEntryLines"
# TransactionLines only take a filter on ID or EntryID (mandatory filtering, exact-online.md §4.6/§13): lines found by
# anything else (journal, period, accounts) come from the sync twin and are picked out here.
SYNC_TRANSACTION_LINES = "sync/Financial/TransactionLines"
READ_BACK_SELECT = ("ID", "EntryID", "EntryNumber", "LineNumber", "FinancialYear", "FinancialPeriod", "JournalCode",
                    "GLAccountCode", "AmountFC", "Currency", "VATCode", "VATType", "CostCenter", "CostUnit",
                    "Description", "Notes")
# Each `startswith(Description,'…/') or …` clause is ~50 characters URL-encoded: 40 keep the URL far below both
# Exact's documented 6000 characters (§4.4) and the 8 KB query-string limit (§13).
REPORTS_PER_QUERY = 40
VAT_LINE_TYPE = "O"  # the VAT line Exact splits off an amount with an including VAT code (§5.9)

_NOTES_TRACE = re.compile(r"Expensify report (?P<report>[^,\s]+), transaction (?P<tx>[^:\s]+)")
# Expensify transaction IDs are digits; requiring them keeps "ING/2026-10 statement" from passing as ours.
_DESCRIPTION_TRACE = re.compile(r"^(?P<report>[A-Za-z0-9]+)/(?P<tx>\d+)(?:\s|$)")


class LineReader(Protocol):
    """What reconciliation needs from the Exact client."""

    def transaction_lines(self, entry_ids: Iterable[str], select: Sequence[str] = ...) -> list[dict]: ...

    def get_all(self, path: str, select: Sequence[str], filter: str | None = None,
                orderby: str | None = None) -> list[dict]: ...

    def sync_rows(self, path: str, select: Sequence[str], since: int = 1) -> list[dict]: ...


class RateBudget(Protocol):
    def status(self) -> dict[str, Any]: ...


class ExactReader(LineReader, DimensionReader, Protocol):
    """What reconciling needs from the Exact client: the reads, and its rate budget to report with the result."""

    @property
    def rate_limits(self) -> RateBudget: ...


def read_back_entries(client: LineReader, entry_ids: Iterable[str], report_ids: Iterable[str]) -> pd.DataFrame:
    """Exact's lines of the given entries and of every other entry whose lines carry one of the report IDs.

    The first set proves the ledger's entries still exist as posted; the second finds entries nobody recorded
    (a second copy of a report, booked by hand or by another tool). Every read satisfies Exact's mandatory
    filtering (exact-online.md §13): the report look-up asks `GeneralJournalEntryLines` (no sync twin, so no
    mandatory filter) for the EntryIDs whose line Description starts with `<report ID>/`, and the lines themselves
    come from `TransactionLines` filtered by `EntryID`, in batches joined with `or` that keep every URL far below
    8 KB (`REPORTS_PER_QUERY`, `ENTRY_IDS_PER_QUERY`), paced within Exact's rate limits (§6).

    Args:
        client: the connection's ExactClient.
        entry_ids: EntryIDs the ledger (and the audit log) knows for these reports (Exact's own where it chose).
        report_ids: the Expensify report IDs whose entries to look for.

    Returns:
        EXACT_LINE_COLUMNS, one row per line (duplicates from both reads removed), VAT folded back.
    """
    wanted = {str(e).lower() for e in entry_ids if e}
    ids = sorted({r for r in report_ids if r})
    copies: list[dict] = []
    try:
        for start in range(0, len(ids), REPORTS_PER_QUERY):
            chunk = ids[start:start + REPORTS_PER_QUERY]
            flt = " or ".join(f"startswith(Description,{string_literal(rid + '/')})" for rid in chunk)
            wanted |= {str(r["EntryID"]).lower() for r in client.get_all(JOURNAL_ENTRY_LINES, ("EntryID",),
                                                                           filter=flt) if r.get("EntryID")}
    except ApiError as exc:
        if exc.status != 400:
            raise
        # Exact refused the string function (whether it takes them bare is unconfirmed, §13): pick the reports'
        # lines out of the sync twin instead, which costs a scan of the division's lines.
        prefixes = tuple(f"{rid}/" for rid in ids)
        copies = [r for r in client.sync_rows(SYNC_TRANSACTION_LINES, READ_BACK_SELECT)
                  if str(r.get("Description") or "").startswith(prefixes)]
    return exact_lines_frame([*client.transaction_lines(sorted(wanted), select=READ_BACK_SELECT), *copies])


def read_back_period(client: LineReader, *, journal: str, accounts: Iterable[str], year: int,
                     period: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All lines of the connector's journal in a financial period, and all lines on the given accounts in it.

    Both come from one scan of `sync/Financial/TransactionLines` (`Timestamp gt 1L`, 1000 lines a page), picked out
    here: TransactionLines take a filter only on ID or EntryID (mandatory filtering, exact-online.md §13) and sync
    endpoints only on Timestamp. The account lines include other journals' (the bank journal's card settlements).
    The scan grows with the division's history; it runs once a month.

    Returns:
        (journal lines, account lines), both EXACT_LINE_COLUMNS.
    """
    codes = set(accounts)
    in_period = [r for r in client.sync_rows(SYNC_TRANSACTION_LINES, READ_BACK_SELECT)
                 if int(r.get("FinancialYear") or 0) == int(year) and int(r.get("FinancialPeriod") or 0) == int(period)]
    journal_rows = [r for r in in_period if str(r.get("JournalCode") or "").strip() == journal]
    account_rows = [r for r in in_period if str(r.get("GLAccountCode") or "").strip() in codes]
    return exact_lines_frame(journal_rows), exact_lines_frame(account_rows)


def exact_lines_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """TransactionLines records → EXACT_LINE_COLUMNS, each traced to its report and transaction, VAT folded."""
    out, seen = [], set()
    for r in rows:
        line_id = str(r.get("ID") or "").lower()
        if line_id and line_id in seen:
            continue
        seen.add(line_id)
        report_id, tx = trace_ids(r.get("Description"), r.get("Notes"))
        out.append({
            "line_id": line_id, "entry_id": str(r.get("EntryID") or "").lower(),
            "entry_number": int_or_none(r.get("EntryNumber")), "line_number": int(r.get("LineNumber") or 0),
            "report_id": report_id, "transaction_id": tx, "gl_account_code": str(r.get("GLAccountCode") or ""),
            "cost_center": str(r.get("CostCenter") or ""), "cost_unit": str(r.get("CostUnit") or ""),
            "vat_code": str(r.get("VATCode") or ""), "vat_type": str(r.get("VATType") or ""),
            "amount_cents": _cents(r.get("AmountFC")), "currency": str(r.get("Currency") or ""),
            "financial_year": int_or_none(r.get("FinancialYear")),
            "financial_period": int_or_none(r.get("FinancialPeriod")),
            "journal_code": str(r.get("JournalCode") or ""), "description": str(r.get("Description") or ""),
        })
    frame = pd.DataFrame(out, columns=EXACT_LINE_COLUMNS)
    return fold_vat_lines(frame.sort_values(["entry_id", "line_number"], kind="stable").reset_index(drop=True))


def trace_ids(description: str | None, notes: str | None) -> tuple[str, str]:
    """(report ID, transaction ID) from a line's Notes, else its Description; ("", "") for a foreign line."""
    if notes and (m := _NOTES_TRACE.search(notes)):
        return m["report"], m["tx"]
    if description and (m := _DESCRIPTION_TRACE.match(description)):
        return m["report"], m["tx"]
    return "", ""


def fold_vat_lines(lines: pd.DataFrame) -> pd.DataFrame:
    """Add each VAT line back onto the line Exact split it from, so amounts compare with the gross expense.

    Exact books an amount with an including VAT code as a net line plus a VAT line on the VAT account (§5.9);
    the draft has one gross line. The VAT line follows its base line and repeats its Description.
    """
    if lines.empty:
        return lines
    keep, amounts = [], lines["amount_cents"].tolist()
    base_of: dict[tuple, int] = {}
    for i, row in enumerate(lines.itertuples(index=False)):
        key = (row.entry_id, row.description, row.vat_code)
        if row.vat_type == VAT_LINE_TYPE and row.vat_code and key in base_of:
            amounts[base_of[key]] += row.amount_cents
            continue
        if row.vat_type != VAT_LINE_TYPE:
            base_of[key] = i
        keep.append(i)
    folded = lines.assign(amount_cents=amounts)
    return folded.iloc[keep].reset_index(drop=True)


def _cents(value: Any) -> int:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return 0
    return int(round(float(value) * 100))


def int_or_none(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return None
    return int(value)
