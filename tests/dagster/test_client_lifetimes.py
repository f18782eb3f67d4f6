"""The ConnectorResource owns the lifetime of the API clients it hands out: every Exact and Expensify client a step
takes from it is closed when Dagster tears the resource down after the step, so a backfill of many steps or a
long-lived daemon never piles up open connection pools, whether or not the asset closed them itself."""

from __future__ import annotations

import dagster as dg

from expensify_exact.config import load_project_config
from expensify_exact.core.connections import SECRET_NAMES
from expensify_exact.defs.resources import ConnectorResource
from tests.conftest import write_mappings


def test_every_client_a_step_takes_from_the_connector_is_closed_when_the_step_ends(tmp_path, state_url, instance):
    mappings = write_mappings(tmp_path / "mappings")
    conn = load_project_config(mappings).connections[0]
    connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
    for name in SECRET_NAMES:
        connector.vault().set(conn.name, name, f"test-{name}")
    taken = []

    @dg.asset
    def takes_clients(connector: ConnectorResource) -> None:
        with connector.expensify_client(conn) as closed_early:
            taken.append(closed_early)
        taken.extend([connector.exact_client(conn), connector.expensify_client(conn)])
        assert [client._http.is_closed for client in taken] == [True, False, False]  # in use until the step ends

    assert dg.materialize([takes_clients], resources={"connector": connector}, instance=instance).success
    assert len(taken) == 3 and all(client._http.is_closed for client in taken)
