"""The asset chain, one asset per stage for every connection: raw reports → expense lines → dimension snapshots →
journal drafts → posted entries → quarantine, plus company-card spend that is not on a report yet.

Every asset is partitioned by connection × approval day (`defs.partitions`): a run covers any set of customers and
days, and each step works on its connections side by side, each within its own division's rate limit. Assets only
wire plain-Python functions; each (connection, day) keeps its own stored value and its own metadata.
"""

from datetime import date

import dagster as dg
import pandas as pd
from pandera.errors import SchemaErrors

from expensify_exact import progress
from expensify_exact.clock import connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.days import closed_day
from expensify_exact.core.draft_checks import DraftLineSchema
from expensify_exact.core.expense_lines import ExpenseLineSchema, approval_day
from expensify_exact.core.exports import export_together, names_by_credential
from expensify_exact.core.journal import DRAFT_COLUMNS, REASON_FIXES, REJECTION_COLUMNS, Dimensions, Reason
from expensify_exact.core.overview import record_run
from expensify_exact.core.pipeline import draft, normalize
from expensify_exact.core.posting import (
    OUTCOME_COLUMNS,
    Outcome,
    forget_vanished_deferrals,
    planned_reports,
    post_drafts,
)
from expensify_exact.core.snapshots import DIMENSION_QUERIES, needed_codes, refresh_snapshot
from expensify_exact.core.webhooks import webhook_invalidations
from expensify_exact.defs.keys import (
    EXPENSE_LINES,
    GROUP,
    JOURNAL_DRAFTS,
    POSTED,
    QUARANTINE,
    RAW_REPORTS,
    UNREPORTED_CARD_SPEND,
    dimension_key,
)
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import (
    ConnectionFailed,
    Partitioning,
    by_partition,
    concat,
    connection_asset,
    day_range,
    days_by_connection,
    describe_partitions,
    failures,
    fan_out_groups,
    for_each_connection,
    partition_key,
    partition_result,
    partitioning,
    split_key,
)
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.errors import ConnectorError

LINES_SCHEMA_CHECK = "expense_lines_schema"
DRAFTS_BALANCED_CHECK = "drafts_balanced_and_traceable"
EVERY_CONNECTION_CHECK = "every_connection_ran"
QUARANTINE_COLUMNS = ["connection", "partition_date", "report_id", "transaction_id", "code", "dimension", "value",
                      "message", "fix"]


def build(config: ProjectConfig) -> dg.Definitions:
    return dg.Definitions(assets=chain_assets(config, partitioning(config)))


# --- helpers ------------------------------------------------------------------------------------------

def _schema_errors(schema, frame: pd.DataFrame) -> pd.DataFrame | None:
    if frame.empty:
        return None
    try:
        schema.validate(frame, lazy=True)
        return None
    except SchemaErrors as errors:
        return errors.failure_cases


def quarantine_rows(outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per problem of every quarantined report, with what to do about it."""
    rows = []
    for o in outcomes[outcomes["outcome"] == Outcome.QUARANTINED].itertuples(index=False):
        for reason in o.reasons:
            code = reason.get("code", "")
            rows.append({"connection": o.connection, "partition_date": o.partition_date, "report_id": o.report_id,
                         "transaction_id": reason.get("transaction_id", ""), "code": code,
                         "dimension": reason.get("dimension", ""), "value": reason.get("value", ""),
                         "message": reason.get("message", ""), "fix": REASON_FIXES.get(Reason(code), "")})
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


# --- the chain ---------------------------------------------------------------------------------------

def _ok(values: dict) -> dict:
    """The values of the connections that did not fail, by partition."""
    return {key: value for key, value in values.items() if not isinstance(value, ConnectionFailed)}


def chain_assets(config: ProjectConfig, partitions: Partitioning) -> list:
    """Every asset of the chain, keyed as in `defs.keys`, for all connections of `config`."""

    @connection_asset(
        partitions, key=RAW_REPORTS, group_name=GROUP, kinds={"expensify", "python"}, owners=["team:data"],
        description="Approved and reimbursed Expensify reports, one list per connection and approval day (in the "
                    "connection's timezone), exported with the connector's own JSON template. Connections that share "
                    "an Expensify credential are exported together, one export job for all their policies, and split "
                    "by policy after; a date range takes as few export jobs as Expensify allows.",
    )
    def raw_reports(context: dg.AssetExecutionContext, connector: ConnectorResource):
        plan = days_by_connection(context)
        # Connections of one credential share their timezone and client settings (config validation).
        groups = names_by_credential([config.connection(name) for name in plan])
        requests: dict[str, dict[str, int]] = {}

        def export(conns: list[Connection], days_of: dict[str, list[str]]) -> dict[str, dict[str, list[dict]]]:
            start = min(day_range(days)[0] for days in days_of.values())
            end = max(day_range(days)[1] for days in days_of.values())
            for conn in conns:
                progress.publish(progress.Phase(conn.name, f"exporting {len(days_of[conn.name])} day(s) of approved "
                                                           f"reports from Expensify"))
            with connector.expensify_client(conns[0]) as client:
                split = export_together(client, conns, start, end)
                calls = dict(client.calls)
            out: dict[str, dict[str, list[dict]]] = {}
            for conn in conns:
                days = days_of[conn.name]
                by_day: dict[str, list[dict]] = {day: [] for day in days}
                for report in split[conn.name]:
                    day = approval_day(report, conn.timezone, conn.expensify.timestamp_timezone) or days[0]
                    if day in by_day:
                        by_day[day].append(report)
                out[conn.name] = by_day
                requests[conn.name] = {"export_jobs": calls.get("export", 0), "download_polls": calls.get("download", 0),
                                  "expensify_requests": sum(calls.values()), "exported_with": len(conns)}
            return out

        results = fan_out_groups(context.log, "raw_reports", config, plan, groups, export)
        values = by_partition(results)
        describe_partitions(context, values, lambda key, reports: {
            "reports": len(reports), "dagster/row_count": len(reports),
            **{f"{name}_of_shared_export": n for name, n in requests.get(split_key(key)[0], {}).items()}})
        exported = sum(len(v) for v in _ok(values).values())
        context.log.info(f"exported {exported} report(s) for {len(plan)} connection(s) in {len(groups)} export(s)")
        return dg.MaterializeResult(value=partition_result(context, values))

    @connection_asset(
        partitions, key=EXPENSE_LINES, group_name=GROUP, kinds={"pandas", "pandera"}, owners=["team:data"],
        ins={"raw_reports": dg.AssetIn(RAW_REPORTS)},
        description="One row per expense on an approved report, amounts in integer cents, every row carrying its "
                    "report ID and transaction ID. Rows that break the schema are set aside as malformed (the "
                    "whole report is quarantined), never dropped.",
        check_specs=[dg.AssetCheckSpec(LINES_SCHEMA_CHECK, asset=EXPENSE_LINES, blocking=True,
                                       description="The expense lines satisfy the pandera ExpenseLineSchema.")],
    )
    def expense_lines(context: dg.AssetExecutionContext, raw_reports):
        values = for_each_connection(context, config, lambda conn, days, reports: {
            day: normalize(reports[day], conn) for day in days}, raw_reports)
        ok = _ok(values)
        lines = concat([r.lines for r in ok.values()], [])
        malformed = concat([r.malformed for r in ok.values()], ["report_id", "transaction_id", "reason", "detail"])
        errors = _schema_errors(ExpenseLineSchema, lines)

        def describe(_key, result):
            frame = result.lines
            totals = frame.groupby("report_currency")["converted_amount_cents"].sum() if len(frame) else {}
            return {"lines": len(frame), "reports": int(frame["report_id"].nunique()) if len(frame) else 0,
                    "malformed_lines": len(result.malformed), "dagster/row_count": len(frame),
                    **{f"total_{cur}": float(v) / 100 for cur, v in dict(totals).items()}}

        describe_partitions(context, values, describe)
        return dg.MaterializeResult(
            value=partition_result(context, values),
            check_results=[dg.AssetCheckResult(
                check_name=LINES_SCHEMA_CHECK, passed=errors is None, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"failures": markdown_table(errors) if errors is not None else dg.MetadataValue.md("_none_"),
                          "malformed_lines_set_aside": len(malformed)})],
        )

    dimension_names = list(DIMENSION_QUERIES)

    @dg.multi_asset(
        name="exact_dimensions", partitions_def=partitions.days, backfill_policy=dg.BackfillPolicy.single_run(),
        outs={name: dg.AssetOut(key=dimension_key(name), group_name=GROUP, kinds={"exactonline", "pandas"},
                                owners=["team:data"],
                                description=f"Snapshot of Exact's {DIMENSION_QUERIES[name][0]} in each connection's "
                                            f"division, as it validated that day's drafts. Kept in the state DB and "
                                            f"brought up to date at the start of every run: GL accounts and cost "
                                            f"centers by what changed since, the other tables on a webhook, a miss or "
                                            f"weekly (docs/dimension-snapshots.md).")
              for name in dimension_names},
    )
    def exact_dimensions(context: dg.AssetExecutionContext, connector: ConnectorResource):
        clock = connector.clock()
        store = connector.store()
        refreshes: dict[str, tuple] = {}

        def refresh(conn: Connection, days: list[str]) -> dict:
            division = f"division {conn.exact.division}"
            progress.publish(progress.Phase(conn.name, f"reading Exact's dimensions of {division}"))
            client = connector.exact_client(conn)
            done = refresh_snapshot(client, store, conn.exact.division, needed_codes(conn, config),
                                    now=clock.now(), today=connection_today(conn.timezone, clock),
                                    invalidated=webhook_invalidations(store, conn.name))
            refreshes[conn.name] = (done, client.calls_made)
            return {day: done.dimensions for day in days}

        values = for_each_connection(context, config, refresh)
        for name in dimension_names:
            def describe(key, dims, name=name):
                done, calls = refreshes[split_key(key)[0]]
                frame = getattr(dims, name)
                return {"rows": len(frame), "dagster/row_count": len(frame), "refreshed": done.how[name],
                        "rows_changed": done.changed[name], "exact_calls_for_dimensions": calls,
                        "preview": markdown_table(frame, limit=30)}

            describe_partitions(context, values, describe, asset_key=dimension_key(name))
            by_key = {key: dims if isinstance(dims, ConnectionFailed) else getattr(dims, name)
                      for key, dims in values.items()}
            yield dg.Output(partition_result(context, by_key), output_name=name)

    @connection_asset(
        partitions, key=JOURNAL_DRAFTS, group_name=GROUP, kinds={"pandas", "pandera"}, owners=["team:finance"],
        ins={"expense_lines": dg.AssetIn(EXPENSE_LINES),
             **{name: dg.AssetIn(dimension_key(name)) for name in dimension_names}},
        description="Balanced general journal entries, one per report, for each connection's journal and division, "
                    "mapped to GL accounts, cost centers and cost units and validated against the dimension "
                    "snapshots. A report with any failing line is rejected whole, with a reason code per problem.",
        check_specs=[dg.AssetCheckSpec(DRAFTS_BALANCED_CHECK, asset=JOURNAL_DRAFTS, blocking=True,
                                       description="Every draft entry sums to zero, has an account on every line, "
                                                   "two-decimal amounts and both Expensify IDs on every line.")],
    )
    def journal_drafts(context: dg.AssetExecutionContext, connector: ConnectorResource, expense_lines,
                       **dimension_inputs):
        clock = connector.clock()

        def drafts(conn: Connection, days: list[str], lines_by_day: dict, *dimensions_by_day: dict) -> dict:
            today = connection_today(conn.timezone, clock)
            return {day: draft(lines_by_day[day], conn, config,
                               Dimensions(**{name: values[day] for name, values in zip(dimension_names,
                                                                                        dimensions_by_day)}),
                               today, day=day)
                    for day in days}

        values = for_each_connection(context, config, drafts, expense_lines,
                                     *(dimension_inputs[name] for name in dimension_names))
        ok = _ok(values)
        lines = concat([d.lines for d in ok.values()], DRAFT_COLUMNS)
        errors = _schema_errors(DraftLineSchema, lines)

        def describe(_key, result):
            frame, rejections = result.lines, result.rejections
            preview = frame[["report_id", "transaction_id", "side", "gl_account_code", "amount", "currency",
                             "cost_center", "cost_unit", "vat_code", "entry_date", "description"]]
            return {"entries": int(frame["report_id"].nunique()) if len(frame) else 0, "lines": len(frame),
                    "rejected_reports": int(rejections["report_id"].nunique()) if len(rejections) else 0,
                    "debit_total": round(float(frame.loc[frame["side"] == "debit", "amount_cents"].sum()) / 100, 2)
                    if len(frame) else 0.0,
                    "preview": markdown_table(preview, limit=100),
                    "rejections": markdown_table(rejections[["report_id", "transaction_id", "code", "value",
                                                             "message"]]) if len(rejections)
                    else dg.MetadataValue.md("_none_"),
                    "dagster/row_count": len(frame)}

        describe_partitions(context, values, describe)
        rejections = concat([d.rejections for d in ok.values()], REJECTION_COLUMNS)
        return dg.MaterializeResult(
            value=partition_result(context, values),
            check_results=[dg.AssetCheckResult(
                check_name=DRAFTS_BALANCED_CHECK, passed=errors is None, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"failures": markdown_table(errors) if errors is not None else dg.MetadataValue.md("_none_"),
                          "reports_sent_to_quarantine": int(rejections["report_id"].nunique())
                          if len(rejections) else 0})],
        )

    @connection_asset(
        partitions, key=POSTED, group_name=GROUP, kinds={"exactonline"}, owners=["team:finance"],
        ins={"journal_drafts": dg.AssetIn(JOURNAL_DRAFTS)},
        description="What happened to each report: posted (entry ID and number), already posted, quarantined with "
                    "reasons, deferred. Posting is exactly-once per report; the `dry_run` job shows what it would do.",
        check_specs=[dg.AssetCheckSpec(EVERY_CONNECTION_CHECK, asset=POSTED,
                                       description="Every connection of the run got through the chain; fails naming "
                                                   "each one that did not, the step and the error (the others "
                                                   "were posted all the same).")],
    )
    def journal_entries_posted(context: dg.AssetExecutionContext, connector: ConnectorResource, journal_drafts):
        store = connector.store()
        clock = connector.clock()
        run_id = context.run.run_id
        posted_with: dict[str, dict] = {}
        stopped_why: dict[str, str] = {}

        def post(conn: Connection, days: list[str], drafts_by_day: dict) -> dict[str, pd.DataFrame]:
            client = connector.exact_client(conn)
            results: dict[str, pd.DataFrame] = {}
            stopped, late = [], []
            # Days an earlier run posted after they closed: a report new in one of them is a late approval.
            closed_before = set(store.days_posted(conn.name, days))
            progress.publish(progress.ReportsPlanned(conn.name, {day: sum(planned_reports(drafts).values())
                                                                 for day, drafts in drafts_by_day.items()}))
            for day, drafts in drafts_by_day.items():
                run = post_drafts(drafts, connection=conn.name, store=store, client=client, run_id=run_id,
                                  closed_days=closed_before, clock=clock)
                results[day] = run.frame()
                late.extend(run.late_approvals)
                progress.publish(progress.DayDone(conn.name, day, results[day]["outcome"].value_counts().to_dict()))
                if run.stopped_reason:
                    stopped.append(run.stopped_reason)
            outcomes = concat(list(results.values()), OUTCOME_COLUMNS)
            forget_vanished_deferrals(store, conn.name, list(results), set(outcomes["report_id"]), run_id)
            last_closed = closed_day(conn, clock.now())
            for day in results:
                if date.fromisoformat(day) <= last_closed:
                    store.day_mark_posted(conn.name, day, run_id)
            if late:
                context.log.warning(f"{conn.name}: {len(late)} late approval(s), posted under their own earlier day: "
                                    f"{', '.join(late)}")
            for reason in stopped:
                context.log.warning(f"{conn.name}: {reason}")
            newly_posted = sorted(outcomes.loc[outcomes["outcome"] == Outcome.POSTED, "report_id"])
            if newly_posted and conn.expensify.mark_exported_label:
                _mark_exported(context, connector, conn, newly_posted, store)
            posted_with[conn.name] = {"late_approvals": len(late), "exact_calls": client.calls_made,
                                      "exact_daily_calls_left": client.rate_limits.remaining_daily or -1}
            stopped_why[conn.name] = "; ".join(stopped)
            return results

        values = for_each_connection(context, config, post, journal_drafts)

        def describe(key, outcomes):
            counts = outcomes["outcome"].value_counts().to_dict()
            return {**{str(o): counts.get(o, 0) for o in (Outcome.POSTED, Outcome.ALREADY_POSTED,
                                                          Outcome.QUARANTINED, Outcome.DEFERRED)},
                    **posted_with.get(split_key(key)[0], {}),
                    "posted_total": float(outcomes.loc[outcomes["outcome"] == Outcome.POSTED,
                                                       "total_cents"].sum()) / 100,
                    "outcomes": markdown_table(outcomes[["partition_date", "report_id", "outcome", "entry_number",
                                                         "reason_codes"]], limit=100)}

        describe_partitions(context, values, describe)
        failed = failures(values)
        _record_runs(store, run_id, days_by_connection(context), values, stopped_why)
        table = pd.DataFrame([{"connection": f.connection, "step": f.step, "error": f.error} for f in failed],
                             columns=["connection", "step", "error"])
        return dg.MaterializeResult(
            value=partition_result(context, values),
            check_results=[dg.AssetCheckResult(
                check_name=EVERY_CONNECTION_CHECK, passed=not failed, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"connections": len(days_by_connection(context)), "failed_connections": len(failed),
                          "failures": markdown_table(table, limit=100)})],
        )

    @connection_asset(
        partitions, key=QUARANTINE, group_name=GROUP, kinds={"pandas"}, owners=["team:finance"],
        ins={"journal_entries_posted": dg.AssetIn(POSTED)},
        description="Reports held back, one row per problem: the reason code, the transaction, the missing or "
                    "invalid dimension and value, and what to do about it. `expensify-exact quarantine replay` "
                    "posts them once fixed.",
    )
    def quarantine(context: dg.AssetExecutionContext, journal_entries_posted):
        values = for_each_connection(context, config, lambda conn, days, outcomes: {
            day: quarantine_rows(outcomes[day]) for day in days}, journal_entries_posted)

        def describe(_key, rows):
            by_reason = rows.groupby("code")["report_id"].nunique().to_dict() if len(rows) else {}
            return {"quarantined_reports": int(rows["report_id"].nunique()) if len(rows) else 0,
                    "problems": len(rows), **{f"reason_{code}": int(n) for code, n in by_reason.items()},
                    "items": markdown_table(rows[["report_id", "transaction_id", "code", "value", "message", "fix"]],
                                            100),
                    "dagster/row_count": len(rows)}

        describe_partitions(context, values, describe)
        return dg.MaterializeResult(value=partition_result(context, values))

    @connection_asset(
        partitions, key=UNREPORTED_CARD_SPEND, group_name=GROUP, kinds={"expensify", "pandas"},
        owners=["team:finance"],
        description="Company-card transactions of each connection's `card_domain` that are on no report yet (from "
                    "Expensify's reconciliation). Not posted — they are not approved — but shown so accountants "
                    "see card spend that is still missing from the books. Empty for a connection without cards.",
    )
    def unreported_card_spend(context: dg.AssetExecutionContext, connector: ConnectorResource):
        def spend(conn: Connection, days: list[str]) -> dict[str, pd.DataFrame]:
            if not conn.expensify.card_domain:
                return {day: pd.DataFrame() for day in days}
            start, end = day_range(days)
            with connector.expensify_client(conn) as client:
                frame = pd.DataFrame(client.unreported_card_transactions(start, end, conn.expensify.card_domain))
            return {day: frame[frame["transaction_date"] == day] if len(frame) else frame for day in days}

        values = for_each_connection(context, config, spend)

        def describe(_key, frame):
            totals = frame.groupby("currency")["amount_cents"].sum().to_dict() if len(frame) else {}
            return {"transactions": len(frame), "dagster/row_count": len(frame),
                    **{f"total_{cur}": float(v) / 100 for cur, v in totals.items()}, "items": markdown_table(frame)}

        describe_partitions(context, values, describe)
        return dg.MaterializeResult(value=partition_result(context, values))

    return [raw_reports, expense_lines, exact_dimensions, journal_drafts, journal_entries_posted, quarantine,
            unreported_card_spend]


def _record_runs(store, run_id: str, plan: dict[str, list[str]], values: dict, stopped: dict[str, str]) -> None:
    """What the run did for each of its connections, for the overview (`core.overview.record_run`)."""
    for name, days in plan.items():
        mine = [values[partition_key(name, day)] for day in days]
        failed = next((v for v in mine if isinstance(v, ConnectionFailed)), None)
        frames = [v for v in mine if isinstance(v, pd.DataFrame)]
        counts = concat(frames, OUTCOME_COLUMNS)["outcome"].value_counts().to_dict()
        record_run(store, name, run_id, days, counts={str(k): int(v) for k, v in counts.items()},
                   stopped=stopped.get(name) or None, failed=f"{failed.step}: {failed.error}" if failed else None)


def _mark_exported(context, connector: ConnectorResource, conn: Connection, report_ids: list[str], store) -> None:
    """Label in Expensify only what reached the ledger; a failed label never undoes a posting."""
    label = conn.expensify.mark_exported_label
    try:
        with connector.expensify_client(conn) as client:
            client.mark_exported(report_ids, label)
        store.audit("marked_exported", connection=conn.name, run_id=context.run.run_id,
                    detail={"label": label, "reports": report_ids})
    except ConnectorError as exc:
        context.log.error(f"{conn.name}: posted, but labelling {len(report_ids)} report(s) as {label!r} failed: {exc}")
        store.audit("mark_exported_failed", connection=conn.name, run_id=context.run.run_id,
                    detail={"label": label, "reports": report_ids, "error": str(exc)})
