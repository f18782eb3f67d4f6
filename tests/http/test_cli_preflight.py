"""`preflight`: the first run against the real services, rehearsed against the sandbox over real HTTP.

Read-only it must pass in both of Exact's EntryID modes and post nothing; `--write-test` must record whether Exact
kept the client's EntryID (False when the sandbox assigns its own, True when it keeps ours), leave no test entry
behind and say so; a failing assumption must show FAILED with advice and exit 1. No secret may be printed.
"""

from __future__ import annotations

import io
import json

import pytest

from expensify_exact.cli.commands.preflight import KEEPS_CLIENT_ENTRY_ID
from expensify_exact.core.connections import VaultTokenStore
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from expensify_exact_sandbox import seed
from tests.conftest import write_mappings
from tests.factories import run_cli

CONNECTION = "vermeerhals-nl"
TEST_DIVISION = seed.SECOND_DIVISION
MODES = {"strict": False, "lenient": True}  # sandbox knob keep_client_entry_ids
READ_CHECKS = {"exact_tokens", "exact_division", "exact_rate_headers", "exact_read_gl_accounts",
               "exact_read_cost_centers", "exact_read_cost_units", "exact_read_journals", "exact_read_vat_codes",
               "exact_read_financial_periods", "exact_read_lines_by_entry_id", "exact_read_entry_by_entry_id",
               "exact_read_settlement_lookup", "exact_read_lines_by_report", "expensify_credentials",
               f"expensify_policy_{seed.POLICY_ID}", "expensify_template"}
WRITE_CHECKS = {"write_test_post", KEEPS_CLIENT_ENTRY_ID, "write_test_find_by_entry_id",
                "write_test_find_by_report_key", "write_test_delete"}
SECRETS = (seed.EXACT_CLIENT_SECRET, seed.EXPENSIFY_PARTNER_USER_SECRET)


def _preflight(capsys, mappings, state_url, *args) -> tuple[int, dict, str]:
    assert run_cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    capsys.readouterr()
    code = run_cli(mappings, state_url, "preflight", "--connection", CONNECTION, "--json", *args)
    out, err = capsys.readouterr()
    store = StateStore(state_url)
    tokens = VaultTokenStore(store, CredentialVault(store)).load(CONNECTION)
    for secret in (*SECRETS, tokens.access_token, tokens.refresh_token):
        assert secret not in out and secret not in err
    return code, json.loads(out), err


def _by_check(report: dict) -> dict[str, dict]:
    return {v["check"]: v for v in report["verdicts"]}


@pytest.mark.parametrize("mode", MODES)
def test_read_only_preflight_passes_in_both_entry_id_modes_and_posts_nothing(capsys, sandbox, sandbox_mappings,
                                                                            state_url, mode):
    sandbox.exact.set_knobs(keep_client_entry_ids=MODES[mode])
    code, report, _ = _preflight(capsys, sandbox_mappings, state_url)
    verdicts = _by_check(report)
    assert set(verdicts) == READ_CHECKS
    assert {c: v["status"] for c, v in verdicts.items() if v["status"] != "OK"} == {}
    assert code == 0 and report["ok"] is True
    assert "new refresh token" in verdicts["exact_tokens"]["detail"]
    assert "0 reports, end trailer present" in verdicts["expensify_template"]["detail"]
    assert sandbox.exact.stats["posts"]["attempted"] == 0
    assert StateStore(state_url).connection_fact_get(CONNECTION, KEEPS_CLIENT_ENTRY_ID) is None
    assert report[KEEPS_CLIENT_ENTRY_ID] is None


@pytest.mark.parametrize("mode", MODES)
def test_write_test_records_whether_exact_keeps_the_client_entry_id_and_leaves_nothing_behind(
        capsys, sandbox, sandbox_mappings, state_url, mode):
    keeps = MODES[mode]
    sandbox.exact.set_knobs(keep_client_entry_ids=keeps)
    code, report, _ = _preflight(capsys, sandbox_mappings, state_url, "--write-test", "--division",
                                 str(TEST_DIVISION), "--debit-account", "4510", "--credit-account", "1650", "--yes")
    verdicts = _by_check(report)
    assert set(verdicts) == READ_CHECKS | WRITE_CHECKS
    assert {c: v["status"] for c, v in verdicts.items() if v["status"] != "OK"} == {}
    assert code == 0
    store = StateStore(state_url)
    assert store.connection_fact_get(CONNECTION, KEEPS_CLIENT_ENTRY_ID) is keeps
    assert report[KEEPS_CLIENT_ENTRY_ID] is keeps
    detail = verdicts[KEEPS_CLIENT_ENTRY_ID]["detail"]
    if keeps:
        assert detail.startswith("yes: the echoed EntryID is the one sent")
        assert "by the one sent: the same one" in verdicts["write_test_find_by_entry_id"]["detail"]
    else:
        assert detail.startswith("no: Exact assigned its own EntryID")
        assert "by the one sent: not found" in verdicts["write_test_find_by_entry_id"]["detail"]
    assert f"{KEEPS_CLIENT_ENTRY_ID}={str(keeps).lower()}" in detail
    # One POST, to the test division only, and the entry is gone again.
    assert sandbox.exact.stats["posts"]["created"] == 1
    assert sandbox.exact.ledgers[TEST_DIVISION].entries == {}
    assert sandbox.exact.ledgers[seed.DIVISION].entries == {}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_write_test_without_confirmation_posts_nothing(capsys, sandbox, sandbox_mappings, state_url, monkeypatch):
    write_test = ("preflight", "--connection", CONNECTION, "--write-test", "--division", str(TEST_DIVISION),
                  "--debit-account", "4510", "--credit-account", "1650")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TEST_DIVISION}\n"))  # not a terminal
    assert run_cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    assert run_cli(sandbox_mappings, state_url, *write_test) == 2
    assert "--yes" in capsys.readouterr().err
    # At a terminal, anything but the division number declines.
    monkeypatch.setattr("sys.stdin", _Terminal("yes\n"))
    assert run_cli(sandbox_mappings, state_url, *write_test, "--json") == 2
    out, err = capsys.readouterr()
    assert out == "" and f"to Exact division {TEST_DIVISION} and deletes it again" in err
    assert sandbox.exact.stats["posts"]["attempted"] == 0
    monkeypatch.setattr("sys.stdin", _Terminal(f"{TEST_DIVISION}\n"))
    assert run_cli(sandbox_mappings, state_url, *write_test, "--json") == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True  # the prompt stayed out of the JSON
    assert sandbox.exact.stats["posts"]["created"] == 1
    # A write test needs its division named: the connection's own is never assumed.
    assert run_cli(sandbox_mappings, state_url, "preflight", "--connection", CONNECTION, "--write-test",
                   "--debit-account", "4510", "--credit-account", "1650", "--yes") == 2


def test_an_unreachable_division_fails_with_advice_and_the_reads_it_blocks_are_unknown(capsys, sandbox,
                                                                                     sandbox_mappings, state_url):
    sandbox.exact.set_knobs(accessible_divisions={TEST_DIVISION}, current_division=TEST_DIVISION)
    code, report, _ = _preflight(capsys, sandbox_mappings, state_url)
    verdicts = _by_check(report)
    assert code == 1 and report["ok"] is False
    division = verdicts["exact_division"]
    assert division["status"] == "FAILED" and str(TEST_DIVISION) in division["detail"]
    assert "authorize" in division["advice"]
    assert verdicts["exact_read_gl_accounts"]["status"] == "UNKNOWN"
    assert verdicts["expensify_template"]["status"] == "OK"


def test_an_expensify_export_that_never_completes_fails_with_advice(capsys, sandbox, tmp_path, state_url):
    # The download keeps answering "not ready" (sandbox fault switch) past the poll timeout.
    mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2,
                              expensify__poll_timeout_seconds=1.0)
    sandbox.faults.arm("expensify.download", "not_ready", times=50)
    code, report, _ = _preflight(capsys, mappings, state_url)
    verdict = _by_check(report)["expensify_template"]
    assert code == 1
    assert verdict["status"] == "FAILED" and "not ready" in verdict["detail"]
    assert "complete file" in verdict["advice"]


def test_text_output_names_each_verdict_and_the_totals(capsys, sandbox, sandbox_mappings, state_url):
    assert run_cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    capsys.readouterr()
    assert run_cli(sandbox_mappings, state_url, "preflight", "--connection", CONNECTION) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"{len(READ_CHECKS)} OK, 0 FAILED, 0 UNKNOWN"
    assert "OK       Exact division 123456 is reachable" in out


def test_a_second_preflight_inside_exacts_570_second_floor_knows_the_rotation_it_saw(capsys, sandbox,
                                                                                   sandbox_mappings, state_url):
    code, _, _ = _preflight(capsys, sandbox_mappings, state_url)
    refreshes = sandbox.exact.stats["token"]["refreshes"]
    code_again = run_cli(sandbox_mappings, state_url, "preflight", "--connection", CONNECTION, "--json")
    again = _by_check(json.loads(capsys.readouterr().out))["exact_tokens"]
    assert (code, code_again, again["status"]) == (0, 0, "OK")
    assert "came from a rotation preflight saw" in again["detail"]
    assert sandbox.exact.stats["token"]["refreshes"] == refreshes  # nothing refreshed inside the floor


def test_a_token_pair_another_command_fetched_is_not_refreshed_inside_the_floor(capsys, sandbox, sandbox_mappings,
                                                                               state_url):
    assert run_cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    assert run_cli(sandbox_mappings, state_url, "check") == 1  # the demo's two seeded problems; it refreshed
    capsys.readouterr()
    refreshes = sandbox.exact.stats["token"]["refreshes"]
    assert run_cli(sandbox_mappings, state_url, "preflight", "--connection", CONNECTION, "--json") == 1
    tokens = _by_check(json.loads(capsys.readouterr().out))["exact_tokens"]
    assert tokens["status"] == "UNKNOWN" and "run preflight again after" in tokens["advice"]
    assert sandbox.exact.stats["token"]["refreshes"] == refreshes
