"""Alert sensors: a connector run failed; a report waits in quarantine too long; Exact's refresh token is idle
for 25 days; reports were deferred (Exact's daily budget ran out, an endpoint's error budget is spent, no certain
answer) or Exact refused the connection (403); a reconciliation found differences; one connection failed in a run
that went on for the others. They find and deliver through `expensify_exact.notify.alerts`; each alert goes out
once per channel (its key in the state database), however often the sensor ticks. A delivery that fails fails the
tick, and the next tick retries.
"""

import json
from collections import Counter
from datetime import timedelta

import dagster as dg

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.defs.keys import POSTED
from expensify_exact.defs.partitions import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    connections_of_run,
    split_key,
)
from expensify_exact.defs.reconciliation import DAILY, DIGEST, MONTHLY
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.notify import alerts

RUN_FAILED_SENSOR = "alert_on_failed_run"
QUARANTINE_SENSOR = "alert_on_old_quarantine"
TOKEN_SENSOR = "alert_on_idle_refresh_token"
DEFERRED_SENSOR = "alert_on_deferred_reports"
RECONCILIATION_SENSOR = "alert_on_reconciliation_findings"
CONNECTION_FAILED_SENSOR = "alert_on_failed_connection"
FIRST_LOOK_BACK = timedelta(days=7)  # how far back the partition sensors look on their very first tick


def _deliver(context, connector: ConnectorResource, found: list[tuple[Connection, alerts.Alert]]) -> str:
    """Deliver every alert; a summary for the tick's log. Raises the first failure after trying them all."""
    store, vault = connector.store(), connector.vault()
    sent, errors = [], []
    for conn, alert in found:
        try:
            channels = alerts.deliver(alert, conn, store, vault)
        except Exception as exc:  # noqa: BLE001 - the other alerts still go out; the tick fails below
            context.log.error(f"{alert.title}: not delivered: {exc}")
            errors.append(exc)
            continue
        if channels:
            sent.append(f"{alert.title} -> {', '.join(channels)}")
            context.log.info(sent[-1])
    if errors:
        raise errors[0]
    return f"sent {len(sent)} alert(s)" if sent else f"{len(found)} alert(s) found, all sent before"


def _cause(error) -> str:
    """The connector's own error under Dagster's "Error occurred while executing op" wrapper, first line only."""
    while error.cause is not None and "Error occurred while executing" in error.message:
        error = error.cause
    return (error.message.strip().splitlines() or ["?"])[0]


def _state_sensor(name: str, config: ProjectConfig, find, interval: int, description: str) -> dg.SensorDefinition:
    """A sensor that looks at the connector's state of every connection with alert channels."""

    @dg.sensor(name=name, minimum_interval_seconds=interval, default_status=dg.DefaultSensorStatus.RUNNING,
               description=description)
    def _sensor(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        now = connector.clock().now()
        watched = [c for c in config.connections if alerts.channels(c)]
        if not watched:
            return dg.SkipReason("no connection has alert channels (notify.alerts in connections.yaml)")
        found = [(conn, alert) for conn in watched for alert in find(conn, connector.store(), now)]
        return dg.SkipReason(_deliver(context, connector, found) if found else "nothing to alert about")

    return _sensor


def _period(tags: dict[str, str]) -> str:
    """The days (or months) of a run's partitions: `<day>` or `<first>..<last>`; empty for a run without."""
    if "|" in tags.get(PARTITION_TAG, ""):
        return split_key(tags[PARTITION_TAG])[1]
    if "|" in tags.get(RANGE_START_TAG, "") and "|" in tags.get(RANGE_END_TAG, ""):
        start, end = split_key(tags[RANGE_START_TAG])[1], split_key(tags[RANGE_END_TAG])[1]
        return start if start == end else f"{start}..{end}"
    return ""


def _partitions_after(instance: dg.DagsterInstance, keys: list[dg.AssetKey], cursor: dict[str, int],
                      connector: ConnectorResource):
    """(connection, day or month, record) of every partition materialized of `keys` since `cursor` (storage ID by
    asset key, moved on as they are read; on a first tick: since `FIRST_LOOK_BACK`)."""
    since = (connector.clock().now() - FIRST_LOOK_BACK).timestamp()
    for key in keys:
        name = key.to_user_string()
        while True:
            after = cursor.get(name)
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, after_storage_id=after,
                                      after_timestamp=None if after else since),
                limit=1000, ascending=True).records
            for record in records:
                cursor[name] = record.storage_id
                if "|" in (record.partition_key or ""):
                    yield *split_key(record.partition_key), record
            if len(records) < 1000:
                break


def _span(lines: list[str]) -> str:
    """The first..last day of `<day>: …` lines."""
    days = sorted({line.split(":", 1)[0] for line in lines})
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"


def build(config: ProjectConfig) -> dg.Definitions:
    by_name = {c.name: c for c in config.connections}

    @dg.run_failure_sensor(
        name=RUN_FAILED_SENSOR, default_status=dg.DefaultSensorStatus.RUNNING,
        description="A run of the connector's jobs failed (the daily posting, reconciliation, a replay): alerts the "
                    "alert channels of each connection the run covered, once per run.")
    def alert_on_failed_run(context: dg.RunFailureSensorContext, connector: ConnectorResource):
        run = context.dagster_run
        # A run that names no connection (no partitions, no tag) is about all of them.
        covered = [name for name in connections_of_run(run.tags, list(by_name)) if name in by_name] or list(by_name)
        steps = [f"{e.step_key}: {_cause(e.event_specific_data.error)}" for e in context.get_step_failure_events()
                 if e.event_specific_data and e.event_specific_data.error]
        message = "\n".join(steps) or (context.failure_event.message or "the run failed")
        found = [(by_name[name], alerts.run_failed(by_name[name], run.job_name, run.run_id, message,
                                                   _period(run.tags)))
                 for name in covered if alerts.channels(by_name[name])]
        context.log.info(_deliver(context, connector, found) if found else "no alert channels configured")

    @dg.sensor(name=RECONCILIATION_SENSOR, minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A daily reconciliation found differences between Expensify, the ledger and Exact: "
                           "alerts once per reconciliation run and connection, from each (connection, day) "
                           "partition's materialization.")
    def alert_on_reconciliation_findings(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        findings: dict[tuple[str, str], tuple[list[str], Counter]] = {}
        for connection, day, record in _partitions_after(context.instance, [DAILY], cursor, connector):
            counts = {k.removeprefix("finding_"): int(v.value)
                      for k, v in record.asset_materialization.metadata.items() if k.startswith("finding_")}
            if counts:
                days, total = findings.setdefault((connection, record.run_id), ([], Counter()))
                days.append(day)
                total.update(counts)
        found = [(by_name[connection], alerts.reconciliation_findings(by_name[connection], run_id, sorted(days),
                                                                      dict(counts)))
                 for (connection, run_id), (days, counts) in findings.items()
                 if connection in by_name and alerts.channels(by_name[connection])]
        summary = _deliver(context, connector, found) if found else "no new findings"
        return dg.SensorResult(skip_reason=summary, cursor=json.dumps(cursor, sort_keys=True))

    @dg.sensor(name=CONNECTION_FAILED_SENSOR, minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A connection failed within a run that went on for the others (Exact or Expensify "
                           "unreachable, the division refused, the mail server down): alerts that connection's "
                           "channels once per run, with the step and the error of each of its days, from the "
                           "`failed` metadata of its partitions of the posting, the reconciliation and the digest.")
    def alert_on_failed_connection(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        failed: dict[tuple[str, str], list[str]] = {}
        for connection, day, record in _partitions_after(context.instance, [POSTED, DAILY, DIGEST, MONTHLY], cursor,
                                                         connector):
            metadata = record.asset_materialization.metadata
            if "failed" in metadata:
                failed.setdefault((connection, record.run_id), []).append(
                    f"{day}: {metadata['failed_step'].value}: {metadata['failed'].value}")
        found = []
        for (connection, run_id), lines in failed.items():
            if connection in by_name and alerts.channels(by_name[connection]):
                run = context.instance.get_run_by_id(run_id)
                found.append((by_name[connection], alerts.run_failed(
                    by_name[connection], run.job_name if run else "a run", run_id, "\n".join(sorted(set(lines))),
                    _span(lines))))
        summary = _deliver(context, connector, found) if found else "no failed connections"
        return dg.SensorResult(skip_reason=summary, cursor=json.dumps(cursor, sort_keys=True))

    sensors = [
        alert_on_failed_run,
        alert_on_reconciliation_findings,
        alert_on_failed_connection,
        _state_sensor(QUARANTINE_SENSOR, config, alerts.overdue_quarantine, 3600,
                      "A report has waited in quarantine longer than notify.alerts.quarantine_max_age_days (7): "
                      "alerts once per report."),
        _state_sensor(TOKEN_SENSOR, config, alerts.idle_refresh_token, 3600,
                      "Exact's refresh token has not been renewed for notify.alerts.token_idle_days (25); Exact "
                      "drops it after 30, and then a person must re-authorize. Alerts once per token."),
        _state_sensor(DEFERRED_SENSOR, config, alerts.deferred_reports, 300,
                      "Reports were deferred to the next run (Exact's daily or an endpoint's error budget spent, "
                      "no certain answer to a POST) or Exact refused the connection (403, 401): alerts once per "
                      "run, with the reason per report."),
    ]
    return dg.Definitions(sensors=sensors)
