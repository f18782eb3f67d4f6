"""The stored dimension snapshot against the Exact sandbox over real HTTP, table by table: without the (unconfirmed)
`sync/Financial/GLAccounts` the mapped GL codes are read by Code and a blocked account is seen the next run; a code
the mappings need that a stored table lacks re-reads that table once, then is remembered; a week-old snapshot is read
in full.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
import pytest

from expensify_exact.cli.main import main
from expensify_exact.clock import connection_today
from expensify_exact.core.connections import build_exact_client
from expensify_exact.core.snapshots import GL_SYNC_PATH, MAX_AGE, needed_codes, refresh_snapshot
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox import seed

CONNECTION = "vermeerhals-nl"


class WithoutGLSyncTwin(httpx.BaseTransport):
    """An Exact without `sync/Financial/GLAccounts` (exact-online.md §13): it answers 404 like any unknown resource."""

    def __init__(self):
        self._inner = httpx.HTTPTransport(retries=2)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/" + GL_SYNC_PATH):
            return httpx.Response(404, json={"error": {"code": "", "message": {
                "lang": "", "value": "Resource not found for the segment 'GLAccounts'."}}}, request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.fixture
def connector(sandbox_mappings, state_url):
    assert main(["--mappings", str(sandbox_mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 CONNECTION, "--from-env"]) == 0
    return ConnectorResource(mappings_dir=str(sandbox_mappings), state_url=state_url)


def _refresh(connector, transport=None, needed=None, **kw):
    conn = connector.project().connection(CONNECTION)
    client = build_exact_client(conn, connector.vault(), connector.store(), transport=transport)
    kw.setdefault("now", connector.clock().now())
    kw.setdefault("today", connection_today(conn.timezone, connector.clock()))
    with client:
        result = refresh_snapshot(client, connector.store(), conn.exact.division,
                                  needed if needed is not None else needed_codes(conn, connector.project()), **kw)
        return result, client.calls_made


def test_without_the_gl_sync_twin_the_mapped_codes_are_read_by_code_and_a_block_is_seen_next_run(sandbox, connector):
    conn = connector.project().connection(CONNECTION)
    mapped = needed_codes(conn, connector.project())["gl_accounts"]
    first, _ = _refresh(connector, WithoutGLSyncTwin())
    assert first.how["gl_accounts"] == "codes"
    assert set(first.dimensions.gl_accounts["code"]) == mapped & {a.code for a in seed.GL_ACCOUNTS}

    victim = sorted(mapped & {a.code for a in seed.GL_ACCOUNTS if not a.blocked})[0]
    sandbox.exact.block_gl_account(victim)
    sandbox.exact.reset_stats()
    second, calls = _refresh(connector, WithoutGLSyncTwin())

    accounts = second.dimensions.gl_accounts.set_index("code")
    assert bool(accounts.loc[victim, "is_blocked"]) is True
    assert calls <= 2, sandbox.exact.stats["calls"]
    assert sandbox.exact.stats["calls"]["GET financial/GLAccounts"] == 1
    assert sandbox.exact.stats["calls"].get(f"GET {GL_SYNC_PATH}", 0) == 0, "the missing twin is not asked again"


def test_a_needed_code_a_stored_table_lacks_is_read_again_once_then_remembered(sandbox, connector):
    conn = connector.project().connection(CONNECTION)
    needed = needed_codes(conn, connector.project())
    _refresh(connector, needed=needed)

    needed["cost_units"] = needed["cost_units"] | {"P7001", "P7002"}
    sandbox.exact.add_cost_unit("P7001", "Nieuw project")
    sandbox.exact.reset_stats()
    miss, _ = _refresh(connector, needed=needed)
    assert miss.how["cost_units"] == "miss"
    assert "P7001" in set(miss.dimensions.cost_units["code"])
    assert sandbox.exact.stats["calls"]["GET hrm/Costunits"] == 1

    sandbox.exact.reset_stats()
    again, _ = _refresh(connector, needed=needed)  # P7002 still does not exist: confirmed, not asked again
    assert again.how["cost_units"] == "cached"
    assert sandbox.exact.stats["calls"].get("GET hrm/Costunits", 0) == 0


def test_a_snapshot_older_than_its_maximum_age_is_read_in_full(sandbox, connector):
    _refresh(connector)
    sandbox.exact.add_cost_unit("P7003", "Later project")
    fresh, _ = _refresh(connector)
    assert fresh.how["cost_units"] == "cached" and "P7003" not in set(fresh.dimensions.cost_units["code"])

    later = datetime.now(timezone.utc) + MAX_AGE + timedelta(minutes=1)
    old, _ = _refresh(connector, now=later)
    assert {old.how[name] for name in ("cost_units", "journals", "vat_codes", "financial_periods")} == {"full"}
    assert "P7003" in set(old.dimensions.cost_units["code"])


def test_with_the_gl_sync_twin_only_changed_accounts_are_read_and_a_block_is_seen_next_run(sandbox, connector):
    conn = connector.project().connection(CONNECTION)
    mapped = needed_codes(conn, connector.project())["gl_accounts"]
    first, _ = _refresh(connector)
    assert first.how["gl_accounts"] == "full"

    victim = sorted(mapped & {a.code for a in seed.GL_ACCOUNTS if not a.blocked})[0]
    sandbox.exact.block_gl_account(victim)
    sandbox.exact.reset_stats()
    second, calls = _refresh(connector)

    assert second.how["gl_accounts"] == "delta" and second.changed["gl_accounts"] >= 1
    assert bool(second.dimensions.gl_accounts.set_index("code").loc[victim, "is_blocked"]) is True
    assert len(second.dimensions.gl_accounts) == len(first.dimensions.gl_accounts)
    assert sandbox.exact.stats["calls"][f"GET {GL_SYNC_PATH}"] == 1 and calls <= 2, sandbox.exact.stats["calls"]
