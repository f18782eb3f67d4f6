"""The one pipeline from exported Expensify reports to journal drafts and report-level rejections: normalize, set
malformed reports aside, map, validate. The main job's assets, replay, reconciliation and `check` all run it."""

from __future__ import annotations

from datetime import date

import pandas as pd

from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.expense_lines import normalize_reports
from expensify_exact.core.journal import REJECTION_COLUMNS, Dimensions, JournalDrafts, Reason, build_journal_drafts


def drafts_for_reports(reports: list[dict], conn: Connection, config: ProjectConfig, dims: Dimensions,
                       run_date: date) -> JournalDrafts:
    """Exported reports -> journal drafts and rejections for one connection: the steps of the main job's
    expense_lines and journal_drafts assets (normalize, set malformed reports aside, map, validate)."""
    normalized = normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
    lines, malformed = normalized.lines, normalized.malformed
    bad = set(malformed["report_id"])
    drafts = build_journal_drafts(lines[~lines["report_id"].isin(bad)], conn, config, dims, run_date=run_date)
    drafts, _failures = split_invalid_drafts(drafts)
    day_of = dict(zip(lines["report_id"], lines["partition_date"]))
    malformed_rows = [{"connection": conn.name, "partition_date": day_of.get(r.report_id, run_date.isoformat()),
                       "report_id": r.report_id, "transaction_id": r.transaction_id or "",
                       "code": Reason.MALFORMED_SOURCE.value, "dimension": "source", "value": r.reason,
                       "message": r.detail} for r in malformed.itertuples(index=False)]
    rejections = pd.concat([drafts.rejections, pd.DataFrame(malformed_rows, columns=REJECTION_COLUMNS)],
                           ignore_index=True)
    return JournalDrafts(lines=drafts.lines, rejections=rejections)
