"""Pandera rules every journal draft must meet before posting; a report with a failing line goes to quarantine."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from expensify_exact.transform.journal import REJECTION_COLUMNS, JournalDrafts, Reason


def _two_decimals(amount: pd.Series) -> pd.Series:
    return (amount * 100).round(6) == (amount * 100).round(0)


DraftLineSchema = pa.DataFrameSchema(
    {
        "report_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "transaction_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "gl_account_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "amount_cents": pa.Column("int64", nullable=False),
        "amount": pa.Column(float, pa.Check(_two_decimals, error="more than two decimals"), nullable=False),
        "currency": pa.Column(str, pa.Check.str_matches(r"^[A-Z]{3}$")),
        "financial_year": pa.Column(int),
        "financial_period": pa.Column(int, pa.Check.in_range(1, 53)),
        "description": pa.Column(str, pa.Check.str_length(max_value=60)),
        "notes": pa.Column(str, pa.Check.str_length(max_value=255)),
    },
    checks=[
        # Per entry, debits and credits cancel to the cent (the balance rule of exact-online.md §5.10).
        pa.Check(lambda df: df.groupby("report_id")["amount_cents"].transform("sum") == 0,
                 name="entry_balances", error="entry does not sum to zero"),
        pa.Check(lambda df: (df["amount"] * 100).round().astype("int64") == df["amount_cents"],
                 name="amount_matches_cents", error="amount and amount_cents disagree"),
    ],
    strict=False,
    coerce=False,
)


def split_invalid_drafts(drafts: JournalDrafts) -> tuple[JournalDrafts, pd.DataFrame]:
    """Validate lazily; move every report with a failing line into the rejections, whole.

    Returns:
        The drafts that remain valid (with the new rejections appended) and pandera's failure cases.
    """
    lines = drafts.lines
    if lines.empty:
        return drafts, pd.DataFrame()
    try:
        DraftLineSchema.validate(lines, lazy=True)
        return drafts, pd.DataFrame()
    except SchemaErrors as errors:
        failures = errors.failure_cases
    bad_index = failures["index"].dropna().astype(int).unique()
    bad_reports = set(lines.loc[lines.index.isin(bad_index), "report_id"])
    if failures["index"].isna().any():  # a failure that names no row taints everything it was run on
        bad_reports = set(lines["report_id"])
    new_rejections = []
    for report_id in sorted(bad_reports):
        report_lines = lines[lines["report_id"] == report_id]
        failed = failures[failures["index"].isin(report_lines.index)]
        checks = sorted(set(failed["check"].astype(str))) or ["schema"]
        code = Reason.UNBALANCED if any("sum to zero" in c for c in checks) else Reason.INVALID_DRAFT
        first = report_lines.iloc[0]
        new_rejections.append({"connection": first["connection"], "partition_date": first["partition_date"],
                               "report_id": report_id, "transaction_id": "", "code": code.value, "dimension": "draft",
                               "value": ", ".join(checks), "message": "draft failed: " + ", ".join(checks)})
    kept = lines[~lines["report_id"].isin(bad_reports)]
    rejections = pd.concat([drafts.rejections, pd.DataFrame(new_rejections, columns=REJECTION_COLUMNS)],
                           ignore_index=True)
    return JournalDrafts(lines=kept, rejections=rejections), failures
