"""One clock: "today" is the connection's day by the connector's clock, whichever path asks.

The `run_date` posting rule dates an entry on the day it is drafted. The main job (`run`), `quarantine replay`
and the daily reconciliation each draft reports, the monthly reconciliation expects the month's days before today,
and `check` counts a cost center's end date against today: they must all agree on that day, even when the
connection's zone, UTC and the host's zone each see a different date. The sandbox's clock stands at 10:45 UTC on
day D, the last day of last month (so that month is a partition); the connection lives on Kiritimati (UTC+14,
already D+1) and the process runs in Pago Pago (UTC-11, still D-1): every path must use D+1.
"""

from __future__ import annotations

import json
import os
import time as host_time
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import yaml

from expensify_exact.core import connections, pipeline
from expensify_exact.definitions import build_defs
from expensify_exact.defs.partitions import MONTH, partition_key
from expensify_exact.defs.reconciliation import APPROVED, DAILY, DAILY_CHECKS, DAILY_JOB_NAME, MONTHLY, MONTHLY_JOB_NAME
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings
from tests.crash.driver import report_of_entry
from tests.factories import run_cli

CONNECTION = "vermeerhals-nl"
ZONE, HOST_ZONE = "Pacific/Kiritimati", "Pacific/Pago_Pago"
GIFTS = S._report_id(101)  # quarantined by the run (Gifts maps to no GL account), posted by the replay
MOMENT = datetime.combine(datetime.now(timezone.utc).date().replace(day=1) - timedelta(days=1), time(10, 45),
                          timezone.utc)
D = MOMENT.date()


@pytest.fixture
def host_in_pago_pago():
    """The process's local zone is Pago Pago, where the clock's moment is still the day before D."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = HOST_ZONE
    host_time.tzset()
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    host_time.tzset()


@pytest.fixture
def sandbox(monkeypatch, host_in_pago_pago):
    with SandboxServer(clock=SandboxClock(start=MOMENT)) as server:
        server.expensify.set_knobs(render_delay_seconds=0.3, rate_limiting=False)
        server.exact.set_knobs(minutely_limit=100_000)
        # Every client, asset and command of the connector reads the sandbox's time, as in production the wall clock.
        monkeypatch.setattr(connections, "SystemClock", lambda: server.clock)
        yield server


@pytest.fixture
def drafted_on(monkeypatch) -> list[date]:
    """The run date each drafting (main job, replay, reconciliation) handed to the posting rules, in order."""
    seen: list[date] = []
    build = pipeline.build_journal_drafts

    def spy(lines, conn, config, dims, run_date):
        seen.append(run_date)
        return build(lines, conn, config, dims, run_date=run_date)

    monkeypatch.setattr(pipeline, "build_journal_drafts", spy)
    return seen


def _entry_dates(sandbox, report_ids: set[str]) -> set[str]:
    return {str(line["Date"])[:10] for entry in sandbox.exact.entries(S.DIVISION)
            if report_of_entry(entry) in report_ids for line in entry["lines"]}


def test_run_replay_reconciliation_and_check_all_use_the_connections_day_by_the_connectors_clock(
        sandbox, drafted_on, tmp_path, state_url, instance, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    connection_day = sandbox.clock.now().astimezone(ZoneInfo(ZONE)).date()
    # Three zones, three dates: a path that read UTC or the host's day would show.
    assert (MOMENT.astimezone(ZoneInfo(HOST_ZONE)).date(), D, connection_day) == (
        D - timedelta(days=1), D, D + timedelta(days=1))
    assert datetime.fromtimestamp(MOMENT.timestamp()).date() == D - timedelta(days=1), "the process runs in Pago Pago"

    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2, timezone=ZONE,
                              posting__date_policy="run_date")
    assert run_cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    gifts = next(r for r in sandbox.seed.approved_reports if r.report_id == GIFTS)
    day = gifts.approved.replace(tzinfo=timezone.utc).astimezone(ZoneInfo(ZONE)).date().isoformat()

    # The main job: every report of the day it posts is dated the connection's day.
    capsys.readouterr()
    assert run_cli(mappings, state_url, "run", "--start", day, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["success"] is True, summary
    assert summary["connections"][CONNECTION]["quarantined"] == {GIFTS: ["UNMAPPED_CATEGORY"]}
    store = StateStore(state_url)
    try:
        posted = {row.report_id for row in store.ledger_rows(CONNECTION, status="posted")}
        assert posted and GIFTS not in posted
        assert store.quarantine_get(CONNECTION, GIFTS).status == "open"
    finally:
        store.dispose()
    assert _entry_dates(sandbox, posted) == {connection_day.isoformat()}

    # `quarantine replay`, once Gifts has an account: the replayed report gets the same day.
    categories = mappings / "categories.yaml"
    document = yaml.safe_load(categories.read_text())
    document["categories"].append({"category": "Gifts", "gl_account": "4520"})
    categories.write_text(yaml.safe_dump(document, sort_keys=False))
    assert run_cli(mappings, state_url, "quarantine", "replay", "--report", GIFTS) == 0
    assert _entry_dates(sandbox, {GIFTS}) == {connection_day.isoformat()}

    # The daily reconciliation drafts what the reports should have become on that same day, and finds them so.
    monkeypatch.setenv("EXPENSIFY_EXACT_STATE_URL", state_url)  # read by the code location's own `connector`
    job = build_defs(str(mappings)).resolve_job_def(DAILY_JOB_NAME)
    result = job.execute_in_process(instance=instance, partition_key=partition_key(CONNECTION, day),
                                    asset_selection=[APPROVED, DAILY])
    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == dict.fromkeys(DAILY_CHECKS, True)
    assert len(drafted_on) == 3, "run, replay and reconciliation each drafted once, through the one pipeline"
    assert set(drafted_on) == {connection_day}

    # The monthly rollup of D's month misses every day before today that was not reconciled: D is one of them.
    month = build_defs(str(mappings)).resolve_job_def(MONTHLY_JOB_NAME).execute_in_process(
        instance=instance, partition_key=partition_key(CONNECTION, D.replace(day=1).isoformat(), MONTH),
        asset_selection=[MONTHLY])
    assert month.success
    missing = month.output_for_node(MONTHLY.to_python_identifier()).stats["days_missing"]
    assert D.isoformat() in missing and day not in missing

    # `check`: a cost center that ended on D has ended today; one that ends on D+1 still runs today.
    sandbox.exact.add_cost_center("UTR", "Kantoor Utrecht", end_date=D)
    sandbox.exact.add_cost_center("AMS", "Kantoor Amsterdam", end_date=connection_day)
    capsys.readouterr()
    assert run_cli(mappings, state_url, "check", "--json") == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    ended = {f["message"].split()[2] for f in findings if f["code"].startswith("ENDED_")}
    assert ended == {"UTR"}, findings
