"""The `refresh_on_exact_webhooks` sensor: Exact said a GL account, cost center or cost unit changed, so the
quarantine is replayed against fresh dimensions, in one run for every connection concerned. `expensify-exact webhooks
serve` records the notifications."""

from dataclasses import dataclass, field

import dagster as dg

from expensify_exact.config import ProjectConfig
from expensify_exact.core.webhooks import EVENT_DIMENSIONS_CHANGED, EVENT_POSTED_ENTRY_DELETED, webhook_events_after
from expensify_exact.defs.jobs import TRIGGER_TAG
from expensify_exact.defs.partitions import CONNECTION_TAG
from expensify_exact.defs.replay import REPLAY_JOB_NAME
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import QuarantineStatus, StateStore

SENSOR_NAME = "refresh_on_exact_webhooks"
EVENTS_PER_EVALUATION = 1000


@dataclass
class WebhookPlan:
    """What one evaluation decided: runs to request, where the cursor moves, and what to tell the operator."""

    run_requests: list[dg.RunRequest] = field(default_factory=list)
    cursor: int = 0
    notes: list[str] = field(default_factory=list)
    deleted_entries: list[dict] = field(default_factory=list)


def plan_runs(store: StateStore, cursor: int, connections: list[str]) -> WebhookPlan:
    """Read the webhook audit events after `cursor` and decide which runs to request.

    One replay run for the connections whose dimensions changed and that have open quarantine items (fresh
    dimensions can only help reports that were held back), named comma-separated in its `CONNECTION_TAG`, in config
    order. The run key is the newest of their events' ids, so a re-evaluation after a crash never asks twice.
    Deleted posted entries request nothing: a person decides (they are noted).
    """
    events = webhook_events_after(store, cursor, limit=EVENTS_PER_EVALUATION)
    plan = WebhookPlan(cursor=max([cursor, *(e["id"] for e in events)]))
    changed: dict[str, list[dict]] = {}
    for event in events:
        if event["connection"] not in connections:
            continue
        if event["event"] == EVENT_DIMENSIONS_CHANGED:
            changed.setdefault(event["connection"], []).append(event)
        elif event["event"] == EVENT_POSTED_ENTRY_DELETED:
            plan.deleted_entries.append(event)
            plan.notes.append(f"{event['connection']}: entry {event['entry_number']} ({event['entry_id']}) of report "
                              f"{event['report_id']} was deleted in Exact; the ledger still counts it as posted")
    replayed: list[str] = []
    for connection in (name for name in connections if name in changed):
        found = changed[connection]
        open_items = store.quarantine_items(connection, status=QuarantineStatus.OPEN)
        what = ", ".join(sorted({f"{e['detail'].get('topic')} {e['detail'].get('key', '')}".strip() for e in found}))
        if not open_items:
            plan.notes.append(f"{connection}: dimensions changed ({what}); nothing is quarantined, so nothing to replay")
            continue
        replayed.append(connection)
        plan.notes.append(f"{connection}: dimensions changed ({what}); replaying {len(open_items)} quarantined "
                          f"report(s) with {REPLAY_JOB_NAME}")
    if replayed:
        newest = max(e["id"] for name in replayed for e in changed[name])
        plan.run_requests.append(dg.RunRequest(
            run_key=f"exact_webhooks:{newest}", job_name=REPLAY_JOB_NAME,
            tags={CONNECTION_TAG: ",".join(replayed), TRIGGER_TAG: "exact_webhooks"}))
    return plan


def build(config: ProjectConfig) -> dg.Definitions:
    connections = [c.name for c in config.connections]

    @dg.sensor(
        name=SENSOR_NAME, job_name=REPLAY_JOB_NAME, default_status=dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=60,
        description="Reads the Exact webhook events that `expensify-exact webhooks serve` recorded. When a GL "
                    "account, cost center or cost unit changed in connections' divisions and they have quarantined "
                    f"reports, requests one run of `{REPLAY_JOB_NAME}` for them to re-validate those against fresh "
                    "dimensions. A deleted entry the connector posted is logged for a person; it requests nothing. "
                    "Off by default: turn it on once Exact's webhooks point at the receiver.",
    )
    def refresh_on_exact_webhooks(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        plan = plan_runs(connector.store(), int(context.cursor or 0), connections)
        for note in plan.notes:
            (context.log.warning if "deleted" in note else context.log.info)(note)
        if plan.run_requests:
            return dg.SensorResult(run_requests=plan.run_requests, cursor=str(plan.cursor))
        return dg.SensorResult(skip_reason="; ".join(plan.notes) or "no new webhook events", cursor=str(plan.cursor))

    return dg.Definitions(sensors=[refresh_on_exact_webhooks])
