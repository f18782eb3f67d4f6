"""The overview of all connections in the UI: the asset `overview/connections`, whose materialization carries the
table worst first with its totals and whose checks name the connections at fault, refreshed hourly from the state
database alone (no API call)."""

from dataclasses import dataclass

import dagster as dg
import pandas as pd

from expensify_exact.config import ProjectConfig
from expensify_exact.core.overview import (CONCERN_HEALTH, Concern, Health, Row, Totals, connection_overview,
                                           display, display_totals, totals)
from expensify_exact.defs.keys import OVERVIEW_GROUP
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.resources import ConnectorResource

OVERVIEW = dg.AssetKey(["overview", "connections"])
JOB_NAME = "refresh_overview"
SCHEDULE_NAME = "refresh_overview_hourly"
TABLE_ROWS = 100  # the worst; the totals line counts them all
FAULT_ROWS = 50


@dataclass(frozen=True)
class Check:
    """A check on the overview: which concerns make a connection fail it, and how bad failing it is."""

    name: str
    concerns: frozenset[Concern]
    severity: dg.AssetCheckSeverity
    description: str

    def spec(self) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(self.name, asset=OVERVIEW, description=self.description)

    def result(self, rows: list[Row]) -> dg.AssetCheckResult:
        at_fault = [row for row in rows if any(f.concern in self.concerns for f in row.findings)]
        faults = pd.DataFrame([{"connection": row.connection,
                                "why": "; ".join(f.text for f in row.findings if f.concern in self.concerns)}
                               for row in at_fault], columns=["connection", "why"])
        return dg.AssetCheckResult(check_name=self.name, passed=not at_fault, severity=self.severity,
                                   metadata={"connections_at_fault": len(at_fault),
                                             "at_fault": markdown_table(faults, limit=FAULT_ROWS)})


CHECKS = [
    Check("no_failed_connections", frozenset(c for c, h in CONCERN_HEALTH.items() if h is Health.FAILING),
          dg.AssetCheckSeverity.ERROR,
          "No connection is failing: each has Exact tokens that still work and its last run did not fail."),
    Check("tokens_fresh", frozenset({Concern.NO_TOKENS, Concern.TOKEN_EXPIRED, Concern.TOKEN_OLD}),
          dg.AssetCheckSeverity.WARN,
          "Every connection's Exact refresh token was used within the last 25 days (Exact drops it after 30 idle "
          "days)."),
    Check("budgets_left", frozenset({Concern.BUDGET_LOW}), dg.AssetCheckSeverity.WARN,
          "Every division has at least a tenth of Exact's daily call budget left (or its budget has reset)."),
    Check("runs_on_time", frozenset({Concern.NEVER_RUN, Concern.RUN_OVERDUE, Concern.RUN_STOPPED}),
          dg.AssetCheckSeverity.WARN,
          "Every connection ran within the last 30 hours and its last run was not stopped early."),
]


def overview_frame(rows: list[Row], total: Totals) -> pd.DataFrame:
    """The table an operator reads: the `TABLE_ROWS` worst connections as the rows come, the totals last."""
    shown = [display(row.as_dict()) for row in rows[:TABLE_ROWS]]
    if len(rows) > TABLE_ROWS:
        shown.append({"connection": f"… {len(rows) - TABLE_ROWS} more (`expensify-exact status --all`)"})
    return pd.DataFrame(shown + [display_totals(total.as_dict())]).fillna("")


def build(config: ProjectConfig) -> dg.Definitions:
    @dg.asset(
        key=OVERVIEW, group_name=OVERVIEW_GROUP, check_specs=[check.spec() for check in CHECKS],
        owners=["team:finance"],
        description="Every connection in one table, worst first: health and why, reports posted for yesterday (in "
                    "the connection's zone), open quarantine by reason, the Exact refresh token's age, Exact's calls "
                    "left today, and the last run. Read from the state database only; refreshed hourly.",
    )
    def connections(context: dg.AssetExecutionContext, connector: ConnectorResource) -> dg.MaterializeResult:
        rows = connection_overview(connector.project(), connector.store(), connector.clock())
        total = totals(rows)
        context.log.info(f"{total.connections} connection(s): {total.by_health}")
        return dg.MaterializeResult(
            metadata={
                "connections": total.connections,
                **{f"connections_{health}": total.by_health[health] for health in total.by_health},
                "posted_yesterday": total.posted_yesterday,
                "quarantine_open": total.quarantine_open,
                "pending_intents": total.pending_intents,
                "deferred_reports": total.deferred_reports,
                "quarantine_by_reason": markdown_table(pd.DataFrame(
                    list(total.quarantine_by_reason.items()), columns=["reason", "open reports"])),
                "overview": markdown_table(overview_frame(rows, total), limit=TABLE_ROWS + 2),
            },
            check_results=[check.result(rows) for check in CHECKS],
        )

    job = dg.define_asset_job(JOB_NAME, selection=[OVERVIEW],
                              description="Recompute the overview of all connections from the state database.")
    schedule = dg.ScheduleDefinition(
        name=SCHEDULE_NAME, job=job, cron_schedule="5 * * * *", execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every hour, the overview of all connections afresh (no API calls).")
    return dg.Definitions(assets=[connections], jobs=[job], schedules=[schedule])
