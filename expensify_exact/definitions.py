"""The code location: composes the connector's assets, job, schedule and resources."""

import dagster as dg

from expensify_exact.defs import assets, jobs
from expensify_exact.io_manager import PerDayPickleIOManager
from expensify_exact.resources import default_connector

defs = dg.Definitions(
    assets=[assets.raw_reports, assets.expense_lines, assets.exact_dimensions, assets.journal_drafts,
            assets.journal_entries_posted, assets.quarantine],
    jobs=[jobs.post_approved_expenses],
    schedules=[jobs.daily_schedule],
    resources={"connector": default_connector(), "io_manager": PerDayPickleIOManager()},
)
