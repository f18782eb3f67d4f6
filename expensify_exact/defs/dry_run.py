"""The `dry_run` op job: every draft and each report's verdict (`core/verdicts.py`) for some approval days, with
nothing materialized, posted or written to the state DB (in-memory outputs, `connections.ReadOnlyRecords`)."""

from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

import dagster as dg
import pandas as pd

from expensify_exact import progress
from expensify_exact.clock import connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.journal import Dimensions, JournalDrafts
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact.core.snapshots import fetch_dimensions, needed_codes
from expensify_exact.core.verdicts import Verdict, preview, shown_lines
from expensify_exact.defs.keys import exact_pool, expensify_pool, slug
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.resources import ConnectorResource

DRY_RUN_JOB_NAME = "dry_run"
DAYS_OP = "dry_run_days"
# Outputs live in this process's memory only: the job runs in-process, so no step needs another's stored value.
MEMORY = "dry_run_memory"
VERDICT_COLUMNS = ["partition_date", "report_id", "action", "entry_id", "entry_number", "total", "reason_codes",
                   "note"]


class DryRunConfig(dg.Config):
    start: str  # first approval day, YYYY-MM-DD
    end: str = ""  # last approval day (default: start)
    connections: list[str] = []  # default: every connection


class Days(NamedTuple):
    """The approval days a dry run covers."""

    start: date
    end: date


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


def op_names(connection_name: str) -> tuple[str, str, str]:
    """The export, dimensions and preview ops of one connection."""
    name = slug(connection_name)
    return f"dry_run_export_{name}", f"dry_run_dimensions_{name}", f"dry_run_preview_{name}"


def _days_op(config: ProjectConfig) -> dg.OpDefinition:
    names = {conn.name: slug(conn.name) for conn in config.connections}

    @dg.op(name=DAYS_OP, out={output: dg.Out(Days, is_required=False, io_manager_key=MEMORY)
                              for output in names.values()},
           description="Checks the days and connections asked for; the ops of the connections not asked for are "
                       "skipped.")
    def dry_run_days(context: dg.OpExecutionContext, config: DryRunConfig):
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
        for name, output in names.items():
            if not config.connections or name in config.connections:
                yield dg.Output(Days(start, end), output_name=output)

    return dry_run_days


def _connection_ops(conn: Connection, config: ProjectConfig):
    export_name, dimensions_name, preview_name = op_names(conn.name)
    division = f"division {conn.exact.division}"

    @dg.op(name=export_name, pool=expensify_pool(conn), out=dg.Out(io_manager_key=MEMORY),
           description=f"Exports {conn.name}'s approved reports of the days from Expensify; labels nothing.")
    def export(context: dg.OpExecutionContext, connector: ConnectorResource, days: Days) -> list[dict]:
        progress.publish(progress.Phase(conn.name, f"exporting approved reports of {days.start}..{days.end} from "
                                                   f"Expensify (dry run)"))
        with connector.expensify_client(conn, read_only=True) as client:
            reports = client.export_reports(days.start, days.end, conn.expensify.policy_ids, timezone=conn.timezone,
                                            source_timezone=conn.expensify.timestamp_timezone)
        context.log.info(f"exported {len(reports)} report(s)")
        return reports

    @dg.op(name=dimensions_name, pool=exact_pool(conn), out=dg.Out(io_manager_key=MEMORY),
           description=f"Reads Exact's dimensions of {division} afresh; the stored snapshot is neither used nor "
                       f"updated.")
    def dimensions(context: dg.OpExecutionContext, connector: ConnectorResource, days: Days) -> Dimensions:
        progress.publish(progress.Phase(conn.name, f"reading Exact's dimensions of {division} (dry run)"))
        with connector.exact_client(conn, read_only=True) as client:
            dims = fetch_dimensions(client, needed_codes(conn, config))
            context.log.info(f"read Exact's dimensions of {division} with {client.calls_made} call(s)")
        return dims

    @dg.op(name=preview_name, out=dg.Out(io_manager_key=MEMORY),
           description=f"Drafts {conn.name}'s reports as the main job does and shows every line and every "
                       f"report's verdict (post, already posted, quarantine); reads the ledger, writes nothing.")
    def preview_connection(context: dg.OpExecutionContext, connector: ConnectorResource, reports: list[dict],
                           dimensions: Dimensions) -> ConnectionPreview:
        drafts = drafts_for_reports(reports, conn, config, dimensions, connection_today(conn.timezone,
                                                                                          connector.clock()))
        result = ConnectionPreview(conn.name, drafts, preview(drafts, connection=conn.name, store=connector.store()))
        lines, verdicts = shown_lines(drafts), result.verdict_frame()
        context.add_output_metadata({
            **{f"reports_{action}": int(n) for action, n in verdicts["action"].value_counts().items()},
            "draft_line_count": len(lines),
            "verdicts": markdown_table(verdicts, limit=max(len(verdicts), 1)),
            "draft_lines": markdown_table(lines, limit=max(len(lines), 1)),  # every line, never a sample
        })
        return result

    return export, dimensions, preview_connection


def build(config: ProjectConfig) -> dg.Definitions:
    days_op = _days_op(config)
    per_connection = [(slug(conn.name), _connection_ops(conn, config)) for conn in config.connections]

    @dg.job(
        name=DRY_RUN_JOB_NAME, executor_def=dg.in_process_executor,
        description="What a run over some approval days would do, stored nowhere: exports the reports, reads "
                    "Exact's dimensions afresh, drafts every entry and shows each report's verdict (would post, "
                    "already posted, would quarantine with reasons) and every draft line in the preview ops' "
                    f"metadata. Materializes no asset; posts, labels and records nothing. Op config of "
                    f"`{DAYS_OP}`: `start`, `end` (YYYY-MM-DD), `connections` (default: all).",
    )
    def dry_run():
        days = days_op()
        for output, (export, dimensions, preview_connection) in per_connection:
            span = days if len(per_connection) == 1 else getattr(days, output)  # one output: its handle, no tuple
            preview_connection(export(span), dimensions(span))

    return dg.Definitions(jobs=[dry_run], resources={MEMORY: dg.mem_io_manager})
