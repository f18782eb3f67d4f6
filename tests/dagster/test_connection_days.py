"""Each connection's day is posted once it has ended in the connection's own timezone: the sensors are evaluated
tick by tick on a moving sandbox clock, and the runs they ask for are executed on one Dagster instance as the
daemon would (a run key already run is not run again). Covers a report approved at 23:50 in Los Angeles, a report
that reaches Expensify's export two days late, and a backfill that runs out of Exact's daily budget."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from expensify_exact.cli.commands.status import collect_status, render_text
from expensify_exact.core import connections
from expensify_exact.core.digest import read_digest
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import DEFERRED_SENSOR_NAME, MAIN_JOB_NAME, SENSOR_NAME, TRIGGER_TAG
from expensify_exact.defs.partitions import RANGE_END_TAG, connections_of_run, split_key
from expensify_exact.defs.reconciliation import DAILY_JOB_NAME, DAILY_SENSOR_NAME
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.defs.runs import run_range
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings
from tests.crash.driver import report_of_entry
from tests.factories import store_demo_secrets

NL, LA = "vermeerhals-nl", "vermeerhals-us"
AMSTERDAM, LOS_ANGELES = ZoneInfo("Europe/Amsterdam"), ZoneInfo("America/Los_Angeles")
US_POLICY = "US00000000000001"
# The simulated days lie a week or more in the past, so every one of them is already a Dagster partition.
START = datetime.combine(datetime.now(UTC).date() - timedelta(days=12), time(6), UTC)
S0 = START.date()  # the sandbox's "today" when the test begins; its seed's reports lie on the 30 days before


@pytest.fixture
def sandbox(monkeypatch):
    with SandboxServer(clock=SandboxClock(start=START)) as server:
        server.expensify.set_knobs(render_delay_seconds=0.3, rate_limiting=False)
        server.exact.set_knobs(minutely_limit=100_000)
        # Every client and sensor of the connector reads the sandbox's time, as in production they read the wall clock.
        monkeypatch.setattr(connections, "SystemClock", lambda: server.clock)
        yield server


@pytest.fixture(autouse=True)
def _state_in_env(monkeypatch, state_url):
    monkeypatch.setenv("EXPENSIFY_EXACT_STATE_URL", state_url)


def _mappings(tmp_path, sandbox, *, with_la: bool):
    """The shipped mappings pointed at the sandbox, plus a Los Angeles connection on the second division."""
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    if with_la:
        us = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
        us.update(name=LA, timezone="America/Los_Angeles")
        us["expensify"]["policy_ids"] = [US_POLICY]
        us["exact"]["division"] = S.SECOND_DIVISION
        document["connections"].append(us)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


class Daemon:
    """Evaluates sensors at chosen times, keeping each one's cursor, and executes what they ask for, each run key
    once, like the daemon. `runs` names each run by what it covers: `<connection>:<last day>` per connection."""

    def __init__(self, sandbox, mappings, state_url, instance):
        self.sandbox, self.instance = sandbox, instance
        self.defs = build_defs(str(mappings))
        # The code location's own `connector` resource reads the state URL from the environment (see `sandbox`).
        self.connector = ConnectorResource(mappings_dir=str(mappings))
        self.run_keys: list[str] = []
        self.labels: list[str] = []  # `<connection>:<last day>` of each connection of each run, in order
        self.runs: dict[str, str] = {}  # label -> run ID
        self.cursors: dict[str, str | None] = {}

    def move_to(self, moment: datetime) -> None:
        self.sandbox.clock.advance((moment - self.sandbox.clock.now()).total_seconds())

    def tick(self, sensor_name: str) -> list[dg.RunRequest]:
        sensor = self.defs.get_repository_def().get_sensor_def(sensor_name)
        with dg.build_sensor_context(instance=self.instance, resources={"connector": self.connector},
                                     repository_def=self.defs.get_repository_def(),
                                     cursor=self.cursors.get(sensor_name)) as context:
            result = sensor.evaluate_tick(context)
        self.cursors[sensor_name] = result.cursor
        job_name = DAILY_JOB_NAME if sensor_name == DAILY_SENSOR_NAME else MAIN_JOB_NAME
        for request in result.run_requests:
            self.execute(job_name, request)
        return result.run_requests

    def execute(self, job_name: str, request: dg.RunRequest) -> None:
        assert request.run_key not in self.run_keys, f"{request.run_key} requested twice"
        job = self.defs.resolve_job_def(job_name)
        partition = {"partition_key": request.partition_key} if request.partition_key else {}
        result = job.execute_in_process(
            instance=self.instance, asset_selection=request.asset_selection,
            tags={**request.tags, "dagster/run_key": request.run_key}, **partition)
        assert result.success, request.run_key
        self.run_keys.append(request.run_key)
        last = split_key(request.tags.get(RANGE_END_TAG) or request.partition_key or request.tags["dagster/partition"])[1]
        names = [c.name for c in self.connector.project().connections]
        for name in connections_of_run(request.tags, names):
            label = f"{name}:{last}" + (":reconcile" if job_name == DAILY_JOB_NAME else "")
            self.labels.append(label)
            self.runs[label] = result.run_id


def _add_report(sandbox, when: datetime, policy: str, merchant: str) -> str:
    return sandbox.expensify.add_report(
        name=f"{merchant} {when:%d %b %H:%M}", employee_email="anna.devries@vermeerhals.nl", policy_id=policy,
        approved=when, expenses=[{"merchant": merchant, "category": "Travel", "tag": "Amsterdam:P1001 Rijkswaterstaat",
                                  "amount": 4200, "created": (when.date() - timedelta(days=1)).isoformat()}])


def _entries_per_report(sandbox, division: int) -> Counter:
    return Counter(report_of_entry(e) for e in sandbox.exact.entries(division))


def test_two_timezones_each_day_posted_once_after_it_ended_there(sandbox, tmp_path, state_url, monkeypatch):
    mappings = _mappings(tmp_path, sandbox, with_la=True)
    store_demo_secrets(mappings, state_url, [NL, LA], sandbox=sandbox, monkeypatch=monkeypatch)
    d1, d2 = S0 + timedelta(days=1), S0 + timedelta(days=2)
    planned = [  # (approval time, connection's policy, merchant)
        (datetime.combine(d1, time(10), LOS_ANGELES), US_POLICY, "Lyft"),
        (datetime.combine(d1, time(23, 50), LOS_ANGELES), US_POLICY, "Late Night Diner"),  # 08:50 next day in NL
        (datetime.combine(d2, time(12), LOS_ANGELES), US_POLICY, "Caltrain"),
        (datetime.combine(d1, time(9), AMSTERDAM), S.POLICY_ID, "NS Reizigers"),
        (datetime.combine(d2, time(23, 30), AMSTERDAM), S.POLICY_ID, "Thalys"),
    ]
    added: dict[str, tuple[str, date]] = {}
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        daemon = Daemon(sandbox, mappings, state_url, instance)
        moment = datetime.combine(d1, time(0), LOS_ANGELES)
        while moment <= datetime.combine(d2 + timedelta(days=1), time(3), LOS_ANGELES):
            daemon.move_to(moment)
            for when, policy, merchant in planned:  # approved in Expensify when the clock gets there
                if when <= moment and merchant not in {m for m, _ in added.values()}:
                    zone = LOS_ANGELES if policy == US_POLICY else AMSTERDAM
                    added[_add_report(sandbox, when, policy, merchant)] = (merchant, when.astimezone(zone).date())
            daemon.tick(SENSOR_NAME)
            moment += timedelta(hours=1)
        store = daemon.connector.store()
        posted_la = {r.report_id: r.partition_date for r in store.ledger_rows(LA, status="posted")}
        posted_nl = {r.report_id: r.partition_date for r in store.ledger_rows(NL, status="posted")}
        late = [r for r in store.audit_rows() if r["event"] == "late_approval"]
        last_days = {name: store.last_day_posted(name)[0] for name in (NL, LA)}
        status = render_text(collect_status(daemon.connector, daemon.connector.project().connections, instance,
                                            sandbox.clock.now()))

    # One run per connection and day, in the order the days ended in each zone. The first tick, 00:00 of d1 in
    # Los Angeles, is 09:00 in Amsterdam: there S0 is over, in Los Angeles only the day before it.
    assert daemon.labels == [f"{NL}:{S0}", f"{LA}:{S0 - timedelta(days=1)}", f"{LA}:{S0}", f"{NL}:{d1}",
                             f"{LA}:{d1}", f"{NL}:{d2}", f"{LA}:{d2}"]
    la_reports = {rid: day for rid, (merchant, day) in added.items() if rid not in posted_nl}
    assert {rid: date.fromisoformat(day) for rid, day in posted_la.items()} == la_reports
    assert len(la_reports) == 3
    diner = next(rid for rid, (merchant, _day) in added.items() if merchant == "Late Night Diner")
    assert posted_la[diner] == d1.isoformat()  # its own day in Los Angeles, not Amsterdam's
    for rid, (merchant, day) in added.items():
        if rid not in la_reports:
            assert posted_nl[rid] == day.isoformat(), merchant
    for division in (S.DIVISION, S.SECOND_DIVISION):
        assert [r for r, n in _entries_per_report(sandbox, division).items() if n > 1] == []
    assert set(_entries_per_report(sandbox, S.SECOND_DIVISION)) == set(la_reports)
    assert late == []  # every one was exported before its day was posted
    assert last_days == {NL: d2.isoformat(), LA: d2.isoformat()}
    assert f"last day      {d2} (America/Los_Angeles) posted at " in status
    assert f"last day      {d2} (Europe/Amsterdam) posted at " in status


def test_a_report_exported_two_days_late_is_posted_next_morning_as_a_late_approval(sandbox, tmp_path, state_url):
    mappings = _mappings(tmp_path, sandbox, with_la=False)
    store_demo_secrets(mappings, state_url, [NL])
    d1 = S0 + timedelta(days=1)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        daemon = Daemon(sandbox, mappings, state_url, instance)
        daemon.move_to(datetime.combine(d1, time(10), AMSTERDAM))
        lagging = _add_report(sandbox, datetime.combine(d1, time(10), AMSTERDAM), S.POLICY_ID, "Retracted Taxi")
        # Expensify's export leaves it out until two days after its approval day.
        sandbox.expensify.hide_from_exports(lagging, datetime.combine(d1 + timedelta(days=2), time(3), AMSTERDAM))
        moment = datetime.combine(d1 + timedelta(days=1), time(0), AMSTERDAM)
        posted_by = None
        store = daemon.connector.store()
        while moment <= datetime.combine(d1 + timedelta(days=3), time(2), AMSTERDAM):
            daemon.move_to(moment)
            daemon.tick(SENSOR_NAME)
            if posted_by is None and store.ledger_get(NL, lagging) is not None:
                posted_by = daemon.labels[-1]
            moment += timedelta(hours=1)
        ledger = store.ledger_get(NL, lagging)
        events = store.audit_rows(connection=NL, report_id=lagging)
        late = [r for r in store.audit_rows(connection=NL) if r["event"] == "late_approval"]
        # Reconciliation waits until no later run re-exports a day: after d1 + 2 was posted, that is S0 (d1 - 1).
        [reconcile] = daemon.tick(DAILY_SENSOR_NAME)
        assert daemon.tick(DAILY_SENSOR_NAME) == []
        digest = read_digest(NL, S0.isoformat(), Path(instance.root_directory) / "digests")

    assert daemon.labels == [f"{NL}:{S0 + timedelta(days=n)}" for n in range(4)] + [f"{NL}:{S0}:reconcile"]
    # Posted by the run of the day it appeared in the export (d1 + 2), whose look-back covers d1: under its own day.
    assert posted_by == f"{NL}:{d1 + timedelta(days=2)}"
    assert ledger.status == "posted" and ledger.partition_date == d1.isoformat()
    assert [r["report_id"] for r in late] == [lagging]
    assert late[0]["partition_date"] == d1.isoformat()
    assert json.loads(late[0]["detail"])["approval_day"] == d1.isoformat()
    assert late[0]["run_id"] == daemon.runs[posted_by]
    assert [e["event"] for e in events if e["event"] in ("late_approval", "posted")] == ["late_approval", "posted"]
    assert _entries_per_report(sandbox, S.DIVISION)[lagging] == 1
    assert connections_of_run(reconcile.tags, [NL]) == [NL]
    assert split_key(reconcile.partition_key or reconcile.tags["dagster/partition"]) == (NL, S0.isoformat())
    posted_line = f"Last complete day posted: {d1 + timedelta(days=2)}, at "
    assert any(b.startswith(posted_line) for section in digest.sections for b in section.bullets)


def test_a_backfill_deferred_by_the_daily_budget_finishes_by_itself_after_the_reset(sandbox, tmp_path, state_url):
    mappings = _mappings(tmp_path, sandbox, with_la=False)
    store_demo_secrets(mappings, state_url, [NL])
    # The connector keeps 50 calls of the budget for people; 80 leaves it about 20 posts a day.
    sandbox.exact.set_knobs(daily_limit=80)
    start, end = S0 - timedelta(days=30), S0 - timedelta(days=1)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        backfill = run_range(start, end, mappings_dir=str(mappings), state_url=state_url, instance=instance)
        assert backfill.success, backfill.failure
        daemon = Daemon(sandbox, mappings, state_url, instance)
        store = daemon.connector.store()
        deferred_first = set(store.deferred(NL))
        assert deferred_first == set(backfill.outcomes.loc[backfill.outcomes["outcome"] == "deferred", "report_id"])
        assert deferred_first, "the budget did not run out; lower daily_limit"
        assert daemon.tick(DEFERRED_SENSOR_NAME) == []  # the budget has not reset yet: nothing to ask
        resets = 0
        moment = START
        while store.deferred(NL) and resets < 5:
            moment = datetime.combine(moment.date() + timedelta(days=1), time(0, 30), UTC)
            daemon.move_to(moment)  # past Exact's daily reset (midnight UTC in the sandbox)
            requests = daemon.tick(DEFERRED_SENSOR_NAME)
            assert len(requests) == 1 and connections_of_run(requests[0].tags, [NL]) == [NL]
            assert requests[0].tags[TRIGGER_TAG] == "deferred"
            assert daemon.tick(DEFERRED_SENSOR_NAME) == []  # one run per reset
            resets += 1
        ledger = {r.report_id: r for r in store.ledger_rows(NL)}
        quarantined = {i.report_id for i in store.quarantine_items(NL, status="open")}

    assert store.deferred(NL) == {}
    assert resets >= 1 and len(daemon.run_keys) == resets
    expected = {r.report_id for r in sandbox.seed.approved_reports
                if start <= r.approved.replace(tzinfo=UTC).astimezone(AMSTERDAM).date() <= end}
    assert deferred_first <= {rid for rid, row in ledger.items() if row.status == "posted"}
    assert {rid for rid, row in ledger.items() if row.status == "posted"} | quarantined == expected
    assert [r for r, n in _entries_per_report(sandbox, S.DIVISION).items() if n > 1] == []
