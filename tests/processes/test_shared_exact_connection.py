"""Two OS processes share one Exact connection for 30 simulated minutes through the connector's state DB.

Exact's refresh tokens are single-use: if both processes ever presented the same one, Exact would answer
"Old refresh token used" and the connection would be lost until a person re-authorizes. The lease lock in the
state DB (SQLite by default, PostgreSQL in production) and the re-read after taking it must prevent that.
"""

import multiprocessing
import os

import pytest

from expensify_exact_sandbox import seed

SIMULATED_MINUTES = 30
STEP_SECONDS = 45


def _worker(state_url: str, key: str, exact_url: str, results) -> None:
    os.environ["EXPENSIFY_EXACT_KEY"] = key
    from expensify_exact.api.exact.auth import ExactAuth, TokenRefresher
    from expensify_exact.api.exact.client import ExactClient
    from expensify_exact.api.exact.regions import token_url
    from expensify_exact.core.connections import VaultTokenStore
    from expensify_exact.errors import ConnectorError
    from expensify_exact.store import StateStore
    from expensify_exact.store.vault import CredentialVault
    from expensify_exact_sandbox.clock import RemoteSandboxClock

    clock = RemoteSandboxClock(exact_url)
    store = StateStore(state_url)
    vault = CredentialVault(store)
    refresher = TokenRefresher(VaultTokenStore(store, vault), "shared", token_url(exact_url), seed.EXACT_CLIENT_ID,
                               seed.EXACT_CLIENT_SECRET, clock)
    client = ExactClient(exact_url, seed.DIVISION, ExactAuth(refresher), clock)
    start = clock.now()
    calls = errors = 0
    while (clock.now() - start).total_seconds() < SIMULATED_MINUTES * 60:
        try:
            client.get_all("financial/Journals", select=["Code"])
            calls += 1
        except ConnectorError as exc:
            errors += 1
            results.put(("error", str(exc)))
            break
        clock.sleep(STEP_SECONDS)
    results.put(("done", calls, errors, refresher.refreshes))


def _run_two_processes(sandbox, state_url: str) -> list:
    from datetime import datetime, timezone

    from expensify_exact.api.exact.tokens import ExactTokens
    from expensify_exact.core.connections import VaultTokenStore
    from expensify_exact.store import StateStore
    from expensify_exact.store.vault import CredentialVault

    store = StateStore(state_url)
    long_ago = datetime(2000, 1, 1, tzinfo=timezone.utc)
    VaultTokenStore(store, CredentialVault(store)).save(
        "shared", ExactTokens("", seed.EXACT_INITIAL_REFRESH_TOKEN, long_ago, long_ago))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(state_url, os.environ["EXPENSIFY_EXACT_KEY"], sandbox.exact_url,
                                                 results)) for _ in range(2)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for w in workers:
        w.join(30)
    return outcomes


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_processes_sharing_a_connection_never_present_a_spent_refresh_token(sandbox, tmp_path, backend,
                                                                                request):
    state_url = f"sqlite:///{tmp_path / 'state.db'}" if backend == "sqlite" else request.getfixturevalue(
        "pg_database")
    outcomes = _run_two_processes(sandbox, state_url)
    assert [o[0] for o in outcomes] == ["done", "done"], outcomes
    stats = sandbox.exact.stats
    assert stats["old_refresh_token_used"] == 0
    assert sum(o[3] for o in outcomes) >= 3, "30 simulated minutes need several rotations of the 10-minute token"
    assert sum(o[1] for o in outcomes) >= 2 * 20, "both processes kept working throughout"
    assert stats["refusals"].get("too_early", 0) == 0, stats["refusals"]
