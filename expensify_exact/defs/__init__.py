"""What Dagster loads: assets, checks, jobs, schedules and resources of the connector."""
