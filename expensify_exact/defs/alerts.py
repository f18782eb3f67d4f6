"""Alert sensors: a connector run failed; a report waits in quarantine too long; Exact's refresh token is idle
for 25 days; reports were deferred (Exact's daily budget ran out, an endpoint's error budget is spent, no certain
answer) or Exact refused the connection (403); a reconciliation found differences. They find and deliver through
`expensify_exact.notify.alerts`; each alert goes out once per channel (its key in the state database), however
often the sensor ticks. A delivery that fails fails the tick, and the next tick retries.
"""

import json
from datetime import timedelta

import dagster as dg

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.defs.reconciliation import daily_key
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.notify import alerts

RUN_FAILED_SENSOR = "alert_on_failed_run"
QUARANTINE_SENSOR = "alert_on_old_quarantine"
TOKEN_SENSOR = "alert_on_idle_refresh_token"
DEFERRED_SENSOR = "alert_on_deferred_reports"
RECONCILIATION_SENSOR = "alert_on_reconciliation_findings"
CONNECTION_TAG = "expensify_exact/connection"  # a run limited to one connection (defs/replay.py) carries it
FIRST_LOOK_BACK = timedelta(days=7)  # how far back the findings sensor looks on its very first tick


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


def build(config: ProjectConfig) -> dg.Definitions:
    by_name = {c.name: c for c in config.connections}

    @dg.run_failure_sensor(
        name=RUN_FAILED_SENSOR, default_status=dg.DefaultSensorStatus.RUNNING,
        description="A run of the connector's jobs failed (the daily posting, reconciliation, a replay): alerts the "
                    "alert channels of each connection the run covered, once per run.")
    def alert_on_failed_run(context: dg.RunFailureSensorContext, connector: ConnectorResource):
        run = context.dagster_run
        only = run.tags.get(CONNECTION_TAG)
        covered = [by_name[only]] if only in by_name else list(config.connections)
        tags = run.tags
        partitions = tags.get("dagster/partition") or (
            f"{tags['dagster/asset_partition_range_start']}..{tags['dagster/asset_partition_range_end']}"
            if "dagster/asset_partition_range_start" in tags else "")
        steps = [f"{e.step_key}: {_cause(e.event_specific_data.error)}" for e in context.get_step_failure_events()
                 if e.event_specific_data and e.event_specific_data.error]
        message = "\n".join(steps) or (context.failure_event.message or "the run failed")
        found = [(conn, alerts.run_failed(conn, run.job_name, run.run_id, message, partitions))
                 for conn in covered if alerts.channels(conn)]
        context.log.info(_deliver(context, connector, found) if found else "no alert channels configured")

    @dg.sensor(name=RECONCILIATION_SENSOR, minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A daily reconciliation found differences between Expensify, the ledger and Exact: "
                           "alerts once per reconciliation run and connection.")
    def alert_on_reconciliation_findings(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        found = []
        for conn in config.connections:
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=daily_key(conn), after_storage_id=cursor.get(conn.name),
                    after_timestamp=None if conn.name in cursor
                    else (connector.clock().now() - FIRST_LOOK_BACK).timestamp()),
                limit=1000, ascending=True).records
            runs: dict[str, tuple[list[str], dict[str, int]]] = {}
            for record in records:
                metadata = record.asset_materialization.metadata
                counts = {k.removeprefix("finding_"): int(v.value) for k, v in metadata.items()
                          if k.startswith("finding_")}
                if counts:
                    days, _ = runs.setdefault(record.run_id, ([], counts))
                    days.append(record.partition_key or "?")
                cursor[conn.name] = record.storage_id
            if alerts.channels(conn):
                found += [(conn, alerts.reconciliation_findings(conn, run_id, sorted(days), counts))
                          for run_id, (days, counts) in runs.items()]
        summary = _deliver(context, connector, found) if found else "no new findings"
        return dg.SensorResult(skip_reason=summary, cursor=json.dumps(cursor, sort_keys=True))

    sensors = [
        alert_on_failed_run,
        alert_on_reconciliation_findings,
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
