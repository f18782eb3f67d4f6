"""The overview of all connections on a seeded state store: each field from the table it comes from, the verdict and
its reasons, worst first, the totals, and a fixed number of queries however many connections there are."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.config import ProjectConfig, load_project_config
from expensify_exact.core.connections import StoredRateLimitBoard, VaultTokenStore
from expensify_exact.core.overview import Concern, Health, connection_overview, record_run, totals
from expensify_exact.store import IntentKind, NewIntent, QuarantineStatus
from expensify_exact.store.vault import CredentialVault
from tests.conftest import MAPPINGS

# The store stamps what it records with the wall clock, so the overview's clock reads it too.
NOW = datetime.now(timezone.utc).replace(microsecond=0)
YESTERDAY = (NOW.astimezone(ZoneInfo("Europe/Amsterdam")).date() - timedelta(days=1)).isoformat()
DAY_BEFORE = (date.fromisoformat(YESTERDAY) - timedelta(days=1)).isoformat()
RESETS = (NOW + timedelta(hours=16)).replace(minute=0, second=0)


class FixedClock:
    def now(self) -> datetime:
        return NOW

    def sleep(self, seconds: float) -> None:
        raise AssertionError("the overview never waits")


def many(n: int, **timezones: str) -> ProjectConfig:
    """The shipped connection cloned `n` times as c000, c001, … each with its own division (1000 + index)."""
    base = load_project_config(MAPPINGS)
    first = base.connections[0]
    conns = [first.model_copy(update={"name": f"c{i:03d}", "timezone": timezones.get(f"c{i:03d}", first.timezone),
                                      "exact": first.exact.model_copy(update={"division": 1000 + i})})
             for i in range(n)]
    return base.model_copy(update={"connections": conns})


def post(store, connection: str, report_id: str, day: str, *, settle: bool = True) -> None:
    store.intents_write(connection, report_id, [NewIntent(IntentKind.POST, f"{report_id}-entry", "hash", {}, day,
                                                          ["t1"], 1000)], run_id="run-1")
    if settle:
        store.intent_mark_posted(connection, report_id, IntentKind.POST, f"{report_id}-entry", 1)


def tokens(store, connection: str, issued: datetime) -> None:
    VaultTokenStore(store, CredentialVault(store)).save(
        connection, ExactTokens("access-token-value", "refresh-token-value", access_expires_at=issued + timedelta(minutes=10),
                                issued_at=issued))


def budget(store, division: int, remaining: int, resets: datetime, limit: int = 5000) -> None:
    StoredRateLimitBoard(store, division).save(RateLimitSnapshot(NOW - timedelta(minutes=5), 50, 60,
                                                                 NOW + timedelta(seconds=20), remaining, limit, resets))


def by_name(rows):
    return {row.connection: row for row in rows}


def test_a_healthy_connection_shows_yesterdays_posts_token_age_budget_and_last_run(store):
    config = many(1)
    for n in range(3):
        post(store, "c000", f"R{n}", YESTERDAY)
    post(store, "c000", "R-older", DAY_BEFORE)
    tokens(store, "c000", NOW - timedelta(days=2, hours=12))
    budget(store, 1000, 4200, RESETS)
    record_run(store, "c000", "run-1", [YESTERDAY, DAY_BEFORE], counts={"posted": 3, "quarantined": 0})

    [row] = connection_overview(config, store, FixedClock())
    assert row.health is Health.OK and row.findings == () and row.why == ""
    assert (row.yesterday, row.posted_yesterday, row.pending_intents) == (YESTERDAY, 3, 0)
    assert row.token_age_days == pytest.approx(2.5)
    assert (row.budget.remaining_daily, row.budget.daily_limit, row.budget.daily_resets_at) == (4200, 5000, RESETS)
    assert row.budget.remaining_minutely == 50
    assert (row.last_run.run_id, row.last_run.outcome, row.last_run.days) == ("run-1", "ok", f"{DAY_BEFORE}..{YESTERDAY}")
    assert row.last_run.counts == {"posted": 3, "quarantined": 0}
    shown = row.as_dict()
    assert shown["health"] == "ok" and shown["budget"]["remaining_daily"] == 4200
    assert "token-value" not in str(shown), "no token, only its age"


def test_yesterday_is_the_day_before_today_in_each_connections_own_zone(store):
    # Kiritimati (UTC+14) is always at least a day ahead of Pago Pago (UTC-11).
    config = many(2, c000="Pacific/Kiritimati", c001="Pacific/Pago_Pago")
    ahead = (NOW.astimezone(ZoneInfo("Pacific/Kiritimati")).date() - timedelta(days=1)).isoformat()
    behind = (NOW.astimezone(ZoneInfo("Pacific/Pago_Pago")).date() - timedelta(days=1)).isoformat()
    post(store, "c000", "A", ahead)
    post(store, "c000", "B", behind)
    post(store, "c001", "C", behind)
    post(store, "c001", "D", ahead)
    post(store, "c001", "E", behind)
    rows = by_name(connection_overview(config, store, FixedClock()))
    assert (rows["c000"].yesterday, rows["c000"].posted_yesterday) == (ahead, 1)
    assert (rows["c001"].yesterday, rows["c001"].posted_yesterday) == (behind, 2)


def test_open_quarantine_is_counted_per_report_and_per_reason(store):
    config = many(1)
    put = store.quarantine_put
    put("c000", "Q1", partition_date=YESTERDAY, transaction_ids=["t"], content_hash="h", reasons=[
        {"code": "UNMAPPED_CATEGORY", "transaction_id": "t1"}, {"code": "UNMAPPED_CATEGORY", "transaction_id": "t2"},
        {"code": "UNKNOWN_COST_CENTER", "transaction_id": "t1"}])
    put("c000", "Q2", partition_date=YESTERDAY, transaction_ids=["t"], content_hash="h",
        reasons=[{"code": "UNMAPPED_CATEGORY"}])
    put("c000", "Q3", partition_date=YESTERDAY, transaction_ids=["t"], content_hash="h",
        reasons=[{"code": "CLOSED_PERIOD"}])
    store.quarantine_close("c000", "Q3", QuarantineStatus.RESOLVED, "fixed")
    tokens(store, "c000", NOW - timedelta(days=1))
    record_run(store, "c000", "run-1", [YESTERDAY], counts={"quarantined": 2})

    [row] = connection_overview(config, store, FixedClock())
    assert row.quarantine_open == 2
    assert row.quarantine_by_reason == {"UNKNOWN_COST_CENTER": 1, "UNMAPPED_CATEGORY": 2}
    assert row.health is Health.ATTENTION and [f.concern for f in row.findings] == [Concern.QUARANTINE_OPEN]


@pytest.mark.parametrize(("age_days", "concern", "health"), [
    (24, None, Health.OK),
    (26, Concern.TOKEN_OLD, Health.ATTENTION),
    (31, Concern.TOKEN_EXPIRED, Health.FAILING),
])
def test_the_refresh_token_age_is_judged_by_exacts_30_day_idle_expiry(store, age_days, concern, health):
    config = many(1)
    tokens(store, "c000", NOW - timedelta(days=age_days))
    record_run(store, "c000", "run-1", [YESTERDAY])
    [row] = connection_overview(config, store, FixedClock())
    assert row.token_age_days == pytest.approx(age_days)
    assert [f.concern for f in row.findings] == ([concern] if concern else [])
    assert row.health is health


def test_a_refresh_token_stored_but_never_exchanged_has_no_age_and_no_tokens_at_all_is_failing(store):
    config = many(2)
    tokens(store, "c000", datetime(2000, 1, 1, tzinfo=timezone.utc))  # as `secrets set --from-env` stores it
    for name in ("c000", "c001"):
        record_run(store, name, "run-1", [YESTERDAY])
    rows = by_name(connection_overview(config, store, FixedClock()))
    assert rows["c000"].token_age_days is None and rows["c000"].health is Health.OK
    assert [f.concern for f in rows["c001"].findings] == [Concern.NO_TOKENS]
    assert "expensify-exact authorize --connection c001" in rows["c001"].why


def test_the_last_run_is_the_runs_own_record_or_else_the_newest_closed_day_it_posted(store):
    config = many(4)
    for name in ("c000", "c001", "c002", "c003"):
        tokens(store, name, NOW - timedelta(days=1))
    record_run(store, "c000", "run-9", [YESTERDAY], failed="journal_drafts: ReadTimeout: Exact did not answer")
    record_run(store, "c001", "run-9", [YESTERDAY], counts={"posted": 4, "deferred": 6},
               stopped="Exact's daily budget is spent; 6 report(s) deferred until 2026-11-26 00:00")
    store.day_mark_posted("c002", YESTERDAY, "run-8")
    store.day_mark_posted("c002", DAY_BEFORE, "run-7")

    rows = by_name(connection_overview(config, store, FixedClock()))
    failed = rows["c000"]
    assert (failed.health, failed.last_run.outcome, failed.last_run.run_id) == (Health.FAILING, "failed", "run-9")
    assert failed.why == "last run failed: journal_drafts: ReadTimeout: Exact did not answer"
    stopped = rows["c001"]
    assert stopped.health is Health.ATTENTION and "daily budget is spent" in stopped.why
    day = rows["c002"]
    assert (day.last_run.outcome, day.last_run.run_id, day.last_run.days) == ("day posted", "run-8", YESTERDAY)
    assert [f.concern for f in rows["c003"].findings] == [Concern.NEVER_RUN]

    # A later run that posted a closed day supersedes the failed one's record.
    store.day_mark_posted("c000", YESTERDAY, "run-10")
    assert by_name(connection_overview(config, store, FixedClock()))["c000"].health is Health.OK


def test_a_run_older_than_a_day_and_a_bit_is_overdue(store, monkeypatch):
    config = many(1)
    tokens(store, "c000", NOW - timedelta(days=1))
    record_run(store, "c000", "run-1", [YESTERDAY])

    class Later(FixedClock):
        def now(self):
            return NOW + timedelta(hours=31)

    assert connection_overview(config, store, FixedClock())[0].health is Health.OK
    [row] = connection_overview(config, store, Later())
    assert [f.concern for f in row.findings] == [Concern.RUN_OVERDUE] and row.why == "last run 31 h ago"


def test_the_budget_is_nearly_spent_below_a_tenth_of_the_daily_limit_and_forgotten_once_it_reset(store):
    config = many(3)
    budget(store, 1000, 499, RESETS)
    budget(store, 1001, 500, RESETS)
    budget(store, 1002, 3, NOW - timedelta(minutes=1))  # that day's budget has reset since
    for name in ("c000", "c001", "c002"):
        tokens(store, name, NOW - timedelta(days=1))
        record_run(store, name, "run-1", [YESTERDAY])
    rows = by_name(connection_overview(config, store, FixedClock()))
    assert [f.concern for f in rows["c000"].findings] == [Concern.BUDGET_LOW]
    assert rows["c000"].why == f"Exact budget 499/5000 calls left today, resets {RESETS:%Y-%m-%d %H:%M}Z"
    assert rows["c001"].findings == ()
    assert rows["c002"].budget.remaining_daily is None and rows["c002"].findings == ()


def test_rows_come_worst_first_and_the_totals_add_them_up(store):
    config = many(4)
    for name in ("c000", "c001", "c002", "c003"):
        tokens(store, name, NOW - timedelta(days=1))
        record_run(store, name, "run-1", [YESTERDAY])
    post(store, "c000", "R1", YESTERDAY)
    post(store, "c000", "R2", YESTERDAY)
    post(store, "c001", "P1", YESTERDAY, settle=False)  # an intent whose outcome was never heard
    store.quarantine_put("c002", "Q1", partition_date=YESTERDAY, transaction_ids=["t"], content_hash="h",
                         reasons=[{"code": "UNMAPPED_CATEGORY"}])
    record_run(store, "c003", "run-2", [YESTERDAY], failed="raw_reports: HTTPError 500")
    store.deferred_put("c001", {"D1": YESTERDAY}, None)

    rows = connection_overview(config, store, FixedClock())
    assert [(r.connection, r.health) for r in rows] == [
        ("c003", Health.FAILING), ("c002", Health.ATTENTION), ("c001", Health.ATTENTION), ("c000", Health.OK)]
    assert rows[2].pending_intents == 1 and rows[2].deferred_reports == 1
    total = totals(rows)
    assert total.as_dict() == {
        "connections": 4, "by_health": {"ok": 1, "attention": 2, "failing": 1}, "posted_yesterday": 2,
        "quarantine_open": 1, "quarantine_by_reason": {"UNMAPPED_CATEGORY": 1},
        "by_concern": {"pending_intents": 1, "quarantine_open": 1, "run_failed": 1},
        "pending_intents": 1, "deferred_reports": 1}


def test_connections_no_longer_configured_are_left_out_though_their_records_stay(store):
    post(store, "removed", "R1", YESTERDAY)
    record_run(store, "removed", "run-1", [YESTERDAY])
    assert [r.connection for r in connection_overview(many(1), store, FixedClock())] == ["c000"]
    assert store.ledger_get("removed", "R1") is not None


def _queries(store, config) -> tuple[int, list]:
    count = 0

    def counted(*_):
        nonlocal count
        count += 1

    sa.event.listen(store.engine, "before_cursor_execute", counted)
    try:
        rows = connection_overview(config, store, FixedClock())
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", counted)
    return count, rows


def test_500_connections_cost_the_same_handful_of_queries_as_one(store):
    few = many(1)
    tokens(store, "c000", NOW - timedelta(days=1))
    one, _ = _queries(store, few)

    config = many(500)
    for i, conn in enumerate(config.connections):
        post(store, conn.name, "R1", YESTERDAY, settle=i % 7 != 0)
        if i % 5 == 0:
            store.quarantine_put(conn.name, "Q1", partition_date=YESTERDAY, transaction_ids=["t"],
                                 content_hash="h", reasons=[{"code": "UNMAPPED_CATEGORY"}])
        if i % 3 == 0:
            record_run(store, conn.name, f"run-{i}", [YESTERDAY])
        store.day_mark_posted(conn.name, YESTERDAY, "run-0")
        budget(store, conn.exact.division, 4000 - i, RESETS)
    tokens(store, "c499", NOW - timedelta(days=27))
    count, rows = _queries(store, config)
    assert count == one <= 8
    assert len(rows) == 500
    total = totals(rows)
    assert total.posted_yesterday == 500 - 72 and total.pending_intents == 72 and total.quarantine_open == 100
    assert total.by_health == {"ok": 0, "attention": 2, "failing": 498}  # only c000 and c499 have tokens
    assert {row.connection for row in rows[-2:]} == {"c000", "c499"}
