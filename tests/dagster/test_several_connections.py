"""Two connections (two Exact divisions) in one deployment: each gets its own asset group and pools, and the main job
covers both. The replay job with several connections: tests/dagster/test_replay_job.py."""

import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.keys import asset_key, connector_pools
from expensify_exact_sandbox import seed
from tests.conftest import write_mappings

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

