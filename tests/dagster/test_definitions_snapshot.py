"""The code location's asset keys and partitions, checks, jobs, schedules and sensors match the recorded snapshot."""

import json

from tests.dagster.definitions_snapshot import GOLDEN, snapshot, two_connection_mappings


def test_what_users_see_of_the_code_location_is_unchanged(tmp_path):
    expected = json.loads(GOLDEN.read_text())
    actual = json.loads(json.dumps(snapshot(two_connection_mappings(tmp_path / "mappings")), sort_keys=True))
    for part in ("assets", "checks", "jobs", "schedules", "sensors"):
        assert actual[part] == expected[part], (
            f"{part} changed; if on purpose, regenerate with `python -m tests.dagster.definitions_snapshot`")
