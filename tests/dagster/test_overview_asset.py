"""The overview asset, materialized by Dagster on a seeded state store: the table worst first in its metadata with
the totals, and checks that fail naming the connections at fault, then pass once those are dealt with."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import yaml

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.config import load_project_config
from expensify_exact.core.connections import StoredRateLimitBoard, VaultTokenStore
from expensify_exact.core.overview import connection_overview, record_run, totals
from expensify_exact.defs import overview
from expensify_exact.defs.keys import OVERVIEW_GROUP
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from tests.conftest import write_mappings

NAMES = ["alpha-nl", "bravo-nl", "charlie-nl"]


def three_connections(target: Path) -> Path:
    mappings = write_mappings(target)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    first = document["connections"][0]
    document["connections"] = [
        {**first, "name": name, "expensify": {**first["expensify"], "policy_ids": [f"POLICY{i}"]},
         "exact": {**first["exact"], "division": 200 + i}} for i, name in enumerate(NAMES)]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def tokens(store: StateStore, connection: str, age: timedelta) -> None:
    issued = datetime.now(timezone.utc) - age
    VaultTokenStore(store, CredentialVault(store)).save(
        connection, ExactTokens("a", "r", access_expires_at=issued + timedelta(minutes=10), issued_at=issued))


def budget(store: StateStore, division: int, remaining: int) -> None:
    now = datetime.now(timezone.utc)
    StoredRateLimitBoard(store, division).save(RateLimitSnapshot(now, 55, 60, now + timedelta(seconds=30), remaining,
                                                                 5000, now + timedelta(hours=6)))


def materialize(mappings: Path, state_url: str, instance) -> dg.ExecuteInProcessResult:
    defs = overview.build(load_project_config(mappings))
    [asset] = defs.assets
    result = dg.materialize([asset], instance=instance, resources={
        "connector": ConnectorResource(mappings_dir=str(mappings), state_url=state_url)})
    assert result.success
    return result


def metadata(result) -> dict:
    [event] = result.get_asset_materialization_events()
    return {key: getattr(value, "value", value) for key, value in event.materialization.metadata.items()}


def checks(result) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, e.metadata["at_fault"].value) for e in result.get_asset_check_evaluations()}


def test_the_overview_asset_shows_the_table_worst_first_and_its_checks_name_the_connections_at_fault(
        tmp_path, state_url, instance):
    mappings = three_connections(tmp_path / "mappings")
    store = StateStore(state_url)
    tokens(store, "alpha-nl", timedelta(days=1))
    tokens(store, "bravo-nl", timedelta(days=1))
    tokens(store, "charlie-nl", timedelta(days=27))
    budget(store, 200, 4000)
    budget(store, 202, 120)
    record_run(store, "alpha-nl", "run-a", ["2026-11-24"], counts={"posted": 20})
    record_run(store, "bravo-nl", "run-b", ["2026-11-24"], failed="raw_reports: ExpensifyError: 401 bad credentials")
    record_run(store, "charlie-nl", "run-c", ["2026-11-24"], counts={"posted": 20})

    result = materialize(mappings, state_url, instance)
    shown = metadata(result)
    table = shown["overview"]
    assert table.index("bravo-nl") < table.index("charlie-nl") < table.index("alpha-nl"), table
    assert "last run failed: raw_reports: ExpensifyError: 401 bad credentials" in table
    assert (shown["connections"], shown["connections_failing"], shown["connections_attention"],
            shown["connections_ok"]) == (3, 1, 1, 1)
    found = checks(result)
    assert found["no_failed_connections"][0] is False and "bravo-nl" in found["no_failed_connections"][1]
    assert "charlie-nl" not in found["no_failed_connections"][1]
    assert found["tokens_fresh"][0] is False and "charlie-nl" in found["tokens_fresh"][1]
    assert found["budgets_left"][0] is False and "120/5000" in found["budgets_left"][1]
    assert found["runs_on_time"] == (True, "_none_")
    assert overview.OVERVIEW in {k for k in instance.get_asset_keys()}

    # bravo's next run posts, charlie's token is refreshed and its division's budget resets: all checks pass.
    record_run(store, "bravo-nl", "run-d", ["2026-11-24"], counts={"posted": 20})
    tokens(store, "charlie-nl", timedelta(minutes=5))
    budget(store, 202, 5000)
    found = checks(materialize(mappings, state_url, instance))
    assert {name: passed for name, (passed, _) in found.items()} == {
        "no_failed_connections": True, "tokens_fresh": True, "budgets_left": True, "runs_on_time": True}
    store.dispose()


def test_the_overview_is_its_own_group_refreshed_hourly_by_a_schedule_that_starts_running():
    defs = overview.build(load_project_config(Path(__file__).resolve().parents[2] / "mappings"))
    [asset] = defs.assets
    assert asset.group_names_by_key[overview.OVERVIEW] == OVERVIEW_GROUP
    assert not asset.partitions_def, "one table for all connections"
    [schedule] = defs.schedules
    assert (schedule.name, schedule.cron_schedule, schedule.job_name) == (
        overview.SCHEDULE_NAME, "5 * * * *", overview.JOB_NAME)
    assert schedule.default_status is dg.DefaultScheduleStatus.RUNNING


def test_the_table_in_the_ui_keeps_the_worst_hundred_says_how_many_more_and_ends_with_the_totals(store):
    base = load_project_config(Path(__file__).resolve().parents[2] / "mappings")
    first = base.connections[0]
    config = base.model_copy(update={"connections": [
        first.model_copy(update={"name": f"c{i:03d}", "exact": first.exact.model_copy(update={"division": 500 + i})})
        for i in range(overview.TABLE_ROWS + 5)]})
    tokens(store, "c104", timedelta(days=1))  # the one connection not failing: it ends up last, left out
    rows = connection_overview(config, store, ConnectorResource().clock())
    frame = overview.overview_frame(rows, totals(rows))
    assert len(frame) == overview.TABLE_ROWS + 2
    assert "c104" not in set(frame["connection"])
    assert frame.iloc[-2]["connection"] == "… 5 more (`expensify-exact status --all`)"
    assert list(frame.iloc[-1][["health", "connection"]]) == ["TOTAL", "105 connections"]
