"""The daily schedule asks for yesterday's partition and prepares the connector's pools before the run claims them."""

from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from expensify_exact.config import load_project_config
from expensify_exact.definitions import build_defs
from expensify_exact.defs.jobs import SCHEDULE_NAME
from expensify_exact.defs.keys import connector_pools, ensure_pools
from tests.conftest import MAPPINGS

POOLS_LIMITED = {"concurrency": {"pools": {"default_limit": 1}}}


@pytest.fixture
def config():
    return load_project_config(str(MAPPINGS))


def _limits(instance) -> dict[str, int]:
    return {pool.name: pool.limit for pool in instance.event_log_storage.get_pool_limits()}


def test_the_shipped_mappings_have_one_exact_and_one_expensify_pool_per_connection(config):
    assert connector_pools(config) == ["exact_division_123456", "expensify_vermeerhals_nl"]


@pytest.mark.parametrize("scheduled, partition", [
    (datetime(2026, 11, 25, 6, 15, tzinfo=ZoneInfo("Europe/Amsterdam")), "2026-11-24"),
    # 00:30 in Amsterdam is still the previous evening in UTC: the partition follows Amsterdam's calendar
    (datetime(2026, 3, 30, 0, 30, tzinfo=ZoneInfo("Europe/Amsterdam")), "2026-03-29"),
])
def test_schedule_requests_yesterday_and_creates_the_pools_first(tmp_path, config, scheduled, partition):
    defs = build_defs(str(MAPPINGS))
    schedule = defs.get_repository_def().get_schedule_def(SCHEDULE_NAME)
    assert schedule.execution_timezone == "Europe/Amsterdam" and schedule.cron_schedule == "15 6 * * *"
    with dg.instance_for_test(overrides=POOLS_LIMITED, temp_dir=str(tmp_path)) as instance:
        assert _limits(instance) == {}
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=scheduled,
                                       repository_def=defs.get_repository_def()) as context:
            [request] = schedule.evaluate_tick(context).run_requests
        assert request.partition_key == partition and request.run_key == partition
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
