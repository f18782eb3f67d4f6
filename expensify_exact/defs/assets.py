"""The asset chain: raw reports → expense lines → dimension snapshots → journal drafts → posted entries → quarantine.

Each asset only wires plain-Python functions; a run over a date range handles every day in one go
(single-run backfills), and each day keeps its own stored value.
"""


from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd

from expensify_exact.defs.partitions import DAILY_APPROVALS
from expensify_exact.expensify.client import parse_report_timestamp
from expensify_exact.posting import OUTCOME_COLUMNS, post_drafts
from expensify_exact.resources import ConnectorResource
from expensify_exact.snapshots import DIMENSION_QUERIES, fetch_dimension
from expensify_exact.transform.draft_checks import DraftLineSchema, split_invalid_drafts
from expensify_exact.transform.expense_lines import ExpenseLineSchema, NormalizedLines, normalize_reports
from expensify_exact.transform.journal import (
    DRAFT_COLUMNS, REASON_FIXES, REJECTION_COLUMNS, Dimensions, JournalDrafts, Reason, build_journal_drafts,
)

SINGLE_RUN = dg.BackfillPolicy.single_run()
LINES_SCHEMA_CHECK = "expense_lines_schema"
DRAFTS_BALANCED_CHECK = "drafts_balanced_and_traceable"
RAW_REPORTS = dg.AssetKey(["expensify", "raw_reports"])
EXPENSE_LINES = dg.AssetKey(["expensify", "expense_lines"])
DRAFTS = dg.AssetKey(["exact", "journal_drafts"])
POSTED = dg.AssetKey(["exact", "journal_entries_posted"])
QUARANTINE = dg.AssetKey(["quarantine"])
DIMENSION_KEYS = {name: dg.AssetKey(["exact", name]) for name in DIMENSION_QUERIES}


class PostingConfig(dg.Config):
    dry_run: bool = False  # build and show every draft; write nothing to Exact, the ledger or the quarantine


def _per_partition(context: dg.AssetExecutionContext, value: Any) -> dict[str, Any]:
    """An upstream value keyed by partition: the IO manager hands a dict only when a run spans several days."""
    keys = context.partition_keys
    return {keys[0]: value} if len(keys) == 1 else value


def _result(context: dg.AssetExecutionContext, values: dict[str, Any]) -> Any:
    keys = context.partition_keys
    return values[keys[0]] if len(keys) == 1 else values


def _md(frame: pd.DataFrame, limit: int = 50) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    text = frame.head(limit).to_markdown(index=False)
    if len(frame) > limit:
        text += f"\n\n… and {len(frame) - limit} more"
    return dg.MetadataValue.md(text)


@dg.asset(
    key=RAW_REPORTS, partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, pool="expensify",
    group_name="expensify", kinds={"expensify", "python"}, owners=["team:data"],
    description="Approved and reimbursed Expensify reports, as exported by the connector's own JSON template, "
                "one list per approval day. A date range is fetched in as few export jobs as Expensify allows.",
)
def raw_reports(context: dg.AssetExecutionContext, connector: ConnectorResource):
    keys = context.partition_keys
    start, end = date.fromisoformat(keys[0]), date.fromisoformat(keys[-1])
    by_day: dict[str, list[dict]] = {key: [] for key in keys}
    calls = 0
    for conn in connector.project().connections:
        with connector.expensify_client(conn) as client:
            reports = client.export_reports(start, end, conn.expensify.policy_ids, timezone=conn.timezone,
                                            source_timezone=conn.expensify.timestamp_timezone)
            calls += client.requests_sent
        for report in reports:
            day = _approval_day(report, conn.timezone, conn.expensify.timestamp_timezone) or keys[0]
            by_day.setdefault(day, []).append({"connection": conn.name, "report": report})
    counts = {key: len(by_day[key]) for key in keys}
    context.log.info(f"exported {sum(counts.values())} report(s) over {len(keys)} day(s) with {calls} request(s)")
    return dg.MaterializeResult(
        value=_result(context, by_day),
        metadata={"reports": sum(counts.values()), "days": len(keys), "expensify_requests": calls,
                  "dagster/row_count": sum(counts.values())},
    )


def _approval_day(report: dict, timezone: str, source_timezone: str) -> str | None:
    try:
        approved = parse_report_timestamp(report.get("approved"), source_timezone)
    except ValueError:
        return None  # normalization reports it as malformed; it is kept, not dropped
    return approved.astimezone(ZoneInfo(timezone)).date().isoformat() if approved else None


@dg.asset(
    key=EXPENSE_LINES, partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, group_name="expensify",
    kinds={"pandas", "pandera"}, owners=["team:data"],
    description="One row per expense on an approved report, amounts in integer cents, every row carrying its "
                "report ID and transaction ID. Rows that break the schema are set aside as malformed, never dropped.",
    check_specs=[dg.AssetCheckSpec(LINES_SCHEMA_CHECK, asset=EXPENSE_LINES, blocking=True,
                                   description="The expense lines satisfy the pandera ExpenseLineSchema.")],
)
def expense_lines(context: dg.AssetExecutionContext, connector: ConnectorResource, raw_reports):
    project = connector.project()
    results: dict[str, NormalizedLines] = {}
    for key, entries in _per_partition(context, raw_reports).items():
        frames, malformed = [], []
        for conn in project.connections:
            reports = [e["report"] for e in entries if e["connection"] == conn.name]
            normalized = normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
            frames.append(normalized.lines.assign(connection=conn.name))
            malformed.append(normalized.malformed.assign(connection=conn.name))
        results[key] = NormalizedLines(lines=pd.concat(frames, ignore_index=True),
                                       malformed=pd.concat(malformed, ignore_index=True))
    all_lines = pd.concat([r.lines for r in results.values()], ignore_index=True)
    all_malformed = pd.concat([r.malformed for r in results.values()], ignore_index=True)
    check_errors = _schema_errors(ExpenseLineSchema, all_lines.drop(columns=["connection"]))
    return dg.MaterializeResult(
        value=_result(context, results),
        metadata={"lines": len(all_lines), "reports": all_lines["report_id"].nunique(),
                  "malformed_lines": len(all_malformed), "dagster/row_count": len(all_lines),
                  **{f"total_{cur}": float(v) / 100 for cur, v in
                     all_lines.groupby("report_currency")["converted_amount_cents"].sum().items()}},
        check_results=[dg.AssetCheckResult(
            check_name=LINES_SCHEMA_CHECK, passed=check_errors is None, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"failures": _md(check_errors) if check_errors is not None else dg.MetadataValue.md("_none_"),
                      "malformed_lines_set_aside": len(all_malformed)})],
    )


def _schema_errors(schema, frame: pd.DataFrame) -> pd.DataFrame | None:
    from pandera.errors import SchemaErrors

    if frame.empty:
        return None
    try:
        schema.validate(frame, lazy=True)
        return None
    except SchemaErrors as errors:
        return errors.failure_cases


@dg.multi_asset(
    outs={name: dg.AssetOut(key=key, group_name="exact_dimensions", kinds={"exactonline", "pandas"},
                            owners=["team:data"],
                            description=f"Snapshot of Exact's {DIMENSION_QUERIES[name][0]} for each connection's "
                                        f"division, taken at the start of the run and kept per approval day it "
                                        f"validated.")
          for name, key in DIMENSION_KEYS.items()},
    partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, pool="exact",
)
def exact_dimensions(context: dg.AssetExecutionContext, connector: ConnectorResource):
    snapshots: dict[str, list[pd.DataFrame]] = {name: [] for name in DIMENSION_KEYS}
    for conn in connector.project().connections:
        client = connector.exact_client(conn)
        client.check_division()
        for name in DIMENSION_KEYS:
            snapshots[name].append(fetch_dimension(client, name).assign(connection=conn.name))
    for name, key in DIMENSION_KEYS.items():
        frame = pd.concat(snapshots[name], ignore_index=True)
        yield dg.MaterializeResult(asset_key=key, value=_result(context, {k: frame for k in context.partition_keys}),
                                   metadata={"rows": len(frame), "dagster/row_count": len(frame)})


def _dimensions_for(conn_name: str, frames: dict[str, pd.DataFrame]) -> Dimensions:
    return Dimensions(**{name: frame[frame["connection"] == conn_name].drop(columns=["connection"])
                         for name, frame in frames.items()})


@dg.asset(
    key=DRAFTS, partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, group_name="journal",
    kinds={"pandas", "pandera"}, owners=["team:finance"],
    ins={"expense_lines": dg.AssetIn(EXPENSE_LINES),
         **{name: dg.AssetIn(key) for name, key in DIMENSION_KEYS.items()}},
    description="Balanced general journal entries, one per report, mapped to GL accounts, cost centers and cost "
                "units and validated against the dimension snapshots. A report with any failing line is rejected "
                "whole, with a reason code per problem.",
    check_specs=[dg.AssetCheckSpec(DRAFTS_BALANCED_CHECK, asset=DRAFTS, blocking=True,
                                   description="Every draft entry sums to zero, has an account on every line, "
                                               "two-decimal amounts and both Expensify IDs on every line.")],
)
def journal_drafts(context: dg.AssetExecutionContext, connector: ConnectorResource, expense_lines,
                   **dimension_inputs):
    project = connector.project()
    lines_by_day = _per_partition(context, expense_lines)
    dims_by_day = {name: _per_partition(context, value) for name, value in dimension_inputs.items()}
    results: dict[str, JournalDrafts] = {}
    for key, normalized in lines_by_day.items():
        line_frames, rejection_frames = [], []
        for conn in project.connections:
            lines = normalized.lines[normalized.lines["connection"] == conn.name].drop(columns=["connection"])
            malformed = normalized.malformed[normalized.malformed["connection"] == conn.name]
            bad = set(malformed["report_id"])
            dims = _dimensions_for(conn.name, {name: by_day[key] for name, by_day in dims_by_day.items()})
            drafts = build_journal_drafts(lines[~lines["report_id"].isin(bad)], conn, project, dims,
                                          run_date=date.today())
            drafts, _failures = split_invalid_drafts(drafts)
            line_frames.append(drafts.lines)
            rejection_frames.extend([drafts.rejections, _malformed_rejections(malformed, lines, conn.name, key)])
        results[key] = JournalDrafts(lines=pd.concat(line_frames, ignore_index=True),
                                     rejections=pd.concat(rejection_frames, ignore_index=True))
    all_lines = pd.concat([d.lines for d in results.values()], ignore_index=True).reindex(columns=DRAFT_COLUMNS)
    all_rejections = pd.concat([d.rejections for d in results.values()], ignore_index=True)
    check_errors = _schema_errors(DraftLineSchema, all_lines) if len(all_lines) else None
    preview = all_lines[["report_id", "transaction_id", "side", "gl_account_code", "amount", "currency",
                         "cost_center", "cost_unit", "vat_code", "entry_date", "description"]]
    return dg.MaterializeResult(
        value=_result(context, results),
        metadata={"entries": all_lines["report_id"].nunique(), "lines": len(all_lines),
                  "rejected_reports": all_rejections["report_id"].nunique(),
                  "debit_total": float(all_lines.loc[all_lines["side"] == "debit", "amount"].sum()),
                  "preview": _md(preview, limit=100),
                  "rejections": _md(all_rejections[["report_id", "transaction_id", "code", "value", "message"]]),
                  "dagster/row_count": len(all_lines)},
        check_results=[dg.AssetCheckResult(
            check_name=DRAFTS_BALANCED_CHECK, passed=check_errors is None, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"failures": _md(check_errors) if check_errors is not None else dg.MetadataValue.md("_none_"),
                      "reports_sent_to_quarantine": all_rejections["report_id"].nunique()})],
    )


def _malformed_rejections(malformed: pd.DataFrame, lines: pd.DataFrame, connection: str, day: str) -> pd.DataFrame:
    rows = [{"connection": connection, "partition_date": day, "report_id": r.report_id,
             "transaction_id": r.transaction_id or "", "code": Reason.MALFORMED_SOURCE.value,
             "dimension": "source", "value": r.reason, "message": r.detail}
            for r in malformed.itertuples(index=False)]
    return pd.DataFrame(rows, columns=REJECTION_COLUMNS)


@dg.asset(
    key=POSTED, partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, pool="exact", group_name="journal",
    kinds={"exactonline"}, owners=["team:finance"], ins={"journal_drafts": dg.AssetIn(DRAFTS)},
    description="What happened to each report: posted to Exact (entry ID and number), already posted, "
                "quarantined with reasons, or (dry run) previewed. Posting is exactly-once per report.",
)
def journal_entries_posted(context: dg.AssetExecutionContext, config: PostingConfig, connector: ConnectorResource,
                           journal_drafts):
    project = connector.project()
    store = connector.store()
    clients = {} if config.dry_run else {c.name: connector.exact_client(c) for c in project.connections}
    results: dict[str, pd.DataFrame] = {}
    stopped = []
    for key, drafts in _per_partition(context, journal_drafts).items():
        frames = []
        for conn in project.connections:
            mine = JournalDrafts(lines=drafts.lines[drafts.lines["connection"] == conn.name],
                                 rejections=drafts.rejections[drafts.rejections["connection"] == conn.name])
            run = post_drafts(mine, connection=conn.name, store=store, client=clients.get(conn.name),
                              dry_run=config.dry_run, run_id=context.run_id)
            frames.append(run.frame())
            if run.stopped_reason:
                stopped.append(run.stopped_reason)
        results[key] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OUTCOME_COLUMNS)
    outcomes = pd.concat(results.values(), ignore_index=True)
    for reason in stopped:
        context.log.warning(reason)
    counts = outcomes["outcome"].value_counts().to_dict()
    exact_calls = sum(getattr(c, "calls_made", 0) for c in clients.values())
    return dg.MaterializeResult(
        value=_result(context, results),
        metadata={"posted": counts.get("posted", 0), "already_posted": counts.get("already_posted", 0),
                  "quarantined": counts.get("quarantined", 0), "dry_run": counts.get("dry_run", 0),
                  "deferred": counts.get("deferred", 0), "is_dry_run": config.dry_run,
                  "posted_total": float(outcomes.loc[outcomes["outcome"] == "posted", "total_cents"].sum()) / 100,
                  "exact_calls": exact_calls,
                  "outcomes": _md(outcomes[["report_id", "outcome", "entry_number", "reason_codes"]], limit=100)},
    )


@dg.asset(
    key=QUARANTINE, partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, group_name="journal",
    kinds={"pandas"}, owners=["team:finance"], ins={"journal_entries_posted": dg.AssetIn(POSTED)},
    description="Reports held back, one row per problem: the reason code, the transaction, the missing or invalid "
                "dimension and value, and what to do about it. Replay posts them once fixed.",
)
def quarantine(context: dg.AssetExecutionContext, journal_entries_posted):
    results = {key: quarantine_rows(outcomes) for key, outcomes in
               _per_partition(context, journal_entries_posted).items()}
    rows = pd.concat(results.values(), ignore_index=True)
    return dg.MaterializeResult(
        value=_result(context, results),
        metadata={"quarantined_reports": rows["report_id"].nunique(), "problems": len(rows),
                  **{f"reason_{code}": int(n) for code, n in rows.groupby("code")["report_id"].nunique().items()},
                  "items": _md(rows[["report_id", "transaction_id", "code", "value", "message", "fix"]], limit=100),
                  "dagster/row_count": len(rows)},
    )


QUARANTINE_COLUMNS = ["connection", "partition_date", "report_id", "transaction_id", "code", "dimension", "value",
                      "message", "fix"]


def quarantine_rows(outcomes: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for o in outcomes[outcomes["outcome"] == "quarantined"].itertuples(index=False):
        for reason in o.reasons:
            code = reason.get("code", "")
            rows.append({"connection": o.connection, "partition_date": o.partition_date, "report_id": o.report_id,
                         "transaction_id": reason.get("transaction_id", ""), "code": code,
                         "dimension": reason.get("dimension", ""), "value": reason.get("value", ""),
                         "message": reason.get("message", ""), "fix": REASON_FIXES.get(Reason(code), "")})
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
