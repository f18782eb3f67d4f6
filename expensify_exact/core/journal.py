"""Turns normalized expense lines into balanced journal drafts, one entry per report, or reasoned rejections.

Pure functions of DataFrames and config: no I/O, no clock (the run date is an argument), no Dagster.

The rules, in the order they are applied to a report (README, "Posting rules"):

- **Journal**: `exact.journal` must exist, not be blocked and be a type-90 general journal.
- **Entry date and period**: from `posting.date_policy`; the period must exist in Exact's FinancialPeriods and
  not be closed (`posting.closed_through`), or is moved to the first open one (`closed_period_policy`).
- **Currency**: a report in the division currency posts as is. A report in another currency posts in that
  currency (`Currency`) when the journal allows variable currency, *without* an `ExchangeRate`: Expensify gives
  expense→report rates only, never report→division, so the only rate an accountant can stand behind is Exact's
  own rate table for the entry date. Otherwise every amount is converted with `posting.exchange_rates`, the
  original amount and rate go into Notes, and the payable per credit account is the converted report total, so
  the cents lost by converting line by line go to `exact.rounding_account`.
- **GL account**: categories.yaml (a `policy_id` row wins), else with `posting.fallback_to_category_gl_code`
  the category's GL code from Expensify.
- **Cost center / cost unit**: the tag level that sets the dimension, else defaults.yaml (employee, then
  category), else the tag level's `default`; validated against the snapshots and the account's
  UseCostcenter/UseCostunit (1 mandatory, 2 not allowed).
- **VAT**: only with a vat.yaml table and on a journal that allows VAT. Including (I), none (N) and base-only
  (B) codes post the gross amount. An excluding (E) code posts the net chosen so that net + Exact's VAT line
  (round-half-up of net × percentage, exact-online.md §5.10) equals the gross; where no net does, the cent
  goes to the rounding account.
- **Credit**: per expense, to employee payable (reimbursable) or the card's liability account; refunds are
  negative amounts on the same side.

Any failure rejects the whole report with one row per problem (reason code, dimension, value). The rules on one
mapped value (`journal_problems`, `account_problem`, `dimension_problem`, `vat_code_for`, ...) are public:
`expensify-exact check` applies the same functions to the mappings before any report does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from operator import attrgetter

import pandas as pd

from expensify_exact.config import Connection, ProjectConfig

DESCRIPTION_MAX = 60  # GeneralJournalEntryLines.Description length in Exact [?]; IDs go first so they survive
NOTES_MAX = 255
ENTRY_ID_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4b8e-9a57-0e4d2b9c8f10")
DIMENSION_NAMES = ("cost_center", "cost_unit")


class Reason(StrEnum):
    MALFORMED_SOURCE = "MALFORMED_SOURCE"
    UNMAPPED_CATEGORY = "UNMAPPED_CATEGORY"
    UNKNOWN_GL_ACCOUNT = "UNKNOWN_GL_ACCOUNT"
    BLOCKED_GL_ACCOUNT = "BLOCKED_GL_ACCOUNT"
    UNMAPPED_TAG = "UNMAPPED_TAG"
    MISSING_COST_CENTER = "MISSING_COST_CENTER"
    UNKNOWN_COST_CENTER = "UNKNOWN_COST_CENTER"
    ENDED_COST_CENTER = "ENDED_COST_CENTER"
    COST_CENTER_NOT_ALLOWED = "COST_CENTER_NOT_ALLOWED"
    MISSING_COST_UNIT = "MISSING_COST_UNIT"
    UNKNOWN_COST_UNIT = "UNKNOWN_COST_UNIT"
    ENDED_COST_UNIT = "ENDED_COST_UNIT"
    COST_UNIT_NOT_ALLOWED = "COST_UNIT_NOT_ALLOWED"
    UNMAPPED_TAX_NAME = "UNMAPPED_TAX_NAME"
    UNKNOWN_VAT_CODE = "UNKNOWN_VAT_CODE"
    BLOCKED_VAT_CODE = "BLOCKED_VAT_CODE"
    VAT_NOT_ALLOWED = "VAT_NOT_ALLOWED"
    UNKNOWN_JOURNAL = "UNKNOWN_JOURNAL"
    BLOCKED_JOURNAL = "BLOCKED_JOURNAL"
    INVALID_JOURNAL_TYPE = "INVALID_JOURNAL_TYPE"
    MISSING_PERIOD = "MISSING_PERIOD"
    CLOSED_PERIOD = "CLOSED_PERIOD"
    UNSUPPORTED_CURRENCY = "UNSUPPORTED_CURRENCY"
    MISSING_EXCHANGE_RATE = "MISSING_EXCHANGE_RATE"
    MISSING_ROUNDING_ACCOUNT = "MISSING_ROUNDING_ACCOUNT"
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
    Reason.MISSING_COST_CENTER: "The GL account requires a cost center: tag the expense or set a default in "
                                "mappings/defaults.yaml or mappings/tags.yaml, then replay.",
    Reason.UNKNOWN_COST_CENTER: "Create the cost center in Exact or fix mappings/tags.yaml / defaults.yaml, "
                                "then replay.",
    Reason.ENDED_COST_CENTER: "Extend the cost center's end date in Exact or remap the tag, then replay.",
    Reason.COST_CENTER_NOT_ALLOWED: "The GL account takes no cost center (UseCostcenter = 2): remove the tag or map "
                                    "the category to another account, then replay.",
    Reason.MISSING_COST_UNIT: "The GL account requires a cost unit: tag the expense or set a default in "
                              "mappings/defaults.yaml or mappings/tags.yaml, then replay.",
    Reason.UNKNOWN_COST_UNIT: "Create the cost unit in Exact or fix mappings/tags.yaml / defaults.yaml, then replay.",
    Reason.ENDED_COST_UNIT: "Extend the cost unit's end date in Exact or remap the tag, then replay.",
    Reason.COST_UNIT_NOT_ALLOWED: "The GL account takes no cost unit (UseCostunit = 2): remove the tag or map the "
                                  "category to another account, then replay.",
    Reason.UNMAPPED_TAX_NAME: "Add the tax name to mappings/vat.yaml (\"\" posts it gross without a code), "
                              "then replay.",
    Reason.UNKNOWN_VAT_CODE: "Fix mappings/vat.yaml or create the VAT code in Exact, then replay.",
    Reason.BLOCKED_VAT_CODE: "Unblock the VAT code in Exact or map the tax name elsewhere in mappings/vat.yaml.",
    Reason.VAT_NOT_ALLOWED: "Use a journal that allows VAT, or turn off posting.require_vat, then replay.",
    Reason.UNKNOWN_JOURNAL: "Fix `exact.journal` in mappings/connections.yaml.",
    Reason.BLOCKED_JOURNAL: "Unblock the journal in Exact or point `exact.journal` at another one.",
    Reason.INVALID_JOURNAL_TYPE: "Point `exact.journal` at a type-90 general journal.",
    Reason.MISSING_PERIOD: "Create the financial year in Exact, then replay.",
    Reason.CLOSED_PERIOD: "Reopen the period, or set posting.closed_period_policy: next_open_period, then replay.",
    Reason.UNSUPPORTED_CURRENCY: "The report's currency is not an ISO code Exact knows; correct it in Expensify.",
    Reason.MISSING_EXCHANGE_RATE: "Add the currency to posting.exchange_rates in mappings/connections.yaml, or use a "
                                  "journal that allows variable currency, then replay.",
    Reason.MISSING_ROUNDING_ACCOUNT: "Set exact.rounding_account in mappings/connections.yaml, then replay.",
    Reason.UNBALANCED: "A bug or corrupt source data: report it; the report was not posted.",
    Reason.INVALID_DRAFT: "A bug or corrupt source data: report it; the report was not posted.",
    Reason.REJECTED_BY_EXACT: "Read Exact's message, fix the cause in Exact or the mappings, then replay.",
    Reason.CHANGED_AFTER_POSTING: "Review the drafted reversal and correction, then approve or ignore it.",
}

# side: "debit" (the expense), "credit" (its offset) or "rounding" (a report's residue line).
# amount_cents is what is posted as AmountFC, in `currency`; vat_amount_cents is the VAT line Exact adds on top
# of it (excluding VAT codes only), so an entry balances when amount_cents + vat_amount_cents sums to zero.
DRAFT_COLUMNS = [
    "connection", "partition_date", "report_id", "transaction_id", "line_no", "side", "gl_account_code",
    "gl_account_id", "amount_cents", "amount", "currency", "cost_center", "cost_unit", "vat_code", "entry_date",
    "financial_year", "financial_period", "journal_code", "description", "notes", "vat_amount_cents",
]
DRAFT_DTYPES = {"amount_cents": "int64", "line_no": "int64", "amount": "float64", "financial_year": "int64",
                "financial_period": "int64", "vat_amount_cents": "int64"}
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


def entry_total_cents(report_lines: pd.DataFrame) -> int:
    """What the report costs, in the entry's currency: the sum of its offsets (debits may be net of VAT)."""
    return -int(report_lines.loc[report_lines["side"] == "credit", "amount_cents"].sum())


def vat_on_top_cents(net_cents: int, percentage: Decimal) -> int:
    """The VAT line Exact adds to an excluding-VAT amount: net × percentage, rounded half away from zero to cents.

    The percentage is a fraction (0.21); exact-online.md §5.5 gives no unit, so whole percents (21) are read as 21 %.
    """
    return int((Decimal(net_cents) * _fraction(percentage)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def net_for_gross(gross_cents: int, percentage: Decimal) -> tuple[int, int, int]:
    """(net, vat, residue): the net whose net + VAT-on-top comes closest to the gross without passing it.

    residue = gross − net − vat is 0 for most amounts; where the rounded VAT skips a cent it is ±1 (more for
    absurd percentages), and belongs on the rounding account.
    """
    fraction = _fraction(percentage)
    guess = int((Decimal(gross_cents) / (1 + fraction)).to_integral_value(rounding=ROUND_HALF_UP))
    best = None
    for net in range(guess - 3, guess + 4):
        total = net + vat_on_top_cents(net, fraction)
        residue = gross_cents - total
        if residue * (1 if gross_cents >= 0 else -1) < 0:
            continue  # never post more than the expense: the residue keeps the sign of the gross
        if best is None or abs(residue) < abs(best[2]):
            best = (net, total - net, residue)
    assert best is not None
    return best


def _fraction(percentage) -> Decimal:
    value = Decimal(str(percentage))
    return value / 100 if value > 1 else value


def _round_cents(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


class _Lookup:
    """Dimension snapshots indexed by code for O(1) checks per line."""

    def __init__(self, dims: Dimensions):
        self.gl = index_by_code(dims.gl_accounts)
        self.cost_centers = index_by_code(dims.cost_centers)
        self.cost_units = index_by_code(dims.cost_units)
        self.journals = index_by_code(dims.journals)
        self.vat = index_by_code(dims.vat_codes)
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


def _flag(value) -> bool:
    return bool(value) and not (isinstance(value, float) and pd.isna(value))


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _use(account: dict | None, field: str) -> int:
    value = account.get(field) if account is not None else None
    return 0 if value is None or (isinstance(value, float) and pd.isna(value)) else int(value)


# --- the rules on one mapped value: the drafts below and `expensify-exact check` both apply these ------------

def index_by_code(frame: pd.DataFrame) -> dict[str, dict]:
    """A dimension snapshot's rows by code; Exact may space-pad codes (exact-online.md §4.5), mappings never are."""
    return {str(r["code"]).strip(): r for r in frame.to_dict("records")} if len(frame) else {}


def journal_problems(journal: dict | None) -> list[Reason]:
    """What keeps a journal from taking the entries: missing, or blocked and/or not a type-90 general journal."""
    if journal is None:
        return [Reason.UNKNOWN_JOURNAL]
    blocked = [Reason.BLOCKED_JOURNAL] if _flag(journal.get("is_blocked")) else []
    return blocked + ([Reason.INVALID_JOURNAL_TYPE] if _int(journal.get("type")) != 90 else [])


def allows_vat(journal: dict | None) -> bool:
    return journal is not None and _flag(journal.get("allow_vat"))


def account_problem(account: dict | None) -> Reason | None:
    """A GL account a line cannot use: missing or blocked."""
    if account is None:
        return Reason.UNKNOWN_GL_ACCOUNT
    return Reason.BLOCKED_GL_ACCOUNT if _flag(account.get("is_blocked")) else None


def dimension_problem(dimension: str, row: dict | None, day: date) -> Reason | None:
    """A cost center or cost unit (`dimension`) a line dated `day` cannot carry: missing, or ended before `day`."""
    unknown, ended = ((Reason.UNKNOWN_COST_CENTER, Reason.ENDED_COST_CENTER) if dimension == "cost_center"
                      else (Reason.UNKNOWN_COST_UNIT, Reason.ENDED_COST_UNIT))
    if row is None:
        return unknown
    end = end_date(row)
    return ended if end is not None and end < day else None


def end_date(row: dict) -> date | None:
    """The last day of a cost center or cost unit, if it has one."""
    return _as_date(row.get("end_date"))


def vat_code_problem(vat: dict | None) -> Reason | None:
    """A VAT code a line cannot carry: missing or blocked."""
    if vat is None:
        return Reason.UNKNOWN_VAT_CODE
    return Reason.BLOCKED_VAT_CODE if _flag(vat.get("is_blocked")) else None


def gl_code_for(config: ProjectConfig, conn: Connection, category: str, policy_id: str | None,
                category_gl_code: str | None) -> str | None:
    """The GL account of a category: categories.yaml, else (with `fallback_to_category_gl_code`) Expensify's."""
    code = config.gl_account_for(category, policy_id)
    if code is None and conn.posting.fallback_to_category_gl_code and category_gl_code:
        code = str(category_gl_code).strip()
    return code


def vat_code_for(tax_name: str, config: ProjectConfig, conn: Connection,
                 journal: dict | None) -> tuple[str | None, Reason | None]:
    """(the VAT code an expense with `tax_name` carries, None to post it gross; the problem that rejects it).

    Only with a vat.yaml table and on a journal that allows VAT; on one that does not, a mapped code is a problem
    only with `posting.require_vat`. "" in vat.yaml posts the tax name gross.
    """
    table = config.vat_codes
    if not table or not tax_name:
        return None, None
    code = table.get(tax_name)
    if not allows_vat(journal):
        # Exact refuses a VAT code here (§5.11 "Not allowed: VAT-code"): post gross unless told to insist.
        return None, Reason.VAT_NOT_ALLOWED if code and conn.posting.require_vat else None
    if code is None:
        return None, Reason.UNMAPPED_TAX_NAME
    return code or None, None


def build_journal_drafts(lines: pd.DataFrame, connection: Connection, config: ProjectConfig, dims: Dimensions,
                         run_date: date) -> JournalDrafts:
    """Apply the posting rules to every report in `lines` (all of one connection).

    Args:
        lines: normalized expense lines (docs/architecture.md).
        connection: whose journal, accounts and rules apply.
        config: the category, tag, VAT and default-dimension mappings.
        dims: the Exact dimension snapshot used to validate every value.
        run_date: today's date, for the `run_date` posting-date policy.

    Returns:
        Drafts for reports that pass every rule and one rejection row per problem for those that do not;
        a report is never split between the two.
    """
    lookup = _Lookup(dims)
    draft_rows: list[dict] = []
    rejection_rows: list[dict] = []
    # One itertuples pass over the whole frame: slicing a DataFrame per report costs milliseconds of pandas
    # overhead each, whatever the report's size. The stable sort keeps each report's lines in input order.
    ordered = lines.sort_values("report_id", kind="stable").itertuples(index=False)
    for _report_id, expenses in itertools.groupby(ordered, key=attrgetter("report_id")):
        rows, problems = _ReportDraft(list(expenses), connection, config, lookup, run_date).build()
        if problems:
            rejection_rows.extend(problems)
        else:
            draft_rows.extend(rows)
    drafts = pd.DataFrame(draft_rows, columns=DRAFT_COLUMNS).astype(DRAFT_DTYPES)
    return JournalDrafts(lines=drafts, rejections=pd.DataFrame(rejection_rows, columns=REJECTION_COLUMNS))


class _ReportDraft:
    """One report's entry: collects lines and problems; `build()` returns both (lines only matter without problems)."""

    def __init__(self, expenses: list, conn: Connection, config: ProjectConfig, lookup: _Lookup, run_date: date):
        """`expenses`: the report's expense lines as itertuples rows, in input order."""
        self.expenses, self.conn, self.config, self.lookup, self.run_date = expenses, conn, config, lookup, run_date
        self.report_id = expenses[0].report_id
        self.partition_date = expenses[0].partition_date
        self.problems: list[dict] = []

    def problem(self, code: Reason, message: str, transaction_id: str = "", dimension: str = "",
                value: str = "") -> None:
        self.problems.append({"connection": self.conn.name, "partition_date": self.partition_date,
                              "report_id": self.report_id, "transaction_id": transaction_id, "code": code.value,
                              "dimension": dimension, "value": value, "message": message})

    # -- the entry ---------------------------------------------------------------------------------------
    def build(self) -> tuple[list[dict], list[dict]]:
        conn = self.conn
        journal = self.lookup.journals.get(conn.exact.journal)
        for reason in journal_problems(journal):
            what = {Reason.UNKNOWN_JOURNAL: "does not exist in Exact", Reason.BLOCKED_JOURNAL: "is blocked in Exact",
                    Reason.INVALID_JOURNAL_TYPE: f"has type {(journal or {}).get('type')}, not 90"}[reason]
            self.problem(reason, f"journal {conn.exact.journal} {what}", dimension="journal", value=conn.exact.journal)
        if journal is None:
            return [], self.problems
        self.journal = journal
        if not self._entry_date_and_period():
            return [], self.problems
        self._currency()

        rows: list[dict] = []
        residues: list[tuple[str, int, str]] = []  # (transaction_id, cents, why)
        payables: dict[str, list[tuple[int, Decimal]]] = {}  # credit account -> [(row index, report-currency amount)]
        for expense in self.expenses:
            self._expense_lines(expense, rows, residues, payables)
        if self.rate is not None:
            self._conversion_residues(rows, residues, payables)
        if residues and not self.problems:
            self._rounding_line(rows, residues)
        for n, row in enumerate(rows, start=1):
            row["line_no"] = n
        if not self.problems:
            total = sum(r["amount_cents"] + r["vat_amount_cents"] for r in rows)
            if total != 0:
                self.problem(Reason.UNBALANCED, "debits and credits differ after Exact's VAT", dimension="amount",
                             value=str(total))
        return rows, self.problems

    def _entry_date_and_period(self) -> bool:
        conn = self.conn
        entry_date = _entry_date(self.expenses, conn, self.run_date)
        period = self.lookup.period_of(entry_date)
        if period is None:
            self.problem(Reason.MISSING_PERIOD, f"no financial period in Exact contains {entry_date}",
                         dimension="period", value=entry_date.isoformat())
            return False
        year, fin_period, _ = period
        if conn.posting.closed_through and (year, fin_period) <= _year_month(conn.posting.closed_through):
            if conn.posting.closed_period_policy == "next_open_period":
                moved = self.lookup.first_period_after(*_year_month(conn.posting.closed_through))
                if moved is None:
                    self.problem(Reason.MISSING_PERIOD, "no open financial period after the closed ones",
                                 dimension="period", value=conn.posting.closed_through)
                    return False
                year, fin_period, entry_date = moved
            else:
                self.problem(Reason.CLOSED_PERIOD, f"period {year}/{fin_period:02d} is closed", dimension="period",
                             value=f"{year}/{fin_period:02d}")
        self.entry_date, self.year, self.fin_period = entry_date, year, fin_period
        return True

    def _currency(self) -> None:
        """Sets the entry currency and, for a converted report, the report→division rate."""
        report_currency = str(self.expenses[0].report_currency)
        division_currency = self.conn.exact.division_currency
        self.report_currency, self.rate = report_currency, None
        if not re.fullmatch(r"[A-Z]{3}", report_currency):
            self.problem(Reason.UNSUPPORTED_CURRENCY, f"report currency {report_currency!r} is not an ISO code",
                         dimension="currency", value=report_currency)
            self.currency = report_currency
        elif report_currency == division_currency or _flag(self.journal.get("allow_variable_currency")):
            # A foreign report goes in as is and Exact converts at its own rate for the entry date: Expensify has
            # no report→division rate to offer, and ExchangeRate's direction is itself unclear (§5.7, §5.8 [?]).
            self.currency = report_currency
        else:
            self.currency = division_currency
            rate = self.conn.posting.exchange_rates.get(report_currency)
            if rate is None:
                self.problem(Reason.MISSING_EXCHANGE_RATE, f"journal {self.conn.exact.journal} posts only in "
                             f"{division_currency} and posting.exchange_rates has no rate for {report_currency}",
                             dimension="currency", value=report_currency)
            else:
                self.rate = Decimal(str(rate))

    # -- one expense -------------------------------------------------------------------------------------
    def _expense_lines(self, expense, rows: list[dict], residues: list, payables: dict) -> None:
        tid = expense.transaction_id
        gl_code = gl_code_for(self.config, self.conn, expense.category, expense.policy_id, expense.category_gl_code)
        if gl_code is None:
            self.problem(Reason.UNMAPPED_CATEGORY, f"category {expense.category!r} maps to no GL account",
                         tid, "category", expense.category)
            return
        account = self._account(gl_code, tid)
        cost_center, cost_unit = self._dimensions(expense, account, gl_code)
        vat = self._vat(expense)
        credit_code = _credit_account(expense, self.conn)
        credit_account = self._account(credit_code, tid)
        self._no_mandatory_dimensions(credit_account, credit_code, tid)

        report_amount = int(expense.converted_amount_cents)
        gross = report_amount if self.rate is None else _round_cents(Decimal(report_amount) * self.rate)
        net, vat_on_top = gross, 0
        if vat is not None and str(vat.get("type")) == "E":
            net, vat_on_top, residue = net_for_gross(gross, Decimal(str(vat.get("percentage") or 0)))
            if residue:
                residues.append((tid, residue, f"VAT {vat['code']} on {gross / 100:.2f}"))
        description, notes = _trace_texts(expense, self.rate, self.currency, gross)
        common = {"connection": self.conn.name, "partition_date": self.partition_date, "report_id": self.report_id,
                  "transaction_id": tid, "currency": self.currency, "entry_date": self.entry_date.isoformat(),
                  "financial_year": self.year, "financial_period": self.fin_period,
                  "journal_code": self.conn.exact.journal, "description": description, "notes": notes}
        rows.append(common | {"side": "debit", "gl_account_code": gl_code,
                              "gl_account_id": account["id"] if account is not None else None,
                              "amount_cents": net, "amount": net / 100, "cost_center": cost_center or "",
                              "cost_unit": cost_unit or "", "vat_code": vat["code"] if vat is not None else "",
                              "vat_amount_cents": vat_on_top})
        # The offset carries the same trace IDs: every line must lead back to its expense (invariant 4).
        payables.setdefault(credit_code, []).append((len(rows), Decimal(report_amount)))
        rows.append(common | {"side": "credit", "gl_account_code": credit_code,
                              "gl_account_id": credit_account["id"] if credit_account is not None else None,
                              "amount_cents": -gross, "amount": -gross / 100, "cost_center": "", "cost_unit": "",
                              "vat_code": "", "vat_amount_cents": 0})

    def _account(self, code: str, tid: str) -> dict | None:
        account = self.lookup.gl.get(code)
        reason = account_problem(account)
        if reason is not None:
            what = "does not exist" if reason == Reason.UNKNOWN_GL_ACCOUNT else "is blocked"
            self.problem(reason, f"GL account {code} {what} in Exact", tid, "gl_account", code)
            return None
        return account

    def _no_mandatory_dimensions(self, account: dict | None, code: str, tid: str) -> None:
        """Offsets and rounding lines carry no cost center or unit, so their accounts must not demand one."""
        for dimension, field, reason in (("cost_center", "use_costcenter", Reason.MISSING_COST_CENTER),
                                         ("cost_unit", "use_costunit", Reason.MISSING_COST_UNIT)):
            if _use(account, field) == 1:
                self.problem(reason, f"GL account {code} requires a {dimension.replace('_', ' ')}, which its "
                             f"lines never carry", tid, dimension, "")

    def _dimensions(self, expense, account: dict | None, gl_code: str) -> tuple[str | None, str | None]:
        """Cost center and cost unit codes: "" when none applies, None when the value was reported as invalid."""
        found: dict[str, str | None] = {}
        for dimension in DIMENSION_NAMES:
            code, source = self._dimension_code(expense, dimension)
            use = _use(account, "use_costcenter" if dimension == "cost_center" else "use_costunit")
            label = dimension.replace("_", " ")
            not_allowed, missing = {"cost_center": (Reason.COST_CENTER_NOT_ALLOWED, Reason.MISSING_COST_CENTER),
                                    "cost_unit": (Reason.COST_UNIT_NOT_ALLOWED, Reason.MISSING_COST_UNIT)}[dimension]
            tid = expense.transaction_id
            if code and use == 2:
                if source == "tag":
                    self.problem(not_allowed, f"GL account {gl_code} takes no {label}, but the tag gives {code}",
                                 tid, dimension, code)
                    code = None
                else:
                    code = ""  # a blanket default does not apply where the account forbids the dimension
            if code:
                snapshot = self.lookup.cost_centers if dimension == "cost_center" else self.lookup.cost_units
                row = snapshot.get(code)
                reason = dimension_problem(dimension, row, self.entry_date)
                if reason is not None:
                    self.problem(reason, f"{label} {code} (from {source}) does not exist in Exact" if row is None
                                 else f"{label} {code} ended on {end_date(row)}", tid, dimension, code)
                    code = None
            if code == "" and use == 1:
                self.problem(missing, f"GL account {gl_code} requires a {label}", tid, dimension, "")
            found[dimension] = code
        return found["cost_center"], found["cost_unit"]

    def _dimension_code(self, expense, dimension: str) -> tuple[str | None, str]:
        """(code, source): the tag's code, else a default; None when the tag maps to nothing (reported)."""
        level_default = ""
        for level in self.config.tags:
            if level.dimension != dimension:
                continue
            tag_value = getattr(expense, f"tag_{level.level}", "") or ""
            if tag_value:
                if tag_value in level.values:
                    return level.values[tag_value], "tag"
                self.problem(Reason.UNMAPPED_TAG, f"tag {tag_value!r} (level {level.level}) maps to no {dimension}",
                             expense.transaction_id, dimension, tag_value)
                return None, "tag"
            level_default = level_default or (level.default or "")
        code = self.config.defaults.for_expense(dimension, expense.employee_email, expense.category)
        if code:
            return code, "defaults.yaml"
        return level_default, "tags.yaml default"

    def _vat(self, expense) -> dict | None:
        """The VAT code row for the expense, or None to post the gross amount without a code."""
        tax_name = expense.tax_name or ""
        tid = expense.transaction_id
        code, reason = vat_code_for(tax_name, self.config, self.conn, self.journal)
        if reason == Reason.VAT_NOT_ALLOWED:
            self.problem(reason, f"journal {self.conn.exact.journal} does not allow VAT, but tax {tax_name!r} maps "
                         f"to VAT code {self.config.vat_codes[tax_name]}", tid, "vat_code",
                         self.config.vat_codes[tax_name])
        elif reason == Reason.UNMAPPED_TAX_NAME:
            self.problem(reason, f"tax {tax_name!r} is not in mappings/vat.yaml", tid, "tax_name", tax_name)
        if code is None:
            return None  # gross: no VAT table, no tax, "" in vat.yaml, or a journal without VAT
        vat = self.lookup.vat.get(code)
        reason = vat_code_problem(vat)
        if reason is not None:
            self.problem(reason, f"VAT code {code} (tax {tax_name!r}) does not exist in Exact" if vat is None
                         else f"VAT code {code} is blocked in Exact", tid, "vat_code", code)
            return None
        return vat | {"code": code}

    # -- residues ----------------------------------------------------------------------------------------
    def _conversion_residues(self, rows: list[dict], residues: list, payables: dict) -> None:
        """Each payable is its expenses' report-currency total converted once, as the employee or card is owed;
        the difference to the line-by-line conversion is the conversion residue."""
        for _code, items in payables.items():
            owed = _round_cents(sum(amount for _, amount in items) * self.rate)
            credited = -sum(rows[index]["amount_cents"] for index, _ in items)
            residue = owed - credited
            if residue:
                last = rows[items[-1][0]]
                last["amount_cents"] -= residue
                last["amount"] = last["amount_cents"] / 100
                residues.append((last["transaction_id"], residue, f"conversion at {self.rate:f}"))

    def _rounding_line(self, rows: list[dict], residues: list[tuple[str, int, str]]) -> None:
        code = self.conn.exact.rounding_account
        tid = residues[-1][0]
        total = sum(cents for _, cents, _ in residues)
        if total == 0:
            return  # residues that cancel out need no line
        if not code:
            self.problem(Reason.MISSING_ROUNDING_ACCOUNT, f"a rounding residue of {total / 100:.2f} needs "
                         f"exact.rounding_account", tid, "rounding_account", "")
            return
        account = self._account(code, tid)
        self._no_mandatory_dimensions(account, code, tid)
        if self.problems:
            return
        why = "; ".join(f"{t}: {c / 100:+.2f} ({w})" for t, c, w in residues)
        rows.append({"connection": self.conn.name, "partition_date": self.partition_date,
                     "report_id": self.report_id, "transaction_id": tid, "side": "rounding",
                     "gl_account_code": code, "gl_account_id": account["id"], "amount_cents": total,
                     "amount": total / 100, "currency": self.currency, "cost_center": "", "cost_unit": "",
                     "vat_code": "", "entry_date": self.entry_date.isoformat(), "financial_year": self.year,
                     "financial_period": self.fin_period, "journal_code": self.conn.exact.journal,
                     "description": f"{self.report_id}/{tid} rounding"[:DESCRIPTION_MAX],
                     "notes": f"Expensify report {self.report_id}, transaction {tid}: rounding residue {why}"
                              [:NOTES_MAX],
                     "vat_amount_cents": 0})


def _entry_date(expenses: list, conn: Connection, run_date: date) -> date:
    first = expenses[0]
    policy = conn.posting.date_policy
    if policy == "submitted_date" and pd.notna(first.submitted_at):
        return pd.Timestamp(first.submitted_at).tz_convert(conn.timezone).date()
    if policy == "reimbursed_date" and pd.notna(first.reimbursed_at):
        return pd.Timestamp(first.reimbursed_at).tz_convert(conn.timezone).date()
    if policy == "last_expense_date":
        return date.fromisoformat(max(expense.expense_date for expense in expenses))
    if policy == "run_date":
        return run_date
    return date.fromisoformat(first.partition_date)


def _year_month(value: str) -> tuple[int, int]:
    year, month = value.split("-")
    return int(year), int(month)


def _credit_account(expense, conn: Connection) -> str:
    if expense.reimbursable or not expense.card_bank:
        return conn.exact.employee_payable_account
    return (conn.exact.card_accounts.get(str(expense.card_id))
            or conn.exact.card_accounts.get(expense.card_bank)
            or conn.exact.card_liability_account)


def _trace_texts(expense, rate: Decimal | None, entry_currency: str, entry_cents: int) -> tuple[str, str]:
    """Description (IDs first, so truncation keeps them) and Notes (IDs, then the money trail, then the merchant)."""
    ids = f"{expense.report_id}/{expense.transaction_id}"
    description = f"{ids} {expense.merchant}"[:DESCRIPTION_MAX]
    trail = []
    if expense.currency != expense.report_currency:
        trail.append(f"original {int(expense.amount_cents) / 100:.2f} {expense.currency} @ {expense.exchange_rate:g}")
    if rate is not None:
        trail.append(f"report {int(expense.converted_amount_cents) / 100:.2f} {expense.report_currency} @ {rate:f} "
                     f"= {entry_cents / 100:.2f} {entry_currency}")
    money = "".join(f" | {t}" for t in trail)
    notes = (f"Expensify report {expense.report_id}, transaction {expense.transaction_id}{money}: "
             f"{expense.merchant} | {expense.category}")
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
