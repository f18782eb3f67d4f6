"""Two Dagster runs at once against one Exact division, on production storage, with the sandbox's rate limit on.

Each run is its own OS process on one PostgreSQL-backed Dagster instance whose pools have a limit of 1 (as in the
shipped dagster.yaml). The division's pool must serialize their Exact steps, the budgets shared in the state DB must
keep a run that starts in a used-up minute from even trying, and the overlapping windows must still post every
report exactly once. The runs' waits move the sandbox's simulated clock, so minutes of rate-limit waiting take
no real time.
"""

import multiprocessing
import os
from datetime import date, timedelta

import dagster as dg
import pytest
import yaml

from expensify_exact.defs.keys import asset_key, slug
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed
from tests.dagster.test_end_to_end import CONNECTION, _expected_report_ids, _window
from tests.factories import run_cli

pytestmark = pytest.mark.postgres

MINUTELY_LIMIT = 7  # what one dimension snapshot takes (system/Divisions + six reads): each run ends a minute


def _run_in_own_process(dagster_home: str, key: str, mappings_dir: str, state_url: str, sandbox_url: str,
                        start: date, end: date, barrier, results) -> None:
    os.environ["DAGSTER_HOME"] = dagster_home
    os.environ["EXPENSIFY_EXACT_KEY"] = key
    from expensify_exact.core import connections
    from expensify_exact.defs.runs import run_range
    from expensify_exact_sandbox.clock import RemoteSandboxClock

    # The clients this process builds wait on the sandbox's simulated clock instead of the wall clock.
    connections.SystemClock = lambda: RemoteSandboxClock(sandbox_url)
    barrier.wait(timeout=180)  # both processes have imported Dagster: start the runs together
    with dg.DagsterInstance.get() as instance:
        summary = run_range(start, end, mappings_dir=mappings_dir, state_url=state_url, instance=instance)
    results.put(summary.as_json())


def _step_spans(instance: dg.DagsterInstance, run_id: str, step_keys: set[str]) -> list[tuple[float, float, str]]:
    starts, ends = {}, {}
    for record in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                     dg.DagsterEventType.STEP_SUCCESS,
                                                     dg.DagsterEventType.STEP_FAILURE}):
        event = record.dagster_event
        if event.step_key in step_keys:
            (starts if event.event_type == dg.DagsterEventType.STEP_START else ends)[event.step_key] = record.timestamp
    assert set(starts) == set(ends) == step_keys, f"run {run_id} did not run all of {sorted(step_keys)}"
    return [(starts[k], ends[k], f"{run_id[:8]}:{k}") for k in step_keys]


def test_two_concurrent_runs_on_one_division_stay_inside_its_minute_limit(sandbox, sandbox_mappings, pg_database,
                                                                          tmp_path, monkeypatch):
    state_url = pg_database
    assert run_cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    sandbox.exact.set_knobs(minutely_limit=MINUTELY_LIMIT)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"postgres": {"postgres_url": pg_database}},
        "concurrency": {"pools": {"default_limit": 1}},  # as the shipped dagster.yaml
        "telemetry": {"enabled": False},
    }))
    start, end = _window(sandbox)
    middle = start + (end - start) / 2
    # Overlapping windows, as when a backfill is started while the daily schedule runs.
    windows = [(start, middle + timedelta(days=3)), (middle - timedelta(days=3), end)]

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(windows)), ctx.Queue()
    workers = [ctx.Process(target=_run_in_own_process,
                           args=(str(home), os.environ["EXPENSIFY_EXACT_KEY"], str(sandbox_mappings), state_url,
                                 sandbox.exact_url, a, b, barrier, results)) for a, b in windows]
    for worker in workers:
        worker.start()
    summaries = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    assert all(s["success"] for s in summaries), [s["failure"] for s in summaries]
    conn = seed.DIVISION
    stats = sandbox.exact.stats
    # Never over the limit, and never even a refused call: the second run knew the minute was used up.
    assert stats["max_calls_per_minute"][str(conn)] <= MINUTELY_LIMIT
    assert stats["rate_limited"] == {"minutely": 0, "daily": 0}
    assert stats["statuses"].get("429", 0) == 0
    rate_counted = sum(v for k, v in stats["calls"].items() if "oauth2" not in k and "current/Me" not in k)
    assert rate_counted > 4 * MINUTELY_LIMIT, "the runs together needed several minutes of allowance"

    # Exactly once across both runs: every approved report of the window is posted once or quarantined.
    expected = _expected_report_ids(sandbox, start, end) - {seed._report_id(101), seed._report_id(102)}
    posted = [r for s in summaries for r in s["connections"][CONNECTION]["posted"]]
    assert sorted(posted) == sorted(expected), "each report posted by exactly one of the runs"
    entries = sandbox.exact.entries(seed.DIVISION)
    assert len(entries) == len(expected)
    assert {r.report_id for r in StateStore(state_url).ledger_rows(CONNECTION, status="posted")} == expected

    # The division's pool let one Exact step run at a time, while the runs themselves overlapped.
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        run_ids = [s["run_id"] for s in summaries]
        exact_steps = {f"{slug(CONNECTION)}__exact_dimensions",
                       asset_key(CONNECTION, "exact", "journal_entries_posted").to_python_identifier()}
        spans = sorted(span for run_id in run_ids for span in _step_spans(instance, run_id, exact_steps))
        for (_, first_end, first), (second_start, _, second) in zip(spans, spans[1:]):
            assert first_end <= second_start, f"{first} and {second} called Exact at the same time"
        records = [instance.get_run_record_by_id(run_id) for run_id in run_ids]
        (a_start, a_end), (b_start, b_end) = ((r.start_time, r.end_time) for r in records)
        assert a_start < b_end and b_start < a_end, "the two runs did not overlap in time"
