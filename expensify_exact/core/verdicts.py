"""What a run does with each report of its drafts, decided from the drafts and the ledger alone: `posting` acts on
these verdicts, and a dry run only shows them (`preview`), so what a dry run promises is what a run does."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Protocol

import pandas as pd

from expensify_exact.core.journal import (
    JournalDrafts,
    Reason,
    content_hash,
    entry_body,
    entry_id_for,
    entry_total_cents,
)
from expensify_exact.store import IntentStatus, LedgerRow


class Action(StrEnum):
    """What a run does with a report (see `Verdict`)."""

    POST = "post"
    ALREADY_POSTED = "already_posted"
    QUARANTINE = "quarantine"
    SETTLE_PENDING = "settle_pending"


# Every draft line as a dry run shows it: both Expensify IDs, the side, account, amount, dimensions, VAT and date.
SHOWN_LINE_COLUMNS = ["report_id", "transaction_id", "side", "gl_account_code", "amount", "currency", "cost_center",
                      "cost_unit", "vat_code", "entry_date", "description"]


class LedgerReader(Protocol):
    def ledger_get(self, connection: str, report_id: str) -> LedgerRow | None: ...


@dataclass(frozen=True)
class Verdict:
    """One report's fate in a run.

    action:
        post: not in the ledger (or its earlier intent is not in Exact): POST `body` as `entry_id`.
        already_posted: the ledger holds it posted (`entry_id`, `entry_number`); nothing is sent.
        quarantine: held back with `reasons`: it fails a rule, or (CHANGED_AFTER_POSTING) the ledger holds other
            content for it, with a drafted reversal + correction in `correction`.
        settle_pending: an earlier POST got no certain answer; Exact is asked for that entry first, then the report
            is judged again (posted if Exact does not hold it).
    """

    connection: str
    partition_date: str
    report_id: str
    action: Action
    transaction_ids: list[str]
    total_cents: int = 0
    entry_id: str | None = None  # post: the EntryID sent; already_posted, CHANGED_AFTER_POSTING: the ledger's
    entry_number: int | None = None
    content_hash: str | None = None  # of `body`
    body: dict | None = None  # the entry as drafted now, without its EntryID (reports with draft lines)
    reason_codes: list[str] = field(default_factory=list)
    reasons: list[dict] = field(default_factory=list)
    correction: dict | None = None  # CHANGED_AFTER_POSTING: {reverse_entry_id, corrected_entry} for `approve`
    note: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def tids(frame: pd.DataFrame) -> list[str]:
    return sorted({t for t in frame["transaction_id"] if t})


def judge_rejected(report_id: str, problems: pd.DataFrame, connection: str, ledger: LedgerRow | None) -> Verdict:
    """A report that fails a rule: quarantined, unless the ledger already holds it posted."""
    partition_date = problems.iloc[0]["partition_date"]
    reasons = problems.drop(columns=["connection", "partition_date", "report_id"]).to_dict("records")
    codes = sorted(set(problems["code"]))
    if ledger is not None and ledger.status == IntentStatus.POSTED:
        # Already in Exact; a rule that fails today (e.g. a cost center ended since) does not un-post it.
        return Verdict(connection, partition_date, report_id, Action.ALREADY_POSTED, ledger.transaction_ids,
                       ledger.total_cents, ledger.entry_id, ledger.entry_number, reason_codes=codes, reasons=reasons,
                       note="now fails validation")
    return Verdict(connection, partition_date, report_id, Action.QUARANTINE, tids(problems), reason_codes=codes,
                   reasons=reasons)


def judge_lines(report_id: str, report_lines: pd.DataFrame, connection: str, ledger: LedgerRow | None) -> Verdict:
    """A report with a valid draft: posted, already posted, or (changed since it was posted) quarantined."""
    body = entry_body(report_lines)
    body_hash = content_hash(body)
    base = dict(connection=connection, partition_date=report_lines.iloc[0]["partition_date"], report_id=report_id,
                transaction_ids=tids(report_lines), total_cents=entry_total_cents(report_lines),
                content_hash=body_hash, body=body)
    if ledger is not None and ledger.status == IntentStatus.PENDING:
        return Verdict(action=Action.SETTLE_PENDING, entry_id=entry_id_for(connection, report_id, body_hash), **base,
                       note=f"an earlier POST (EntryID {ledger.entry_id}) got no certain answer: Exact is asked for "
                            f"it first, and this entry is posted only if Exact does not hold it")
    if ledger is not None and ledger.status == IntentStatus.POSTED:
        if ledger.content_hash == body_hash:
            return Verdict(action=Action.ALREADY_POSTED, entry_id=ledger.entry_id, entry_number=ledger.entry_number, **base)
        return Verdict(action=Action.QUARANTINE, entry_id=ledger.entry_id, entry_number=ledger.entry_number,
                       reason_codes=[Reason.CHANGED_AFTER_POSTING.value], reasons=[_changed(ledger, base)],
                       correction={"reverse_entry_id": ledger.entry_id, "corrected_entry": body}, **base)
    return Verdict(action=Action.POST, entry_id=entry_id_for(connection, report_id, body_hash), **base)


def _changed(ledger: LedgerRow, base: dict) -> dict:
    """Never post a changed report again: the reason says what changed (the verdict carries the drafted reversal +
    correction that `quarantine approve` posts)."""
    return {"transaction_id": "", "code": Reason.CHANGED_AFTER_POSTING.value, "dimension": "report",
            "value": ledger.entry_id,
            "message": f"posted as entry {ledger.entry_number} ({ledger.total_cents / 100:.2f}); the report now "
                       f"totals {base['total_cents'] / 100:.2f} over {len(base['transaction_ids'])} transaction(s)"}


def preview(drafts: JournalDrafts, *, connection: str, store: LedgerReader) -> list[Verdict]:
    """The verdict on every report of `drafts`, in the order posting settles them; reads the ledger, writes
    nothing."""
    verdicts = [judge_rejected(report_id, problems, connection, store.ledger_get(connection, report_id))
                for report_id, problems in drafts.rejections.groupby("report_id", sort=True)]
    lines = drafts.lines
    for report_id in dict.fromkeys(lines["report_id"]) if len(lines) else []:
        verdicts.append(judge_lines(report_id, lines[lines["report_id"] == report_id], connection,
                                    store.ledger_get(connection, report_id)))
    return verdicts


def shown_lines(drafts: JournalDrafts) -> pd.DataFrame:
    """Every draft line with the columns a dry run shows, ordered by report and line."""
    lines = drafts.lines.sort_values(["partition_date", "report_id", "line_no"]) if len(drafts.lines) \
        else drafts.lines
    return lines.reindex(columns=["partition_date", *SHOWN_LINE_COLUMNS]).reset_index(drop=True)
