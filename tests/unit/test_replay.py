"""Replay and operator actions without the network: fingerprints, the reversal draft, and the crash-safety of
`approve` (both intents are written before the first POST; a rerun asks Exact before posting again).

Exact is a small fake here; the same flows run against the sandbox in tests/http/test_replay_sandbox.py and
tests/dagster/test_exactly_once_runs.py.
"""

from __future__ import annotations

import csv
import json
import re
import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
import sqlalchemy as sa

from expensify_exact.api.exact.client import AnswerKind, PostAnswer
from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.core.journal import Dimensions, content_hash, entry_body, entry_id_for
from expensify_exact.core.replay import (
    QuarantineActionError,
    approve_correction,
    close_item,
    correction_entry_id,
    dimensions_fingerprint,
    replay_fingerprint,
    replayable,
    reversal_body,
    reversal_entry_id,
)
from expensify_exact.errors import StateStoreError
from expensify_exact.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    IntentKind,
    NewIntent,
    QuarantineStatus,
    StateStore,
    metadata,
    schema_migrations,
)
from expensify_exact.store.migrations import corrections, migrate, posted_ledger
from tests.conftest import MAPPINGS
from tests.factories import expense_line, seed_dimensions
from tests.unit.test_posting import ScriptedExact, drafts_for, run
from tests.unit.test_state_and_vault import write_post_intent

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
CONN = "vermeerhals-nl"
ORIGINAL = "0b8f5f7e-1111-4aaa-8bbb-000000000001"
GL_COST, GL_PAYABLE = "aaaaaaaa-0000-4000-8000-000000004500", "aaaaaaaa-0000-4000-8000-000000001650"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_state_url(request, state_url):
    """The URL of an empty state database, the embedded SQLite default or PostgreSQL."""
    return state_url if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest.fixture
def any_store(any_state_url):
    """The connector's state on the embedded SQLite default and on PostgreSQL."""
    store = StateStore(any_state_url)
    yield store
    store.dispose()


# ------------------------------------------------------------------------------------------------ fingerprints

def _changed(dims: Dimensions, name: str, change) -> Dimensions:
    frame = getattr(dims, name).copy()
    return Dimensions(**{n: (change(frame) if n == name else getattr(dims, n)) for n in dims.__dataclass_fields__})


@pytest.mark.parametrize("change, same", [
    # Exact pages rows in any order; the order must not look like a change.
    (lambda d: _changed(d, "cost_centers", lambda f: f.iloc[::-1].reset_index(drop=True)), True),
    # The seeded fix: cost center EHV created.
    (lambda d: _changed(d, "cost_centers", lambda f: pd.concat(
        [f, pd.DataFrame([{"id": "x", "code": "EHV", "description": "Eindhoven", "end_date": None}])],
        ignore_index=True)), False),
    # A cost center's end date extended.
    (lambda d: _changed(d, "cost_centers", lambda f: f.assign(end_date=[None] * len(f))), False),
    # A GL account unblocked.
    (lambda d: _changed(d, "gl_accounts", lambda f: f.assign(is_blocked=False)), False),
    # A financial year added.
    (lambda d: _changed(d, "financial_periods", lambda f: f.iloc[:-1]), False),
])
def test_the_dimension_fingerprint_changes_exactly_when_validation_could_come_out_differently(change, same):
    dims = seed_dimensions()
    assert (dimensions_fingerprint(change(dims)) == dimensions_fingerprint(dims)) is same


def test_a_mapping_fix_changes_the_replay_fingerprint_too(tmp_path):
    config = load_project_config(MAPPINGS)
    conn = config.connection(CONN)
    dims = seed_dimensions()
    fixed = config.model_copy(update={"categories": [*config.categories, config.categories[0].model_copy(
        update={"category": "Gifts"})]})
    assert replay_fingerprint(dims, config, conn) == replay_fingerprint(dims, config, conn)
    assert replay_fingerprint(dims, fixed, conn) != replay_fingerprint(dims, config, conn)


@pytest.mark.parametrize("codes, expected", [
    (["UNKNOWN_COST_CENTER"], True),
    (["CHANGED_AFTER_POSTING"], False),  # waits for a person's approve, not for a snapshot
    (["CHANGED_AFTER_POSTING", "UNMAPPED_TAG"], True),
])
def test_only_items_a_fresh_snapshot_could_fix_are_replayable(store, codes, expected):
    store.quarantine_put(CONN, "R1", partition_date="2026-11-03", reasons=[{"code": c} for c in codes],
                         transaction_ids=["t1"], content_hash=None)
    assert replayable(store.quarantine_get(CONN, "R1")) is expected


# ---------------------------------------------------------------------------------------------------- reversal

def _original_lines() -> list[dict]:
    day = datetime(2026, 11, 3, tzinfo=AMSTERDAM)
    return [
        {"EntryID": ORIGINAL, "LineNumber": 2, "GLAccount": GL_PAYABLE, "AmountFC": -25.45, "VATCode": None,
         "Date": day, "Description": "R1/t1 NS Reizigers", "Notes": "Expensify report R1, transaction t1",
         "CostCenter": None, "CostUnit": None},
        {"EntryID": ORIGINAL, "LineNumber": 1, "GLAccount": GL_COST, "AmountFC": 25.45, "VATCode": "2",
         "Date": day, "Description": "R1/t1 NS Reizigers", "Notes": "x" * 255, "CostCenter": "AMS",
         "CostUnit": "P1001"},
    ]


ORIGINAL_HEADER = {"EntryID": ORIGINAL, "EntryNumber": 26900001, "JournalCode": "90", "FinancialYear": 2026,
                   "FinancialPeriod": 11, "Currency": "EUR"}


def test_the_reversal_negates_every_line_of_the_posted_entry_and_keeps_its_dimensions():
    body = reversal_body(ORIGINAL_HEADER, _original_lines())
    assert body["Reversal"] is True
    assert (body["JournalCode"], body["FinancialYear"], body["FinancialPeriod"]) == ("90", 2026, 11)
    first, second = body["GeneralJournalEntryLines"]
    assert (first["GLAccount"], first["AmountFC"], first["CostCenter"], first["CostUnit"], first["VATCode"]) == \
        (GL_COST, -25.45, "AMS", "P1001", "2")
    assert (second["GLAccount"], second["AmountFC"]) == (GL_PAYABLE, 25.45) and "CostCenter" not in second
    assert first["Date"] == "2026-11-03" and first["Description"] == "R1/t1 NS Reizigers"
    assert first["Notes"].startswith("Reversal of entry 26900001: ") and len(first["Notes"]) == 255
    assert sum(round(line["AmountFC"] * 100) for line in body["GeneralJournalEntryLines"]) == 0


def test_the_reversal_entry_id_is_deterministic_and_never_an_entry_id_of_report_content():
    assert reversal_entry_id(CONN, "R1", ORIGINAL) == reversal_entry_id(CONN, "R1", ORIGINAL.upper())
    assert reversal_entry_id(CONN, "R1", ORIGINAL) != reversal_entry_id(CONN, "R1", ORIGINAL[:-1] + "2")
    assert reversal_entry_id(CONN, "R1", ORIGINAL) != entry_id_for(CONN, "R1", content_hash({}))


# ----------------------------------------------------------------------------------------------------- approve

class Crash(BaseException):
    """The process dies: nothing after this point runs (not an Exception, so nothing catches it)."""


class FakeExact:
    """Holds entries like Exact (keeping the client's EntryIDs, or assigning its own); can lose the answer of chosen
    POSTs, or refuse one."""

    def __init__(self, store: StateStore, crash_on: dict[int, str] | None = None, refuse: int | None = None,
                 keeps_ids: bool = True):
        self.store = store
        self.entries = {ORIGINAL: ORIGINAL_HEADER | {"lines": _original_lines(), "Reversal": False}}
        self.crash_on = crash_on or {}  # POST number -> "before_store" | "after_store"
        self.refuse = refuse
        self.keeps_ids = keeps_ids
        self.posts = 0
        self.intents_at_first_post: list[str] | None = None

    def get_entry(self, entry_id):
        entry = self.entries.get(entry_id)
        return None if entry is None else {k: v for k, v in entry.items() if k != "lines"}

    def get_all(self, path, select, filter=None, orderby=None):
        assert path == "generaljournalentry/GeneralJournalEntryLines" and ORIGINAL in filter
        return self.entries[ORIGINAL]["lines"]

    def entry_lines_by_description(self, descriptions):
        return [{**line, "EntryID": entry_id, "EntryNumber": entry["EntryNumber"]}
                for entry_id, entry in self.entries.items() for line in entry["lines"]
                if line["Description"] in set(descriptions)]

    def sync_rows(self, path, select, since=1):
        raise AssertionError("the lines query is accepted here")

    def send_general_journal_entry(self, body):
        self.posts += 1
        if self.intents_at_first_post is None:
            self.intents_at_first_post = sorted(r.kind for r in self.store.intents_for(CONN, "R1", ORIGINAL))
        if self.refuse == self.posts:
            return PostAnswer("refused", status=500, message="Periode is afgesloten: 2026 / 11")
        if self.crash_on.get(self.posts) == "before_store":
            raise Crash()
        entry_id = body["EntryID"] if self.keeps_ids else f"ffff0000-0000-4000-8000-{self.posts:012d}"
        assert entry_id not in self.entries, "posted twice"
        number = 26900001 + len(self.entries)
        self.entries[entry_id] = {**body, "EntryID": entry_id, "EntryNumber": number,
                                  "lines": body["GeneralJournalEntryLines"]}
        if self.crash_on.get(self.posts) == "after_store":
            raise Crash()  # Exact has it; the poster never hears back
        return PostAnswer("created", entry={"EntryID": entry_id, "EntryNumber": number}, status=201)


def _posted_and_changed(store: StateStore) -> dict:
    """R1 posted as ORIGINAL (25.45), then seen again at 35.45: quarantined with a drafted correction."""
    write_post_intent(store, CONN, "R1", ORIGINAL, partition_date="2026-11-03", transaction_ids=("t1",),
                      total_cents=2545, run_id="r1")
    store.intent_mark_posted(CONN, "R1", IntentKind.POST, ORIGINAL, 26900001)
    corrected = _corrected()
    store.quarantine_put(CONN, "R1", partition_date="2026-11-20", reasons=[_changed_reason()], transaction_ids=["t1"],
                         content_hash=content_hash(corrected),
                         correction={"reverse_entry_id": ORIGINAL, "corrected_entry": corrected})
    return corrected


def _corrected() -> dict:
    return {"JournalCode": "90", "FinancialYear": 2026, "FinancialPeriod": 11, "Currency": "EUR",
                 "GeneralJournalEntryLines": [
                     {"GLAccount": GL_COST, "AmountFC": 35.45, "Date": "2026-11-20", "Description": "R1/t1 NS",
                      "Notes": "n", "CostCenter": "AMS"},
                     {"GLAccount": GL_PAYABLE, "AmountFC": -35.45, "Date": "2026-11-20", "Description": "R1/t1 NS",
                      "Notes": "n"}]}


def _changed_reason() -> dict:
    return {"transaction_id": "", "code": "CHANGED_AFTER_POSTING", "dimension": "report", "value": ORIGINAL,
            "message": "posted as entry 26900001 (25.45); the report now totals 35.45"}


@pytest.mark.parametrize("crash_on", [
    {},                                              # no crash
    {1: "before_store"},                             # dies sending the reversal
    {1: "after_store"},                              # the reversal landed, its answer was lost
    {2: "after_store"},                              # the correction landed, its answer was lost
    {1: "after_store", 2: "after_store"},            # both, on two attempts in a row
])
@pytest.mark.parametrize("keeps_ids", [True, False], ids=["exact_keeps_ours", "exact_assigns_entry_ids"])
def test_approve_posts_the_reversal_and_the_correction_exactly_once_however_often_it_dies(any_store, crash_on,
                                                                                          keeps_ids):
    store = any_store
    corrected = _posted_and_changed(store)
    conn = load_project_config(MAPPINGS).connection(CONN)
    exact = FakeExact(store, crash_on=crash_on, keeps_ids=keeps_ids)
    for _attempt in range(len(crash_on) + 1):
        try:
            result = approve_correction(conn, store=store, exact=exact, report_id="R1", actor="tester")
            break
        except Crash:
            with store.engine.begin() as c:  # the dead process's lease would expire; do not wait for it here
                c.execute(sa.text("UPDATE ee_locks SET owner = NULL"))
    else:
        pytest.fail("approve never completed")

    assert exact.intents_at_first_post == ["correction", "reversal"], "both intents must exist before any POST"
    correction_id = result.correction_entry_id
    assert set(exact.entries) == {ORIGINAL, result.reversal_entry_id, correction_id}
    if keeps_ids:
        assert correction_id == correction_entry_id(CONN, "R1", ORIGINAL, content_hash(corrected))
        assert result.reversal_entry_id == reversal_entry_id(CONN, "R1", ORIGINAL)
    assert exact.entries[result.reversal_entry_id]["Reversal"] is True
    assert exact.entries[correction_id]["GeneralJournalEntryLines"] == corrected["GeneralJournalEntryLines"]
    ledger = store.ledger_get(CONN, "R1")
    assert (ledger.status, ledger.entry_id, ledger.entry_number, ledger.total_cents, ledger.content_hash) == \
        ("posted", correction_id, exact.entries[correction_id]["EntryNumber"], 3545, content_hash(corrected))
    assert ledger.client_entry_id == correction_entry_id(CONN, "R1", ORIGINAL, content_hash(corrected))  # sent
    item = store.quarantine_get(CONN, "R1")
    assert item.status == "resolved" and "reversed by entry" in item.resolution_note
    assert {(r.kind, r.status) for r in store.intents_for(CONN, "R1", ORIGINAL)} == {("reversal", "posted"),
                                                                                      ("correction", "posted")}
    events = [r["event"] for r in store.audit_rows(CONN, report_id="R1")]
    assert events.count("reversal_posted") == 1 and events.count("correction_posted") == 1
    assert events[-1] == "approved"

    with pytest.raises(QuarantineActionError, match="is resolved, not open"):
        approve_correction(conn, store=store, exact=exact, report_id="R1")
    assert len(exact.entries) == 3


class ExactHoldingEntries:
    """Holds every entry posted to it with its lines, keeping the client's EntryIDs or assigning its own; a POST with
    an EntryID it already holds is refused."""

    def __init__(self, keeps_ids: bool):
        self.entries: dict[str, dict] = {}
        self.keeps_ids = keeps_ids

    def add(self, entry_id: str, body: dict) -> int:
        number = 26900001 + len(self.entries)
        lines = [{**line, "EntryID": entry_id, "LineNumber": i + 1}
                 for i, line in enumerate(body["GeneralJournalEntryLines"])]
        self.entries[entry_id] = {**body, "EntryID": entry_id, "EntryNumber": number, "lines": lines}
        return number

    def get_entry(self, entry_id):
        entry = self.entries.get(entry_id)
        return None if entry is None else {k: v for k, v in entry.items() if k != "lines"}

    def get_all(self, path, select, filter=None, orderby=None):
        return self.entries[re.search(r"guid'([^']+)'", filter).group(1)]["lines"]

    def entry_lines_by_description(self, descriptions):
        return [{**line, "EntryNumber": entry["EntryNumber"]} for entry in self.entries.values()
                for line in entry["lines"] if line["Description"] in set(descriptions)]

    def sync_rows(self, path, select, since=1):
        raise AssertionError("the lines query is accepted here")

    def send_general_journal_entry(self, body):
        entry_id = body["EntryID"] if self.keeps_ids else f"ffff0000-0000-4000-8000-{len(self.entries):012d}"
        if entry_id in self.entries:
            return PostAnswer(AnswerKind.REFUSED, status=500, message=f"EntryID {entry_id} exists already")
        number = self.add(entry_id, body)
        return PostAnswer(AnswerKind.CREATED, entry={"EntryID": entry_id, "EntryNumber": number}, status=201)


@pytest.mark.parametrize("keeps_ids", [True, False], ids=["exact_keeps_ours", "exact_assigns_entry_ids"])
def test_a_report_changed_back_to_content_posted_before_gets_a_correction_of_its_own(store, keeps_ids):
    """A posted, corrected to B, then back to A: the second correction is a new entry in Exact. Taking the first
    entry (same lines, but reversed by the first correction) for it would leave the report's amount out of the
    books while the ledger says posted."""
    conn = load_project_config(MAPPINGS).connection(CONN)
    a, b = _corrected(), _corrected()
    for line in b["GeneralJournalEntryLines"]:
        line["AmountFC"] = 45.45 if line["AmountFC"] > 0 else -45.45
    exact = ExactHoldingEntries(keeps_ids)
    sent_a = entry_id_for(CONN, "R1", content_hash(a))
    held_a = sent_a if keeps_ids else "eeee0000-0000-4000-8000-000000000001"
    exact.add(held_a, a)
    write_post_intent(store, CONN, "R1", sent_a, partition_date="2026-11-20", transaction_ids=("t1",),
                      total_cents=3545, run_id="r1")
    store.intent_mark_posted(CONN, "R1", IntentKind.POST, sent_a, 26900001, exact_entry_id=held_a)

    held = held_a
    for content in (b, a):
        store.quarantine_put(CONN, "R1", partition_date="2026-11-20", reasons=[_changed_reason() | {"value": held}],
                             transaction_ids=["t1"], content_hash=content_hash(content),
                             correction={"reverse_entry_id": held, "corrected_entry": content})
        result = approve_correction(conn, store=store, exact=exact, report_id="R1")
        held = result.correction_entry_id

    assert len(exact.entries) == 5, "A, its reversal, B, its reversal, and A again"
    assert held not in (held_a, sent_a) and exact.entries[held]["lines"][0]["AmountFC"] == 35.45
    cost_lines = [line for e in exact.entries.values() for line in e["lines"] if line["GLAccount"] == GL_COST]
    assert sum(line["AmountFC"] for line in cost_lines) == pytest.approx(35.45), \
        "what Exact holds for the report nets to its content now"
    assert store.ledger_get(CONN, "R1").entry_id == held


def test_a_refused_reversal_posts_nothing_drops_both_intents_and_leaves_the_item_open(store):
    _posted_and_changed(store)
    conn = load_project_config(MAPPINGS).connection(CONN)
    exact = FakeExact(store, refuse=1)
    with pytest.raises(QuarantineActionError, match="refused the reversal.*afgesloten"):
        approve_correction(conn, store=store, exact=exact, report_id="R1")
    assert list(exact.entries) == [ORIGINAL]
    assert store.intents_for(CONN, "R1", ORIGINAL) == []
    assert store.quarantine_get(CONN, "R1").status == "open"
    assert store.ledger_get(CONN, "R1").entry_id == ORIGINAL
    assert [r["event"] for r in store.audit_rows(CONN, report_id="R1")][-1] == "approve_failed"


def _corrected_by_another_route(store: StateStore) -> None:
    _posted_and_changed(store)
    other = NewIntent(IntentKind.CORRECTION, "other", "h", {"GeneralJournalEntryLines": []}, None, [], 0,
                      replaces_entry_id=ORIGINAL)
    store.intents_write(CONN, "R1", [other], run_id=None)
    store.intent_mark_posted(CONN, "R1", IntentKind.CORRECTION, "other", 1)
    store.correction_complete(CONN, "R1", replaces_entry_id=ORIGINAL, entry_id="other", note="n")
    store.quarantine_set_status(CONN, "R1", QuarantineStatus.OPEN)


@pytest.mark.parametrize("setup, message", [
    # Nothing quarantined for the report.
    (lambda s: None, "no quarantine item"),
    # A plain validation failure has nothing to approve.
    (lambda s: s.quarantine_put(CONN, "R1", partition_date=None, reasons=[{"code": "UNMAPPED_TAG"}],
                                transaction_ids=[], content_hash=None), "is not CHANGED_AFTER_POSTING"),
    # The ledger moved on since the correction was drafted (e.g. approved already by another route).
    (lambda s: _corrected_by_another_route(s), "no longer holds entry"),
])
def test_approve_refuses_what_it_cannot_carry_out_safely(store, setup, message):
    setup(store)
    exact = FakeExact(store)
    with pytest.raises(QuarantineActionError, match=message):
        approve_correction(load_project_config(MAPPINGS).connection(CONN), store=store, exact=exact, report_id="R1")
    assert exact.posts == 0


# -------------------------------------------------------------------------------------------- resolve / ignore

def test_an_ignored_item_stays_ignored_when_its_day_runs_again_but_a_resolved_one_reopens(store):
    for report in ("R1", "R2"):
        store.quarantine_put(CONN, report, partition_date="2026-11-03", reasons=[{"code": "UNMAPPED_CATEGORY"}],
                             transaction_ids=["t"], content_hash=None)
    with pytest.raises(QuarantineActionError, match="reason is required"):
        close_item(store, CONN, "R1", "ignored", "  ")
    close_item(store, CONN, "R1", "ignored", "test report", actor="anna")
    close_item(store, CONN, "R2", "resolved", "booked by hand", actor="anna")
    for report in ("R1", "R2"):
        store.quarantine_put(CONN, report, partition_date="2026-11-03", reasons=[{"code": "UNMAPPED_TAG"}],
                             transaction_ids=["t"], content_hash=None)
    r1, r2 = store.quarantine_get(CONN, "R1"), store.quarantine_get(CONN, "R2")
    assert (r1.status, r1.resolution_note, r1.reasons) == ("ignored", "test report", [{"code": "UNMAPPED_TAG"}])
    assert r2.status == "open"
    ignored = next(r for r in store.audit_rows(CONN, report_id="R1") if r["event"] == "ignored")
    assert json.loads(ignored["detail"]) == {"by": "anna", "reason": "test report",
                                             "reasons": [{"code": "UNMAPPED_CATEGORY"}]}


# ------------------------------------------------------------------------------------------------------ state

def test_a_version_1_database_is_migrated_to_the_newest_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    engine = sa.create_engine(url)
    version_1 = MIGRATIONS[0]
    with engine.begin() as conn:
        schema_migrations.create(conn)
        for table in version_1[2]:
            table.create(conn)
        conn.execute(schema_migrations.insert().values(version=1, description=version_1[1],
                                                       applied_at=datetime.now(timezone.utc)))
    later = {"ee_intents", "ee_rate_limits", "ee_request_log", "ee_dimension_snapshots", "ee_days_posted",
             "ee_deferred_reports"}
    assert not later & set(sa.inspect(engine).get_table_names())
    store = StateStore(url)
    assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1][0] == 8
    assert [version for version, _, _ in MIGRATIONS] == [1, 2, 3, 4, 5, 6, 7, 8]
    tables = set(sa.inspect(store.engine).get_table_names())
    assert later | {"ee_connection_facts", "ee_error_budget", "ee_notifications"} <= tables
    assert not {"ee_corrections", "ee_posted_ledger"} & (tables | set(metadata.tables))  # moved into ee_intents
    store.dispose()


def test_a_version_7_database_keeps_its_pending_intents_and_drafted_corrections_after_migration_8(any_state_url):
    """Intents written before the upgrade are settled after it by asking Exact, never posted again."""
    engine = sa.create_engine(any_state_url)
    migrate(engine, up_to=7)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE ee_quarantine DROP COLUMN correction"))  # not there in version 7
    engine.dispose()
    posting_exact = ScriptedExact(keeps_ids=False)
    # R2: its POST landed in Exact, the answer was lost, and the intent (with its body) is still pending.
    pending = drafts_for(expense_line(report_id="R2", transaction_id="1000"))
    body = entry_body(pending.lines)
    sent = entry_id_for(CONN, "R2", content_hash(body))
    posting_exact._store(body | {"EntryID": sent})
    # R1: posted as ORIGINAL, changed, approved; the reversal landed in Exact, the correction was never sent.
    corrected = _corrected()
    exact = FakeExact(None)
    reversal_id = reversal_entry_id(CONN, "R1", ORIGINAL)
    reversal = reversal_body(ORIGINAL_HEADER, _original_lines())
    exact.entries[reversal_id] = {**reversal, "EntryID": reversal_id, "EntryNumber": 26900002,
                                  "lines": reversal["GeneralJournalEntryLines"]}
    now = datetime.now(timezone.utc)
    ledger = {"content_hash": "h", "partition_date": "2026-11-03", "transaction_ids": '["t1"]', "intent_at": now,
              "run_id": "r1"}
    correction_id = entry_id_for(CONN, "R1", content_hash(corrected))
    engine = sa.create_engine(any_state_url)
    with engine.begin() as conn:
        conn.execute(posted_ledger.insert(), [
            ledger | {"connection": CONN, "report_id": "R1", "status": "posted", "entry_id": ORIGINAL,
                      "client_entry_id": ORIGINAL, "entry_number": 26900001, "total_cents": 2545, "posted_at": now,
                      "body": None},
            ledger | {"connection": CONN, "report_id": "R2", "status": "pending", "entry_id": sent,
                      "client_entry_id": sent, "content_hash": content_hash(body), "entry_number": None,
                      "total_cents": 1, "posted_at": None,
                      "body": json.dumps(body, sort_keys=True)}])
        intent = {"connection": CONN, "report_id": "R1", "replaces_entry_id": ORIGINAL, "status": "pending",
                  "transaction_ids": '["t1"]', "intent_at": now}
        conn.execute(corrections.insert(), [
            intent | {"entry_id": reversal_id, "kind": "reversal", "content_hash": content_hash(reversal),
                      "body": json.dumps(reversal), "total_cents": -2545, "partition_date": "2026-11-03"},
            intent | {"entry_id": correction_id, "kind": "correction", "content_hash": content_hash(corrected),
                      "body": json.dumps(corrected), "total_cents": 3545, "partition_date": "2026-11-20"}])
        reason = _changed_reason() | {"correction": json.dumps({"reverse_entry_id": ORIGINAL,
                                                                "corrected_entry": corrected})}
        conn.execute(sa.text("INSERT INTO ee_quarantine (connection, report_id, status, partition_date, reasons, "
                             "transaction_ids, first_seen_at, updated_at) VALUES (:c, 'R1', 'open', '2026-11-20', "
                             ":reasons, '[\"t1\"]', :now, :now)"),
                     {"c": CONN, "reasons": json.dumps([reason]), "now": now})
    engine.dispose()

    store = StateStore(any_state_url)
    assert store.schema_version() == 8
    item = store.quarantine_get(CONN, "R1")
    assert item.reasons == [_changed_reason()] and item.correction["reverse_entry_id"] == ORIGINAL
    assert {(i.kind, i.status) for i in store.intents_for(CONN, "R1")} == {
        ("post", "posted"), ("reversal", "pending"), ("correction", "pending")}
    assert store.ledger_get(CONN, "R2").status == "pending"

    settled = run(store, posting_exact, "R2")
    assert [o.outcome for o in settled.outcomes] == ["already_posted"] and posting_exact.posts == 0
    assert store.ledger_get(CONN, "R2").entry_id in posting_exact.entries  # found there, settled as posted

    exact.store = store
    result = approve_correction(load_project_config(MAPPINGS).connection(CONN), store=store, exact=exact,
                                report_id="R1")
    assert exact.posts == 1, "the reversal is found in Exact; only the correction is posted"
    # The pending correction (an EntryID of the old derivation, never sent) was looked up, not found and replaced by
    # one under today's derivation: posted once.
    assert correction_id not in exact.entries
    assert result.reversal_entry_id == reversal_id and store.ledger_get(CONN, "R1").entry_id == \
        correction_entry_id(CONN, "R1", ORIGINAL, content_hash(corrected))
    assert store.quarantine_get(CONN, "R1").status == "resolved"
    store.dispose()


def test_racing_intents_for_one_report_never_fail_on_the_standing_entry(any_store):
    store = any_store
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def write() -> None:
        barrier.wait()
        try:
            write_post_intent(store, CONN, "R9", "e", transaction_ids=("t",))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.ledger_get(CONN, "R9").status == "pending"
    store.intent_mark_posted(CONN, "R9", IntentKind.POST, "e", 1)
    with pytest.raises(StateStoreError, match="already posted"):
        write_post_intent(store, CONN, "R9", "e", transaction_ids=("t",))


# ------------------------------------------------------------------------------------------------------ CLI

def test_audit_export_writes_the_log_as_csv_filtered_by_connection_and_day(store, state_url, tmp_path, capsys):
    store.audit("quarantined", connection=CONN, report_id="R1", transaction_ids=["t1", "t2"],
                detail={"reasons": [{"code": "UNKNOWN_COST_CENTER"}]})
    store.audit("posted", connection=CONN, report_id="R1", entry_id=ORIGINAL, entry_number=26900001)
    store.audit("posted", connection="other", report_id="R2")
    with store.engine.begin() as conn:  # an old event, before --since
        conn.execute(sa.text("UPDATE ee_audit_log SET at = :at WHERE id = 1"),
                     {"at": datetime.now(timezone.utc) - timedelta(days=10)})
    target = tmp_path / "audit.csv"
    since = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    assert main(["--mappings", str(MAPPINGS), "--state-url", state_url, "audit", "export", "--csv", str(target),
                 "--connection", CONN, "--since", since]) == 0
    with target.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["event"], r["report_id"], r["entry_number"]) for r in rows] == [("posted", "R1", "26900001")]
    assert "wrote 1 audit event(s)" in capsys.readouterr().out
    assert main(["--mappings", str(MAPPINGS), "--state-url", state_url, "audit", "export", "--csv", "-"]) == 0
    everything = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["event"] for r in everything] == ["quarantined", "posted", "posted"]
    assert everything[0]["transaction_ids"] == "t1 t2"
    assert json.loads(everything[0]["detail"]) == {"reasons": [{"code": "UNKNOWN_COST_CENTER"}]}
    assert main(["--mappings", str(MAPPINGS), "--state-url", state_url, "audit", "export", "--csv", "-",
                 "--since", "yesterday"]) == 2


def test_quarantine_commands_answer_with_meaningful_exit_codes(store, state_url, capsys):
    _posted_and_changed(store)
    store.quarantine_put("other", "R1", partition_date=None, reasons=[{"code": "UNMAPPED_TAG"}],
                         transaction_ids=[], content_hash=None)
    cli = ["--mappings", str(MAPPINGS), "--state-url", state_url, "quarantine"]
    assert main([*cli, "show", "R404"]) == 4
    assert main([*cli, "show", "R1"]) == 2  # in two connections: which one?
    assert main([*cli, "show", "R1", "--connection", CONN]) == 0
    out = capsys.readouterr().out
    assert "CHANGED_AFTER_POSTING" in out and "approve with: expensify-exact quarantine approve R1" in out
    assert main([*cli, "approve", "R1", "--connection", "other"]) == 4  # not a changed report
    assert main([*cli, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(i["connection"], i["report_id"]) for i in listed} == {(CONN, "R1"), ("other", "R1")}
    assert "correction" not in listed[0]["reasons"][0]  # the drafted body is shown once, not per reason
    with pytest.raises(SystemExit) as exc:
        main([*cli, "--help"])
    assert exc.value.code == 0 and "5 replay ran but reports stay quarantined" in capsys.readouterr().out
