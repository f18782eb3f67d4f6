"""The one pipeline from exported Expensify reports to journal drafts and report-level rejections: normalize, set
malformed reports aside, map, validate. The main job's assets, replay, reconciliation and `check` all run it."""

from __future__ import annotations

from datetime import date

import pandas as pd

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.expense_lines import NormalizedLines, normalize_reports
from expensify_exact.core.journal import REJECTION_COLUMNS, Dimensions, JournalDrafts, Reason, build_journal_drafts


def normalize(reports: list[dict], conn: Connection) -> NormalizedLines:
    """Step 1: exported reports -> expense lines, each on its approval day in the connection's zone, and the
    malformed lines set aside with their reasons."""
    return normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)


def draft(normalized: NormalizedLines, conn: Connection, config: ProjectConfig, dims: Dimensions, today: date,
          day: str | None = None) -> JournalDrafts:
    """Step 2: expense lines -> journal drafts and rejections. A report with a malformed line is rejected whole
    (MALFORMED_SOURCE); the others are mapped and validated against the snapshots (`build_journal_drafts`), and
    a draft that breaks the DraftLineSchema moves to the rejections (`split_invalid_drafts`).

    Args:
        today: the connection's day (`clock.connection_today`), for the `run_date` posting-date policy.
        day: the approval day the reports were exported for; a malformed report with no valid line to date it
            is filed there (default: `today`).
    """
    lines, malformed = normalized.lines, normalized.malformed
    bad = set(malformed["report_id"])
    drafts = build_journal_drafts(lines[~lines["report_id"].isin(bad)], conn, config, dims, run_date=today)
    drafts, _failures = split_invalid_drafts(drafts)
    set_aside = _malformed_rejections(normalized, conn, day or today.isoformat())
    frames = [f for f in (drafts.rejections, set_aside) if len(f)]
    rejections = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REJECTION_COLUMNS)
    return JournalDrafts(lines=drafts.lines, rejections=rejections)


def _malformed_rejections(normalized: NormalizedLines, conn: Connection, day: str) -> pd.DataFrame:
    """One MALFORMED_SOURCE rejection per malformed line, on its report's approval day (else on `day`)."""
    day_of = dict(zip(normalized.lines["report_id"], normalized.lines["partition_date"]))
    rows = [{"connection": conn.name, "partition_date": day_of.get(r.report_id, day), "report_id": r.report_id,
             "transaction_id": r.transaction_id or "", "code": Reason.MALFORMED_SOURCE.value, "dimension": "source",
             "value": r.reason, "message": r.detail} for r in normalized.malformed.itertuples(index=False)]
    return pd.DataFrame(rows, columns=REJECTION_COLUMNS)


def drafts_for_reports(reports: list[dict], conn: Connection, config: ProjectConfig, dims: Dimensions,
                       today: date, day: str | None = None) -> JournalDrafts:
    """Exported reports -> journal drafts and rejections for one connection: `normalize`, then `draft`."""
    return draft(normalize(reports, conn), conn, config, dims, today, day)
