"""Pandera rules every journal draft must meet before posting; a report with a failing line goes to quarantine."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from expensify_exact.core.journal import REJECTION_COLUMNS, JournalDrafts, Reason


def _two_decimals(amount: pd.Series) -> pd.Series:
    return (amount * 100).round(6) == (amount * 100).round(0)


def _after_exact_vat(df: pd.DataFrame) -> pd.Series:
    """What each line adds to the entry once Exact has added the VAT of excluding codes (exact-online.md §5.10)."""
    vat = df["vat_amount_cents"] if "vat_amount_cents" in df else 0
    return df["amount_cents"] + vat


def _per_entry_constant(column: str):
    return pa.Check(lambda df: df.groupby("report_id")[column].transform("nunique") == 1,
                    name=f"one_{column}_per_entry", error=f"lines of one entry disagree on {column}")


def _carries_ids(df: pd.DataFrame) -> pd.Series:
    """Every line leads back to its expense: both IDs in the Description prefix and in the Notes."""
    return pd.Series([
        description.startswith(f"{report_id}/{transaction_id}") and report_id in notes and transaction_id in notes
        for report_id, transaction_id, description, notes in
        zip(df["report_id"], df["transaction_id"], df["description"], df["notes"], strict=True)], index=df.index)


DraftLineSchema = pa.DataFrameSchema(
    {
        "report_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "transaction_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "side": pa.Column(str, pa.Check.isin(["debit", "credit", "rounding"])),
        "gl_account_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "amount_cents": pa.Column("int64", nullable=False),
        "vat_amount_cents": pa.Column("int64", nullable=False, required=False),
        "amount": pa.Column(float, pa.Check(_two_decimals, error="more than two decimals"), nullable=False),
        "currency": pa.Column(str, pa.Check.str_matches(r"^[A-Z]{3}$")),
        "financial_year": pa.Column(int),
        "financial_period": pa.Column(int, pa.Check.in_range(1, 53)),
        "description": pa.Column(str, pa.Check.str_length(max_value=60)),
        "notes": pa.Column(str, pa.Check.str_length(max_value=255)),
    },
    checks=[
        # Per entry, debits and credits cancel to the cent once Exact has added excluding VAT (§5.10).
        pa.Check(lambda df: _after_exact_vat(df).groupby(df["report_id"]).transform("sum") == 0,
                 name="entry_balances", error="entry does not sum to zero"),
        pa.Check(lambda df: (df["amount"] * 100).round().astype("int64") == df["amount_cents"],
                 name="amount_matches_cents", error="amount and amount_cents disagree"),
        pa.Check(_carries_ids, name="trace_ids_in_texts", error="description or notes lack the Expensify IDs"),
        # Only an excluding VAT code makes Exact add a VAT line.
        pa.Check(lambda df: (df["vat_amount_cents"] == 0) | (df["vat_code"] != "") if "vat_amount_cents" in df
                 else pd.Series(True, index=df.index), name="vat_only_with_code", error="VAT without a VAT code"),
        *(_per_entry_constant(c) for c in ("currency", "journal_code", "financial_year", "financial_period")),
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
