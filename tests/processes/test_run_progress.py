"""`expensify-exact run` over 30 days as a user runs it: in a pseudo-terminal it shows its progress live (days and
reports done of the total, posted/quarantined so far, and a wait for Exact's minute budget); with `--json` and no terminal, stdout is one JSON object and
a plain line per day goes to stderr. `quarantine replay` shows the same display."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timedelta, timezone

import pytest

from expensify_exact.cli.main import main
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from tests.conftest import write_mappings

CONNECTION = "vermeerhals-nl"
WAIT_SECONDS = 45  # longer than the CLI takes to start, so the run meets the used-up minute
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _run_in_pty(argv: list[str], env: dict, deadline_seconds: float = 600) -> tuple[int, str]:
    """Run argv with a pseudo-terminal (160 columns) as stdin, stdout and stderr; returns its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = bytearray()
    give_up = time.monotonic() + deadline_seconds  # only so a hang cannot stall the suite; not an assertion
    try:
        while time.monotonic() < give_up:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), output.decode("utf-8", "replace")


@pytest.mark.slow
def test_run_over_30_days_shows_progress_on_a_terminal_and_keeps_json_output_one_object(
        tmp_path, sandbox, state_url):
    sandbox.expensify.set_knobs(rate_limiting=False)
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2)
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection", CONNECTION,
                 "--from-env"]) == 0
    # Another run has just used up this minute's Exact calls: this run must wait for the reset, and say so.
    now = datetime.now(timezone.utc)
    StateStore(state_url).rate_limits_put(f"exact:division:{S.DIVISION}", {
        "observed_at": now, "remaining_minutely": 0, "minutely_limit": 60,
        "minutely_resets_at": now + timedelta(seconds=WAIT_SECONDS), "remaining_daily": None, "daily_limit": None,
        "daily_resets_at": None})
    today = sandbox.seed.today
    start, end = (today - timedelta(days=30)).isoformat(), (today - timedelta(days=1)).isoformat()
    argv = [sys.executable, "-m", "expensify_exact.cli.main", "--mappings", str(mappings), "--state-url", state_url,
            "run", "--start", start, "--end", end]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "TERM": "xterm-256color"}

    code, raw = _run_in_pty(argv, env)
    screen = ANSI.sub("", raw).replace("\r", "\n")
    assert code == 0, screen[-3000:]
    summary = re.search(r"posted: (\d+)  already posted: (\d+)  quarantined: (\d+)", screen)
    posted, quarantined = int(summary.group(1)), int(summary.group(3))
    assert posted > 0 and quarantined == 2  # the demo's two seeded problems
    # The live display: the days bar and the reports bar with what happened so far, on their way and at the end.
    days = [int(n) for n in re.findall(r"days\s.*?\b(\d+)/30\b", screen)]
    reports = re.findall(r"reports\s.*?\b(\d+)/(\d+)\s+posted (\d+), quarantined (\d+)", screen)
    assert days and max(days) == 30
    assert reports[-1] == (str(posted + quarantined), str(posted + quarantined), str(posted), str(quarantined))
    assert any(0 < n < 30 for n in days), "no intermediate day count was shown"
    wait = re.search(r"waiting (\d+) s for Exact Online: minute budget used up \(60 calls a minute per division\)",
                     screen)
    assert wait and 0 < int(wait.group(1)) <= WAIT_SECONDS + 1
    assert "exporting 30 day(s) of approved reports from Expensify" in screen
    assert "\x1b[" in raw  # drawn by rich on the terminal, not printed as plain lines

    # Not a terminal, --json: stdout is exactly one JSON object; one plain line per day goes to stderr.
    piped = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0, piped.stderr[-3000:]
    result = json.loads(piped.stdout)
    assert result["start"] == start and result["end"] == end
    assert len(result["connections"][CONNECTION]["skipped_already_posted"]) == posted
    day_lines = re.findall(r"^\d\d:\d\d:\d\d (\d{4}-\d\d-\d\d) vermeerhals-nl: posted 0, quarantined (\d+), "
                           r"already posted (\d+) — day (\d+)/30", piped.stderr, flags=re.M)
    assert [int(d[3]) for d in day_lines] == list(range(1, 31))
    assert sum(int(d[2]) for d in day_lines) == posted and sum(int(d[1]) for d in day_lines) == quarantined
    assert "\x1b[" not in piped.stderr + piped.stdout

    # `quarantine replay` on the terminal: Gifts is mapped now, so one of the two items posts, the other stays.
    with (mappings / "categories.yaml").open("a") as categories:
        categories.write('  - {category: Gifts, gl_account: "4520"}\n')
    code, raw = _run_in_pty([*argv[:argv.index("run")], "quarantine", "replay", "--connection", CONNECTION], env)
    screen = ANSI.sub("", raw).replace("\r", "\n")
    assert code == 5, screen[-3000:]  # ran, and a report stays quarantined
    assert re.search(r"reports\s.*?\b2/2\s+posted 1, quarantined 1\b", screen)
    assert "re-validating 2 quarantined report(s) against fresh Exact dimensions" in screen
