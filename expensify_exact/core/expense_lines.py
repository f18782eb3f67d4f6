"""Exported Expensify reports → normalized expense lines (one row per expense, integer cents), with the
pandera schema that is the contract of docs/architecture.md "Normalized expense lines"."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from expensify_exact.api.expensify.fields import YEARS, parse_report_timestamp, split_tag

STRING = pd.StringDtype()
UTC_TIMESTAMP = pd.DatetimeTZDtype(unit="ns", tz="UTC")

# Column → dtype, in output order (docs/architecture.md). Optional text is "" rather than null, so later
# joins and mappings never meet a missing value; only the reimbursed/submitted timestamps may be null.
COLUMNS: dict[str, Any] = {
    "report_id": STRING,
    "transaction_id": STRING,
    "policy_id": STRING,
    "report_name": STRING,
    "employee_email": STRING,
    "report_state": STRING,
    "report_currency": STRING,
    "approved_at": UTC_TIMESTAMP,
    "submitted_at": UTC_TIMESTAMP,
    "reimbursed_at": UTC_TIMESTAMP,
    "partition_date": STRING,
    "expense_date": STRING,
    "merchant": STRING,
    "category": STRING,
    "category_gl_code": STRING,
    "tag": STRING,
    "tag_1": STRING,
    "tag_2": STRING,
    "tag_3": STRING,
    "amount_cents": "int64",
    "currency": STRING,
    "converted_amount_cents": "int64",
    "exchange_rate": "float64",
    "reimbursable": "bool",
    "billable": "bool",
    "tax_name": STRING,
    "tax_code": STRING,
    "tax_amount_cents": "int64",
    "card_bank": STRING,
    "card_id": STRING,
    "card_number_masked": STRING,
    "comment": STRING,
    "receipt_url": STRING,
}
MALFORMED_COLUMNS = ("report_id", "transaction_id", "reason", "detail")
TAG_LEVELS = 3

_ISO_CURRENCY = r"^[A-Z]{3}$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
_NULLABLE = {"submitted_at", "reimbursed_at"}
_CHECKS = {
    "report_id": [pa.Check.str_length(min_value=1)],
    "transaction_id": [pa.Check.str_length(min_value=1)],
    "report_currency": [pa.Check.str_matches(_ISO_CURRENCY)],
    "currency": [pa.Check.str_matches(_ISO_CURRENCY)],
    "partition_date": [pa.Check.str_matches(_ISO_DATE)],
    "expense_date": [pa.Check.str_matches(_ISO_DATE)],
}

ExpenseLineSchema = pa.DataFrameSchema(
    {name: pa.Column(dtype, checks=_CHECKS.get(name), nullable=name in _NULLABLE)
     for name, dtype in COLUMNS.items()},
    unique=["report_id", "transaction_id"],
    report_duplicates="all",  # both copies are suspect: which one Expensify meant is unknowable
    strict=True,
    ordered=True,
    name="ExpenseLineSchema",
)

# Expensify's website state names (report.status) → the reportState vocabulary of the exporter (expensify.md §2.1).
_STATUS_TO_STATE = {"open": "OPEN", "processing": "SUBMITTED", "submitted": "SUBMITTED", "approved": "APPROVED",
                    "reimbursed": "REIMBURSED", "archived": "ARCHIVED", "closed": "ARCHIVED"}
_INTEGER = re.compile(r"^-?\d{1,19}$")
# Larger than any expense (a hundred billion in the currency) yet far inside int64 even summed over a report:
# a bigger number is an export fault, set aside as BAD_AMOUNT rather than overflowing the int64 columns.
MAX_CENTS = 10**13


class MalformedReason(StrEnum):
    """Why an expense could not become a line; the lead quarantines the whole report for any of these."""

    MISSING_ID = "MISSING_ID"
    BAD_AMOUNT = "BAD_AMOUNT"
    MISSING_CONVERSION = "MISSING_CONVERSION"
    BAD_TIMESTAMP = "BAD_TIMESTAMP"
    BAD_DATE = "BAD_DATE"
    BAD_FLAG = "BAD_FLAG"
    BAD_CURRENCY = "BAD_CURRENCY"
    DUPLICATE = "DUPLICATE"
    SCHEMA = "SCHEMA"


@dataclass(frozen=True)
class NormalizedLines:
    """`lines` follows ExpenseLineSchema; `malformed` has one row per rejected expense (report_id,
    transaction_id, reason, detail) and is never silently empty when something was dropped."""

    lines: pd.DataFrame
    malformed: pd.DataFrame


class _Malformed(Exception):
    def __init__(self, reason: MalformedReason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def approval_day(report: dict, timezone: str, source_timezone: str = "UTC") -> str | None:
    """The report's approval day (`YYYY-MM-DD`) in the connection's timezone; None if it has none or it does not
    parse (normalization then reports it as malformed: it is kept, not dropped)."""
    if not isinstance(report, dict):
        return None  # normalization sets it aside as malformed
    try:
        approved = parse_report_timestamp(report.get("approved"), source_timezone)
    except ValueError:
        return None
    return approved.astimezone(ZoneInfo(timezone)).date().isoformat() if approved else None


def normalize_reports(reports: list[dict], timezone: str, source_timezone: str = "UTC") -> NormalizedLines:
    """One row per expense of the exported reports, in the shape of ExpenseLineSchema.

    Args:
        reports: report dicts as the export template renders them (``transactionList`` per report).
        timezone: the connection's timezone; ``partition_date`` is the approval day there.
        source_timezone: the zone of Expensify's naive timestamps (see `parse_report_timestamp`).

    Returns:
        NormalizedLines: the valid lines, and the expenses that failed parsing or the schema. Never raises on
        bad data: whatever is not a valid expense is a malformed row with its reason.
    """
    zone = ZoneInfo(timezone)
    rows: list[dict] = []
    malformed: list[dict] = []
    for report in reports:
        if not isinstance(report, dict):
            malformed.append(_malformed_row({}, {}, MalformedReason.SCHEMA,
                                            f"a report is {type(report).__name__}, not an object"))
            continue
        expenses = report.get("transactionList")
        if not isinstance(expenses, list):
            malformed.append(_malformed_row(report, {}, MalformedReason.SCHEMA, "transactionList is not a list"))
            continue
        for expense in expenses:
            if not isinstance(expense, dict):
                malformed.append(_malformed_row(report, {}, MalformedReason.SCHEMA,
                                                f"an expense is {type(expense).__name__}, not an object"))
                continue
            try:
                rows.append(_line(report, expense, zone, source_timezone))
            except _Malformed as exc:
                malformed.append(_malformed_row(report, expense, exc.reason, exc.detail))
    lines = _frame(rows)
    lines, schema_failures = _split_schema_failures(lines)
    malformed.extend(schema_failures)
    return NormalizedLines(lines, pd.DataFrame(malformed, columns=list(MALFORMED_COLUMNS)).astype(STRING))


def _line(report: dict, expense: dict, zone: ZoneInfo, source_timezone: str) -> dict:
    report_id, transaction_id = _text(report.get("reportID")), _text(expense.get("transactionID"))
    if not report_id or not transaction_id:
        raise _Malformed(MalformedReason.MISSING_ID,
                        f"reportID={_short(report_id)} transactionID={_short(transaction_id)}")
    approved_at = _timestamp(report, "approved", source_timezone)
    if approved_at is None:
        raise _Malformed(MalformedReason.BAD_TIMESTAMP, "approved is empty on an approved report")
    report_currency, currency = _text(report.get("currency")), _text(expense.get("currency"))

    # A user's edit wins over what the card feed or receipt said (expensify.md §3.2, §11); 0 counts as
    # "not set" because the reconciliation dialect uses it so (§6.3) and a zero expense posts nothing.
    modified = _cents(expense, "modifiedAmount", required=False)
    amount = modified if modified not in (None, 0) else _cents(expense, "amount", required=True)
    rate = _number(expense, "currencyConversionRate")
    converted = _cents(expense, "convertedAmount", required=False)
    if converted is None:
        if currency == report_currency:
            converted = amount
        elif rate:
            converted = _bounded(round(amount * rate), "convertedAmount (amount × currencyConversionRate)")
        else:
            raise _Malformed(MalformedReason.MISSING_CONVERSION,
                             f"{currency} expense on a {report_currency} report has no convertedAmount or rate")
    if not rate:
        rate = 1.0 if currency == report_currency or amount == 0 else converted / amount

    tag = _text(expense.get("tag"))
    levels = split_tag(tag) if tag else [_text(expense.get(f"ntag{n}")) for n in range(1, TAG_LEVELS + 1)]
    levels = (levels + [""] * TAG_LEVELS)[:TAG_LEVELS]
    card_id = _text(expense.get("cardID"))
    status = _text(report.get("status"))
    return {
        "report_id": report_id,
        "transaction_id": transaction_id,
        "policy_id": _text(report.get("policyID")),
        "report_name": _text(report.get("reportName")),
        "employee_email": _text(report.get("accountEmail")),
        "report_state": _STATUS_TO_STATE.get(status.lower(), status.upper()),
        "report_currency": report_currency,
        "approved_at": approved_at,
        "submitted_at": _timestamp(report, "submitted", source_timezone),
        "reimbursed_at": _timestamp(report, "reimbursed", source_timezone),
        "partition_date": approved_at.astimezone(zone).date().isoformat(),
        "expense_date": _expense_date(expense),
        "merchant": _text(expense.get("modifiedMerchant")) or _text(expense.get("merchant")),
        "category": _text(expense.get("category")),
        "category_gl_code": _text(expense.get("categoryGlCode")),
        "tag": tag,
        "tag_1": levels[0],
        "tag_2": levels[1],
        "tag_3": levels[2],
        "amount_cents": amount,
        "currency": currency,
        "converted_amount_cents": converted,
        "exchange_rate": float(rate),
        "reimbursable": _flag(expense, "reimbursable"),
        "billable": _flag(expense, "billable"),
        "tax_name": _text(expense.get("taxName")),
        "tax_code": _text(expense.get("taxCode")),
        "tax_amount_cents": _cents(expense, "taxAmount", required=False) or 0,
        "card_bank": _text(expense.get("bank")),
        # Cash expenses may carry cardID 0 rather than nothing.
        "card_id": "" if card_id == "0" else card_id,
        "card_number_masked": _text(expense.get("cardNumber")),
        "comment": _text(expense.get("comment")),
        "receipt_url": _text(expense.get("receiptURL")),
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cents(expense: dict, key: str, required: bool) -> int | None:
    value = expense.get(key)
    if value is None or value == "":
        if required:
            raise _Malformed(MalformedReason.BAD_AMOUNT, f"{key} is missing")
        return None
    if isinstance(value, bool):
        raise _Malformed(MalformedReason.BAD_AMOUNT, f"{key}={value!r} is not an amount in cents")
    if isinstance(value, int):
        return _bounded(value, key)
    if isinstance(value, float) and value.is_integer():
        return _bounded(int(value), key)
    if isinstance(value, str) and _INTEGER.match(value.strip()):
        return _bounded(int(value.strip()), key)
    raise _Malformed(MalformedReason.BAD_AMOUNT, f"{key}={_short(value)} is not a whole number of cents")


def _bounded(cents: int, key: str) -> int:
    if abs(cents) > MAX_CENTS:
        raise _Malformed(MalformedReason.BAD_AMOUNT, f"{key}={_short(cents)} is beyond ±{MAX_CENTS} cents")
    return cents


def _short(value: Any) -> str:
    """A value for a message: its repr, cut to 80 characters (a malformed export can carry megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(expense: dict, key: str) -> float | None:
    value = expense.get(key)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise _Malformed(MalformedReason.BAD_AMOUNT, f"{key}={_short(value)} is not a finite number")
    return number


def _flag(expense: dict, key: str) -> bool:
    value = expense.get(key)
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return False
    # Booleans only survive FreeMarker as text (expensify.md §3), so "true"/"false" strings are normal.
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Malformed(MalformedReason.BAD_FLAG, f"{key}={_short(value)} is not a boolean")


def _timestamp(report: dict, key: str, source_timezone: str) -> datetime | None:
    try:
        return parse_report_timestamp(report.get(key), source_timezone)
    except ValueError:
        raise _Malformed(MalformedReason.BAD_TIMESTAMP, f"{key}={_short(report.get(key))}") from None


def _expense_date(expense: dict) -> str:
    value = _text(expense.get("modifiedCreated")) or _text(expense.get("created"))
    try:
        # Dates are yyyy-MM-dd (expensify.md §3); a trailing time, if any, is not part of the expense day.
        day = date.fromisoformat(value.strip()[:10])
    except ValueError:
        day = None
    if day is None or day.year not in YEARS:
        raise _Malformed(MalformedReason.BAD_DATE, f"created={_short(value)}")
    return day.isoformat()


def _malformed_row(report: dict, expense: dict, reason: MalformedReason, detail: str) -> dict:
    return {"report_id": _text(report.get("reportID")), "transaction_id": _text(expense.get("transactionID")),
            "reason": str(reason), "detail": detail}


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for name, dtype in COLUMNS.items():
        if dtype is UTC_TIMESTAMP:
            frame[name] = pd.to_datetime(frame[name], utc=True).astype(UTC_TIMESTAMP)
        else:
            frame[name] = frame[name].astype(dtype)
    return frame


def _split_schema_failures(lines: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Validate lazily; rows named by a failure case move to the malformed list with its reason."""
    try:
        return ExpenseLineSchema.validate(lines, lazy=True), []
    except SchemaErrors as errors:
        cases = errors.failure_cases
    if cases["index"].isna().any():
        # A column-level failure (dtype, missing column) is a bug in this module, not bad data.
        raise AssertionError(f"expense lines do not match their own schema:\n{cases}")
    malformed: dict[int, dict] = {}
    for case in cases.itertuples(index=False):
        row = int(case.index)
        reason = _schema_reason(str(case.column), str(case.check))
        entry = malformed.setdefault(row, {
            "report_id": str(lines.at[row, "report_id"]), "transaction_id": str(lines.at[row, "transaction_id"]),
            "reason": str(reason), "detail": ""})
        detail = ("(report_id, transaction_id) occurs more than once" if reason is MalformedReason.DUPLICATE
                  else f"{case.column}: {case.check} (got {case.failure_case!r})")
        if detail not in entry["detail"]:
            entry["detail"] = "; ".join(filter(None, [entry["detail"], detail]))
    valid = lines.drop(index=list(malformed)).reset_index(drop=True)
    return valid, list(malformed.values())


def _schema_reason(column: str, check: str) -> MalformedReason:
    if "unique" in check or "duplicate" in check:
        return MalformedReason.DUPLICATE
    if column in ("currency", "report_currency"):
        return MalformedReason.BAD_CURRENCY
    if column in ("report_id", "transaction_id"):
        return MalformedReason.MISSING_ID
    return MalformedReason.SCHEMA
