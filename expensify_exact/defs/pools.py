"""The `keep_connector_pools` sensor: the daemon gives the connector's pools their limit, so runs from the UI, a
backfill, Dagster's API or a run retry find them in place (the schedule and `expensify-exact run` do it too)."""

import dagster as dg

from expensify_exact.config import ProjectConfig
from expensify_exact.defs.keys import ensure_pools

SENSOR_NAME = "keep_connector_pools"


def build(config: ProjectConfig) -> dg.Definitions:
    @dg.sensor(
        name=SENSOR_NAME, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
        description="Gives each connection's pools (`exact_division_<n>`, `expensify_<connection>`) the instance's "
                    "default pool limit if they have none yet, as soon as the daemon starts and every minute after "
                    "(see `ensure_pools`, dagster-io/dagster#33552). Never requests a run.",
    )
    def keep_connector_pools(context: dg.SensorEvaluationContext):
        limits = ensure_pools(context.instance, config)
        shown = ", ".join(f"{pool}={'unlimited' if limit is None else limit}" for pool, limit in limits.items())
        return dg.SkipReason(f"pool limits: {shown or 'none (this storage has no pools)'}")

    return dg.Definitions(sensors=[keep_connector_pools])
