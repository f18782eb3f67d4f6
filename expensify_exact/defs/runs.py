"""Runs the main job for one day or a date range on the current Dagster instance and summarizes the outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import dagster as dg
import pandas as pd

from expensify_exact.config import load_project_config
from expensify_exact.definitions import build_defs
from expensify_exact.defs.assets import posting_op_name
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.keys import connector_pools, ensure_pools
from expensify_exact.core.posting import OUTCOME_COLUMNS
from expensify_exact.defs.recovery import DEFAULT_WAIT_TIMEOUT_SECONDS, before_launch, tell
from expensify_exact.defs.resources import ConnectorResource


@dataclass
class RunSummary:
    start: date
    end: date
    dry_run: bool
    success: bool
    run_id: str
    outcomes: pd.DataFrame
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        connections: dict[str, dict] = {}
        for conn, frame in self.outcomes.groupby("connection") if len(self.outcomes) else []:
            by = {o: frame[frame["outcome"] == o] for o in ("posted", "quarantined", "already_posted", "dry_run",
                                                             "deferred")}
            connections[conn] = {
                "posted": {r.report_id: {"entry_id": r.entry_id, "entry_number": _int(r.entry_number)}
                           for r in by["posted"].itertuples()},
                "quarantined": {r.report_id: list(r.reason_codes) for r in by["quarantined"].itertuples()},
                "skipped_already_posted": {r.report_id: {"entry_id": r.entry_id,
                                                         "entry_number": _int(r.entry_number)}
                                           for r in by["already_posted"].itertuples()},
                "deferred": sorted(by["deferred"]["report_id"]),
                **({"dry_run": {r.report_id: {"entry_id": r.entry_id, "total": r.total_cents / 100}
                                for r in by["dry_run"].itertuples()}} if self.dry_run else {}),
            }
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "dry_run": self.dry_run,
                "success": self.success, "run_id": self.run_id, "failure": self.failure, "notes": self.notes,
                "connections": connections}

    def as_text(self) -> str:
        out = [f"Run {self.run_id} for {self.start}..{self.end}{' (dry run: nothing posted)' if self.dry_run else ''}"]
        if not self.success:
            out.append(f"FAILED: {self.failure}")
        counts = self.outcomes["outcome"].value_counts().to_dict() if len(self.outcomes) else {}
        out.append(f"posted: {counts.get('posted', 0)}  already posted: {counts.get('already_posted', 0)}  "
                   f"quarantined: {counts.get('quarantined', 0)}  deferred: {counts.get('deferred', 0)}"
                   + (f"  previewed: {counts.get('dry_run', 0)}" if self.dry_run else ""))
        for r in self.outcomes.sort_values(["partition_date", "report_id"]).itertuples() if len(self.outcomes) else []:
            if r.outcome == "posted":
                out.append(f"  posted       {r.partition_date} {r.report_id} -> entry {_int(r.entry_number)} "
                           f"({r.total_cents / 100:.2f})")
            elif r.outcome == "quarantined":
                detail = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in r.reasons)
                out.append(f"  quarantined  {r.partition_date} {r.report_id}: {detail}")
            elif r.outcome == "dry_run":
                out.append(f"  would post   {r.partition_date} {r.report_id} ({r.total_cents / 100:.2f})")
        out.extend(self.notes)
        return "\n".join(out)


def _int(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def run_range(start: date, end: date, *, dry_run: bool = False, mappings_dir: str = "mappings",
              state_url: str | None = None, instance: dg.DagsterInstance | None = None,
              wait_timeout: float | None = None) -> RunSummary:
    """Materialize the main job for the approval days start..end in one run (a single-run backfill).

    Before it, dead runs that still hold the connector's pools are failed and a pool held by a live run is waited
    for, at most `wait_timeout` seconds (default 15 minutes; `recovery.before_launch`)."""
    config = load_project_config(mappings_dir)
    job = build_defs(mappings_dir).resolve_job_def(MAIN_JOB_NAME)
    connector = ConnectorResource(mappings_dir=mappings_dir, state_url=state_url)
    posting_ops = [posting_op_name(c.name) for c in config.connections]
    run_config = {"ops": {op: {"config": {"dry_run": dry_run}} for op in posting_ops},
                  # The per-event DEBUG lines belong in the UI's run view, not on the operator's terminal.
                  "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    instance = instance or dg.DagsterInstance.get()
    ensure_pools(instance, config)
    tags = before_launch(instance, connector.store(), connector_pools(config),
                         timeout=DEFAULT_WAIT_TIMEOUT_SECONDS if wait_timeout is None else wait_timeout, say=tell)
    kwargs: dict = {"partition_key": start.isoformat(), "tags": tags} if start == end else {
        "tags": {**tags, "dagster/asset_partition_range_start": start.isoformat(),
                 "dagster/asset_partition_range_end": end.isoformat()}}
    result = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False,
                                    resources={"connector": connector}, **kwargs)
    frames = []
    for op in posting_ops:
        if op not in _executed_steps(result):
            continue  # the step did not run; the failure below says why
        value = result.output_for_node(op)
        frames.extend(v for v in (value.values() if isinstance(value, dict) else [value]) if len(v))
    outcomes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OUTCOME_COLUMNS)
    failure = None
    if not result.success:
        failure = "; ".join(_failure_messages(result)) or "the run failed"
    notes = []
    deferred = outcomes[outcomes["outcome"] == "deferred"] if len(outcomes) else outcomes
    if len(deferred):
        why = sorted({r["message"] for reasons in deferred["reasons"] for r in (reasons or []) if r.get("message")})
        notes.append(f"{len(deferred)} report(s) deferred; the sensor post_deferred_after_reset reruns their days "
                     "once they may be tried again (Exact's daily reset, else the next clock hour), or rerun the "
                     "range then: " + " | ".join(why[:3])
                     + (f" (and {len(why) - 3} more reasons)" if len(why) > 3 else ""))
    return RunSummary(start, end, dry_run, result.success, result.run_id, outcomes, failure, notes)


def _executed_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}


def _failure_messages(result) -> list[str]:
    messages = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.step_failure_data.error
            cause = error.cause.message.strip() if error and error.cause else ""
            messages.append(f"{event.step_key}: {(cause or (error.message if error else '')).strip()}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            messages.append(f"check {event.event_specific_data.check_name} failed")
    return messages
