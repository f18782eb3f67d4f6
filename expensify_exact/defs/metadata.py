"""Metadata values every asset shows in the Dagster UI."""

import dagster as dg
import pandas as pd


def markdown_table(frame: pd.DataFrame, limit: int = 50) -> dg.MetadataValue:
    """The first `limit` rows as a Markdown table, saying how many more there are."""
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    text = frame.head(limit).to_markdown(index=False)
    if len(frame) > limit:
        text += f"\n\n… and {len(frame) - limit} more"
    return dg.MetadataValue.md(text)
