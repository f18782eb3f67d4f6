"""Posts journal drafts to Exact exactly once per report, recording intent before and outcome after each POST.

A crash between "Exact accepted" and "we recorded it" leaves a pending intent; the next run asks Exact whether it
holds that entry (by EntryID, then by the report and transaction IDs in its lines: `settlement`) before posting
anything, so nothing is posted twice and nothing is lost. Every answer to a POST has a rule (`settlement`), and one
report's refusal never stops the others.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum

import pandas as pd

from expensify_exact import progress
from expensify_exact.clock import Clock, next_clock_hour
from expensify_exact.core.journal import JournalDrafts, Reason, entry_total_cents
from expensify_exact.core.settlement import EntryGateway, Fate, Settled, find_posted, post_and_settle
from expensify_exact.core.verdicts import Action, Verdict, judge_lines, judge_rejected, tids
from expensify_exact.errors import (
    ApiError,
    AuthenticationError,
    ConnectionStopped,
    DivisionAccessError,
    ErrorBudgetExhausted,
    RateLimitExhausted,
)
from expensify_exact.store import IntentKind, NewIntent, QuarantineStatus, StateStore

OUTCOME_COLUMNS = ["connection", "partition_date", "report_id", "outcome", "entry_id", "entry_number",
                   "reason_codes", "reasons", "transaction_ids", "total_cents"]


JournalPoster = EntryGateway  # what posting needs from the Exact client
# `stopped_by` of the audit event `deferred` when the connection stopped (notify/alerts.py reads it).
STOPPED_BY_DAILY_BUDGET, STOPPED_BY_ERROR_BUDGET, STOPPED_BY_REFUSAL = "daily_budget", "error_budget", "refused"
# Refusals after which nothing more is sent through the connection in this run (the rest is deferred).
_STOPS_THE_CONNECTION = (RateLimitExhausted, ErrorBudgetExhausted, ConnectionStopped, DivisionAccessError,
                         AuthenticationError)


class Outcome(StrEnum):
    """How a run settled a report."""

    POSTED = "posted"
    ALREADY_POSTED = "already_posted"  # the ledger holds it with this content (or it now fails, but is in Exact)
    QUARANTINED = "quarantined"
    DEFERRED = "deferred"  # left for a later run (a budget, a refusal of the connection, no certain answer)
    NOT_EXPORTED = "not_exported"  # replay: Expensify no longer returns it as approved
    SKIPPED = "skipped"  # replay: changed after posting, it waits for approve or ignore
    WOULD_POST = "would_post"  # a replay's dry run: it passes now


@dataclass
class ReportOutcome:
    connection: str
    partition_date: str
    report_id: str
    outcome: str  # an Outcome
    entry_id: str | None = None
    entry_number: int | None = None
    reason_codes: list[str] = field(default_factory=list)
    reasons: list[dict] = field(default_factory=list)
    transaction_ids: list[str] = field(default_factory=list)
    total_cents: int = 0


@dataclass
class PostingRun:
    outcomes: list[ReportOutcome]
    stopped_reason: str | None = None  # set when a budget or a refusal of the connection ended the run early
    late_approvals: list[str] = field(default_factory=list)  # reports first seen in a day already posted

    def frame(self) -> pd.DataFrame:
        # Plain strings in the frame: it is pickled per partition and must not depend on where `Outcome` lives.
        return pd.DataFrame([asdict(o) | {"outcome": str(o.outcome)} for o in self.outcomes], columns=OUTCOME_COLUMNS)


def post_drafts(drafts: JournalDrafts, *, connection: str, store: StateStore, client: JournalPoster, clock: Clock,
                run_id: str | None = None, closed_days: Collection[str] = ()) -> PostingRun:
    """Settle every report in `drafts` as posted, already posted or quarantined, acting on its `verdicts` verdict.

    Args:
        drafts: valid lines and rejections for one connection.
        connection: the connection name (ledger key).
        store: the state store holding the ledger, quarantine and audit log.
        client: the Exact client.
        clock: the connector's time, for when a deferred report may be tried again.
        run_id: the Dagster run, for the audit log.
        closed_days: approval days an earlier run already posted after they had closed; a report of such a day
            that the connector has never seen (not in the ledger, the quarantine or the deferred list) is audited
            as a `late_approval` before it is settled like any other.

    A report whose POST got no certain answer, or whose pending intent could not be settled, is deferred (its
    intent stays for the next run) and the run goes on. A spent budget (daily calls, the endpoint's hourly errors)
    or a refusal of the connection (401 after a refresh, 403) defers the rest with the reason in `stopped_reason`.
    Every deferred report is recorded with when to try it again, for the sensor `post_deferred_after_reset`.
    """
    outcomes: list[ReportOutcome] = []
    late = _audit_late_approvals(drafts, connection, store, set(closed_days), run_id) if closed_days else []
    for report_id, problems in drafts.rejections.groupby("report_id", sort=True):
        verdict = judge_rejected(report_id, problems, connection, store.ledger_get(connection, report_id))
        outcomes.append(_settle_rejected(verdict, store, run_id))
        _settled(outcomes[-1])
    lines = drafts.lines
    stopped, stop_retry = None, None
    report_ids = list(dict.fromkeys(lines["report_id"])) if len(lines) else []
    for index, report_id in enumerate(report_ids):
        report_lines = lines[lines["report_id"] == report_id]
        try:
            # Overlapping runs (a backfill beside the schedule) may reach the same report: one at a time, and the
            # second then finds it posted. Short-lived, so a crashed holder's lease soon expires.
            with store.lock(f"post:{connection}:{report_id}", ttl_seconds=300, wait_seconds=600):
                outcomes.append(_post_one(report_id, report_lines, connection, store, client, run_id))
            _settled(outcomes[-1])
        except _STOPS_THE_CONNECTION as exc:
            # Not a failure of these reports: they wait for the next run; nothing is lost and no intent is left open.
            stopped = f"{_stop_reason(exc)}; {len(report_ids) - index} report(s) wait for the next run"
            for waiting in report_ids[index:]:
                waiting_lines = lines[lines["report_id"] == waiting]
                outcomes.append(_deferred(connection, waiting, waiting_lines, stopped))
            resets_at = getattr(exc, "resets_at", None)
            store.audit("deferred", connection=connection, run_id=run_id,
                        detail={"reports": report_ids[index:], "reason": stopped, "stopped_by": _stop_kind(exc),
                                "resets_at": str(resets_at or "")})
            stop_retry = (set(report_ids[index:]), _retry_after(exc, clock.now()))
            progress.publish(progress.PostingStopped(connection, len(report_ids) - index, _stop_reason(exc),
                                                     str(resets_at) if resets_at else None))
            for waiting in outcomes[-(len(report_ids) - index):]:
                _settled(waiting, with_reason=False)  # PostingStopped said why, once
            break
    _remember_deferrals(store, connection, outcomes, stop_retry, clock)
    return PostingRun(outcomes=outcomes, stopped_reason=stopped, late_approvals=late)


def _retry_after(exc: ApiError, now: datetime) -> datetime:
    """When reports a stop deferred may be tried again: Exact's daily reset for a spent daily budget (when it said
    when), else the next clock hour — when an endpoint's error budget renews, and soon enough for a refused
    connection (one try an hour stays far below Exact's 10 errors per endpoint and hour)."""
    resets_at = getattr(exc, "resets_at", None)
    if isinstance(exc, RateLimitExhausted) and isinstance(resets_at, datetime):
        return resets_at
    return next_clock_hour(now)


def _remember_deferrals(store: StateStore, connection: str, outcomes: list[ReportOutcome],
                        stop_retry: tuple[set[str], datetime] | None, clock: Clock) -> None:
    """Record every deferred report with when to try it again (see `_retry_after`; a report deferred on its own,
    an uncertain POST or one not sent, in the next clock hour) for the sensor `post_deferred_after_reset`, and
    forget the deferrals of reports this run settled."""
    stopped_ids, stop_at = stop_retry or (set(), None)
    deferred = [o for o in outcomes if o.outcome == Outcome.DEFERRED]
    by_stop = {o.report_id: o.partition_date for o in deferred if o.report_id in stopped_ids}
    on_their_own = {o.report_id: o.partition_date for o in deferred if o.report_id not in stopped_ids}
    if by_stop:
        store.deferred_put(connection, by_stop, stop_at)
    if on_their_own:
        store.deferred_put(connection, on_their_own, next_clock_hour(clock.now()))
    store.deferred_clear(connection, [o.report_id for o in outcomes if o.outcome != Outcome.DEFERRED])


def forget_vanished_deferrals(store: StateStore, connection: str, days: Collection[str], seen: Collection[str],
                              run_id: str | None) -> list[str]:
    """Drop deferred reports of `days` that a fresh export of those days no longer holds (reopened, or approved
    again on another day, where their own run settles them); otherwise their days would be rerun at every reset."""
    days, seen = set(days), set(seen)
    gone = sorted(rid for rid, deferral in store.deferred(connection).items()
                  if deferral.partition_date in days and rid not in seen)
    if gone:
        store.deferred_clear(connection, gone)
        store.audit("deferral_dropped", connection=connection, run_id=run_id,
                    detail={"reports": gone, "note": "no longer approved on their day; nothing to post"})
    return gone


def _audit_late_approvals(drafts: JournalDrafts, connection: str, store: StateStore, closed_days: set[str],
                          run_id: str | None) -> list[str]:
    """Mark reports that turned up in an approval day only after that day had been posted."""
    frames = [f[["report_id", "partition_date"]] for f in (drafts.lines, drafts.rejections) if len(f)]
    if not frames:
        return []
    found = pd.concat(frames).drop_duplicates("report_id")
    found = found[found["partition_date"].isin(closed_days)]
    deferred = store.deferred(connection) if len(found) else {}
    late = []
    for report_id, day in found.itertuples(index=False):
        if report_id in deferred or store.ledger_get(connection, report_id) is not None \
                or store.quarantine_get(connection, report_id) is not None:
            continue
        store.audit("late_approval", connection=connection, report_id=report_id, run_id=run_id, partition_date=day,
                    detail={"approval_day": day, "note": "first exported after its approval day was posted"})
        late.append(report_id)
    return late


def planned_reports(drafts: JournalDrafts) -> dict[str, int]:
    """Approval day -> reports `post_drafts` will settle for these drafts (for progress displays)."""
    frames = [f[["report_id", "partition_date"]] for f in (drafts.rejections, drafts.lines) if len(f)]
    if not frames:
        return {}
    reports = pd.concat(frames).drop_duplicates("report_id")
    return {str(day): int(n) for day, n in reports.groupby("partition_date")["report_id"].nunique().items()}


def _settled(outcome: ReportOutcome, *, with_reason: bool = True) -> None:
    reason = (outcome.reasons[0].get("message")
              if with_reason and outcome.outcome == Outcome.DEFERRED and outcome.reasons else None)
    progress.publish(progress.ReportSettled(outcome.connection, str(outcome.partition_date), outcome.report_id,
                                            outcome.outcome, reason))


def _stop_kind(exc: ApiError) -> str:
    """What stopped the connection, for the audit log (the deferred-reports alert words itself by it)."""
    if isinstance(exc, RateLimitExhausted):
        return STOPPED_BY_DAILY_BUDGET
    if isinstance(exc, ErrorBudgetExhausted):
        return STOPPED_BY_ERROR_BUDGET
    return STOPPED_BY_REFUSAL


def _stop_reason(exc: ApiError) -> str:
    if isinstance(exc, RateLimitExhausted):
        return "Exact's daily call budget is used up"
    if isinstance(exc, ErrorBudgetExhausted):
        return exc.api_message
    return f"Exact refused the connection ({exc})"


def _deferred(connection: str, report_id: str, report_lines: pd.DataFrame, message: str) -> ReportOutcome:
    return ReportOutcome(connection, report_lines.iloc[0]["partition_date"], report_id, Outcome.DEFERRED,
                         reasons=[{"transaction_id": "", "code": "DEFERRED", "dimension": "exact", "value": "",
                                   "message": message}],
                         transaction_ids=tids(report_lines), total_cents=entry_total_cents(report_lines))


def _outcome(verdict: Verdict, outcome: str, **changes) -> ReportOutcome:
    fields = dict(entry_id=verdict.entry_id, entry_number=verdict.entry_number, reason_codes=verdict.reason_codes,
                  reasons=verdict.reasons, transaction_ids=verdict.transaction_ids, total_cents=verdict.total_cents)
    return ReportOutcome(verdict.connection, verdict.partition_date, verdict.report_id, outcome, **(fields | changes))


def _audit_of(verdict: Verdict, run_id: str | None) -> dict:
    return dict(connection=verdict.connection, report_id=verdict.report_id, transaction_ids=verdict.transaction_ids,
                run_id=run_id, partition_date=verdict.partition_date)


def _skip_posted(verdict: Verdict, store: StateStore, run_id: str | None, **detail) -> ReportOutcome:
    store.audit("skipped_already_posted", entry_id=verdict.entry_id, entry_number=verdict.entry_number,
                **_audit_of(verdict, run_id), **({"detail": detail} if detail else {}))
    return _outcome(verdict, Outcome.ALREADY_POSTED)


def _quarantine(verdict: Verdict, store: StateStore, run_id: str | None) -> ReportOutcome:
    store.quarantine_put(verdict.connection, verdict.report_id, partition_date=verdict.partition_date,
                         reasons=verdict.reasons, transaction_ids=verdict.transaction_ids,
                         content_hash=verdict.content_hash, correction=verdict.correction)
    store.audit("quarantined", entry_id=verdict.entry_id, detail={"reasons": verdict.reasons},
                **_audit_of(verdict, run_id))
    return _outcome(verdict, Outcome.QUARANTINED)


def _settle_rejected(verdict: Verdict, store: StateStore, run_id: str | None) -> ReportOutcome:
    if verdict.action == Action.ALREADY_POSTED:
        return _skip_posted(verdict, store, run_id, note=verdict.note, codes=verdict.reason_codes)
    return _quarantine(verdict, store, run_id)


def _post_one(report_id: str, report_lines: pd.DataFrame, connection: str, store: StateStore,
              client: JournalPoster, run_id: str | None) -> ReportOutcome:
    ledger = store.ledger_get(connection, report_id)
    verdict = judge_lines(report_id, report_lines, connection, ledger)
    audit = _audit_of(verdict, run_id)
    if verdict.action == Action.SETTLE_PENDING:
        try:
            ledger = _settle_pending(ledger, verdict.body, verdict.content_hash, store, client, run_id)
        except _STOPS_THE_CONNECTION:
            raise
        except ApiError as exc:
            message = f"an earlier POST of this report got no certain answer and Exact could not be asked now: {exc}"
            store.audit("deferred", entry_id=ledger.entry_id, detail={"reason": message}, **audit)
            return _deferred(connection, report_id, report_lines, message)
        verdict = judge_lines(report_id, report_lines, connection, ledger)
    if verdict.action == Action.ALREADY_POSTED:
        return _skip_posted(verdict, store, run_id)
    if verdict.action == Action.QUARANTINE:
        return _quarantine(verdict, store, run_id)

    partition_date, tids_, total = verdict.partition_date, verdict.transaction_ids, verdict.total_cents
    body, body_hash, entry_id = verdict.body, verdict.content_hash, verdict.entry_id
    base = dict(connection=connection, partition_date=partition_date, report_id=report_id, transaction_ids=tids_,
                total_cents=total)
    store.intents_write(connection, report_id, [NewIntent(IntentKind.POST, entry_id, body_hash, body, partition_date,
                                                          tids_, total)], run_id=run_id)
    store.audit("validated", entry_id=entry_id, detail={"lines": len(report_lines)}, **audit)
    try:
        settled = post_and_settle(client, store, connection, body | {"EntryID": entry_id}, settling_report=report_id)
    except _STOPS_THE_CONNECTION:
        # Refused before sending, or answered 401/403: Exact did not process it.
        store.intent_drop(connection, report_id, IntentKind.POST, entry_id)
        raise
    except ApiError as exc:
        # Failed before the POST went out (the division check, a token refresh): nothing reached Exact.
        store.intent_drop(connection, report_id, IntentKind.POST, entry_id)
        message = f"not sent: {exc}; posted by the next run"
        store.audit("deferred", entry_id=entry_id, detail={"reason": message}, **audit)
        return _deferred(connection, report_id, report_lines, message)
    if settled.outcome == Fate.POSTED:
        return _record_posted(settled, entry_id, body, total, store, audit, base)
    if settled.outcome == Fate.REJECTED:
        # Exact refused the entry and does not hold it: forget the intent and quarantine with Exact's words.
        store.intent_drop(connection, report_id, IntentKind.POST, entry_id)
        reasons = [{"transaction_id": "", "code": Reason.REJECTED_BY_EXACT.value, "dimension": "exact",
                    "value": str(settled.status or ""), "message": settled.message}]
        store.quarantine_put(connection, report_id, partition_date=partition_date, reasons=reasons,
                             transaction_ids=tids_, content_hash=body_hash)
        store.audit("quarantined", entry_id=entry_id, detail={"reasons": reasons}, **audit)
        return ReportOutcome(outcome=Outcome.QUARANTINED, entry_id=None, reason_codes=[Reason.REJECTED_BY_EXACT.value],
                             reasons=reasons, **base)
    if settled.outcome == Fate.NOT_SENT:
        store.intent_drop(connection, report_id, IntentKind.POST, entry_id)
        message = f"Exact kept answering 429 (HTTP {settled.status}); not processed, posted by the next run"
    else:
        # Unknown: the intent stays, so the next run looks again before it posts anything.
        message = f"no certain answer from Exact ({settled.message}); the next run settles it before posting"
    store.audit("deferred", entry_id=entry_id, detail={"reason": message}, **audit)
    return _deferred(connection, report_id, report_lines, message)


def _record_posted(settled: Settled, entry_id: str, body: dict, total: int, store: StateStore, audit: dict,
                   base: dict) -> ReportOutcome:
    """Mark the intent posted under Exact's EntryID (ours stays in the ledger's client_entry_id)."""
    store.intent_mark_posted(base["connection"], base["report_id"], IntentKind.POST, entry_id, settled.entry_number,
                             exact_entry_id=settled.entry_id)
    store.quarantine_set_status(base["connection"], base["report_id"], QuarantineStatus.REPLAYED,
                                note=f"posted as entry {settled.entry_number}")
    detail = {"request": {"lines": len(body["GeneralJournalEntryLines"]), "total_cents": total,
                          "entry_id_sent": entry_id},
              "response": {"EntryNumber": settled.entry_number, "EntryID": settled.entry_id}}
    if settled.found_by != "answer":
        detail["settled"] = f"no certain answer; found in Exact by {settled.found_by}"
    store.audit("posted", entry_id=settled.entry_id, entry_number=settled.entry_number, detail=detail, **audit)
    return ReportOutcome(outcome=Outcome.POSTED, entry_id=settled.entry_id, entry_number=settled.entry_number, **base)


def _settle_pending(ledger, body: dict, body_hash: str, store: StateStore, client: JournalPoster,
                    run_id: str | None):
    """A previous run wrote an intent and never recorded the outcome: ask Exact whether it holds the entry, by the
    intent's EntryID and by its lines (the intent's body, or today's if it is the same content).

    Raises:
        ApiError: Exact could not be asked; the intent stays.
    """
    intent_body = ledger.body or (body if ledger.content_hash == body_hash else None)
    audit = dict(connection=ledger.connection, report_id=ledger.report_id, run_id=run_id,
                 partition_date=ledger.partition_date)
    if intent_body is None:
        # An intent from before bodies were kept, for content that has changed since: only its EntryID is known.
        found = None
        entry = client.get_entry(ledger.entry_id)
        if entry is not None:
            found = Settled("posted", str(entry.get("EntryID") or ledger.entry_id).lower(), entry.get("EntryNumber"),
                            found_by="EntryID")
        else:
            raise ApiError("exact", f"the pending intent {ledger.entry_id} of report {ledger.report_id} cannot be "
                                    "looked up by its lines (its content changed and the old content is not kept); "
                                    "check Exact for the report and resolve it by hand")
    else:
        found = find_posted(client, store, ledger.connection, intent_body | {"EntryID": ledger.entry_id},
                            sent_entry_id=ledger.entry_id, settling_report=ledger.report_id)
    if found is None:
        store.audit("intent_not_found", entry_id=ledger.entry_id, **audit,
                    detail={"looked_up": "by EntryID and by the report's lines"})
        return None
    store.intent_mark_posted(ledger.connection, ledger.report_id, IntentKind.POST, ledger.client_entry_id,
                             found.entry_number, exact_entry_id=found.entry_id)
    store.audit("posted", entry_id=found.entry_id, entry_number=found.entry_number,
                transaction_ids=ledger.transaction_ids,
                detail={"settled": f"pending intent found in Exact by {found.found_by}",
                        "entry_id_sent": ledger.entry_id}, **audit)
    return store.ledger_get(ledger.connection, ledger.report_id)
