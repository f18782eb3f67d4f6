"""The `replay_quarantine` job and the `replay_when_dimensions_change` sensor: wiring for `expensify_exact.core.replay`.

How the sensor notices that a replay could now succeed: on each evaluation, for every connection that has open
quarantine items a fresh snapshot could help (not only CHANGED_AFTER_POSTING ones), it reads Exact's six dimension
tables through the connection's Exact client and hashes them together with the mappings in force
(`replay.replay_fingerprint`). The cursor keeps the last fingerprint per connection; when it differs, one run of
`replay_quarantine` is requested for that connection (run key = connection + fingerprint, so a re-evaluation never
asks twice). A first evaluation has no fingerprint to compare with and counts as a change.

Why a fingerprint computed by the sensor rather than the data version of the `<connection>/exact/*` dimension
assets: those snapshots are only taken when the main job runs (once a day), so a cost center created at 10:00 would
wait until tomorrow's run; and their data version changes on every materialization, changed or not. The sensor
instead spends six small GETs per connection per evaluation, only while something is quarantined, once every
`MINIMUM_INTERVAL_SECONDS` — a sliver of Exact's 60 calls a minute. Mapping fixes (a new category row) count too,
since they reach the fingerprint through the config.
"""


import json

import dagster as dg

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.posting import Outcome
from expensify_exact.core.replay import preview_replay, replay_fingerprint, replay_quarantine, replayable
from expensify_exact.core.snapshots import fetch_dimensions, needed_codes
from expensify_exact.defs.keys import exact_pool, slug
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import QuarantineStatus

REPLAY_JOB_NAME = "replay_quarantine"
SENSOR_NAME = "replay_when_dimensions_change"
MINIMUM_INTERVAL_SECONDS = 15 * 60
# The run tag other triggers (e.g. the Exact webhook sensor) use to name the connection to replay.
CONNECTION_TAG = "expensify_exact/connection"
TRIGGER_TAG = "expensify_exact/trigger"


class ReplayConfig(dg.Config):
    report_ids: list[str] = []  # default: every open item a replay can help
    dry_run: bool = False  # validate and show each item's verdict; write nothing anywhere (`preview_replay`)


def replay_op_name(connection_name: str) -> str:
    return f"replay_{slug(connection_name)}"


def _replay_op(conn: Connection) -> dg.OpDefinition:
    """One op per connection, in its division's pool, so a replay never calls Exact alongside another run's step."""

    @dg.op(
        name=replay_op_name(conn.name), pool=exact_pool(conn),
        description=f"Re-exports {conn.name}'s open quarantined reports from Expensify, validates them against a "
                    f"fresh Exact dimension snapshot and the current mappings, and posts those that now pass, "
                    f"exactly once. Skipped when the run's `{CONNECTION_TAG}` tag names another connection.",
    )
    def replay(context: dg.OpExecutionContext, config: ReplayConfig, connector: ConnectorResource) -> dict:
        wanted = context.run.tags.get(CONNECTION_TAG)
        if wanted and wanted != conn.name:
            context.log.info(f"{conn.name}: skipped, this run replays {wanted}")
            return {}
        project, read_only = connector.project(), config.dry_run
        with connector.expensify_client(conn, read_only=read_only) as expensify, \
                connector.exact_client(conn, read_only=read_only) as exact:
            if config.dry_run:
                result = preview_replay(conn, project, store=connector.store(), expensify=expensify, exact=exact,
                                        clock=connector.clock(), report_ids=config.report_ids or None)
            else:
                result = replay_quarantine(conn, project, store=connector.store(), expensify=expensify, exact=exact,
                                           clock=connector.clock(), report_ids=config.report_ids or None,
                                           run_id=context.run.run_id)
        if result.stopped_reason:
            context.log.warning(result.stopped_reason)
        counts = {o: result.count(o) for o in Outcome}
        context.log.info(f"{conn.name}: replayed {len(result.outcomes)} item(s): "
                         + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        context.add_output_metadata({
            "posted": counts[Outcome.POSTED],
            "still_quarantined": counts[Outcome.QUARANTINED] + counts[Outcome.NOT_EXPORTED],
            "dry_run": config.dry_run,
            "outcomes": dg.MetadataValue.json(result.as_json()["outcomes"]),
        })
        return result.as_json() | {"counts": counts}

    return replay


def build(config: ProjectConfig) -> dg.Definitions:
    names = [c.name for c in config.connections]
    replay_ops = [_replay_op(conn) for conn in config.connections]

    @dg.job(
        name=REPLAY_JOB_NAME,
        description="Replay the quarantine: post the held-back reports that pass now (a cost center was created, a "
                    "mapping fixed), exactly once; the rest stay quarantined with refreshed reasons. One op per "
                    f"connection ({', '.join(names)}), each in its division's pool; the run tag `{CONNECTION_TAG}` "
                    "limits the run to one connection. Op config: `report_ids`, `dry_run`.",
        tags={"dagster/max_retries": "1"},
    )
    def replay_quarantine_job():
        for replay in replay_ops:
            replay()

    @dg.sensor(
        name=SENSOR_NAME, job=replay_quarantine_job, minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Every 15 minutes, for each connection with quarantined reports, fingerprints Exact's GL "
                    "accounts, cost centers, cost units, journals, VAT codes and financial periods (six GETs) plus "
                    "the mappings; when the fingerprint changed since the last evaluation, runs "
                    f"`{REPLAY_JOB_NAME}` for that connection. Off by default: turn it on to post fixed reports "
                    "without waiting for an operator.",
    )
    def replay_when_dimensions_change(context: dg.SensorEvaluationContext, connector: ConnectorResource):
        plan = plan_replays(connector, json.loads(context.cursor or "{}"), log=context.log)
        context.update_cursor(json.dumps(plan.cursor, sort_keys=True))
        if not plan.run_requests:
            return dg.SkipReason("; ".join(plan.notes) or "nothing quarantined")
        return plan.run_requests

    return dg.Definitions(jobs=[replay_quarantine_job], sensors=[replay_when_dimensions_change])


class ReplayPlan:
    def __init__(self, cursor: dict[str, str]):
        self.cursor = dict(cursor)
        self.run_requests: list[dg.RunRequest] = []
        self.notes: list[str] = []


def plan_replays(connector: ConnectorResource, cursor: dict[str, str], log=None) -> ReplayPlan:
    """Which connections to replay: those with replayable items whose fingerprint moved since `cursor`."""
    plan = ReplayPlan(cursor)
    project = connector.project()
    store = connector.store()
    for conn in project.connections:
        items = [i for i in store.quarantine_items(conn.name, status=QuarantineStatus.OPEN) if replayable(i)]
        if not items:
            plan.notes.append(f"{conn.name}: nothing a replay could fix")
            continue
        try:
            dims = fetch_dimensions(connector.exact_client(conn), needed_codes(conn, project))
            fingerprint = replay_fingerprint(dims, project, conn)
        except Exception as exc:  # noqa: BLE001 - one unreachable division must not stop the others' replays
            plan.notes.append(f"{conn.name}: could not read Exact's dimensions ({exc})")
            if log is not None:
                log.warning(plan.notes[-1])
            continue
        if plan.cursor.get(conn.name) == fingerprint:
            plan.notes.append(f"{conn.name}: dimensions and mappings unchanged; {len(items)} item(s) stay")
            continue
        plan.cursor[conn.name] = fingerprint
        plan.run_requests.append(dg.RunRequest(
            run_key=f"{conn.name}:{fingerprint}", job_name=REPLAY_JOB_NAME,
            tags={CONNECTION_TAG: conn.name, TRIGGER_TAG: "dimensions_changed"}))
    return plan
