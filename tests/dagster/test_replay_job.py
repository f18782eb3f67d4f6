"""The `replay_quarantine` job and its sensor with several connections: one op and no pool however many connections
there are; a run replays the connections its tag names, side by side, one connection's failure stopping no other;
the sensor asks for one run for every connection whose dimensions or mappings moved. Against the sandbox, with a
second connection on Exact's second division."""

from __future__ import annotations

import io
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.core import connections
from expensify_exact.defs import replay
from expensify_exact.defs.partitions import CONNECTION_TAG
from expensify_exact.defs.replay import REPLAY_JOB_NAME, REPLAY_OP, SENSOR_NAME
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from tests.conftest import write_mappings
from tests.crash.driver import report_of_entry
from tests.factories import run_cli, store_demo_secrets

NL, BE = "vermeerhals-nl", "vermeerhals-be"
BE_POLICY = "BE00000000000001"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
EINDHOVEN = S._report_id(102)  # seeded with cost center EHV, which neither division has


def _mappings(tmp_path, sandbox=None, extra: int = 0):
    """NL on the first division, BE on the second, and `extra` more connections."""
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    for name, policy, division in [(BE, BE_POLICY, S.SECOND_DIVISION),
                                   *((f"extra-{n:03d}", f"EX{n:014d}", S.DIVISION) for n in range(extra))]:
        conn = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
        conn["name"] = name
        conn["expensify"]["policy_ids"] = [policy]
        conn["exact"]["division"] = division
        document["connections"].append(conn)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def _defs(mappings, connector: ConnectorResource) -> dg.Definitions:
    config = load_project_config(str(mappings))
    return dg.Definitions.merge(replay.build(config), dg.Definitions(resources={"connector": connector}))


def test_the_replay_job_is_one_op_without_a_pool_whatever_the_number_of_connections(tmp_path, state_url):
    for folder, extra in (("few", 0), ("many", 200)):
        job = _defs(_mappings(tmp_path / folder, extra=extra), ConnectorResource(state_url=state_url)
                    ).resolve_job_def(REPLAY_JOB_NAME)
        assert [(node.name, node.pool) for node in job.graph.node_defs] == [(REPLAY_OP, None)]


@pytest.fixture
def quarantined(sandbox, tmp_path, state_url, monkeypatch):
    """NL and BE authorized, each with one report quarantined for the missing cost center EHV."""
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=100_000)
    monkeypatch.setattr(connections, "SystemClock", lambda: sandbox.clock)
    mappings = _mappings(tmp_path, sandbox)
    store_demo_secrets(mappings, state_url, [NL, BE], sandbox=sandbox, monkeypatch=monkeypatch)

    day = sandbox.seed.today - timedelta(days=3)
    brussels = sandbox.expensify.add_report(
        name="Eindhoven visit", employee_email="anna.devries@vermeerhals.nl", policy_id=BE_POLICY,
        approved=datetime.combine(day, time(10), AMSTERDAM),
        expenses=[{"merchant": "NS", "category": "Travel", "tag": "Eindhoven:P1001 Rijkswaterstaat", "amount": 4200,
                   "created": (day - timedelta(days=1)).isoformat()}])
    seeded = next(r for r in sandbox.seed.reports if r.report_id == EINDHOVEN)
    seeded_day = seeded.approved.replace(tzinfo=ZoneInfo("UTC")).astimezone(AMSTERDAM).date()
    store = StateStore(state_url)
    for name, report_id, approved in ((NL, EINDHOVEN, seeded_day), (BE, brussels, day)):
        store.quarantine_put(name, report_id, partition_date=approved.isoformat(), transaction_ids=[],
                             content_hash=None, reasons=[{"code": "UNKNOWN_COST_CENTER", "dimension": "cost_center",
                                                          "value": "EHV", "message": "no cost center EHV"}])
    yield mappings, store, brussels
    store.dispose()


def _entries(sandbox, division: int, report_id: str) -> list[dict]:
    return [e for e in sandbox.exact.entries(division) if report_of_entry(e) == report_id]


def _evaluate(sensor, connector, instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"connector": connector}) as context:
        return sensor(context), context.cursor


def test_the_sensor_asks_one_run_for_every_connection_whose_fingerprint_moved(sandbox, quarantined, state_url,
                                                                              tmp_path):
    mappings, store, brussels = quarantined
    connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
    defs = _defs(mappings, connector)
    sensor, job = defs.resolve_sensor_def(SENSOR_NAME), defs.resolve_job_def(REPLAY_JOB_NAME)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        first, cursor = _evaluate(sensor, connector, instance)
        [request] = first  # a first evaluation has no fingerprint: both count as changed, one run for both
        assert request.tags[CONNECTION_TAG] == f"{NL},{BE}"
        again, _ = _evaluate(sensor, connector, instance)
        assert [r.run_key for r in again] == [request.run_key], "the same fingerprints give the same run key"
        unchanged, cursor = _evaluate(sensor, connector, instance, cursor)
        assert isinstance(unchanged, dg.SkipReason) and f"{NL}: dimensions and mappings unchanged" in \
            unchanged.skip_message and f"{BE}: dimensions and mappings unchanged" in unchanged.skip_message

        sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven", division=S.SECOND_DIVISION)
        [moved], _ = _evaluate(sensor, connector, instance, cursor)
        assert moved.tags[CONNECTION_TAG] == BE and moved.run_key != request.run_key
        result = job.execute_in_process(instance=instance, resources={"connector": connector}, tags=moved.tags)
    assert result.success
    assert list(result.output_for_node(REPLAY_OP)) == [BE]
    assert len(_entries(sandbox, S.SECOND_DIVISION, brussels)) == 1
    assert store.quarantine_get(BE, brussels).status == "replayed"
    assert store.quarantine_get(NL, EINDHOVEN).status == "open", "a run for BE leaves NL alone"


def test_a_connection_that_cannot_replay_stops_no_other(sandbox, quarantined, state_url, tmp_path, monkeypatch):
    mappings, store, brussels = quarantined
    connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
    job = _defs(mappings, connector).resolve_job_def(REPLAY_JOB_NAME)
    for division in (S.DIVISION, S.SECOND_DIVISION):
        sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven", division=division)
    monkeypatch.setattr("sys.stdin", io.StringIO("not-the-secret\n"))  # Expensify refuses NL's login
    assert run_cli(mappings, state_url, "secrets", "set", "--connection", NL, "--stdin",
                   "expensify_partner_user_secret") == 0
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        failed = job.execute_in_process(instance=instance, resources={"connector": connector}, raise_on_error=False,
                                        tags={CONNECTION_TAG: f"{NL},{BE}"})
        assert not failed.success
        [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failure.step_failure_data.user_failure_data.description.startswith(f"{NL}: ")
        replayed = failed.output_for_node(REPLAY_OP)
        assert list(replayed) == [BE] and replayed[BE]["counts"]["posted"] == 1
        assert len(_entries(sandbox, S.SECOND_DIVISION, brussels)) == 1
        assert store.quarantine_get(NL, EINDHOVEN).status == "open"

        monkeypatch.setattr("sys.stdin", io.StringIO(S.EXPENSIFY_PARTNER_USER_SECRET + "\n"))
        assert run_cli(mappings, state_url, "secrets", "set", "--connection", NL, "--stdin",
                       "expensify_partner_user_secret") == 0
        result = job.execute_in_process(instance=instance, resources={"connector": connector})  # no tag: all
    assert result.success
    assert {name: value["counts"]["posted"] for name, value in result.output_for_node(REPLAY_OP).items()} == \
        {NL: 1, BE: 0}
    assert len(_entries(sandbox, S.DIVISION, EINDHOVEN)) == 1
    assert len(_entries(sandbox, S.SECOND_DIVISION, brussels)) == 1, "posted once, not again"
    assert store.quarantine_get(NL, EINDHOVEN).status == "replayed"


def test_a_run_naming_a_connection_that_is_not_configured_fails_and_says_which(tmp_path, state_url):
    connector = ConnectorResource(mappings_dir=str(_mappings(tmp_path)), state_url=state_url)
    job = _defs(tmp_path / "mappings", connector).resolve_job_def(REPLAY_JOB_NAME)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = job.execute_in_process(instance=instance, resources={"connector": connector}, raise_on_error=False,
                                        run_config={"ops": {REPLAY_OP: {"config": {"connections": ["gone", NL]}}}})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no connection named gone" in failure.step_failure_data.user_failure_data.description
