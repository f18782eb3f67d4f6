"""Helpers for tests that drive the real `expensify-exact` CLI as separate processes on an embedded (SQLite)
Dagster instance, against the sandbox over HTTP: the environment, starting a command, its CPU time, the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from expensify_exact.store import process_stat

CONNECTION = "vermeerhals-nl"


def cli_env(home: Path) -> dict[str, str]:
    """The test's key and a $DAGSTER_HOME of its own; the state DB defaults to a file inside that home."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXPENSIFY_EXACT_STATE_URL", "DAGSTER_HOME")}
    return env | {"DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def start_cli(env: dict[str, str], mappings: Path, *args: str, log: Path) -> subprocess.Popen:
    """`expensify-exact --mappings M ARGS…` as its own process, stdout and stderr into `log`."""
    return subprocess.Popen([sys.executable, "-m", "expensify_exact.cli.main", "--mappings", str(mappings), *args],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_cli_process(env: dict[str, str], mappings: Path, *args: str, log: Path, timeout: float = 300) -> int:
    process = start_cli(env, mappings, *args, log=log)
    return process.wait(timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live (or not yet reaped) process, from /proc/<pid>/stat."""
    fields = process_stat(pid)
    assert fields is not None, f"no /proc/{pid}/stat"
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def state_url(home: Path) -> str:
    return f"sqlite:///{home / 'expensify_exact_state.db'}"


def ledger(home: Path) -> list[dict]:
    """The posted ledger as plain rows (read with its own short-lived connection, never holding a lock)."""
    path = home / "expensify_exact_state.db"
    if not path.exists():
        return []
    engine = sa.create_engine(state_url(home), connect_args={"timeout": 30})
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("ee_intents"):
                return []
            return [dict(r._mapping) for r in conn.execute(sa.text(
                "SELECT report_id, status, run_id, intent_at, posted_at FROM ee_intents WHERE stands"))]
    finally:
        engine.dispose()
