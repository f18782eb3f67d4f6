"""Reconciliation and the daily digest, per connection: a fresh export of each approval day's approved reports, the
read-back of its entries, a monthly rollup, and the accountants' digest. Their checks are the reconciliation's invariants: a red check means the books and
Expensify disagree.

These assets sit in their own group per connection (`<connection>_reconciliation`) and run in their own jobs,
after the posting job: reconciling never slows posting down, and a finding never fails a posting run.
"""


import calendar
from datetime import date
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from expensify_exact.clock import connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.days import DayRun, reconciliation_day
from expensify_exact.core.digest import DIGEST_DIR_ENV, build_digest, digest_dir, write_digest
from expensify_exact.core.posting import OUTCOME_COLUMNS
from expensify_exact.core.reconcile import (
    FINDING_COLUMNS,
    FINDING_FIXES,
    Finding,
    Reconciliation,
    approved_lines_by_day,
    reconcile_connection_month,
    reconcile_days,
)
from expensify_exact.defs.jobs import day_run_request
from expensify_exact.defs.keys import asset_key, exact_pool, expensify_pool, group_name
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import concat, daily_asset, partition_result, per_partition
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.notify.mail import mail_digest
from expensify_exact.store import QuarantineStatus

MONTHLY = dg.MonthlyPartitionsDefinition(start_date="2024-01-01", timezone="Europe/Amsterdam")
DAILY_JOB_NAME = "reconcile_and_digest"
DAILY_SENSOR_NAME = "reconcile_closed_days"
MINIMUM_INTERVAL_SECONDS = 10 * 60
MONTHLY_JOB_NAME = "reconcile_month"

# Daily invariants: check name → the findings that break it, and what it promises.
DAILY_CHECKS: dict[str, tuple[tuple[Finding, ...], str]] = {
    "every_approved_report_posted_or_quarantined": (
        (Finding.NOT_POSTED, Finding.POSTED_NOT_APPROVED),
        "Every report Expensify approved that day is posted or waits in quarantine, and nothing else is posted."),
    "ledger_matches_expensify": (
        (Finding.LEDGER_DIFFERS_FROM_EXPENSIFY,),
        "What the ledger recorded as posted still matches the report in Expensify (or the change is quarantined)."),
    "posted_entries_unchanged_in_exact": (
        (Finding.MISSING_IN_EXACT, Finding.AMOUNT_CHANGED_IN_EXACT, Finding.ACCOUNT_CHANGED_IN_EXACT,
         Finding.DIMENSION_CHANGED_IN_EXACT),
        "Every posted entry is still in Exact with the posted amounts, GL accounts, cost centers and cost units."),
    "each_report_in_exact_once": (
        (Finding.POSTED_TWICE,), "No report is in Exact more than once."),
    "totals_match_per_account_and_cost_center": (
        (Finding.TOTALS_DIFFER,), "Totals per GL account, cost center and currency agree between Expensify and Exact."),
}
MONTHLY_CHECKS: dict[str, tuple[tuple[Finding, ...], str]] = {
    "card_liability_nets_to_zero": (
        (Finding.CARD_LIABILITY_NOT_NETTED,),
        "Each card liability account nets to zero over the month once the card settlements are booked."),
    "month_reconciles": (
        tuple(Finding), "The month has no findings at all: every day reconciled clean and nothing is posted twice."),
}


def reconciliation_group(conn: Connection) -> str:
    return f"{group_name(conn.name)}_reconciliation"


def approved_key(conn: Connection) -> dg.AssetKey:
    return asset_key(conn.name, "reconciliation", "expensify_approved")


def daily_key(conn: Connection) -> dg.AssetKey:
    return asset_key(conn.name, "reconciliation", "daily")


def monthly_key(conn: Connection) -> dg.AssetKey:
    return asset_key(conn.name, "reconciliation", "monthly")


def digest_key(conn: Connection) -> dg.AssetKey:
    return asset_key(conn.name, "reconciliation", "daily_digest")


def build(config: ProjectConfig) -> dg.Definitions:
    assets: list = []
    for conn in config.connections:
        assets.extend(connection_reconciliation_assets(conn, config))
    daily_job = dg.define_asset_job(
        DAILY_JOB_NAME, selection=dg.AssetSelection.assets(*[k for c in config.connections
                                                              for k in (approved_key(c), daily_key(c), digest_key(c))]),
        description="Re-read the day's approved reports from Expensify and its posted entries from Exact, compare "
                    "them with the ledger, and write the accountants' digest.")
    monthly_job = dg.define_asset_job(
        MONTHLY_JOB_NAME, selection=dg.AssetSelection.assets(*[monthly_key(c) for c in config.connections]),
        description="Roll the month's daily reconciliations up; check card liabilities.")

    @dg.sensor(
        name=DAILY_SENSOR_NAME, job=daily_job, minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING, required_resource_keys={"connector"},
        description="For each connection, once the run of its newest closed day has posted, reconciles the day "
                    "`posting.lookback_days` before it — the newest day no later run re-exports — and writes its "
                    "digest; keyed connection + day, so each day is reconciled once.",
    )
    def reconcile_closed_days(context: dg.SensorEvaluationContext):
        store = context.resources.connector.store()
        requests, notes = [], []
        for conn in config.connections:
            day = reconciliation_day(conn, store)
            run = DayRun(conn.name, day, day, f"{conn.name}:reconcile:{day}", "") if day else None
            selection = dg.AssetSelection.assets(approved_key(conn), daily_key(conn), digest_key(conn))
            request = day_run_request(context, run, selection, "window_closed") if run else None
            if request is None:
                notes.append(f"{conn.name}: nothing new to reconcile")
                continue
            requests.append(request)
        return requests or dg.SkipReason("; ".join(notes))

    # The month's last day is reconciled once the day `lookback_days` after it has been posted, which (in any zone)
    # is done by 07:45 Amsterdam time two days later; card statements are usually booked by then too.
    month_day = min(28, 2 + max((c.posting.lookback_days for c in config.connections), default=1))
    schedules = [
        dg.build_schedule_from_partitioned_job(
            monthly_job, name="reconcile_last_month", day_of_month=month_day, hour_of_day=7, minute_of_hour=45,
            description=f"On day {month_day} of the month, once every day of the previous month has been reconciled "
                        f"(after its look-back) and card statements are usually booked, reconciles that month.",
            default_status=dg.DefaultScheduleStatus.RUNNING),
    ]
    return dg.Definitions(assets=assets, jobs=[daily_job, monthly_job], schedules=schedules,
                          sensors=[reconcile_closed_days])


def connection_reconciliation_assets(conn: Connection, config: ProjectConfig) -> list:
    group = reconciliation_group(conn)
    posted_key = asset_key(conn.name, "exact", "journal_entries_posted")
    reports_key, day_key, month_key, mail_key = approved_key(conn), daily_key(conn), monthly_key(conn), digest_key(conn)

    @daily_asset(
        key=reports_key, pool=expensify_pool(conn),
        group_name=group, kinds={"expensify", "pandas"}, owners=["team:finance"], deps=[posted_key],
        description=f"Expensify's approved reports of policies {', '.join(conn.expensify.policy_ids)} for each day, "
                    f"re-exported for reconciliation with one export job for the whole range, independently of what "
                    f"the posting run exported: a report approved for a day but never picked up by that run is what "
                    f"reconciliation exists to find.",
    )
    def expensify_approved(context: dg.AssetExecutionContext, connector: ConnectorResource):
        with connector.expensify_client(conn) as client:
            by_day = approved_lines_by_day(client, conn, context.partition_keys)
            calls = dict(client.calls)
        lines = sum(len(v.lines) for v in by_day.values())
        return dg.MaterializeResult(
            value=partition_result(context, by_day),
            metadata={"reports": sum(int(v.lines["report_id"].nunique()) for v in by_day.values()),
                      "lines": lines, "malformed_lines": sum(len(v.malformed) for v in by_day.values()),
                      "export_jobs": calls.get("export", 0), "download_polls": calls.get("download", 0),
                      "dagster/row_count": lines})

    @daily_asset(
        key=day_key, pool=exact_pool(conn),
        group_name=group, kinds={"exactonline", "pandas"}, owners=["team:finance"],
        ins={"expense_lines": dg.AssetIn(reports_key)}, deps=[posted_key],
        description=f"Reads the day's posted entries back from Exact (division {conn.exact.division}) and compares "
                    f"three sides per report, GL account, cost center and currency: Expensify's approved reports "
                    f"(re-exported, not the posting run's copy), the connector's ledger and quarantine, and Exact's "
                    f"transaction lines. Each difference is a finding with a reason code.",
        check_specs=[dg.AssetCheckSpec(name, asset=day_key, blocking=False, description=text)
                     for name, (_codes, text) in DAILY_CHECKS.items()],
    )
    def reconciliation_daily(context: dg.AssetExecutionContext, connector: ConnectorResource, expense_lines):
        # expense_lines: the re-exported approved reports of `expensify_approved`, one NormalizedLines per day.
        client = connector.exact_client(conn)
        results = reconcile_days(conn, config, per_partition(context, expense_lines), connector.store(), client,
                                 today=connection_today(conn.timezone, connector.clock()))
        findings = concat([r.findings for r in results.values()], FINDING_COLUMNS)
        for result in results.values():
            (context.log.info if result.clean else context.log.warning)(result.summary())
        return dg.MaterializeResult(
            value=partition_result(context, results),
            metadata={**_finding_metadata(findings), "days": len(results),
                      "reports_approved": sum(r.stats["reports_approved"] for r in results.values()),
                      "entries_checked": sum(r.stats["entries_checked"] for r in results.values()),
                      "exact_calls": client.calls_made,
                      "exact_daily_calls_left": client.rate_limits.remaining_daily
                      if client.rate_limits.remaining_daily is not None else -1},
            check_results=_check_results(DAILY_CHECKS, findings),
        )

    @daily_asset(
        key=mail_key, group_name=group,
        kinds={"markdown", "html"}, owners=["team:finance"],
        ins={"reconciliation": dg.AssetIn(day_key), "journal_entries_posted": dg.AssetIn(posted_key)},
        description=f"The accountants' daily summary for {conn.name}: what was posted, what waits in quarantine and "
                    f"how to fix it, what the reconciliation found, and Exact's rate and token health. Written as "
                    f"Markdown and e-mail-ready HTML under $DAGSTER_HOME/digests/{conn.name}/ "
                    f"(or ${DIGEST_DIR_ENV}/{conn.name}/), and mailed once per day to notify.digest.to.",
    )
    def daily_digest(context: dg.AssetExecutionContext, connector: ConnectorResource, reconciliation,
                     journal_entries_posted):
        store = connector.store()
        ledger = store.ledger_rows(conn.name)
        quarantine = store.quarantine_items(conn.name, status=QuarantineStatus.OPEN)
        token_ages = store.token_ages()
        recon_by_day = per_partition(context, reconciliation)
        outcomes_by_day = per_partition(context, journal_entries_posted)
        base = _digest_base(context)
        paths: dict[str, str] = {}
        mailed: dict[str, str] = {}
        last = None
        for day in context.partition_keys:
            digest = build_digest(connection=conn.name, day=day, ledger=ledger, quarantine=quarantine,
                                  outcomes=_own_outcomes(outcomes_by_day.get(day), conn.name),
                                  reconciliation=recon_by_day.get(day), token_ages=token_ages,
                                  currency=conn.exact.division_currency,
                                  last_day_posted=store.last_day_posted(conn.name), now=connector.clock().now())
            written = write_digest(digest, base)
            paths[day] = str(written["md"])
            last = digest
            # Written first, mailed after: a mail server that refuses fails the step (and alerts), and the rerun
            # mails what did not go out; a day already mailed is not mailed again.
            mailed[day] = mail_digest(digest, conn, store, connector.vault())
            context.log.info(f"digest of {day}: {mailed[day]}")
        values = {day: str(Path(p).with_suffix("")) for day, p in paths.items()}
        return dg.MaterializeResult(
            value=partition_result(context, values),
            metadata={"digest": dg.MetadataValue.md(last.render("md")) if last else dg.MetadataValue.md("_none_"),
                      "path_md": dg.MetadataValue.path(paths[context.partition_keys[-1]]),
                      "days": len(paths), "headline": last.headline if last else "",
                      "mailed": sum(1 for v in mailed.values() if v == "sent"),
                      "mail": ", ".join(sorted(set(mailed.values())))},
        )

    @dg.asset(
        key=month_key, partitions_def=MONTHLY, group_name=group, pool=exact_pool(conn),
        kinds={"exactonline", "pandas"}, owners=["team:finance"],
        ins={"daily": dg.AssetIn(day_key, metadata={"allow_missing_partitions": True})},
        description=f"The month's reconciliation for {conn.name}: the daily findings rolled up, totals per GL "
                    f"account and cost center, reports posted twice anywhere in the month's financial period, and "
                    f"whether each card liability account nets to zero once the card settlements are booked.",
        check_specs=[dg.AssetCheckSpec(name, asset=month_key, blocking=False, description=text)
                     for name, (_codes, text) in MONTHLY_CHECKS.items()],
    )
    def reconciliation_monthly(context: dg.AssetExecutionContext, connector: ConnectorResource, daily):
        month = context.partition_key[:7]
        days = _days_of(daily, context)
        expected_days = _month_days(month, connection_today(conn.timezone, connector.clock()))
        result = reconcile_connection_month(conn, month, days, expected_days, connector.store(),
                                            connector.exact_client(conn))
        context.log.info(result.summary())
        cards = result.card_accounts if result.card_accounts is not None else pd.DataFrame()
        return dg.MaterializeResult(
            value=result,
            metadata={**_finding_metadata(result.findings), "summary": result.summary(),
                      "days_reconciled": result.stats["days_reconciled"],
                      "days_missing": dg.MetadataValue.json(result.stats["days_missing"]),
                      "financial_period": result.stats.get("financial_period", ""),
                      "card_accounts": markdown_table(_money_frame(cards, ["ours_cents", "settlements_cents", "balance_cents"])),
                      "totals": markdown_table(_money_frame(result.totals, ["expected_cents", "actual_cents",
                                                                 "difference_cents"]), limit=200)},
            check_results=_check_results(MONTHLY_CHECKS, result.findings,
                                         extra={"days_missing": len(result.stats["days_missing"])}),
        )

    return [expensify_approved, reconciliation_daily, daily_digest, reconciliation_monthly]


# --- helpers ------------------------------------------------------------------------------------------

def _days_of(daily: Any, context: dg.AssetExecutionContext) -> dict[str, Reconciliation]:
    if isinstance(daily, Reconciliation):  # a month whose days map to a single stored partition
        return {daily.period: daily}
    return {day: value for day, value in (daily or {}).items() if isinstance(value, Reconciliation)}


def _month_days(month: str, today: date) -> list[str]:
    """The month's days before `today` (the connection's day): those that should have a reconciliation."""
    year, number = int(month[:4]), int(month[5:7])
    days = [date(year, number, d) for d in range(1, calendar.monthrange(year, number)[1] + 1)]
    return [d.isoformat() for d in days if d < today]


def _own_outcomes(outcomes: Any, connection: str) -> pd.DataFrame | None:
    if outcomes is None or not isinstance(outcomes, pd.DataFrame):
        return None
    frame = outcomes.reindex(columns=OUTCOME_COLUMNS)
    return frame[frame["connection"].isin([connection]) | frame["connection"].isna()]


def _digest_base(context: dg.AssetExecutionContext) -> Path:
    import os

    if os.environ.get(DIGEST_DIR_ENV):
        return digest_dir()
    # The instance's home, so a test instance (or a second deployment) keeps its digests to itself.
    return Path(context.instance.root_directory) / "digests"


def _finding_metadata(findings: pd.DataFrame) -> dict[str, Any]:
    counts = findings["code"].value_counts().to_dict() if len(findings) else {}
    shown = findings[["period", "code", "report_id", "entry_number", "gl_account_code", "cost_center", "message"]]
    return {"findings": len(findings), **{f"finding_{code}": int(n) for code, n in sorted(counts.items())},
            "findings_table": markdown_table(shown, limit=100) if len(findings) else dg.MetadataValue.md(
                "**0 findings** — Exact matches Expensify."),
            "dagster/row_count": len(findings)}


def _check_results(checks: dict[str, tuple[tuple[Finding, ...], str]], findings: pd.DataFrame,
                   extra: dict[str, Any] | None = None) -> list[dg.AssetCheckResult]:
    out = []
    for name, (codes, _text) in checks.items():
        broken = findings[findings["code"].isin([c.value for c in codes])]
        fixes = "\n".join(f"- **{c}**: {FINDING_FIXES[Finding(c)]}" for c in sorted(set(broken["code"])))
        out.append(dg.AssetCheckResult(
            check_name=name, passed=broken.empty, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"findings": len(broken), **(extra or {}),
                      "details": markdown_table(broken[["period", "code", "report_id", "entry_number", "message"]])
                      if len(broken) else dg.MetadataValue.md("_none_"),
                      "what_to_do": dg.MetadataValue.md(fixes or "_nothing_")}))
    return out


def _money_frame(frame: pd.DataFrame, cent_columns: list[str]) -> pd.DataFrame:
    out = frame.copy()
    for column in cent_columns:
        if column in out:
            out[column.removesuffix("_cents")] = out.pop(column).astype(float) / 100
    return out


