"""The asset chain of each connection: raw reports → expense lines → dimension snapshots → journal drafts →
posted entries → quarantine, plus company-card spend that is not on a report yet.

Every connection (one Exact division) gets its own asset group, so lineage and backfills read per division and
each division's API calls go through its own pool. Assets only wire plain-Python functions; a run over a date
range handles every day in one go (single-run backfills), and each day keeps its own stored value.
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
from expensify_exact.core.journal import DRAFT_COLUMNS, REASON_FIXES, REJECTION_COLUMNS, Dimensions, Reason
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
from expensify_exact.defs.keys import asset_key, exact_pool, expensify_pool, group_name, slug
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import concat, daily_asset, day_range, partition_result, per_partition
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.errors import ConnectorError

LINES_SCHEMA_CHECK = "expense_lines_schema"
DRAFTS_BALANCED_CHECK = "drafts_balanced_and_traceable"
QUARANTINE_COLUMNS = ["connection", "partition_date", "report_id", "transaction_id", "code", "dimension", "value",
                      "message", "fix"]


def build(config: ProjectConfig) -> dg.Definitions:
    assets: list = []
    for conn in config.connections:
        assets.extend(connection_assets(conn, config))
    return dg.Definitions(assets=assets)


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


# --- the chain of one connection ----------------------------------------------------------------------

def connection_assets(conn: Connection, config: ProjectConfig) -> list:
    """Every asset of one connection, keyed `<connection>/...` and grouped under the connection's name."""
    group = group_name(conn.name)
    raw_key = asset_key(conn.name, "expensify", "raw_reports")
    lines_key = asset_key(conn.name, "expensify", "expense_lines")
    dimension_keys = {name: asset_key(conn.name, "exact", name) for name in DIMENSION_QUERIES}
    drafts_key = asset_key(conn.name, "exact", "journal_drafts")
    posted_key = asset_key(conn.name, "exact", "journal_entries_posted")
    quarantine_key = asset_key(conn.name, "quarantine")
    division = f"division {conn.exact.division}"

    @daily_asset(
        key=raw_key, pool=expensify_pool(conn),
        group_name=group, kinds={"expensify", "python"}, owners=["team:data"],
        description=f"Approved and reimbursed Expensify reports of policies {', '.join(conn.expensify.policy_ids)}, "
                    f"exported with the connector's own JSON template, one list per approval day "
                    f"({conn.timezone}). A date range is fetched in as few export jobs as Expensify allows.",
    )
    def raw_reports(context: dg.AssetExecutionContext, connector: ConnectorResource):
        keys, start, end = day_range(context)
        by_day: dict[str, list[dict]] = {key: [] for key in keys}
        progress.publish(progress.Phase(conn.name, f"exporting {len(keys)} day(s) of approved reports from Expensify"))
        with connector.expensify_client(conn) as client:
            reports = client.export_reports(start, end, conn.expensify.policy_ids, timezone=conn.timezone,
                                            source_timezone=conn.expensify.timestamp_timezone)
            calls = dict(client.calls)
        for report in reports:
            day = approval_day(report, conn.timezone, conn.expensify.timestamp_timezone) or keys[0]
            by_day.setdefault(day, []).append(report)
        total = sum(len(by_day[key]) for key in keys)
        context.log.info(f"exported {total} report(s) over {len(keys)} day(s) with {sum(calls.values())} request(s)")
        return dg.MaterializeResult(
            value=partition_result(context, by_day),
            metadata={"reports": total, "days": len(keys), "expensify_requests": sum(calls.values()),
                      "export_jobs": calls.get("export", 0), "download_polls": calls.get("download", 0),
                      "dagster/row_count": total},
        )

    @daily_asset(
        key=lines_key, group_name=group,
        kinds={"pandas", "pandera"}, owners=["team:data"], ins={"raw_reports": dg.AssetIn(raw_key)},
        description="One row per expense on an approved report, amounts in integer cents, every row carrying its "
                    "report ID and transaction ID. Rows that break the schema are set aside as malformed (the "
                    "whole report is quarantined), never dropped.",
        check_specs=[dg.AssetCheckSpec(LINES_SCHEMA_CHECK, asset=lines_key, blocking=True,
                                       description="The expense lines satisfy the pandera ExpenseLineSchema.")],
    )
    def expense_lines(context: dg.AssetExecutionContext, raw_reports):
        results = {key: normalize(reports, conn) for key, reports in per_partition(context, raw_reports).items()}
        lines = concat([r.lines for r in results.values()], [])
        malformed = concat([r.malformed for r in results.values()], ["report_id", "transaction_id", "reason",
                                                                      "detail"])
        errors = _schema_errors(ExpenseLineSchema, lines)
        totals = lines.groupby("report_currency")["converted_amount_cents"].sum() if len(lines) else {}
        return dg.MaterializeResult(
            value=partition_result(context, results),
            metadata={"lines": len(lines), "reports": int(lines["report_id"].nunique()) if len(lines) else 0,
                      "malformed_lines": len(malformed), "dagster/row_count": len(lines),
                      **{f"total_{cur}": float(v) / 100 for cur, v in dict(totals).items()}},
            check_results=[dg.AssetCheckResult(
                check_name=LINES_SCHEMA_CHECK, passed=errors is None, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"failures": markdown_table(errors) if errors is not None else dg.MetadataValue.md("_none_"),
                          "malformed_lines_set_aside": len(malformed)})],
        )

    @dg.multi_asset(
        name=f"{slug(conn.name)}__exact_dimensions",
        outs={name: dg.AssetOut(key=key, group_name=group, kinds={"exactonline", "pandas"}, owners=["team:data"],
                                description=f"Snapshot of Exact's {DIMENSION_QUERIES[name][0]} in {division}. "
                                            f"Kept in the state DB and brought up to date at the start of every "
                                            f"run: GL accounts and cost centers by what changed since, the other "
                                            f"tables on a webhook, a miss or weekly (docs/dimension-snapshots.md). "
                                            f"Not partitioned: it is the state of Exact now, and each day's drafts "
                                            f"record which snapshot validated them through their lineage.")
              for name, key in dimension_keys.items()},
        pool=exact_pool(conn),
    )
    def exact_dimensions(context: dg.AssetExecutionContext, connector: ConnectorResource):
        progress.publish(progress.Phase(conn.name, f"reading Exact's dimensions of {division}"))
        client = connector.exact_client(conn)
        store = connector.store()
        clock = connector.clock()
        refresh = refresh_snapshot(client, store, conn.exact.division, needed_codes(conn, config),
                                   now=clock.now(), today=connection_today(conn.timezone, clock),
                                   invalidated=webhook_invalidations(store, conn.name))
        context.log.info(f"dimension snapshot of {division}: {client.calls_made} call(s); "
                         + ", ".join(f"{name} {how}" for name, how in refresh.how.items()))
        for name in dimension_keys:
            frame = getattr(refresh.dimensions, name)
            yield dg.Output(frame, output_name=name, metadata={
                "rows": len(frame), "dagster/row_count": len(frame), "refreshed": refresh.how[name],
                "rows_changed": refresh.changed[name], "exact_calls_for_dimensions": client.calls_made,
                "preview": markdown_table(frame, limit=30)})

    @daily_asset(
        key=drafts_key, group_name=group,
        kinds={"pandas", "pandera"}, owners=["team:finance"],
        ins={"expense_lines": dg.AssetIn(lines_key), **{name: dg.AssetIn(key) for name, key in dimension_keys.items()}},
        description=f"Balanced general journal entries for journal {conn.exact.journal} in {division}, one per "
                    f"report, mapped to GL accounts, cost centers and cost units and validated against the dimension "
                    f"snapshots. A report with any failing line is rejected whole, with a reason code per problem.",
        check_specs=[dg.AssetCheckSpec(DRAFTS_BALANCED_CHECK, asset=drafts_key, blocking=True,
                                       description="Every draft entry sums to zero, has an account on every line, "
                                                   "two-decimal amounts and both Expensify IDs on every line.")],
    )
    def journal_drafts(context: dg.AssetExecutionContext, connector: ConnectorResource, expense_lines,
                       **dimension_inputs):
        dims = Dimensions(**dimension_inputs)
        today = connection_today(conn.timezone, connector.clock())
        results = {key: draft(normalized, conn, config, dims, today, day=key)
                   for key, normalized in per_partition(context, expense_lines).items()}
        lines = concat([d.lines for d in results.values()], DRAFT_COLUMNS)
        rejections = concat([d.rejections for d in results.values()], REJECTION_COLUMNS)
        errors = _schema_errors(DraftLineSchema, lines)
        preview = lines[["report_id", "transaction_id", "side", "gl_account_code", "amount", "currency",
                         "cost_center", "cost_unit", "vat_code", "entry_date", "description"]]
        return dg.MaterializeResult(
            value=partition_result(context, results),
            metadata={"entries": int(lines["report_id"].nunique()), "lines": len(lines),
                      "rejected_reports": int(rejections["report_id"].nunique()),
                      "debit_total": round(float(lines.loc[lines["side"] == "debit", "amount_cents"].sum()) / 100, 2),
                      "preview": markdown_table(preview, limit=100),
                      "rejections": markdown_table(rejections[["report_id", "transaction_id", "code", "value", "message"]]),
                      "dagster/row_count": len(lines)},
            check_results=[dg.AssetCheckResult(
                check_name=DRAFTS_BALANCED_CHECK, passed=errors is None, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"failures": markdown_table(errors) if errors is not None else dg.MetadataValue.md("_none_"),
                          "reports_sent_to_quarantine": int(rejections["report_id"].nunique())})],
        )

    @daily_asset(
        key=posted_key, pool=exact_pool(conn),
        group_name=group, kinds={"exactonline"}, owners=["team:finance"],
        ins={"journal_drafts": dg.AssetIn(drafts_key)},
        description=f"What happened to each report in {division}: posted (entry ID and number), already posted, "
                    f"quarantined with reasons. Posting is exactly-once per report; the `dry_run` job shows what it "
                    f"would do.",
    )
    def journal_entries_posted(context: dg.AssetExecutionContext, connector: ConnectorResource, journal_drafts):
        store = connector.store()
        client = connector.exact_client(conn)
        results: dict[str, pd.DataFrame] = {}
        stopped, late = [], []
        # Days an earlier run posted after they closed: a report new in one of them is a late approval.
        closed_before = set(store.days_posted(conn.name, list(context.partition_keys)))
        drafts_by_day = per_partition(context, journal_drafts)
        progress.publish(progress.ReportsPlanned(conn.name, {key: sum(planned_reports(drafts).values())
                                                             for key, drafts in drafts_by_day.items()}))
        for key, drafts in drafts_by_day.items():
            run = post_drafts(drafts, connection=conn.name, store=store, client=client, run_id=context.run.run_id,
                              closed_days=closed_before, clock=connector.clock())
            results[key] = run.frame()
            late.extend(run.late_approvals)
            progress.publish(progress.DayDone(conn.name, key, results[key]["outcome"].value_counts().to_dict()))
            if run.stopped_reason:
                stopped.append(run.stopped_reason)
        outcomes = concat(list(results.values()), OUTCOME_COLUMNS)
        forget_vanished_deferrals(store, conn.name, list(results), set(outcomes["report_id"]), context.run.run_id)
        last_closed = closed_day(conn, connector.clock().now())
        for key in results:
            if date.fromisoformat(key) <= last_closed:
                store.day_mark_posted(conn.name, key, context.run.run_id)
        if late:
            context.log.warning(f"{len(late)} late approval(s), posted under their own earlier day: {', '.join(late)}")
        for reason in stopped:
            context.log.warning(reason)
        newly_posted = sorted(outcomes.loc[outcomes["outcome"] == Outcome.POSTED, "report_id"])
        if newly_posted and conn.expensify.mark_exported_label:
            _mark_exported(context, connector, newly_posted, store)
        counts = outcomes["outcome"].value_counts().to_dict()
        return dg.MaterializeResult(
            value=partition_result(context, results),
            metadata={**{str(o): counts.get(o, 0) for o in (Outcome.POSTED, Outcome.ALREADY_POSTED,
                                                            Outcome.QUARANTINED, Outcome.DEFERRED)},
                      "late_approvals": len(late),
                      "posted_total": float(outcomes.loc[outcomes["outcome"] == Outcome.POSTED, "total_cents"].sum()) / 100,
                      "exact_calls": client.calls_made,
                      "exact_daily_calls_left": client.rate_limits.remaining_daily or -1,
                      "outcomes": markdown_table(outcomes[["partition_date", "report_id", "outcome", "entry_number",
                                                "reason_codes"]], limit=100)},
        )

    def _mark_exported(context, connector: ConnectorResource, report_ids: list[str], store) -> None:
        """Label in Expensify only what reached the ledger; a failed label never undoes a posting."""
        label = conn.expensify.mark_exported_label
        try:
            with connector.expensify_client(conn) as client:
                client.mark_exported(report_ids, label)
            store.audit("marked_exported", connection=conn.name, run_id=context.run.run_id,
                        detail={"label": label, "reports": report_ids})
        except ConnectorError as exc:
            context.log.error(f"posted, but labelling {len(report_ids)} report(s) as {label!r} failed: {exc}")
            store.audit("mark_exported_failed", connection=conn.name, run_id=context.run.run_id,
                        detail={"label": label, "reports": report_ids, "error": str(exc)})

    @daily_asset(
        key=quarantine_key, group_name=group,
        kinds={"pandas"}, owners=["team:finance"], ins={"journal_entries_posted": dg.AssetIn(posted_key)},
        description="Reports held back, one row per problem: the reason code, the transaction, the missing or "
                    "invalid dimension and value, and what to do about it. `expensify-exact quarantine replay` "
                    "posts them once fixed.",
    )
    def quarantine(context: dg.AssetExecutionContext, journal_entries_posted):
        results = {key: quarantine_rows(outcomes)
                   for key, outcomes in per_partition(context, journal_entries_posted).items()}
        rows = concat(list(results.values()), QUARANTINE_COLUMNS)
        by_reason = rows.groupby("code")["report_id"].nunique().to_dict() if len(rows) else {}
        return dg.MaterializeResult(
            value=partition_result(context, results),
            metadata={"quarantined_reports": int(rows["report_id"].nunique()), "problems": len(rows),
                      **{f"reason_{code}": int(n) for code, n in by_reason.items()},
                      "items": markdown_table(rows[["report_id", "transaction_id", "code", "value", "message", "fix"]], 100),
                      "dagster/row_count": len(rows)},
        )

    assets = [raw_reports, expense_lines, exact_dimensions, journal_drafts, journal_entries_posted, quarantine]
    if conn.expensify.card_domain:
        assets.append(_unreported_card_spend(conn, group))
    return assets


def _unreported_card_spend(conn: Connection, group: str):
    key = asset_key(conn.name, "expensify", "unreported_card_spend")

    @daily_asset(
        key=key, pool=expensify_pool(conn),
        group_name=group, kinds={"expensify", "pandas"}, owners=["team:finance"],
        description=f"Company-card transactions of {conn.expensify.card_domain} that are on no report yet (from "
                    f"Expensify's reconciliation). Not posted — they are not approved — but shown so accountants "
                    f"see card spend that is still missing from the books.",
    )
    def unreported_card_spend(context: dg.AssetExecutionContext, connector: ConnectorResource):
        keys, start, end = day_range(context)
        with connector.expensify_client(conn) as client:
            rows = client.unreported_card_transactions(start, end, conn.expensify.card_domain)
        frame = pd.DataFrame(rows)
        by_day = {k: frame[frame["transaction_date"] == k] if len(frame) else frame for k in keys}
        totals = frame.groupby("currency")["amount_cents"].sum().to_dict() if len(frame) else {}
        return dg.MaterializeResult(
            value=partition_result(context, by_day),
            metadata={"transactions": len(frame), "dagster/row_count": len(frame),
                      **{f"total_{cur}": float(v) / 100 for cur, v in totals.items()},
                      "items": markdown_table(frame)},
        )

    return unreported_card_spend
