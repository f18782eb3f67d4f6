"""Asset keys, groups and pools per connection: each connection (one Exact division) gets its own asset group."""

import dagster as dg

from expensify_exact.config import Connection


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
