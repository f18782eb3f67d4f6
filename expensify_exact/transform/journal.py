"""Turns normalized expense lines into balanced journal drafts, one entry per report, or reasoned rejections.

Pure functions of DataFrames and config: no I/O, no clock (the run date is an argument), no Dagster.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

import pandas as pd

from expensify_exact.config import Connection, ProjectConfig

DESCRIPTION_MAX = 60  # GeneralJournalEntryLines.Description length in Exact [?]; IDs go first so they survive
NOTES_MAX = 255
ENTRY_ID_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4b8e-9a57-0e4d2b9c8f10")


class Reason(StrEnum):
    MALFORMED_SOURCE = "MALFORMED_SOURCE"
    UNMAPPED_CATEGORY = "UNMAPPED_CATEGORY"
    UNKNOWN_GL_ACCOUNT = "UNKNOWN_GL_ACCOUNT"
    BLOCKED_GL_ACCOUNT = "BLOCKED_GL_ACCOUNT"
    UNMAPPED_TAG = "UNMAPPED_TAG"
    MISSING_COST_CENTER = "MISSING_COST_CENTER"
    UNKNOWN_COST_CENTER = "UNKNOWN_COST_CENTER"
    ENDED_COST_CENTER = "ENDED_COST_CENTER"
    MISSING_COST_UNIT = "MISSING_COST_UNIT"
    UNKNOWN_COST_UNIT = "UNKNOWN_COST_UNIT"
    ENDED_COST_UNIT = "ENDED_COST_UNIT"
    UNKNOWN_VAT_CODE = "UNKNOWN_VAT_CODE"
    VAT_NOT_ALLOWED = "VAT_NOT_ALLOWED"
    UNKNOWN_JOURNAL = "UNKNOWN_JOURNAL"
    INVALID_JOURNAL_TYPE = "INVALID_JOURNAL_TYPE"
    MISSING_PERIOD = "MISSING_PERIOD"
    CLOSED_PERIOD = "CLOSED_PERIOD"
    UNSUPPORTED_CURRENCY = "UNSUPPORTED_CURRENCY"
    UNBALANCED = "UNBALANCED"
    INVALID_DRAFT = "INVALID_DRAFT"
    REJECTED_BY_EXACT = "REJECTED_BY_EXACT"
    CHANGED_AFTER_POSTING = "CHANGED_AFTER_POSTING"


# What an operator does about each reason: shown in quarantine listings and the UI.
REASON_FIXES: dict[Reason, str] = {
    Reason.MALFORMED_SOURCE: "Correct the expense in Expensify (reopen, fix, re-approve).",
    Reason.UNMAPPED_CATEGORY: "Add the category to mappings/categories.yaml, then replay.",
    Reason.UNKNOWN_GL_ACCOUNT: "Fix the GL account code in mappings/categories.yaml or create it in Exact, then replay.",
    Reason.BLOCKED_GL_ACCOUNT: "Unblock the GL account in Exact or map the category elsewhere, then replay.",
    Reason.UNMAPPED_TAG: "Add the tag to mappings/tags.yaml, then replay.",
    Reason.MISSING_COST_CENTER: "The GL account requires a cost center: tag the expense or set a default in mappings/tags.yaml.",
    Reason.UNKNOWN_COST_CENTER: "Create the cost center in Exact or fix mappings/tags.yaml, then replay.",
    Reason.ENDED_COST_CENTER: "Extend the cost center's end date in Exact or remap the tag, then replay.",
    Reason.MISSING_COST_UNIT: "Tag the expense or set a default cost unit in mappings/tags.yaml.",
    Reason.UNKNOWN_COST_UNIT: "Create the cost unit in Exact or fix mappings/tags.yaml, then replay.",
    Reason.ENDED_COST_UNIT: "Extend the cost unit's end date in Exact or remap the tag, then replay.",
    Reason.UNKNOWN_VAT_CODE: "Fix mappings/vat.yaml or create the VAT code in Exact, then replay.",
    Reason.VAT_NOT_ALLOWED: "Use a journal that allows VAT or remove the tax mapping, then replay.",
    Reason.UNKNOWN_JOURNAL: "Fix `exact.journal` in mappings/connections.yaml.",
    Reason.INVALID_JOURNAL_TYPE: "Point `exact.journal` at a type-90 general journal.",
    Reason.MISSING_PERIOD: "Create the financial year in Exact, then replay.",
    Reason.CLOSED_PERIOD: "Reopen the period, or set posting.closed_period_policy: next_open_period, then replay.",
    Reason.UNSUPPORTED_CURRENCY: "Use a journal that allows variable currency for reports in a foreign currency.",
    Reason.UNBALANCED: "A bug or corrupt source data: report it; the report was not posted.",
    Reason.INVALID_DRAFT: "A bug or corrupt source data: report it; the report was not posted.",
    Reason.REJECTED_BY_EXACT: "Read Exact's message, fix the cause in Exact or the mappings, then replay.",
    Reason.CHANGED_AFTER_POSTING: "Review the drafted reversal and correction, then approve or ignore it.",
}

DRAFT_COLUMNS = [
    "connection", "partition_date", "report_id", "transaction_id", "line_no", "side", "gl_account_code",
    "gl_account_id", "amount_cents", "amount", "currency", "cost_center", "cost_unit", "vat_code", "entry_date",
    "financial_year", "financial_period", "journal_code", "description", "notes",
]
DRAFT_DTYPES = {"amount_cents": "int64", "line_no": "int64", "amount": "float64", "financial_year": "int64",
                "financial_period": "int64"}
REJECTION_COLUMNS = ["connection", "partition_date", "report_id", "transaction_id", "code", "dimension", "value",
                     "message"]


@dataclass(frozen=True)
class Dimensions:
    """Exact dimension snapshots for one division, as DataFrames with snake_case columns."""

    gl_accounts: pd.DataFrame  # id, code, description, type, is_blocked, use_costcenter, use_costunit
    cost_centers: pd.DataFrame  # id, code, description, end_date
    cost_units: pd.DataFrame  # id, code, description, end_date
    journals: pd.DataFrame  # id, code, description, type, allow_vat, allow_variable_currency, is_blocked
    vat_codes: pd.DataFrame  # id, code, description, type, percentage, is_blocked
    financial_periods: pd.DataFrame  # fin_year, fin_period, start_date, end_date


@dataclass(frozen=True)
class JournalDrafts:
    lines: pd.DataFrame  # DRAFT_COLUMNS, only reports that passed every rule
    rejections: pd.DataFrame  # REJECTION_COLUMNS, one row per problem; a report here has no lines above

    @property
    def report_ids(self) -> list[str]:
        return sorted(set(self.lines["report_id"]))


class _Lookup:
    """Dimension snapshots indexed by code for O(1) checks per line."""

    def __init__(self, dims: Dimensions):
        self.gl = {r["code"]: r for r in dims.gl_accounts.to_dict("records")}
        self.cost_centers = {r["code"]: r for r in dims.cost_centers.to_dict("records")}
        self.cost_units = {r["code"]: r for r in dims.cost_units.to_dict("records")}
        self.journals = {r["code"]: r for r in dims.journals.to_dict("records")}
        self.vat = {r["code"]: r for r in dims.vat_codes.to_dict("records")}
        periods = dims.financial_periods.sort_values("start_date").to_dict("records")
        self.periods = [(_as_date(p["start_date"]), _as_date(p["end_date"]), int(p["fin_year"]), int(p["fin_period"]))
                        for p in periods]

    def period_of(self, day: date) -> tuple[int, int, date] | None:
        """The period whose start is the latest one not after `day` and whose end is not before it.

        Works whether Exact's EndDate is the period's last day or the next period's first day [?]."""
        found = None
        for start, end, year, period in self.periods:
            if start <= day and (end is None or day <= end):
                found = (year, period, start)
        return found

    def first_period_after(self, year: int, period: int) -> tuple[int, int, date] | None:
        for start, _end, y, p in self.periods:
            if (y, p) > (year, period):
                return (y, p, start)
        return None


def _as_date(value) -> date | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, pd.Timestamp):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def build_journal_drafts(lines: pd.DataFrame, connection: Connection, config: ProjectConfig, dims: Dimensions,
                         run_date: date) -> JournalDrafts:
    """Apply the posting rules to every report in `lines` (all of one connection).

    Args:
        lines: normalized expense lines (docs/architecture.md).
        connection: whose journal, accounts and rules apply.
        config: the category, tag and VAT mappings.
        dims: the Exact dimension snapshot used to validate every value.
        run_date: today's date, for the `run_date` posting-date policy.

    Returns:
        Drafts for reports that pass every rule and one rejection row per problem for those that do not;
        a report is never split between the two.
    """
    lookup = _Lookup(dims)
    draft_rows: list[dict] = []
    rejection_rows: list[dict] = []
    for report_id, report in lines.groupby("report_id", sort=True):
        rows, problems = _draft_report(report, connection, config, lookup, run_date)
        if problems:
            rejection_rows.extend(problems)
        else:
            draft_rows.extend(rows)
    drafts = pd.DataFrame(draft_rows, columns=DRAFT_COLUMNS).astype(DRAFT_DTYPES)
    return JournalDrafts(lines=drafts, rejections=pd.DataFrame(rejection_rows, columns=REJECTION_COLUMNS))


def _draft_report(report: pd.DataFrame, conn: Connection, config: ProjectConfig, lookup: _Lookup,
                  run_date: date) -> tuple[list[dict], list[dict]]:
    first = report.iloc[0]
    report_id = first["report_id"]
    partition_date = first["partition_date"]
    problems: list[dict] = []

    def problem(code: Reason, message: str, transaction_id: str = "", dimension: str = "", value: str = "") -> None:
        problems.append({"connection": conn.name, "partition_date": partition_date, "report_id": report_id,
                         "transaction_id": transaction_id, "code": code.value, "dimension": dimension,
                         "value": value, "message": message})

    journal = lookup.journals.get(conn.exact.journal)
    if journal is None:
        problem(Reason.UNKNOWN_JOURNAL, f"journal {conn.exact.journal} does not exist in Exact", dimension="journal",
                value=conn.exact.journal)
        return [], problems
    if int(journal["type"]) != 90:
        problem(Reason.INVALID_JOURNAL_TYPE, f"journal {conn.exact.journal} has type {journal['type']}, not 90",
                dimension="journal", value=conn.exact.journal)

    report_currency = first["report_currency"]
    if report_currency != conn.exact.division_currency:
        problem(Reason.UNSUPPORTED_CURRENCY, f"report currency {report_currency} differs from the division's "
                f"{conn.exact.division_currency}", dimension="currency", value=report_currency)

    entry_date = _entry_date(report, conn, run_date)
    period = lookup.period_of(entry_date)
    if period is None:
        problem(Reason.MISSING_PERIOD, f"no financial period in Exact contains {entry_date}", dimension="period",
                value=entry_date.isoformat())
        return [], problems
    year, fin_period, _ = period
    if conn.posting.closed_through and (year, fin_period) <= _year_month(conn.posting.closed_through):
        if conn.posting.closed_period_policy == "next_open_period":
            moved = lookup.first_period_after(*_year_month(conn.posting.closed_through))
            if moved is None:
                problem(Reason.MISSING_PERIOD, "no open financial period after the closed ones", dimension="period",
                        value=conn.posting.closed_through)
                return [], problems
            year, fin_period, entry_date = moved
        else:
            problem(Reason.CLOSED_PERIOD, f"period {year}/{fin_period:02d} is closed", dimension="period",
                    value=f"{year}/{fin_period:02d}")

    credit_codes = {conn.exact.employee_payable_account, conn.exact.card_liability_account,
                    *conn.exact.card_accounts.values()}
    for code in sorted(credit_codes):
        _check_account(code, lookup, problem, "")

    rows: list[dict] = []
    line_no = 0
    for expense in report.itertuples(index=False):
        tid = expense.transaction_id
        gl_code = config.gl_account_for(expense.category, expense.policy_id)
        if gl_code is None and conn.posting.fallback_to_category_gl_code and expense.category_gl_code:
            gl_code = expense.category_gl_code
        if gl_code is None:
            problem(Reason.UNMAPPED_CATEGORY, f"category {expense.category!r} maps to no GL account",
                    tid, "category", expense.category)
            continue
        account = _check_account(gl_code, lookup, problem, tid)
        cost_center, cost_unit = _dimensions_for(expense, config, lookup, entry_date, problem)
        # "" means no tag gave one; None means the tag's value was already reported as invalid.
        if account is not None and int(account.get("use_costcenter") or 0) == 1 and cost_center == "":
            problem(Reason.MISSING_COST_CENTER, f"GL account {gl_code} requires a cost center", tid, "cost_center", "")
        if account is not None and int(account.get("use_costunit") or 0) == 1 and cost_unit == "":
            problem(Reason.MISSING_COST_UNIT, f"GL account {gl_code} requires a cost unit", tid, "cost_unit", "")
        vat_code = _vat_code_for(expense, config, journal, lookup, problem)
        credit_code = _credit_account(expense, conn)
        amount = int(expense.converted_amount_cents)
        description, notes = _trace_texts(expense)
        common = {"connection": conn.name, "partition_date": partition_date, "report_id": report_id,
                  "transaction_id": tid, "currency": report_currency, "entry_date": entry_date.isoformat(),
                  "financial_year": year, "financial_period": fin_period, "journal_code": conn.exact.journal,
                  "description": description, "notes": notes}
        line_no += 1
        rows.append(common | {"line_no": line_no, "side": "debit", "gl_account_code": gl_code,
                              "gl_account_id": account["id"] if account is not None else None,
                              "amount_cents": amount, "amount": amount / 100, "cost_center": cost_center or "",
                              "cost_unit": cost_unit or "", "vat_code": vat_code})
        credit_account = lookup.gl.get(credit_code)
        line_no += 1
        # The offset carries the same trace IDs: every line must lead back to its expense (invariant 4).
        rows.append(common | {"line_no": line_no, "side": "credit", "gl_account_code": credit_code,
                              "gl_account_id": credit_account["id"] if credit_account is not None else None,
                              "amount_cents": -amount, "amount": -amount / 100, "cost_center": "",
                              "cost_unit": "", "vat_code": ""})
    if not problems and sum(r["amount_cents"] for r in rows) != 0:
        problem(Reason.UNBALANCED, "debits and credits differ", dimension="amount",
                value=str(sum(r["amount_cents"] for r in rows)))
    return rows, problems


def _entry_date(report: pd.DataFrame, conn: Connection, run_date: date) -> date:
    first = report.iloc[0]
    policy = conn.posting.date_policy
    if policy == "submitted_date" and pd.notna(first["submitted_at"]):
        return pd.Timestamp(first["submitted_at"]).tz_convert(conn.timezone).date()
    if policy == "reimbursed_date" and pd.notna(first["reimbursed_at"]):
        return pd.Timestamp(first["reimbursed_at"]).tz_convert(conn.timezone).date()
    if policy == "last_expense_date":
        return date.fromisoformat(max(report["expense_date"]))
    if policy == "run_date":
        return run_date
    return date.fromisoformat(first["partition_date"])


def _year_month(value: str) -> tuple[int, int]:
    year, month = value.split("-")
    return int(year), int(month)


def _check_account(code: str, lookup: _Lookup, problem, tid: str) -> dict | None:
    account = lookup.gl.get(code)
    if account is None:
        problem(Reason.UNKNOWN_GL_ACCOUNT, f"GL account {code} does not exist in Exact", tid, "gl_account", code)
    elif bool(account.get("is_blocked")):
        problem(Reason.BLOCKED_GL_ACCOUNT, f"GL account {code} is blocked in Exact", tid, "gl_account", code)
        return None
    return account


def _dimensions_for(expense, config: ProjectConfig, lookup: _Lookup, entry_date: date,
                    problem) -> tuple[str | None, str | None]:
    """Cost center and cost unit codes: "" when no tag gives one, None when the tag's value is invalid."""
    found: dict[str, str | None] = {"cost_center": "", "cost_unit": ""}
    for level in config.tags:
        tag_value = getattr(expense, f"tag_{level.level}") or ""
        if not tag_value:
            code = level.default or ""
        elif tag_value in level.values:
            code = level.values[tag_value]
        else:
            problem(Reason.UNMAPPED_TAG, f"tag {tag_value!r} (level {level.level}) maps to no {level.dimension}",
                    expense.transaction_id, level.dimension, tag_value)
            found[level.dimension] = None
            continue
        if not code:
            continue
        snapshot = lookup.cost_centers if level.dimension == "cost_center" else lookup.cost_units
        row = snapshot.get(code)
        unknown, ended = ((Reason.UNKNOWN_COST_CENTER, Reason.ENDED_COST_CENTER) if level.dimension == "cost_center"
                          else (Reason.UNKNOWN_COST_UNIT, Reason.ENDED_COST_UNIT))
        label = level.dimension.replace("_", " ")
        if row is None:
            problem(unknown, f"{label} {code} (from tag {tag_value!r}) does not exist in Exact",
                    expense.transaction_id, level.dimension, code)
            found[level.dimension] = None
            continue
        end = _as_date(row.get("end_date"))
        if end is not None and end < entry_date:
            problem(ended, f"{label} {code} ended on {end}", expense.transaction_id, level.dimension, code)
            found[level.dimension] = None
            continue
        found[level.dimension] = code
    return found["cost_center"], found["cost_unit"]


def _vat_code_for(expense, config: ProjectConfig, journal: dict, lookup: _Lookup, problem) -> str:
    if not config.vat_codes or not expense.tax_name or not bool(journal.get("allow_vat")):
        return ""  # without a VAT table or on a journal without VAT, gross amounts are posted
    code = config.vat_codes.get(expense.tax_name)
    if code is None:
        return ""
    vat = lookup.vat.get(code)
    if vat is None:
        problem(Reason.UNKNOWN_VAT_CODE, f"VAT code {code} (tax {expense.tax_name!r}) does not exist in Exact",
                expense.transaction_id, "vat_code", code)
        return ""
    if bool(vat.get("is_blocked")) or str(vat.get("type")) not in ("I", "N", "B"):
        # Excluding codes make Exact add VAT on top of the amount, which would unbalance a gross expense.
        problem(Reason.VAT_NOT_ALLOWED, f"VAT code {code} cannot be used on gross expense amounts",
                expense.transaction_id, "vat_code", code)
        return ""
    return code


def _credit_account(expense, conn: Connection) -> str:
    if expense.reimbursable or not expense.card_bank:
        return conn.exact.employee_payable_account
    return (conn.exact.card_accounts.get(str(expense.card_id))
            or conn.exact.card_accounts.get(expense.card_bank)
            or conn.exact.card_liability_account)


def _trace_texts(expense) -> tuple[str, str]:
    ids = f"{expense.report_id}/{expense.transaction_id}"
    description = f"{ids} {expense.merchant}"[:DESCRIPTION_MAX]
    notes = f"Expensify report {expense.report_id}, transaction {expense.transaction_id}: {expense.merchant} | " \
            f"{expense.category}"
    if expense.currency != expense.report_currency:
        notes += f" | original {int(expense.amount_cents) / 100:.2f} {expense.currency} @ {expense.exchange_rate:g}"
    return description, notes[:NOTES_MAX]


def entry_body(report_lines: pd.DataFrame) -> dict:
    """The POST body of one report's general journal entry, without the EntryID."""
    first = report_lines.iloc[0]
    lines = []
    for line in report_lines.sort_values("line_no").itertuples(index=False):
        body = {"GLAccount": line.gl_account_id, "AmountFC": round(line.amount_cents / 100, 2),
                "Date": line.entry_date, "Description": line.description, "Notes": line.notes}
        if line.cost_center:
            body["CostCenter"] = line.cost_center
        if line.cost_unit:
            body["CostUnit"] = line.cost_unit
        if line.vat_code:
            body["VATCode"] = line.vat_code
        lines.append(body)
    return {"JournalCode": first["journal_code"], "FinancialYear": int(first["financial_year"]),
            "FinancialPeriod": int(first["financial_period"]), "Currency": first["currency"],
            "GeneralJournalEntryLines": lines}


def content_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_id_for(connection: str, report_id: str, body_hash: str) -> str:
    """Deterministic EntryID: the same report with the same content always gets the same ID."""
    return str(uuid.uuid5(ENTRY_ID_NAMESPACE, f"{connection}:{report_id}:{body_hash}"))
