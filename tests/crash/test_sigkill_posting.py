"""Exactly-once posting survives a poster that is SIGKILLed at random points, again and again.

The sandbox lives in this test process; the poster (tests/crash/driver.py: export → normalize → dimensions →
drafts → post_drafts) runs in child processes forked from a preloaded forkserver, so a restart costs milliseconds.
Each child is killed with SIGKILL, mostly a few POSTs after it started posting (so some entries are stored by Exact
while the poster never hears back), sometimes at a random moment before that (export, snapshot, settling intents).
After the last restart completes, every one of the 200 reports must be in Exact exactly once and the ledger must
match Exact entry for entry. The second test adds 10 % injected faults: 429s, 503s, timeouts and connections
dropped after the entry was stored.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest

from expensify_exact.cli.main import main
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings
from tests.crash.driver import assert_exactly_once_and_ledger_matches, many_reports_seed, poster_process

CONNECTION = "vermeerhals-nl"
REPORTS = 200
DAYS = 10
MIN_KILLS = 20
MAX_ATTEMPTS = 200  # a poster that never finishes fails the test instead of hanging it
# Exact answers each stored entry this late: POSTs then come at most ~50 a second however busy this process is, so
# a kill aimed a few POSTs in lands there even when the polling below is starved of the GIL by the sandbox's threads.
POST_ANSWER_DELAY = 0.02
POST_FAULTS = ("http_503_before_store", "drop_before_store", "store_then_http_500", "store_then_timeout",
               "store_then_drop")
API_FAULTS = ("rate_limit", "http_503")


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.crash.driver"])
    return context


@pytest.fixture
def crash_state_url(tmp_path):
    # The state DB on tmpfs when there is one: SIGKILL loses nothing the OS already has, and fsyncs stay cheap.
    shm = Path("/dev/shm")
    folder = shm / f"expensify_exact_{os.getpid()}_{tmp_path.name}" if shm.is_dir() else tmp_path
    folder.mkdir(exist_ok=True)
    yield f"sqlite:///{folder / 'state.db'}"
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (folder / name).unlink(missing_ok=True)
    if folder != tmp_path:
        folder.rmdir()


def _posts_attempted(sandbox) -> int:
    return sandbox.exact.stats["posts"]["attempted"]


def _run_until_done(sandbox, forkserver, args: tuple, rng: random.Random, min_kills: int = MIN_KILLS) -> dict:
    """Start the poster again and again, SIGKILLing it at least `min_kills` times (half of them mid-POST), until a
    run completes."""
    kills = mid_post_kills = failures = attempts = 0
    min_mid_post = min_kills // 2
    while True:
        attempts += 1
        assert attempts <= MAX_ATTEMPTS, f"the poster did not finish after {MAX_ATTEMPTS} starts ({kills} kills)"
        remaining = REPORTS - len(sandbox.exact.entries(S.DIVISION))
        killing = kills < min_kills or mid_post_kills < min_mid_post
        assert remaining or not killing, (
            f"every report was posted after {kills} kills ({mid_post_kills} mid-POST): the kills were paced too "
            f"slowly for this machine")
        before = _posts_attempted(sandbox)
        process = forkserver.Process(target=poster_process, args=args, daemon=True)
        process.start()
        if killing:
            kills_due, mid_post_due = min_kills - kills, min_mid_post - mid_post_kills
            mid_post = rng.random() >= 0.25 or mid_post_due >= kills_due
            if not mid_post:
                # A random moment before its first POST: export, snapshot or settling intents.
                deadline = time.monotonic() + rng.uniform(0.0, 1.5)
                while process.is_alive() and time.monotonic() < deadline and _posts_attempted(sandbox) == before:
                    time.sleep(0.002)
            else:
                # A few POSTs into the run, paced so that the kills still due fit before the last report is posted.
                posts = rng.randint(1, max(1, remaining // (max(kills_due, mid_post_due, 1) + 1)))
                while process.is_alive() and _posts_attempted(sandbox) < before + posts:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, POST_ANSWER_DELAY))
            if process.is_alive():
                process.kill()  # SIGKILL: no finally blocks, no flushing, no goodbye
                process.join()
                if process.exitcode == -signal.SIGKILL:
                    kills += 1
                    mid_post_kills += mid_post
                    continue
                # It ended on its own in the same instant: handled below like any other exit.
        process.join(timeout=120)
        assert process.exitcode is not None, "a poster hung"
        if process.exitcode == 0 and not killing:
            return {"attempts": attempts, "kills": kills, "mid_post_kills": mid_post_kills, "failures": failures}
        failures += process.exitcode != 0  # an injected fault outlasted the retries: start again


def _prepare(tmp_path: Path, sandbox, state_url: str) -> tuple[str, date, date]:
    sandbox.expensify.set_knobs(render_delay_seconds=0.05, rate_limiting=False)  # Expensify pacing is not on trial
    sandbox.exact.set_knobs(minutely_limit=1_000_000, daily_limit=10_000_000,
                            post_answer_delay_seconds=POST_ANSWER_DELAY)
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.05)
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 CONNECTION, "--from-env"]) == 0
    # Trade the refresh token once here: a poster killed inside a token refresh would otherwise lose the chain,
    # which is the token store's concern (tests/http/test_exact_auth.py), not this test's.
    from expensify_exact.config import load_project_config
    from expensify_exact.store.vault import CredentialVault
    from tests.crash.driver import exact_client

    conn = load_project_config(mappings).connection(CONNECTION)
    store = StateStore(state_url)
    with exact_client(conn, CredentialVault(store), store) as client:
        client.check_division()
    store.dispose()
    today = sandbox.seed.today
    return str(mappings), today - timedelta(days=DAYS + 1), today


@pytest.mark.parametrize("faults", [
    pytest.param(False, id="clean-network"),
    # Timeouts need the client's timeout below the sandbox's store-then-answer delay.
    pytest.param(True, id="10pct-429-5xx-timeouts-drops"),
])
@pytest.mark.parametrize("keeps_ids", [
    # Strict (the sandbox's default): Exact assigns its own EntryIDs, so only the report's lines find an entry.
    pytest.param(False, id="exact-assigns-entry-ids"),
    # Lenient: Exact keeps ours; fewer kills keep the runtime sane, the strict mode carries the full load.
    pytest.param(True, id="exact-keeps-entry-ids", marks=pytest.mark.slow),
])
def test_poster_killed_at_random_points_posts_every_report_exactly_once(tmp_path, forkserver, crash_state_url,
                                                                         faults, keeps_ids):
    seed = many_reports_seed(date.today(), REPORTS, days=DAYS)
    rng = random.Random(20261125 + faults + 2 * keeps_ids)
    min_kills = MIN_KILLS // 2 if keeps_ids else MIN_KILLS
    with SandboxServer(seed=seed) as sandbox:
        sandbox.exact.set_knobs(keep_client_entry_ids=keeps_ids)
        mappings, start, end = _prepare(tmp_path, sandbox, crash_state_url)
        timeout = 30.0
        if faults:
            sandbox.exact.set_knobs(timeout_seconds=0.5)
            timeout = 0.25
            sandbox.faults.set_rate("exact.api", 0.10, API_FAULTS, seed=7)
            sandbox.faults.set_rate("exact.post_entry", 0.10, POST_FAULTS)
        args = (os.environ["EXPENSIFY_EXACT_KEY"], mappings, crash_state_url, start, end, timeout)
        stats = _run_until_done(sandbox, forkserver, args, rng, min_kills)
        sandbox.faults.clear()

        store = StateStore(crash_state_url)
        audit = store.audit_rows(CONNECTION)
        store.dispose()
        settled = sum(1 for r in audit if r["event"] == "posted" and "settled" in (r["detail"] or ""))
        print(f"\n{'faults' if faults else 'clean'}: {stats}, posts attempted {_posts_attempted(sandbox)}, "
              f"pending intents found in Exact {settled}, "
              f"not found {sum(1 for r in audit if r['event'] == 'intent_not_found')}, "
              f"faults fired {dict(Counter(f for _, f in sandbox.faults.fired))}")
        if faults:
            fired = Counter(f for _, f in sandbox.faults.fired)
            assert {"store_then_drop", "store_then_timeout", "rate_limit"} <= set(fired), fired
        assert_exactly_once_and_ledger_matches(sandbox, crash_state_url, {r.report_id for r in seed.reports},
                                               CONNECTION)
