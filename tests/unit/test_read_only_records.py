"""The records a dry run's API clients share: they see what other runs recorded, and what they add stays in memory."""

from datetime import datetime, timedelta, timezone

from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.core.connections import (
    ReadOnlyRecords,
    StoredErrorBudget,
    StoredRateLimitBoard,
    StoredRequestLog,
)
from expensify_exact.core.snapshots import DivisionChecks
from tests.factories import FakeClock, state_rows

NOW = datetime(2026, 11, 25, 10, 30, tzinfo=timezone.utc)


def test_a_dry_runs_clients_read_every_shared_record_and_write_none(store, state_url):
    clock = FakeClock(NOW)
    # What a real run recorded: one error on the endpoint this hour and two Expensify requests.
    StoredErrorBudget(store, 1, clock).add("financial/GLAccounts", 400, "Bad Request")
    StoredRequestLog(store, "c").add(NOW - timedelta(seconds=5), timedelta(minutes=1))
    StoredRequestLog(store, "c").add(NOW - timedelta(seconds=4), timedelta(minutes=1))
    before = state_rows(state_url)

    records = ReadOnlyRecords(store)
    budget, log = StoredErrorBudget(records, 1, clock), StoredRequestLog(records, "c")
    assert budget.spent("financial/GLAccounts") == 1, "a dry run stops where any run would"
    assert budget.add("financial/GLAccounts", 400, "Bad Request") == 2
    assert budget.spent("financial/GLAccounts") == 2, "and counts its own errors on top"
    log.add(NOW, timedelta(minutes=1))
    assert len(log.since(NOW - timedelta(seconds=10))) == 3, "its own requests count in Expensify's windows"
    division = DivisionChecks(records, 1, clock)
    assert not division.fresh()
    division.record()
    assert division.fresh()
    board = StoredRateLimitBoard(records, 1)
    assert board.load() is None
    seen = RateLimitSnapshot(NOW, 42, 60, NOW + timedelta(seconds=30), 4000, 5000, NOW + timedelta(hours=10))
    board.save(seen)
    assert board.load() == seen

    assert state_rows(state_url) == before, "nothing of it reached the state DB"
    assert StoredErrorBudget(store, 1, clock).spent("financial/GLAccounts") == 1
