"""A real `dagster-daemon` evaluates the alert sensors of the code location: a refresh token staged as idle for 26
days reaches the chat webhook on the daemon's first tick, once, with no test code in between."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.cli.main import main
from expensify_exact.core.connections import VaultTokenStore
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from tests.conftest import write_mappings
from tests.receivers import WebhookReceiver

CONNECTION = "vermeerhals-nl"


@pytest.mark.slow
def test_the_daemon_ticks_the_idle_token_sensor_and_the_alert_arrives_once(tmp_path, state_url, monkeypatch):
    mappings = write_mappings(tmp_path / "mappings", notify={"alerts": {"webhook_format": "slack"}})
    with WebhookReceiver() as webhook:
        args = ["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection", CONNECTION]
        monkeypatch.setattr("sys.stdin", io.StringIO(webhook.url + "\n"))
        assert main([*args, "--stdin", "alert_webhook_url"]) == 0
        store = StateStore(state_url)
        renewed = datetime.now(timezone.utc) - timedelta(days=26)
        VaultTokenStore(store, CredentialVault(store)).save(CONNECTION, ExactTokens(
            access_token="a", refresh_token="r", issued_at=renewed, access_expires_at=renewed + timedelta(minutes=10)))

        home = tmp_path / "dagster_home"
        home.mkdir()
        env = {**os.environ, "DAGSTER_HOME": str(home), "EXPENSIFY_EXACT_MAPPINGS": str(mappings),
               "EXPENSIFY_EXACT_STATE_URL": state_url}
        daemon = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-m", "expensify_exact.definitions"],
            cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        try:
            give_up = time.monotonic() + 300  # only so a broken daemon cannot hang the suite
            while not webhook.posts and time.monotonic() < give_up and daemon.poll() is None:
                time.sleep(1)
            time.sleep(5)  # anything the same tick might still send
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)  # the daemon and the code server it started
            _, err = daemon.communicate(timeout=60)
    idle = [p["json"]["text"] for p in webhook.posts if "refresh token idle" in p["json"]["text"]]
    assert len(idle) == 1, err.decode()[-3000:]
    assert "refresh token idle for 26 days" in idle[0]
    assert [r["key"] for r in store.notifications_sent("token_idle", CONNECTION)] == [
        f"token_idle:{CONNECTION}:{renewed.isoformat()}|webhook"]
