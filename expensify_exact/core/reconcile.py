"""Reconciliation: proves, per connection and day (and month), that Exact's books match what Expensify approved.

Three sides are compared: Expensify's approved reports (re-exported for the range, independently of the posting run,
and mapped again into the lines they should have become), the connector's posted ledger and quarantine, and the lines Exact actually holds (read back from
`financialtransaction/TransactionLines`, exact-online.md §5.12). Every disagreement is a `Finding` with a reason code.

The comparison functions are pure (DataFrames in, findings out); `core/readback.py` reads Exact,
`approved_lines_by_day` is the only function here that talks to Expensify.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

import pandas as pd

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.expense_lines import NormalizedLines, approval_day
from expensify_exact.core.journal import Dimensions, JournalDrafts, Reason
from expensify_exact.core.pipeline import draft, normalize
from expensify_exact.core.readback import ExactReader, int_or_none, read_back_entries, read_back_period
from expensify_exact.store import IntentKind, IntentStatus, LedgerRow, QuarantineItem, QuarantineStatus, StateStore


class Finding(StrEnum):
    NOT_POSTED = "NOT_POSTED"
    POSTED_NOT_APPROVED = "POSTED_NOT_APPROVED"
    LEDGER_DIFFERS_FROM_EXPENSIFY = "LEDGER_DIFFERS_FROM_EXPENSIFY"
    MISSING_IN_EXACT = "MISSING_IN_EXACT"
    AMOUNT_CHANGED_IN_EXACT = "AMOUNT_CHANGED_IN_EXACT"
    ACCOUNT_CHANGED_IN_EXACT = "ACCOUNT_CHANGED_IN_EXACT"
    DIMENSION_CHANGED_IN_EXACT = "DIMENSION_CHANGED_IN_EXACT"
    POSTED_TWICE = "POSTED_TWICE"
    CARD_LIABILITY_NOT_NETTED = "CARD_LIABILITY_NOT_NETTED"
    TOTALS_DIFFER = "TOTALS_DIFFER"


# What an accountant does about each finding: shown in the digest and the Dagster UI.
FINDING_FIXES: dict[Finding, str] = {
    Finding.NOT_POSTED: "Run the day again (`expensify-exact run --start DAY`); if it stays unposted, check the run's "
                        "log for a failure or a deferral.",
    Finding.POSTED_NOT_APPROVED: "The report is in Exact but Expensify no longer lists it as approved that day: "
                                 "check whether it was retracted or re-approved, and reverse the entry if needed.",
    Finding.LEDGER_DIFFERS_FROM_EXPENSIFY: "The report changed in Expensify after it was posted: review it, then "
                                           "book a reversal and a corrected entry in Exact.",
    Finding.MISSING_IN_EXACT: "The entry was deleted in Exact: restore it from the audit log (the posted lines are "
                              "in the connector's audit trail) or book it again by hand, then reconcile again.",
    Finding.AMOUNT_CHANGED_IN_EXACT: "Someone changed an amount in Exact after posting: correct it back to the "
                                     "Expensify amount, or correct the expense in Expensify if Exact is right.",
    Finding.ACCOUNT_CHANGED_IN_EXACT: "A line was moved to another GL account in Exact: if intended, update "
                                      "mappings/categories.yaml so future reports agree; otherwise move it back.",
    Finding.DIMENSION_CHANGED_IN_EXACT: "A cost center or cost unit was changed in Exact: if intended, update "
                                        "mappings/tags.yaml or the expense's tag; otherwise change it back.",
    Finding.POSTED_TWICE: "Two entries in Exact carry this report: reverse the one the connector's ledger does not "
                          "know (see the entry numbers).",
    Finding.CARD_LIABILITY_NOT_NETTED: "The card account does not net to zero after the card statement was booked: "
                                       "look for card spend missing from Expensify, or a settlement booked twice.",
    Finding.TOTALS_DIFFER: "The GL account / cost center total in Exact differs from Expensify's: see the report "
                           "findings above for the cause.",
}

FINDING_COLUMNS = ["connection", "period", "code", "report_id", "entry_id", "entry_number", "transaction_id",
                   "gl_account_code", "cost_center", "currency", "expected_cents", "actual_cents", "message"]

EXPECTED_COLUMNS = ["report_id", "transaction_id", "gl_account_code", "cost_center", "cost_unit", "amount_cents",
                    "currency"]
TOTALS_COLUMNS = ["gl_account_code", "cost_center", "currency", "expected_cents", "actual_cents", "difference_cents"]

# --- reading Expensify ------------------------------------------------------------------------------------

class ReportExporter(Protocol):
    """What reconciliation needs from the Expensify client."""

    def export_reports(self, start: date, end: date, policy_ids: Sequence[str], *, timezone: str = ...,
                       source_timezone: str = ...) -> list[dict]: ...


def approved_lines_by_day(client: ReportExporter, connection: Connection, days: Sequence[str]
                          ) -> dict[str, NormalizedLines]:
    """Expensify's approved reports for the days, read afresh with one export for the whole range.

    Reconciliation never reuses what the posting run stored (`expense_lines`): a report approved for a day but
    never picked up by that run (approved after the export, an export edge, a report retracted and approved again)
    is exactly what it exists to find.

    Args:
        client: the connection's ExpensifyClient.
        connection: the connection (policies, timezone, timestamp zone).
        days: approval days `YYYY-MM-DD`; one export job covers first..last (two beyond a year).

    Returns:
        day → the day's normalized lines and malformed lines, for every requested day (empty when none).
    """
    if not days:
        return {}
    wanted = sorted(set(days))
    reports = client.export_reports(date.fromisoformat(wanted[0]), date.fromisoformat(wanted[-1]),
                                    connection.expensify.policy_ids, timezone=connection.timezone,
                                    source_timezone=connection.expensify.timestamp_timezone)
    by_day: dict[str, list[dict]] = {day: [] for day in wanted}
    for report in reports:
        # A report whose approval does not parse is kept on the first day, where normalization reports it.
        day = approval_day(report, connection.timezone, connection.expensify.timestamp_timezone) or wanted[0]
        if day in by_day:
            by_day[day].append(report)
    return {day: normalize(found, connection) for day, found in by_day.items()}


# --- what Expensify's reports should have become --------------------------------------------------------

def expected_drafts(normalized: NormalizedLines, connection: Connection, config: ProjectConfig, dims: Dimensions,
                    today: date) -> JournalDrafts:
    """The drafts the approved reports map to today, by the posting run's own pipeline (`pipeline.draft`), with the
    period lock lifted (a closed month is reconciled too). Reports with malformed lines are rejected, as posting
    rejects them.
    """
    open_books = connection.model_copy(update={"posting": connection.posting.model_copy(
        update={"closed_through": None})})
    return draft(normalized, open_books, config, dims, today)


def expected_lines(drafts: JournalDrafts) -> pd.DataFrame:
    return drafts.lines.reindex(columns=EXPECTED_COLUMNS).astype({"amount_cents": "int64"})


# --- the comparison -------------------------------------------------------------------------------------

@dataclass
class Reconciliation:
    """The outcome of reconciling one connection over one period (a day `YYYY-MM-DD` or a month `YYYY-MM`)."""

    connection: str
    period: str
    findings: pd.DataFrame  # FINDING_COLUMNS
    totals: pd.DataFrame  # TOTALS_COLUMNS, per GL account, cost center and currency
    stats: dict[str, Any] = field(default_factory=dict)
    card_accounts: pd.DataFrame | None = None  # per card account: ours, settlements, balance, status
    exact_status: dict[str, Any] = field(default_factory=dict)  # ExactRateLimits.status() after the read-back

    @property
    def clean(self) -> bool:
        return self.findings.empty

    def codes(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.findings["code"].value_counts().sort_index().items()}

    def summary(self) -> str:
        if self.clean:
            return (f"{self.connection} {self.period}: 0 findings — Exact matches Expensify "
                    f"({self.stats.get('reports_approved', 0)} approved report(s), "
                    f"{self.stats.get('entries_checked', 0)} entr(y/ies) read back).")
        parts = ", ".join(f"{n} × {code}" for code, n in self.codes().items())
        return f"{self.connection} {self.period}: {len(self.findings)} finding(s): {parts}."


def reconcile_day(*, connection: str, day: str, approved: pd.DataFrame, malformed: pd.DataFrame,
                  expected: pd.DataFrame, ledger: Sequence[LedgerRow], quarantine: Sequence[QuarantineItem],
                  exact: pd.DataFrame, known_entry_ids: dict[str, set[str]] | None = None,
                  reversed_entry_ids: Iterable[str] = ()) -> Reconciliation:
    """Compare one day's three sides.

    Args:
        connection: the connection name.
        day: the approval day, `YYYY-MM-DD`.
        approved: the day's expense lines of this connection (ExpenseLineSchema columns).
        malformed: the day's malformed lines (report_id, transaction_id, reason, detail).
        expected: EXPECTED_COLUMNS, what the approved reports map to (see `expected_drafts`).
        ledger: the connection's ledger rows; those whose partition_date is `day` or whose report is approved
            that day are considered.
        quarantine: the connection's quarantine items (any status).
        exact: EXACT_LINE_COLUMNS read back for the day's entries and reports (`read_back_entries`).
        known_entry_ids: report ID → every EntryID the connector ever posted for it (audit log), for duplicates.
        reversed_entry_ids: entries cancelled by an approved correction: each replaced entry and its reversal.
            They stay in Exact on purpose and are not duplicates.

    Returns:
        The findings (none when the day is clean), totals per GL account / cost center / currency, and counts.
    """
    findings: list[dict] = []

    def find(code: Finding, message: str, **where: Any) -> None:
        findings.append({"connection": connection, "period": day, "code": code.value, "report_id": "",
                         "entry_id": "", "entry_number": None, "transaction_id": "", "gl_account_code": "",
                         "cost_center": "", "currency": "", "expected_cents": None, "actual_cents": None,
                         "message": message} | where)

    approved_ids = set(approved["report_id"]) | set(malformed["report_id"])
    ledger_by_report = {row.report_id: row for row in ledger
                        if row.partition_date == day or row.report_id in approved_ids}
    held = {item.report_id: item for item in quarantine if item.status != QuarantineStatus.REPLAYED}
    posted = {rid: row for rid, row in ledger_by_report.items() if row.status == IntentStatus.POSTED}

    # 1. Every approved report ends posted or quarantined.
    for report_id in sorted(approved_ids):
        if report_id in posted or report_id in held:
            continue
        row = ledger_by_report.get(report_id)
        why = ("an intent to post it is pending: the run that posted it did not record the outcome" if row
               else "it is neither in the posted ledger nor in quarantine")
        find(Finding.NOT_POSTED, f"report {report_id} was approved on {day} but {why}", report_id=report_id,
             entry_id=row.entry_id if row else "")
    for report_id, row in sorted(posted.items()):
        if report_id not in approved_ids and row.partition_date == day:
            find(Finding.POSTED_NOT_APPROVED, f"report {report_id} was posted as entry {row.entry_number} for "
                 f"{day}, but Expensify does not list it as approved that day", report_id=report_id,
                 entry_id=row.entry_id, entry_number=row.entry_number, actual_cents=row.total_cents)

    # 2. The ledger agrees with Expensify (unless the change already sits in quarantine with its correction).
    totals_by_report = approved.groupby("report_id")["converted_amount_cents"].sum().to_dict()
    tids_by_report = approved.groupby("report_id")["transaction_id"].agg(lambda s: sorted(set(s))).to_dict()
    changed_known = {rid for rid, item in held.items()
                     if any(r.get("code") == Reason.CHANGED_AFTER_POSTING.value for r in item.reasons)}
    untrusted_expected: set[str] = set(changed_known)
    for report_id, row in sorted(posted.items()):
        if report_id not in totals_by_report or report_id in changed_known:
            continue
        expensify_total = int(totals_by_report[report_id])
        if expensify_total != row.total_cents or sorted(row.transaction_ids) != tids_by_report[report_id]:
            untrusted_expected.add(report_id)
            find(Finding.LEDGER_DIFFERS_FROM_EXPENSIFY,
                 f"posted as entry {row.entry_number} with {row.total_cents / 100:.2f} over "
                 f"{len(row.transaction_ids)} transaction(s); Expensify now shows {expensify_total / 100:.2f} over "
                 f"{len(tids_by_report[report_id])}", report_id=report_id, entry_id=row.entry_id,
                 entry_number=row.entry_number, expected_cents=expensify_total, actual_cents=row.total_cents)

    # 3. Each posted entry is in Exact, unchanged.
    exact_by_entry = {eid: frame for eid, frame in exact.groupby("entry_id")} if len(exact) else {}
    for report_id, row in sorted(posted.items()):
        lines = exact_by_entry.get(row.entry_id.lower())
        if lines is None:
            find(Finding.MISSING_IN_EXACT, f"entry {row.entry_number} ({row.total_cents / 100:.2f}) of report "
                 f"{report_id} is not in Exact any more", report_id=report_id, entry_id=row.entry_id,
                 entry_number=row.entry_number, expected_cents=row.total_cents, actual_cents=0)
            continue
        if report_id in untrusted_expected:
            continue  # what was posted is no longer what Expensify says; that finding is already made
        mine = expected[expected["report_id"] == report_id]
        if mine.empty:
            continue  # the report no longer maps (e.g. a cost center ended since): nothing to compare lines with
        for diff in compare_entry_lines(mine, lines):
            find(diff.pop("code"), report_id=report_id, entry_id=row.entry_id, entry_number=row.entry_number,
                 **diff)

    # 4. Each report is in Exact once.
    cancelled = {e.lower() for e in reversed_entry_ids}
    entries_per_report: dict[str, set[str]] = {}
    for line in exact.itertuples(index=False):
        if line.report_id and line.entry_id not in cancelled:
            entries_per_report.setdefault(line.report_id, set()).add(line.entry_id)
    for report_id, known in (known_entry_ids or {}).items():
        present = ({e.lower() for e in known} & set(exact_by_entry)) - cancelled
        entries_per_report.setdefault(report_id, set()).update(present)
    numbers = exact.groupby("entry_id")["entry_number"].first().to_dict() if len(exact) else {}
    for report_id, entry_ids in sorted(entries_per_report.items()):
        if len(entry_ids) < 2 or (report_id not in approved_ids and report_id not in ledger_by_report):
            continue
        ours = ledger_by_report[report_id].entry_id.lower() if report_id in ledger_by_report else ""
        listing = ", ".join(f"{int_or_none(numbers.get(e))}{' (ledger)' if e == ours else ''}"
                            for e in sorted(entry_ids, key=lambda e: numbers.get(e) or 0))
        extra = sorted(entry_ids - {ours})
        find(Finding.POSTED_TWICE, f"report {report_id} is in Exact {len(entry_ids)} times: entries {listing}",
             report_id=report_id, entry_id=extra[0] if extra else "",
             entry_number=int_or_none(numbers.get(extra[0])) if extra else None)

    # 5. Totals per GL account, cost center and currency.
    # A report without expected lines (it no longer maps) or whose posted content is disputed is left out of the
    # totals on both sides; its own finding already says why.
    comparable = (set(posted) - untrusted_expected) & set(expected["report_id"])
    exp_side = expected[expected["report_id"].isin(comparable)]
    our_entries = {posted[r].entry_id.lower() for r in comparable}
    dup_entries = {e for r, ids in entries_per_report.items() if r in comparable for e in ids}
    act_side = exact[exact["entry_id"].isin(our_entries | dup_entries)]
    totals = compare_totals(exp_side, act_side)
    for t in totals[totals["difference_cents"] != 0].itertuples(index=False):
        find(Finding.TOTALS_DIFFER, f"GL {t.gl_account_code}{' / ' + t.cost_center if t.cost_center else ''} "
             f"({t.currency}): Expensify {t.expected_cents / 100:.2f}, Exact {t.actual_cents / 100:.2f}",
             gl_account_code=t.gl_account_code, cost_center=t.cost_center, currency=t.currency,
             expected_cents=int(t.expected_cents), actual_cents=int(t.actual_cents))

    in_scope = set(approved_ids) | set(ledger_by_report)
    day_lines = exact[exact["entry_id"].isin({r.entry_id.lower() for r in posted.values()})
                      | exact["report_id"].isin(in_scope)]
    stats = {"reports_approved": len(approved_ids), "reports_posted": len(posted),
             "reports_quarantined": len(approved_ids & set(held)),
             "entries_checked": len({posted[r].entry_id for r in posted}),
             "exact_lines_read": len(day_lines), "expected_lines": len(expected),
             "reports_not_compared": sorted(untrusted_expected & set(posted))}
    return Reconciliation(connection, day, _findings_frame(findings), totals, stats)


def compare_entry_lines(expected: pd.DataFrame, actual: pd.DataFrame) -> list[dict]:
    """Differences between one report's expected lines and its entry's lines in Exact, per transaction and account.

    Returns:
        One dict per difference: code (a Finding), transaction_id, gl_account_code, cost_center, currency,
        expected_cents, actual_cents, message.
    """
    out: list[dict] = []
    exp = _by_tx_account(expected)
    act = _by_tx_account(actual)
    for tx in sorted(set(exp) | set(act)):
        e, a = exp.get(tx, {}), act.get(tx, {})
        label = f"transaction {tx}" if tx else "lines without Expensify IDs"
        if set(e) != set(a):
            out.append({"code": Finding.ACCOUNT_CHANGED_IN_EXACT, "transaction_id": tx,
                        "gl_account_code": ",".join(sorted(set(a) - set(e))),
                        "expected_cents": sum(v["amount"] for v in e.values()),
                        "actual_cents": sum(v["amount"] for v in a.values()),
                        "message": f"{label}: booked on GL {_accounts(a)} in Exact, posted on GL {_accounts(e)}"})
        for gl in sorted(set(e) & set(a)):
            ev, av = e[gl], a[gl]
            if ev["amount"] != av["amount"]:
                out.append({"code": Finding.AMOUNT_CHANGED_IN_EXACT, "transaction_id": tx, "gl_account_code": gl,
                            "cost_center": av["cost_center"], "currency": av["currency"],
                            "expected_cents": ev["amount"], "actual_cents": av["amount"],
                            "message": f"{label} on GL {gl}: {av['amount'] / 100:.2f} in Exact, "
                                       f"{ev['amount'] / 100:.2f} posted"})
            for dim, noun in (("cost_center", "cost center"), ("cost_unit", "cost unit")):
                if ev[dim] != av[dim]:
                    out.append({"code": Finding.DIMENSION_CHANGED_IN_EXACT, "transaction_id": tx,
                                "gl_account_code": gl, "cost_center": av["cost_center"], "currency": av["currency"],
                                "expected_cents": ev["amount"], "actual_cents": av["amount"],
                                "message": f"{label} on GL {gl}: {noun} {av[dim] or '(none)'} in Exact, "
                                           f"{ev[dim] or '(none)'} posted"})
    return out


def _by_tx_account(lines: pd.DataFrame) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for (tx, gl), group in lines.groupby(["transaction_id", "gl_account_code"], sort=True):
        out.setdefault(str(tx), {})[str(gl)] = {
            "amount": int(group["amount_cents"].sum()),
            "cost_center": ",".join(sorted({str(c) for c in group["cost_center"] if c})),
            "cost_unit": ",".join(sorted({str(c) for c in group["cost_unit"] if c})),
            "currency": ",".join(sorted({str(c) for c in group["currency"] if c}))}
    return out


def _accounts(side: dict[str, dict]) -> str:
    return ", ".join(sorted(side)) or "(none)"


def compare_totals(expected: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """Totals per GL account, cost center and currency on both sides; TOTALS_COLUMNS, sorted."""
    keys = ["gl_account_code", "cost_center", "currency"]

    def total(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        if frame.empty:
            return pd.DataFrame(columns=[*keys, name])
        return (frame.assign(cost_center=frame["cost_center"].fillna("").astype(str))
                .groupby(keys, as_index=False)["amount_cents"].sum().rename(columns={"amount_cents": name}))

    merged = total(expected, "expected_cents").merge(total(actual, "actual_cents"), on=keys, how="outer")
    for column in ("expected_cents", "actual_cents"):
        merged[column] = pd.to_numeric(merged[column], errors="coerce").fillna(0).astype("int64")
    merged["difference_cents"] = merged["actual_cents"] - merged["expected_cents"]
    return merged.reindex(columns=TOTALS_COLUMNS).sort_values(keys).reset_index(drop=True)


# --- a month ----------------------------------------------------------------------------------------------

CARD_COLUMNS = ["gl_account_code", "currency", "ours_cents", "settlements_cents", "balance_cents", "status"]


def card_liability_balances(account_lines: pd.DataFrame, accounts: Iterable[str]) -> pd.DataFrame:
    """Per card liability account and currency: our card spend, the settlements booked against it, the balance.

    A line that carries no Expensify IDs is a settlement (the card statement's payment, booked by the accountant).
    Until a settlement is booked the account is "awaiting settlement", which is not a finding.
    """
    rows = []
    lines = account_lines[account_lines["gl_account_code"].isin(set(accounts))]
    for (code, currency), group in lines.groupby(["gl_account_code", "currency"], sort=True):
        traced = group["report_id"] != ""
        ours, settled = int(group.loc[traced, "amount_cents"].sum()), int(group.loc[~traced, "amount_cents"].sum())
        balance = ours + settled
        status = ("awaiting settlement" if not (~traced).any() else "nets to zero" if balance == 0 else "open")
        rows.append({"gl_account_code": code, "currency": currency, "ours_cents": ours,
                     "settlements_cents": settled, "balance_cents": balance, "status": status})
    return pd.DataFrame(rows, columns=CARD_COLUMNS)


def card_accounts_of(connection: Connection) -> list[str]:
    return sorted({connection.exact.card_liability_account, *connection.exact.card_accounts.values()})


def reconcile_month(*, connection: str, month: str, days: dict[str, Reconciliation], expected_days: Sequence[str],
                    journal_lines: pd.DataFrame, account_lines: pd.DataFrame, card_accounts: Iterable[str],
                    ledger: Sequence[LedgerRow]) -> Reconciliation:
    """Roll the month's daily reconciliations up and add what only a whole period shows.

    Args:
        connection: the connection name.
        month: `YYYY-MM`.
        days: the daily reconciliations available for the month, by day.
        expected_days: every day of the month up to today; days without a reconciliation are listed in stats.
        journal_lines: the connector journal's lines in the month's financial period (`read_back_period`).
        account_lines: all lines on the card liability accounts in that period, settlements included.
        card_accounts: the connection's card liability account codes.
        ledger: the connection's ledger rows, to tell which of two entries of a report is the recorded one.
    """
    frames = [d.findings for d in days.values() if not d.findings.empty]
    findings = pd.concat(frames, ignore_index=True) if frames else _findings_frame([])
    extra: list[dict] = []
    base = {"connection": connection, "period": month, "report_id": "", "entry_id": "", "entry_number": None,
            "transaction_id": "", "gl_account_code": "", "cost_center": "", "currency": "", "expected_cents": None,
            "actual_cents": None}

    # Duplicates across days: a report the daily look-up could not see twice (e.g. re-approved on another day).
    already = set(findings.loc[findings["code"] == Finding.POSTED_TWICE.value, "report_id"])
    ledger_entry = {row.report_id: row.entry_id.lower() for row in ledger}
    traced = journal_lines[journal_lines["report_id"] != ""]
    for report_id, group in traced.groupby("report_id", sort=True):
        entry_ids = set(group["entry_id"])
        if len(entry_ids) < 2 or report_id in already:
            continue
        numbers = group.groupby("entry_id")["entry_number"].first().to_dict()
        extra_ids = sorted(entry_ids - {ledger_entry.get(report_id, "")})
        extra.append(base | {"code": Finding.POSTED_TWICE.value, "report_id": report_id, "entry_id": extra_ids[0],
                             "entry_number": int_or_none(numbers.get(extra_ids[0])),
                             "message": f"report {report_id} is in Exact {len(entry_ids)} times in {month}: entries "
                                        + ", ".join(str(int_or_none(numbers[e])) for e in sorted(
                                            entry_ids, key=lambda e: numbers.get(e) or 0))})

    cards = card_liability_balances(account_lines, card_accounts)
    for c in cards[cards["status"] == "open"].itertuples(index=False):
        extra.append(base | {"code": Finding.CARD_LIABILITY_NOT_NETTED.value, "gl_account_code": c.gl_account_code,
                             "currency": c.currency, "expected_cents": 0, "actual_cents": int(c.balance_cents),
                             "message": f"card account {c.gl_account_code} ({c.currency}) holds "
                                        f"{c.balance_cents / 100:.2f} after settlements: card spend "
                                        f"{-c.ours_cents / 100:.2f}, settled {c.settlements_cents / 100:.2f}"})
    if extra:
        findings = pd.concat([findings, _findings_frame(extra)], ignore_index=True)

    totals_frames = [d.totals for d in days.values() if not d.totals.empty]
    if totals_frames:
        totals = (pd.concat(totals_frames, ignore_index=True)
                  .groupby(["gl_account_code", "cost_center", "currency"], as_index=False)
                  [["expected_cents", "actual_cents", "difference_cents"]].sum())
    else:
        totals = pd.DataFrame(columns=TOTALS_COLUMNS)
    stats = {"days_reconciled": len(days), "days_missing": sorted(set(expected_days) - set(days)),
             **{k: sum(int(d.stats.get(k, 0)) for d in days.values())
                for k in ("reports_approved", "reports_posted", "reports_quarantined", "entries_checked")},
             "journal_lines_in_period": len(journal_lines)}
    return Reconciliation(connection, month, findings.reset_index(drop=True), totals.reindex(columns=TOTALS_COLUMNS),
                          stats, card_accounts=cards)


# --- running it against Exact and the state store -------------------------------------------------------

def reconcile_days(connection: Connection, config: ProjectConfig, lines_by_day: dict[str, NormalizedLines],
                   store: StateStore, client: ExactReader, *, today: date) -> dict[str, Reconciliation]:
    """Reconcile several approval days of one connection, reading Exact's dimensions once.

    Args:
        connection: the connection.
        config: the project's mappings.
        lines_by_day: day → NormalizedLines, Expensify's approved reports re-read for reconciliation
            (`approved_lines_by_day`); a `connection` column, if present, is used to keep this connection's rows.
        store: the StateStore (ledger, quarantine, audit log).
        client: the connection's ExactClient.
        today: the connection's day (`clock.connection_today`; only the `run_date` posting-date policy uses it).

    Raises:
        ApiError: Exact could not be read; nothing is concluded from a partial read-back.
    """
    from expensify_exact.core.snapshots import fetch_dimensions, needed_codes

    dims = fetch_dimensions(client, needed_codes(connection, config))
    ledger = store.ledger_rows(connection.name)
    quarantine = store.quarantine_items(connection.name, status=None)
    prepared = {}
    for day, normalized in sorted(lines_by_day.items()):
        lines = _own_rows(normalized.lines, connection.name).drop(columns=["connection"], errors="ignore")
        malformed = _own_rows(normalized.malformed, connection.name)
        report_ids = set(lines["report_id"]) | set(malformed["report_id"]) | {
            r.report_id for r in ledger if r.partition_date == day}
        prepared[day] = (lines, malformed, report_ids)
    all_reports = set().union(*(p[2] for p in prepared.values())) if prepared else set()
    known = known_entries_from_audit(row for rid in sorted(all_reports)
                                     for row in store.audit_rows(connection=connection.name, report_id=rid))
    entry_ids = {r.entry_id for r in ledger if r.report_id in all_reports} | {e for ids in known.values() for e in ids}
    # One read-back for all the days of a run: a month's backfill costs a few calls, not two per day.
    cancelled = _cancelled_by_corrections(store, connection.name, all_reports)
    exact = read_back_entries(client, sorted(entry_ids), all_reports)
    results = {}
    for day, (lines, malformed, report_ids) in prepared.items():
        drafts = expected_drafts(NormalizedLines(lines, malformed), connection, config, dims, today)
        result = reconcile_day(connection=connection.name, day=day, approved=lines, malformed=malformed,
                               expected=expected_lines(drafts), ledger=ledger, quarantine=quarantine, exact=exact,
                               known_entry_ids={r: known[r] for r in report_ids if r in known},
                               reversed_entry_ids=cancelled)
        results[day] = with_exact_status(result, client.rate_limits.status())
    return results


def reconcile_connection_month(connection: Connection, month: str, days: dict[str, Reconciliation],
                               expected_days: Sequence[str], store: StateStore, client: ExactReader) -> Reconciliation:
    """The monthly rollup of one connection: the daily results plus the period-wide reads (duplicates, cards)."""
    from expensify_exact.core.snapshots import fetch_dimension

    periods = fetch_dimension(client, "financial_periods")
    first = date.fromisoformat(f"{month}-01")
    year, period = first.year, first.month  # calendar periods, unless Exact says otherwise below
    for p in periods.itertuples(index=False):
        if p.start_date is not None and p.start_date <= first and (p.end_date is None or first <= p.end_date):
            year, period = int(p.fin_year), int(p.fin_period)
    cards = card_accounts_of(connection)
    journal_lines, account_lines = read_back_period(client, journal=connection.exact.journal, accounts=cards,
                                                    year=year, period=period)
    result = reconcile_month(connection=connection.name, month=month, days=days, expected_days=expected_days,
                             journal_lines=journal_lines, account_lines=account_lines, card_accounts=cards,
                             ledger=store.ledger_rows(connection.name))
    result.stats["financial_period"] = f"{year}/{period:02d}"
    return with_exact_status(result, client.rate_limits.status())


def _cancelled_by_corrections(store: StateStore, connection: str, report_ids: Iterable[str]) -> set[str]:
    """Entries an approved correction cancelled: each posted reversal and the entry it reverses."""
    out: set[str] = set()
    for report_id in sorted(report_ids):
        for row in store.intents_for(connection, report_id):
            if row.kind == IntentKind.REVERSAL and row.status == IntentStatus.POSTED:
                out |= {row.posted_entry_id.lower(), row.replaces_entry_id.lower()}
    return out


def _own_rows(frame: pd.DataFrame, connection: str) -> pd.DataFrame:
    if "connection" in frame.columns:
        return frame[frame["connection"] == connection]
    return frame


# --- helpers ----------------------------------------------------------------------------------------------

def known_entries_from_audit(audit_rows: Iterable[dict]) -> dict[str, set[str]]:
    """report ID → every EntryID the audit log says was posted for it."""
    out: dict[str, set[str]] = {}
    for row in audit_rows:
        if row.get("event") == "posted" and row.get("report_id") and row.get("entry_id"):
            out.setdefault(row["report_id"], set()).add(str(row["entry_id"]).lower())
    return out


def with_exact_status(result: Reconciliation, status: dict[str, Any]) -> Reconciliation:
    return replace(result, exact_status=dict(status))


def _findings_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=FINDING_COLUMNS)
    return frame.astype({"entry_number": "Int64", "expected_cents": "Int64", "actual_cents": "Int64"})
