"""Reconciliation and the daily digest of every connection: a fresh export of each approval day's approved reports,
the read-back of its entries, a monthly rollup, and the accountants' digest. Their checks are the reconciliation's
invariants: a red check means the books and Expensify disagree, and its metadata names the connections at fault.

Like the chain, each asset is one for all connections, partitioned by connection × day (the monthly rollup by
connection × month), and runs in its own jobs after the posting job: reconciling never slows posting down, and a
finding never fails a posting run. A run covers a rectangle of partitions, so the sensor and the schedule ask for
one run per range of consecutive connections whose day (or month) is the same.
"""

import calendar
import json
import os
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd

from expensify_exact.clock import connection_today
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.days import reconciliation_day
from expensify_exact.core.digest import DIGEST_DIR_ENV, Digest, build_digest, digest_dir, write_digest
from expensify_exact.core.exports import names_by_credential, split_by_policy
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
from expensify_exact.defs.keys import POSTED, RECONCILIATION_GROUP
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import (
    CONNECTION,
    CONNECTIONS_PER_RUN_ENV,
    DAILY_APPROVALS,
    DAY,
    MONTH,
    MONTHS,
    PARTITION_TAG,
    SINGLE_RUN,
    TRIGGER_TAG,
    ConnectionFailed,
    Partitioning,
    by_partition,
    connection_asset,
    days_by_connection,
    describe_partitions,
    fan_out_groups,
    for_each_connection,
    partition_key,
    partition_result,
    partition_tags,
    partitioning,
    rectangle_tags,
    rectangles,
    split_key,
)
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.notify.mail import mail_digest
from expensify_exact.store import QuarantineStatus

APPROVED = dg.AssetKey(["reconciliation", "expensify_approved"])
DAILY = dg.AssetKey(["reconciliation", "daily"])
DIGEST = dg.AssetKey(["reconciliation", "daily_digest"])
MONTHLY = dg.AssetKey(["reconciliation", "monthly"])
DAILY_JOB_NAME = "reconcile_and_digest"
DAILY_SENSOR_NAME = "reconcile_closed_days"
MINIMUM_INTERVAL_SECONDS = 10 * 60
MONTHLY_JOB_NAME = "reconcile_month"
MONTHLY_SCHEDULE_NAME = "reconcile_last_month"
# A month's rollup reads the daily reconciliations of its days, connection by connection.
DAYS_OF_MONTH = dg.MultiPartitionMapping({
    CONNECTION: dg.DimensionPartitionMapping(CONNECTION, dg.IdentityPartitionMapping()),
    DAY: dg.DimensionPartitionMapping(MONTH, dg.TimeWindowPartitionMapping()),
})

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


def build(config: ProjectConfig) -> dg.Definitions:
    daily_job = dg.define_asset_job(
        DAILY_JOB_NAME, selection=dg.AssetSelection.assets(APPROVED, DAILY, DIGEST),
        description="Re-read the days' approved reports from Expensify and their posted entries from Exact, compare "
                    "them with the ledger, and write the accountants' digests, for the connections of the run.")
    monthly_job = dg.define_asset_job(
        MONTHLY_JOB_NAME, selection=dg.AssetSelection.assets(MONTHLY),
        description="Roll the month's daily reconciliations up; check card liabilities.")

    @dg.sensor(
        name=DAILY_SENSOR_NAME, job=daily_job, minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING, required_resource_keys={"connector"},
        description="For each connection, once the run of its newest closed day has posted, reconciles the day "
                    "`posting.lookback_days` before it — the newest day no later run re-exports — and writes its "
                    "digest: one run for each range of consecutive connections with the same day (at most "
                    f"${CONNECTIONS_PER_RUN_ENV} each). The cursor keeps each connection's last day asked for, so "
                    "each day is reconciled once.",
    )
    def reconcile_closed_days(context: dg.SensorEvaluationContext):
        asked: dict[str, str] = json.loads(context.cursor or "{}")
        wanted, notes = closed_days_to_reconcile(config, context.resources.connector, asked)
        requests = []
        for names, day, _day in rectangles(config, wanted):
            context.log.info(f"{names[0]}..{names[-1]} ({len(names)} connection(s)): reconciling {day}")
            requests.append(dg.RunRequest(run_key=_run_key(names, "reconcile", day.isoformat()),
                                          tags={**rectangle_tags(names, day, day), TRIGGER_TAG: "window_closed"}))
        asked |= {name: day.isoformat() for name, (day, _day) in wanted.items()}
        cursor = json.dumps(asked, sort_keys=True)
        if not requests:
            return dg.SensorResult(skip_reason="; ".join(notes) or "no connections", cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    # The month's last day is reconciled once the day `lookback_days` after it has been posted, which (in any zone)
    # is done by 07:45 Amsterdam time two days later; card statements are usually booked by then too.
    month_day = min(28, 2 + max((c.posting.lookback_days for c in config.connections), default=1))

    @dg.schedule(
        name=MONTHLY_SCHEDULE_NAME, job=monthly_job, cron_schedule=f"45 7 {month_day} * *",
        execution_timezone=MONTHS.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"On day {month_day} of the month, once every day of the previous month has been reconciled "
                    f"(after its look-back) and card statements are usually booked, reconciles that month for every "
                    f"connection, in runs of at most ${CONNECTIONS_PER_RUN_ENV} connections.",
    )
    def reconcile_last_month(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time.astimezone(ZoneInfo(MONTHS.timezone))
        month = (when.date().replace(day=1) - timedelta(days=1)).replace(day=1).isoformat()
        if not MONTHS.has_partition_key(month):
            return dg.SkipReason(f"{month[:7]} is not a partition")
        requests = []
        for names, _month, _same in rectangles(config, {conn.name: (month, month) for conn in config.connections}):
            tags = {PARTITION_TAG: partition_key(names[0], month, MONTH)} if len(names) == 1 \
                else partition_tags(names[0], names[-1], month, month, MONTH)
            requests.append(dg.RunRequest(run_key=_run_key(names, "reconcile_month", month),
                                          tags={**tags, TRIGGER_TAG: "month_closed"}))
        return requests

    return dg.Definitions(assets=reconciliation_assets(config, partitioning(config)), jobs=[daily_job, monthly_job],
                          schedules=[reconcile_last_month], sensors=[reconcile_closed_days])


def closed_days_to_reconcile(config: ProjectConfig, connector: ConnectorResource, asked: dict[str, str]
                             ) -> tuple[dict[str, tuple[date, date]], list[str]]:
    """Each connection's day to reconcile now ({name: (day, day)}), leaving out those whose day was `asked` for
    already or is not a partition yet (a zone east of the partitions' own ends its day first); notes on the rest."""
    store = connector.store()
    wanted: dict[str, tuple[date, date]] = {}
    notes: list[str] = []
    for conn in config.connections:
        day = reconciliation_day(conn, store)
        if day is None or day.isoformat() <= asked.get(conn.name, ""):
            notes.append(f"{conn.name}: nothing new to reconcile")
        elif not DAILY_APPROVALS.has_partition_key(day.isoformat()):
            notes.append(f"{conn.name}: {day} is not a partition (yet)")
        else:
            wanted[conn.name] = (day, day)
    return wanted, notes


def _run_key(names: list[str], what: str, period: str) -> str:
    """`<first>..<last>:<what>:<day or month>` (`<connection>:…` for one). The sensor's cursor never asks for a
    connection's day twice and the schedule asks for a month once, so no key repeats."""
    return f"{names[0] if len(names) == 1 else f'{names[0]}..{names[-1]}'}:{what}:{period}"


@dataclass(frozen=True)
class WrittenDigest:
    """One connection's digest of one day, as written (`path` without its suffix) and mailed."""

    digest: Digest
    path: str
    mailed: str


class _SharedExport:
    """A connection's share of one export made for all the connections of its Expensify credential, handed to
    `approved_lines_by_day` in place of a client (it sorts the reports into the connection's days)."""

    def __init__(self, reports: list[dict]):
        self.reports = reports

    def export_reports(self, *_args, **_kwargs) -> list[dict]:
        return self.reports


def reconciliation_assets(config: ProjectConfig, partitions: Partitioning) -> list:
    """The reconciliation assets of every connection of `config`, keyed as at the top of this module."""

    @connection_asset(
        partitions, key=APPROVED, group_name=RECONCILIATION_GROUP, kinds={"expensify", "pandas"},
        owners=["team:finance"], deps=[POSTED],
        description="Expensify's approved reports of each connection's policies for each day, re-exported for "
                    "reconciliation independently of what the posting run exported, with one export job for the "
                    "whole range per Expensify credential: a report approved for a day but never picked up by that "
                    "run is what reconciliation exists to find.",
    )
    def expensify_approved(context: dg.AssetExecutionContext, connector: ConnectorResource):
        plan = days_by_connection(context)
        calls_of: dict[str, dict[str, int]] = {}

        def export(conns: list[Connection], days_of: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
            first = conns[0]
            start = min(date.fromisoformat(days[0]) for days in days_of.values())
            end = max(date.fromisoformat(days[-1]) for days in days_of.values())
            with connector.expensify_client(first) as client:
                reports = client.export_reports(start, end, [p for c in conns for p in c.expensify.policy_ids],
                                                timezone=first.timezone,
                                                source_timezone=first.expensify.timestamp_timezone)
                calls = dict(client.calls)
            split = split_by_policy(reports, conns)
            for conn in conns:
                calls_of[conn.name] = {"export_jobs_of_shared_export": calls.get("export", 0),
                                       "download_polls_of_shared_export": calls.get("download", 0),
                                       "exported_with": len(conns)}
            return {conn.name: approved_lines_by_day(_SharedExport(split[conn.name]), conn, days_of[conn.name])
                    for conn in conns}

        # Connections of one credential share their timezone and client settings (config validation).
        groups = names_by_credential([config.connection(name) for name in plan])
        results = fan_out_groups(context.log, "expensify_approved", config, plan, groups, export)
        values = by_partition(results)
        describe_partitions(context, values, lambda key, normalized: {
            "reports": int(normalized.lines["report_id"].nunique()), "lines": len(normalized.lines),
            "malformed_lines": len(normalized.malformed), "dagster/row_count": len(normalized.lines),
            **calls_of.get(split_key(key)[0], {})})
        return dg.MaterializeResult(value=partition_result(context, values))

    @connection_asset(
        partitions, key=DAILY, group_name=RECONCILIATION_GROUP, kinds={"exactonline", "pandas"},
        owners=["team:finance"], ins={"expense_lines": dg.AssetIn(APPROVED)}, deps=[POSTED],
        description="Reads each connection's posted entries of the day back from its Exact division and compares "
                    "three sides per report, GL account, cost center and currency: Expensify's approved reports "
                    "(re-exported, not the posting run's copy), the connector's ledger and quarantine, and Exact's "
                    "transaction lines. Each difference is a finding with a reason code.",
        check_specs=[dg.AssetCheckSpec(name, asset=DAILY, blocking=False, description=text)
                     for name, (_codes, text) in DAILY_CHECKS.items()],
    )
    def reconciliation_daily(context: dg.AssetExecutionContext, connector: ConnectorResource, expense_lines):
        # expense_lines: the re-exported approved reports of `expensify_approved`, one NormalizedLines per partition.
        store, clock = connector.store(), connector.clock()
        calls_of: dict[str, dict[str, int]] = {}

        def reconcile(conn: Connection, _days: list[str], lines_by_day: dict) -> dict[str, Reconciliation]:
            client = connector.exact_client(conn)
            results = reconcile_days(conn, config, lines_by_day, store, client,
                                     today=connection_today(conn.timezone, clock))
            for result in results.values():
                (context.log.info if result.clean else context.log.warning)(result.summary())
            left = client.rate_limits.remaining_daily
            calls_of[conn.name] = {"exact_calls": client.calls_made,
                                   "exact_daily_calls_left": left if left is not None else -1}
            return results

        values = for_each_connection(context, config, reconcile, expense_lines)
        describe_partitions(context, values, lambda key, result: {
            **_finding_metadata(result.findings), "reports_approved": result.stats["reports_approved"],
            "entries_checked": result.stats["entries_checked"], **calls_of.get(split_key(key)[0], {})})
        return dg.MaterializeResult(value=partition_result(context, values),
                                    check_results=_check_results(DAILY_CHECKS, values))

    @connection_asset(
        partitions, key=DIGEST, group_name=RECONCILIATION_GROUP, kinds={"markdown", "html"}, owners=["team:finance"],
        ins={"reconciliation": dg.AssetIn(DAILY), "journal_entries_posted": dg.AssetIn(POSTED)},
        description="Each connection's daily summary for its accountants: what was posted, what waits in quarantine "
                    "and how to fix it, what the reconciliation found, and Exact's rate and token health. Written as "
                    f"Markdown and e-mail-ready HTML under $DAGSTER_HOME/digests/<connection>/ (or "
                    f"${DIGEST_DIR_ENV}/<connection>/), and mailed once per day to the connection's notify.digest.to.",
    )
    def daily_digest(context: dg.AssetExecutionContext, connector: ConnectorResource, reconciliation,
                     journal_entries_posted):
        store, vault, clock = connector.store(), connector.vault(), connector.clock()
        token_ages = store.token_ages()
        base = _digest_base(context)

        def digests(conn: Connection, days: list[str], recon_by_day: dict, outcomes_by_day: dict) -> dict:
            ledger = store.ledger_rows(conn.name)
            quarantine = store.quarantine_items(conn.name, status=QuarantineStatus.OPEN)
            written: dict[str, WrittenDigest] = {}
            for day in days:
                digest = build_digest(connection=conn.name, day=day, ledger=ledger, quarantine=quarantine,
                                      outcomes=_own_outcomes(outcomes_by_day.get(day), conn.name),
                                      reconciliation=recon_by_day.get(day), token_ages=token_ages,
                                      currency=conn.exact.division_currency,
                                      last_day_posted=store.last_day_posted(conn.name), now=clock.now())
                path = write_digest(digest, base)["md"]
                # Written first, mailed after: a mail server that refuses fails this connection (and alerts), and
                # the rerun mails what did not go out; a day already mailed is not mailed again.
                mailed = mail_digest(digest, conn, store, vault)
                context.log.info(f"{conn.name}: digest of {day}: {mailed}")
                written[day] = WrittenDigest(digest, str(path.with_suffix("")), mailed)
            return written

        values = for_each_connection(context, config, digests, reconciliation, journal_entries_posted)
        describe_partitions(context, values, lambda _key, written: {
            "digest": dg.MetadataValue.md(written.digest.render("md")),
            "path_md": dg.MetadataValue.path(f"{written.path}.md"), "headline": written.digest.headline,
            "mail": written.mailed})
        return dg.MaterializeResult(value=partition_result(context, {
            key: value if isinstance(value, ConnectionFailed) else value.path for key, value in values.items()}))

    @dg.asset(
        key=MONTHLY, partitions_def=partitions.months, backfill_policy=SINGLE_RUN, group_name=RECONCILIATION_GROUP,
        kinds={"exactonline", "pandas"}, owners=["team:finance"],
        ins={"daily": dg.AssetIn(DAILY, partition_mapping=DAYS_OF_MONTH,
                                 metadata={"allow_missing_partitions": True})},
        description="Each connection's month: the daily findings rolled up, totals per GL account and cost center, "
                    "reports posted twice anywhere in the month's financial period, and whether each card "
                    "liability account nets to zero once the card settlements are booked.",
        check_specs=[dg.AssetCheckSpec(name, asset=MONTHLY, blocking=False, description=text)
                     for name, (_codes, text) in MONTHLY_CHECKS.items()],
    )
    def reconciliation_monthly(context: dg.AssetExecutionContext, connector: ConnectorResource, daily):
        store, clock = connector.store(), connector.clock()
        days_of = _reconciled_days(daily)

        def rollup(conn: Connection, months: list[str]) -> dict[str, Reconciliation]:
            client = connector.exact_client(conn)
            today = connection_today(conn.timezone, clock)
            out = {}
            for first_day in months:
                month = first_day[:7]
                days = {day: r for day, r in days_of.get(conn.name, {}).items() if day.startswith(month)}
                out[first_day] = reconcile_connection_month(conn, month, days, _month_days(month, today), store,
                                                            client)
                context.log.info(out[first_day].summary())
            return out

        values = for_each_connection(context, config, rollup, dimension=MONTH)

        def describe(_key, result: Reconciliation) -> dict[str, Any]:
            cards = result.card_accounts if result.card_accounts is not None else pd.DataFrame()
            return {**_finding_metadata(result.findings), "summary": result.summary(),
                    "days_reconciled": result.stats["days_reconciled"],
                    "days_missing": dg.MetadataValue.json(result.stats["days_missing"]),
                    "financial_period": result.stats.get("financial_period", ""),
                    "card_accounts": markdown_table(_money_frame(cards, ["ours_cents", "settlements_cents",
                                                                         "balance_cents"])),
                    "totals": markdown_table(_money_frame(result.totals, ["expected_cents", "actual_cents",
                                                                          "difference_cents"]), limit=200)}

        describe_partitions(context, values, describe)
        missing = {value.connection: len(value.stats["days_missing"]) for value in values.values()
                   if isinstance(value, Reconciliation) and value.stats["days_missing"]}
        return dg.MaterializeResult(
            value=partition_result(context, values),
            check_results=_check_results(MONTHLY_CHECKS, values, extra={
                "days_missing": sum(missing.values()),
                "connections_missing_days": ", ".join(f"{name} ({n})" for name, n in missing.items()) or "none"}))

    return [expensify_approved, reconciliation_daily, daily_digest, reconciliation_monthly]


# --- helpers ------------------------------------------------------------------------------------------

def _reconciled_days(daily: Any) -> dict[str, dict[str, Reconciliation]]:
    """The daily reconciliations a month's run read, by connection and day (one alone comes bare, not in a dict)."""
    found = {partition_key(daily.connection, daily.period): daily} if isinstance(daily, Reconciliation) \
        else dict(daily or {})
    out: dict[str, dict[str, Reconciliation]] = {}
    for key, value in found.items():
        if isinstance(value, Reconciliation):
            connection, day = split_key(key)
            out.setdefault(connection, {})[day] = value
    return out


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


def _check_results(checks: dict[str, tuple[tuple[Finding, ...], str]], values: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> list[dg.AssetCheckResult]:
    """One result per check over every connection and period of the run, naming the connections at fault."""
    frames = [v.findings for v in values.values() if isinstance(v, Reconciliation) and len(v.findings)]
    findings = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FINDING_COLUMNS)
    not_reconciled = sorted({v.connection for v in values.values() if isinstance(v, ConnectionFailed)})
    out = []
    for name, (codes, _text) in checks.items():
        broken = findings[findings["code"].isin([c.value for c in codes])]
        at_fault = list(dict.fromkeys(broken["connection"]))
        fixes = "\n".join(f"- **{c}**: {FINDING_FIXES[Finding(c)]}" for c in sorted(set(broken["code"])))
        out.append(dg.AssetCheckResult(
            check_name=name, passed=broken.empty, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"findings": len(broken), "connections_at_fault": ", ".join(at_fault) or "none",
                      "connections_checked": len({split_key(k)[0] for k in values}) - len(not_reconciled),
                      "connections_not_reconciled": ", ".join(not_reconciled) or "none", **(extra or {}),
                      "details": markdown_table(broken[["connection", "period", "code", "report_id", "entry_number",
                                                        "message"]], limit=200)
                      if len(broken) else dg.MetadataValue.md("_none_"),
                      "what_to_do": dg.MetadataValue.md(fixes or "_nothing_")}))
    return out


def _money_frame(frame: pd.DataFrame, cent_columns: list[str]) -> pd.DataFrame:
    out = frame.copy()
    for column in cent_columns:
        if column in out:
            out[column.removesuffix("_cents")] = out.pop(column).astype(float) / 100
    return out
