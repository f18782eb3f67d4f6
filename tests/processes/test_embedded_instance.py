"""The embedded instance as users meet it: several `expensify-exact run` processes on one fresh $DAGSTER_HOME.

- Three runs started at once on a fresh home used to fail (an SQLAlchemy integrity error, then "alembic_version
  has more than one head" for every later command). Creating the instance is now serialized by a file lock in the
  home: all three exit 0, a fourth works, and every report is in the sandbox once.
- A home that an earlier race left with two alembic heads is repaired by the next command, which says so.
- A run over a connection a live run works on names that run, waits without burning CPU,
  and gives up after `--wait-timeout` with a clear message and exit 1. The holder is a real run, paused with SIGSTOP
  while it posts (alive, so it must not be recovered).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from datetime import date, timedelta

import pytest

from expensify_exact_sandbox import seed as S
from tests.conftest import write_mappings
from tests.crash.driver import report_of_entry
from tests.dagster.test_end_to_end import _expected_report_ids
from tests.processes.embedded import CONNECTION, cli_env, cpu_seconds, ledger, run_cli_process, start_cli

WAIT_TIMEOUT = 8.0

pytestmark = pytest.mark.slow


@pytest.fixture
def unlimited_sandbox(sandbox):
    # Rate limits are not on trial here: with them three runs at once wait minutes for Exact's minute.
    sandbox.exact.set_knobs(minutely_limit=100_000)
    sandbox.expensify.set_knobs(rate_limiting=False)
    return sandbox


@pytest.fixture
def setup(unlimited_sandbox, tmp_path):
    mappings = write_mappings(tmp_path / "mappings", unlimited_sandbox, expensify__poll_interval_seconds=0.2)
    home = tmp_path / "dagster_home"
    env = cli_env(home)
    assert run_cli_process(env, mappings, "secrets", "set", "--connection", CONNECTION, "--from-env",
                           log=tmp_path / "secrets.log") == 0
    assert not (home / "dagster.yaml").exists(), "secrets set must not create the Dagster instance"
    today = unlimited_sandbox.seed.today
    window = ("run", "--start", (today - timedelta(days=31)).isoformat(),
              "--end", (today - timedelta(days=1)).isoformat())
    return unlimited_sandbox, mappings, home, env, window


def _posted_once(sandbox, window) -> None:
    start, end = date.fromisoformat(window[2]), date.fromisoformat(window[4])
    expected = _expected_report_ids(sandbox, start, end) - {S._report_id(101), S._report_id(102)}
    counts = Counter(report_of_entry(e) for e in sandbox.exact.entries(S.DIVISION))
    assert set(counts) == expected and max(counts.values()) == 1, counts


def test_three_runs_at_once_on_a_fresh_home_all_succeed(setup, tmp_path):
    sandbox, mappings, home, env, window = setup
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    processes = [start_cli(env, mappings, *window, log=log) for log in logs]
    codes = [p.wait(600) for p in processes]
    assert codes == [0, 0, 0], "\n\n".join(log.read_text() for log in logs)
    fourth = tmp_path / "fourth.log"
    assert run_cli_process(env, mappings, *window, log=fourth) == 0, fourth.read_text()
    assert "posted: 0  already posted: " in fourth.read_text()
    _posted_once(sandbox, window)


def test_a_home_left_with_two_alembic_heads_is_repaired_and_said(setup, tmp_path):
    sandbox, mappings, home, env, window = setup
    assert run_cli_process(env, mappings, *window, "--dry-run", log=tmp_path / "first.log") == 0
    # What two first starts at once left before issue 14: the older revision stamped next to the current one.
    with sqlite3.connect(home / "history" / "runs.db") as db:
        [head] = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
        db.execute("INSERT INTO alembic_version VALUES ('5771160a95ad')")
    log = tmp_path / "second.log"
    assert run_cli_process(env, mappings, *window, log=log) == 0, log.read_text()
    assert f"repaired {home / 'history' / 'runs.db'}" in log.read_text()
    assert f"kept {head}" in log.read_text()
    _posted_once(sandbox, window)


def test_a_run_waiting_for_a_live_run_on_its_connection_names_it_waits_cheaply_and_gives_up(setup, tmp_path):
    sandbox, mappings, home, env, window = setup
    holder = start_cli(env, mappings, *window, log=tmp_path / "holder.log")
    try:
        deadline = time.monotonic() + 180
        while not ledger(home):  # posting
            assert holder.poll() is None, (tmp_path / "holder.log").read_text()
            assert time.monotonic() < deadline, "the holder never started posting"
            time.sleep(0.01)
        holder.send_signal(signal.SIGSTOP)
        holder_run = ledger(home)[0]["run_id"]

        log = tmp_path / "waiter.log"
        waiter = start_cli(env, mappings, *window, "--wait-timeout", str(WAIT_TIMEOUT), log=log)
        deadline = time.monotonic() + 180
        while "waiting for run" not in log.read_text():
            assert waiter.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the waiter never said it waits"
            time.sleep(0.05)
        cpu_before, wall_before = cpu_seconds(waiter.pid), time.monotonic()
        os.waitid(os.P_PID, waiter.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc still has its times
        cpu_waiting, wall_waiting = cpu_seconds(waiter.pid) - cpu_before, time.monotonic() - wall_before
        assert waiter.wait() == 1
        output = log.read_text()
        assert f"waiting for run {holder_run} (STARTED since " in output
        assert f"which works on {CONNECTION}; giving up after {WAIT_TIMEOUT:.0f} s" in output
        assert f"pid {holder.pid} on " in output
        assert f"gave up after waiting {WAIT_TIMEOUT:.0f} s (--wait-timeout)" in output
        assert "recovered" not in output, "a paused run is alive: it must not be failed"
        # Behaviour, not speed: Dagster's own wait polls without sleeping (~100 % of a core); this one sleeps.
        assert cpu_waiting < 0.2 * wall_waiting, f"{cpu_waiting:.2f} s CPU in {wall_waiting:.2f} s of waiting"
    finally:
        holder.send_signal(signal.SIGCONT)
    assert holder.wait(300) == 0, (tmp_path / "holder.log").read_text()
    assert run_cli_process(env, mappings, *window, log=tmp_path / "after.log") == 0
    _posted_once(sandbox, window)
