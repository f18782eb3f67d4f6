"""State store and vault: locks that span processes, a ledger that refuses double posting, secrets that stay secret."""

import multiprocessing
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.core.connections import StoredRateLimitBoard, StoredRequestLog, VaultTokenStore
from expensify_exact.errors import StateStoreError, VaultError
from expensify_exact.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    IntentKind,
    NewIntent,
    StateStore,
    rate_limits,
    schema_migrations,
)
from expensify_exact.store.vault import CredentialVault, Secret


def _enter_and_leave_under_lock(url: str, rounds: int) -> None:
    store = StateStore(url)
    for _ in range(rounds):
        with store.lock("shared"):
            store.audit("enter")
            time.sleep(0.005)
            store.audit("leave")


def test_lease_lock_is_exclusive_across_processes(state_url):
    StateStore(state_url)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_enter_and_leave_under_lock, args=(state_url, 15)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    events = [r["event"] for r in StateStore(state_url).audit_rows()]
    assert len(events) == 90
    # Under the lock, every "enter" is followed by its own "leave" before anyone else enters.
    assert events == ["enter", "leave"] * 45


def test_an_expired_lease_can_be_taken_over(store):
    assert store._try_lock("job", "crashed-owner", ttl_seconds=-1)
    with store.lock("job", wait_seconds=2):
        pass


def test_a_lock_held_by_a_killed_process_is_taken_over_without_waiting_for_its_lease(store):
    import signal
    import socket
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert store._try_lock("job", f"{socket.gethostname()}:{holder.pid}:abc", ttl_seconds=600)
    with pytest.raises(StateStoreError):
        with store.lock("job", wait_seconds=0.2):
            pass  # the holder is alive: the lease holds
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with store.lock("job", wait_seconds=2):
        pass


def test_a_held_lock_times_out_with_a_clear_error(store):
    assert store._try_lock("job", "other", ttl_seconds=60)
    with pytest.raises(StateStoreError, match="could not take the lock 'job'"):
        with store.lock("job", wait_seconds=0.2):
            pass


def test_ledger_refuses_a_new_intent_for_a_posted_report(store):
    write_post_intent(store, "c", "R1", "e1", partition_date="2026-11-01", transaction_ids=["t1"], total_cents=100)
    assert store.ledger_get("c", "R1").status == "pending"
    write_post_intent(store, "c", "R1", "e1b", partition_date="2026-11-01", transaction_ids=["t1"], total_cents=100)
    assert [(i.entry_id, i.status) for i in store.intents_for("c", "R1")] == [("e1b", "pending")]  # replaced
    store.intent_mark_posted("c", "R1", IntentKind.POST, "e1b", 26900001)
    row = store.ledger_get("c", "R1")
    assert (row.status, row.entry_number, row.transaction_ids) == ("posted", 26900001, ["t1"])
    with pytest.raises(StateStoreError, match="already posted"):
        write_post_intent(store, "c", "R1", "e2")


def write_post_intent(store, connection: str, report_id: str, entry_id: str, *, partition_date: str | None = None,
                      transaction_ids: tuple[str, ...] = (), total_cents: int = 1, run_id: str | None = None) -> None:
    """Record a post intent for `report_id` with a one-line body, as posting does before its POST."""
    body = {"JournalCode": "90", "GeneralJournalEntryLines": [{"Description": f"{report_id}/{entry_id}"}]}
    store.intents_write(connection, report_id, [NewIntent(IntentKind.POST, entry_id, "h-" + entry_id, body,
                                                          partition_date, list(transaction_ids), total_cents)],
                        run_id=run_id)


def test_quarantine_keeps_one_row_per_report(store):
    for _ in range(3):
        store.quarantine_put("c", "R1", partition_date="2026-11-01", reasons=[{"code": "UNMAPPED_CATEGORY"}],
                             transaction_ids=["t1"], content_hash=None)
    items = store.quarantine_items("c")
    assert len(items) == 1 and items[0].reasons == [{"code": "UNMAPPED_CATEGORY"}]
    assert store.quarantine_set_status("c", "R1", "resolved", "fixed mapping")
    assert store.quarantine_items("c") == []


def test_vault_round_trip_and_secrets_never_stored_in_plaintext(store):
    vault = CredentialVault(store)
    vault.set("conn", "exact_client_secret", "s3cr3t-value")
    assert vault.get("conn", "exact_client_secret") == "s3cr3t-value"
    assert "s3cr3t-value" not in store.get_secret("conn", "exact_client_secret")
    assert "s3cr3t" not in repr(vault.get("conn", "exact_client_secret"))
    assert repr(Secret("x")) == "Secret('***')"


def test_wrong_key_and_tampering_give_clear_errors(store):
    CredentialVault(store).set("conn", "name", "value")
    with pytest.raises(VaultError, match="key is wrong or the stored value was tampered"):
        CredentialVault(store, keys=[Fernet.generate_key()]).get("conn", "name")
    ciphertext = store.get_secret("conn", "name")
    store.put_secret("conn", "name", ciphertext[:-4] + "AAAA")
    with pytest.raises(VaultError, match="tampered"):
        CredentialVault(store).get("conn", "name")
    with pytest.raises(VaultError, match="is not set"):
        CredentialVault(store).get("conn", "missing")


def test_key_rotation_reencrypts_everything_and_old_key_alone_no_longer_needed(store):
    old = CredentialVault(store)
    old.set("conn", "a", "value-a")
    tokens = VaultTokenStore(store, old)
    from datetime import datetime, timezone
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    tokens.save("conn", ExactTokens("acc", "ref", now, now))
    new_key = Fernet.generate_key()
    assert old.rotate(new_key) == 2
    only_new = CredentialVault(store, keys=[new_key])
    assert only_new.get("conn", "a") == "value-a"
    assert VaultTokenStore(store, only_new).load("conn").refresh_token == "ref"


def test_missing_key_is_reported_with_what_to_do(monkeypatch, tmp_path):
    from expensify_exact.store.vault import load_keys

    monkeypatch.delenv("EXPENSIFY_EXACT_KEY")
    monkeypatch.setenv("EXPENSIFY_EXACT_KEY_FILE", str(tmp_path / "nope"))
    with pytest.raises(VaultError, match="secrets init-key"):
        load_keys()
    monkeypatch.setenv("EXPENSIFY_EXACT_KEY", "not-a-key")
    with pytest.raises(VaultError, match="not a valid Fernet key"):
        load_keys()


def check_rate_limit_board_round_trip(store: StateStore) -> None:
    """Shared by the SQLite and PostgreSQL tests: what one process publishes, another reads back unchanged."""
    at = datetime(2026, 11, 24, 8, 18, 25, 123000, tzinfo=timezone.utc)
    first = RateLimitSnapshot(at, 0, 60, datetime(2026, 11, 24, 8, 19, tzinfo=timezone.utc), 4321, 5000,
                              datetime(2026, 11, 25, tzinfo=timezone.utc))
    StoredRateLimitBoard(store, 123).save(first)
    assert StoredRateLimitBoard(store, 123).load() == first
    assert StoredRateLimitBoard(store, 456).load() is None  # another division has its own budgets
    newer = RateLimitSnapshot(at.replace(second=30), 59, 60, first.minutely_resets_at, None, None, None)
    StoredRateLimitBoard(store, 123).save(newer)
    assert StoredRateLimitBoard(store, 123).load() == newer


def test_rate_limit_board_round_trip(store):
    check_rate_limit_board_round_trip(store)


def check_request_log(store: StateStore) -> None:
    """Shared by the SQLite and PostgreSQL tests: requests come back in order, per scope, old ones pruned."""
    log, other = StoredRequestLog(store, "a"), StoredRequestLog(store, "b")
    t0 = datetime(2026, 11, 24, 8, 0, 0, 250000, tzinfo=timezone.utc)
    for seconds in (0, 30, 59, 61):
        log.add(t0 + timedelta(seconds=seconds), keep=timedelta(seconds=60))
    other.add(t0 + timedelta(seconds=60), keep=timedelta(seconds=60))
    assert log.since(t0) == [t0 + timedelta(seconds=s) for s in (30, 59, 61)]
    assert store.request_log_since("expensify:a", t0 - timedelta(days=1))[0] == t0 + timedelta(seconds=30), \
        "the request 61 s before the newest was pruned"
    assert other.since(t0) == [t0 + timedelta(seconds=60)]


def test_request_log(store):
    check_request_log(store)


def test_rate_limit_board_is_advisory_when_the_database_fails(store, caplog):
    board = StoredRateLimitBoard(store, 123)
    with store.engine.begin() as conn:
        rate_limits.drop(conn)
    assert board.load() is None
    board.save(RateLimitSnapshot(datetime.now(timezone.utc), 3, 60, None, None, None, None))
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert all("exact:division:123" in r.getMessage() for r in caplog.records)
    with store.engine.connect() as conn:
        assert not sa.inspect(conn).has_table("ee_rate_limits")


def test_connection_facts_round_trip_and_unknown_is_none(store):
    assert store.connection_fact_get("vh", "exact_keeps_client_entry_id") is None
    store.connection_fact_put("vh", "exact_keeps_client_entry_id", False, detail={"test_entry": "abc"})
    store.connection_fact_put("vh", "exact_keeps_client_entry_id", True)
    assert store.connection_fact_get("vh", "exact_keeps_client_entry_id") is True
    assert store.connection_fact_get("other", "exact_keeps_client_entry_id") is None
    [fact] = store.connection_facts("vh")
    assert fact["value"] is True and fact["recorded_at"] is not None


def test_error_budget_counts_per_scope_and_hour(store):
    hour = datetime(2026, 3, 10, 9, tzinfo=timezone.utc)
    scope = "exact:123456:generaljournalentry/GeneralJournalEntries"
    assert [store.error_budget_add(scope, hour, 500, "unbalanced") for _ in range(3)] == [1, 2, 3]
    assert store.error_budget_count(scope, hour) == 3
    assert store.error_budget_count(scope, hour + timedelta(hours=1)) == 0
    assert store.error_budget_count("exact:123456:financial/GLAccounts", hour) == 0
    [row] = store.error_budget_rows(hour)
    assert (row["errors"], row["last_status"], row["last_message"]) == (3, 500, "unbalanced")


def test_migration_4_adds_the_entry_id_columns_to_a_version_3_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ee_schema_migrations (version INTEGER PRIMARY KEY, "
                             "description VARCHAR(200) NOT NULL, applied_at DATETIME NOT NULL)"))
        conn.execute(sa.text("CREATE TABLE ee_posted_ledger (connection VARCHAR(100), report_id VARCHAR(64), "
                             "status VARCHAR(16) NOT NULL, content_hash VARCHAR(64) NOT NULL, entry_id VARCHAR(36) "
                             "NOT NULL, entry_number INTEGER, partition_date VARCHAR(10), transaction_ids TEXT NOT "
                             "NULL, total_cents BIGINT NOT NULL, intent_at DATETIME NOT NULL, posted_at DATETIME, "
                             "run_id VARCHAR(64), PRIMARY KEY (connection, report_id))"))
        for v in (1, 2, 3):
            conn.execute(sa.text("INSERT INTO ee_schema_migrations VALUES (:v, 'old', '2026-01-01')"), {"v": v})
    engine.dispose()
    store = StateStore(url)
    assert store.schema_version() == MIGRATIONS[-1][0]  # 4, and whatever came after
    write_post_intent(store, "c", "R1", "ours")
    store.intent_mark_posted("c", "R1", IntentKind.POST, "ours", 5, exact_entry_id="THEIRS")
    row = store.ledger_get("c", "R1")
    assert (row.entry_id, row.client_entry_id, row.status) == ("theirs", "ours", "posted")


def test_a_notification_is_claimed_once_released_on_failure_and_resent_only_when_forced(store):
    from expensify_exact.notify.mail import send_once

    sent: list[str] = []
    assert send_once(store, "digest:c:2026-11-03", kind="digest", connection="c", send=lambda: sent.append("a"))
    assert not send_once(store, "digest:c:2026-11-03", kind="digest", connection="c", send=lambda: sent.append("b"))

    def failing():
        raise OSError("server gone")

    with pytest.raises(OSError):
        send_once(store, "digest:c:2026-11-04", kind="digest", connection="c", send=failing)
    assert send_once(store, "digest:c:2026-11-04", kind="digest", connection="c", send=lambda: sent.append("c"))
    assert send_once(store, "digest:c:2026-11-03", kind="digest", connection="c", send=lambda: sent.append("d"),
                     force=True)
    assert sent == ["a", "c", "d"]
    assert [r["key"] for r in store.notifications_sent("digest", "c")] == ["digest:c:2026-11-04", "digest:c:2026-11-03"]


def test_a_claim_left_by_a_sender_that_died_is_taken_over_after_it_goes_stale(store):
    assert store.notification_claim("alert:x|email", kind="x", connection="c")
    assert not store.notification_claim("alert:x|email", kind="x", connection="c")  # someone is sending it
    assert store.notification_claim("alert:x|email", kind="x", connection="c", stale_after=timedelta(0))


def test_a_failing_webhook_never_puts_its_url_in_the_error():
    import httpx

    from expensify_exact.notify import NotificationError
    from expensify_exact.notify.chat import post_chat

    url = "https://hooks.slack.com/services/T0/B0/the-secret-token"
    for transport in (httpx.MockTransport(lambda r: httpx.Response(404, text="no_service")),
                      httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)))):
        with pytest.raises(NotificationError) as caught:
            post_chat(url, {"text": "x"}, transport=transport)
        assert "the-secret-token" not in str(caught.value) and "hooks.slack.com" not in str(caught.value)


def _store_at(url: str, newest: int) -> None:
    """A state database as a connector whose newest migration was `newest` left it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema_migrations.create(conn)
        for version, description, tables in MIGRATIONS:
            if version > newest:
                continue
            for table in tables:
                table.create(conn, checkfirst=True)
            conn.execute(schema_migrations.insert().values(version=version, description=description,
                                                           applied_at=datetime.now(timezone.utc)))
    engine.dispose()


def test_a_version_5_database_gets_the_notifications_table_and_the_newest_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'v5.db'}"
    _store_at(url, 5)
    assert not sa.inspect(sa.create_engine(url)).has_table("ee_notifications")
    store = StateStore(url)
    assert store.schema_version() == SCHEMA_VERSION == max(v for v, _, _ in MIGRATIONS)
    assert store.notification_claim("digest:c:2026-11-03", kind="digest", connection="c")
    with store.engine.connect() as conn:
        applied = {row.version for row in conn.execute(sa.select(schema_migrations.c.version))}
    assert applied == {v for v, _, _ in MIGRATIONS}
    store.dispose()


def test_a_migration_numbered_below_the_newest_applied_one_is_still_applied(tmp_path):
    """Branches take migration numbers in advance, so one can arrive after a higher number ran (a gap filled
    later): migrate() applies every listed version the database lacks, not only those above its newest."""
    url = f"sqlite:///{tmp_path / 'gap.db'}"
    StateStore(url).dispose()
    below = [v for v, _, _ in MIGRATIONS if v < SCHEMA_VERSION][-1]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version == below))
        for table in dict((v, t) for v, _, t in MIGRATIONS)[below]:
            table.drop(conn)
    engine.dispose()
    store = StateStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {t.name for t in dict((v, t) for v, _, t in MIGRATIONS)[below]} <= tables
    store.dispose()
