"""The daily sensor asks for the connection's newest closed day (with its look-back) and prepares the connector's
pools before the run claims them."""

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from expensify_exact.config import load_project_config
from expensify_exact.core import connections
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import MAIN_JOB_NAME, RANGE_END_TAG, RANGE_START_TAG, SENSOR_NAME
from expensify_exact.defs.keys import connector_pools, ensure_pools
from expensify_exact.defs.replay import CONNECTION_TAG
from expensify_exact.defs.resources import ConnectorResource
from tests.conftest import MAPPINGS
from tests.factories import FakeClock

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
POOLS_LIMITED = {"concurrency": {"pools": {"default_limit": 1}}}


@pytest.fixture
def config():
    return load_project_config(str(MAPPINGS))


def _limits(instance) -> dict[str, int]:
    return {pool.name: pool.limit for pool in instance.event_log_storage.get_pool_limits()}


def test_the_shipped_mappings_have_one_exact_and_one_expensify_pool_per_connection(config):
    assert connector_pools(config) == ["exact_division_123456", "expensify_vermeerhals_nl"]


@pytest.mark.parametrize("now, day", [
    (datetime(2026, 11, 25, 6, 15, tzinfo=AMSTERDAM), "2026-11-24"),
    # the day is over at midnight in Amsterdam, but posted only after the grace hour
    (datetime(2026, 11, 25, 0, 59, tzinfo=AMSTERDAM), "2026-11-23"),
    (datetime(2026, 11, 25, 1, 0, tzinfo=AMSTERDAM), "2026-11-24"),
    # 01:00 in Amsterdam on the night summer time began is still the previous evening in UTC
    (datetime(2026, 3, 30, 1, 0, tzinfo=AMSTERDAM), "2026-03-29"),
])
def test_sensor_requests_the_closed_day_with_its_look_back_and_creates_the_pools_first(tmp_path, config, monkeypatch,
                                                                                      now, day):
    monkeypatch.setattr(connections, "SystemClock", lambda: FakeClock(now))
    defs = build_defs(str(MAPPINGS))
    sensor = defs.get_repository_def().get_sensor_def(SENSOR_NAME)
    connector = ConnectorResource(mappings_dir=str(MAPPINGS), state_url=f"sqlite:///{tmp_path / 'state.db'}")
    with dg.instance_for_test(overrides=POOLS_LIMITED, temp_dir=str(tmp_path)) as instance:
        assert _limits(instance) == {}
        with dg.build_sensor_context(instance=instance, resources={"connector": connector},
                                     repository_def=defs.get_repository_def()) as context:
            [request] = sensor.evaluate_tick(context).run_requests
        assert request.run_key == f"vermeerhals-nl:{day}"
        start = (date.fromisoformat(day) - timedelta(days=3)).isoformat()
        assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (start, day)
        assert request.tags[CONNECTION_TAG] == "vermeerhals-nl"
        main_job = defs.resolve_job_def(MAIN_JOB_NAME)
        assert set(request.asset_selection) == set(main_job.asset_layer.executable_asset_keys)
        assert _limits(instance) == {pool: 1 for pool in connector_pools(config)}
        assert not any(p.from_default for p in instance.event_log_storage.get_pool_limits())


def test_ensure_pools_keeps_a_limit_an_operator_set(tmp_path, config):
    with dg.instance_for_test(overrides=POOLS_LIMITED, temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("exact_division_123456", 3)
        assert ensure_pools(instance, config) == {"exact_division_123456": 3, "expensify_vermeerhals_nl": 1}
        assert ensure_pools(instance, config) == {"exact_division_123456": 3, "expensify_vermeerhals_nl": 1}


def test_without_a_default_limit_no_pool_is_created(tmp_path, config):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert ensure_pools(instance, config) == {pool: None for pool in connector_pools(config)}
        assert _limits(instance) == {}


def test_the_pools_sensor_creates_the_pools_for_runs_the_schedule_does_not_start(tmp_path, config):
    from expensify_exact.defs.pools import SENSOR_NAME

    defs = build_defs(str(MAPPINGS))
    sensor = defs.get_repository_def().get_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test(overrides=POOLS_LIMITED, temp_dir=str(tmp_path)) as instance:
        with dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()) as context:
            result = sensor.evaluate_tick(context)
        assert result.run_requests == []
        assert result.skip_message == "pool limits: exact_division_123456=1, expensify_vermeerhals_nl=1"
        assert _limits(instance) == {pool: 1 for pool in connector_pools(config)}
