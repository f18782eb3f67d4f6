"""Invariant 5: after a full run, no secret appears in logs, the Dagster event log, stored values or the state DB.

The secrets are the ones a real deployment configures: Expensify's partner secret, Exact's client secret, every
refresh and access token the (simulated) Exact issued during the run, and the vault's encryption key.
"""

import logging
import os
from datetime import timedelta
from pathlib import Path

import dagster as dg

from expensify_exact.cli.main import main
from expensify_exact.defs.runs import run_range
from expensify_exact_sandbox import seed


def _secrets(sandbox) -> dict[str, str]:
    issued = {f"exact refresh token {n}": t for n, t in enumerate(sandbox.exact.auth.refresh_tokens)}
    issued |= {f"exact access token {n}": t for n, t in enumerate(sandbox.exact.auth.access_tokens)}
    assert len(issued) >= 3, "the run should have rotated at least one token pair"
    return {"expensify partner secret": seed.EXPENSIFY_PARTNER_USER_SECRET,
            "exact client secret": seed.EXACT_CLIENT_SECRET,
            "vault key": os.environ["EXPENSIFY_EXACT_KEY"], **issued}


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits


def test_no_secret_reaches_logs_event_log_stored_values_or_state_db(sandbox, sandbox_mappings, tmp_path, capfd,
                                                                     caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    args = ["--mappings", str(sandbox_mappings), "--state-url", state_url]
    assert main([*args, "secrets", "set", "--connection", "vermeerhals-nl", "--from-env"]) == 0
    start, end = sandbox.seed.today - timedelta(days=31), sandbox.seed.today - timedelta(days=1)
    # Let the access token expire mid-way so the run also refreshes (and rotates) under the lock.
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        summary = run_range(start, start + timedelta(days=14), mappings_dir=str(sandbox_mappings),
                            state_url=state_url, instance=instance)
        assert summary.success, summary.failure
        sandbox.clock.advance(700)
        summary = run_range(start + timedelta(days=15), end, mappings_dir=str(sandbox_mappings),
                            state_url=state_url, instance=instance)
        assert summary.success, summary.failure
    assert main([*args, "run", "--start", end.isoformat(), "--json"]) == 0
    assert main([*args, "secrets", "list"]) == 0

    out, err = capfd.readouterr()
    log_text = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    leaks = []
    for name, secret in _secrets(sandbox).items():
        for where, text in (("stdout", out), ("stderr", err), ("log records", log_text)):
            if secret in text:
                leaks.append(f"{name} in {where}")
        for hit in _files_containing(tmp_path, secret.encode()):
            leaks.append(f"{name} in {hit}")
    assert leaks == []
    # The search itself must be able to find something: the state DB really holds (encrypted) secrets.
    assert (tmp_path / "state.db").stat().st_size > 0 and any(home.rglob("*.db"))
