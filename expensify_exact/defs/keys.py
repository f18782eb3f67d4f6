"""Asset keys, groups and pools per connection: each connection (one Exact division) gets its own asset group."""

import dagster as dg
import sqlalchemy as sa

from expensify_exact.config import Connection, ProjectConfig


def slug(connection_name: str) -> str:
    """Connection names may contain '-', which Dagster names may not."""
    return connection_name.replace("-", "_")


def asset_key(connection_name: str, *parts: str) -> dg.AssetKey:
    """E.g. asset_key("vermeerhals-nl", "exact", "journal_drafts") -> vermeerhals_nl/exact/journal_drafts."""
    return dg.AssetKey([slug(connection_name), *parts])


def group_name(connection_name: str) -> str:
    return slug(connection_name)


def exact_pool(conn: Connection) -> str:
    """One pool per Exact division: concurrent runs together stay inside its 60 calls a minute."""
    return f"exact_division_{conn.exact.division}"


def expensify_pool(conn: Connection) -> str:
    """One pool per Expensify credential (the first policy identifies it in config; the secret is not used)."""
    return f"expensify_{slug(conn.name)}"


def connector_pools(config: ProjectConfig) -> list[str]:
    return sorted({pool for conn in config.connections for pool in (exact_pool(conn), expensify_pool(conn))})


def ensure_pools(instance: dg.DagsterInstance, config: ProjectConfig) -> dict[str, int | None]:
    """Gives each of the connector's pools its limit before a run first claims it; returns pool -> limit.

    Dagster creates a missing pool's row when a step first claims it, with an INSERT that on PostgreSQL fails the
    run if another run created the row meanwhile (dagster-io/dagster#33552, still open in 1.13.27). Rows made here
    carry the instance's `concurrency.pools.default_limit` (1 in the shipped dagster.yaml) as an explicit limit,
    so Dagster never takes that path for them; a limit an operator set in the UI or with `dagster instance
    concurrency set` is kept. Without a default limit nothing is created, and the pools stay unlimited.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    limits = {pool.name: pool.limit for pool in storage.get_pool_limits()}
    default = storage.get_pool_config().default_pool_limit
    for pool in connector_pools(config):
        if pool in limits or default is None:
            continue
        try:
            storage.set_concurrency_slots(pool, default)
        except sa.exc.IntegrityError:
            pass  # another process created it at the same moment, with the same default
        limits[pool] = default
    return {pool: limits.get(pool) for pool in connector_pools(config)}
