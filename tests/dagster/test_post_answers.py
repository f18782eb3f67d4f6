"""Every answer to a POST has a rule, and one refused report never stops the others: a day of 20 reports through
`expensify-exact run` against the sandbox, in both EntryID modes (exact-online.md §7, §13)."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest

from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings
from tests.crash.driver import many_reports_seed, report_of_entry
from tests.factories import run_cli

CONNECTION = "vermeerhals-nl"
GJE = "generaljournalentry/GeneralJournalEntries"


# Strict (Exact assigns its own EntryIDs) is the default everywhere; the lenient mode runs with the slow proofs.
@pytest.fixture(params=[pytest.param(False, id="exact-assigns-entry-ids"),
                        pytest.param(True, id="exact-keeps-entry-ids", marks=pytest.mark.slow)])
def day_of_20(request, tmp_path, state_url, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    with SandboxServer(seed=many_reports_seed(date.today(), 20, days=1)) as sandbox:
        sandbox.expensify.set_knobs(rate_limiting=False)
        sandbox.exact.set_knobs(minutely_limit=10_000, keep_client_entry_ids=request.param)
        mappings = write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.1)
        assert run_cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
        yield sandbox, mappings, (sandbox.seed.today - timedelta(days=1)).isoformat()


def test_a_400_and_a_500_quarantine_two_reports_with_exacts_words_and_the_other_18_post_once(
        day_of_20, state_url, capsys):
    sandbox, mappings, day = day_of_20
    sandbox.faults.arm("exact.post_entry", "http_400_before_store")
    sandbox.faults.arm("exact.post_entry", "http_500_before_store")

    assert run_cli(mappings, state_url, "run", "--start", day, "--json") == 0
    summary = json.loads(capsys.readouterr().out)

    entries = sandbox.exact.entries(S.DIVISION)
    per_report = [report_of_entry(e) for e in entries]
    assert len(per_report) == len(set(per_report)) == 18
    store = StateStore(state_url)
    try:
        held = store.quarantine_items(CONNECTION)
        ledger = store.ledger_rows(CONNECTION)
    finally:
        store.dispose()
    assert sorted((i.reasons[0]["code"], i.reasons[0]["value"], i.reasons[0]["message"]) for i in held) == [
        ("REJECTED_BY_EXACT", "400", "Error processing request stream. The request body could not be read."),
        ("REJECTED_BY_EXACT", "500", "An error has occurred.")]
    assert {i.report_id for i in held}.isdisjoint(per_report)
    assert {(r.report_id, r.entry_id) for r in ledger} == {(report_of_entry(e), e["EntryID"]) for e in entries}
    assert summary["success"] is True
    assert sorted(summary["connections"][CONNECTION]["quarantined"].values()) == [["REJECTED_BY_EXACT"]] * 2
    earned = sandbox.exact.stats["errors"]
    assert sum(earned.values()) == earned[f"{S.DIVISION} {GJE}"] == 2 < 5

    # `status` shows what the hour's error budget has seen.
    assert run_cli(mappings, state_url, "status", "--json") in (0, 1)
    budget = json.loads(capsys.readouterr().out)["connections"][CONNECTION]["error_budget"]
    assert [(b["endpoint"], b["errors"], b["stopped"]) for b in budget] == [(GJE, 2, False)]


def test_after_five_errors_in_the_hour_the_rest_waits_for_the_next_run_with_a_clear_message(
        day_of_20, state_url, capsys):
    sandbox, mappings, day = day_of_20
    for _ in range(5):
        sandbox.faults.arm("exact.post_entry", "http_500_before_store")

    assert run_cli(mappings, state_url, "run", "--start", day, "--json") == 0
    summary = json.loads(capsys.readouterr().out)

    assert sandbox.exact.entries(S.DIVISION) == []
    assert sum(sandbox.exact.stats["errors"].values()) == 5  # stopped well before Exact's block at 10
    deferred = summary["connections"][CONNECTION]["deferred"]
    assert len(deferred) == 15
    assert run_cli(mappings, state_url, "status") == 1
    text = capsys.readouterr().out
    assert f"{GJE}: 5/5 this hour, STOPPED until the next hour" in text
