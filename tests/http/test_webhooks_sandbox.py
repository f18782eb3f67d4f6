"""The webhook receiver over real HTTP, fed by the Exact sandbox's own signed notifications.

The sandbox signs each notification with the demo app's webhook secret and POSTs it to its `webhook_targets`
(exact-online.md §8). Posting an entry makes it send an Update; deleting one, as a bookkeeper would, a Delete.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date

import httpx
import pytest

from expensify_exact.cli.main import main
from expensify_exact.clock import SystemClock
from expensify_exact.core.journal import build_journal_drafts
from expensify_exact.core.posting import post_drafts
from expensify_exact.core.webhooks import (
    EVENT_POSTED_ENTRY_DELETED,
    EVENT_RECEIVED,
    EXACT_WEBHOOK_SECRET,
    WebhookProcessor,
    WebhookServer,
    vault_secrets,
    webhook_app,
    webhook_events_after,
)
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox import seed
from tests.conftest import REPO
from tests.factories import expense_line, lines, seed_dimensions

CONNECTION = "vermeerhals-nl"


@pytest.fixture
def connector(sandbox_mappings, state_url):
    assert main(["--mappings", str(sandbox_mappings), "--state-url", state_url,
                 "secrets", "set", "--connection", CONNECTION, "--from-env"]) == 0
    return ConnectorResource(mappings_dir=str(sandbox_mappings), state_url=state_url)


@pytest.fixture
def receiver(connector):
    processor = WebhookProcessor(connector.project(), connector.store(), vault_secrets(connector))
    with WebhookServer(webhook_app(processor)) as server:
        yield server


def post_one_report(connector, report_id="R00HOOK00001") -> str:
    """Post one report to the sandbox through the real client; returns its EntryID."""
    project = connector.project()
    conn = project.connection(CONNECTION)
    drafts = build_journal_drafts(lines(expense_line(report_id=report_id, transaction_id="7001")), conn, project,
                                  seed_dimensions(), run_date=date(2026, 11, 25))
    with connector.exact_client(conn) as client:
        run = post_drafts(drafts, connection=CONNECTION, store=connector.store(), client=client, clock=SystemClock())
    [outcome] = run.outcomes
    assert outcome.outcome == "posted", outcome
    return outcome.entry_id


def delivered(sandbox, count: int, timeout: float = 10.0) -> list[dict]:
    """The sandbox's webhook records once the first `count` have a delivery outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = sandbox.exact.webhooks
        if len(records) >= count and all(r["deliveries"] for r in records[:count]):
            return records
        time.sleep(0.05)
    raise AssertionError(f"the sandbox did not deliver {count} webhook(s): {sandbox.exact.webhooks}")


def test_a_correctly_signed_notification_from_the_sandbox_is_accepted_and_recorded(sandbox, connector, receiver):
    sandbox.exact.set_knobs(webhook_targets=[receiver.url])
    entry_id = post_one_report(connector)
    [record] = delivered(sandbox, 1)
    assert record["deliveries"] == [{"url": receiver.url, "status": 200}]
    [event] = webhook_events_after(connector.store(), 0)
    assert event["event"] == EVENT_RECEIVED and event["connection"] == CONNECTION
    assert event["detail"]["key"] == entry_id and event["detail"]["division"] == seed.DIVISION


def test_deleting_a_posted_entry_in_exact_is_flagged_with_its_report(sandbox, connector, receiver):
    sandbox.exact.set_knobs(webhook_targets=[receiver.url])
    entry_id = post_one_report(connector, "R00HOOK00002")
    sandbox.exact.delete_entry(entry_id)
    records = delivered(sandbox, 2)
    assert [r["content"]["Action"] for r in records] == ["Update", "Delete"]
    flagged = [e for e in webhook_events_after(connector.store(), 0) if e["event"] == EVENT_POSTED_ENTRY_DELETED]
    [event] = flagged
    assert (event["report_id"], event["entry_id"], event["transaction_ids"]) == ("R00HOOK00002", entry_id, ["7001"])
    assert event["entry_number"] == connector.store().ledger_get(CONNECTION, "R00HOOK00002").entry_number


def test_a_receiver_holding_another_secret_refuses_the_sandboxs_notifications(sandbox, connector, receiver):
    connector.vault().set(CONNECTION, EXACT_WEBHOOK_SECRET, "not-the-sandbox-secret")
    sandbox.exact.set_knobs(webhook_targets=[receiver.url])
    post_one_report(connector)
    [record] = delivered(sandbox, 1)
    assert record["deliveries"] == [{"url": receiver.url, "status": 401}]
    assert webhook_events_after(connector.store(), 0) == []


def test_a_tampered_copy_of_a_sandbox_notification_is_refused(sandbox, connector, receiver):
    entry_id = post_one_report(connector)  # no webhook target yet: the notification is only kept by the sandbox
    [record] = sandbox.exact.webhooks
    genuine = record["body"].encode()
    tampered = genuine.replace(b'"Action":"Update"', b'"Action":"Delete"')
    assert tampered != genuine
    answer = httpx.post(receiver.url, content=tampered, headers={"Content-Type": "application/json"})
    assert answer.status_code == 401
    assert seed.EXACT_WEBHOOK_SECRET not in answer.text and record["hash_code"] not in answer.text
    assert webhook_events_after(connector.store(), 0) == []
    # The genuine bytes, replayed by hand, still verify: the refusal was about the change.
    assert httpx.post(receiver.url, content=genuine).status_code == 200
    assert webhook_events_after(connector.store(), 0)[0]["detail"]["key"] == entry_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_receiver_records_a_sandbox_delete_and_stops_on_sigterm(sandbox, connector, sandbox_mappings,
                                                                        state_url):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "expensify_exact.cli.main", "--mappings", str(sandbox_mappings), "--state-url", state_url,
         "webhooks", "serve", "--port", str(port)],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        sandbox.exact.set_knobs(webhook_targets=[f"http://127.0.0.1:{port}/webhooks/exact"])
        entry_id = post_one_report(connector, "R00HOOK00003")
        sandbox.exact.delete_entry(entry_id)
        assert [d["status"] for r in delivered(sandbox, 2) for d in r["deliveries"]] == [200, 200]
        assert main(["--mappings", str(sandbox_mappings), "--state-url", state_url, "webhooks", "list"]) == 0
        events = [e["event"] for e in webhook_events_after(connector.store(), 0)]
        assert events == [EVENT_RECEIVED, EVENT_POSTED_ENTRY_DELETED]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_serve_refuses_to_start_when_no_connection_has_a_webhook_secret(sandbox_mappings, state_url, capsys):
    code = main(["--mappings", str(sandbox_mappings), "--state-url", state_url, "webhooks", "serve", "--port", "0"])
    assert code == 3
    assert "exact_webhook_secret" in capsys.readouterr().err
