"""The whole chain through Dagster against the sandbox over real HTTP: what the demo promises, proven.

Approved reports of the seed's 30 days are posted exactly once, the two seeded problems are quarantined with
their reasons, every entry balances and every line leads back to its expense; a rerun posts nothing, and a dry run
shows every draft line and what a run will do with each report while writing nothing anywhere.
"""

import json
from datetime import date, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from expensify_exact.core import connections
from expensify_exact.defs.keys import JOURNAL_DRAFTS, QUARANTINE, RAW_REPORTS, UNREPORTED_CARD_SPEND
from expensify_exact.defs.runs import preview_range, run_range
from expensify_exact.store import StateStore
from expensify_exact_sandbox import seed
from tests.factories import run_cli as _cli
from tests.factories import state_rows

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
CONNECTION = "vermeerhals-nl"


def _window(sandbox) -> tuple[date, date]:
    today = sandbox.seed.today
    return today - timedelta(days=31), today - timedelta(days=1)


def _expected_report_ids(sandbox, start: date, end: date) -> set[str]:
    """Approved reports whose approval falls on a day of the window, in Amsterdam time (the seed is in UTC)."""
    found = set()
    for report in sandbox.seed.approved_reports:
        day = report.approved.replace(tzinfo=ZoneInfo("UTC")).astimezone(AMSTERDAM).date()
        if start <= day <= end:
            found.add(report.report_id)
    return found


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    """(state URL, Dagster instance): the embedded SQLite default, or production storage on PostgreSQL."""
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    if request.param == "sqlite":
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
            yield f"sqlite:///{tmp_path / 'state.db'}", instance
        return
    url = request.getfixturevalue("pg_database")
    storage = {"storage": {"postgres": {"postgres_url": url}}}
    with dg.instance_for_test(overrides=storage, temp_dir=str(tmp_path / "dagster_home")) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        yield url, instance


@pytest.fixture
def authorized(sandbox_mappings, state_url):
    assert _cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    return sandbox_mappings


def _sandbox_entries(sandbox) -> list[dict]:
    return sandbox.exact.entries(seed.DIVISION)


def test_demo_window_posts_every_approved_report_once_and_quarantines_the_two_seeded_problems(
        sandbox, sandbox_mappings, backend):
    state_url, instance = backend
    assert _cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    authorized = sandbox_mappings
    start, end = _window(sandbox)
    summary = run_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert summary.success, summary.failure
    outcomes = summary.outcomes.set_index("report_id")

    gifts, eindhoven = seed._report_id(101), seed._report_id(102)
    expected = _expected_report_ids(sandbox, start, end)
    assert set(outcomes.index) == expected, "every approved report of the window ends in exactly one outcome"
    quarantined = outcomes[outcomes["outcome"] == "quarantined"]
    assert set(quarantined.index) == {gifts, eindhoven}
    assert quarantined.loc[gifts, "reason_codes"] == ["UNMAPPED_CATEGORY"]
    assert quarantined.loc[eindhoven, "reason_codes"] == ["UNKNOWN_COST_CENTER"]
    posted = outcomes[outcomes["outcome"] == "posted"]
    assert set(posted.index) == expected - {gifts, eindhoven}

    entries = _sandbox_entries(sandbox)
    assert len(entries) == len(posted)
    by_id = {e["EntryID"]: e for e in entries}
    seed_reports = {r.report_id: r for r in sandbox.seed.reports}
    for report_id, row in posted.iterrows():
        entry = by_id[row["entry_id"]]
        assert entry["EntryNumber"] == row["entry_number"]
        # Balanced as Exact books it, VAT lines it split off included.
        assert sum(round(line["AmountFC"] * 100) for line in entry["transaction_lines"]) == 0, report_id
        for tx in seed_reports[report_id].expenses:
            ours = [line for line in entry["lines"] if tx.transaction_id in (line.get("Description") or "")]
            assert len(ours) >= 2, f"{tx.transaction_id} lacks its debit and credit line"
            for line in ours:
                assert report_id in line["Description"] and report_id in line["Notes"]
                assert tx.transaction_id in line["Notes"]

    # The same window again posts nothing new.
    again = run_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert again.success, again.failure
    assert set(again.outcomes.loc[again.outcomes["outcome"] == "already_posted", "report_id"]) == set(posted.index)
    assert (again.outcomes["outcome"] != "posted").all()
    assert len(_sandbox_entries(sandbox)) == len(posted)

    # Every asset of the chain was materialized for the window's days, and the checks ran and passed.
    days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    for key in (RAW_REPORTS, JOURNAL_DRAFTS, QUARANTINE, UNREPORTED_CARD_SPEND):
        materialized = instance.get_materialized_partitions(key)
        assert {f"{CONNECTION}|{d.isoformat()}" for d in days} <= materialized, key


@pytest.fixture
def sandbox_time(sandbox, monkeypatch):
    """The connector waits on the sandbox's clock: a dry run and a real run back to back stay inside Expensify's
    20 requests a minute by waiting, and on the simulated clock that wait takes no real time."""
    monkeypatch.setattr(connections, "SystemClock", lambda: sandbox.clock)


def test_dry_run_shows_every_draft_and_the_verdict_a_run_then_acts_on(sandbox, authorized, state_url, instance,
                                                                      sandbox_time):
    _, end = _window(sandbox)
    start = end - timedelta(days=9)  # includes both seeded problems
    before = state_rows(state_url)
    summary = preview_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert summary.success, summary.failure
    [preview] = summary.previews
    verdicts = {v.report_id: v for v in preview.verdicts}
    gifts, eindhoven = seed._report_id(101), seed._report_id(102)
    expected = _expected_report_ids(sandbox, start, end)
    assert set(verdicts) == expected, "every approved report of the window gets a verdict"
    assert {r: v.reason_codes for r, v in verdicts.items() if v.action == "quarantine"} == {
        gifts: ["UNMAPPED_CATEGORY"], eindhoven: ["UNKNOWN_COST_CENTER"]}
    would_post = {r for r, v in verdicts.items() if v.action == "post"}
    assert would_post == expected - {gifts, eindhoven}
    lines = preview.drafts.lines
    for report_id in would_post:
        assert len(verdicts[report_id].body["GeneralJournalEntryLines"]) == (lines["report_id"] == report_id).sum()
    # The one write a dry run may need: `secrets set` left an expired access token, and Exact's refresh token is
    # single-use, so the rotated pair must be kept (the CLI test below starts with a fresh token: nothing at all).
    after = state_rows(state_url)
    assert after.pop("ee_exact_tokens") != before.pop("ee_exact_tokens") and after == before
    assert _sandbox_entries(sandbox) == []

    # What the dry run promised is what the run does: the same reports, the same content, the same reasons.
    run = run_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    outcomes = run.outcomes.set_index("report_id")
    assert set(outcomes.index[outcomes["outcome"] == "posted"]) == would_post
    store = StateStore(state_url)
    assert all(store.ledger_get(CONNECTION, r).content_hash == verdicts[r].content_hash for r in would_post)
    assert outcomes.loc[eindhoven, "reasons"] == verdicts[eindhoven].reasons
    again = preview_range(start, end, mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert {v.report_id for v in again.previews[0].verdicts if v.action == "already_posted"} == would_post


def test_run_dry_run_through_the_cli_writes_nothing_anywhere_and_shows_every_draft_line(
        sandbox, authorized, state_url, capsys, monkeypatch, tmp_path, sandbox_time):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "cli_home"))
    _, end = _window(sandbox)
    start, middle = end - timedelta(days=9), end - timedelta(days=5)
    # A real run over the first days: the dry run then meets posted reports, an open quarantine, stored snapshots,
    # rate-limit records and days posted — none of which it may touch.
    assert _cli(authorized, state_url, "run", "--start", start.isoformat(), "--end", middle.isoformat()) == 0
    posted_before = _sandbox_entries(sandbox)
    before = state_rows(state_url)
    with dg.DagsterInstance.get() as instance:
        materialized_before = _materializations(instance)
    sandbox.exact.reset_stats()
    capsys.readouterr()

    assert _cli(authorized, state_url, "run", "--start", start.isoformat(), "--end", end.isoformat(),
                "--dry-run") == 0
    out = capsys.readouterr().out
    assert _cli(authorized, state_url, "run", "--start", start.isoformat(), "--end", end.isoformat(),
                "--dry-run", "--json") == 0
    shown = json.loads(capsys.readouterr().out)

    assert state_rows(state_url) == before, "a dry run writes nothing to the state DB"
    with dg.DagsterInstance.get() as instance:
        assert _materializations(instance) == materialized_before, "a dry run materializes nothing"
        [latest, *_] = instance.get_run_records(dg.RunsFilter(job_name="dry_run"), limit=2)
        assert latest.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    stats = sandbox.exact.stats
    assert stats["posts"]["attempted"] == 0 and not [c for c in stats["calls"] if c.startswith("POST")], stats
    assert _sandbox_entries(sandbox) == posted_before

    ledger = {r.report_id for r in StateStore(state_url).ledger_rows(CONNECTION)}
    verdicts = {v["report_id"]: v["action"] for v in shown["connections"][CONNECTION]["verdicts"]}
    assert ledger and {r for r, a in verdicts.items() if a == "already_posted"} == ledger
    assert {a for r, a in verdicts.items() if r not in ledger} == {"post", "quarantine"}
    lines = shown["connections"][CONNECTION]["lines"]
    printed = out.splitlines()
    seed_reports = {r.report_id: r for r in sandbox.seed.reports}
    drafted = {r for r, a in verdicts.items() if a != "quarantine"}
    for report_id in drafted:
        for tx in seed_reports[report_id].expenses:
            # Every expense's debit and credit line, with both Expensify IDs, in the text and in the JSON.
            assert len([ln for ln in printed if report_id in ln and f" {tx.transaction_id} " in ln]) >= 2, tx
            assert len([ln for ln in lines if (ln["report_id"], ln["transaction_id"]) ==
                        (report_id, tx.transaction_id)]) >= 2
    assert len(lines) == len([ln for ln in printed if ln.startswith("    ") and ln.split()[1] in drafted])


def _materializations(instance: dg.DagsterInstance) -> dict[str, int]:
    return {key.to_user_string(): len(instance.fetch_materializations(key, limit=10_000).records)
            for key in instance.get_asset_keys()}


def test_run_json_summary_for_one_day(sandbox, authorized, state_url, instance, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "cli_home"))
    eindhoven = next(r for r in sandbox.seed.reports if r.report_id == seed._report_id(102))
    day = eindhoven.approved.replace(tzinfo=ZoneInfo("UTC")).astimezone(AMSTERDAM).date().isoformat()
    assert _cli(authorized, state_url, "run", "--start", day, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["success"] is True and summary["start"] == day == summary["end"]
    assert summary["connections"][CONNECTION]["quarantined"] == {eindhoven.report_id: ["UNKNOWN_COST_CENTER"]}


def test_mark_exported_labels_only_reports_that_reached_the_ledger(sandbox, tmp_path, state_url, instance):
    from tests.conftest import write_mappings

    mappings = write_mappings(tmp_path / "labelled", sandbox, expensify__poll_interval_seconds=0.2,
                              expensify__mark_exported_label="Posted to Exact")
    assert _cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    _, end = _window(sandbox)
    start = end - timedelta(days=9)  # includes both seeded problems
    summary = run_range(start, end, mappings_dir=str(mappings), state_url=state_url, instance=instance)
    assert summary.success, summary.failure
    outcomes = summary.outcomes.set_index("report_id")["outcome"]
    posted = set(outcomes[outcomes == "posted"].index)
    assert posted and (outcomes == "quarantined").sum() == 2
    labelled = {r.report_id for r in sandbox.seed.reports if "Posted to Exact" in sandbox.expensify.labels(r.report_id)}
    assert labelled == posted, "labels go on exactly the reports posted, never on quarantined ones"
    # A dry run labels nothing.
    sandbox.expensify.set_knobs(render_delay_seconds=0.3)
    before = {r.report_id: list(sandbox.expensify.labels(r.report_id)) for r in sandbox.seed.reports}
    preview_range(start - timedelta(days=5), start - timedelta(days=1), mappings_dir=str(mappings),
                  state_url=state_url, instance=instance)
    assert {r.report_id: list(sandbox.expensify.labels(r.report_id)) for r in sandbox.seed.reports} == before
    # The run's steps (export, card spend, labels) each have a client; together they kept Expensify's windows.
    assert sandbox.expensify.stats["rate_limited"] == 0
