"""Two connections (two Exact divisions) in one deployment: each gets its own asset group and pools, the main job
covers both, and the replay job has one op per connection in that division's pool, limited by the run's tag."""

import dagster as dg
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.keys import asset_key, connector_pools
from expensify_exact.defs.replay import CONNECTION_TAG, REPLAY_JOB_NAME, replay_op_name
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox import seed
from tests.conftest import write_mappings
from tests.factories import run_cli

NL, BE = "vermeerhals-nl", "vermeerhals-be"


@pytest.fixture
def two_connections(tmp_path):
    mappings = write_mappings(tmp_path / "mappings")
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    belgian = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
    belgian["name"] = BE
    belgian["timezone"] = "Europe/Brussels"
    belgian["expensify"]["policy_ids"] = ["BE00000000000001"]
    belgian["exact"]["division"] = seed.SECOND_DIVISION
    document["connections"].append(belgian)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def test_each_connection_has_its_own_group_pools_and_ops(two_connections):
    config = load_project_config(str(two_connections))
    defs = build_defs(str(two_connections))
    assert connector_pools(config) == [f"exact_division_{seed.DIVISION}", f"exact_division_{seed.SECOND_DIVISION}",
                                       "expensify_vermeerhals_be", "expensify_vermeerhals_nl"]
    for name, division in ((NL, seed.DIVISION), (BE, seed.SECOND_DIVISION)):
        slug = name.replace("-", "_")
        raw = defs.resolve_assets_def(asset_key(name, "expensify", "raw_reports"))
        posted = defs.resolve_assets_def(asset_key(name, "exact", "journal_entries_posted"))
        dimensions = defs.resolve_assets_def(asset_key(name, "exact", "gl_accounts"))
        assert raw.group_names_by_key[raw.key] == slug
        assert raw.op.pool == f"expensify_{slug}"
        assert posted.op.pool == dimensions.op.pool == f"exact_division_{division}"

    main_ops = {node.name for node in defs.resolve_job_def(MAIN_JOB_NAME).graph.node_defs}
    posting = {asset_key(c, "exact", "journal_entries_posted").to_python_identifier() for c in (NL, BE)}
    assert posting <= main_ops
    replay = defs.resolve_job_def(REPLAY_JOB_NAME)
    pools = {node.name: node.pool for node in replay.graph.node_defs}
    assert pools == {replay_op_name(NL): f"exact_division_{seed.DIVISION}",
                     replay_op_name(BE): f"exact_division_{seed.SECOND_DIVISION}"}


def test_a_replay_run_tagged_for_one_connection_leaves_the_other_alone(two_connections, state_url, tmp_path):
    for name in (NL, BE):
        assert run_cli(two_connections, state_url, "secrets", "set", "--connection", name, "--from-env") == 0
    connector = ConnectorResource(mappings_dir=str(two_connections), state_url=state_url)
    store = connector.store()
    store.quarantine_put(NL, "R00NL0000001", partition_date="2026-11-20",
                         reasons=[{"code": "UNKNOWN_COST_CENTER", "value": "EHV"}], transaction_ids=["1"],
                         content_hash="h")
    job = build_defs(str(two_connections)).resolve_job_def(REPLAY_JOB_NAME)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        # Nothing of the Belgian division is quarantined, so its op calls no API; the Dutch op must not run at all
        # (its open item would need both APIs, and none are reachable from this test).
        result = job.execute_in_process(instance=instance, resources={"connector": connector},
                                        tags={CONNECTION_TAG: BE})
    assert result.success
    assert result.output_for_node(replay_op_name(NL)) == {}
    belgian = result.output_for_node(replay_op_name(BE))
    assert belgian["connection"] == BE and belgian["outcomes"] == [] and not any(belgian["counts"].values())
    assert store.quarantine_get(NL, "R00NL0000001").status == "open"
