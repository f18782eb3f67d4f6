"""Replay against the sandbox over real HTTP: fixing the cause in Exact lets the quarantined report through, once.

The demo data quarantines the Eindhoven report (cost center EHV does not exist in Exact) and the Gifts report
(no mapping). Creating EHV in Exact and replaying must post the Eindhoven report exactly once, leave Gifts
quarantined with a refreshed reason, and leave the whole story in the audit log and its CSV export.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from datetime import timedelta

import pytest

from expensify_exact.core.replay import replay_lock
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from tests.conftest import write_mappings
from tests.crash.driver import post_window, report_of_entry
from tests.factories import run_cli as _cli
from tests.factories import state_rows

CONNECTION = "vermeerhals-nl"
GIFTS, EINDHOVEN = S._report_id(101), S._report_id(102)


@pytest.fixture
def quarantined(sandbox, sandbox_mappings, state_url):
    """The demo window posted once: everything posted except the two seeded problems."""
    # Rate limits are not on trial here (tests/http/test_*_client.py): without them each test takes seconds.
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=10_000)
    assert _cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    today = sandbox.seed.today
    runs = post_window(str(sandbox_mappings), state_url, today - timedelta(days=31), today - timedelta(days=1))
    outcomes = {o.report_id: o for o in runs[CONNECTION].outcomes}
    assert outcomes[EINDHOVEN].reason_codes == ["UNKNOWN_COST_CENTER"]
    assert outcomes[GIFTS].reason_codes == ["UNMAPPED_CATEGORY"]
    store = StateStore(state_url)
    yield store
    store.dispose()


def _entries_of(sandbox, report_id: str) -> list[dict]:
    return [e for e in sandbox.exact.entries(S.DIVISION) if report_of_entry(e) == report_id]


def test_creating_the_missing_cost_center_and_replaying_posts_the_eindhoven_report_once(
        sandbox, sandbox_mappings, state_url, quarantined, tmp_path, capsys):
    store = quarantined
    posted_before = len(sandbox.exact.entries(S.DIVISION))

    # Before the fix a replay changes nothing: both stay, exit 5 says so.
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay") == 5
    assert len(sandbox.exact.entries(S.DIVISION)) == posted_before

    sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven")
    capsys.readouterr()
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay") == 5  # Gifts still has no mapping
    out = capsys.readouterr().out
    assert f"posted         {EINDHOVEN}" in out and f"quarantined    {GIFTS}" in out

    entries = _entries_of(sandbox, EINDHOVEN)
    assert len(entries) == 1
    ledger = store.ledger_get(CONNECTION, EINDHOVEN)
    assert (ledger.status, ledger.entry_id, ledger.entry_number) == \
        ("posted", entries[0]["EntryID"], entries[0]["EntryNumber"])
    assert {line.get("CostCenter") for line in entries[0]["lines"]} >= {"EHV"}
    assert store.quarantine_get(CONNECTION, EINDHOVEN).status == "replayed"
    gifts = store.quarantine_get(CONNECTION, GIFTS)
    assert gifts.status == "open" and {r["code"] for r in gifts.reasons} == {"UNMAPPED_CATEGORY"}

    # A second replay and a rerun of the whole window post nothing again.
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay", "--report", EINDHOVEN) == 0
    today = sandbox.seed.today
    post_window(str(sandbox_mappings), state_url, today - timedelta(days=31), today - timedelta(days=1))
    assert len(_entries_of(sandbox, EINDHOVEN)) == 1
    assert len(sandbox.exact.entries(S.DIVISION)) == posted_before + 1

    # The audit log tells the story in order, and `audit export` writes it as CSV.
    events = [r["event"] for r in store.audit_rows(CONNECTION, report_id=EINDHOVEN)]
    story = ["quarantined", "replayed", "posted"]
    positions = [events.index("quarantined")]
    positions.append(events.index("replayed", positions[-1]))
    positions.append(events.index("posted", positions[-1]))
    assert positions == sorted(positions), events
    replayed = [r for r in store.audit_rows(CONNECTION, report_id=EINDHOVEN) if r["event"] == "replayed"]
    details = [json.loads(r["detail"]) for r in replayed]
    assert details[0]["before"][0]["code"] == "UNKNOWN_COST_CENTER"
    assert details[0]["now"] == {"fails": ["UNKNOWN_COST_CENTER"]}  # the replay before EHV existed
    assert details[-1]["now"] == "passes validation" and details[-1]["dimensions_fingerprint"]

    target = tmp_path / "audit.csv"
    assert _cli(sandbox_mappings, state_url, "audit", "export", "--csv", str(target), "--connection",
                CONNECTION, "--since", (today - timedelta(days=1)).isoformat()) == 0
    with target.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["report_id"] == EINDHOVEN]
    exported = [r["event"] for r in rows]
    assert [e for e in exported if e in story][:1] == ["quarantined"]
    assert "posted" in exported[exported.index("replayed"):]
    posted_row = next(r for r in rows if r["event"] == "posted")
    assert posted_row["entry_number"] == str(entries[0]["EntryNumber"])
    assert set(posted_row["transaction_ids"].split()) == set(ledger.transaction_ids)


def test_dry_run_replay_shows_each_verdict_and_writes_nothing_anywhere(
        sandbox, sandbox_mappings, state_url, quarantined, capsys):
    store = quarantined
    sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven")
    before, state_before = len(sandbox.exact.entries(S.DIVISION)), state_rows(state_url)
    capsys.readouterr()
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"would_post     {EINDHOVEN} passes now: would be posted as EntryID " in out
    assert f"quarantined    {GIFTS} still fails: UNMAPPED_CATEGORY" in out
    assert len(sandbox.exact.entries(S.DIVISION)) == before
    # No `replayed` audit, no quarantine change, no lock row, no rate-limit record: the state DB is as it was.
    assert state_rows(state_url) == state_before
    assert store.ledger_get(CONNECTION, EINDHOVEN) is None
    assert store.quarantine_get(CONNECTION, EINDHOVEN).status == "open"

    # What the dry run promised is what the replay does.
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay") == 5
    assert store.ledger_get(CONNECTION, EINDHOVEN).status == "posted"
    assert store.quarantine_get(CONNECTION, GIFTS).status == "open"


def test_a_replay_waits_for_another_replay_of_its_connection_names_it_and_gives_up(
        sandbox, sandbox_mappings, state_url, quarantined, capsys):
    store = quarantined
    sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven")
    capsys.readouterr()
    with store.lock(replay_lock(CONNECTION), ttl_seconds=60, wait_seconds=1):  # another replay, alive, under way
        assert _cli(sandbox_mappings, state_url, "quarantine", "replay", "--wait-timeout", "1") == 1
    err = capsys.readouterr().err
    assert (f"waiting for the replay lock of {CONNECTION}: pid {os.getpid()} on {socket.gethostname()} holds it "
            f"(another `quarantine replay` or `approve`, or a replay_quarantine run); giving up after 1 s "
            f"(--wait-timeout)") in err
    assert f"{CONNECTION}: not replayed: another replay or approve of it held the replay lock for more than 1 s" in err
    assert _entries_of(sandbox, EINDHOVEN) == [] and store.quarantine_get(CONNECTION, EINDHOVEN).status == "open"

    # Once the other one is done, the replay goes ahead; a dry run never waits (it takes no lock).
    with store.lock(replay_lock(CONNECTION), ttl_seconds=60, wait_seconds=1):
        assert _cli(sandbox_mappings, state_url, "quarantine", "replay", "--dry-run", "--wait-timeout", "1") == 0
    assert "waiting" not in capsys.readouterr().err
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay") == 5  # Gifts still has no mapping
    assert len(_entries_of(sandbox, EINDHOVEN)) == 1


def test_replaying_a_report_no_configured_connection_holds_says_why_and_replays_the_others(
        sandbox, sandbox_mappings, state_url, quarantined, tmp_path, capsys):
    store = quarantined
    sandbox.exact.add_cost_center("EHV", "Kantoor Eindhoven")
    capsys.readouterr()
    assert _cli(sandbox_mappings, state_url, "quarantine", "replay", "--report", "R00NOSUCHONE",
                "--report", EINDHOVEN) == 4
    assert f"no quarantine item for report R00NOSUCHONE in {CONNECTION}: nothing to replay" in capsys.readouterr().err
    assert len(_entries_of(sandbox, EINDHOVEN)) == 1  # the report that is quarantined was replayed all the same

    # The connection renamed in the mappings: its quarantine is still in the state DB, but nothing can replay it.
    renamed = write_mappings(tmp_path / "renamed", sandbox, name="vermeerhals-nl-2")
    assert _cli(renamed, state_url, "quarantine", "replay", "--report", GIFTS) == 4
    assert (f"report {GIFTS} is quarantined in {CONNECTION}, which the mappings no longer configure: add the "
            f"connection back to replay it, or close it with `expensify-exact quarantine resolve {GIFTS} "
            f"--connection {CONNECTION} --reason ...`") in capsys.readouterr().err
    assert store.quarantine_get(CONNECTION, GIFTS).status == "open"
    assert _cli(renamed, state_url, "quarantine", "resolve", GIFTS, "--connection", CONNECTION, "--reason",
                "booked by hand") == 0


def test_resolving_and_ignoring_need_a_reason_and_are_audited(sandbox_mappings, state_url, quarantined, capsys):
    store = quarantined
    with pytest.raises(SystemExit):  # argparse: --reason is required
        _cli(sandbox_mappings, state_url, "quarantine", "ignore", GIFTS)
    assert _cli(sandbox_mappings, state_url, "quarantine", "ignore", GIFTS, "--reason", "client gift, booked by hand") == 0
    assert _cli(sandbox_mappings, state_url, "quarantine", "resolve", GIFTS, "--reason", "again") == 4  # not open
    assert _cli(sandbox_mappings, state_url, "quarantine", "resolve", "R00NOSUCHONE", "--reason", "x") == 4
    item = store.quarantine_get(CONNECTION, GIFTS)
    assert (item.status, item.resolution_note) == ("ignored", "client gift, booked by hand")
    audit = [r for r in store.audit_rows(CONNECTION, report_id=GIFTS) if r["event"] == "ignored"]
    assert json.loads(audit[0]["detail"])["reason"] == "client gift, booked by hand"

    capsys.readouterr()
    assert _cli(sandbox_mappings, state_url, "quarantine", "list", "--json") == 0
    assert [i["report_id"] for i in json.loads(capsys.readouterr().out)] == [EINDHOVEN]
    assert _cli(sandbox_mappings, state_url, "quarantine", "list", "--status", "ignored") == 0
    assert GIFTS in capsys.readouterr().out
    assert _cli(sandbox_mappings, state_url, "quarantine", "show", EINDHOVEN) == 0
    shown = capsys.readouterr().out
    assert "UNKNOWN_COST_CENTER" in shown and "fix: Create the cost center in Exact" in shown
