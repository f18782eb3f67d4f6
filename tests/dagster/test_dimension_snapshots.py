"""The stored dimension snapshot through Dagster runs of the asset chain against the sandbox over real HTTP: a run in
which nothing changed spends at most two calls on dimensions (counted by the sandbox), a cost center added or ended
in Exact is seen by the next run, and a table that is not checked every run is re-read after a webhook says it
changed.
"""

import json
from datetime import timedelta

import dagster as dg
import httpx
import pytest

from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.core.webhooks import WebhookProcessor, WebhookServer, sign, vault_secrets, webhook_app
from expensify_exact.defs import assets, jobs, resources
from expensify_exact.defs.partitions import partition_key
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox import seed

CONNECTION = "vermeerhals-nl"
# Every call a dimension refresh may make: the division check and the six tables (and the GL accounts' sync twin).
DIMENSION_ENDPOINTS = {"GET current/Me", "GET system/Divisions", "GET financial/GLAccounts",
                       "GET sync/Financial/GLAccounts", "GET hrm/Costcenters", "GET hrm/Costunits",
                       "GET financial/Journals", "GET vat/VATCodes", "GET financial/FinancialPeriods"}


@pytest.fixture
def connector(sandbox_mappings, state_url):
    assert main(["--mappings", str(sandbox_mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 CONNECTION, "--from-env"]) == 0
    return ConnectorResource(mappings_dir=str(sandbox_mappings), state_url=state_url)


def _run(connector, instance, day: str) -> dg.ExecuteInProcessResult:
    config = load_project_config(connector.mappings_dir)
    defs = dg.Definitions.merge(*(m.build(config) for m in (assets, jobs, resources)))
    result = defs.resolve_job_def(jobs.MAIN_JOB_NAME).execute_in_process(
        instance=instance, resources={"connector": connector}, partition_key=partition_key(CONNECTION, day),
        raise_on_error=False)
    assert result.success
    return result


def _table(result, name: str):
    return result.output_for_node("exact_dimensions", name)


def _dimension_calls(sandbox) -> dict[str, int]:
    return {k: v for k, v in sandbox.exact.stats["calls"].items() if k in DIMENSION_ENDPOINTS}


def _api_calls(sandbox) -> int:
    return sum(v for k, v in sandbox.exact.stats["calls"].items() if k != "POST oauth2/token")


def test_a_run_where_nothing_changed_spends_two_calls_and_changes_in_exact_are_seen_next_run(
        sandbox, connector, instance):
    today = sandbox.seed.today
    day = (today - timedelta(days=2)).isoformat()
    first = _run(connector, instance, day)
    assert "EHV" not in set(_table(first, "cost_centers")["code"])

    sandbox.exact.reset_stats()
    _run(connector, instance, day)  # everything already posted, nothing changed in Exact
    assert _api_calls(sandbox) <= 2, sandbox.exact.stats["calls"]

    # A cost center added and one ended in Exact: the very next run sees both, still within two calls.
    ended = today - timedelta(days=1)
    sandbox.exact.add_cost_center("EHV", "Eindhoven")
    sandbox.exact.add_cost_center("RTM", end_date=ended)
    sandbox.exact.reset_stats()
    third = _run(connector, instance, day)
    centers = _table(third, "cost_centers").set_index("code")
    assert "EHV" in centers.index
    assert centers.loc["RTM", "end_date"] == ended
    assert sum(_dimension_calls(sandbox).values()) <= 2, sandbox.exact.stats["calls"]


def test_a_webhook_makes_the_next_run_read_a_table_it_does_not_check_every_run(sandbox, connector, instance):
    day = (sandbox.seed.today - timedelta(days=2)).isoformat()
    _run(connector, instance, day)

    sandbox.exact.add_cost_unit("P2001", "Havenbedrijf fase 2")
    unseen = _run(connector, instance, day)
    assert "P2001" not in set(_table(unseen, "cost_units")["code"]), "cost units are not read every run"

    # Exact's notification about the cost unit, signed with the app's webhook secret, through the receiver.
    processor = WebhookProcessor(connector.project(), connector.store(), vault_secrets(connector))
    content = json.dumps({"Topic": "CostUnits", "ClientId": "x", "Division": seed.DIVISION, "Action": "Create",
                          "Key": "6f0c1a52-3c1e-4bd5-9a55-2a2b7d0c3e11", "ExactOnlineEndpoint": "",
                          "EventCreatedOn": "2026-12-06T04:00:00"}, separators=(",", ":"))
    secret = vault_secrets(connector)(CONNECTION)
    body = '{"Content":' + content + ',"HashCode":"' + sign(content.encode(), secret) + '"}'
    with WebhookServer(webhook_app(processor)) as receiver:
        assert httpx.post(receiver.url, content=body).status_code == 200

    sandbox.exact.reset_stats()
    seen = _run(connector, instance, day)
    assert "P2001" in set(_table(seen, "cost_units")["code"])
    calls = _dimension_calls(sandbox)
    assert calls.get("GET hrm/Costunits") == 1 and sum(calls.values()) <= 3, calls
