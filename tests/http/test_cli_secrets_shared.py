"""Two customers on one Expensify partner login, through the CLI against the sandbox: the login is stored once
(`secrets set --credential`), `check` reads both customers' policies with it and reports it missing once, one export
job serves both customers' policies, and removing a customer's connection keeps its ledger, quarantine and audit.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import yaml

from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.core import connections
from expensify_exact.core.connections import build_exact_client, build_expensify_client
from expensify_exact.core.exports import by_credential, split_by_policy
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact.core.posting import post_drafts
from expensify_exact.core.snapshots import fetch_dimensions
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.expensify_app import PERSONAL_POLICY_ID
from tests.conftest import write_mappings

NL, BE, CREDENTIAL = "vermeerhals-nl", "vermeerhals-be", "firm"
BE_POLICY = "BE00000000000001"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")


@pytest.fixture(autouse=True)
def _sandbox_time(sandbox, monkeypatch):
    """The connector's clients read the sandbox's clock, so waiting for Expensify's window moves it, not the test."""
    monkeypatch.setattr(connections, "SystemClock", lambda: sandbox.clock)


def _cli(capsys, mappings, state_url, *args) -> tuple[int, str, str]:
    code = main(["--mappings", str(mappings), "--state-url", state_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _two_customers(tmp_path, sandbox, be_policy: str):
    """The demo connection and a Belgian customer on the second division, both on Expensify credential `firm`."""
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2,
                              expensify__credential=CREDENTIAL)
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    belgian = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
    belgian["name"] = BE
    belgian["expensify"]["policy_ids"] = [be_policy]
    belgian["expensify"].pop("card_domain", None)
    belgian["exact"]["division"] = S.SECOND_DIVISION
    document["connections"].append(belgian)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def _store_exact_secrets(capsys, mappings, state_url, sandbox, monkeypatch) -> None:
    """Each connection's Exact secrets; the Belgian one gets a consent of its own (a refresh token is one chain's)."""
    for name in (NL, BE):
        code, _, err = _cli(capsys, mappings, state_url, "secrets", "set", "--connection", name, "--from-env")
        assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO(sandbox.exact.auth.issue_consent(refreshable_now=True)
                                                 ["refresh_token"] + "\n"))
    assert _cli(capsys, mappings, state_url, "secrets", "set", "--connection", BE, "--stdin",
                "exact_refresh_token")[0] == 0


def test_a_shared_login_is_stored_once_and_check_reads_both_customers_with_it(capsys, tmp_path, sandbox, state_url,
                                                                               monkeypatch):
    mappings = _two_customers(tmp_path, sandbox, PERSONAL_POLICY_ID)  # a second policy the sandbox's login sees
    code, out, err = _cli(capsys, mappings, state_url, "secrets", "set", "--connection", NL, "--from-env")
    assert code == 0
    # The Exact secrets are the connection's; the partner login in the environment is left for the credential.
    assert out == (f"stored 4 secret(s) for {NL}: exact_client_id, exact_client_secret, exact_webhook_secret, "
                   f"exact_refresh_token\n")
    assert "expensify_partner" not in out
    assert (f"the Expensify partner login of {NL} is credential {CREDENTIAL} (connections {NL}, {BE}), kept apart "
            f"from the connection's secrets: not stored yet: run `expensify-exact secrets set --credential "
            f"{CREDENTIAL} --from-env`") in err
    _store_exact_secrets(capsys, mappings, state_url, sandbox, monkeypatch)
    # Asked for on the connection, a part of the login is refused with where it goes.
    monkeypatch.setattr("sys.stdin", io.StringIO("someone\n"))
    code, _, err = _cli(capsys, mappings, state_url, "secrets", "set", "--connection", BE, "--stdin",
                        "expensify_partner_user_id")
    assert code == 2 and f"--credential {CREDENTIAL}" in err

    # Missing, the login is one problem naming both customers; their Exact side is still checked.
    code, out, _ = _cli(capsys, mappings, state_url, "check")
    missing = [line for line in out.splitlines() if "MISSING_EXPENSIFY_LOGIN" in line]
    assert code == 1
    assert missing == [f"Expensify credential {CREDENTIAL}: error: MISSING_EXPENSIFY_LOGIN: the Expensify partner "
                       f"login of Expensify credential {CREDENTIAL} (connections {NL}, {BE}) is not stored, so no "
                       f"policy can be read; run `expensify-exact secrets set --credential {CREDENTIAL} --from-env` "
                       f"[{NL}, {BE}]"]
    assert "UNREACHABLE" not in out and "UNKNOWN_COST_CENTER" in out  # Exact was read for both
    assert "UNMAPPED_CATEGORY" not in out  # Expensify was not
    code, out, _ = _cli(capsys, mappings, state_url, "preflight", "--connection", BE, "--json")
    verdict = next(v for v in json.loads(out)["verdicts"] if v["check"] == "expensify_credentials")
    assert code == 1 and verdict["status"] == "FAILED"
    assert verdict["advice"] == (f"store them: `expensify-exact secrets set --credential {CREDENTIAL} --from-env` "
                                 f"(credential {CREDENTIAL}, also used by {NL})")

    assert _cli(capsys, mappings, state_url, "secrets", "set", "--credential", "nobody", "--from-env")[0] == 2
    code, out, _ = _cli(capsys, mappings, state_url, "secrets", "set", "--credential", CREDENTIAL, "--from-env")
    assert code == 0
    assert out == (f"stored 2 secret(s) for Expensify credential {CREDENTIAL} (connections {NL}, {BE}): "
                   f"expensify_partner_user_id, expensify_partner_user_secret\n")
    code, out, _ = _cli(capsys, mappings, state_url, "secrets", "list")
    scopes = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert {(CREDENTIAL, "expensify_partner_user_id"), (CREDENTIAL, "expensify_partner_user_secret")} <= scopes
    assert not any(scope in (NL, BE) and name.startswith("expensify_") for scope, name in scopes)

    before = sandbox.expensify.stats["requests"]
    code, out, _ = _cli(capsys, mappings, state_url, "check", "--json")
    findings = {(f["code"], f["connection"]) for f in json.loads(out)["findings"]}
    assert findings == {("UNKNOWN_COST_CENTER", NL), ("UNMAPPED_CATEGORY", NL), ("UNKNOWN_COST_CENTER", BE)}
    # Both customers' policies came in one call under the one login, counted in the credential's window.
    assert sandbox.expensify.stats["requests"] - before == 1
    assert set(sandbox.expensify.stats["max_in_10s"]) == {S.EXPENSIFY_PARTNER_USER_ID}
    assert len(StateStore(state_url).request_log_since(f"expensify:{CREDENTIAL}", datetime(2000, 1, 1,
                                                                                           tzinfo=timezone.utc))) == 1


def _post(mappings, state_url, sandbox, day) -> dict[str, object]:
    """What the main job does for `day`, in plain Python: per credential one export over all its connections'
    policies, split by policy, then each connection's drafts posted to its own division."""
    config = load_project_config(mappings)
    store = StateStore(state_url)
    vault = CredentialVault(store)
    runs = {}
    for group in by_credential(list(config.connections)).values():
        with build_expensify_client(group[0], vault, sandbox.clock, store=store) as expensify:
            reports = expensify.export_reports(day, day, [p for c in group for p in c.expensify.policy_ids],
                                               timezone=group[0].timezone,
                                               source_timezone=group[0].expensify.timestamp_timezone)
        for conn in group:
            with build_exact_client(conn, vault, store, sandbox.clock) as exact:
                drafts = drafts_for_reports(split_by_policy(reports, group)[conn.name], conn, config,
                                            fetch_dimensions(exact), today=day)
                runs[conn.name] = post_drafts(drafts, connection=conn.name, store=store, client=exact,
                                              clock=sandbox.clock, run_id=f"test-{day}")
    store.dispose()
    return runs


def _add(sandbox, policy: str, approved: datetime, category: str, merchant: str) -> str:
    return sandbox.expensify.add_report(
        name=merchant, employee_email="anna.devries@vermeerhals.nl", policy_id=policy, approved=approved,
        submitted=(approved - timedelta(hours=1)).astimezone(timezone.utc).replace(tzinfo=None),
        expenses=[{"merchant": merchant, "category": category, "tag": "Amsterdam:P1001 Rijkswaterstaat",
                   "amount": 4200, "created": (approved.date() - timedelta(days=1)).isoformat()}])


def test_removing_a_customer_keeps_its_ledger_quarantine_and_audit_and_the_other_posts_on(
        capsys, tmp_path, sandbox, state_url, monkeypatch):
    mappings = _two_customers(tmp_path, sandbox, BE_POLICY)
    _store_exact_secrets(capsys, mappings, state_url, sandbox, monkeypatch)
    assert _cli(capsys, mappings, state_url, "secrets", "set", "--credential", CREDENTIAL, "--from-env")[0] == 0
    day = sandbox.clock.now().astimezone(AMSTERDAM).date() - timedelta(days=2)
    noon = datetime.combine(day, time(12), AMSTERDAM)
    dutch = _add(sandbox, S.POLICY_ID, noon, "Travel", "NS Reizigers")
    belgian = _add(sandbox, BE_POLICY, noon, "Travel", "NMBS")
    gift = _add(sandbox, BE_POLICY, noon + timedelta(hours=1), "Gifts", "Neuhaus")  # no GL account: quarantined

    jobs = sandbox.expensify.stats["export_jobs"]
    runs = _post(mappings, state_url, sandbox, day)
    assert sandbox.expensify.stats["export_jobs"] - jobs == 1, "one export job for both customers' policies"
    outcomes = {name: {o.report_id: o.outcome for o in run.outcomes} for name, run in runs.items()}
    assert outcomes[BE] == {belgian: "posted", gift: "quarantined"}
    assert outcomes[NL][dutch] == "posted"
    store = StateStore(state_url)
    before = {"ledger": store.ledger_rows(BE), "audit": store.audit_rows(connection=BE),
              "quarantine": store.quarantine_items(BE, status=None)}
    assert [r.report_id for r in before["ledger"]] == [belgian] and len(before["audit"]) >= 2

    # The Belgian customer leaves: its connection entry is deleted, nothing else.
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    document["connections"] = [c for c in document["connections"] if c["name"] != BE]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    later = _add(sandbox, S.POLICY_ID, noon + timedelta(hours=2), "Hotel", "Hotel Okura")
    runs = _post(mappings, state_url, sandbox, day)
    assert list(runs) == [NL]
    assert {o.report_id: o.outcome for o in runs[NL].outcomes}[later] == "posted"
    assert {o.report_id: o.outcome for o in runs[NL].outcomes}[dutch] == "already_posted"
    assert store.ledger_rows(BE) == before["ledger"]
    assert store.audit_rows(connection=BE) == before["audit"]
    assert store.quarantine_items(BE, status=None) == before["quarantine"]

    # Its history stays readable by name through the commands that read the state DB; the ones that need its
    # configuration say it is no longer configured rather than fail.
    code, out, _ = _cli(capsys, mappings, state_url, "audit", "export", "--csv", "-", "--connection", BE)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["report_id"] for r in rows} >= {belgian, gift} and {r["connection"] for r in rows} == {BE}
    code, out, _ = _cli(capsys, mappings, state_url, "quarantine", "list", "--connection", BE)
    assert code == 0 and gift in out and "UNMAPPED_CATEGORY" in out
    code, out, _ = _cli(capsys, mappings, state_url, "quarantine", "show", gift)
    assert code == 0 and f"report {gift} ({BE})" in out
    for command in (["status", "--connection", BE], ["check", "--connection", BE]):
        code, out, err = _cli(capsys, mappings, state_url, *command)
        assert code == 3 and f"no connection named {BE!r}" in out + err, command
    # Its open item can still be closed, on the record.
    code, out, _ = _cli(capsys, mappings, state_url, "quarantine", "ignore", gift, "--reason", "customer left")
    assert code == 0 and store.quarantine_get(BE, gift).status == "ignored"
    assert store.audit_rows(connection=BE)[:len(before["audit"])] == before["audit"]
    store.dispose()
