"""The `dry_run` op job: every draft and each report's verdict (`core/verdicts.py`) for some approval days and
connections, with nothing materialized, posted or written to the state DB (in-memory outputs, read-only clients).

Four ops whatever the number of connections; each does all the selected connections side by side
(`partitions.fan_out`), one connection's failure never stopping the others' previews."""

from dataclasses import dataclass
from datetime import date

import dagster as dg
import pandas as pd

from expensify_exact import progress
from expensify_exact.clock import connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.exports import export_together, names_by_credential
from expensify_exact.core.journal import Dimensions, JournalDrafts
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact.core.snapshots import fetch_dimensions, needed_codes
from expensify_exact.core.verdicts import Action, Verdict, preview, shown_lines
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import ConnectionFailed, failures, fan_out, fan_out_groups
from expensify_exact.defs.resources import ConnectorResource

DRY_RUN_JOB_NAME = "dry_run"
DAYS_OP, EXPORT_OP, DIMENSIONS_OP, PREVIEW_OP = "dry_run_days", "dry_run_export", "dry_run_dimensions", \
    "dry_run_preview"
# Outputs live in this process's memory only: the job runs in-process, so no step needs another's stored value.
MEMORY = "dry_run_memory"
VERDICT_COLUMNS = ["partition_date", "report_id", "action", "entry_id", "entry_number", "total", "reason_codes",
                   "note"]
SUMMARY_COLUMNS = ["connection", "would_post", "already_posted", "would_quarantine", "draft_lines", "failed"]


class DryRunConfig(dg.Config):
    start: str  # first approval day, YYYY-MM-DD
    end: str = ""  # last approval day (default: start)
    connections: list[str] = []  # default: every connection


@dataclass(frozen=True)
class DryRunPlan:
    """The approval days a dry run covers and the connections it previews, in config order."""

    start: date
    end: date
    connections: list[str]

    @property
    def span(self) -> str:
        """The whole range as one period: a dry run previews it in one go, not day by day."""
        return f"{self.start}..{self.end}"

    def by_connection(self) -> dict[str, list[str]]:
        """Every connection with the one period of the range, as `partitions.fan_out` takes them."""
        return {name: [self.span] for name in self.connections}


@dataclass(frozen=True)
class ConnectionPreview:
    """One connection's dry run: every draft line and every report's verdict."""

    connection: str
    drafts: JournalDrafts
    verdicts: list[Verdict]

    def verdict_frame(self) -> pd.DataFrame:
        rows = [{"partition_date": v.partition_date, "report_id": v.report_id, "action": v.action,
                 "entry_id": v.entry_id, "entry_number": v.entry_number, "total": v.total_cents / 100,
                 "reason_codes": ", ".join(v.reason_codes), "note": v.note} for v in self.verdicts]
        return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _days_op(config: ProjectConfig) -> dg.OpDefinition:
    names = [conn.name for conn in config.connections]

    @dg.op(name=DAYS_OP, out=dg.Out(DryRunPlan, io_manager_key=MEMORY),
           description="Checks the days and connections asked for (default: every connection).")
    def dry_run_days(config: DryRunConfig) -> DryRunPlan:
        try:
            start = date.fromisoformat(config.start)
            end = date.fromisoformat(config.end) if config.end else start
        except ValueError as exc:
            raise dg.Failure(f"start and end are approval days, YYYY-MM-DD: {exc}") from None
        if end < start:
            raise dg.Failure(f"end {end} is before start {start}")
        unknown = sorted(set(config.connections) - set(names))
        if unknown:
            raise dg.Failure(f"no connection named {', '.join(unknown)}; configured: {', '.join(names)}")
        return DryRunPlan(start, end, [name for name in names if not config.connections or name in config.connections])

    return dry_run_days


def _export_op(config: ProjectConfig) -> dg.OpDefinition:
    @dg.op(name=EXPORT_OP, out=dg.Out(dict, io_manager_key=MEMORY),
           description="Exports the approved reports of the days from Expensify, one export job per Expensify "
                       "credential for all its connections' policies, split by policy after, as the "
                       "main job's raw_reports does; labels and records nothing.")
    def dry_run_export(context: dg.OpExecutionContext, connector: ConnectorResource,
                       plan: DryRunPlan) -> dict:
        """Each connection's reports (or its `ConnectionFailed`)."""
        selected = [config.connection(name) for name in plan.connections]
        groups = names_by_credential(selected)

        def export(conns: list[Connection], days_of: dict[str, list[str]]) -> dict[str, dict[str, list[dict]]]:
            for conn in conns:
                progress.publish(progress.Phase(conn.name, f"exporting approved reports of {plan.start}..{plan.end} "
                                                           f"from Expensify (dry run)"))
            with connector.expensify_client(conns[0], read_only=True) as client:
                split = export_together(client, conns, plan.start, plan.end)
            return {name: {plan.span: reports} for name, reports in split.items()}

        found = fan_out_groups(context.log, EXPORT_OP, config, plan.by_connection(), groups, export)
        reports = {name: found[name][plan.span] for name in plan.connections}
        context.log.info(f"exported {sum(len(r) for r in reports.values() if isinstance(r, list))} report(s) for "
                         f"{len(reports)} connection(s) in {len(groups)} export(s)")
        return reports

    return dry_run_export


def _dimensions_op(config: ProjectConfig) -> dg.OpDefinition:
    @dg.op(name=DIMENSIONS_OP, out=dg.Out(dict, io_manager_key=MEMORY),
           description="Reads Exact's dimensions of each connection's division afresh; the stored snapshot is "
                       "neither used nor updated.")
    def dry_run_dimensions(context: dg.OpExecutionContext, connector: ConnectorResource,
                           plan: DryRunPlan) -> dict:
        """Each connection's `Dimensions` (or its `ConnectionFailed`)."""
        def read(conn: Connection, _span: list[str]) -> dict[str, Dimensions]:
            division = f"division {conn.exact.division}"
            progress.publish(progress.Phase(conn.name, f"reading Exact's dimensions of {division} (dry run)"))
            with connector.exact_client(conn, read_only=True) as client:
                dims = fetch_dimensions(client, needed_codes(conn, config))
                context.log.info(f"{conn.name}: read Exact's dimensions of {division} with {client.calls_made} "
                                 f"call(s)")
            return {plan.span: dims}

        found = fan_out(context.log, DIMENSIONS_OP, config, plan.by_connection(), read)
        return {name: found[name][plan.span] for name in plan.connections}

    return dry_run_dimensions


def _preview_op(config: ProjectConfig) -> dg.OpDefinition:
    @dg.op(name=PREVIEW_OP, out=dg.Out(list, io_manager_key=MEMORY),
           description="Drafts each connection's reports as the main job does and shows every line and every "
                       "report's verdict (post, already posted, quarantine); reads the ledger, writes nothing. Its "
                       "output lists the previews of every connection that got through; it fails after that, naming "
                       "each connection that did not, the step and the error.")
    def dry_run_preview(context: dg.OpExecutionContext, connector: ConnectorResource, plan: DryRunPlan,
                        reports: dict, dimensions: dict):
        clock, store = connector.clock(), connector.store()

        def draft(conn: Connection, _span: list[str], reports_of: dict, dimensions_of: dict) -> dict:
            drafts = drafts_for_reports(reports_of[plan.span], conn, config, dimensions_of[plan.span],
                                        connection_today(conn.timezone, clock))
            return {plan.span: ConnectionPreview(conn.name, drafts, preview(drafts, connection=conn.name,
                                                                              store=store))}

        inputs = {name: [{plan.span: reports[name]}, {plan.span: dimensions[name]}] for name in plan.connections}
        found = fan_out(context.log, PREVIEW_OP, config, plan.by_connection(), draft, inputs)
        values = {name: found[name][plan.span] for name in plan.connections}
        previews = [value for value in values.values() if isinstance(value, ConnectionPreview)]
        failed = failures(values)
        yield dg.Output(previews, metadata=_metadata(previews, failed))
        if failed:
            raise dg.Failure(
                description="; ".join(f"{f.connection}: {f.step} failed: {f.error}" for f in failed),
                metadata={"failed_connections": len(failed), "previewed_connections": len(previews)})

    return dry_run_preview


def _metadata(previews: list[ConnectionPreview], failed: list[ConnectionFailed]) -> dict:
    """Per connection what it would do, and every verdict and every draft line (never a sample), by connection."""
    summary, verdicts, lines = [], [], []
    for p in previews:
        frame, shown = p.verdict_frame(), shown_lines(p.drafts)
        counts = frame["action"].value_counts().to_dict()
        summary.append({"connection": p.connection,
                        "would_post": counts.get(Action.POST, 0) + counts.get(Action.SETTLE_PENDING, 0),
                        "already_posted": counts.get(Action.ALREADY_POSTED, 0),
                        "would_quarantine": counts.get(Action.QUARANTINE, 0), "draft_lines": len(shown),
                        "failed": ""})
        verdicts.append(frame.assign(connection=p.connection))
        lines.append(shown.assign(connection=p.connection))
    summary.extend({"connection": f.connection, "would_post": 0, "already_posted": 0, "would_quarantine": 0,
                    "draft_lines": 0, "failed": f"{f.step}: {f.error}"} for f in failed)
    table = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    every_verdict = _first_connection(pd.concat(verdicts, ignore_index=True)) if verdicts else pd.DataFrame()
    every_line = _first_connection(pd.concat(lines, ignore_index=True)) if lines else pd.DataFrame()
    return {
        "connections": len(previews) + len(failed), "failed_connections": len(failed),
        **{f"reports_{column}": int(table[column].sum()) for column in ("would_post", "already_posted",
                                                                         "would_quarantine")},
        "draft_line_count": len(every_line),
        "by_connection": markdown_table(table, limit=max(len(table), 1)),
        "verdicts": markdown_table(every_verdict, limit=max(len(every_verdict), 1)),
        "draft_lines": markdown_table(every_line, limit=max(len(every_line), 1)),
    }


def _first_connection(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["connection", *(c for c in frame.columns if c != "connection")]]


def build(config: ProjectConfig) -> dg.Definitions:
    days_op, export_op = _days_op(config), _export_op(config)
    dimensions_op, preview_op = _dimensions_op(config), _preview_op(config)

    @dg.job(
        name=DRY_RUN_JOB_NAME, executor_def=dg.in_process_executor,
        description="What a run over some approval days would do, stored nowhere: exports the reports (one export "
                    "job per Expensify credential), reads Exact's dimensions afresh, drafts every entry and shows "
                    "each report's verdict (would post, already posted, would quarantine with reasons) and every "
                    f"draft line in the metadata of `{PREVIEW_OP}`, all selected connections side by side. "
                    "Materializes no asset; posts, labels and records nothing. Op config of "
                    f"`{DAYS_OP}`: `start`, `end` (YYYY-MM-DD), `connections` (default: all).",
    )
    def dry_run():
        plan = days_op()
        preview_op(plan, export_op(plan), dimensions_op(plan))

    return dg.Definitions(jobs=[dry_run], resources={MEMORY: dg.mem_io_manager})
