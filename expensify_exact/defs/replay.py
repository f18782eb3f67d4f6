"""The `replay_quarantine` job and the `replay_when_dimensions_change` sensor: wiring for `expensify_exact.core.replay`.

One op replays the connections a run names (op config `connections`, else the run tag `CONNECTION_TAG`, one name or
several comma-separated, else every connection), side by side (`partitions.fan_out`); one connection's failure
never stops the others' replays. No pool is needed: the lock `replay:<connection>` keeps two replays of one
connection apart, and posting's per-report locks and the ledger keep every report exactly once alongside a run.

How the sensor notices that a replay could now succeed: on each evaluation, for every connection that has open
quarantine items a fresh snapshot could help (not only CHANGED_AFTER_POSTING ones), it reads Exact's six dimension
tables through the connection's Exact client and hashes them together with the mappings in force
(`replay.replay_fingerprint`), the connections side by side. The cursor keeps the last fingerprint per connection;
one run of `replay_quarantine` is requested for all the connections whose fingerprint moved (run key = a hash of
the sorted (connection, fingerprint) pairs, so a re-evaluation never asks twice). A first evaluation has no
fingerprint to compare with and counts as a change.

Why a fingerprint computed by the sensor rather than the data version of the `exact/*` dimension assets: those
snapshots are only taken when the main job runs (once a day), so a cost center created at 10:00 would wait until
tomorrow's run; and their data version changes on every materialization, changed or not. The sensor instead spends
six small GETs per connection per evaluation, only while something is quarantined, once every
`MINIMUM_INTERVAL_SECONDS` — a sliver of Exact's 60 calls a minute. Mapping fixes (a new category row) count too,
since they reach the fingerprint through the config.
"""

import hashlib
import json
import logging

import dagster as dg
import pandas as pd

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.posting import Outcome
from expensify_exact.core.replay import preview_replay, replay_fingerprint, replay_quarantine, replayable
from expensify_exact.core.snapshots import fetch_dimensions, needed_codes
from expensify_exact.defs.metadata import markdown_table
from expensify_exact.defs.partitions import CONNECTION_TAG, ConnectionFailed, connections_of_run, failures, fan_out
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import QuarantineStatus

REPLAY_JOB_NAME = "replay_quarantine"
REPLAY_OP = "replay"
SENSOR_NAME = "replay_when_dimensions_change"
MINIMUM_INTERVAL_SECONDS = 15 * 60
TRIGGER_TAG = "expensify_exact/trigger"
# `fan_out` works on periods of connections; a replay has one, the open items as they are now.
NOW = "now"


class ReplayConfig(dg.Config):
    connections: list[str] = []  # default: the run tag's connections, else every connection
    report_ids: list[str] = []  # default: every open item a replay can help
    dry_run: bool = False  # validate and show each item's verdict; write nothing anywhere (`preview_replay`)


def _selected(config: ProjectConfig, config_asks: list[str], tags: dict[str, str]) -> list[str]:
    """The connections the op config asks for, else those of the run's `CONNECTION_TAG`, else every connection; in
    config order."""
    names = [c.name for c in config.connections]
    asked = config_asks or connections_of_run(tags, names)
    unknown = sorted(set(asked) - set(names))
    if unknown:
        raise dg.Failure(f"no connection named {', '.join(unknown)}; configured: {', '.join(names)}")
    return [name for name in names if not asked or name in asked]


def _replay_op(config: ProjectConfig) -> dg.OpDefinition:
    @dg.op(
        name=REPLAY_OP,
        description="Re-exports the open quarantined reports of each connection of the run (op config "
                    f"`connections`, else the run tag `{CONNECTION_TAG}`, else all) from Expensify, validates them "
                    "against a fresh Exact dimension snapshot and the current mappings, and posts those that now "
                    "pass, exactly once; the connections side by side. Its output holds every connection that got "
                    "through; it fails after that, naming each connection that did not and the error.",
    )
    def replay(context: dg.OpExecutionContext, config: ReplayConfig, connector: ConnectorResource):
        project = connector.project()
        names = _selected(project, config.connections, context.run.tags)
        store, clock, read_only = connector.store(), connector.clock(), config.dry_run

        def one(conn: Connection, _now: list[str]) -> dict[str, dict]:
            with connector.expensify_client(conn, read_only=read_only) as expensify, \
                    connector.exact_client(conn, read_only=read_only) as exact:
                if config.dry_run:
                    result = preview_replay(conn, project, store=store, expensify=expensify, exact=exact,
                                            clock=clock, report_ids=config.report_ids or None)
                else:
                    result = replay_quarantine(conn, project, store=store, expensify=expensify, exact=exact,
                                               clock=clock, report_ids=config.report_ids or None,
                                               run_id=context.run.run_id)
            if result.stopped_reason:
                context.log.warning(f"{conn.name}: {result.stopped_reason}")
            counts = {o: result.count(o) for o in Outcome}
            context.log.info(f"{conn.name}: replayed {len(result.outcomes)} item(s)"
                             + "".join(f", {k} {v}" for k, v in counts.items() if v))
            return {NOW: result.as_json() | {"counts": counts}}

        found = fan_out(context.log, REPLAY_OP, project, {name: [NOW] for name in names}, one)
        values = {name: found[name][NOW] for name in names}
        replayed = {name: value for name, value in values.items() if not isinstance(value, ConnectionFailed)}
        failed = failures(values)
        yield dg.Output(replayed, metadata=_metadata(replayed, failed, config.dry_run))
        if failed:
            raise dg.Failure(description="; ".join(f"{f.connection}: {f.error}" for f in failed),
                             metadata={"failed_connections": len(failed), "replayed_connections": len(replayed)})

    return replay


def _metadata(replayed: dict[str, dict], failed: list[ConnectionFailed], dry_run: bool) -> dict:
    """The counts over all connections, one row per connection and every item's outcome."""
    rows = [{"connection": name, **{str(o): n for o, n in result["counts"].items()}, "failed": ""}
            for name, result in replayed.items()]
    rows.extend({"connection": f.connection, "failed": f.error} for f in failed)
    total = {o: sum(r["counts"][o] for r in replayed.values()) for o in Outcome}
    return {
        "posted": total[Outcome.POSTED],
        "still_quarantined": total[Outcome.QUARANTINED] + total[Outcome.NOT_EXPORTED],
        "dry_run": dry_run, "connections": len(rows), "failed_connections": len(failed),
        "by_connection": markdown_table(pd.DataFrame(rows).fillna(0), limit=max(len(rows), 1)),
        "outcomes": dg.MetadataValue.json([o for r in replayed.values() for o in r["outcomes"]]),
    }


def build(config: ProjectConfig) -> dg.Definitions:
    replay_op = _replay_op(config)

    @dg.job(
        name=REPLAY_JOB_NAME,
        description="Replay the quarantine: post the held-back reports that pass now (a cost center was created, a "
                    "mapping fixed), exactly once; the rest stay quarantined with refreshed reasons. One op for all "
                    "connections, side by side; op config `connections` or the run tag "
                    f"`{CONNECTION_TAG}` (comma-separated) limits the run to some. Op config: `connections`, "
                    "`report_ids`, `dry_run`.",
        tags={"dagster/max_retries": "1"},
    )
    def replay_quarantine_job():
        replay_op()

    @dg.sensor(
        name=SENSOR_NAME, job=replay_quarantine_job, minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Every 15 minutes, for each connection with quarantined reports, fingerprints Exact's GL "
                    "accounts, cost centers, cost units, journals, VAT codes and financial periods (six GETs) plus "
                    "the mappings; when fingerprints changed since the last evaluation, runs "
                    f"`{REPLAY_JOB_NAME}` once for those connections. Off by default: turn it on to post fixed "
                    "reports without waiting for an operator.",
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
    """Which connections to replay: those with replayable items whose fingerprint moved since `cursor`, all in one
    run request."""
    log = log or logging.getLogger(__name__)
    plan = ReplayPlan(cursor)
    project = connector.project()
    store = connector.store()
    waiting: dict[str, int] = {}
    for conn in project.connections:
        items = [i for i in store.quarantine_items(conn.name, status=QuarantineStatus.OPEN) if replayable(i)]
        if items:
            waiting[conn.name] = len(items)
        else:
            plan.notes.append(f"{conn.name}: nothing a replay could fix")

    def fingerprint(conn: Connection, _now: list[str]) -> dict[str, str]:
        dims = fetch_dimensions(connector.exact_client(conn), needed_codes(conn, project))
        return {NOW: replay_fingerprint(dims, project, conn)}

    found = fan_out(log, SENSOR_NAME, project, {name: [NOW] for name in waiting}, fingerprint)
    changed: dict[str, str] = {}
    for name, count in waiting.items():
        value = found[name][NOW]
        if isinstance(value, ConnectionFailed):  # one unreachable division must not stop the others' replays
            plan.notes.append(f"{name}: could not read Exact's dimensions ({value.error})")
        elif plan.cursor.get(name) == value:
            plan.notes.append(f"{name}: dimensions and mappings unchanged; {count} item(s) stay")
        else:
            changed[name] = value
    if changed:
        plan.cursor.update(changed)
        pairs = json.dumps(sorted(changed.items()))
        plan.run_requests.append(dg.RunRequest(
            run_key=hashlib.sha256(pairs.encode()).hexdigest()[:32], job_name=REPLAY_JOB_NAME,
            tags={CONNECTION_TAG: ",".join(changed), TRIGGER_TAG: "dimensions_changed"}))
        plan.notes.append(f"replaying {', '.join(changed)}: dimensions or mappings changed")
    return plan
