"""Which days the sensors ask for: the closed day with its look-back, deferred days after Exact's reset, and the
day whose look-back window has closed for reconciliation."""

from datetime import date, datetime, timedelta, timezone

import pytest

from expensify_exact.config import load_project_config
from expensify_exact.core.days import daily_run, deferred_run, reconciliation_day
from expensify_exact.core.posting import forget_vanished_deferrals
from expensify_exact.store import StateStore
from tests.conftest import MAPPINGS

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, state_url):
    """The state on the embedded SQLite default and on PostgreSQL."""
    store = StateStore(state_url if request.param == "sqlite" else request.getfixturevalue("pg_database"))
    yield store
    store.dispose()


def _conn(**posting):
    conn = load_project_config(str(MAPPINGS)).connections[0]
    return conn.model_copy(update={"posting": conn.posting.model_copy(update=posting)})


def test_the_look_back_is_configurable_and_never_reaches_before_the_first_partition():
    run = daily_run(_conn(lookback_days=5, grace_hours=0), T0, date(2024, 1, 1))
    assert (run.start, run.end, run.key) == (date(2026, 11, 19), date(2026, 11, 24), "vermeerhals-nl:2026-11-24")
    assert daily_run(_conn(), T0, date(2026, 11, 23)).start == date(2026, 11, 23)
    assert daily_run(_conn(), T0, date(2026, 11, 25)) is None


def test_deferred_days_are_asked_for_once_the_budget_has_reset(store):
    conn = _conn()
    assert deferred_run(conn, store, T0) is None
    reset = datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc)
    store.deferred_put(conn.name, {"R1": "2026-10-02", "R2": "2026-10-09"}, reset)
    assert deferred_run(conn, store, T0) is None  # still the old budget
    run = deferred_run(conn, store, reset + timedelta(minutes=1))
    assert (run.start, run.end) == (date(2026, 10, 2), date(2026, 10, 9))
    assert run.key.startswith(f"{conn.name}:deferred:{reset.isoformat()}:")
    # Deferred again by that run (the budget ran out again): the next reset is a run of its own.
    later = reset + timedelta(days=1)
    store.deferred_put(conn.name, {"R2": "2026-10-09"}, later)
    assert deferred_run(conn, store, reset + timedelta(minutes=1)).end == date(2026, 10, 2)  # R1 only
    store.deferred_clear(conn.name, ["R1"])
    assert deferred_run(conn, store, reset + timedelta(minutes=1)) is None
    assert deferred_run(conn, store, later).key.startswith(f"{conn.name}:deferred:{later.isoformat()}:")
    store.deferred_clear(conn.name, ["R2"])
    assert deferred_run(conn, store, later) is None


def test_reconciliation_waits_for_the_look_back_window_to_close(store):
    conn = _conn(lookback_days=3)
    assert reconciliation_day(conn, store) is None
    store.day_mark_posted(conn.name, "2026-11-24", "run-1")
    first = store.days_posted(conn.name)["2026-11-24"]
    store.day_mark_posted(conn.name, "2026-11-24", "run-2")  # a rerun keeps the first time
    store.day_mark_posted(conn.name, "2026-11-23", "run-0")
    assert store.days_posted(conn.name, ["2026-11-24"]) == {"2026-11-24": first}
    assert reconciliation_day(conn, store) == date(2026, 11, 21)
    assert store.last_day_posted(conn.name)[0] == "2026-11-24"


def test_a_deferred_report_no_longer_in_its_days_export_is_dropped_not_rerun_forever(store):
    store.deferred_put("c", {"R1": "2026-10-02", "R2": "2026-10-02", "R3": "2026-10-09"}, None)
    assert forget_vanished_deferrals(store, "c", ["2026-10-02"], {"R2"}, "run-1") == ["R1"]
    assert set(store.deferred("c")) == {"R2", "R3"}
    assert [r["event"] for r in store.audit_rows("c")] == ["deferral_dropped"]
