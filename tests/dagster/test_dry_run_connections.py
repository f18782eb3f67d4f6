"""The `dry_run` job over several connections against the sandbox: four ops whatever the number of connections, the
connections of one Expensify credential exported in one export job and split by policy, each connection's drafts and
verdicts in the one preview output, a connection that cannot run named in the failure without stopping the others,
and nothing written anywhere."""

from __future__ import annotations

import json
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.core import connections
from expensify_exact.defs import dry_run
from expensify_exact.defs.dry_run import DAYS_OP, DRY_RUN_JOB_NAME, PREVIEW_OP
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox import seed as S
from tests.conftest import write_mappings
from tests.factories import run_cli, state_rows, store_demo_secrets

NL, BE, DE = "vermeerhals-nl", "vermeerhals-be", "vermeerhals-de"
BE_POLICY, DE_POLICY = "BE00000000000001", "DE00000000000001"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")


def _clone(document: dict, name: str, policy: str, division: int, credential: str | None) -> dict:
    conn = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
    conn["name"] = name
    conn["expensify"]["policy_ids"] = [policy]
    conn["expensify"]["credential"] = credential
    conn["exact"]["division"] = division
    return conn


def _mappings(tmp_path, sandbox=None, extra: int = 0):
    """NL and BE share the Expensify credential `vermeerhals`; DE has a login of its own; `extra` more connections."""
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2,
                              expensify__credential="vermeerhals")
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    document["connections"] += [_clone(document, BE, BE_POLICY, S.SECOND_DIVISION, "vermeerhals"),
                                _clone(document, DE, DE_POLICY, S.SECOND_DIVISION, None)]
    document["connections"] += [_clone(document, f"extra-{n:03d}", f"EX{n:014d}", S.DIVISION, None)
                                for n in range(extra)]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def _job(mappings, connector: ConnectorResource) -> dg.JobDefinition:
    config = load_project_config(str(mappings))
    return dg.Definitions.merge(dry_run.build(config), dg.Definitions(resources={"connector": connector})
                                ).resolve_job_def(DRY_RUN_JOB_NAME)


def test_the_dry_run_is_four_ops_whatever_the_number_of_connections(tmp_path, state_url):
    few = _job(_mappings(tmp_path / "few"), ConnectorResource(state_url=state_url))
    many = _job(_mappings(tmp_path / "many", extra=200), ConnectorResource(state_url=state_url))
    expected = ["dry_run_days", "dry_run_export", "dry_run_dimensions", "dry_run_preview"]
    for job in (few, many):
        assert [node.name for node in job.graph.node_defs] == expected
        assert all(node.pool is None for node in job.graph.node_defs)


@pytest.fixture
def setup(sandbox, tmp_path, state_url, monkeypatch):
    """NL and BE authorized (their shared Expensify login once, each division its own consent), DE not: its secrets
    are missing."""
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=100_000)
    monkeypatch.setattr(connections, "SystemClock", lambda: sandbox.clock)
    mappings = _mappings(tmp_path, sandbox)
    store_demo_secrets(mappings, state_url, [NL, BE], sandbox=sandbox, monkeypatch=monkeypatch,
                       credential="vermeerhals")
    return mappings


def test_one_export_per_credential_every_connections_preview_and_a_failing_connection_stops_no_other(
        sandbox, setup, state_url, tmp_path):
    end = sandbox.seed.today - timedelta(days=1)
    start = end - timedelta(days=9)
    brussels = [sandbox.expensify.add_report(
        name=f"Brussels {n}", employee_email="anna.devries@vermeerhals.nl", policy_id=BE_POLICY,
        approved=datetime.combine(end - timedelta(days=n), time(10), AMSTERDAM),
        expenses=[{"merchant": "SNCB", "category": "Travel", "tag": "Amsterdam:P1001 Rijkswaterstaat", "amount": 4200,
                   "created": (end - timedelta(days=n + 1)).isoformat()}]) for n in (1, 2)]
    exports_before = sandbox.expensify.stats["export_jobs"]
    before = state_rows(state_url)

    connector = ConnectorResource(mappings_dir=str(setup), state_url=state_url)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = _job(setup, connector).execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"ops": {DAYS_OP: {"config": {"start": start.isoformat(), "end": end.isoformat()}}}})

    assert not result.success, "a connection that could not be previewed fails the run"
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == PREVIEW_OP
    assert failure.step_failure_data.user_failure_data.description.startswith(f"{DE}: dry_run_export failed: ")
    previews = {p.connection: p for p in result.output_for_node(PREVIEW_OP)}
    assert list(previews) == [NL, BE], "the connections that got through are all shown, in config order"
    assert {v.report_id: v.action for v in previews[BE].verdicts} == {r: "post" for r in brussels}
    nl_actions = {v.report_id: v.action for v in previews[NL].verdicts}
    assert nl_actions[S._report_id(102)] == "quarantine" and not set(brussels) & set(nl_actions)
    for preview in previews.values():
        assert set(preview.drafts.lines["report_id"]) == {v.report_id for v in preview.verdicts
                                                          if v.action == "post"}
    assert sandbox.expensify.stats["export_jobs"] - exports_before == 1, "NL and BE share one export job"

    after = state_rows(state_url)
    after.pop("ee_exact_tokens"), before.pop("ee_exact_tokens")  # a rotated single-use refresh token must be kept
    assert after == before, "a dry run writes nothing to the state DB"
    assert not [e for e in result.all_events if e.is_step_materialization], "a dry run materializes nothing"
    assert sandbox.exact.entries(S.DIVISION) == [] and sandbox.exact.entries(S.SECOND_DIVISION) == []


def test_run_dry_run_for_one_connection_previews_only_that_one(sandbox, setup, state_url, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "cli_home"))
    end = sandbox.seed.today - timedelta(days=1)
    before = state_rows(state_url)
    capsys.readouterr()
    # DE cannot run (no secrets), but the dry run is for BE alone: it succeeds.
    assert run_cli(setup, state_url, "run", "--start", (end - timedelta(days=9)).isoformat(), "--end",
                   end.isoformat(), "--dry-run", "--connection", BE, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dry_run"] and shown["success"] and list(shown["connections"]) == [BE]
    after = state_rows(state_url)
    after.pop("ee_exact_tokens"), before.pop("ee_exact_tokens")
    assert after == before
