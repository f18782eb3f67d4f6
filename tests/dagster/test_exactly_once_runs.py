"""Exactly-once through Dagster runs: a partition rerun, overlapping backfills (one after the other, and at the
same time, in two processes against one state DB), and a report edited and re-approved after it was posted each post nothing twice.
The edited report ends as CHANGED_AFTER_POSTING with a drafted correction; `quarantine approve` then posts the
reversal and the corrected entry once, and the `replay_quarantine` job and its sensor post a fixed report once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from expensify_exact.definitions import build_defs
from expensify_exact.defs.replay import REPLAY_JOB_NAME, SENSOR_NAME
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.defs.runs import run_range
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from tests.crash.driver import report_of_entry
from tests.factories import run_cli as _cli

CONNECTION = "vermeerhals-nl"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
GIFTS, EINDHOVEN = S._report_id(101), S._report_id(102)
PROBLEMS = {GIFTS, EINDHOVEN}  # the demo's two seeded problems: quarantined, never posted


# Strict (Exact assigns its own EntryIDs) is the default everywhere; the lenient mode runs with the slow proofs.
@pytest.fixture(params=[pytest.param(False, id="exact-assigns-entry-ids"),
                        pytest.param(True, id="exact-keeps-entry-ids", marks=pytest.mark.slow)])
def authorized(request, sandbox, sandbox_mappings, state_url):
    # Rate limits are not on trial here; with them, every run would wait out Exact's minute. Every test runs in both
    # EntryID modes (exact-online.md §13): Exact assigning its own (the sandbox default) and keeping ours.
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=10_000, keep_client_entry_ids=request.param)
    assert _cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    return sandbox_mappings


def _instance(tmp_path, name: str):
    (tmp_path / name).mkdir(exist_ok=True)
    return dg.instance_for_test(temp_dir=str(tmp_path / name))


def _approval_day(report) -> date:
    return report.approved.replace(tzinfo=ZoneInfo("UTC")).astimezone(AMSTERDAM).date()


def _expected(sandbox, start: date, end: date) -> set[str]:
    return {r.report_id for r in sandbox.seed.approved_reports if start <= _approval_day(r) <= end}


def _assert_each_report_once_and_ledger_matches(sandbox, state_url: str) -> Counter:
    entries = sandbox.exact.entries(S.DIVISION)
    per_report = Counter(report_of_entry(e) for e in entries)
    assert {r: n for r, n in per_report.items() if n > 1} == {}, "a report was posted twice"
    store = StateStore(state_url)
    ledger = store.ledger_rows(CONNECTION)
    store.dispose()
    assert [r.report_id for r in ledger if r.status != "posted"] == []
    assert {(r.report_id, r.entry_id.lower()) for r in ledger} == \
        {(report_of_entry(e), e["EntryID"].lower()) for e in entries}
    return per_report


def test_rerunning_a_partition_posts_nothing_twice(sandbox, authorized, state_url, tmp_path):
    day = sandbox.seed.today - timedelta(days=3)
    with _instance(tmp_path, "home") as instance:
        first = run_range(day, day, mappings_dir=str(authorized), state_url=state_url, instance=instance)
        again = run_range(day, day, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert first.success and again.success, (first.failure, again.failure)
    posted = set(first.outcomes.loc[first.outcomes["outcome"] == "posted", "report_id"])
    assert posted == _expected(sandbox, day, day) and posted
    assert (again.outcomes["outcome"] == "already_posted").all()
    assert set(_assert_each_report_once_and_ledger_matches(sandbox, state_url)) == posted


@pytest.mark.parametrize("faults", [("store_then_drop", "store_then_http_500"),
                                    ("store_then_timeout", "http_503_before_store", "drop_before_store")])
def test_answers_lost_after_exact_stored_the_entry_post_nothing_twice(sandbox, authorized, state_url, tmp_path,
                                                                      faults):
    end = sandbox.seed.today - timedelta(days=1)
    start = end - timedelta(days=6)
    sandbox.exact.set_knobs(timeout_seconds=0.2)
    for fault in faults:
        sandbox.faults.arm("exact.post_entry", fault, times=2)
    with _instance(tmp_path, "home") as instance:
        runs = [run_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)]
        while (runs[-1].outcomes["outcome"] == "deferred").any():  # no certain answer: the next run settles it
            assert len(runs) < 4, "deferred reports never settled"
            runs.append(run_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance))
    assert all(r.success for r in runs), [r.failure for r in runs]
    assert sandbox.faults.fired and not sandbox.faults.take("exact.post_entry")
    posted = set(_assert_each_report_once_and_ledger_matches(sandbox, state_url))
    assert posted == _expected(sandbox, start, end) - PROBLEMS


def test_overlapping_backfills_one_after_the_other_post_the_overlap_once(sandbox, authorized, state_url, tmp_path):
    end = sandbox.seed.today - timedelta(days=1)
    first_range, second_range = (end - timedelta(days=12), end - timedelta(days=5)), (end - timedelta(days=8), end)
    with _instance(tmp_path, "home") as instance:
        first = run_range(*first_range, mappings_dir=str(authorized), state_url=state_url, instance=instance)
        second = run_range(*second_range, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert first.success and second.success, (first.failure, second.failure)
    overlap = _expected(sandbox, second_range[0], first_range[1]) - PROBLEMS
    assert overlap and overlap <= set(second.outcomes.loc[second.outcomes["outcome"] == "already_posted", "report_id"])
    assert not overlap & set(second.outcomes.loc[second.outcomes["outcome"] == "posted", "report_id"])
    per_report = _assert_each_report_once_and_ledger_matches(sandbox, state_url)
    assert set(per_report) == _expected(sandbox, first_range[0], end) - PROBLEMS


def _backfill_in_own_process(fernet_key: str, mappings: str, state_url: str, home: str, start: date, end: date,
                             barrier, out_path: str) -> None:
    """One deployment's backfill: its own process and Dagster instance, sharing the sandbox and the state DB."""
    os.environ["EXPENSIFY_EXACT_KEY"] = fernet_key
    with dg.instance_for_test(temp_dir=home) as instance:
        barrier.wait(timeout=120)  # both runs start together
        summary = run_range(start, end, mappings_dir=mappings, state_url=state_url, instance=instance)
    Path(out_path).write_text(json.dumps({"success": summary.success, "failure": summary.failure}))


def test_overlapping_backfills_at_the_same_time_post_the_overlap_once(sandbox, authorized, state_url, tmp_path):
    end = sandbox.seed.today - timedelta(days=1)
    ranges = [(end - timedelta(days=12), end - timedelta(days=3)), (end - timedelta(days=9), end)]
    # Processes, not threads: two in-process Dagster runs in one interpreter deadlock in logging's module lock.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = []
    for n, (start, stop) in enumerate(ranges):
        (tmp_path / f"home{n}").mkdir()
        processes.append(context.Process(target=_backfill_in_own_process, args=(
            os.environ["EXPENSIFY_EXACT_KEY"], str(authorized), state_url, str(tmp_path / f"home{n}"), start, stop,
            barrier, str(tmp_path / f"summary{n}.json"))))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0, "a backfill process crashed or hung"
    summaries = [json.loads((tmp_path / f"summary{n}.json").read_text()) for n in range(2)]

    # A run that lost a race for a report fails rather than post it again; rerunning its range settles it.
    with _instance(tmp_path, "home_rerun") as instance:
        for n, summary in enumerate(summaries):
            if not summary["success"]:
                assert "already posted" in summary["failure"], summary["failure"]
                rerun = run_range(*ranges[n], mappings_dir=str(authorized), state_url=state_url, instance=instance)
                assert rerun.success, rerun.failure
    per_report = _assert_each_report_once_and_ledger_matches(sandbox, state_url)
    assert set(per_report) == _expected(sandbox, ranges[0][0], end) - PROBLEMS


def test_an_edited_and_reapproved_report_is_quarantined_and_approve_posts_reversal_and_correction_once(
        sandbox, authorized, state_url, tmp_path, capsys):
    report = next(r for r in sandbox.seed.reports if r.report_id == S._report_id(27))
    day = _approval_day(report)
    reapproved_at = sandbox.clock.now() - timedelta(days=1)  # yesterday: today's partition does not exist yet
    today = reapproved_at.astimezone(AMSTERDAM).date()
    with _instance(tmp_path, "home") as instance:
        first = run_range(day, day, mappings_dir=str(authorized), state_url=state_url, instance=instance)
        assert first.success, first.failure
        original = next(e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == report.report_id)

        expense = report.expenses[0]
        sandbox.expensify.set_report_state(report.report_id, "OPEN")
        sandbox.expensify.edit_expense(report.report_id, expense.transaction_id, amount=expense.amount + 1000)
        sandbox.expensify.set_report_state(report.report_id, "APPROVED", approved=reapproved_at)

        changed = run_range(today, today, mappings_dir=str(authorized), state_url=state_url, instance=instance)
        assert changed.success, changed.failure
        outcome = changed.outcomes.set_index("report_id").loc[report.report_id]
        assert outcome["outcome"] == "quarantined" and outcome["reason_codes"] == ["CHANGED_AFTER_POSTING"]
        assert len([e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == report.report_id]) == 1

        store = StateStore(state_url)
        item = store.quarantine_get(CONNECTION, report.report_id)
        correction = item.correction
        assert correction["reverse_entry_id"] == original["EntryID"]

        # A replay cannot fix it (it waits for a person), and approving posts exactly two entries, once.
        assert _cli(authorized, state_url, "quarantine", "replay", "--report", report.report_id) == 0
        assert _cli(authorized, state_url, "quarantine", "approve", report.report_id) == 0
        assert _cli(authorized, state_url, "quarantine", "approve", report.report_id) == 4  # no longer open
        rerun = run_range(today, today, mappings_dir=str(authorized), state_url=state_url, instance=instance)
        assert rerun.success, rerun.failure
        assert rerun.outcomes.set_index("report_id").loc[report.report_id, "outcome"] == "already_posted"

    mine = [e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == report.report_id]
    assert len(mine) == 3
    by_id = {e["EntryID"]: e for e in mine}
    ledger = store.ledger_get(CONNECTION, report.report_id)
    corrected = by_id[ledger.entry_id]
    reversal = next(e for e in mine if e["EntryID"] not in (original["EntryID"], ledger.entry_id))
    assert reversal["Reversal"] is True and corrected["Reversal"] is False
    assert sorted(line["AmountFC"] for line in reversal["lines"]) == \
        sorted(-line["AmountFC"] for line in original["lines"])
    # What stays booked is exactly the corrected report: original + reversal cancel out.
    booked = sum(round(line["AmountFC"] * 100) for e in mine for line in e["lines"] if line["AmountFC"] > 0
                 and e is not reversal) - sum(round(line["AmountFC"] * 100) for line in original["lines"]
                                              if line["AmountFC"] > 0)
    assert booked == ledger.total_cents == report.total + 1000
    assert store.quarantine_get(CONNECTION, report.report_id).status == "resolved"
    events = [r["event"] for r in store.audit_rows(CONNECTION, report_id=report.report_id)]
    assert events.count("reversal_posted") == 1 and events.count("correction_posted") == 1
    assert events.index("approved") > events.index("correction_posted") > events.index("reversal_posted")
    store.dispose()


def test_a_report_edited_back_to_what_was_first_posted_gets_a_second_correction_of_its_own(
        sandbox, authorized, state_url, tmp_path):
    """Posted at A, edited to B and approved, edited back to A and approved: through the CLI, Exact ends with five
    entries for the report (A, its reversal, B, its reversal, A again) and books exactly A, as the ledger says."""
    report = next(r for r in sandbox.seed.reports if r.report_id == S._report_id(27))
    day = _approval_day(report)
    expense = report.expenses[0]
    with _instance(tmp_path, "home") as instance:
        assert run_range(day, day, mappings_dir=str(authorized), state_url=state_url, instance=instance).success
        for hours_ago, amount in ((30, expense.amount + 1000), (28, expense.amount)):
            reapproved_at = sandbox.clock.now() - timedelta(hours=hours_ago)
            sandbox.expensify.set_report_state(report.report_id, "OPEN")
            sandbox.expensify.edit_expense(report.report_id, expense.transaction_id, amount=amount)
            sandbox.expensify.set_report_state(report.report_id, "APPROVED", approved=reapproved_at)
            again = reapproved_at.astimezone(AMSTERDAM).date()
            changed = run_range(again, again, mappings_dir=str(authorized), state_url=state_url, instance=instance)
            assert changed.success, changed.failure
            assert changed.outcomes.set_index("report_id").loc[report.report_id, "reason_codes"] == \
                ["CHANGED_AFTER_POSTING"]
            assert _cli(authorized, state_url, "quarantine", "approve", report.report_id) == 0

    mine = sorted((e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == report.report_id),
                  key=lambda e: e["EntryNumber"])
    assert len(mine) == 5, "A, its reversal, B, its reversal, and A again"

    def per_account(entries) -> dict[str, int]:
        booked = Counter()
        for entry in entries:
            for line in entry["lines"]:
                booked[line["GLAccount"]] += round(line["AmountFC"] * 100)
        return {account: cents for account, cents in booked.items() if cents}

    assert per_account(mine) == per_account(mine[:1]), "what stays booked is exactly A"
    store = StateStore(state_url)
    ledger = store.ledger_get(CONNECTION, report.report_id)
    assert ledger.entry_id == mine[-1]["EntryID"] and ledger.total_cents == report.total
    store.dispose()


def test_replay_job_and_sensor_post_the_fixed_eindhoven_report_once(sandbox, authorized, state_url, tmp_path):
    day = _approval_day(next(r for r in sandbox.seed.reports if r.report_id == EINDHOVEN))
    connector = ConnectorResource(mappings_dir=str(authorized), state_url=state_url)
    defs = build_defs(str(authorized))  # the real code location: replay's job and sensor merged with the rest
    job = defs.resolve_job_def(REPLAY_JOB_NAME)
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    with _instance(tmp_path, "home") as instance:
        assert run_range(day, day, mappings_dir=str(authorized), state_url=state_url, instance=instance).success

        with dg.build_sensor_context(instance=instance, resources={"connector": connector}) as context:
            first = list(sensor(context) or [])
            cursor = context.cursor
        assert [r.tags["expensify_exact/connection"] for r in first] == [CONNECTION]  # no fingerprint yet
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"connector": connector}) as context:
            unchanged = sensor(context)
        assert isinstance(unchanged, dg.SkipReason) and "unchanged" in unchanged.skip_message

        sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven")
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"connector": connector}) as context:
            requests = list(sensor(context))
        assert len(requests) == 1 and requests[0].run_key != first[0].run_key
        for _ in range(2):  # a second run finds nothing open and posts nothing
            result = job.execute_in_process(instance=instance, run_config=requests[0].run_config,
                                            resources={"connector": connector}, tags=requests[0].tags)
            assert result.success
    assert len([e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == EINDHOVEN]) == 1
    store = StateStore(state_url)
    assert store.quarantine_get(CONNECTION, EINDHOVEN).status == "replayed"
    store.dispose()
