"""The one daily partitioning every asset shares: a partition is an approval day."""

import dagster as dg

DAILY_APPROVALS = dg.DailyPartitionsDefinition(start_date="2024-01-01", timezone="Europe/Amsterdam")
