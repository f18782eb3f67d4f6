"""The partitioning every asset shares, a connection × an approval day, and how one step does the work of all the
connections its run covers: each connection's days in a thread of their own, since the time goes on waiting for the
APIs, one connection's failure never stopping the others.

Why a connection dimension and not an asset group per connection: definitions stay the same size however many
customers there are (`benchmarks/run.py --only definitions`), and a backfill for one customer or for all is one
selection of partitions. README, "Many customers".
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

import dagster as dg
import pandas as pd

from expensify_exact.config import Connection, ProjectConfig

CONNECTION, DAY, MONTH = "connection", "day", "month"
DAILY_APPROVALS = dg.DailyPartitionsDefinition(start_date="2024-01-01", timezone="Europe/Amsterdam")
MONTHS = dg.MonthlyPartitionsDefinition(start_date="2024-01-01", timezone="Europe/Amsterdam")
# A backfill over many days or connections is one run that handles the range in one go (one export job per
# Expensify credential, one snapshot per division).
SINGLE_RUN = dg.BackfillPolicy.single_run()
# How many connections one step works on at once. Each waits on its own division's rate limit most of the time.
PARALLEL_CONNECTIONS_ENV = "EXPENSIFY_EXACT_PARALLEL_CONNECTIONS"
DEFAULT_PARALLEL_CONNECTIONS = 32


@dataclass(frozen=True)
class Partitioning:
    """The connections as a static dimension, crossed with approval days (the chain) and with months."""

    connections: dg.StaticPartitionsDefinition
    days: dg.MultiPartitionsDefinition
    months: dg.MultiPartitionsDefinition


@lru_cache(maxsize=16)
def _partitioning(names: tuple[str, ...]) -> Partitioning:
    connections = dg.StaticPartitionsDefinition(list(names))
    return Partitioning(connections, dg.MultiPartitionsDefinition({CONNECTION: connections, DAY: DAILY_APPROVALS}),
                        dg.MultiPartitionsDefinition({CONNECTION: connections, MONTH: MONTHS}))


def partitioning(config: ProjectConfig) -> Partitioning:
    """One object per set of connection names, in config order (so a run over consecutive connections is a range)."""
    return _partitioning(tuple(c.name for c in config.connections))


def partition_key(connection: str, day: str, dimension: str = DAY) -> str:
    """The partition key of a connection's day (or month, with `dimension=MONTH`): `<connection>|<day>`."""
    return dg.MultiPartitionKey({CONNECTION: connection, dimension: day})


def split_key(key: str) -> tuple[str, str]:
    """(connection, day or month) of a partition key."""
    connection, period = key.split("|", 1)  # dimensions in name order: connection, then day / month
    return connection, period


RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"
# A run limited to some connections without partitions (a replay) names them here, comma-separated.
CONNECTION_TAG = "expensify_exact/connection"
# What asked for a run: day_closed, deferred, dimensions_changed, exact_webhooks, ...
TRIGGER_TAG = "expensify_exact/trigger"


def partition_tags(first: str, last: str, start: str, end: str, dimension: str = DAY) -> dict[str, str]:
    """The run tags for the rectangle of partitions connections `first`..`last` (config order) × `start`..`end`."""
    return {RANGE_START_TAG: partition_key(first, start, dimension), RANGE_END_TAG: partition_key(last, end, dimension)}


def connections_of_run(tags: dict[str, str], names: list[str]) -> list[str]:
    """The connections a run covers, by its partition tags (a key or a range over `names`, in config order) or its
    `CONNECTION_TAG`; a connection no longer configured counts only when named by itself."""
    if "|" in tags.get(PARTITION_TAG, ""):
        return [split_key(tags[PARTITION_TAG])[0]]
    if RANGE_START_TAG in tags and "|" in tags[RANGE_START_TAG]:
        first = split_key(tags[RANGE_START_TAG])[0]
        last = split_key(tags.get(RANGE_END_TAG, tags[RANGE_START_TAG]))[0]
        if first in names and last in names:
            return names[names.index(first):names.index(last) + 1]
        return [name for name in (first, last) if name]
    return [name for name in tags.get(CONNECTION_TAG, "").split(",") if name]


# At most this many connections in one sensor run: runs of a big morning spread over the run workers (and, with
# the Celery executor, over its workers), while each run still works on its connections side by side.
CONNECTIONS_PER_RUN_ENV = "EXPENSIFY_EXACT_CONNECTIONS_PER_RUN"
DEFAULT_CONNECTIONS_PER_RUN = 100


def connections_per_run() -> int:
    return max(1, int(os.environ.get(CONNECTIONS_PER_RUN_ENV) or DEFAULT_CONNECTIONS_PER_RUN))


def rectangles(config: ProjectConfig, wanted: dict[str, tuple[date, date]],
               limit: int | None = None) -> list[tuple[list[str], date, date]]:
    """The runs that cover `wanted` (connection -> its first and last day): consecutive connections in config order
    that want the same days share a run (a rectangle of partitions), at most `limit` connections each."""
    limit = limit or connections_per_run()
    runs: list[tuple[list[str], date, date]] = []
    previous: str | None = None
    for conn in config.connections:
        days = wanted.get(conn.name)
        if days is None:
            previous = None
            continue
        if previous is not None and runs[-1][1:] == days and len(runs[-1][0]) < limit:
            runs[-1][0].append(conn.name)
        else:
            runs.append(([conn.name], *days))
        previous = conn.name
    return runs


def rectangle_tags(names: list[str], start: date, end: date) -> dict[str, str]:
    """The partition tags of a run over connections `names` (consecutive in config order) × days start..end."""
    if len(names) == 1 and start == end:
        return {PARTITION_TAG: partition_key(names[0], start.isoformat())}
    return partition_tags(names[0], names[-1], start.isoformat(), end.isoformat())


def connection_asset(partitions: Partitioning, **kwargs):
    """`dg.asset` partitioned by connection × approval day, backfilled in single runs."""
    return dg.asset(partitions_def=partitions.days, backfill_policy=SINGLE_RUN, **kwargs)


def days_by_connection(context: dg.AssetExecutionContext) -> dict[str, list[str]]:
    """The run's approval days (or months) per connection, both in order."""
    found: dict[str, list[str]] = {}
    for key in context.partition_keys:
        connection, period = split_key(key)
        found.setdefault(connection, []).append(period)
    return {connection: sorted(periods) for connection, periods in found.items()}


def day_range(days: list[str]) -> tuple[date, date]:
    """The first and the last of a connection's approval days."""
    return date.fromisoformat(days[0]), date.fromisoformat(days[-1])


def per_partition(context: dg.AssetExecutionContext, value: Any) -> dict[str, Any]:
    """An upstream value keyed by partition: the IO manager hands a dict only when a run spans several partitions."""
    keys = context.partition_keys
    return {keys[0]: value} if len(keys) == 1 else dict(value)


def partition_result(context: dg.AssetExecutionContext, values: dict[str, Any]) -> Any:
    """What an asset returns for its values by partition: the bare value when the run covers one partition."""
    keys = context.partition_keys
    return values[keys[0]] if len(keys) == 1 else values


def concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The non-empty frames one after the other; an empty frame with `columns` when there are none."""
    frames = [f for f in frames if isinstance(f, pd.DataFrame) and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


@dataclass(frozen=True)
class ConnectionFailed:
    """What a step keeps for a connection whose work raised: later steps pass it on instead of working, and the
    posting step reports it (the run's other connections carry on)."""

    connection: str
    step: str
    error: str


def failures(values: dict[str, Any]) -> list[ConnectionFailed]:
    """The failed connections among a step's values, one each."""
    seen: dict[str, ConnectionFailed] = {}
    for value in values.values():
        if isinstance(value, ConnectionFailed):
            seen.setdefault(value.connection, value)
    return list(seen.values())


def parallel_connections() -> int:
    return max(1, int(os.environ.get(PARALLEL_CONNECTIONS_ENV) or DEFAULT_PARALLEL_CONNECTIONS))


def by_partition(results: dict[str, dict[str, Any]], dimension: str = DAY) -> dict[str, Any]:
    """{connection: {day: value}} as {partition key: value}."""
    return {partition_key(name, day, dimension): value for name, by_day in results.items()
            for day, value in by_day.items()}


def describe_partitions(context: dg.AssetExecutionContext, values: dict[str, Any], describe,
                        asset_key: dg.AssetKey | None = None) -> None:
    """Each (connection, period) partition's own metadata: what `describe(key, value)` says, or why its connection
    failed."""
    for key, value in values.items():
        metadata = {"failed": value.error, "failed_step": value.step} if isinstance(value, ConnectionFailed) \
            else describe(key, value)
        context.add_asset_metadata(metadata, asset_key=asset_key, partition_key=key)


def for_each_connection(context: dg.AssetExecutionContext, config: ProjectConfig,
                        work: Callable[..., dict[str, Any]], *upstream: Any, dimension: str = DAY) -> dict[str, Any]:
    """`fan_out` over the connections and days of an asset's run, its values keyed by partition. `upstream` are
    the step's inputs as the IO manager hands them."""
    inputs = [per_partition(context, value) for value in upstream]
    plan = days_by_connection(context)
    mine = {name: [{day: values[partition_key(name, day, dimension)] for day in days} for values in inputs]
            for name, days in plan.items()}
    return by_partition(fan_out(context.log, context.op_def.name, config, plan, work, mine), dimension)


def fan_out(log, step: str, config: ProjectConfig, plan: dict[str, list[str]], work: Callable[..., dict[str, Any]],
            inputs: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """Run `work(conn, days, *inputs[name])` for every connection `name` in `plan` (name -> its days), several at
    once, and return what each gives ({day: value}) by connection. A connection one of whose inputs is a
    `ConnectionFailed` is passed over with that failure."""

    def one(conns: list[Connection], days_of: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        (conn,) = conns
        mine = (inputs or {}).get(conn.name, [])
        failed = next((v for values in mine for v in values.values() if isinstance(v, ConnectionFailed)), None)
        if failed is not None:
            return {conn.name: {day: failed for day in days_of[conn.name]}}
        return {conn.name: work(conn, days_of[conn.name], *mine)}

    return fan_out_groups(log, step, config, plan, {name: [name] for name in plan}, one)


def fan_out_groups(log, step: str, config: ProjectConfig, plan: dict[str, list[str]], groups: dict[str, list[str]],
                   work: Callable[[list[Connection], dict[str, list[str]]], dict[str, dict[str, Any]]]
                   ) -> dict[str, dict[str, Any]]:
    """Run `work(connections, days_of)` once per group of connections (e.g. those sharing an Expensify credential),
    several groups at once; `work` gives {connection: {day: value}}. If it raises, each connection of the group
    gets a `ConnectionFailed` for each of its days, the error goes to `log` with their names, and the other groups
    carry on: one customer's failure never stops the others (invariant 6)."""

    def one(names: list[str]) -> dict[str, dict[str, Any]]:
        try:
            return work([config.connection(name) for name in names], {name: plan[name] for name in names})
        except Exception as exc:  # noqa: BLE001 - reported per connection; the other groups go on
            error = f"{type(exc).__name__}: {exc}"
            log.error(f"{', '.join(names)}: {step} failed: {error}\n{traceback.format_exc(limit=8)}")
            return {name: {day: ConnectionFailed(name, step, error) for day in plan[name]} for name in names}

    if not groups:
        return {}
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=min(parallel_connections(), len(groups)),
                            thread_name_prefix="connection") as pool:
        for found in pool.map(one, groups.values()):
            results.update(found)
    return results
