"""Posts journal drafts to Exact exactly once per report, recording intent before and outcome after each POST.

A crash between "Exact accepted" and "we recorded it" leaves a pending intent; the next run asks Exact for that
EntryID before posting anything, so nothing is posted twice and nothing is lost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol

import pandas as pd

from expensify_exact import progress
from expensify_exact.errors import RateLimitExhausted, RejectedByApi
from expensify_exact.state import StateStore
from expensify_exact.transform.journal import (
    JournalDrafts, Reason, content_hash, entry_body, entry_id_for, entry_total_cents,
)

OUTCOME_COLUMNS = ["connection", "partition_date", "report_id", "outcome", "entry_id", "entry_number",
                   "reason_codes", "reasons", "transaction_ids", "total_cents"]


class JournalPoster(Protocol):
    """What posting needs from the Exact client."""

    def get_entry(self, entry_id: str) -> dict | None: ...

    def post_general_journal_entry(self, body: dict) -> dict: ...


@dataclass
class ReportOutcome:
    connection: str
    partition_date: str
    report_id: str
    outcome: str  # posted | already_posted | quarantined | dry_run | deferred
    entry_id: str | None = None
    entry_number: int | None = None
    reason_codes: list[str] = field(default_factory=list)
    reasons: list[dict] = field(default_factory=list)
    transaction_ids: list[str] = field(default_factory=list)
    total_cents: int = 0


@dataclass
class PostingRun:
    outcomes: list[ReportOutcome]
    stopped_reason: str | None = None  # set when the daily API budget ended the run early

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(o) for o in self.outcomes], columns=OUTCOME_COLUMNS)


def post_drafts(drafts: JournalDrafts, *, connection: str, store: StateStore, client: JournalPoster | None,
                dry_run: bool, run_id: str | None = None) -> PostingRun:
    """Settle every report in `drafts` as posted, already posted, quarantined, or (dry-run) previewed.

    Args:
        drafts: valid lines and rejections for one connection.
        connection: the connection name (ledger key).
        store: the state store holding the ledger, quarantine and audit log.
        client: the Exact client; unused in a dry run.
        dry_run: build and report everything, write nothing to Exact, the ledger or the quarantine.
        run_id: the Dagster run, for the audit log.

    Raises:
        TransientApiError: Exact could not be reached reliably; pending intents stay for the next run.
    """
    outcomes: list[ReportOutcome] = []
    for report_id, problems in drafts.rejections.groupby("report_id", sort=True):
        outcomes.append(_settle_rejected(report_id, problems, connection, store, dry_run, run_id))
        _settled(outcomes[-1])
    lines = drafts.lines
    stopped = None
    report_ids = list(dict.fromkeys(lines["report_id"])) if len(lines) else []
    for index, report_id in enumerate(report_ids):
        report_lines = lines[lines["report_id"] == report_id]
        try:
            if dry_run:
                outcomes.append(_post_one(report_id, report_lines, connection, store, client, dry_run, run_id))
            else:
                # Overlapping runs (a backfill beside the schedule) may reach the same report: one at a time, and
                # the second then finds it posted. Short-lived, so a crashed holder's lease soon expires.
                with store.lock(f"post:{connection}:{report_id}", ttl_seconds=300, wait_seconds=600):
                    outcomes.append(_post_one(report_id, report_lines, connection, store, client, dry_run,
                                              run_id))
            _settled(outcomes[-1])
        except RateLimitExhausted as exc:
            # Not a failure: the rest waits for the next run's budget; nothing is lost and no intent is left open.
            stopped = f"Exact's daily call budget is used up; {len(report_ids) - index} report(s) wait for the next run"
            for waiting in report_ids[index:]:
                waiting_lines = lines[lines["report_id"] == waiting]
                outcomes.append(ReportOutcome(connection, waiting_lines.iloc[0]["partition_date"], waiting, "deferred",
                                              transaction_ids=_tids(waiting_lines)))
            store.audit("deferred", connection=connection, run_id=run_id,
                        detail={"reports": report_ids[index:], "resets_at": str(exc.resets_at)})
            progress.publish(progress.BudgetExhausted(connection, len(report_ids) - index, str(exc.resets_at)))
            for waiting in outcomes[-(len(report_ids) - index):]:
                _settled(waiting)
            break
    return PostingRun(outcomes=outcomes, stopped_reason=stopped)


def planned_reports(drafts: JournalDrafts) -> dict[str, int]:
    """Approval day -> reports `post_drafts` will settle for these drafts (for progress displays)."""
    frames = [f[["report_id", "partition_date"]] for f in (drafts.rejections, drafts.lines) if len(f)]
    if not frames:
        return {}
    reports = pd.concat(frames).drop_duplicates("report_id")
    return {str(day): int(n) for day, n in reports.groupby("partition_date")["report_id"].nunique().items()}


def _settled(outcome: ReportOutcome) -> None:
    progress.publish(progress.ReportSettled(outcome.connection, str(outcome.partition_date), outcome.report_id,
                                            outcome.outcome))


def _tids(frame: pd.DataFrame) -> list[str]:
    return sorted({t for t in frame["transaction_id"] if t})


def _settle_rejected(report_id: str, problems: pd.DataFrame, connection: str, store: StateStore, dry_run: bool,
                     run_id: str | None) -> ReportOutcome:
    partition_date = problems.iloc[0]["partition_date"]
    reasons = problems.drop(columns=["connection", "partition_date", "report_id"]).to_dict("records")
    codes = sorted(set(problems["code"]))
    tids = _tids(problems)
    ledger = store.ledger_get(connection, report_id)
    if ledger is not None and ledger.status == "posted":
        # Already in Exact; a rule that fails today (e.g. a cost center ended since) does not un-post it.
        store.audit("skipped_already_posted", connection=connection, report_id=report_id, entry_id=ledger.entry_id,
                    entry_number=ledger.entry_number, run_id=run_id, partition_date=partition_date,
                    detail={"note": "now fails validation", "codes": codes})
        return ReportOutcome(connection, partition_date, report_id, "already_posted", ledger.entry_id,
                             ledger.entry_number, codes, reasons, ledger.transaction_ids, ledger.total_cents)
    if dry_run:
        store.audit("dry_run", connection=connection, report_id=report_id, transaction_ids=tids, run_id=run_id,
                    partition_date=partition_date, detail={"would_quarantine": codes})
    else:
        store.quarantine_put(connection, report_id, partition_date=partition_date, reasons=reasons,
                             transaction_ids=tids, content_hash=None)
        store.audit("quarantined", connection=connection, report_id=report_id, transaction_ids=tids, run_id=run_id,
                    partition_date=partition_date, detail={"reasons": reasons})
    return ReportOutcome(connection, partition_date, report_id, "quarantined", reason_codes=codes, reasons=reasons,
                         transaction_ids=tids)


def _post_one(report_id: str, report_lines: pd.DataFrame, connection: str, store: StateStore,
              client: JournalPoster | None, dry_run: bool, run_id: str | None) -> ReportOutcome:
    partition_date = report_lines.iloc[0]["partition_date"]
    tids = _tids(report_lines)
    total = entry_total_cents(report_lines)
    body = entry_body(report_lines)
    body_hash = content_hash(body)
    entry_id = entry_id_for(connection, report_id, body_hash)
    base = dict(connection=connection, partition_date=partition_date, report_id=report_id, transaction_ids=tids,
                total_cents=total)
    audit = dict(connection=connection, report_id=report_id, transaction_ids=tids, run_id=run_id,
                 partition_date=partition_date)

    ledger = store.ledger_get(connection, report_id)
    if ledger is not None and ledger.status == "pending" and not dry_run:
        ledger = _settle_pending(ledger, store, client, run_id)
    if ledger is not None and ledger.status == "posted":
        if ledger.content_hash == body_hash:
            store.audit("skipped_already_posted", entry_id=ledger.entry_id, entry_number=ledger.entry_number, **audit)
            return ReportOutcome(outcome="already_posted", entry_id=ledger.entry_id,
                                 entry_number=ledger.entry_number, **base)
        return _changed_after_posting(ledger, body, report_lines, store, dry_run, audit, base)

    if dry_run:
        store.audit("dry_run", entry_id=entry_id, detail={"would_post": body | {"EntryID": entry_id}}, **audit)
        return ReportOutcome(outcome="dry_run", entry_id=entry_id, **base)

    store.ledger_write_intent(connection, report_id, content_hash=body_hash, entry_id=entry_id,
                              partition_date=partition_date, transaction_ids=tids, total_cents=total, run_id=run_id)
    store.audit("validated", entry_id=entry_id, detail={"lines": len(report_lines)}, **audit)
    try:
        answer = client.post_general_journal_entry(body | {"EntryID": entry_id})
    except RateLimitExhausted:
        # The budget check refuses before sending (and a 429 was not processed): the entry is not in Exact.
        store.ledger_drop_intent(connection, report_id, entry_id)
        raise
    except RejectedByApi as exc:
        # Exact refused the entry, so it does not hold it: forget the intent and quarantine with Exact's words.
        store.ledger_drop_intent(connection, report_id, entry_id)
        reasons = [{"transaction_id": "", "code": Reason.REJECTED_BY_EXACT.value, "dimension": "exact",
                    "value": str(exc.status or ""), "message": exc.api_message}]
        store.quarantine_put(connection, report_id, partition_date=partition_date, reasons=reasons,
                             transaction_ids=tids, content_hash=body_hash)
        store.audit("quarantined", entry_id=entry_id, detail={"reasons": reasons}, **audit)
        return ReportOutcome(outcome="quarantined", reason_codes=[Reason.REJECTED_BY_EXACT.value], reasons=reasons,
                             **base)
    entry_number = answer.get("EntryNumber")
    store.ledger_mark_posted(connection, report_id, entry_id, entry_number)
    store.quarantine_set_status(connection, report_id, "replayed", note=f"posted as entry {entry_number}")
    store.audit("posted", entry_id=entry_id, entry_number=entry_number,
                detail={"request": {"lines": len(body["GeneralJournalEntryLines"]), "total_cents": total},
                        "response": {"EntryNumber": entry_number, "Status": answer.get("Status")}}, **audit)
    return ReportOutcome(outcome="posted", entry_id=entry_id, entry_number=entry_number, **base)


def _settle_pending(ledger, store: StateStore, client: JournalPoster, run_id: str | None):
    """A previous run wrote an intent and never recorded the outcome: ask Exact whether the entry landed."""
    found = client.get_entry(ledger.entry_id)
    if found is None:
        store.audit("intent_not_found", connection=ledger.connection, report_id=ledger.report_id,
                    entry_id=ledger.entry_id, run_id=run_id, partition_date=ledger.partition_date)
        return None
    entry_number = found.get("EntryNumber")
    store.ledger_mark_posted(ledger.connection, ledger.report_id, ledger.entry_id, entry_number)
    store.audit("posted", connection=ledger.connection, report_id=ledger.report_id, entry_id=ledger.entry_id,
                entry_number=entry_number, run_id=run_id, partition_date=ledger.partition_date,
                transaction_ids=ledger.transaction_ids, detail={"settled": "pending intent found in Exact"})
    return store.ledger_get(ledger.connection, ledger.report_id)


def _changed_after_posting(ledger, body: dict, report_lines: pd.DataFrame, store: StateStore, dry_run: bool,
                           audit: dict, base: dict) -> ReportOutcome:
    """Never post a changed report again: quarantine it with a summary and a drafted reversal + correction."""
    reasons = [{"transaction_id": "", "code": Reason.CHANGED_AFTER_POSTING.value, "dimension": "report",
                "value": ledger.entry_id,
                "message": f"posted as entry {ledger.entry_number} ({ledger.total_cents / 100:.2f}); the report now "
                           f"totals {base['total_cents'] / 100:.2f} over {len(base['transaction_ids'])} transaction(s)",
                "correction": json.dumps({"reverse_entry_id": ledger.entry_id, "corrected_entry": body},
                                         sort_keys=True)}]
    if not dry_run:
        store.quarantine_put(base["connection"], base["report_id"], partition_date=base["partition_date"],
                             reasons=reasons, transaction_ids=base["transaction_ids"],
                             content_hash=content_hash(body))
    store.audit("dry_run" if dry_run else "quarantined", entry_id=ledger.entry_id, detail={"reasons": reasons},
                **audit)
    return ReportOutcome(outcome="quarantined", entry_id=ledger.entry_id, entry_number=ledger.entry_number,
                         reason_codes=[Reason.CHANGED_AFTER_POSTING.value], reasons=reasons,
                         **{k: v for k, v in base.items()})
