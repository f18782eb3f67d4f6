"""Several connections (Exact divisions) in one deployment: one asset per stage for all of them, partitioned by
connection × day, and through `expensify-exact run` on the embedded instance: one customer whose division cannot be
reached does not stop the others, and `run --connection` posts one customer's range in one run."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.definitions import build_defs
from expensify_exact.defs.assets import EVERY_CONNECTION_CHECK
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.keys import EXPENSE_LINES, GROUP, POSTED, RAW_REPORTS, dimension_key
from expensify_exact.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, partitioning
from expensify_exact_sandbox import seed
from tests.conftest import write_mappings
from tests.crash.driver import report_of_entry
from tests.dagster.test_end_to_end import _expected_report_ids
from tests.factories import run_cli, store_demo_secrets

NL, BROKEN, BE = "vermeerhals-nl", "vermeerhals-de", "vermeerhals-be"
UNREACHABLE_DIVISION = 345678  # not one of the sandbox's divisions: Exact answers 403 WrongDivision
DE_POLICY, BE_POLICY = "DE00000000000001", "BE00000000000001"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")


def write_connections(target: Path, sandbox, specs: list[tuple]) -> Path:
    """The shipped mappings (pointed at `sandbox`, if any) with one connection per spec: (name, timezone[, division[,
    policy ID]]), each a copy of the shipped connection; the first keeps the seed's policy, the others get their own
    policy and no card domain."""
    mappings = write_mappings(target, sandbox, expensify__poll_interval_seconds=0.2)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    shipped = document["connections"][0]
    document["connections"] = []
    for n, (name, zone, *rest) in enumerate(specs):
        conn = yaml.safe_load(yaml.safe_dump(shipped))
        conn.update(name=name, timezone=zone)
        conn["exact"]["division"] = rest[0] if rest else seed.DIVISION
        if n:
            conn["expensify"]["policy_ids"] = [rest[1] if len(rest) > 1 else f"P{n:015d}"]
            conn["expensify"].pop("card_domain", None)
        document["connections"].append(conn)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def test_one_asset_per_stage_for_all_connections_partitioned_by_connection_and_day(tmp_path):
    mappings = write_connections(tmp_path / "mappings", None, [(NL, "Europe/Amsterdam"),
                                                               (BE, "Europe/Brussels", seed.SECOND_DIVISION)])
    defs = build_defs(str(mappings))
    days = partitioning(load_project_config(str(mappings))).days
    for key in (RAW_REPORTS, EXPENSE_LINES, dimension_key("gl_accounts"), POSTED):
        asset = defs.resolve_assets_def(key)
        assert asset.partitions_def == days and asset.group_names_by_key[key] == GROUP
    assert days.get_partitions_def_for_dimension("connection").get_partition_keys() == [NL, BE]
    job = defs.resolve_job_def(MAIN_JOB_NAME)
    assert POSTED.to_python_identifier() in {node.name for node in job.graph.node_defs}
    assert all(node.pool is None for node in job.graph.node_defs), "no pools: the rate-limit board paces each division"


# --- through the CLI, against the sandbox --------------------------------------------------------------------

@pytest.fixture
def three(sandbox, tmp_path, state_url, monkeypatch):
    """NL (the seed's reports), DE on a division Exact refuses, BE on the second division; each authorized with a
    consent of its own, on an embedded Dagster instance in the test's $DAGSTER_HOME."""
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=100_000)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    mappings = write_connections(tmp_path / "mappings", sandbox, [
        (NL, "Europe/Amsterdam"), (BROKEN, "Europe/Berlin", UNREACHABLE_DIVISION, DE_POLICY),
        (BE, "Europe/Brussels", seed.SECOND_DIVISION, BE_POLICY)])
    store_demo_secrets(mappings, state_url, [NL, BROKEN, BE], sandbox=sandbox, monkeypatch=monkeypatch)
    return mappings


def _add_reports(sandbox, policy: str, day, count: int) -> set[str]:
    """`count` valid reports of `policy` submitted and approved around noon (Amsterdam) on `day`."""
    noon = datetime.combine(day, time(12), AMSTERDAM)
    return {sandbox.expensify.add_report(
        name=f"{policy} {n}", employee_email="anna.devries@vermeerhals.nl", policy_id=policy,
        submitted=noon.astimezone(timezone.utc).replace(tzinfo=None), approved=noon + timedelta(minutes=n + 1),
        expenses=[{"merchant": "NS", "category": "Travel", "tag": "Amsterdam:P1001 Rijkswaterstaat",
                   "amount": 4200 + n, "created": (day - timedelta(days=1)).isoformat()}]) for n in range(count)}


def _entries(sandbox, division: int) -> Counter:
    return Counter(report_of_entry(e) for e in sandbox.exact.entries(division))


def _run_of(output: str) -> str:
    return re.search(r"^Run (\S+) for ", output, re.M).group(1)


def test_one_customers_unreachable_division_does_not_stop_the_others(sandbox, three, state_url, capsys):
    day = sandbox.seed.today - timedelta(days=2)
    belgian = _add_reports(sandbox, BE_POLICY, day, 2)
    _add_reports(sandbox, DE_POLICY, day, 1)
    capsys.readouterr()

    assert run_cli(three, state_url, "run", "--start", day.isoformat()) == 1
    out = capsys.readouterr().out

    dutch = _expected_report_ids(sandbox, day, day) - {seed._report_id(101), seed._report_id(102)}
    assert dutch, "the seed approves reports on every day"
    assert _entries(sandbox, seed.DIVISION) == Counter(dutch), "the Dutch reports are posted, once each"
    assert _entries(sandbox, seed.SECOND_DIVISION) == Counter(belgian), out
    assert f"FAILED: 1 connection(s) failed: {BROKEN}" in out
    assert re.search(rf"^{BROKEN}: not run, exact_dimensions failed: DivisionAccessError: .*division {UNREACHABLE_DIVISION} is not accessible", out, re.M), out
    with dg.DagsterInstance.get() as instance:
        [check] = [e.dagster_event.event_specific_data for e in instance.all_logs(
            _run_of(out), of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            if e.dagster_event.event_specific_data.check_name == EVERY_CONNECTION_CHECK]
    assert not check.passed
    assert check.metadata["failed_connections"].value == 1
    assert f"| {BROKEN} | exact_dimensions |" in check.metadata["failures"].value


def test_run_for_one_connection_posts_only_its_reports_in_one_run_over_its_range(sandbox, three, state_url,
                                                                                 capsys):
    end = sandbox.seed.today - timedelta(days=2)
    start = end - timedelta(days=2)
    belgian = set().union(*(_add_reports(sandbox, BE_POLICY, start + timedelta(days=n), 1) for n in range(3)))
    capsys.readouterr()

    assert run_cli(three, state_url, "run", "--connection", BE, "--start", start.isoformat(),
                   "--end", end.isoformat()) == 0
    out = capsys.readouterr().out

    assert _entries(sandbox, seed.SECOND_DIVISION) == Counter(belgian)
    assert sandbox.exact.entries(seed.DIVISION) == [], "nothing of the other customers"
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        assert run.run_id == _run_of(out)
        assert (run.tags[RANGE_START_TAG], run.tags[RANGE_END_TAG]) == (f"{BE}|{start}", f"{BE}|{end}")
        assert instance.get_materialized_partitions(POSTED) == {f"{BE}|{start + timedelta(days=n)}"
                                                                for n in range(3)}
