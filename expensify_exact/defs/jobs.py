"""The main job over every connection's asset group; the sensor that posts each connection's day once it has ended
in the connection's timezone, and the one that posts deferred reports once Exact's daily budget has reset."""

from collections.abc import Callable
from datetime import datetime

import dagster as dg

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.days import DayRun, daily_run, deferred_run
from expensify_exact.defs.keys import ensure_pools, group_name
from expensify_exact.defs.partitions import DAILY_APPROVALS
from expensify_exact.defs.replay import CONNECTION_TAG, TRIGGER_TAG
from expensify_exact.defs.resources import ConnectorResource

MAIN_JOB_NAME = "post_approved_expenses"
SENSOR_NAME = "post_closed_days"
DEFERRED_SENSOR_NAME = "post_deferred_after_reset"
MINIMUM_INTERVAL_SECONDS = 10 * 60
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
FIRST_DAY = DAILY_APPROVALS.start.date()

def day_run_request(context: dg.SensorEvaluationContext, run: DayRun, selection: dg.AssetSelection,
                    trigger: str) -> dg.RunRequest | None:
    """`run` as one run over its days for `selection`, or None if its key was already run or its days are not
    partitions yet (a zone east of the partitions' own one ends its day first; the next evaluation asks again)."""
    if not DAILY_APPROVALS.has_partition_key(run.end.isoformat()):
        return None
    if context.instance.get_run_records(dg.RunsFilter(tags={"dagster/run_key": run.key}), limit=1):
        return None  # the daemon would skip it too; checked here so a tick's answer says what is left to do
    tags = {CONNECTION_TAG: run.connection, TRIGGER_TAG: trigger}
    if run.start == run.end:
        partition = {"partition_key": run.end.isoformat()}
    else:
        partition = {}
        tags |= {RANGE_START_TAG: run.start.isoformat(), RANGE_END_TAG: run.end.isoformat()}
    keys = sorted(selection.resolve(context.repository_def.asset_graph))
    return dg.RunRequest(run_key=run.key, asset_selection=keys, tags=tags, **partition)

def build(config: ProjectConfig) -> dg.Definitions:
    job = dg.define_asset_job(
        MAIN_JOB_NAME,
        selection=dg.AssetSelection.groups(*(group_name(c.name) for c in config.connections)),
        description="Export approved Expensify reports, map and validate them, and post them to Exact Online, "
                    "for every configured connection.",
        tags={"dagster/max_retries": "1"},
    )

    def _requests(context: dg.SensorEvaluationContext, connector: ConnectorResource, plan, trigger: str):
        ensure_pools(context.instance, config)  # before any run claims them: dagster-io/dagster#33552
        now = connector.clock().now()
        requests, notes = [], []
        for conn in config.connections:
            run = plan(conn, connector, now)
            request = day_run_request(context, run, dg.AssetSelection.groups(group_name(conn.name)), trigger) \
                if run else None
            if request is None:
                notes.append(f"{conn.name}: nothing new" + (f" ({run.key} already requested or not a partition "
                                                            f"yet)" if run else ""))
                continue
            context.log.info(f"{conn.name}: {run.reason}")
            requests.append(request)
        return requests or dg.SkipReason("; ".join(notes))

    def _sensor(name: str, description: str, plan: Callable[[Connection, ConnectorResource, datetime], DayRun | None],
                trigger: str) -> dg.SensorDefinition:
        """A sensor of the main job that asks `plan(conn, connector, now)` for each connection's DayRun."""

        @dg.sensor(name=name, job=job, minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
                   default_status=dg.DefaultSensorStatus.RUNNING, required_resource_keys={"connector"},
                   description=description)
        def _evaluate(context: dg.SensorEvaluationContext):
            return _requests(context, context.resources.connector, plan, trigger)

        return _evaluate

    post_closed_days = _sensor(
        SENSOR_NAME,
        "Every 10 minutes, for each connection: once its newest approval day has ended in the connection's own "
        "timezone plus `posting.grace_hours`, one run of that connection's assets over the day and the "
        "`posting.lookback_days` before it (late approvals), keyed connection + day so each day runs once. Gives the "
        "connector's pools their limit first (see `ensure_pools`).",
        lambda conn, _connector, now: daily_run(conn, now, FIRST_DAY), "day_closed")
    post_deferred_after_reset = _sensor(
        DEFERRED_SENSOR_NAME,
        "For each connection with deferred reports: once each one's retry time has passed (Exact's daily reset, "
        "`X-RateLimit-Reset`, for a spent daily budget; the next clock hour for a spent endpoint error budget, a "
        "refused connection or a POST without a certain answer), one run over the days that hold them, keyed by that "
        "time, so a long backfill finishes by itself.",
        lambda conn, connector, now: deferred_run(conn, connector.store(), now), "deferred")

    return dg.Definitions(jobs=[job], sensors=[post_closed_days, post_deferred_after_reset])
