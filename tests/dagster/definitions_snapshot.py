"""What a user sees of the code location for two connections: asset keys, groups and partitions, checks, jobs,
schedules and sensors.

`tests/dagster/test_definitions_snapshot.py` compares it with `golden/definitions.json`, so a restructuring that changes
what users see fails loudly. Regenerate on purpose with `python -m tests.dagster.definitions_snapshot`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "definitions.json"


def two_connection_mappings(target: Path) -> Path:
    """The shipped mappings plus a second connection with a company-card domain of its own and another zone."""
    import yaml

    from tests.conftest import write_mappings

    write_mappings(target)
    path = target / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    second = json.loads(json.dumps(document["connections"][0]))
    second["name"] = "noordzee-be"
    second["timezone"] = "Europe/Brussels"
    second["exact"]["division"] = 654321
    second["expensify"].pop("card_domain", None)
    document["connections"].append(second)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def snapshot(mappings_dir: Path) -> dict:
    from expensify_exact.definitions import build_defs

    defs = build_defs(str(mappings_dir))
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "partitions": _partitions(node.partitions_def),
            "deps": sorted(d.to_user_string() for d in node.parent_keys),
        }
    checks = sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys)
    repo = defs.get_repository_def()
    jobs = sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__"))
    schedules = sorted(s.name for s in repo.schedule_defs)
    sensors = sorted(s.name for s in repo.sensor_defs)
    return {"assets": assets, "checks": checks, "jobs": jobs, "schedules": schedules, "sensors": sensors}


def _partitions(partitions_def) -> dict | None:
    """Each dimension: its static keys (the connections), else the kind of time window."""
    import dagster as dg

    if partitions_def is None:
        return None
    dims = partitions_def.partitions_defs if isinstance(partitions_def, dg.MultiPartitionsDefinition) else [
        dg.PartitionDimensionDefinition("", partitions_def)]
    return {d.name: d.partitions_def.get_partition_keys() if isinstance(d.partitions_def, dg.StaticPartitionsDefinition)
            else type(d.partitions_def).__name__ for d in dims}


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = snapshot(two_connection_mappings(Path(tmp) / "mappings"))
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(data['assets'])} assets, {len(data['checks'])} checks, {len(data['jobs'])} jobs",
          file=sys.stderr)


if __name__ == "__main__":
    main()
