"""The main job and the daily schedule that posts yesterday's approvals."""

import dagster as dg

MAIN_JOB_NAME = "post_approved_expenses"

post_approved_expenses = dg.define_asset_job(
    MAIN_JOB_NAME,
    selection=dg.AssetSelection.groups("expensify", "exact_dimensions", "journal"),
    description="Export approved Expensify reports, map and validate them, and post them to Exact Online.",
    tags={"dagster/max_retries": "1"},
)

daily_schedule = dg.build_schedule_from_partitioned_job(
    post_approved_expenses,
    name="post_yesterdays_approvals",
    description="Every morning, posts the reports approved yesterday (Europe/Amsterdam).",
    hour_of_day=6,
    minute_of_hour=15,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
