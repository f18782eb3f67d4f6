"""The main job over the chain of every connection; the sensor that posts each connection's day once it has ended in
the connection's timezone, and the one that posts deferred reports once Exact's daily budget has reset. Each run a
sensor asks for covers consecutive connections that need the same days, so a morning of 500 customers is a handful of
runs, not 500."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

import dagster as dg

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.days import DayRun, daily_run, deferred_run
from expensify_exact.defs.keys import GROUP
from expensify_exact.defs.partitions import (
    CONNECTIONS_PER_RUN_ENV,
    DAILY_APPROVALS,
    DEFAULT_CONNECTIONS_PER_RUN,
    TRIGGER_TAG,
    rectangle_tags,
    rectangles,
)
from expensify_exact.defs.resources import ConnectorResource

MAIN_JOB_NAME = "post_approved_expenses"
SENSOR_NAME = "post_closed_days"
DEFERRED_SENSOR_NAME = "post_deferred_after_reset"
MINIMUM_INTERVAL_SECONDS = 10 * 60
FIRST_DAY = DAILY_APPROVALS.start.date()


def build(config: ProjectConfig) -> dg.Definitions:
    job = dg.define_asset_job(
        MAIN_JOB_NAME,
        selection=dg.AssetSelection.groups(GROUP),
        description="Export approved Expensify reports, map and validate them, and post them to Exact Online, for "
                    "the connections and approval days of the run's partitions (connection × day).",
        tags={"dagster/max_retries": "1"},
    )

    def _requests(context: dg.SensorEvaluationContext, connector: ConnectorResource, plan, trigger: str):
        asked: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        now = connector.clock().now()
        wanted: dict[str, DayRun] = {}
        idle = []
        for conn in config.connections:
            run = plan(conn, connector, now)
            # A zone east of the partitions' own one ends its day first; the next evaluation asks again.
            if run is None or asked.get(conn.name) == run.key \
                    or not DAILY_APPROVALS.has_partition_key(run.end.isoformat()):
                idle.append(conn.name)
                continue
            wanted[conn.name] = run
        requests = []
        for names, start, end in rectangles(config, {name: (r.start, r.end) for name, r in wanted.items()}):
            keys = sorted(wanted[name].key for name in names)
            run_key = f"{trigger}:{start}..{end}:{names[0]}..{names[-1]}:" \
                      f"{hashlib.sha1('|'.join(keys).encode()).hexdigest()[:16]}"
            requests.append(dg.RunRequest(run_key=run_key, tags={**rectangle_tags(names, start, end),
                                                                 TRIGGER_TAG: trigger}))
            for name in names:
                asked[name] = wanted[name].key
                context.log.info(f"{name}: {wanted[name].reason}")
        shown = ", ".join(idle[:5]) + (f" and {len(idle) - 5} more" if len(idle) > 5 else "")
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(asked, sort_keys=True),
                               skip_reason=None if requests else f"nothing new for {len(idle)} connection(s): {shown}")

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
        "timezone plus `posting.grace_hours`, a run over that day and the `posting.lookback_days` before it (late "
        "approvals). Consecutive connections that need the same days share a run (at most "
        f"${CONNECTIONS_PER_RUN_ENV}, default {DEFAULT_CONNECTIONS_PER_RUN}); the cursor keeps each connection's "
        "last requested day, so each day runs once.",
        lambda conn, _connector, now: daily_run(conn, now, FIRST_DAY), "day_closed")
    post_deferred_after_reset = _sensor(
        DEFERRED_SENSOR_NAME,
        "For each connection with deferred reports: once each one's retry time has passed (Exact's daily reset, "
        "`X-RateLimit-Reset`, for a spent daily budget; the next clock hour for a spent endpoint error budget, a "
        "refused connection or a POST without a certain answer), a run over the days that hold them, keyed by that "
        "time, so a long backfill finishes by itself. Connections due together share a run.",
        lambda conn, connector, now: deferred_run(conn, connector.store(), now), "deferred")

    return dg.Definitions(jobs=[job], sensors=[post_closed_days, post_deferred_after_reset])
