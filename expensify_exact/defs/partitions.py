"""The one daily partitioning every asset shares (a partition is an approval day), the decorator of a per-day asset,
and how a multi-day run's values are keyed by partition."""

from datetime import date
from typing import Any

import dagster as dg
import pandas as pd

DAILY_APPROVALS = dg.DailyPartitionsDefinition(start_date="2024-01-01", timezone="Europe/Amsterdam")
# A backfill over many days is one run that handles the range in one go (one export job, one snapshot).
SINGLE_RUN = dg.BackfillPolicy.single_run()


def daily_asset(**kwargs):
    """`dg.asset` for a per-approval-day asset: daily partitions, backfilled in single runs."""
    return dg.asset(partitions_def=DAILY_APPROVALS, backfill_policy=SINGLE_RUN, **kwargs)


def day_range(context: dg.AssetExecutionContext) -> tuple[list[str], date, date]:
    """The run's approval days: their partition keys, the first and the last."""
    keys = context.partition_keys
    return keys, date.fromisoformat(keys[0]), date.fromisoformat(keys[-1])


def per_partition(context: dg.AssetExecutionContext, value: Any) -> dict[str, Any]:
    """An upstream value keyed by partition: the IO manager hands a dict only when a run spans several days."""
    keys = context.partition_keys
    return {keys[0]: value} if len(keys) == 1 else dict(value)


def partition_result(context: dg.AssetExecutionContext, values: dict[str, Any]) -> Any:
    """What an asset returns for its values by partition: the bare value when the run covers one day."""
    keys = context.partition_keys
    return values[keys[0]] if len(keys) == 1 else values


def concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The non-empty frames one after the other; an empty frame with `columns` when there are none."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
