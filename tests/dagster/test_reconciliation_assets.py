"""The reconciliation through Dagster against the sandbox over real HTTP: after the posting job, the daily
reconciliation's checks pass and the digest is written where the operator finds it; once a posted entry is
deleted in Exact, the check turns red with ERROR severity, names the connection at fault, and the digest and the
monthly rollup say what is wrong. Several connections are reconciled in one run over a rectangle of partitions,
with one Expensify export for the connections that share a credential; the sensor and the monthly schedule ask
for one run per range of consecutive connections with the same day, and never twice for a connection's day.

The sandbox's demo data is placed in the last days of the previous month, so the month's partition exists.
"""

import json
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.defs import assets, jobs, reconciliation, resources
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.partitions import MONTH, PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG, partition_key
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import StateStore
from expensify_exact_sandbox.seed import build_seed
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import add_belgian_connection, write_mappings
from tests.factories import store_demo_secrets

CONNECTION = "vermeerhals-nl"
BELGIAN = "vermeerhals-be"


@pytest.fixture
def last_month_sandbox():
    seed_today = date.today().replace(day=1) - timedelta(days=2)  # demo days end in the previous month
    with SandboxServer(seed=build_seed(seed_today)) as server:
        server.expensify.set_knobs(render_delay_seconds=0.3)
        yield server


def _defs(mappings) -> dg.Definitions:
    # The modules this feature plugs into, built as definitions.build_defs builds them.
    config = load_project_config(mappings)
    return dg.Definitions.merge(*(m.build(config) for m in (assets, jobs, resources, reconciliation)))


def _run(defs, job_name, instance, connector, first=None, last=None, partition_key=None):
    """A run of `job_name` over one partition, or the rectangle `first`..`last` (partition keys)."""
    job = defs.resolve_job_def(job_name)
    kwargs = ({"partition_key": partition_key} if partition_key else
              {"tags": {RANGE_START_TAG: first, RANGE_END_TAG: last}})
    return job.execute_in_process(instance=instance, resources={"connector": connector}, raise_on_error=False,
                                  **kwargs)


def _checks(result) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, e.severity.value) for e in result.get_asset_check_evaluations()}


def _check_metadata(result, name: str) -> dict:
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return {k: v.value for k, v in evaluation.metadata.items()}


@pytest.fixture
def three_days(last_month_sandbox, tmp_path, monkeypatch):
    """(sandbox, connector, defs, the three days before the seed's today), demo credentials stored."""
    monkeypatch.delenv("EXPENSIFY_EXACT_DIGEST_DIR", raising=False)
    mappings = write_mappings(tmp_path / "mappings", last_month_sandbox, expensify__poll_interval_seconds=0.2)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    store_demo_secrets(mappings, state_url, [CONNECTION])
    today = last_month_sandbox.seed.today
    return (last_month_sandbox, ConnectorResource(mappings_dir=str(mappings), state_url=state_url), _defs(mappings),
            [(today - timedelta(days=n)).isoformat() for n in (3, 2, 1)])


def _days(days, connection=CONNECTION, last=None) -> dict:
    return {"first": partition_key(connection, days[0]), "last": partition_key(last or connection, days[-1])}


def test_checks_pass_on_clean_books_and_turn_red_when_an_entry_is_deleted_in_exact(three_days, tmp_path, instance):
    sandbox, connector, defs, days = three_days

    posting = _run(defs, MAIN_JOB_NAME, instance, connector, **_days(days))
    assert posting.success
    clean = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, **_days(days))
    assert clean.success
    assert _checks(clean) == {name: (True, "ERROR") for name in reconciliation.DAILY_CHECKS}
    digest_md = tmp_path / "dagster_home" / "digests" / CONNECTION / f"{days[-1]}.md"
    assert digest_md.exists() and digest_md.with_suffix(".html").exists()
    assert "0 findings" in digest_md.read_text()

    ledger = connector.store().ledger_rows(CONNECTION, status="posted")
    victim = next(row for row in ledger if row.partition_date == days[1])
    sandbox.exact.delete_entry(victim.entry_id)
    red = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector,
               partition_key=partition_key(CONNECTION, days[1]))

    assert red.success, "a finding is a red check, not a failed run"
    checks = _checks(red)
    assert checks["posted_entries_unchanged_in_exact"] == (False, "ERROR")
    assert checks["every_approved_report_posted_or_quarantined"] == (True, "ERROR")
    assert _check_metadata(red, "posted_entries_unchanged_in_exact")["connections_at_fault"] == CONNECTION
    text = (digest_md.parent / f"{days[1]}.md").read_text()
    assert "MISSING_IN_EXACT" in text and victim.report_id in text
    digest_event = instance.get_latest_materialization_event(reconciliation.DIGEST)
    assert digest_event.asset_materialization.partition == partition_key(CONNECTION, days[1])
    assert "MISSING_IN_EXACT" in digest_event.asset_materialization.metadata["digest"].value

    month = _run(defs, reconciliation.MONTHLY_JOB_NAME, instance, connector, partition_key=partition_key(
        CONNECTION, date.fromisoformat(days[0]).replace(day=1).isoformat(), MONTH))
    assert month.success
    assert _checks(month) == {"card_liability_nets_to_zero": (True, "ERROR"), "month_reconciles": (False, "ERROR")}
    assert _check_metadata(month, "month_reconciles")["connections_at_fault"] == CONNECTION
    rollup = month.output_for_node(reconciliation.MONTHLY.to_python_identifier())
    assert rollup.findings.loc[rollup.findings["code"] == "MISSING_IN_EXACT", "report_id"].tolist() == [
        victim.report_id]
    assert rollup.stats["days_reconciled"] == 3


def test_a_report_approved_after_its_day_was_posted_is_found_by_the_reconciliation_job(three_days, tmp_path, instance):
    """Reconciliation re-reads Expensify itself: a report approved for a day after that day's posting run exported
    it (an export edge, or a report retracted and approved again with its old date) is a NOT_POSTED finding, and the
    re-read costs one export job for the whole range."""
    sandbox, connector, defs, days = three_days
    assert _run(defs, MAIN_JOB_NAME, instance, connector, **_days(days)).success

    late_day = days[1]
    late = sandbox.expensify.add_report(
        name="Approved after the run", employee_email=sandbox.seed.reports[0].employee.email,
        expenses=[{"merchant": "NS Reizigers", "category": "Travel", "tag": "Rotterdam:P1003 Havenbedrijf",
                   "amount": 4210, "created": late_day}],
        submitted=datetime.combine(date.fromisoformat(late_day), time(9, 0)),
        approved=datetime.combine(date.fromisoformat(late_day), time(12, 0)))
    exports_before = sandbox.expensify.stats["export_jobs"]

    result = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, **_days(days))

    assert result.success
    assert sandbox.expensify.stats["export_jobs"] - exports_before == 1, "one export for the whole range"
    checks = _checks(result)
    assert checks["every_approved_report_posted_or_quarantined"] == (False, "ERROR")
    by_partition = result.output_for_node(reconciliation.DAILY.to_python_identifier())
    findings = {(key, f.code, f.report_id) for key, r in by_partition.items() for f in r.findings.itertuples()}
    assert findings == {(partition_key(CONNECTION, late_day), "NOT_POSTED", late)}, "nothing else is wrong"
    text = (tmp_path / "dagster_home" / "digests" / CONNECTION / f"{late_day}.md").read_text()
    assert "NOT_POSTED" in text and late in text


def test_two_connections_sharing_a_credential_are_reconciled_in_one_run_and_the_check_names_the_one_at_fault(
        last_month_sandbox, tmp_path, instance, monkeypatch):
    monkeypatch.delenv("EXPENSIFY_EXACT_DIGEST_DIR", raising=False)
    sandbox = last_month_sandbox
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2)
    add_belgian_connection(mappings, BELGIAN, credential="vermeerhals")
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    store_demo_secrets(mappings, state_url, [CONNECTION, BELGIAN], sandbox=sandbox, monkeypatch=monkeypatch,
                       credential="vermeerhals")
    connector, defs = ConnectorResource(mappings_dir=str(mappings), state_url=state_url), _defs(mappings)
    days = [(sandbox.seed.today - timedelta(days=n)).isoformat() for n in (3, 2, 1)]
    both = _days(days, CONNECTION, last=BELGIAN)
    assert _run(defs, MAIN_JOB_NAME, instance, connector, **both).success
    victim = connector.store().ledger_rows(CONNECTION, status="posted")[0]
    sandbox.exact.delete_entry(victim.entry_id)
    exports_before = sandbox.expensify.stats["export_jobs"]

    result = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, **both)

    assert result.success
    assert sandbox.expensify.stats["export_jobs"] - exports_before == 1, "one export for both connections' policies"
    by_partition = result.output_for_node(reconciliation.DAILY.to_python_identifier())
    assert set(by_partition) == {partition_key(c, d) for c in (CONNECTION, BELGIAN) for d in days}
    assert all(by_partition[partition_key(BELGIAN, d)].clean for d in days)
    assert _checks(result)["posted_entries_unchanged_in_exact"] == (False, "ERROR")
    red = _check_metadata(result, "posted_entries_unchanged_in_exact")
    assert (red["connections_at_fault"], red["connections_checked"]) == (CONNECTION, 2)
    assert victim.report_id in red["details"]
    for name in (CONNECTION, BELGIAN):
        assert (tmp_path / "dagster_home" / "digests" / name / f"{days[-1]}.md").exists()
    # Each (connection, day) keeps its own metadata: the Belgian days are clean, the victim's day is not.
    victim_day = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=reconciliation.DAILY, asset_partitions=[partition_key(CONNECTION, victim.partition_date)]),
        limit=1).records[0].asset_materialization.metadata
    belgian_day = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=reconciliation.DAILY, asset_partitions=[partition_key(BELGIAN, victim.partition_date)]),
        limit=1).records[0].asset_materialization.metadata
    assert victim_day["finding_MISSING_IN_EXACT"].value == 1 and belgian_day["findings"].value == 0


# --- when runs are asked for ---------------------------------------------------------------------------------

def _three_connections(tmp_path):
    """Mappings with three connections in this order: vermeerhals-nl, vermeerhals-be, vermeerhals-de."""
    mappings = write_mappings(tmp_path / "mappings")
    add_belgian_connection(mappings, BELGIAN)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    german = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
    german["name"] = "vermeerhals-de"
    german["expensify"]["policy_ids"] = ["DE00000000000001"]
    german["exact"]["division"] = 345678
    document["connections"].append(german)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def _tick(defs, instance, connector, cursor=None):
    sensor = defs.resolve_sensor_def(reconciliation.DAILY_SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, resources={"connector": connector}, cursor=cursor,
                                 definitions=defs) as context:
        return sensor.evaluate_tick(context)


def test_the_sensor_asks_one_run_per_range_of_connections_with_the_same_day_and_each_day_once(tmp_path, state_url,
                                                                                             instance):
    mappings = _three_connections(tmp_path)
    connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
    defs = _defs(mappings)
    store = StateStore(state_url)
    lookback = load_project_config(mappings).connections[0].posting.lookback_days
    posted = date(2026, 11, 20)
    for name in ("vermeerhals-nl", "vermeerhals-be", "vermeerhals-de"):
        store.day_mark_posted(name, posted.isoformat(), "run-1")
    day = (posted - timedelta(days=lookback)).isoformat()

    first = _tick(defs, instance, connector)
    [request] = first.run_requests
    assert PARTITION_TAG not in request.tags
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (
        f"vermeerhals-nl|{day}", f"vermeerhals-de|{day}")
    assert request.run_key == f"vermeerhals-nl..vermeerhals-de:reconcile:{day}"
    assert json.loads(first.cursor) == {name: day for name in ("vermeerhals-be", "vermeerhals-de", "vermeerhals-nl")}
    assert not _tick(defs, instance, connector, cursor=first.cursor).run_requests, "each day is asked for once"

    # The middle connection moves on alone; the outer two move on together, but are not neighbours: two runs.
    store.day_mark_posted("vermeerhals-be", (posted + timedelta(days=1)).isoformat(), "run-2")
    second = _tick(defs, instance, connector, cursor=first.cursor)
    [alone] = second.run_requests
    next_day = (posted + timedelta(days=1 - lookback)).isoformat()
    assert alone.tags[PARTITION_TAG] == f"vermeerhals-be|{next_day}"
    assert alone.run_key == f"vermeerhals-be:reconcile:{next_day}"
    for name in ("vermeerhals-nl", "vermeerhals-de"):
        store.day_mark_posted(name, (posted + timedelta(days=1)).isoformat(), "run-2")
    third = _tick(defs, instance, connector, cursor=second.cursor)
    assert sorted(r.tags[PARTITION_TAG] for r in third.run_requests) == [f"vermeerhals-de|{next_day}",
                                                                   f"vermeerhals-nl|{next_day}"]
    assert len({r.run_key for r in [request, alone, *third.run_requests]}) == 4


def test_the_monthly_schedule_asks_one_run_for_every_connections_last_month(tmp_path):
    mappings = _three_connections(tmp_path)
    defs = _defs(mappings)
    schedule = defs.resolve_schedule_def(reconciliation.MONTHLY_SCHEDULE_NAME)
    when = datetime(2026, 12, 3, 7, 45, tzinfo=ZoneInfo("Europe/Amsterdam"))
    with dg.build_schedule_context(scheduled_execution_time=when) as context:
        [request] = schedule.evaluate_tick(context).run_requests
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (
        "vermeerhals-nl|2026-11-01", "vermeerhals-de|2026-11-01")
    assert request.run_key == "vermeerhals-nl..vermeerhals-de:reconcile_month:2026-11-01"
