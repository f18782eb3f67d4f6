"""The sensors ask for runs over rectangles of connection × day: each connection's newest closed day with its
look-back, consecutive connections (in config order) that need the same days in one run, at most
$EXPENSIFY_EXACT_CONNECTIONS_PER_RUN of them, and each connection's day asked for once (the cursor). No pools: the
runs' asset steps claim none."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from expensify_exact.core import connections
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import MAIN_JOB_NAME, SENSOR_NAME, TRIGGER_TAG
from expensify_exact.defs.partitions import (
    CONNECTIONS_PER_RUN_ENV,
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    connections_of_run,
    partitioning,
)
from expensify_exact.defs.resources import ConnectorResource
from tests.conftest import MAPPINGS
from tests.dagster.test_several_connections import write_connections
from tests.factories import FakeClock

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
UTC = ZoneInfo("UTC")
CONNECTION = "vermeerhals-nl"


class Sensor:
    """The daily sensor of one code location, evaluated as the daemon would: the cursor carried from tick to tick."""

    def __init__(self, mappings, tmp_path, instance):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.defs = build_defs(str(mappings))
        self.sensor = self.defs.get_repository_def().get_sensor_def(SENSOR_NAME)
        self.connector = ConnectorResource(mappings_dir=str(mappings), state_url=f"sqlite:///{tmp_path / 'state.db'}")
        self.instance = instance
        self.cursor: str | None = None

    def tick(self) -> list[dg.RunRequest]:
        with dg.build_sensor_context(instance=self.instance, resources={"connector": self.connector},
                                     repository_def=self.defs.get_repository_def(), cursor=self.cursor) as context:
            result = self.sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return result.run_requests


def _at(monkeypatch, moment: datetime) -> None:
    monkeypatch.setattr(connections, "SystemClock", lambda: FakeClock(moment))


@pytest.mark.parametrize("now, day", [
    (datetime(2026, 11, 25, 6, 15, tzinfo=AMSTERDAM), "2026-11-24"),
    # the day is over at midnight in Amsterdam, but posted only after the grace hour
    (datetime(2026, 11, 25, 0, 59, tzinfo=AMSTERDAM), "2026-11-23"),
    (datetime(2026, 11, 25, 1, 0, tzinfo=AMSTERDAM), "2026-11-24"),
    # 01:00 in Amsterdam on the night summer time began is still the previous evening in UTC
    (datetime(2026, 3, 30, 1, 0, tzinfo=AMSTERDAM), "2026-03-29"),
])
def test_sensor_requests_the_closed_day_with_its_look_back_once(tmp_path, instance, monkeypatch, now, day):
    _at(monkeypatch, now)
    sensor = Sensor(MAPPINGS, tmp_path, instance)
    [request] = sensor.tick()
    start = (date.fromisoformat(day) - timedelta(days=3)).isoformat()
    assert request.run_key.startswith(f"day_closed:{start}..{day}:{CONNECTION}..{CONNECTION}:")
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (f"{CONNECTION}|{start}",
                                                                            f"{CONNECTION}|{day}")
    assert request.tags[TRIGGER_TAG] == "day_closed"
    assert request.asset_selection is None, "the run is the main job's, over all of its assets"
    assert sensor.tick() == [], "the cursor keeps the day asked for"


def test_the_main_job_claims_no_pool(tmp_path):
    job = build_defs(str(MAPPINGS)).resolve_job_def(MAIN_JOB_NAME)
    assert {node.name: node.pool for node in job.graph.node_defs} == dict.fromkeys(
        (node.name for node in job.graph.node_defs), None)


# Config order: two in Amsterdam, two in Los Angeles, one more in Amsterdam.
FIVE = [("ams-1", "Europe/Amsterdam"), ("ams-2", "Europe/Amsterdam"), ("la-1", "America/Los_Angeles"),
        ("la-2", "America/Los_Angeles"), ("ams-3", "Europe/Amsterdam")]


@pytest.fixture
def five(tmp_path):
    return write_connections(tmp_path / "mappings", None, [(name, zone) for name, zone in FIVE])


def _rectangle(request: dg.RunRequest, names: list[str]) -> tuple[list[str], str, str]:
    """(connections, first day, last day) of a request, checked against the partitions its tags select."""
    tags = request.tags
    if PARTITION_TAG in tags:
        connection, day = tags[PARTITION_TAG].split("|")
        return [connection], day, day
    (first, start), (last, end) = tags[RANGE_START_TAG].split("|"), tags[RANGE_END_TAG].split("|")
    covered = connections_of_run(tags, names)
    assert covered[0] == first and covered[-1] == last
    return covered, start, end


def _keys_selected(request: dg.RunRequest, mappings) -> set[str]:
    from expensify_exact.config import load_project_config

    days = partitioning(load_project_config(str(mappings))).days
    keys = days.get_partition_keys_in_range(dg.PartitionKeyRange(request.tags[RANGE_START_TAG],
                                                                  request.tags[RANGE_END_TAG]))
    return {str(k) for k in keys}


def test_consecutive_connections_needing_the_same_days_share_one_run_and_each_day_is_asked_once(
        five, tmp_path, instance, monkeypatch):
    names = [name for name, _ in FIVE]
    # 02:00 UTC on 25 November: Amsterdam's 24th is over (03:00 there), Los Angeles is still on the 24th (18:00).
    _at(monkeypatch, datetime(2026, 11, 25, 2, 0, tzinfo=UTC))
    sensor = Sensor(five, tmp_path, instance)
    requests = sensor.tick()
    assert [_rectangle(r, names) for r in requests] == [
        (["ams-1", "ams-2"], "2026-11-21", "2026-11-24"),
        (["la-1", "la-2"], "2026-11-20", "2026-11-23"),
        (["ams-3"], "2026-11-21", "2026-11-24"),  # the same days as ams-1, but not next to it in config order
    ]
    # A run's range selects exactly its rectangle: its connections × its days, nobody else's.
    assert _keys_selected(requests[0], five) == {f"{c}|2026-11-{d}" for c in ("ams-1", "ams-2") for d in range(21, 25)}
    assert len({r.run_key for r in requests}) == 3
    assert sensor.tick() == [], "a second evaluation asks nothing new"

    # 10:00 UTC: the 24th is over in Los Angeles (02:00 there) too; only the two Los Angeles connections want it.
    _at(monkeypatch, datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    [request] = sensor.tick()
    assert _rectangle(request, names) == (["la-1", "la-2"], "2026-11-21", "2026-11-24")
    assert sensor.tick() == []


def test_a_run_covers_at_most_the_connections_per_run_limit(five, tmp_path, instance, monkeypatch):
    names = [name for name, _ in FIVE]
    # 10:00 UTC: every connection's newest closed day is the 24th, so all five want the same days.
    _at(monkeypatch, datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    [request] = Sensor(five, tmp_path / "one", instance).tick()
    assert _rectangle(request, names) == (names, "2026-11-21", "2026-11-24")
    assert len(_keys_selected(request, five)) == 5 * 4

    monkeypatch.setenv(CONNECTIONS_PER_RUN_ENV, "2")
    requests = Sensor(five, tmp_path / "two", instance).tick()  # a sensor of its own: no cursor yet
    assert [_rectangle(r, names) for r in requests] == [
        (["ams-1", "ams-2"], "2026-11-21", "2026-11-24"),
        (["la-1", "la-2"], "2026-11-21", "2026-11-24"),
        (["ams-3"], "2026-11-21", "2026-11-24"),
    ]
