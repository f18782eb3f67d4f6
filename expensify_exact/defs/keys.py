"""The asset keys of the chain: one asset per stage for every connection, the connection being a partition dimension
(`defs.partitions`), so the keys do not grow with the number of customers."""

import dagster as dg

GROUP = "expenses"
RECONCILIATION_GROUP = "reconciliation"
OVERVIEW_GROUP = "overview"

RAW_REPORTS = dg.AssetKey(["expensify", "raw_reports"])
EXPENSE_LINES = dg.AssetKey(["expensify", "expense_lines"])
UNREPORTED_CARD_SPEND = dg.AssetKey(["expensify", "unreported_card_spend"])
JOURNAL_DRAFTS = dg.AssetKey(["exact", "journal_drafts"])
POSTED = dg.AssetKey(["exact", "journal_entries_posted"])
QUARANTINE = dg.AssetKey(["quarantine"])


def dimension_key(name: str) -> dg.AssetKey:
    """The snapshot of one of Exact's dimension tables, e.g. dimension_key("gl_accounts") -> exact/gl_accounts."""
    return dg.AssetKey(["exact", name])


def slug(connection_name: str) -> str:
    """Connection names may contain '-', which Dagster names may not."""
    return connection_name.replace("-", "_")
