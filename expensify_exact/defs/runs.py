"""Runs the main job, or the `dry_run` job, for one day or a date range on the current Dagster instance and
summarizes the outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date

import dagster as dg
import pandas as pd

from expensify_exact.config import load_project_config
from expensify_exact.core.posting import OUTCOME_COLUMNS, Outcome
from expensify_exact.core.verdicts import Action, shown_lines
from expensify_exact.definitions import build_defs
from expensify_exact.defs.dry_run import DAYS_OP, DRY_RUN_JOB_NAME, PREVIEW_OP, ConnectionPreview
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.keys import POSTED
from expensify_exact.defs.partitions import failures, rectangle_tags
from expensify_exact.defs.recovery import DEFAULT_WAIT_TIMEOUT_SECONDS, before_launch, tell
from expensify_exact.defs.resources import ConnectorResource


@dataclass
class RunSummary:
    start: date
    end: date
    success: bool
    run_id: str
    outcomes: pd.DataFrame
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        connections: dict[str, dict] = {}
        for conn, frame in self.outcomes.groupby("connection") if len(self.outcomes) else []:
            by = {o: frame[frame["outcome"] == o] for o in Outcome}
            connections[conn] = {
                "posted": {r.report_id: {"entry_id": r.entry_id, "entry_number": _int(r.entry_number)}
                           for r in by[Outcome.POSTED].itertuples()},
                "quarantined": {r.report_id: list(r.reason_codes) for r in by[Outcome.QUARANTINED].itertuples()},
                "skipped_already_posted": {r.report_id: {"entry_id": r.entry_id,
                                                         "entry_number": _int(r.entry_number)}
                                           for r in by[Outcome.ALREADY_POSTED].itertuples()},
                "deferred": sorted(by[Outcome.DEFERRED]["report_id"]),
            }
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "dry_run": False,
                "success": self.success, "run_id": self.run_id, "failure": self.failure, "notes": self.notes,
                "connections": connections}

    def as_text(self) -> str:
        out = [f"Run {self.run_id} for {self.start}..{self.end}"]
        if not self.success:
            out.append(f"FAILED: {self.failure}")
        counts = self.outcomes["outcome"].value_counts().to_dict() if len(self.outcomes) else {}
        out.append(f"posted: {counts.get('posted', 0)}  already posted: {counts.get('already_posted', 0)}  "
                   f"quarantined: {counts.get('quarantined', 0)}  deferred: {counts.get('deferred', 0)}")
        for r in self.outcomes.sort_values(["partition_date", "report_id"]).itertuples() if len(self.outcomes) else []:
            if r.outcome == Outcome.POSTED:
                out.append(f"  posted       {r.partition_date} {r.report_id} -> entry {_int(r.entry_number)} "
                           f"({r.total_cents / 100:.2f})")
            elif r.outcome == Outcome.QUARANTINED:
                detail = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in r.reasons)
                out.append(f"  quarantined  {r.partition_date} {r.report_id}: {detail}")
        out.extend(self.notes)
        return "\n".join(out)


@dataclass
class DryRunSummary:
    """What the `dry_run` job showed: per connection every draft line and every report's verdict."""

    start: date
    end: date
    success: bool
    run_id: str
    previews: list[ConnectionPreview]
    failure: str | None = None

    def as_json(self) -> dict:
        connections = {p.connection: {"verdicts": [v.as_json() for v in p.verdicts], "lines": _records(p.drafts)}
                       for p in self.previews}
        summary = {"start": self.start.isoformat(), "end": self.end.isoformat(), "dry_run": True,
                   "success": self.success, "run_id": self.run_id, "failure": self.failure,
                   "connections": connections}
        return json.loads(json.dumps(summary, default=_plain, allow_nan=False))

    def as_text(self) -> str:
        out = [f"Dry run {self.run_id} for {self.start}..{self.end}: nothing posted, stored or recorded"]
        if not self.success:
            out.append(f"FAILED: {self.failure}")
        for p in self.previews:
            actions = pd.Series([v.action for v in p.verdicts], dtype=object).value_counts().to_dict()
            would_post = actions.get(Action.POST, 0) + actions.get(Action.SETTLE_PENDING, 0)
            out.append(f"{p.connection}: would post {would_post}  "
                       f"already posted: {actions.get(Action.ALREADY_POSTED, 0)}  "
                       f"would quarantine: {actions.get(Action.QUARANTINE, 0)}")
            for v in sorted(p.verdicts, key=lambda v: (v.partition_date, v.report_id)):
                if v.action == Action.QUARANTINE:
                    detail = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in v.reasons)
                    out.append(f"  would quarantine  {v.partition_date} {v.report_id}: {detail}")
                elif v.action == Action.ALREADY_POSTED:
                    out.append(f"  already posted    {v.partition_date} {v.report_id} as entry {_int(v.entry_number)}")
                else:
                    out.append(f"  would post        {v.partition_date} {v.report_id} as EntryID {v.entry_id} "
                               f"({v.total_cents / 100:.2f})" + (f": {v.note}" if v.note else ""))
            lines = shown_lines(p.drafts)
            if len(lines):
                out.append(f"  draft lines ({len(lines)}):")
                out.extend("    " + row for row in lines.fillna("").to_string(index=False).splitlines())
        return "\n".join(out)


def _records(drafts) -> list[dict]:
    lines = shown_lines(drafts).astype(object)
    return lines.where(lines.notna(), None).to_dict("records")  # an empty cost center is null, never NaN


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return None if pd.isna(value) else str(value)


def _int(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def run_range(start: date, end: date, *, mappings_dir: str = "mappings", state_url: str | None = None,
              instance: dg.DagsterInstance | None = None, wait_timeout: float | None = None,
              connection: str | None = None) -> RunSummary:
    """Materialize the main job for the approval days start..end of every connection (or only `connection`) in one
    run (a single-run backfill over connection × day).

    Before it, dead runs are failed and a live run over the same connections is waited for, at most `wait_timeout`
    seconds (default 15 minutes; `recovery.before_launch`)."""
    config = load_project_config(mappings_dir)
    names = [config.connection(connection).name] if connection else [c.name for c in config.connections]
    result = _launch(MAIN_JOB_NAME, {}, mappings_dir, state_url, instance, wait_timeout, names,
                     tags=rectangle_tags(names, start, end))
    step = POSTED.to_python_identifier()
    value = result.output_for_node(step) if step in _executed_steps(result) else {}
    values = value if isinstance(value, dict) else {names[0]: value}
    frames = [v for v in values.values() if isinstance(v, pd.DataFrame) and len(v)]
    outcomes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OUTCOME_COLUMNS)
    failed = failures(values)
    notes = [f"{f.connection}: not run, {f.step} failed: {f.error}" for f in failed]
    deferred = outcomes[outcomes["outcome"] == Outcome.DEFERRED] if len(outcomes) else outcomes
    if len(deferred):
        why = sorted({r["message"] for reasons in deferred["reasons"] for r in (reasons or []) if r.get("message")})
        notes.append(f"{len(deferred)} report(s) deferred; the sensor post_deferred_after_reset reruns their days "
                     "once they may be tried again (Exact's daily reset, else the next clock hour), or rerun the "
                     "range then: " + " | ".join(why[:3])
                     + (f" (and {len(why) - 3} more reasons)" if len(why) > 3 else ""))
    failure = _failure(result) or (f"{len(failed)} connection(s) failed: {', '.join(f.connection for f in failed)}"
                                   if failed else None)
    return RunSummary(start, end, result.success and not failed, result.run_id, outcomes, failure, notes)


def preview_range(start: date, end: date, *, mappings_dir: str = "mappings", state_url: str | None = None,
                  instance: dg.DagsterInstance | None = None, wait_timeout: float | None = None,
                  connection: str | None = None) -> DryRunSummary:
    """Run the `dry_run` job for the approval days start..end of every connection (or only `connection`): every
    draft and every report's verdict, with nothing posted, materialized or written to the state DB. Waits for live
    runs over the same connections, as `run_range` does.

    The preview step hands over the previews of every connection that got through even when it then fails for
    the others (their names and errors are in the summary's failure)."""
    config = load_project_config(mappings_dir)
    names = [config.connection(connection).name] if connection else [c.name for c in config.connections]
    days = {"start": start.isoformat(), "end": end.isoformat(), "connections": [connection] if connection else []}
    result = _launch(DRY_RUN_JOB_NAME, {"ops": {DAYS_OP: {"config": days}}}, mappings_dir, state_url, instance,
                     wait_timeout, names)
    previewed = any(e.event_type_value == "STEP_OUTPUT" and e.step_key == PREVIEW_OP for e in result.all_events)
    previews = result.output_for_node(PREVIEW_OP) if previewed else []
    return DryRunSummary(start, end, result.success, result.run_id, previews, _failure(result))


def _launch(job_name: str, run_config: dict, mappings_dir: str, state_url: str | None,
            instance: dg.DagsterInstance | None, wait_timeout: float | None, connections: list[str], **kwargs):
    """Execute one of the code location's jobs in this process, once no live run works on its `connections`."""
    config = load_project_config(mappings_dir)
    job = build_defs(mappings_dir).resolve_job_def(job_name)
    connector = ConnectorResource(mappings_dir=mappings_dir, state_url=state_url)
    # The per-event DEBUG lines belong in the UI's run view, not on the operator's terminal.
    run_config = run_config | {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    instance = instance or dg.DagsterInstance.get()
    tags = before_launch(instance, connector.store(), connections, [c.name for c in config.connections],
                         timeout=DEFAULT_WAIT_TIMEOUT_SECONDS if wait_timeout is None else wait_timeout, say=tell)
    kwargs["tags"] = tags | kwargs.get("tags", {})
    return job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False,
                                  resources={"connector": connector}, **kwargs)


def _failure(result) -> str | None:
    if result.success:
        return None
    return "; ".join(_failure_messages(result)) or "the run failed"


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
