"""Two `expensify-exact run` processes at once over overlapping connections, on one embedded Dagster instance,
against the sandbox over HTTP. No pools: the second names the live run over a connection it needs, waits for it to
end (it is paused with SIGSTOP while it posts, so alive and not to be recovered), then runs, and nothing is posted
twice."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import timedelta

import dagster as dg
import pytest

from expensify_exact_sandbox import seed
from tests.crash.driver import report_of_entry
from tests.dagster.test_end_to_end import _expected_report_ids
from tests.dagster.test_several_connections import BE_POLICY, _add_reports, write_connections
from tests.factories import store_demo_secrets
from tests.processes.embedded import cli_env, ledger, start_cli, state_url

pytestmark = pytest.mark.slow

NL, BE = "vermeerhals-nl", "vermeerhals-be"
DEADLINE = 180


def _until(what: str, check, *processes) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        for process, log in processes:
            assert process.poll() is None, f"exited {process.returncode} before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_second_run_over_an_overlapping_connection_waits_for_the_first_and_posts_nothing_twice(
        sandbox, tmp_path, monkeypatch):
    sandbox.expensify.set_knobs(rate_limiting=False)
    # Each stored entry answers after half a second: the first run spends its posting waiting on Exact, not in the DB.
    sandbox.exact.set_knobs(minutely_limit=100_000, post_answer_delay_seconds=0.5)
    mappings = write_connections(tmp_path / "mappings", sandbox, [
        (NL, "Europe/Amsterdam"), (BE, "Europe/Brussels", seed.SECOND_DIVISION, BE_POLICY)])
    home = tmp_path / "dagster_home"
    state = state_url(home)
    home.mkdir()
    store_demo_secrets(mappings, state, [NL, BE], sandbox=sandbox, monkeypatch=monkeypatch)
    end = sandbox.seed.today - timedelta(days=1)
    start = end - timedelta(days=6)
    belgian = set().union(*(_add_reports(sandbox, BE_POLICY, start + timedelta(days=n), 1) for n in range(0, 7, 2)))
    dutch = _expected_report_ids(sandbox, start, end) - {seed._report_id(101), seed._report_id(102)}

    env = cli_env(home)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_cli(env, mappings, "run", "--start", start.isoformat(), "--end", end.isoformat(), log=first_log)
    try:
        _until("the first run to post", lambda: ledger(home), (first, first_log))
        first.send_signal(signal.SIGSTOP)
        first_run = ledger(home)[0]["run_id"]
        # Both customers' last days again, one of them the first run's: the Belgian one.
        second = start_cli(env, mappings, "run", "--connection", BE, "--start", (end - timedelta(days=2)).isoformat(),
                           "--end", end.isoformat(), log=second_log)
        _until("the second run to say it waits", lambda: "waiting for run" in second_log.read_text(),
               (second, second_log))
        said = second_log.read_text()
        assert f"waiting for run {first_run} (STARTED since " in said and f"pid {first.pid} on " in said
        assert f"which works on {BE}; giving up after 900 s (--wait-timeout)" in said
        assert "recovered" not in said, "a paused run is alive: it must not be failed"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(DEADLINE) == 0, first_log.read_text()
    assert second.wait(DEADLINE) == 0, second_log.read_text()

    assert Counter(report_of_entry(e) for e in sandbox.exact.entries(seed.DIVISION)) == Counter(dutch)
    assert Counter(report_of_entry(e) for e in sandbox.exact.entries(seed.SECOND_DIVISION)) == Counter(belgian)
    assert "posted: 0  already posted: 2" in second_log.read_text(), "the second run found the Belgian ones posted"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        runs = {r.dagster_run.run_id: r for r in instance.get_run_records()}
        [later] = [r for run_id, r in runs.items() if run_id != first_run]
        assert later.start_time >= runs[first_run].end_time, "the second run started once the first had ended"
