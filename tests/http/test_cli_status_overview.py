"""`expensify-exact status` with many connections, as an operator runs it on a real state store: one table worst first
with totals, the rest counted, every row in `--json`, the exit code from what stops runs, details on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.api.http.pacing import RateLimitSnapshot
from expensify_exact.cli.commands.status import OVERVIEW_LINES
from expensify_exact.cli.main import main
from expensify_exact.core.connections import StoredRateLimitBoard, VaultTokenStore
from expensify_exact.core.overview import record_run
from expensify_exact.store import IntentKind, NewIntent, StateStore
from expensify_exact.store.vault import CredentialVault
from tests.conftest import write_mappings

N = OVERVIEW_LINES + 5
NOW = datetime.now(timezone.utc)
YESTERDAY = (NOW.astimezone(ZoneInfo("Europe/Amsterdam")).date() - timedelta(days=1)).isoformat()


def name(i: int) -> str:
    return f"klant-{i:02d}"


def many_connections(target: Path, n: int = N) -> Path:
    mappings = write_mappings(target)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    first = document["connections"][0]
    document["connections"] = [
        {**first, "name": name(i), "expensify": {**first["expensify"], "policy_ids": [f"POLICY{i}"]},
         "exact": {**first["exact"], "division": 300 + i}} for i in range(n)]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def seed(state_url: str, n: int = N) -> None:
    """Every connection ran this morning and posted i % 4 reports for yesterday with fresh tokens; then klant-03's
    run failed, klant-07's token is 27 days old, klant-11 has two reports in quarantine and klant-12 one intent
    whose outcome was never heard."""
    store = StateStore(state_url)
    vault_tokens = VaultTokenStore(store, CredentialVault(store))
    for i in range(n):
        issued = NOW - timedelta(days=27 if i == 7 else 1)
        vault_tokens.save(name(i), ExactTokens("access-secret", "refresh-secret", issued + timedelta(minutes=10),
                                               issued))
        for r in range(i % 4):
            entry = f"{name(i)}-{r}"
            store.intents_write(name(i), f"R{r}", [NewIntent(IntentKind.POST, entry, "h", {}, YESTERDAY, ["t"], 100)],
                                run_id="morning")
            store.intent_mark_posted(name(i), f"R{r}", IntentKind.POST, entry, r + 1)
        StoredRateLimitBoard(store, 300 + i).save(RateLimitSnapshot(NOW, 58, 60, NOW + timedelta(seconds=30),
                                                                    4900 - i, 5000, NOW + timedelta(hours=8)))
        record_run(store, name(i), "morning-run", [YESTERDAY], counts={"posted": i % 4})
    record_run(store, name(3), "retry-run", [YESTERDAY], failed="journal_drafts: ExactError: 403 no access")
    for report in ("Q1", "Q2"):
        store.quarantine_put(name(11), report, partition_date=YESTERDAY, transaction_ids=["t"], content_hash="h",
                             reasons=[{"code": "UNMAPPED_CATEGORY"}])
    store.intents_write(name(12), "P1", [NewIntent(IntentKind.POST, "p1", "h", {}, YESTERDAY, ["t"], 100)],
                        run_id="morning")
    store.dispose()


def status(capsys, mappings: Path, state_url: str, *args: str) -> tuple[int, str]:
    code = main(["--mappings", str(mappings), "--state-url", state_url, "status", *args])
    return code, capsys.readouterr().out


def test_status_shows_the_worst_connections_first_the_rest_counted_and_the_totals(capsys, tmp_path, state_url,
                                                                                 monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no_instance_yet"))
    mappings = many_connections(tmp_path / "mappings")
    seed(state_url)
    code, out = status(capsys, mappings, state_url)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HEALTH", "CONNECTION", "DIVISION"]
    rows = lines[1:1 + OVERVIEW_LINES]
    assert rows[0].startswith("failing") and "klant-03" in rows[0]
    assert "last run failed: journal_drafts: ExactError: 403 no access" in rows[0]
    attention = [line.split()[1] for line in rows if line.startswith("attention")]
    assert sorted(attention) == ["klant-07", "klant-11", "klant-12"]
    assert "2 (UNMAPPED_CATEGORY 2)" in next(line for line in rows if "klant-11" in line)
    assert "27.0 d" in next(line for line in rows if "klant-07" in line)
    assert all(line.startswith("ok") for line in rows[4:])
    assert lines[1 + OVERVIEW_LINES] == "… 5 more: 5 ok (`status --all` lists them, `--json` gives every row)"
    total = lines[2 + OVERVIEW_LINES]
    posted = sum(i % 4 for i in range(N))
    assert total.split()[:4] == ["TOTAL", str(N), "connections", str(posted)]
    assert total.endswith("1 failing, 3 attention, 41 ok; 1 unsettled intent(s), 0 deferred report(s)")
    assert "latest runs of the main job" in out and "no Dagster instance yet" in out
    # What stops runs makes the exit code; open quarantine does not.
    reasons = [line for line in lines if line.startswith("attention: ")]
    assert reasons == ["attention: klant-03: last run failed: journal_drafts: ExactError: 403 no access",
                       "attention: klant-07: Exact refresh token 27 days old, expires unused at 30",
                       "attention: klant-12: 1 posting intent(s) unsettled"]
    # Details are for one connection (or --details); at many connections only the table.
    assert "credentials   present" not in out
    assert "secret" not in out

    code, out = status(capsys, mappings, state_url, "--all")
    assert "more:" not in out and all(name(i) in out for i in range(N))


def test_status_json_gives_every_row_worst_first_with_the_totals(capsys, tmp_path, state_url, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no_instance_yet"))
    mappings = many_connections(tmp_path / "mappings")
    seed(state_url)
    code, out = status(capsys, mappings, state_url, "--json")
    report = json.loads(out)
    assert code == 1 and report["connections"] == {}
    rows = report["overview"]["rows"]
    assert len(rows) == N and [r["health"] for r in rows[:4]] == ["failing", "attention", "attention", "attention"]
    failed = rows[0]
    assert (failed["connection"], failed["last_run"]["run_id"], failed["last_run"]["outcome"]) == (
        "klant-03", "retry-run", "failed")
    by_name = {r["connection"]: r for r in rows}
    assert by_name["klant-05"]["posted_yesterday"] == 1 and by_name["klant-05"]["yesterday"] == YESTERDAY
    assert by_name["klant-05"]["budget"]["remaining_daily"] == 4895
    assert report["overview"]["totals"]["by_health"] == {"ok": 41, "attention": 3, "failing": 1}
    assert report["overview"]["totals"]["quarantine_by_reason"] == {"UNMAPPED_CATEGORY": 2}
    assert "secret" not in out

    code, out = status(capsys, mappings, state_url, "--json", "--details")
    assert set(json.loads(out)["connections"]) == {name(i) for i in range(N)}


def test_status_of_one_connection_shows_its_row_and_its_details(capsys, tmp_path, state_url, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no_instance_yet"))
    mappings = many_connections(tmp_path / "mappings")
    seed(state_url)
    code, out = status(capsys, mappings, state_url, "--connection", "klant-11")
    lines = out.splitlines()
    # Open quarantine needs a look but stops nothing; the API credentials never stored do.
    assert code == 1 and [line for line in lines if line.startswith("attention:")] == [
        "attention: klant-11: missing exact_client_id, exact_client_secret, expensify_partner_user_id, "
        "expensify_partner_user_secret"]
    assert lines[1].startswith("attention") and "klant-11" in lines[1] and lines[2].startswith("TOTAL")
    assert "quarantine    2 open report(s): UNMAPPED_CATEGORY 2" in out
    assert "last run      morning- at" in out and "ok (" in out


def test_status_as_a_process_on_a_real_state_store(tmp_path, state_url):
    mappings = many_connections(tmp_path / "mappings", n=4)
    seed(state_url, n=4)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "no_instance_yet")}
    done = subprocess.run([str(Path(sys.executable).parent / "expensify-exact"), "--mappings", str(mappings),
                           "--state-url", state_url, "status", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    rows = json.loads(done.stdout)["overview"]["rows"]
    assert [(r["connection"], r["health"]) for r in rows] == [
        ("klant-03", "failing"), ("klant-00", "ok"), ("klant-01", "ok"), ("klant-02", "ok")]
