"""What one POST of a journal entry ended as, and whether Exact holds an entry whose fate is open, found by keys Exact
certainly stores. One mechanism for daily posting and for approved corrections (exact-online.md §7, §13).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from expensify_exact.api.exact.client import AnswerKind, PostAnswer
from expensify_exact.errors import ApiError, ErrorBudgetExhausted
from expensify_exact.store import IntentStatus

# Written by `preflight --write-test`: True = Exact keeps the client's EntryID, False = it assigns its own.
KEEPS_CLIENT_ENTRY_ID = "exact_keeps_client_entry_id"
# Row version from which the sync-twin fallback reads TransactionLines (exact-online.md §4.3).
SYNC_WATERMARK = "exact_settlement_sync_watermark"
SYNC_TRANSACTION_LINES = "sync/Financial/TransactionLines"
SYNC_SELECT = ("EntryID", "EntryNumber", "Description", "GLAccount", "AmountFC", "CostCenter", "CostUnit")


class EntryGateway(Protocol):
    """What settlement needs from the Exact client."""

    def get_entry(self, entry_id: str) -> dict | None: ...

    def entry_lines_by_description(self, descriptions: Iterable[str]) -> list[dict]: ...

    def sync_rows(self, path: str, select, since: int = 1) -> list[dict]: ...

    def send_general_journal_entry(self, body: Mapping[str, Any]) -> PostAnswer: ...


class FactStore(Protocol):
    def connection_fact_get(self, connection: str, name: str) -> Any | None: ...

    def connection_fact_put(self, connection: str, name: str, value: Any, detail: dict | None = None) -> None: ...

    def ledger_rows(self, connection: str | None = None, status: IntentStatus | None = None) -> list: ...


class Fate(StrEnum):
    """The fate of one entry sent to Exact."""

    POSTED = "posted"  # Exact holds it; `entry_id` is Exact's EntryID (which may differ from the one sent)
    REJECTED = "rejected"  # Exact refused it and does not hold it; `status` and `message` are Exact's
    # It may or may not be in Exact (no answer, a 5xx without a message, and no lookup found it): keep the intent,
    # the next run looks again before posting.
    UNKNOWN = "unknown"
    NOT_SENT = "not_sent"  # not processed (still 429 after the waits): nothing to keep


@dataclass(frozen=True)
class Settled:
    """The fate of one entry, with what Exact said or where it was found."""

    outcome: Fate
    entry_id: str | None = None
    entry_number: int | None = None
    status: int | None = None
    message: str = ""
    found_by: str | None = None  # "answer", "EntryID", "lines", "sync" (how a posted entry was recognised)


def post_and_settle(client: EntryGateway, store: FactStore, connection: str, body: Mapping[str, Any], *,
                    exclude_entry_ids: Iterable[str] = (), settling_report: str | None = None) -> Settled:
    """POST `body` (carrying our EntryID) once and apply the rule for its answer.

    2xx → posted (with Exact's echoed EntryID). A 5xx with Exact's message → looked up; not there → rejected with
    the message. A 5xx without a message, a timeout or a dropped connection → looked up; not there → unknown.
    Another 4xx → rejected with status and message. 429 after the waits → not sent. 401 after one refresh and 403
    raise (AuthenticationError, ConnectionStopped, DivisionAccessError): the connection stops.

    Raises:
        ErrorBudgetExhausted, RateLimitExhausted: refused before sending; nothing reached Exact.
        AuthenticationError, ConnectionStopped, DivisionAccessError: see above; nothing was processed.
    """
    answer = client.send_general_journal_entry(body)
    if answer.kind == AnswerKind.CREATED:
        entry = answer.entry or {}
        return Settled(Fate.POSTED, str(entry.get("EntryID") or body["EntryID"]).lower(), entry.get("EntryNumber"),
                       answer.status, found_by="answer")
    if answer.kind == AnswerKind.REJECTED:
        return Settled(Fate.REJECTED, status=answer.status, message=answer.message)
    if answer.kind == AnswerKind.NOT_SENT:
        return Settled(Fate.NOT_SENT, status=answer.status, message=answer.message)
    what = f"HTTP {answer.status}: {answer.message}" if answer.status else answer.message
    try:
        found = find_posted(client, store, connection, body, sent_entry_id=body.get("EntryID"),
                            exclude_entry_ids=exclude_entry_ids, settling_report=settling_report)
    except ApiError as exc:
        return Settled(Fate.UNKNOWN, status=answer.status,
                       message=f"{what}; looking the entry up failed too ({exc}), so its fate is open")
    if found is not None:
        return found
    if answer.kind == AnswerKind.REFUSED:
        return Settled(Fate.REJECTED, status=answer.status, message=answer.message)
    return Settled(Fate.UNKNOWN, status=answer.status, message=f"{what}; the entry is not in Exact (yet)")


def find_posted(client: EntryGateway, store: FactStore, connection: str, body: Mapping[str, Any], *,
                sent_entry_id: str | None, exclude_entry_ids: Iterable[str] = (),
                settling_report: str | None = None) -> Settled | None:
    """Exact's copy of the entry `body` describes, if it holds one; None if it certainly does not.

    First by the EntryID we sent, unless the connection is known to get Exact's own EntryIDs (then that lookup
    cannot succeed). Then, since "EntryID not found" alone proves nothing, by the lines' Description: every line
    carries the Expensify report and transaction ID there, and Exact stores it as sent. The lines are read from
    `GeneralJournalEntryLines` (no sync twin, so no mandatory filter) with an equality filter; should Exact refuse
    that query (400), from the `sync/Financial/TransactionLines` twin from the stored watermark. An entry matches
    when its lines carry the same descriptions, accounts, amounts and dimensions; `exclude_entry_ids` (entries the
    ledger already accounts for, e.g. the one a correction replaces) never match.

    Raises:
        ApiError: Exact could not be asked (the caller must then treat the fate as open).
    """
    excluded = {str(e).lower() for e in exclude_entry_ids if e}
    if sent_entry_id and store.connection_fact_get(connection, KEEPS_CLIENT_ENTRY_ID) is not False:
        try:
            entry = client.get_entry(str(sent_entry_id))
        except ErrorBudgetExhausted:
            entry = None  # the entries endpoint has spent its errors this hour; the lines answer as well
        if entry is not None and str(entry.get("EntryID", sent_entry_id)).lower() not in excluded:
            return Settled(Fate.POSTED, str(entry.get("EntryID") or sent_entry_id).lower(), entry.get("EntryNumber"),
                           found_by="EntryID")
    lines = [line for line in body.get("GeneralJournalEntryLines") or [] if isinstance(line, Mapping)]
    descriptions = [str(line.get("Description") or "").strip() for line in lines]
    if not all(descriptions):
        return None  # nothing certain to look for; the connector always writes a Description (journal.py)
    try:
        rows = client.entry_lines_by_description(descriptions)
        match = _match(lines, rows, excluded, split_vat=False)
        found_by = "lines"
    except ApiError as exc:
        if exc.status != 400:
            raise
        since = int(store.connection_fact_get(connection, SYNC_WATERMARK) or 1)
        rows = client.sync_rows(SYNC_TRANSACTION_LINES, SYNC_SELECT, since=since)
        match = _match(lines, rows, excluded, split_vat=True)
        found_by = "sync"
        _advance_watermark(store, connection, rows, since, settling_report)
    if match is None:
        return None
    return Settled(Fate.POSTED, match[0], match[1], found_by=found_by)


def _key(line: Mapping[str, Any]) -> tuple:
    return (str(line.get("Description") or "").strip(), str(line.get("GLAccount") or "").strip().lower(),
            round(float(line.get("AmountFC") or 0) * 100), str(line.get("CostCenter") or "").strip(),
            str(line.get("CostUnit") or "").strip())


def _match(lines: list[Mapping[str, Any]], rows: list[dict], excluded: set[str],
           split_vat: bool) -> tuple[str, int | None] | None:
    """The (EntryID, EntryNumber) of an entry whose lines are `lines`.

    `split_vat`: rows are TransactionLines, where Exact splits a VAT line off each line with a VAT code; those lines
    are then recognised by their description alone, the others by every field.
    """
    wanted = Counter(_key(line) for line in lines if not (split_vat and line.get("VATCode")))
    exact_pairs = {k[:2] for k in wanted}
    descriptions = {str(line.get("Description") or "").strip() for line in lines}
    by_entry: dict[str, list[dict]] = {}
    for row in rows:
        entry_id = str(row.get("EntryID") or "").lower()
        if entry_id and entry_id not in excluded:
            by_entry.setdefault(entry_id, []).append(row)
    for entry_id, entry_rows in sorted(by_entry.items()):
        if not descriptions <= {str(r.get("Description") or "").strip() for r in entry_rows}:
            continue
        got = Counter(k for k in map(_key, entry_rows) if k[:2] in exact_pairs)
        if got == wanted:
            return entry_id, next((r.get("EntryNumber") for r in entry_rows if r.get("EntryNumber") is not None),
                                  None)
    return None


def _advance_watermark(store: FactStore, connection: str, rows: list[dict], since: int,
                       settling_report: str | None) -> None:
    """Move the sync watermark past what was read, but only while no other intent of this connection is open: an
    entry of another pending intent may be among the rows just read, and must stay findable."""
    newest = max((int(r["Timestamp"]) for r in rows if r.get("Timestamp") is not None), default=since)
    if settling_report is None or newest <= since:
        return
    pending = {row.report_id for row in store.ledger_rows(connection, status=IntentStatus.PENDING)}
    if pending <= {settling_report}:
        store.connection_fact_put(connection, SYNC_WATERMARK, newest)
