"""The main job over every connection's asset group, and the daily schedule that posts yesterday's approvals."""

import dagster as dg

from expensify_exact.config import ProjectConfig
from expensify_exact.defs.keys import group_name

MAIN_JOB_NAME = "post_approved_expenses"


def build(config: ProjectConfig) -> dg.Definitions:
    job = dg.define_asset_job(
        MAIN_JOB_NAME,
        selection=dg.AssetSelection.groups(*(group_name(c.name) for c in config.connections)),
        description="Export approved Expensify reports, map and validate them, and post them to Exact Online, "
                    "for every configured connection.",
        tags={"dagster/max_retries": "1"},
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        name="post_yesterdays_approvals",
        description="Every morning, posts the reports approved yesterday (Europe/Amsterdam).",
        hour_of_day=6,
        minute_of_hour=15,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return dg.Definitions(jobs=[job], schedules=[schedule])
