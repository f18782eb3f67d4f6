"""Production mode: the connector's own state on the real PostgreSQL server, with the same code as SQLite."""

import multiprocessing

import pytest

from expensify_exact.errors import StateStoreError
from expensify_exact.store import SCHEMA_VERSION, IntentKind, StateStore
from expensify_exact.store.vault import CredentialVault
from tests.unit.test_state_and_vault import (
    _enter_and_leave_under_lock,
    check_rate_limit_board_round_trip,
    check_request_log,
    write_post_intent,
)

pytestmark = pytest.mark.postgres


def test_migrations_apply_once_and_are_recorded(pg_database):
    assert StateStore(pg_database).schema_version() == SCHEMA_VERSION
    assert StateStore(pg_database).migrate() == SCHEMA_VERSION  # idempotent on a second start


def test_lease_lock_is_exclusive_across_processes_on_postgres(pg_database):
    StateStore(pg_database)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_enter_and_leave_under_lock, args=(pg_database, 10)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    events = [r["event"] for r in StateStore(pg_database).audit_rows()]
    assert events == ["enter", "leave"] * 30


def test_ledger_quarantine_and_vault_on_postgres(pg_database):
    store = StateStore(pg_database)
    write_post_intent(store, "c", "R1", "e1", partition_date="2026-11-01", transaction_ids=["t1"], total_cents=100)
    store.intent_mark_posted("c", "R1", IntentKind.POST, "e1", 7)
    with pytest.raises(StateStoreError):
        write_post_intent(store, "c", "R1", "e2")
    store.quarantine_put("c", "R2", partition_date=None, reasons=[{"code": "UNMAPPED_TAG"}], transaction_ids=[],
                         content_hash=None)
    assert [i.report_id for i in store.quarantine_items("c")] == ["R2"]
    vault = CredentialVault(store)
    vault.set("c", "exact_client_secret", "pg-secret")
    assert vault.get("c", "exact_client_secret") == "pg-secret"


def test_rate_limit_board_round_trip_on_postgres(pg_database):
    check_rate_limit_board_round_trip(StateStore(pg_database))


def test_request_log_on_postgres(pg_database):
    check_request_log(StateStore(pg_database))
