"""Quarantine replay and operator actions: re-validate held-back reports and post them once fixed; resolve, ignore,
or approve the drafted reversal + correction of a report that changed after it was posted.

Plain Python (no Dagster): `defs/replay.py` and `commands/quarantine.py` only wire these functions.

Replay re-exports the quarantined reports from Expensify by report ID (their *current* content), normalizes them,
validates them against a *fresh* Exact dimension snapshot and the current mappings, and hands the result to
`posting.post_drafts`, so a report is posted through the same exactly-once ledger as in the main job. Reports that
still fail stay quarantined with refreshed reasons. Every step is in the audit log: `replayed` (with the reasons
before, the verdict now and the snapshot's fingerprint), then `posted` or `quarantined` from posting. A dry run
(`preview_replay`) re-validates the same way and reports each item's `verdicts` verdict, writing nothing.

Approving a CHANGED_AFTER_POSTING item posts two entries: the reversal of the posted entry (its lines as Exact holds
them, amounts negated, `Reversal: true`, exact-online.md §5.8) and the corrected entry drafted when the change was
detected. Both intents are written in one transaction before the first POST; a rerun after a crash asks Exact for
each EntryID before posting it, so each lands exactly once. Only when both are in Exact does the ledger switch to the
corrected entry (and the quarantine item close), in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Protocol

import pandas as pd

from expensify_exact import progress
from expensify_exact.api.exact.odata import guid_literal
from expensify_exact.clock import Clock, connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.journal import (
    ENTRY_ID_NAMESPACE,
    NOTES_MAX,
    Dimensions,
    JournalDrafts,
    Reason,
    content_hash,
)
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact.core.posting import Outcome, planned_reports, post_drafts
from expensify_exact.core.settlement import EntryGateway, Fate, find_posted, post_and_settle
from expensify_exact.core.snapshots import DIMENSION_QUERIES, fetch_dimensions, needed_codes
from expensify_exact.core.verdicts import Action, preview
from expensify_exact.errors import ConnectorError, RejectedByApi, TransientApiError
from expensify_exact.store import (
    Intent,
    IntentKind,
    IntentStatus,
    NewIntent,
    QuarantineItem,
    QuarantineStatus,
    StateStore,
)

GJE_LINES_PATH = "generaljournalentry/GeneralJournalEntryLines"
REVERSAL_LINE_SELECT = ("EntryID", "LineNumber", "GLAccount", "AmountFC", "VATCode", "Date", "Description", "Notes",
                        "CostCenter", "CostUnit")
# Reasons a replay cannot fix: a changed report waits for `approve` (or ignore), never for a new snapshot.
NOT_REPLAYABLE = frozenset({Reason.CHANGED_AFTER_POSTING.value})
# How far before the earliest quarantined approval day the re-export starts (partition days are local, Expensify
# filters whole UTC days: export_windows already widens by a day each side; one more costs nothing).
EXPORT_MARGIN_DAYS = 1
FALLBACK_LOOKBACK_DAYS = 365
# How long a replay or approve waits by default while another one of the same connection holds its lock.
REPLAY_LOCK_WAIT_SECONDS = 600.0


class QuarantineActionError(ConnectorError):
    """An operator action that cannot be carried out as asked (unknown item, wrong state, stale correction)."""


class ReportSource(Protocol):
    """What replay needs from the Expensify client."""

    def export_reports_by_id(self, report_ids: Sequence[str], policy_ids: Sequence[str], *, approved_since: date,
                             timezone: str, source_timezone: str) -> list[dict]: ...


class ExactGateway(EntryGateway, Protocol):
    """What replay and approve need from the Exact client: reads, and posting with settlement."""

    def get_all(self, path: str, select, filter: str | None = None, orderby: str | None = None) -> list[dict]: ...


@dataclass
class ReplayOutcome:
    connection: str
    report_id: str
    outcome: str  # an Outcome
    previous_codes: list[str]
    reason_codes: list[str] = field(default_factory=list)
    reasons: list[dict] = field(default_factory=list)
    entry_id: str | None = None
    entry_number: int | None = None
    message: str = ""


@dataclass
class ReplayResult:
    connection: str
    dry_run: bool
    fingerprint: str | None
    outcomes: list[ReplayOutcome]
    stopped_reason: str | None = None

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def still_quarantined(self) -> list[str]:
        return [o.report_id for o in self.outcomes
                if o.outcome in (Outcome.QUARANTINED, Outcome.NOT_EXPORTED, Outcome.DEFERRED)]

    def as_json(self) -> dict:
        return {"connection": self.connection, "dry_run": self.dry_run, "fingerprint": self.fingerprint,
                "stopped_reason": self.stopped_reason,
                "outcomes": [o.__dict__ for o in self.outcomes]}


@dataclass(frozen=True)
class ApproveResult:
    connection: str
    report_id: str
    reversal_entry_id: str
    reversal_entry_number: int | None
    correction_entry_id: str
    correction_entry_number: int | None
    replaced_entry_id: str


# ------------------------------------------------------------------------------------------------ fingerprints

def _canonical(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return None
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def dimensions_fingerprint(dims: Dimensions) -> str:
    """A hash of everything validation reads from a dimension snapshot; equal snapshots give equal fingerprints.

    Rows are hashed in a canonical order, so the order Exact pages them in does not matter.
    """
    digest = hashlib.sha256()
    for name in sorted(DIMENSION_QUERIES):
        frame: pd.DataFrame = getattr(dims, name)
        columns = sorted(frame.columns)
        rows = sorted(json.dumps({c: _canonical(r[c]) for c in columns}, sort_keys=True, default=str)
                      for r in frame.to_dict("records"))
        digest.update(f"{name}:{len(rows)}\n".encode())
        for row in rows:
            digest.update(row.encode() + b"\n")
    return digest.hexdigest()


def replay_fingerprint(dims: Dimensions, config: ProjectConfig, conn: Connection) -> str:
    """What decides whether a replay could now come out differently: the snapshot plus the mappings in force."""
    mappings = config.model_dump_json(exclude={"connections"}) + conn.model_dump_json()
    return hashlib.sha256((dimensions_fingerprint(dims) + mappings).encode()).hexdigest()[:32]


def replay_lock(connection: str) -> str:
    """The lock that keeps replays and approvals of one connection one at a time."""
    return f"replay:{connection}"


def replayable(item: QuarantineItem) -> bool:
    """True if a fresh snapshot or new mappings could let this item pass (it is not only awaiting an approval)."""
    codes = {r.get("code") for r in item.reasons}
    return bool(codes - NOT_REPLAYABLE)


# ------------------------------------------------------------------------------------------------------ replay

def replay_quarantine(conn: Connection, config: ProjectConfig, *, store: StateStore, expensify: ReportSource,
                      exact: ExactGateway, clock: Clock, report_ids: Sequence[str] | None = None,
                      run_id: str | None = None, lock_wait_seconds: float = REPLAY_LOCK_WAIT_SECONDS
                      ) -> ReplayResult:
    """Re-validate the open quarantine items of one connection and post those that now pass, exactly once.

    Args:
        conn: the connection whose quarantine is replayed.
        config: the mappings in force now (they may have been fixed since the report was quarantined).
        store: ledger, quarantine and audit log.
        expensify: re-exports the reports by ID (their current content).
        exact: reads the fresh dimension snapshot and posts.
        clock: the connector's clock; its day in the connection's zone is the run date of the `run_date`
            posting-date policy.
        report_ids: only these items (default: every open, replayable item of the connection).
        run_id: for the audit log (a Dagster run ID, or a CLI-made one).
        lock_wait_seconds: how long to wait while another replay or approve of the connection holds its lock.

    Returns:
        One outcome per selected item.

    Raises:
        ApiError: Expensify or Exact could not be read; nothing was changed for the items not yet posted.
        StateStoreError: another replay of this connection held the lock for too long.
    """
    run_id = run_id or f"replay-{uuid.uuid4().hex[:12]}"
    with store.lock(replay_lock(conn.name), ttl_seconds=900, wait_seconds=lock_wait_seconds):
        items, outcomes = _open_items(conn, store, report_ids)
        if not items:
            return ReplayResult(conn.name, False, None, outcomes)
        fingerprint, drafts = _redraft(conn, config, items, expensify, exact, clock)
        verdicts = _verdicts(drafts)

        by_id = {i.report_id: i for i in items}
        for item in items:
            verdict = verdicts.get(item.report_id)
            store.audit("replayed", connection=conn.name, report_id=item.report_id,
                        transaction_ids=item.transaction_ids, run_id=run_id, partition_date=item.partition_date,
                        detail={"before": item.reasons, "dimensions_fingerprint": fingerprint,
                                "now": "not exported (no longer approved in Expensify?)" if verdict is None
                                else ("passes validation" if not verdict else {"fails": verdict})})
        progress.publish(progress.ReportsPlanned(conn.name, planned_reports(drafts)))
        run = post_drafts(drafts, connection=conn.name, store=store, client=exact, run_id=run_id, clock=clock)
        for day, outcomes_of_day in run.frame().groupby("partition_date"):
            progress.publish(progress.DayDone(conn.name, str(day), outcomes_of_day["outcome"].value_counts().to_dict()))
        seen = set()
        for o in run.outcomes:
            item = by_id.get(o.report_id)
            if item is None:
                continue
            seen.add(o.report_id)
            outcome = ReplayOutcome(conn.name, o.report_id, o.outcome, _codes(item.reasons), list(o.reason_codes),
                                    list(o.reasons), o.entry_id, o.entry_number)
            if o.outcome == Outcome.ALREADY_POSTED:
                # Posted by an earlier run with this very content: nothing to post, the item is simply done.
                note = f"already posted as entry {o.entry_number}"
                store.quarantine_close(conn.name, o.report_id, QuarantineStatus.RESOLVED, note)
                outcome.message = note
            outcomes.append(outcome)
        return ReplayResult(conn.name, False, fingerprint, outcomes + _not_exported(items, seen), run.stopped_reason)


def preview_replay(conn: Connection, config: ProjectConfig, *, store: StateStore, expensify: ReportSource,
                   exact: ExactGateway, clock: Clock, report_ids: Sequence[str] | None = None) -> ReplayResult:
    """What `replay_quarantine` would do now (a dry run): the same re-export and re-validation, then each item's
    verdict (`verdicts.preview`). Reads the quarantine and the ledger, writes nothing: no lock, no audit, no post."""
    items, outcomes = _open_items(conn, store, report_ids)
    if not items:
        return ReplayResult(conn.name, True, None, outcomes)
    fingerprint, drafts = _redraft(conn, config, items, expensify, exact, clock)
    by_id = {i.report_id: i for i in items}
    for verdict in preview(drafts, connection=conn.name, store=store):
        item = by_id.get(verdict.report_id)
        if item is None:
            continue
        if verdict.action == Action.ALREADY_POSTED:
            what, message = Outcome.ALREADY_POSTED, f"already posted as entry {verdict.entry_number}: a replay closes it"
        elif verdict.action == Action.QUARANTINE:
            what, message = Outcome.QUARANTINED, "still fails"
        else:
            what, message = Outcome.WOULD_POST, verdict.note or f"passes now: would be posted as EntryID {verdict.entry_id}"
        outcomes.append(ReplayOutcome(conn.name, verdict.report_id, what, _codes(item.reasons),
                                      list(verdict.reason_codes), list(verdict.reasons), verdict.entry_id,
                                      verdict.entry_number, message))
    return ReplayResult(conn.name, True, fingerprint, outcomes + _not_exported(items, set(by_id) & {
        o.report_id for o in outcomes}))


def _open_items(conn: Connection, store: StateStore, report_ids: Sequence[str] | None
                ) -> tuple[list[QuarantineItem], list[ReplayOutcome]]:
    """The open items a replay can help, and a `skipped` outcome for each one only `approve` can settle."""
    items = store.quarantine_items(conn.name, status=QuarantineStatus.OPEN,
                                   report_ids=list(report_ids) if report_ids else None)
    skipped = [ReplayOutcome(conn.name, i.report_id, Outcome.SKIPPED, _codes(i.reasons), _codes(i.reasons), i.reasons,
                             message="changed after posting: approve or ignore it")
               for i in items if not replayable(i)]
    return [i for i in items if replayable(i)], skipped


def _redraft(conn: Connection, config: ProjectConfig, items: list[QuarantineItem], expensify: ReportSource,
             exact: ExactGateway, clock: Clock) -> tuple[str, JournalDrafts]:
    """The items' reports re-exported and drafted against fresh dimensions: (the replay fingerprint, drafts)."""
    progress.publish(progress.Phase(conn.name, f"re-validating {len(items)} quarantined report(s) against "
                                               f"fresh Exact dimensions"))
    dims = fetch_dimensions(exact, needed_codes(conn, config))
    reports = expensify.export_reports_by_id(
        [i.report_id for i in items], conn.expensify.policy_ids, approved_since=_earliest_day(items),
        timezone=conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
    today = connection_today(conn.timezone, clock)
    return replay_fingerprint(dims, config, conn), drafts_for_reports(reports, conn, config, dims, today)


def _not_exported(items: list[QuarantineItem], seen: set[str]) -> list[ReplayOutcome]:
    return [ReplayOutcome(item.connection, item.report_id, Outcome.NOT_EXPORTED, _codes(item.reasons),
                          _codes(item.reasons), item.reasons,
                          message="Expensify did not return it as approved: reopened, deleted or moved? "
                                  "It stays quarantined.")
            for item in items if item.report_id not in seen]


def _codes(reasons: list[dict]) -> list[str]:
    return sorted({r.get("code", "") for r in reasons})


def _earliest_day(items: list[QuarantineItem]) -> date:
    days = [date.fromisoformat(i.partition_date) for i in items if i.partition_date]
    days += [(i.first_seen_at - timedelta(days=FALLBACK_LOOKBACK_DAYS)).date() for i in items if not i.partition_date]
    return min(days) - timedelta(days=EXPORT_MARGIN_DAYS)


def _verdicts(drafts: JournalDrafts) -> dict[str, list[str]]:
    """report ID -> reason codes it still fails on ([] = passes)."""
    verdicts = {r: [] for r in drafts.lines["report_id"]}
    for report_id, problems in drafts.rejections.groupby("report_id"):
        verdicts[report_id] = sorted(set(problems["code"]))
    return verdicts


# ------------------------------------------------------------------------------------------- resolve / ignore

def close_item(store: StateStore, connection: str, report_id: str, status: QuarantineStatus, reason: str,
               actor: str | None = None) -> QuarantineItem:
    """Resolve (the cause was dealt with outside the connector) or ignore (never post it) an open item.

    Raises:
        QuarantineActionError: no open item for this report, or an empty reason.
    """
    if status not in (QuarantineStatus.RESOLVED, QuarantineStatus.IGNORED):
        raise ValueError(f"status must be resolved or ignored, not {status!r}")
    if not reason.strip():
        raise QuarantineActionError("a reason is required: it goes into the audit log")
    item = store.quarantine_get(connection, report_id)
    if item is None:
        raise QuarantineActionError(f"no quarantine item for report {report_id} in {connection}")
    if not store.quarantine_close(connection, report_id, status, reason.strip()):
        raise QuarantineActionError(f"report {report_id} is {item.status}, not open; nothing changed")
    store.audit(status, connection=connection, report_id=report_id, transaction_ids=item.transaction_ids,
                partition_date=item.partition_date,
                detail={"reason": reason.strip(), "by": actor, "reasons": item.reasons})
    return store.quarantine_get(connection, report_id)


# --------------------------------------------------------------------------------------------------- approve

def reversal_entry_id(connection: str, report_id: str, original_entry_id: str) -> str:
    """Deterministic EntryID of the reversal of one posted entry: approving twice can never reverse twice."""
    return str(uuid.uuid5(ENTRY_ID_NAMESPACE, f"{connection}:{report_id}:reversal:{original_entry_id.lower()}"))


def correction_entry_id(connection: str, report_id: str, replaced_entry_id: str, corrected_hash: str) -> str:
    """Deterministic EntryID of the corrected entry that replaces one posted entry: approving twice can never post it
    twice, and a report whose content returns to one posted before (A, corrected to B, back to A) gets a new entry,
    never the EntryID of the earlier one, which Exact already holds and a reversal has cancelled."""
    return str(uuid.uuid5(ENTRY_ID_NAMESPACE,
                          f"{connection}:{report_id}:correction:{replaced_entry_id.lower()}:{corrected_hash}"))


def pending_correction(item: QuarantineItem) -> dict | None:
    """The drafted {reverse_entry_id, corrected_entry} of a CHANGED_AFTER_POSTING item, if it has one."""
    return item.correction


def reversal_body(entry: dict, lines: list[dict]) -> dict:
    """The reversal of a posted entry: same journal, period, accounts and dimensions, every amount negated."""
    if not lines:
        raise QuarantineActionError(f"Exact returned no lines for entry {entry.get('EntryID')}")
    out = []
    for line in sorted(lines, key=lambda ln: ln.get("LineNumber") or 0):
        body = {"GLAccount": line["GLAccount"], "AmountFC": -round(float(line["AmountFC"]), 2),
                "Date": _day(line.get("Date")), "Description": line.get("Description") or "",
                "Notes": f"Reversal of entry {entry.get('EntryNumber')}: {line.get('Notes') or ''}"[:NOTES_MAX]}
        for field_name in ("CostCenter", "CostUnit", "VATCode"):
            if line.get(field_name):
                body[field_name] = line[field_name]
        out.append(body)
    return {"JournalCode": entry["JournalCode"], "FinancialYear": int(entry["FinancialYear"]),
            "FinancialPeriod": int(entry["FinancialPeriod"]), "Currency": entry["Currency"], "Reversal": True,
            "GeneralJournalEntryLines": out}


def _day(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)[:10]


def _debit_cents(body: dict) -> int:
    return sum(round(line["AmountFC"] * 100) for line in body["GeneralJournalEntryLines"] if line["AmountFC"] > 0)


def approve_correction(conn: Connection, *, store: StateStore, exact: ExactGateway, report_id: str,
                       run_id: str | None = None, actor: str | None = None) -> ApproveResult:
    """Post the reversal of a changed report's entry and its corrected entry, each exactly once.

    Args:
        conn: the connection.
        store: ledger, correction intents, quarantine and audit log.
        exact: reads the posted entry's lines and posts.
        report_id: the CHANGED_AFTER_POSTING item to approve.
        run_id: for the audit log.
        actor: who approved, for the audit log.

    Returns:
        Both entries' IDs and numbers.

    Raises:
        QuarantineActionError: no open CHANGED_AFTER_POSTING item, the ledger moved on, or Exact refused an entry
            (its intent is dropped and nothing else is posted).
        TransientApiError: Exact could not be reached reliably; the intents stay, run approve again.
    """
    run_id = run_id or f"approve-{uuid.uuid4().hex[:12]}"
    with store.lock(replay_lock(conn.name), ttl_seconds=300, wait_seconds=REPLAY_LOCK_WAIT_SECONDS):
        item = store.quarantine_get(conn.name, report_id)
        if item is None:
            raise QuarantineActionError(f"no quarantine item for report {report_id} in {conn.name}")
        correction = pending_correction(item)
        if correction is None:
            raise QuarantineActionError(f"report {report_id} is not CHANGED_AFTER_POSTING "
                                        f"({', '.join(_codes(item.reasons))}): replay, resolve or ignore it instead")
        if item.status != QuarantineStatus.OPEN:
            raise QuarantineActionError(f"report {report_id} is {item.status}, not open; nothing to approve")
        ledger = store.ledger_get(conn.name, report_id)
        original_id = correction["reverse_entry_id"]
        if ledger is None or ledger.status != IntentStatus.POSTED or ledger.entry_id != original_id:
            raise QuarantineActionError(
                f"the ledger no longer holds entry {original_id} as posted for report {report_id}; rerun its day so "
                f"the correction is drafted again")
        audit = dict(connection=conn.name, report_id=report_id, run_id=run_id, partition_date=item.partition_date)

        corrected = correction["corrected_entry"]
        corrected_hash = content_hash(corrected)
        correction_id = correction_entry_id(conn.name, report_id, original_id, corrected_hash)
        reversal_id = reversal_entry_id(conn.name, report_id, original_id)
        rows = {r.entry_id: r for r in store.intents_for(conn.name, report_id, replaces_entry_id=original_id)}

        # Earlier attempts may have left intents for another drafted correction: settle them by asking Exact.
        for row in rows.values():
            if row.status == IntentStatus.PENDING and row.entry_id not in (reversal_id, correction_id):
                _settle(row, store, exact, audit,
                        _known_entries(ledger.entry_id, store.intents_for(conn.name, report_id), row))
        rows = {r.entry_id: r for r in store.intents_for(conn.name, report_id, replaces_entry_id=original_id)}
        posted_other = [r for r in rows.values() if r.kind == IntentKind.CORRECTION and r.status == IntentStatus.POSTED
                        and r.entry_id != correction_id]
        if posted_other:
            correction_row = posted_other[0]  # an older approval landed: finish that one, never post a second
        else:
            intents = []
            if reversal_id not in rows:
                entry = exact.get_entry(original_id)
                if entry is None:
                    raise QuarantineActionError(f"entry {original_id} (number {ledger.entry_number}) is not in Exact "
                                                f"any more; fix it there, then resolve the item")
                lines = exact.get_all(GJE_LINES_PATH, select=list(REVERSAL_LINE_SELECT),
                                      filter=f"EntryID eq {guid_literal(original_id)}")
                body = reversal_body(entry, lines)
                intents.append(NewIntent(IntentKind.REVERSAL, reversal_id, content_hash(body), body,
                                         ledger.partition_date, ledger.transaction_ids, -ledger.total_cents,
                                         replaces_entry_id=original_id))
            if correction_id not in rows:
                intents.append(NewIntent(IntentKind.CORRECTION, correction_id, corrected_hash, corrected,
                                         item.partition_date, item.transaction_ids, _debit_cents(corrected),
                                         replaces_entry_id=original_id))
            if intents:
                store.intents_write(conn.name, report_id, intents, run_id=run_id)
                store.audit("approve_intents", entry_id=correction_id, transaction_ids=item.transaction_ids,
                            detail={"reversal": reversal_id, "correction": correction_id, "replaces": original_id,
                                    "by": actor}, **audit)
            rows = {r.entry_id: r for r in store.intents_for(conn.name, report_id, replaces_entry_id=original_id)}
            correction_row = rows[correction_id]
        reversal_row = rows[reversal_id]

        for row in (reversal_row, correction_row):
            if row.status != IntentStatus.POSTED:
                known = store.intents_for(conn.name, report_id)
                try:
                    _post_correction(row, store, exact, audit, _known_entries(original_id, known, row))
                except RejectedByApi as exc:
                    for pending in store.intents_for(conn.name, report_id, replaces_entry_id=original_id):
                        if pending.status == IntentStatus.PENDING:
                            store.intent_drop(conn.name, report_id, pending.kind, pending.entry_id)
                    store.audit("approve_failed", entry_id=row.entry_id,
                                detail={"kind": row.kind, "message": exc.api_message, "by": actor}, **audit)
                    raise QuarantineActionError(f"Exact refused the {row.kind} of report {report_id}: "
                                                f"{exc.api_message}") from None
        rows = {r.entry_id: r for r in store.intents_for(conn.name, report_id, replaces_entry_id=original_id)}
        reversal_row, correction_row = rows[reversal_id], rows[correction_row.entry_id]
        note = (f"approved: entry {ledger.entry_number} reversed by entry {reversal_row.entry_number}, corrected by "
                f"entry {correction_row.entry_number}")
        store.correction_complete(conn.name, report_id, replaces_entry_id=original_id,
                                  entry_id=correction_row.entry_id, note=note)
        store.audit("approved", entry_id=correction_row.posted_entry_id, entry_number=correction_row.entry_number,
                    transaction_ids=correction_row.transaction_ids,
                    detail={"by": actor, "replaced_entry": {"id": original_id, "number": ledger.entry_number},
                            "reversal": {"id": reversal_row.posted_entry_id, "number": reversal_row.entry_number},
                            "correction": {"id": correction_row.posted_entry_id,
                                           "number": correction_row.entry_number}},
                    **audit)
        return ApproveResult(conn.name, report_id, reversal_row.posted_entry_id, reversal_row.entry_number,
                             correction_row.posted_entry_id, correction_row.entry_number, original_id)


def _known_entries(original_id: str, intents, row: Intent) -> set[str]:
    """Entries Exact holds that are accounted for elsewhere: never taken for `row`'s when looking it up. `intents` are
    all the report's, of every kind: an earlier post or correction with the same lines (the report went back to
    content posted before) is an entry of its own, not this one."""
    return {original_id.lower()} | {r.posted_entry_id.lower() for r in intents
                                    if r.status == IntentStatus.POSTED and r.entry_id != row.entry_id}


def _settle(row: Intent, store: StateStore, exact: ExactGateway, audit: dict, known: set[str]) -> None:
    """An intent of an earlier drafted correction: record it if Exact holds it, else forget it."""
    found = find_posted(exact, store, row.connection, row.body | {"EntryID": row.entry_id}, sent_entry_id=row.entry_id,
                        exclude_entry_ids=known)
    if found is None:
        store.intent_drop(row.connection, row.report_id, row.kind, row.entry_id)
    else:
        store.intent_mark_posted(row.connection, row.report_id, row.kind, row.entry_id, found.entry_number,
                                 exact_entry_id=found.entry_id)
        store.audit(f"{row.kind}_posted", entry_id=found.entry_id, entry_number=found.entry_number,
                    detail={"settled": f"pending intent found in Exact by {found.found_by}",
                            "entry_id_sent": row.entry_id}, **audit)


def _post_correction(row: Intent, store: StateStore, exact: ExactGateway, audit: dict, known: set[str]) -> None:
    """Post one pending correction intent, unless Exact already holds it (a crash after the POST); the same rules
    for every answer as daily posting (`settlement`).

    Raises:
        RejectedByApi: Exact refused it and does not hold it.
        TransientApiError: its fate is open (the intent stays) or it was not processed; run approve again.
    """
    body = row.body | {"EntryID": row.entry_id}
    found = find_posted(exact, store, row.connection, body, sent_entry_id=row.entry_id, exclude_entry_ids=known)
    settled = found is not None
    if found is None:
        found = post_and_settle(exact, store, row.connection, body, exclude_entry_ids=known)
        if found.outcome == Fate.REJECTED:
            raise RejectedByApi("exact", found.message, status=found.status)
        if found.outcome != Fate.POSTED:
            raise TransientApiError("exact", f"the {row.kind} of report {row.report_id} got no certain answer "
                                             f"({found.message}); run approve again, it is looked up first",
                                    status=found.status)
    store.intent_mark_posted(row.connection, row.report_id, row.kind, row.entry_id, found.entry_number,
                             exact_entry_id=found.entry_id)
    store.audit(f"{row.kind}_posted", entry_id=found.entry_id, entry_number=found.entry_number,
                detail={"total_cents": row.total_cents, "lines": len(row.body["GeneralJournalEntryLines"]),
                        "entry_id_sent": row.entry_id,
                        **({"settled": f"pending intent found in Exact by {found.found_by}"} if settled else {})},
                **audit)
