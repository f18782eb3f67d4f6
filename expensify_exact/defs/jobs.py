"""The main job over every connection's asset group, and the daily schedule that posts yesterday's approvals."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from expensify_exact.config import ProjectConfig
from expensify_exact.defs.keys import ensure_pools, group_name
from expensify_exact.defs.partitions import DAILY_APPROVALS

MAIN_JOB_NAME = "post_approved_expenses"
SCHEDULE_NAME = "post_yesterdays_approvals"


def build(config: ProjectConfig) -> dg.Definitions:
    job = dg.define_asset_job(
        MAIN_JOB_NAME,
        selection=dg.AssetSelection.groups(*(group_name(c.name) for c in config.connections)),
        description="Export approved Expensify reports, map and validate them, and post them to Exact Online, "
                    "for every configured connection.",
        tags={"dagster/max_retries": "1"},
    )

    @dg.schedule(
        name=SCHEDULE_NAME, job=job, cron_schedule="15 6 * * *", execution_timezone=DAILY_APPROVALS.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every morning at 06:15 (Europe/Amsterdam), posts the reports approved yesterday. Before "
                    "requesting the run it gives the connector's pools their limit on the instance (see "
                    "`ensure_pools`), so the first runs of a new deployment cannot trip over each other.",
    )
    def post_yesterdays_approvals(context: dg.ScheduleEvaluationContext):
        ensure_pools(context.instance, config)
        timezone = ZoneInfo(DAILY_APPROVALS.timezone)
        today = (context.scheduled_execution_time or datetime.now(timezone)).astimezone(timezone).date()
        yesterday = (today - timedelta(days=1)).isoformat()
        return dg.RunRequest(run_key=yesterday, partition_key=yesterday)

    return dg.Definitions(jobs=[job], schedules=[post_yesterdays_approvals])
